"""Models: parity with guided-diffusion's PyTorch outputs, the released checkpoints' state-dict
layouts, and the behaviour of the options (bf16, remat, dropout, errors).

Truth comes from outside the implementation: the golden vectors of ../shared/parity (made by the
original code), the state-dict key/shape lists of ../shared/presets (made by the original factories),
and closed forms read off the reference code (bilinear interpolation, pooling-head layouts).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffjax.compat.gd_models import (
    build, create_classifier, create_model, load_state_dict, sr_create_model, state_dict_shapes,
    variables_to_state_dict)
from diffjax.models import layers, winograd
from diffjax.models import GroupNorm32, qkv_attention, resize_bilinear_torch, timestep_embedding
from tests._util import PRESETS, nchw_to_nhwc, rel_err
from tests._util import first_quick

PARITY_TOL = 1e-5
MODEL_FILES = ["unet_cond32", "unet_uncond32", "classifier32"]


def _model_and_vars(g, **overrides):
    module = build(g.config["model_class"], **{**g.config["model_kwargs"], **overrides})
    return module, load_state_dict(module, g.state_dict())


def _inputs(g):
    x = jnp.asarray(nchw_to_nhwc(g["in.x"]))
    t = jnp.asarray(g["in.t"])
    kw = {"y": jnp.asarray(g["in.y"])} if g.config["model_kwargs"].get("num_classes") else {}
    return x, t, kw


def _forward(module, variables, g):
    x, t, kw = _inputs(g)
    return np.asarray(jax.jit(lambda v, x, t, kw: module.apply(v, x, t, **kw))(variables, x, t, kw))


@pytest.fixture(scope="module")
def cond32(golden):
    g = golden("unet_cond32")
    module, variables = _model_and_vars(g)
    return g, module, variables


# --- golden parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [32, 7])
def test_timestep_embedding_matches_reference(golden, dim):
    g = golden("diffusion")
    got = timestep_embedding(jnp.asarray(g["fn.timestep_embedding.t"]), dim)
    assert got.dtype == jnp.float32
    assert rel_err(got, g[f"fn.timestep_embedding.dim{dim}"]) <= 1e-4
    if dim % 2:
        assert np.all(np.asarray(got)[:, -1] == 0)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_forward_matches_reference(golden, name):
    g = golden(name)
    module, variables = _model_and_vars(g)
    assert list(state_dict_shapes(module)) == g.config["state_dict_keys"]
    err = rel_err(_forward(module, variables, g), nchw_to_nhwc(g["out"]))
    assert err <= PARITY_TOL, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
def test_both_conv3x3_algorithms_match_reference(golden, monkeypatch, algorithm):
    """Both ways of running the 3x3 convolutions (XLA's direct one and Winograd F(2x2,3x3)) reproduce
    the original model; the counter proves the Winograd path really ran."""
    calls = []
    real = winograd.conv3x3_winograd
    monkeypatch.setattr(winograd, "conv3x3_winograd", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = golden("unet_cond32")
    module, variables = _model_and_vars(g)
    module = module.clone(conv_algorithm=algorithm)
    err = rel_err(_forward(module, variables, g), nchw_to_nhwc(g["out"]))
    assert err <= PARITY_TOL, f"{algorithm}: rel err {err:.2e}"
    assert bool(calls) == (algorithm == "winograd")


def _conv3x3_float64(x, k):
    """'SAME' 3x3 convolution (cross-correlation, as PyTorch and XLA) as nine shifted products."""
    x = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1] - 2, x.shape[2] - 2
    return sum(x[:, i:i + h, j:j + w] @ k[i, j].astype(np.float64) for i in range(3) for j in range(3))


@pytest.mark.parametrize("shape", [(2, 16, 16, 8), pytest.param((1, 4, 6, 3), marks=pytest.mark.slow),
                                   pytest.param((3, 32, 18, 40), marks=pytest.mark.slow)])
def test_winograd_conv_matches_float64_convolution(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    k = rng.standard_normal((3, 3, shape[-1], 24)).astype(np.float32)
    ref = _conv3x3_float64(x, k)
    assert rel_err(winograd.conv3x3_winograd(x, k), ref) <= 2e-6
    # and its gradients are those of the convolution (XLA's own, an independent implementation)
    r = rng.standard_normal(ref.shape).astype(np.float32)

    def direct(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=lax.Precision.HIGHEST)

    got = jax.grad(lambda x, k: jnp.sum(winograd.conv3x3_winograd(x, k) * r), (0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(direct(x, k) * r), (0, 1))(x, k)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 2e-6


NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("channels", [64, winograd.WINOGRAD_MIN_CHANNELS])
def test_auto_takes_winograd_for_wide_layers_on_the_cpu(monkeypatch, channels):
    """"auto" (the default) runs Winograd on the CPU backend only for layers of at least
    WINOGRAD_MIN_CHANNELS channels; its value is the convolution's either way."""
    calls = []
    real = winograd.conv3x3_winograd
    monkeypatch.setattr(winograd, "conv3x3_winograd", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, channels)).astype(np.float32)
    k = (rng.standard_normal((3, 3, channels, channels)) / channels).astype(np.float32)
    got = winograd.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                        algorithm="auto")
    assert rel_err(got, _conv3x3_float64(x, k)) <= 2e-6
    wide = channels >= winograd.WINOGRAD_MIN_CHANNELS
    assert bool(calls) == (wide and jax.default_backend() == "cpu")


def test_winograd_hook_differentiates_as_the_direct_convolution():
    """Through the hook, Winograd gives the value and the direct convolution the derivatives: the
    gradients equal XLA's convolution's, and the tangent program holds convolutions, none of
    Winograd's matrix products."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 8)).astype(np.float32)
    k = rng.standard_normal((3, 3, 8, 6)).astype(np.float32)
    r = rng.standard_normal((2, 16, 16, 6)).astype(np.float32)

    def hook(x, k):
        return winograd.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=NHWC, algorithm="winograd")

    def direct(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                        precision=lax.Precision.HIGHEST)

    got = jax.grad(lambda x, k: jnp.sum(hook(x, k) * r), (0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(direct(x, k) * r), (0, 1))(x, k)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 2e-6
    value, tangent = jax.linearize(hook, x, k)
    assert rel_err(value, _conv3x3_float64(x, k)) <= 2e-6
    primitives = {str(e.primitive) for e in jax.make_jaxpr(tangent)(x, k).eqns}
    assert "conv_general_dilated" in primitives and "dot_general" not in primitives, primitives


def test_winograd_conv_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="even H, W"):
        winograd.conv3x3_winograd(np.zeros((1, 5, 6, 2), np.float32), np.zeros((3, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="conv_algorithm='fast'"):
        winograd.conv_general_dilated(np.zeros((1, 16, 16, 2), np.float32),
                                    np.zeros((3, 3, 2, 2), np.float32), (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), algorithm="fast")


@pytest.mark.parametrize("field, value", [("conv_algorithm", "fast"), ("attention_impl", "flash")])
def test_bad_kernel_choices_are_named(field, value):
    with pytest.raises(ValueError, match=f"UNetModel: {field}={value!r} is not one of"):
        build("UNetModel", **_SMALL).clone(**{field: value})


# --- attention through jax.nn.dot_product_attention ------------------------------------------------

@pytest.mark.parametrize("name", ["unet_cond32", "classifier32"])
def test_dot_product_attention_matches_reference(golden, name):
    """attention_impl='xla' (jax.nn.dot_product_attention) in every attention block reproduces the
    original model: the legacy head order (unet_cond32) and AttentionPool2d's new order over
    HW + 1 tokens (classifier32)."""
    g = golden(name)
    module, variables = _model_and_vars(g)
    err = rel_err(_forward(module.clone(attention_impl="xla"), variables, g), nchw_to_nhwc(g["out"]))
    assert err <= PARITY_TOL, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("legacy", [True, False])
def test_dot_product_attention_with_encoder_tokens_matches_float64(legacy):
    """GLIDE's case: S extra keys and values before the T own ones; impl='xla' against the closed
    form softmax(q [ek; k]^T / sqrt(c)) [ev; v] in float64."""
    b, t, s, heads, c = 2, 6, 3, 2, 8
    rng = np.random.default_rng(1)
    qkv, ekv = rng.normal(size=(b, t, 3 * heads * c)), rng.normal(size=(b, s, 2 * heads * c))
    if legacy:
        q, k, v = np.moveaxis(qkv.reshape(b, t, heads, 3, c), 3, 0)
        ek, ev = np.moveaxis(ekv.reshape(b, s, heads, 2, c), 3, 0)
    else:
        q, k, v = np.moveaxis(qkv.reshape(b, t, 3, heads, c), 2, 0)
        ek, ev = np.moveaxis(ekv.reshape(b, s, 2, heads, c), 2, 0)
    k, v = np.concatenate([ek, k], 1), np.concatenate([ev, v], 1)
    logits = np.einsum("bthc,bshc->bhts", q, k) / np.sqrt(c)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhts,bshc->bthc", w / w.sum(-1, keepdims=True), v).reshape(b, t, heads * c)
    got = qkv_attention(jnp.asarray(qkv, jnp.float32), heads, legacy=legacy,
                        encoder_kv=jnp.asarray(ekv, jnp.float32), impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cudnn_attention_needs_what_flash_attention_supports():
    qkv = jnp.zeros((1, 4, 3 * 2 * 16), jnp.float32)
    with pytest.raises(ValueError, match="attention_impl='cudnn'.*float32 and 16"):
        qkv_attention(qkv, 2, legacy=True, impl="cudnn")
    if jax.default_backend() != "gpu":  # "auto" is cuDNN only where it can run
        assert layers._attention_implementation("auto", jnp.bfloat16, 64) == "einsum"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_flash_attention_matches_einsum_attention_on_gpu(golden):
    """bfloat16 compute (2 heads of 32 channels: a width cuDNN supports), cuDNN flash attention vs
    guided-diffusion's einsum attention with the same parameters: equal to bfloat16 rounding, and
    the compiled program really calls cuDNN."""
    g = golden("unet_cond32")
    module, variables = _model_and_vars(g, dtype=jnp.bfloat16)
    flash = module.clone(attention_impl="cudnn")
    assert rel_err(_forward(flash, variables, g), _forward(module, variables, g)) <= 2e-2
    x, t, kw = _inputs(g)
    hlo = jax.jit(lambda v, x, t, kw: flash.apply(v, x, t, **kw)).lower(variables, x, t, kw).as_text()
    assert "cudnn" in hlo


def test_classifier_guidance_gradient_matches_reference(golden):
    """out.grad = d/dx sum_i log_softmax(classifier(x, t))[i, y_i] (GD's cond_fn at scale 1)."""
    g = golden("classifier32")
    module, variables = _model_and_vars(g)
    x, t, _ = _inputs(g)
    y = jnp.asarray(g["in.y"])

    def log_prob(x):
        logp = jax.nn.log_softmax(module.apply(variables, x, t), axis=-1)
        return jnp.take_along_axis(logp, y[:, None], axis=-1).sum()

    grad = jax.jit(jax.grad(log_prob))(x)
    err = rel_err(grad, nchw_to_nhwc(g["out.grad"]))
    assert err <= PARITY_TOL, f"rel err {err:.2e}"


def test_pt_file_loads_like_npz(golden, parity_dir):
    pytest.importorskip("diffjax.io.torch_pt")
    g = golden("unet_cond32")
    module = build(g.config["model_class"], **g.config["model_kwargs"])
    variables = load_state_dict(module, parity_dir / "pt" / "unet_cond32.pt")
    assert rel_err(_forward(module, variables, g), nchw_to_nhwc(g["out"])) <= PARITY_TOL


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_head_orders(legacy):
    """QKVAttentionLegacy splits the qkv channels as (heads, q/k/v, c), QKVAttention as
    (q/k/v, heads, c); each head is softmax(q k^T / sqrt(c)) v (GD's unet.py), here in float64."""
    b, t, heads, c = 2, 5, 3, 4
    qkv = np.random.default_rng(0).normal(size=(b, t, 3 * heads * c))
    split = qkv.reshape(b, t, heads, 3, c) if legacy else qkv.reshape(b, t, 3, heads, c).swapaxes(2, 3)
    want = np.zeros((b, t, heads, c))
    for i in range(b):
        for h in range(heads):
            q, k, v = split[i, :, h, 0], split[i, :, h, 1], split[i, :, h, 2]
            w = np.exp(q @ k.T / np.sqrt(c))
            want[i, :, h] = (w / w.sum(-1, keepdims=True)) @ v
    got = qkv_attention(jnp.asarray(qkv, jnp.float32), heads, legacy=legacy)
    np.testing.assert_allclose(got, want.reshape(b, t, heads * c), rtol=1e-5, atol=1e-5)


def _group_norm_float64(x, scale, bias, groups=32, eps=1e-5):
    """torch.nn.GroupNorm's formula, channels last, in float64 numpy (no JAX)."""
    g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + eps)
    return g.reshape(x.shape) * scale + bias


def test_group_norm_statistics_stay_float32_under_bfloat16():
    """A large common offset breaks bfloat16 sums (8-bit mantissa); float32 statistics of the same
    bfloat16 input match a float64 GroupNorm up to the bfloat16 rounding of the output."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(100.0 + rng.normal(size=(2, 8, 8, 64)), jnp.bfloat16)
    variables = GroupNorm32().init(jax.random.key(0), x)
    got = GroupNorm32().apply(variables, x)
    assert got.dtype == jnp.bfloat16
    want = _group_norm_float64(np.asarray(x, np.float64), 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2)


def test_group_norm_derivatives_match_finite_differences_of_the_formula():
    """The closed-form tangent (normalization.group_norm) against central differences of the
    float64 formula, in forward mode (jvp) and in reverse mode (vjp, by <vjp(c), v> = <c, jvp(v)>),
    for x, scale and bias together."""
    from diffjax.models.normalization import group_norm
    rng = np.random.default_rng(0)
    x, dx = 3.0 + 2.0 * rng.normal(size=(2, 4, 5, 64)), rng.normal(size=(2, 4, 5, 64))
    scale, dscale = 1.0 + 0.1 * rng.normal(size=64), rng.normal(size=64)
    bias, dbias = 0.1 * rng.normal(size=64), rng.normal(size=64)
    h = 1e-4
    want = (_group_norm_float64(x + h * dx, scale + h * dscale, bias + h * dbias)
            - _group_norm_float64(x - h * dx, scale - h * dscale, bias - h * dbias)) / (2 * h)
    f = lambda *a: group_norm(*a, 32, 1e-5)
    primals = tuple(jnp.asarray(a, jnp.float32) for a in (x, scale, bias))
    tangents = tuple(jnp.asarray(a, jnp.float32) for a in (dx, dscale, dbias))
    value, tangent = jax.jvp(f, primals, tangents)
    np.testing.assert_allclose(value, _group_norm_float64(x, scale, bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tangent, want, rtol=1e-4, atol=1e-4)
    c = rng.normal(size=x.shape)
    cotangents = jax.vjp(f, *primals)[1](jnp.asarray(c, jnp.float32))
    inner = sum(float(np.sum(np.asarray(ct, np.float64) * t))
                for ct, t in zip(cotangents, (dx, dscale, dbias)))
    assert inner == pytest.approx(float(np.sum(c * want)), rel=1e-4)


@pytest.mark.parametrize("kernel", [1, 3])
def test_upsampled_conv_is_the_convolution_of_the_upsampled_input(kernel):
    """layers.upsampled_conv (4 phase convolutions for 3x3) against numpy's convolution of the
    nearest-upsampled input in float64, and its gradients against those of lax's convolution of
    jnp.repeat-upsampled input; a stride-2 convolution is refused."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 5, 6, 8)), rng.normal(size=(kernel, kernel, 8, 16)) / 8
    up = x.repeat(2, axis=1).repeat(2, axis=2)
    p = kernel // 2
    padded = np.pad(up, ((0, 0), (p, p), (p, p), (0, 0)))
    want = sum(np.einsum("bhwi,io->bhwo", padded[:, i:i + 10, j:j + 12], w[i, j])
               for i in range(kernel) for j in range(kernel))
    dn = ("NHWC", "HWIO", "NHWC")
    ours = lambda x, w: layers.upsampled_conv(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=dn)
    theirs = lambda x, w: lax.conv_general_dilated(
        jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w, (1, 1), ((p, p), (p, p)),
        dimension_numbers=dn, precision=lax.Precision.HIGHEST)
    xf, wf = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    np.testing.assert_allclose(ours(xf, wf), want, rtol=1e-5, atol=1e-5)
    c = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    for got, ref in zip(jax.vjp(ours, xf, wf)[1](c), jax.vjp(theirs, xf, wf)[1](c)):
        assert rel_err(got, ref) <= 1e-5
    with pytest.raises(ValueError, match="stride-1"):
        layers.upsampled_conv(xf, wf, (2, 2), ((p, p), (p, p)), dimension_numbers=dn)


# --- factories and presets ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["unet_cond32", "unet_uncond32"])
def test_create_model_builds_the_reference_constructor_kwargs(golden, name):
    """create_model flags -> exactly the constructor kwargs the reference recorded (the golden
    configs patched NUM_CLASSES to 10). The classifier presets below cover create_classifier."""
    cfg = golden(name).config
    module = create_model(**cfg["factory_kwargs"], num_classes=10)
    for key, want in cfg["model_kwargs"].items():
        if key != "use_fp16":
            assert getattr(module, key) == (tuple(want) if isinstance(want, list) else want), key


def _preset_files():
    return sorted(PRESETS.glob("*.json")) if PRESETS.exists() else []


def _expected_tensors(preset):
    return [(k, tuple(shape)) for k, shape, _ in preset["state_dict"]["tensors"]]


@pytest.mark.parametrize("path", first_quick(_preset_files()), ids=lambda p: p.stem)
def test_preset_state_dict_layout(path):
    """Each released checkpoint's key/shape list, from its constructor kwargs and from its factory."""
    preset = json.loads(path.read_text())
    want = _expected_tensors(preset)
    module = build(preset["constructor"]["class"], **preset["constructor"]["kwargs"])
    assert list(state_dict_shapes(module).items()) == want

    factory = preset["factory"]["function"].rsplit(".", 1)[-1]
    kwargs = preset["factory"]["kwargs"]
    if factory.startswith("sr_"):
        module = sr_create_model(**kwargs)
    elif "classifier" in factory:
        module = create_classifier(**kwargs)
    else:
        module = create_model(**kwargs)
    assert list(state_dict_shapes(module).items()) == want


def test_presets_present(presets_dir):
    assert len(list(presets_dir.glob("*.json"))) >= 23


# --- state dict mapping ------------------------------------------------------------------------

class _CountingMapping(dict):
    """A state dict that counts value accesses (a lazy .pt reader reads a tensor per access)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.reads = {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().__getitem__(key)

    def items(self):  # values must be read through __getitem__ only
        raise AssertionError("load_state_dict must not call items()")

    def values(self):
        raise AssertionError("load_state_dict must not call values()")


def test_load_reads_each_value_once_and_round_trips(golden):
    g = golden("classifier32")
    sd = g.state_dict()
    module = build(g.config["model_class"], **g.config["model_kwargs"])
    counting = _CountingMapping(sd)
    variables = load_state_dict(module, counting)
    assert counting.reads == {k: 1 for k in sd}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    back = variables_to_state_dict(module, variables)
    assert list(back) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_load_lists_every_problem_in_one_error(golden):
    g = golden("unet_cond32")
    sd = dict(g.state_dict())
    module = build(g.config["model_class"], **g.config["model_kwargs"])
    del sd["input_blocks.1.0.in_layers.2.weight"]
    del sd["out.2.bias"]
    sd["module.extra.weight"] = np.zeros(3, np.float32)
    sd["time_embed.0.weight"] = np.zeros((64, 16), np.float32)
    with pytest.raises(ValueError) as info:
        load_state_dict(module, sd)
    msg = str(info.value)
    assert "2 missing, 1 unexpected, 1 mis-shaped" in msg
    for needle in ["missing: input_blocks.1.0.in_layers.2.weight [32, 32, 3, 3]",
                   "missing: out.2.bias [6]", "unexpected: module.extra.weight",
                   "time_embed.0.weight: checkpoint [64, 16], model [128, 32]"]:
        assert needle in msg


# --- options: bf16, remat, dropout ---------------------------------------------------------------

def test_bf16_keeps_float32_params_and_tracks_float32(cond32):
    g, module, variables = cond32
    fp16 = build(g.config["model_class"], **{**g.config["model_kwargs"], "use_fp16": True})
    assert fp16.dtype == jnp.bfloat16
    shapes32 = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs()[0],
                                                  **module.example_inputs()[1]))
    shapes16 = jax.eval_shape(lambda: fp16.init(jax.random.key(0), *fp16.example_inputs()[0],
                                                **fp16.example_inputs()[1]))
    assert jax.tree_util.tree_structure(shapes16) == jax.tree_util.tree_structure(shapes32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes16))
    out = _forward(fp16, variables, g)
    assert out.dtype == np.float32
    # bfloat16 has an 8-bit mantissa: a few 1e-3 relative through a 20-layer network.
    assert rel_err(out, nchw_to_nhwc(g["out"])) <= 5e-2


def test_remat_gives_the_same_outputs_and_gradients(golden):
    g = golden("classifier32")
    module, variables = _model_and_vars(g, use_checkpoint=True)
    x, t, _ = _inputs(g)
    y = jnp.asarray(g["in.y"])
    assert rel_err(_forward(module, variables, g), g["out"]) <= PARITY_TOL

    def log_prob(x):
        logp = jax.nn.log_softmax(module.apply(variables, x, t), axis=-1)
        return jnp.take_along_axis(logp, y[:, None], axis=-1).sum()

    assert rel_err(jax.jit(jax.grad(log_prob))(x), nchw_to_nhwc(g["out.grad"])) <= PARITY_TOL


def test_dropout_only_in_train_mode_and_needs_the_rng(golden):
    g = golden("unet_uncond32")
    module, variables = _model_and_vars(g, dropout=0.3)
    want = nchw_to_nhwc(g["out"])
    assert rel_err(_forward(module, variables, g), want) <= PARITY_TOL  # eval: dropout is a no-op
    x, t, _ = _inputs(g)
    with pytest.raises(Exception, match="dropout"):
        module.apply(variables, x, t, train=True)
    train = jax.jit(lambda key: module.apply(variables, x, t, train=True, rngs={"dropout": key}))
    a, b, a2 = train(jax.random.key(1)), train(jax.random.key(2)), train(jax.random.key(1))
    assert rel_err(a, want) > 1e-3 and rel_err(a, b) > 1e-3
    np.testing.assert_array_equal(a, a2)


# --- super-resolution, pools -------------------------------------------------------------------

def test_bilinear_resize_matches_torch_closed_form():
    """F.interpolate(mode='bilinear', align_corners=False) of [[0, 1], [2, 3]] to 4x4: per axis the
    source coordinate (d + 0.5) / 2 - 0.5 clamped at 0 gives weights [0, .25, .75, 1]."""
    x = jnp.asarray([[0.0, 1.0], [2.0, 3.0]])[None, :, :, None]
    r = np.array([0.0, 0.25, 0.75, 1.0])
    want = 2 * r[:, None] + r[None, :]
    np.testing.assert_allclose(np.asarray(resize_bilinear_torch(x, (4, 4)))[0, :, :, 0], want, atol=1e-7)
    # 3 -> 2 (no antialiasing): src = (d + 0.5) * 1.5 - 0.5 = 0.25, 1.75
    y = jnp.asarray([0.0, 10.0, 20.0])[None, :, None, None]
    np.testing.assert_allclose(np.asarray(resize_bilinear_torch(y, (2, 1)))[0, :, 0, 0], [2.5, 17.5])


def _random_variables(module, seed=0):
    """Random weights through the state-dict path (cheaper than compiling `init`)."""
    rng = np.random.default_rng(seed)
    sd = {k: rng.normal(0, 0.2, shape).astype(np.float32) for k, shape in state_dict_shapes(module).items()}
    return load_state_dict(module, sd)


def test_super_res_model_conditions_on_low_res():
    module = build("SuperResModel", image_size=16, in_channels=3, model_channels=32, out_channels=6,
                   num_res_blocks=1, attention_resolutions=(), channel_mult=(1,), num_heads=2)
    assert state_dict_shapes(module)["input_blocks.0.0.weight"] == (32, 6, 3, 3)  # x + low_res
    variables = _random_variables(module)
    x, t = jnp.ones((2, 16, 16, 3)), jnp.array([3, 500])
    low = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    apply = jax.jit(lambda low: module.apply(variables, x, t, low_res=low))
    out1, out2 = apply(low), apply(low * 2)
    assert out1.shape == (2, 16, 16, 6) and not np.allclose(out1, out2)
    with pytest.raises(ValueError, match="low_res"):
        module.apply(variables, x, t)


@pytest.mark.parametrize("pool, head", [
    ("adaptive", [("out.0.weight", (64,)), ("out.0.bias", (64,)), ("out.3.weight", (10, 64, 1, 1)),
                  ("out.3.bias", (10,))]),
    # spatial features: conv 32 + res 32 + down 32 + res 64 + middle 64 = 224 channels
    ("spatial", [("out.0.weight", (2048, 224)), ("out.0.bias", (2048,)),
                 ("out.2.weight", (10, 2048)), ("out.2.bias", (10,))]),
    ("spatial_v2", [("out.0.weight", (2048, 224)), ("out.0.bias", (2048,)), ("out.1.weight", (2048,)),
                    ("out.1.bias", (2048,)), ("out.3.weight", (10, 2048)), ("out.3.bias", (10,))]),
    ("attention", [("out.0.weight", (64,)), ("out.0.bias", (64,)),
                   ("out.2.positional_embedding", (64, 17)), ("out.2.qkv_proj.weight", (192, 64, 1)),
                   ("out.2.qkv_proj.bias", (192,)), ("out.2.c_proj.weight", (10, 64, 1)),
                   ("out.2.c_proj.bias", (10,))]),
])
def test_encoder_pools(pool, head):
    module = build("EncoderUNetModel", image_size=8, in_channels=3, model_channels=32, out_channels=10,
                   num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                   num_head_channels=32, resblock_updown=True, pool=pool)
    shapes = state_dict_shapes(module)
    assert [(k, v) for k, v in shapes.items() if k.startswith("out.")] == head
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([1, 900])
    logits = jax.eval_shape(lambda: module.apply(module.init(jax.random.key(1), x, t), x, t))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


# --- errors --------------------------------------------------------------------------------------

_SMALL = dict(image_size=32, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2))


@pytest.mark.parametrize("model_class, overrides, match", [
    ("UNetModel", dict(attention_resolutions=(3,)), r"\[3\].*choose from \[1, 2\]"),
    ("UNetModel", dict(dims=3), "dims=3.*use dims=2"),
    ("UNetModel", dict(num_heads=3), "num_heads=3 does not divide the 64 channels"),
    ("UNetModel", dict(num_head_channels=48), "num_head_channels=48"),
    ("UNetModel", dict(channel_mult=(1, 1.5)), "48 channels at level 1.*divisible by 32"),
    ("UNetModel", dict(dropout=1.0), "dropout=1.0"),
    ("UNetModel", dict(dtype=jnp.int8), "dtype=int8"),
    ("UNetModel", dict(learn_sigma=True), r"no constructor argument\(s\) \['learn_sigma'\]"),
    ("EncoderUNetModel", dict(pool="max"), "pool='max'.*adaptive"),
    ("EncoderUNetModel", dict(pool="attention"), "num_head_channels"),
    ("Transformer", {}, "model_class='Transformer'"),
])
def test_bad_constructor_values_are_named(model_class, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(model_class, **{**_SMALL, **overrides})


@pytest.mark.parametrize("factory, flags, match", [
    (create_model, dict(image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="24"),
     "attention_resolutions=24 is not a resolution of a 64x64 model.*choose from 64, 32, 16, 8"),
    (create_model, dict(image_size=48, num_channels=64, num_res_blocks=1),
     "unsupported image size: 48"),
    (create_model, dict(image_size=64, num_channels=64, num_res_blocks=1, num_chanels=3),
     r"unknown flag\(s\) \['num_chanels'\]"),
    (create_classifier, dict(image_size=32), "unsupported image size: 32"),
    (sr_create_model, dict(large_size=128), "unsupported large size: 128"),
])
def test_bad_factory_flags_are_named(factory, flags, match):
    with pytest.raises(ValueError, match=match):
        factory(**flags)


def test_wrong_inputs_are_named(cond32):
    g, module, variables = cond32
    x, t, kw = _inputs(g)
    with pytest.raises(ValueError, match="class labels"):
        module.apply(variables, x, t)
    with pytest.raises(ValueError, match="NHWC"):
        module.apply(variables, jnp.moveaxis(x, -1, 1), t, **kw)

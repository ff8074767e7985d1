"""GLIDE's sampling conventions checked against independent truths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import conditioning as C
from diffjax import images
from diffjax.compat import glide_text2im as GT
from diffjax.core import guidance as G
from diffjax.core import schedules
from diffjax.core.samplers import sample
from tests._tiny_glide import TINY_FLAGS


def test_quantize_8bit_is_the_uint8_grid():
    levels = np.arange(256) / 127.5 - 1
    jitter = np.random.default_rng(0).uniform(-0.49, 0.49, 256) / 127.5
    np.testing.assert_allclose(C.quantize_8bit(levels + jitter), levels, atol=1e-6)


def test_noise_scale_scales_x_T_of_a_linear_sampler():
    # eps = 0 and no clipping make DDIM (eta 0) linear in x_T: x_0 = x_T / sqrt(abar_T).
    sched = schedules.make_schedule("linear", 1000, "10")
    zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    key = jax.random.PRNGKey(0)
    one = sample(key, zero, sched, (2, 4, 4, 3), clip_denoised=False)
    scaled = sample(key, zero, sched, (2, 4, 4, 3), clip_denoised=False, noise_scale=0.997)
    np.testing.assert_allclose(scaled, 0.997 * one, rtol=1e-5)
    abar_T = float(sched.alphas_cumprod[-1])
    assert abs(float(jnp.std(one)) * np.sqrt(abar_T) - 1) < 0.3  # x_T ~ N(0, 1)


def test_resize_mask_is_torch_nearest():
    torch = pytest.importorskip("torch", reason="torch is optional: the truth here is "
                                "torch.nn.functional.interpolate itself")

    mask = (np.random.default_rng(1).random((1, 5, 7, 1)) > 0.5).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(mask).permute(0, 3, 1, 2), (16, 16),
                                           mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images.resize_mask(mask, 16), want)


def test_text_guidance_is_uncond_plus_scale_times_difference():
    module = GT.create_model(image_size=16, text_ctx=4, n_vocab=20, use_fp16=False, **TINY_FLAGS)
    args, kwargs = module.example_inputs(2)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.array([3, 700])
    tokens = jnp.array([[1, 2, 19, 19], [4, 5, 6, 19]])
    mask = tokens != 19
    apply = jax.jit(module.apply)
    cond = apply(variables, x, t, tokens=tokens, mask=mask)
    uncond = apply(variables, x, t, tokens=jnp.full_like(tokens, 19), mask=jnp.zeros_like(mask))
    # GLIDE's unconditional branch: the empty caption's embedding (padding 19, mask all False)
    guidance = G.classifier_free(3.0, {"text_emb": C.text_embedding(
        (module, variables), *C.empty_caption(4, 19))})
    emb = C.text_embedding((module, variables), tokens, mask)
    model_fn = lambda x_, t_, **kw: module.apply(variables, x_, t_, **kw)  # noqa: E731
    got = jax.jit(guidance.wrap_model(model_fn))(x, t, text_emb=emb)
    np.testing.assert_allclose(got[..., :3], uncond[..., :3] + 3.0 * (cond[..., :3] - uncond[..., :3]),
                               atol=2e-4)
    np.testing.assert_allclose(got[..., 3:], cond[..., 3:], atol=2e-5)  # the conditional variance

"""GLIDE's text-conditional UNets against openai/glide-text2im: the golden vectors of
../shared/parity/glide_tiny.npz (plain forward, text embedding, the notebook's classifier-free
guidance), the state-dict layout of the four released models, strict loading and conversion."""
import jax
import numpy as np
import pytest

import types

from diffjax.cli import convert as convert_cli
from diffjax.io import convert as convert_lib
from diffjax.io.loading import load_converted

# The conversion's library half, its reader and its command line.
C = types.SimpleNamespace(convert=convert_lib.convert, build_model=convert_lib.build_model,
                          load_converted=load_converted, main=convert_cli.main)
from diffjax.compat import glide_presets
from diffjax.compat import glide_text2im as GT
from tests._util import nchw_to_nhwc, rel_err
from tests.test_torch_pt import state_dict_file

TOL = 1e-5  # compat_guided_diffusion.md: single model calls on the 32x32 models


@pytest.fixture(scope="module")
def tiny(golden):
    g = golden("glide_tiny")
    module = GT.build(g.config["model_class"], n_vocab=g.config["tokenizer"]["n_vocab"],
                      **g.config["model_kwargs"])
    variables = GT.load_state_dict(module, g.state_dict())
    return g, module, variables, jax.jit(module.apply)


def test_forward_matches_golden(tiny):
    g, _, variables, apply = tiny
    out = apply(variables, nchw_to_nhwc(g["in.x"]), g["in.t"], tokens=g["in.tokens"],
                mask=g["in.mask"])
    assert rel_err(out, nchw_to_nhwc(g["out"])) <= TOL


def test_text_embedding_matches_golden(tiny):
    g, module, variables, apply = tiny
    emb = GT.get_text_emb(module, variables, g["in.tokens"], g["in.mask"])
    assert rel_err(emb["xf_proj"], g["out.xf_proj"]) <= TOL
    # glide-text2im returns [B, xf_width, text_ctx]; diffjax [B, text_ctx, xf_width].
    assert rel_err(emb["xf_out"], np.swapaxes(g["out.xf_out"], 1, 2)) <= TOL


def test_notebook_classifier_free_guidance_matches_golden(tiny):
    g, _, variables, apply = tiny
    model_fn = GT.cfg_model_fn(lambda x, t, **kw: apply(variables, x, t, **kw),
                               g.config["guidance_scale"])
    out = model_fn(nchw_to_nhwc(g["in.x"]), g["in.cfg_t"], tokens=g["in.tokens"],
                   mask=g["in.mask"])
    assert rel_err(out, nchw_to_nhwc(g["out.cfg"])) <= TOL


# --- the state-dict layout -------------------------------------------------------------------------

def reference_layout(flags, n_vocab, extra_in):
    """PyTorch key -> shape of the model glide_text2im.model_creation.create_model(**flags) builds,
    enumerated from the reference constructors (Text2ImUNet, unet.UNetModel, xf.Transformer) in
    state_dict() order. Checked against the golden model's real key list below."""
    size, mc, width = flags["image_size"], flags["num_channels"], flags["xf_width"]
    mult = flags["channel_mult"]
    if isinstance(mult, str):
        mult = tuple(int(m) for m in mult.split(",")) if mult else \
            {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}[size]
    rates = [size // int(r) for r in flags["attention_resolutions"].split(",")]
    ted, ss = 4 * mc, flags["use_scale_shift_norm"]
    sd = {"positional_embedding": (flags["text_ctx"], width)}
    if flags["xf_padding"]:
        sd["padding_embedding"] = (flags["text_ctx"], width)
    sd.update({"time_embed.0.weight": (ted, mc), "time_embed.0.bias": (ted,),
               "time_embed.2.weight": (ted, ted), "time_embed.2.bias": (ted,)})

    def conv(p, o, i, k):  # Conv2d
        sd.update({f"{p}.weight": (o, i, k, k), f"{p}.bias": (o,)})

    def norm(p, c):
        sd.update({f"{p}.weight": (c,), f"{p}.bias": (c,)})

    def res(p, ch, out):
        norm(f"{p}.in_layers.0", ch)
        conv(f"{p}.in_layers.2", out, ch, 3)
        sd.update({f"{p}.emb_layers.1.weight": (2 * out if ss else out, ted),
                   f"{p}.emb_layers.1.bias": (2 * out if ss else out,)})
        norm(f"{p}.out_layers.0", out)
        conv(f"{p}.out_layers.3", out, out, 3)
        if out != ch:
            conv(f"{p}.skip_connection", out, ch, 1)

    def attn(p, ch):
        norm(f"{p}.norm", ch)
        sd.update({f"{p}.qkv.weight": (3 * ch, ch, 1), f"{p}.qkv.bias": (3 * ch,),
                   f"{p}.encoder_kv.weight": (2 * ch, width, 1), f"{p}.encoder_kv.bias": (2 * ch,),
                   f"{p}.proj_out.weight": (ch, ch, 1), f"{p}.proj_out.bias": (ch,)})

    ch = input_ch = int(mult[0] * mc)
    conv("input_blocks.0.0", ch, 3 + extra_in, 3)
    chans, ds, idx = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(flags["num_res_blocks"]):
            res(f"input_blocks.{idx}.0", ch, int(m * mc))
            ch = int(m * mc)
            if ds in rates:
                attn(f"input_blocks.{idx}.1", ch)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            res(f"input_blocks.{idx}.0", ch, ch)  # resblock_updown=True in every GLIDE preset
            chans.append(ch)
            ds, idx = ds * 2, idx + 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    idx = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(flags["num_res_blocks"] + 1):
            res(f"output_blocks.{idx}.0", ch + chans.pop(), int(mc * m))
            ch, j = int(mc * m), 1
            if ds in rates:
                attn(f"output_blocks.{idx}.1", ch)
                j = 2
            if level and i == flags["num_res_blocks"]:
                res(f"output_blocks.{idx}.{j}", ch, ch)
                ds //= 2
            idx += 1
    norm("out.0", ch)
    conv("out.2", 6, input_ch, 3)
    for i in range(flags["xf_layers"]):
        p = f"transformer.resblocks.{i}"
        sd.update({f"{p}.attn.c_qkv.weight": (3 * width, width), f"{p}.attn.c_qkv.bias": (3 * width,),
                   f"{p}.attn.c_proj.weight": (width, width), f"{p}.attn.c_proj.bias": (width,)})
        norm(f"{p}.ln_1", width)
        sd.update({f"{p}.mlp.c_fc.weight": (4 * width, width), f"{p}.mlp.c_fc.bias": (4 * width,),
                   f"{p}.mlp.c_proj.weight": (width, 4 * width), f"{p}.mlp.c_proj.bias": (width,)})
        norm(f"{p}.ln_2", width)
    if flags["xf_final_ln"]:
        norm("final_ln", width)
    sd.update({"token_embedding.weight": (n_vocab, width),
               "transformer_proj.weight": (ted, width), "transformer_proj.bias": (ted,)})
    return sd


# The golden model as glide-text2im create_model flags (32 px: channel_mult 1,2,2, rates 2, 4).
TINY_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", num_heads=1,
                  num_head_channels=32, attention_resolutions="16,8", dropout=0.0, text_ctx=16,
                  xf_width=64, xf_layers=2, xf_heads=4, xf_final_ln=True, xf_padding=True,
                  use_scale_shift_norm=True, resblock_updown=True, use_fp16=False)


def test_reference_layout_is_the_golden_models(golden):
    """The test's enumeration reproduces the real glide-text2im key list, order included."""
    g = golden("glide_tiny")
    want = [(k, g[k].shape) for k in g.config["state_dict_keys"]]
    assert list(reference_layout(TINY_FLAGS, 64, 0).items()) == want
    module = GT.create_model(n_vocab=64, **TINY_FLAGS)
    assert list(GT.state_dict_shapes(module).items()) == want


@pytest.mark.parametrize("name", [
    "base", "upsample-inpaint",  # both sizes, both extra inputs; the other two are slow-only
    pytest.param("upsample", marks=pytest.mark.slow),
    pytest.param("base-inpaint", marks=pytest.mark.slow)])
def test_preset_layouts(name):
    config = glide_presets.get_config(name)
    extra_in = {"Text2ImUNet": 0, "InpaintText2ImUNet": 4, "SuperResText2ImUNet": 3,
                "SuperResInpaintText2ImUNet": 7}[config.model_class]
    want = reference_layout(config.model, config.n_vocab, extra_in)
    got = GT.state_dict_shapes(C.build_model(config))
    assert got == want and list(got) == list(want)


def test_preset_facts():
    """glide-text2im's defaults: 64 px base on squaredcos_cap_v2, 256 px upsampler on linear."""
    base, up = glide_presets.get_config("base"), glide_presets.get_config("upsample-inpaint")
    assert (base.model.image_size, base.model.num_channels, base.model.num_res_blocks) == (64, 192, 3)
    assert base.diffusion.noise_schedule == "squaredcos_cap_v2"
    assert (up.model.image_size, up.model.num_res_blocks, up.diffusion.noise_schedule) == (256, 2, "linear")
    assert up.model_class == "SuperResInpaintText2ImUNet"
    assert base.url.endswith("/dec-2021/base.pt")


# --- strict loading, inputs, conversion -----------------------------------------------------------

def test_strict_loading_lists_every_bad_key(tiny):
    g, module, _, _ = tiny
    sd = g.state_dict()
    del sd["transformer.resblocks.1.ln_1.weight"]
    sd["transformer.resblocks.2.ln_1.weight"] = np.ones(64, np.float32)
    sd["padding_embedding"] = np.zeros((8, 64), np.float32)
    with pytest.raises(ValueError) as err:
        GT.load_state_dict(module, sd)
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    for needle in ("missing: transformer.resblocks.1.ln_1.weight [64]",
                   "unexpected: transformer.resblocks.2.ln_1.weight",
                   "shape mismatch: padding_embedding: checkpoint [8, 64], model [16, 64]"):
        assert needle in msg


def test_variant_input_channels_and_errors():
    kw = dict(GT.model_and_diffusion_defaults(), **TINY_FLAGS)
    kw = {k: v for k, v in kw.items() if k not in GT.DIFFUSION_FLAGS}
    for inpaint, super_res, channels in [(True, False, 7), (False, True, 6), (True, True, 10)]:
        module = GT.create_model(n_vocab=64, **dict(kw, inpaint=inpaint, super_res=super_res))
        assert GT.state_dict_shapes(module)["input_blocks.0.0.weight"] == (32, channels, 3, 3)
    with pytest.raises(ValueError, match="no constructor argument"):
        GT.build("Text2ImUNet", n_vocab=64, use_new_attention_order=True, **_ctor(kw))
    with pytest.raises(ValueError, match="xf_ar"):
        GT.build("Text2ImUNet", n_vocab=64, xf_ar=0.5, **_ctor(kw))
    with pytest.raises(ValueError, match="not a glide-text2im model class"):
        GT.build("UNetModel", **_ctor(kw))


def _ctor(flags):
    module = GT.create_model(n_vocab=64, **flags)
    return {k: getattr(module, k) for k in (
        "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
        "channel_mult", "num_head_channels", "text_ctx", "xf_width", "xf_layers", "xf_heads",
        "xf_padding")}


def test_call_errors_name_the_fix(tiny):
    g, module, variables, _ = tiny
    x = nchw_to_nhwc(g["in.x"])[:1]
    with pytest.raises(ValueError, match="xf_padding=True needs mask"):
        module.apply(variables, x, g["in.t"][:1], tokens=g["in.tokens"][:1])
    with pytest.raises(ValueError, match=r"tokens must be \[B, text_ctx=16\]"):
        module.apply(variables, x, g["in.t"][:1], tokens=g["in.tokens"][:1, :8],
                     mask=g["in.mask"][:1, :8])
    with pytest.raises(ValueError, match="takes no low_res"):
        module.apply(variables, x, g["in.t"][:1], tokens=g["in.tokens"][:1],
                     mask=g["in.mask"][:1], low_res=x)


def test_convert_writes_a_loadable_checkpoint(tiny, tmp_path):
    """The golden state dict as a real .pt -> python -m diffjax convert's path -> the golden output
    (computed here from a precomputed text embedding, the `text_emb=` path)."""
    g, module, _, apply = tiny
    pt = state_dict_file(tmp_path / "glide_tiny.pt", g.state_dict())
    config = glide_presets.get_config("base")
    config.model.update(TINY_FLAGS)
    config.n_vocab, config.name = 64, "glide_tiny"
    out = C.convert(pt, config, tmp_path / "ckpt", progress=False)
    converted, variables, loaded = C.load_converted(out)
    assert loaded.family == "glide-text2im" and loaded.model_class == "Text2ImUNet"
    # The golden model's constructor arguments (create_model also records image_size).
    assert converted.clone(image_size=None) == module
    emb = GT.get_text_emb(converted, variables, g["in.tokens"], g["in.mask"])
    got = apply(variables, nchw_to_nhwc(g["in.x"]), g["in.t"], text_emb=emb)
    assert rel_err(got, nchw_to_nhwc(g["out"])) <= TOL
    # The CLI knows the released presets (it gets as far as opening the checkpoint).
    with pytest.raises(SystemExit, match="no such checkpoint file"):
        C.main(["--pt", str(tmp_path / "base.pt"), "--preset", "base", "--out",
                str(tmp_path / "o"), "--no-progress"])

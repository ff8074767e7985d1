"""openai/glide-text2im's model vocabulary on top of `diffjax.models.glide` (see
../shared/design/compat_guided_diffusion.md, GLIDE section).

* `build(model_class, **model_kwargs)`: "Text2ImUNet", "InpaintText2ImUNet", "SuperResText2ImUNet",
  "SuperResInpaintText2ImUNet" (glide-text2im spells the last one `...Text2ImUnet`; both work) with
  glide-text2im's constructor keywords; its `tokenizer` argument is replaced by `n_vocab` (a
  tokenizer object with `.n_vocab` is also accepted).
* `create_model(**flags)`, `model_and_diffusion_defaults()`, `model_and_diffusion_defaults_upsampler()`:
  glide_text2im.model_creation's factory and defaults, same flag names and string formats.
* `load_state_dict(module, state_dict_or_path)`: strict, through diffjax's safe .pt reader (no torch,
  no pickled code run); `state_dict_shapes`, `variables_to_state_dict` as in `gd_models`.
* `apply(module, variables, x, t, **kwargs)`, `get_text_emb(module, variables, tokens, mask)`.
* `cfg_model_fn(model_fn, guidance_scale)`: the text2im notebook's classifier-free-guidance
  model_fn on a [cond; uncond] batch, built on `diffjax.core.guidance.classifier_free`.

Images are NHWC; `xf_out` is [B, text_ctx, xf_width] (glide-text2im: [B, xf_width, text_ctx]).
"""
from __future__ import annotations

import jax.numpy as jnp

from diffjax.core import guidance as G
from diffjax.compat import gd_models
from diffjax.compat.glide_clip import (  # noqa: F401  (GLIDE's noised CLIP)
    CLIPModel, clip_tokenizer, create_clip_model, load_clip_state_dict)
from diffjax.compat.gd_models import (  # noqa: F401  (the mapping works for GLIDE's models too)
    load_state_dict, state_dict_shapes, variables_to_state_dict)
from diffjax.models.glide import (
    InpaintText2ImUNet, SuperResInpaintText2ImUNet, SuperResText2ImUNet, Text2ImUNet)

GPT2_N_VOCAB = 50257  # len(encoder.json) of glide-text2im's tokenizer (the released models')

MODEL_CLASSES = {
    "Text2ImUNet": Text2ImUNet,
    "InpaintText2ImUNet": InpaintText2ImUNet,
    "SuperResText2ImUNet": SuperResText2ImUNet,
    "SuperResInpaintText2ImUNet": SuperResInpaintText2ImUNet,
    "SuperResInpaintText2ImUnet": SuperResInpaintText2ImUNet,  # glide-text2im's spelling
}

# glide_text2im.unet.UNetModel's keywords (no image_size, no use_new_attention_order; encoder_channels
# is set by Text2ImUNet itself) and Text2ImUNet's own.
_UNET_KWARGS = ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims",
                "num_classes", "use_checkpoint", "use_fp16", "num_heads", "num_head_channels",
                "num_heads_upsample", "use_scale_shift_norm", "resblock_updown")
_TEXT_KWARGS = ("text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln", "n_vocab",
                "cache_text_emb", "xf_ar", "xf_padding", "share_unemb")
_DIFFJAX_KWARGS = ("image_size", "dtype", "precision", "conv_algorithm", "attention_impl")


def build(model_class, **model_kwargs):
    """The diffjax module for a glide-text2im class and its constructor kwargs (`tokenizer` ->
    `n_vocab`). `use_fp16=True` -> bfloat16 compute with float32 parameters; `dims` must be 2;
    `xf_ar` (an unused-at-sampling autoregressive text head, 0 in every released model) must be 0.
    """
    name = str(model_class).rsplit(".", 1)[-1]
    if name not in MODEL_CLASSES:
        raise ValueError(f"model_class={model_class!r} is not a glide-text2im model class: choose "
                         f"from {sorted(set(MODEL_CLASSES) - {'SuperResInpaintText2ImUnet'})}")
    kw = dict(model_kwargs)
    if "tokenizer" in kw:
        tokenizer = kw.pop("tokenizer")
        if not hasattr(tokenizer, "n_vocab"):
            raise ValueError("tokenizer= must have an n_vocab attribute; or pass n_vocab=<int> "
                             "(50257 for glide-text2im's tokenizer)")
        kw.setdefault("n_vocab", int(tokenizer.n_vocab))
    if kw.pop("xf_ar", 0.0):
        raise ValueError(f"xf_ar={model_kwargs['xf_ar']!r}: the autoregressive text head (unemb) "
                         f"is not supported; the released GLIDE models use xf_ar=0.0")
    kw.pop("share_unemb", None)  # only meaningful with xf_ar
    allowed = _TEXT_KWARGS + _UNET_KWARGS + _DIFFJAX_KWARGS
    return gd_models.construct(MODEL_CLASSES[name], name, allowed, kw)


# --- glide_text2im.model_creation ---------------------------------------------------------------

def model_and_diffusion_defaults() -> dict:
    """glide_text2im.model_creation.model_and_diffusion_defaults() (the 64x64 base model)."""
    return dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1,
                num_head_channels=64, num_heads_upsample=-1, attention_resolutions="32,16,8",
                dropout=0.1, text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8,
                xf_final_ln=True, xf_padding=True, diffusion_steps=1000,
                noise_schedule="squaredcos_cap_v2", timestep_respacing="",
                use_scale_shift_norm=True, resblock_updown=True, use_fp16=True,
                cache_text_emb=False, inpaint=False, super_res=False)


def model_and_diffusion_defaults_upsampler() -> dict:
    """glide_text2im.model_creation.model_and_diffusion_defaults_upsampler() (64 -> 256)."""
    return dict(model_and_diffusion_defaults(), image_size=256, num_res_blocks=2,
                noise_schedule="linear", super_res=True)


DIFFUSION_FLAGS = ("diffusion_steps", "noise_schedule", "timestep_respacing")
_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def create_model(*, n_vocab: int = GPT2_N_VOCAB, **flags):
    """glide_text2im.model_creation.create_model -> the module (model_and_diffusion_defaults()
    fills missing flags; diffusion flags are accepted and ignored). `inpaint` / `super_res` pick the
    class; `channel_mult=""` -> the per-image_size default (256, 128, 64); attention_resolutions
    are resolutions ("32,16,8"), converted to downsample rates."""
    defaults = model_and_diffusion_defaults()
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(f"create_model() got unknown flag(s) {unknown}: valid flags are "
                         f"{sorted(defaults)}")
    f = {**defaults, **flags}
    size = f["image_size"]
    if f["channel_mult"] in ("", None, ()):
        if size not in _CHANNEL_MULT:
            raise ValueError(f"unsupported image size: {size} has no default channel_mult: choose "
                             f"from {sorted(_CHANNEL_MULT)} or pass channel_mult, e.g. '1,2,3,4'")
        channel_mult = _CHANNEL_MULT[size]
    else:
        channel_mult = tuple(gd_models._int_list(f["channel_mult"], "channel_mult"))
        if 2 ** (len(channel_mult) + 2) != size:  # glide-text2im asserts this
            raise ValueError(f"channel_mult={f['channel_mult']!r} has {len(channel_mult)} levels; "
                             f"glide-text2im requires 2 ** (levels + 2) == image_size={size}")
    rates = gd_models._attention_rates(f["attention_resolutions"], size, channel_mult,
                                       "attention_resolutions")
    model_class = {(False, False): "Text2ImUNet", (True, False): "InpaintText2ImUNet",
                   (False, True): "SuperResText2ImUNet",
                   (True, True): "SuperResInpaintText2ImUNet"}[(bool(f["inpaint"]),
                                                                 bool(f["super_res"]))]
    return build(
        model_class, text_ctx=f["text_ctx"], xf_width=f["xf_width"], xf_layers=f["xf_layers"],
        xf_heads=f["xf_heads"], xf_final_ln=f["xf_final_ln"], n_vocab=n_vocab,
        xf_padding=f["xf_padding"], in_channels=3, model_channels=f["num_channels"],
        out_channels=6, num_res_blocks=f["num_res_blocks"], attention_resolutions=rates,
        dropout=f["dropout"], channel_mult=channel_mult, use_fp16=f["use_fp16"],
        num_heads=f["num_heads"], num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"], use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"], cache_text_emb=f["cache_text_emb"], image_size=size)


# --- calls ----------------------------------------------------------------------------------------

def apply(module, variables, x, timesteps, **model_kwargs):
    """module.apply(variables, x, timesteps, tokens=..., mask=..., [low_res=...],
    [inpaint_image=..., inpaint_mask=...]) -> [B, H, W, out_channels]."""
    return module.apply(variables, x, timesteps, **model_kwargs)


def get_text_emb(module, variables, tokens, mask=None) -> dict:
    """{"xf_proj": [B, 4 * model_channels], "xf_out": [B, text_ctx, xf_width]}."""
    return module.apply(variables, tokens, mask, method="get_text_emb")


def cfg_model_fn(model_fn, guidance_scale, mean_channels: int = 3):
    """The classifier-free-guidance model_fn of glide-text2im's text2im notebook.

    `model_fn(x, t, **kwargs)` is the plain model; the returned function takes a batch of 2B whose
    kwargs (tokens, mask, ...) are [cond; uncond]. Only x[:B] is used (duplicated):
    eps = uncond + s * (cond - uncond) on the first `mean_channels` channels, for both halves; the
    other channels (the learned variance) are each half's own raw output. -> [2B, H, W, C].

    The first half is exactly `diffjax.core.guidance.classifier_free(s, uncond_kwargs)` applied to
    x[:B] (the transform to use with diffjax's samplers, which need no doubled batch); the second
    half only repeats it with the unconditional variance, which glide-text2im's sampler carries
    along and discards. Both halves use t[:B], as the notebook's sampler gives every item the same t.
    """
    def guided(x, t, **kwargs):
        half = x.shape[0] // 2
        if x.shape[0] != 2 * half:
            raise ValueError(f"cfg_model_fn needs an even batch [cond; uncond], got {x.shape[0]}")
        cond = {k: v[:half] for k, v in kwargs.items()}
        uncond = {k: v[half:] for k, v in kwargs.items()}
        raw = []  # the doubled call's raw output, for the second half's variance channels

        def recording(x_, t_, **kw):
            out = model_fn(x_, t_, **kw)
            raw.append(out)
            return out

        transform = G.classifier_free(guidance_scale, uncond, mean_channels)
        first = transform.wrap_model(recording)(x[:half], t[:half], **cond)
        second = jnp.concatenate([first[..., :mean_channels], raw[0][half:, ..., mean_channels:]],
                                 axis=-1)
        return jnp.concatenate([first, second])

    return guided


__all__ = ["MODEL_CLASSES", "GPT2_N_VOCAB", "build", "create_model", "model_and_diffusion_defaults",
           "model_and_diffusion_defaults_upsampler", "load_state_dict", "state_dict_shapes",
           "variables_to_state_dict", "apply", "get_text_emb", "cfg_model_fn", "CLIPModel",
           "clip_tokenizer", "create_clip_model", "load_clip_state_dict"]

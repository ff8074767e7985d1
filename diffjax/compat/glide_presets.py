"""Presets for the released openai/glide-text2im checkpoints (base, upsample, base-inpaint,
upsample-inpaint; the dec-2021 "GLIDE (filtered)" models).

Each preset is glide-text2im's `model_and_diffusion_defaults()` (base) or
`model_and_diffusion_defaults_upsampler()` (upsample), with `inpaint=True` for the inpainting ones,
as its notebooks build them, split into

* `model`: the flags of `diffjax.compat.glide_text2im.create_model` (glide_text2im.model_creation's),
  plus `model_class` and `n_vocab` (50257, its GPT-2 tokenizer);
* `diffusion`: `diffusion_steps, noise_schedule, timestep_respacing` (glide-text2im's
  create_gaussian_diffusion; learned-range variance, epsilon prediction, no timestep rescaling);
* `sampling`: what the notebooks sample with (respacing, guidance scale, upsample temperature).

`get_config(name)` returns an ml_collections ConfigDict; `python -m diffjax convert --preset base
--pt base.pt --out ckpt/glide_base` converts a checkpoint with it.
"""
from __future__ import annotations

import difflib

import ml_collections

from diffjax.compat import glide_text2im as GT

FAMILY = "glide-text2im"
_URL = "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/"

# name -> (defaults: "base" | "upsampler", inpaint, checkpoint file, the notebook's sampling flags)
PRESETS = {
    "base": ("base", False, "base.pt",
             dict(timestep_respacing="100", guidance_scale=3.0, batch_size=1)),
    "upsample": ("upsampler", False, "upsample.pt",
                 dict(timestep_respacing="fast27", upsample_temp=0.997, batch_size=1)),
    "base-inpaint": ("base", True, "base_inpaint.pt",
                     dict(timestep_respacing="100", guidance_scale=5.0, batch_size=1)),
    "upsample-inpaint": ("upsampler", True, "upsample_inpaint.pt",
                         dict(timestep_respacing="fast27", upsample_temp=0.997, batch_size=1)),
}


def get_config(name: str | None = None) -> ml_collections.ConfigDict:
    """The preset of a released glide-text2im checkpoint."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3)
        raise ValueError(f"no GLIDE preset {name!r}"
                         f"{': did you mean ' + ', '.join(close) + '?' if close else ''} "
                         f"GLIDE presets: {', '.join(PRESETS)}")
    which, inpaint, checkpoint, sampling = PRESETS[name]
    flags = (GT.model_and_diffusion_defaults() if which == "base"
             else GT.model_and_diffusion_defaults_upsampler())
    flags["inpaint"] = inpaint
    model = {k: v for k, v in flags.items() if k not in GT.DIFFUSION_FLAGS}
    module = GT.create_model(**model)
    return ml_collections.ConfigDict(dict(
        name=name,
        family=FAMILY,
        kind="super_resolution" if flags["super_res"] else "text2im",
        model_class=type(module).__name__,
        factory="create_model",
        n_vocab=GT.GPT2_N_VOCAB,
        model=model,
        diffusion={k: flags[k] for k in GT.DIFFUSION_FLAGS},
        sampling=sampling,
        checkpoint=checkpoint,
        url=_URL + checkpoint,
    ))


def build_model(config):
    """The module a GLIDE preset-shaped config describes."""
    return GT.create_model(n_vocab=config.n_vocab, **config.model)


__all__ = ["PRESETS", "FAMILY", "get_config", "build_model"]

"""guided-diffusion / improved-diffusion / GLIDE vocabulary -> diffjax's own: the one place where
their flags become a `DiffusionSpec`, a `TimeGrid`, a `Conditioning` and a network config.

* `spec_from_flags(flags)`: create_gaussian_diffusion's flags (learn_sigma, sigma_small,
  diffusion_steps / steps, noise_schedule, use_kl, predict_xstart, rescale_timesteps,
  rescale_learned_sigmas; GLIDE's squaredcos_cap_v2) -> (DiffusionSpec, TimeGrid of
  timestep_respacing). Unknown flags are an error naming the closest one.
* `bundle_parts(preset)`: a preset-shaped config (`gd_presets.get_config`, `config_from_flags`,
  `glide_presets.get_config`) -> the keyword arguments of `DiffusionModel` but the weights.
"""
from __future__ import annotations

from typing import Mapping

from diffjax.bundle import SAMPLING_KEYS
from diffjax.conditioning import ClassLabel, Conditioning, Inpaint, LowRes, Text
from diffjax.core import fields
from diffjax.core.spec import DiffusionSpec
from diffjax.core.timegrid import TimeGrid
from diffjax.models.registry import network_config

# glide-text2im's schedule names: squaredcos_cap_v2 is GD's "cosine" (the same alpha-bar
# cos^2((t / T + 0.008) / 1.008 * pi / 2), betas capped at 0.999).
_SCHEDULE_NAMES = {"squaredcos_cap_v2": "cosine", "linear": "linear", "cosine": "cosine"}
_FLAG_DEFAULTS = dict(steps=1000, learn_sigma=False, sigma_small=False, noise_schedule="linear",
                      use_kl=False, predict_xstart=False, rescale_timesteps=False,
                      rescale_learned_sigmas=False, timestep_respacing="")


def spec_from_flags(flags: Mapping) -> tuple[DiffusionSpec, TimeGrid]:
    """(spec, sampling grid) of create_gaussian_diffusion's flags (`diffusion_steps` is accepted
    for `steps`), with guided-diffusion's choices: use_kl -> the rescaled KL loss;
    rescale_learned_sigmas -> the rescaled hybrid loss; learn_sigma -> the learned-range variance,
    taking precedence over sigma_small."""
    flags = dict(flags)
    if "diffusion_steps" in flags:
        flags["steps"] = flags.pop("diffusion_steps")
    fields.check_keys("diffusion flags", flags, _FLAG_DEFAULTS)
    f = {**_FLAG_DEFAULTS, **flags}
    schedule = f["noise_schedule"]
    if schedule not in _SCHEDULE_NAMES:
        raise ValueError(f"noise_schedule={schedule!r} is not one of "
                         f"{sorted(_SCHEDULE_NAMES)}{fields.closest(schedule, _SCHEDULE_NAMES)}")
    if f["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if f["sigma_small"] else "fixed_large"
    spec = DiffusionSpec(
        beta_schedule=_SCHEDULE_NAMES[schedule], num_steps=int(f["steps"]),
        prediction="x0" if f["predict_xstart"] else "eps", variance=variance,
        loss="kl" if f["use_kl"] else "mse",
        rescale_loss=bool(f["use_kl"] or f["rescale_learned_sigmas"]),
        rescale_timesteps=bool(f["rescale_timesteps"]))
    return spec, TimeGrid.parse(f["timestep_respacing"] or None)


def _glide_parts(preset, module) -> dict:
    flags = dict(preset.diffusion)
    spec, grid = spec_from_flags({"learn_sigma": True, **flags})  # GLIDE: learned-range only
    kinds = [Text(text_ctx=int(preset.model.text_ctx))]
    if preset.model.get("super_res"):
        kinds.append(LowRes(size=int(preset.model.image_size) // 4, quantize=True))
    if preset.model.get("inpaint"):
        kinds.append(Inpaint())
    sampling = dict(preset.get("sampling", {}))
    defaults = {"grid": sampling.get("timestep_respacing") or grid.respacing or None}
    if "guidance_scale" in sampling:
        defaults.update(guidance_scale=sampling["guidance_scale"], sampler="ddpm")
    if "upsample_temp" in sampling:  # the notebooks: DDIM for text2im, ancestral for inpainting
        defaults.update(noise_scale=sampling["upsample_temp"],
                        sampler="ddpm" if preset.model.get("inpaint") else "ddim")
    size = int(preset.model.image_size)
    return dict(kind="diffusion", spec=spec, conditioning=Conditioning(tuple(kinds)),
                image_shape=(size, size, 3), sampling=defaults)


def _gd_parts(preset, module) -> dict:
    kind = preset.get("kind", "diffusion")
    spec, grid = spec_from_flags(preset.diffusion)
    model = dict(preset.model)
    num_classes = int(preset.get("num_classes", 1000))
    sampling = dict(preset.get("sampling", {}))
    defaults = {"grid": grid.respacing or None,
                "sampler": "ddim" if sampling.get("use_ddim") else "ddpm",
                "clip_denoised": bool(sampling.get("clip_denoised", True))}
    if "classifier_scale" in sampling:
        defaults["classifier_scale"] = float(sampling["classifier_scale"])
    if kind == "classifier":
        size = int(model["image_size"])
        return dict(kind="classifier", spec=spec, conditioning=Conditioning(),
                    image_shape=(size, size, 3), sampling={})
    kinds = [ClassLabel(num_classes)] if model.get("class_cond") else []
    if kind == "super_resolution":
        kinds.append(LowRes(size=int(model["small_size"])))
        size = int(model["large_size"])
    else:
        size = int(model["image_size"])
    return dict(kind="diffusion", spec=spec, conditioning=Conditioning(tuple(kinds)),
                image_shape=(size, size, 3), sampling=defaults)


def bundle_parts(preset, module) -> dict:
    """DiffusionModel keyword arguments (all but `weights`) of a preset-shaped config whose
    network is `module` (built by its factory)."""
    glide = preset.get("family") == "glide-text2im"
    parts = (_glide_parts if glide else _gd_parts)(preset, module)
    parts["sampling"] = {k: v for k, v in parts["sampling"].items()
                         if k in SAMPLING_KEYS and v is not None}
    parts["network"] = network_config(module)
    parts["provenance"] = {"name": preset.get("name", ""), "family": preset.get("family", ""),
                           **({"url": preset.url} if preset.get("url") else {}),
                           **({"flags": preset.flags} if preset.get("flags") else {})}
    return parts

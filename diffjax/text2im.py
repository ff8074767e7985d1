"""GLIDE's text-to-image pipeline (Nichol et al. 2021) as pure functions: classifier-free guided
sampling of the 64x64 base model, the 64 -> 256 text-conditional upsampler, inpainting, and the
conditioning pieces GLIDE's training needs (caption dropout, random inpainting masks, zero-initialised
extra input channels).

Sampling follows openai/glide-text2im's notebooks:

* base (text2im.ipynb): 100 respaced steps of ancestral sampling (`p_sample_loop`), classifier-free
  guidance with the empty caption (all-padding tokens, all-False mask) as the unconditional branch,
  scale 3 (5 for inpainting), x0 clipped to [-1, 1];
* upsampler: the base samples quantised to 8 bits, ((x + 1) 127.5).round() / 127.5 - 1, as
  `low_res`; the caption (no guidance); GLIDE's "fast27" respacing; DDIM (eta 0) for text2im,
  ancestral sampling for inpainting; the initial noise x_T scaled by upsample_temp = 0.997;
* inpainting (inpaint.ipynb): the model sees inpaint_image = image * mask and inpaint_mask (1 =
  known), and each x0 prediction is projected onto the known pixels (`diffjax.core.guidance.inpaint`,
  on_x0). The mask is given at 64x64 and upsampled (nearest) for the 256 stage. With RePaint's
  resampling (`jump_length`, `resample_count` > 1) the known region is also imposed on x_t after
  every step, as RePaint does.

Every function takes its module, variables and PRNG key explicitly; the text embedding is computed
once per call and passed to the model as `text_emb` (the classifier-free unconditional branch gets
the empty caption's embedding). Images are NHWC float32 in [-1, 1].
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import guidance as G
from diffjax.core.samplers import sample

# glide-text2im's schedule names -> diffjax's: squaredcos_cap_v2 is GD's "cosine" (the same
# alpha-bar cos^2((t / T + 0.008) / 1.008 * pi / 2), betas capped at 0.999).
_SCHEDULE_NAMES = {"squaredcos_cap_v2": "cosine", "linear": "linear", "cosine": "cosine"}
UPSAMPLE_TEMP = 0.997  # the notebooks' upsample_temp


class Stage(NamedTuple):
    """One GLIDE model ready to sample: its module, variables and (respaced) compat diffusion."""

    module: Any
    variables: Any
    diffusion: Any  # diffjax.compat.guided_diffusion.GaussianDiffusion (schedule + config)


def glide_diffusion(diffusion_flags, timestep_respacing: str | None = None):
    """GLIDE's create_gaussian_diffusion(steps, noise_schedule, timestep_respacing) as a compat
    GaussianDiffusion: epsilon prediction with the learned-range variance (GLIDE's only kind), no
    timestep rescaling. `diffusion_flags`: {"diffusion_steps", "noise_schedule",
    "timestep_respacing"} (a GLIDE preset's `diffusion`); `timestep_respacing` overrides the flag
    ("100", "fast27", "ddim50", ...)."""
    from diffjax import train
    from diffjax.compat.glide_text2im import DIFFUSION_FLAGS

    # GLIDE has only these flags (learned-range variance, epsilon, no rescaling: GD's defaults).
    flags = {k: v for k, v in dict(diffusion_flags).items() if k in DIFFUSION_FLAGS}
    flags = {"diffusion_steps": 1000, **glide_diffusion_flags(flags), "learn_sigma": True}
    if timestep_respacing is not None:
        flags["timestep_respacing"] = timestep_respacing
    flags["timestep_respacing"] = flags.get("timestep_respacing") or ""
    return train.gaussian_diffusion(flags)


def glide_diffusion_flags(flags: dict) -> dict:
    """GLIDE's diffusion flags in guided-diffusion's terms: squaredcos_cap_v2 (the default) is
    GD's "cosine"; learned-range variance unless learn_sigma is given."""
    flags = dict(flags)
    name = flags.get("noise_schedule", "squaredcos_cap_v2")
    if name not in _SCHEDULE_NAMES:
        raise ValueError(f"noise_schedule={name!r} is not a GLIDE schedule: use "
                         f"'squaredcos_cap_v2' (base) or 'linear' (upsampler)")
    flags["noise_schedule"] = _SCHEDULE_NAMES[name]
    flags.setdefault("learn_sigma", True)
    return flags


def quantize_8bit(x):
    """GLIDE's low-resolution input: x [-1, 1] rounded to the 256 levels of an 8-bit image,
    ((x + 1) * 127.5).round() / 127.5 - 1 (round half to even, as torch.round)."""
    return jnp.round((jnp.asarray(x, jnp.float32) + 1) * 127.5) / 127.5 - 1


# --------------------------------------------------------------------------- conditioning


def _check_tokens(module, tokens, mask, batch: int | None = None):
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
    ctx = getattr(module, "text_ctx", tokens.shape[-1])
    if tokens.ndim == 1:
        tokens, mask = tokens[None], mask[None]
    if tokens.shape[-1] != ctx or mask.shape != tokens.shape:
        raise ValueError(f"tokens {tokens.shape} / mask {mask.shape} must both be [B, text_ctx="
                         f"{ctx}]: build them with diffjax.tokenizer.tokens_and_mask(tok, prompts, "
                         f"{ctx})")
    if batch is not None and tokens.shape[0] not in (1, batch):
        raise ValueError(f"{tokens.shape[0]} captions for a batch of {batch}: give one caption, or "
                         f"one per image")
    if batch is not None:
        tokens = jnp.broadcast_to(tokens, (batch, ctx))
        mask = jnp.broadcast_to(mask, (batch, ctx))
    return tokens, mask


def text_embedding(module, variables, tokens, mask) -> dict:
    """The caption's transformer outputs, computed once for a whole sampling run:
    {"xf_proj": [B, 4 model_channels], "xf_out": [B, text_ctx, xf_width]} (the model's `text_emb`)."""
    tokens, mask = _check_tokens(module, tokens, mask)
    return _text_emb(variables, tokens, mask, module=module)


def _text_emb_impl(variables, tokens, mask, module):
    return module.apply(variables, tokens, mask, method="get_text_emb")


_text_emb = jax.jit(_text_emb_impl, static_argnames=("module",))


def empty_caption(module, pad_token: int):
    """The unconditional caption: text_ctx padding tokens, mask all False (glide-text2im's
    padded_tokens_and_mask([], text_ctx); pad_token = the tokenizer's end_token, n_vocab - 1 for
    GPT-2's). -> (tokens [1, text_ctx] int32, mask [1, text_ctx] bool)"""
    ctx = module.text_ctx
    return jnp.full((1, ctx), pad_token, jnp.int32), jnp.zeros((1, ctx), bool)


def text_guidance(module, variables, scale, pad_token: int, mean_channels: int = 3):
    """Classifier-free guidance on captions (GLIDE): `diffjax.core.guidance.classifier_free` whose
    unconditional branch is the empty caption's text embedding. Use with model_kwargs
    {"text_emb": text_embedding(...)}. out = uncond + scale (cond - uncond) on the eps channels;
    scale 0 samples the unconditional model, 1 the conditional one."""
    empty = text_embedding(module, variables, *empty_caption(module, pad_token))
    return G.classifier_free(scale, {"text_emb": empty}, mean_channels=mean_channels)


def inpaint_kwargs(image, mask) -> dict:
    """The inpainting model's inputs: inpaint_image = image * mask [B, H, W, 3] and inpaint_mask
    [B, H, W, 1] (1 = known)."""
    image, mask = _image_and_mask(image, mask)
    return {"inpaint_image": image * mask, "inpaint_mask": mask}


def inpaint_guidance(image, mask, *, jump_length: int = 1, resample_count: int = 1,
                     on_xt: bool | None = None) -> G.Inpaint:
    """The known region imposed while sampling (`diffjax.core.guidance.inpaint`): GLIDE's denoised_fn
    x0 <- mask image + (1 - mask) x0 at every step; with RePaint's resampling (resample_count > 1)
    also x_t <- mask q(x_t | image) + (1 - mask) x_t after every step (on_xt; default: only with
    resampling, as GLIDE's notebook does not)."""
    image, mask = _image_and_mask(image, mask)
    on_xt = resample_count > 1 if on_xt is None else on_xt
    return G.inpaint(mask, image, on_x0=True, on_xt=on_xt, jump_length=jump_length,
                     resample_count=resample_count)


def _image_and_mask(image, mask, batch: int | None = None):
    image, mask = jnp.asarray(image, jnp.float32), jnp.asarray(mask, jnp.float32)
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"inpainting image must be [B, H, W, 3] in [-1, 1], got {image.shape}")
    if mask.ndim == 3:
        mask = mask[..., None]
    if mask.shape[-1] != 1 or mask.shape[1:3] != image.shape[1:3]:
        raise ValueError(f"inpainting mask must be [B, H, W, 1] matching the image {image.shape} "
                         f"(1 = keep, 0 = fill in), got {mask.shape}")
    batch = batch or max(image.shape[0], mask.shape[0])
    return (jnp.broadcast_to(image, (batch,) + image.shape[1:]),
            jnp.broadcast_to(mask, (batch,) + mask.shape[1:]))


def resize_image(image, size: int):
    """[B, H, W, C] -> [B, size, size, C], bicubic with antialiasing (the notebook reads the source
    image with PIL's BICUBIC at 64 and at 256)."""
    b, _, _, c = image.shape
    return jnp.clip(jax.image.resize(jnp.asarray(image, jnp.float32), (b, size, size, c), "cubic",
                                     antialias=True), -1, 1)


def resize_mask(mask, size: int):
    """Nearest-neighbour resize of a [B, h, w, 1] mask to size x size (F.interpolate 'nearest':
    source index floor(i * h / size))."""
    mask = jnp.asarray(mask, jnp.float32)
    rows = (np.arange(size) * mask.shape[1]) // size
    cols = (np.arange(size) * mask.shape[2]) // size
    return mask[:, rows][:, :, cols]


# --------------------------------------------------------------------------- sampling


def _is_inpaint(module) -> bool:
    return bool(getattr(type(module), "_inpaint", False))


def sample_base(key, stage: Stage, tokens, mask, *, batch_size: int, cfg_scale=3.0,
                pad_token: int, sampler="ddpm", inpaint_image=None, inpaint_mask=None,
                jump_length: int = 1, resample_count: int = 1, clip_denoised=True,
                progress: bool = False):
    """Samples [batch_size, S, S, 3] of the base (text2im or inpainting) model with classifier-free
    guidance `cfg_scale` (traced: a new scale does not recompile).

    tokens, mask: [1 or batch_size, text_ctx] (one caption for all, or one each); pad_token: the
    tokenizer's end_token (the empty caption's padding). Inpainting models need inpaint_image
    [B, S, S, 3] and inpaint_mask [B, S, S, 1] (1 = keep); the known pixels are then imposed on
    every x0 prediction (and on x_t with RePaint's jump_length / resample_count)."""
    module, variables, diffusion = stage
    tokens, mask = _check_tokens(module, tokens, mask, batch_size)
    kwargs = {"text_emb": text_embedding(module, variables, tokens, mask)}
    transforms = [text_guidance(module, variables, cfg_scale, pad_token)]
    transforms += _inpainting(module, inpaint_image, inpaint_mask, kwargs, jump_length,
                              resample_count, batch_size)
    size = module.image_size
    return sample(key, (module, variables), diffusion.schedule, (batch_size, size, size, 3),
                  sampler=sampler, guidance=G.chain(*transforms), config=diffusion.config,
                  model_kwargs=kwargs, clip_denoised=clip_denoised, progress=progress)


def upsample(key, stage: Stage, low_res, tokens, mask, *, noise_scale=UPSAMPLE_TEMP,
             sampler: str | None = None, inpaint_image=None, inpaint_mask=None,
             jump_length: int = 1, resample_count: int = 1, clip_denoised=True,
             progress: bool = False):
    """Upsample `low_res` [B, s, s, 3] (in [-1, 1]; quantised to 8 bits here, as GLIDE) with the
    text-conditional upsampler (no guidance, as the notebook). x_T = noise_scale * N(0, I).
    sampler: default "ddim" (text2im.ipynb), "ddpm" for the inpainting upsampler (inpaint.ipynb).
    inpaint_image [B, S, S, 3], inpaint_mask [B, S, S, 1] at the upsampler's size S."""
    module, variables, diffusion = stage
    low_res = quantize_8bit(low_res)
    batch = low_res.shape[0]
    tokens, mask = _check_tokens(module, tokens, mask, batch)
    kwargs = {"low_res": low_res, "text_emb": text_embedding(module, variables, tokens, mask)}
    transforms = _inpainting(module, inpaint_image, inpaint_mask, kwargs, jump_length,
                             resample_count, batch)
    if sampler is None:
        sampler = "ddpm" if _is_inpaint(module) else "ddim"
    size = module.image_size
    return sample(key, (module, variables), diffusion.schedule, (batch, size, size, 3),
                  sampler=sampler, guidance=G.chain(*transforms), config=diffusion.config,
                  model_kwargs=kwargs, clip_denoised=clip_denoised, progress=progress,
                  noise_scale=noise_scale)


def _inpainting(module, image, mask, kwargs, jump_length, resample_count, batch) -> list:
    """Adds the inpainting model's inputs to kwargs and returns the replacement transform."""
    if image is None and mask is None:
        if _is_inpaint(module):
            raise ValueError(f"{type(module).__name__} needs inpaint_image and inpaint_mask (the "
                             f"image to complete and its mask, 1 = keep)")
        return []
    if image is None or mask is None:
        raise ValueError("inpainting needs both inpaint_image and inpaint_mask")
    image, mask = _image_and_mask(image, mask, batch)  # one image for all, or one each
    if _is_inpaint(module):
        kwargs.update(inpaint_kwargs(image, mask))
    # A plain text2im model still inpaints by replacement alone (RePaint's setting).
    return [inpaint_guidance(image, mask, jump_length=jump_length, resample_count=resample_count)]


def text2im(key, base: Stage, tokens, mask, *, batch_size: int, pad_token: int, cfg_scale=3.0,
            upsampler: Stage | None = None, upsample_tokens=None, upsample_mask=None,
            upsample_temp=UPSAMPLE_TEMP, image=None, image_mask=None, jump_length: int = 1,
            resample_count: int = 1, base_sampler="ddpm", upsample_sampler=None,
            progress: bool = False):
    """GLIDE end to end: base samples [B, 64, 64, 3], then (with `upsampler`) [B, 256, 256, 3].

    Inpainting: `image` [1 or B, H, W, 3] in [-1, 1] and `image_mask` [1 or B, h, w, 1] (1 = keep)
    at any size; the base stage gets them resized to its size (image bicubic, mask nearest), the
    upsampler the image at its size and the BASE-size mask upsampled with nearest (as the
    notebook: a 64x64 mask). `upsample_tokens` / `upsample_mask` default to `tokens` / `mask` (the
    released models share the tokenizer). Returns (base_samples, upsampled or None)."""
    k_base, k_up = jax.random.split(key)
    base_image = base_mask = up_image = up_mask = None
    if (image is None) != (image_mask is None):
        raise ValueError("inpainting needs both image and image_mask")
    if image is not None:
        size = base.module.image_size
        base_image, base_mask = resize_image(image, size), resize_mask(image_mask, size)
        if upsampler is not None:
            up_size = upsampler.module.image_size
            up_image, up_mask = resize_image(image, up_size), resize_mask(base_mask, up_size)
    low = sample_base(k_base, base, tokens, mask, batch_size=batch_size, cfg_scale=cfg_scale,
                      pad_token=pad_token, sampler=base_sampler, inpaint_image=base_image,
                      inpaint_mask=base_mask, jump_length=jump_length,
                      resample_count=resample_count, progress=progress)
    if upsampler is None:
        return low, None
    up_tokens = tokens if upsample_tokens is None else upsample_tokens
    up_tok_mask = mask if upsample_mask is None else upsample_mask
    high = upsample(k_up, upsampler, low, up_tokens, up_tok_mask, noise_scale=upsample_temp,
                    sampler=upsample_sampler, inpaint_image=up_image, inpaint_mask=up_mask,
                    jump_length=jump_length, resample_count=resample_count, progress=progress)
    return low, high


# --------------------------------------------------------------------------- training pieces


def drop_captions(key, tokens, mask, rate, pad_token: int):
    """Caption dropout for classifier-free training (GLIDE: 20 %): each row of tokens [B, L] /
    mask [B, L] becomes the empty caption (all pad_token, mask False) with probability `rate`.
    -> (tokens, mask, dropped [B] bool)"""
    dropped = jax.random.uniform(key, tokens.shape[:1]) < rate
    tokens = jnp.where(dropped[:, None], jnp.asarray(pad_token, tokens.dtype), tokens)
    mask = jnp.where(dropped[:, None], False, mask)
    return tokens, mask, dropped


def random_inpaint_masks(key, batch: int, size: int, *, min_frac=0.1, max_frac=0.75,
                         max_boxes: int = 3):
    """Random training masks [batch, size, size, 1] float32, 1 = known, 0 = to fill in (the GLIDE
    paper fine-tunes its inpainting model on "random regions of training examples erased"; the
    exact distribution was not released). Each mask erases the union of 1..max_boxes axis-aligned
    rectangles whose sides are uniform in [min_frac, max_frac] of the image side, anywhere in it;
    a quarter of the examples erase everything outside one rectangle instead (outpainting)."""
    k_n, k_box, k_out = jax.random.split(key, 3)
    n = jax.random.randint(k_n, (batch,), 1, max_boxes + 1)
    u = jax.random.uniform(k_box, (batch, max_boxes, 4))
    lo, hi = min_frac * size, max_frac * size
    h = jnp.floor(lo + u[..., 0] * (hi - lo + 1))
    w = jnp.floor(lo + u[..., 1] * (hi - lo + 1))
    top = jnp.floor(u[..., 2] * (size - h + 1))
    left = jnp.floor(u[..., 3] * (size - w + 1))
    pix = jnp.arange(size, dtype=jnp.float32)
    rows = (pix >= top[..., None]) & (pix < (top + h)[..., None])     # [B, K, S]
    cols = (pix >= left[..., None]) & (pix < (left + w)[..., None])
    boxes = rows[..., :, None] & cols[..., None, :]                   # [B, K, S, S]
    boxes = boxes & (jnp.arange(max_boxes) < n[:, None])[..., None, None]
    erased = jnp.any(boxes, axis=1)
    outpaint = jax.random.uniform(k_out, (batch,)) < 0.25
    erased = jnp.where(outpaint[:, None, None], ~boxes[:, 0], erased)
    return (~erased).astype(jnp.float32)[..., None]


def input_layout(module) -> list[tuple[str, int]]:
    """The (name, channels) blocks a GLIDE model concatenates before its first convolution:
    x, [inpaint_image * mask, inpaint_mask], [low_res] (glide-text2im's order)."""
    c = module.in_channels
    layout = [("x", c)]
    if _is_inpaint(module):
        layout += [("inpaint_image", c), ("inpaint_mask", 1)]
    if getattr(type(module), "_super_res", False):
        layout.append(("low_res", c))
    return layout


INPUT_CONV = "input_blocks_0_0"


def with_class(module, cls):
    """The same model's sizes in another GLIDE class (e.g. Text2ImUNet -> InpaintText2ImUNet)."""
    import dataclasses

    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    return cls(**fields)


def expand_input_channels(new_module, new_params, old_module, old_params):
    """Fine-tuning initialisation (GLIDE paper, sec. 4: the inpainting model starts from the
    text2im one with the new input channels' weights zero): every parameter of `old_params` is
    copied into `new_params` (same tree), and the first convolution's kernel [3, 3, C_in, C_out]
    gets the old input blocks at their positions in the new layout (`input_layout`) and ZERO
    weights for the blocks the old model lacks (inpaint_image, inpaint_mask). The new model then
    computes exactly the old function until training moves those weights. -> new params"""
    old_layout, new_layout = input_layout(old_module), input_layout(new_module)
    missing = {n for n, _ in old_layout} - {n for n, _ in new_layout}
    if missing:
        raise ValueError(f"cannot initialise {type(new_module).__name__} from "
                         f"{type(old_module).__name__}: the new model has no {sorted(missing)} "
                         f"input")
    flat_new = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_leaves_with_path(new_params)}
    flat_old = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_leaves_with_path(old_params)}
    if set(flat_new) != set(flat_old):
        diff = sorted(set(flat_new) ^ set(flat_old))[:6]
        raise ValueError(f"the two models' parameters differ beyond the input channels ({diff}): "
                         f"build the new model with the old one's sizes")
    kernel_key = jax.tree_util.keystr((jax.tree_util.DictKey(INPUT_CONV),
                                       jax.tree_util.DictKey("kernel")))
    starts, offset = {}, 0
    for name, channels in new_layout:
        starts[name], offset = offset, offset + channels

    def merge(path, new):
        key = jax.tree_util.keystr(path)
        old = flat_old[key]
        if key != kernel_key:
            if old.shape != new.shape:
                raise ValueError(f"parameter {key}: {old.shape} in the old model, {new.shape} "
                                 f"in the new one: build the new model with the old one's sizes")
            return jnp.asarray(old, jnp.float32)
        kernel = jnp.zeros(new.shape, jnp.float32)
        src = 0
        for name, channels in old_layout:
            block = old[:, :, src:src + channels]
            kernel = kernel.at[:, :, starts[name]:starts[name] + channels].set(block)
            src += channels
        return kernel

    return jax.tree_util.tree_map_with_path(merge, new_params)


__all__ = ["Stage", "glide_diffusion", "quantize_8bit", "text_embedding", "empty_caption",
           "text_guidance", "inpaint_kwargs", "inpaint_guidance", "resize_image", "resize_mask",
           "sample_base", "upsample", "text2im", "drop_captions", "random_inpaint_masks",
           "input_layout", "with_class", "expand_input_channels", "UPSAMPLE_TEMP"]

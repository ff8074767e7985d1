"""The classic guidance transforms on the contract of `diffjax.core.guidance_contract` (re-exported
here, so that `from diffjax.core import guidance as G` has both): classifier and energy guidance,
classifier-free guidance (with Lin et al.'s rescaling), ILVR, inpainting by replacement and
RePaint's walk. The newer methods are in `diffjax.core.guidance_methods`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion as D
from diffjax.core import resize as R
from diffjax.core.guidance_contract import (  # noqa: F401  (the contract, re-exported)
    Chain,
    GuidanceContext,
    ScaleFn,
    Transform,
    as_scale,
    batch_levels,
    chain,
    condition_mean,
    condition_score,
    per_example,
    predict,
    resolve,
    scale_fn,
)
from diffjax.core.schedules import Schedule


# --------------------------------------------------------------------------- score guidance


def log_density_gradient(log_density_fn: Callable, scale, c) -> jnp.ndarray:
    """scale * grad_x sum_b log_density_fn(x, t_model, **model_kwargs)_b at c (float32)."""
    total = lambda x_: jnp.sum(log_density_fn(x_, c.t_model, **c.model_kwargs))  # noqa: E731
    return resolve(scale, c) * jax.grad(total)(c.x.astype(jnp.float32))


@flax.struct.dataclass
class Energy(Transform):
    """g = scale * grad_x log_density_fn(x_t, t, **model_kwargs).sum(): guidance by any
    differentiable log-density or reward of the noisy image (a classifier's log p(y | x_t), a
    CLIP-like score, a user's function). `log_density_fn` returns one value per example [B]."""

    scale: Any
    log_density_fn: Callable = flax.struct.field(pytree_node=False)

    def score(self, c):
        return log_density_gradient(self.log_density_fn, self.scale, c)


def energy(log_density_fn: Callable, scale=1.0) -> Energy:
    return Energy(scale=as_scale(scale), log_density_fn=log_density_fn)


def classifier(logits_fn: Callable, scale=1.0, label_key: str = "y") -> Energy:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1-2): g = scale * grad_x log p(y | x_t, t)
    with log p = log_softmax(logits_fn(x_t, t)) at the labels `model_kwargs[label_key]`.
    `logits_fn(x, t) -> [B, num_classes]`, e.g. `lambda x, t: clf.apply(clf_vars, x, t)`."""

    return Energy(scale=as_scale(scale), log_density_fn=_LabelLogProb(logits_fn, label_key))


@dataclasses.dataclass(frozen=True)
class _LabelLogProb:
    """log_softmax(logits_fn(x, t))[y]; a value-compared callable, so that rebuilding the same
    guidance for a new scale does not look like a new static function to jit."""

    logits_fn: Callable
    label_key: str

    def __call__(self, x, t, **model_kwargs):
        if self.label_key not in model_kwargs:
            raise ValueError(
                f"classifier guidance needs the labels in model_kwargs[{self.label_key!r}]; got "
                f"keys {sorted(model_kwargs)}"
            )
        logp = jax.nn.log_softmax(self.logits_fn(x, t).astype(jnp.float32), axis=-1)
        labels = model_kwargs[self.label_key].astype(jnp.int32)
        return jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------- classifier-free


def mix_outputs(strong, weak, channels: int, combine: Callable):
    """Two network outputs [B, ..., C'] -> combine(strong_mean, weak_mean) on the first `channels`
    (the image's), the strong output's other channels (a learned variance) passed through."""
    mixed = combine(strong[..., :channels], weak[..., :channels])
    return jnp.concatenate([mixed, strong[..., channels:]], axis=-1)


def _std(a):
    """Per-example standard deviation [B, 1, ..., 1] over every other axis (floored above 0, so
    that its gradient stays finite for a constant image)."""
    variance = jnp.var(a.reshape(a.shape[0], -1), axis=1)
    return per_example(jnp.sqrt(jnp.maximum(variance, 1e-30)), a)


@flax.struct.dataclass
class ClassifierFree(Transform):
    """Classifier-free guidance (Ho & Salimans 2021; GLIDE): one batched call on [x; x] with the
    conditional and the unconditional model_kwargs, then on the mean channels
    out = out_uncond + scale * (out_cond - out_uncond); the learned-variance channels are the
    conditional branch's, passed through as GLIDE does. scale 1 is the conditional model, 0 the
    unconditional one.

    `uncond_kwargs` replaces the named model_kwargs in the unconditional branch (e.g. the null
    label {"y": 1000} or GLIDE's empty tokens and mask); a leading batch dim of 1 broadcasts; a
    value may be a pytree of such arrays (GLIDE's precomputed text embedding);
    `mean_channels`: the channels that get mixed (default: the image's, x.shape[-1]).

    rescale = phi (Lin et al. 2024, sec. 3.4, "rescale classifier-free guidance"): out <- out *
    (phi std(out_cond) / std(out) + 1 - phi), standard deviations per image over the mixed
    channels of the network's prediction (eps for the OpenAI models; v in the paper), so that at
    phi = 1 the guided prediction has the conditional one's spread. phi = 0 is plain CFG."""

    scale: Any
    uncond_kwargs: dict
    mean_channels: int | None = flax.struct.field(pytree_node=False, default=None)
    rescale: Any = None

    def combine(self, cond, uncond, scale, c):
        """The guided mean channels from the two branches' [B', ..., C]; c: the call's context."""
        mixed = uncond + scale * (cond - uncond)
        if self.rescale is None:
            return mixed
        phi = resolve(self.rescale, c)
        return mixed * (phi * _std(cond) / _std(mixed) + (1 - phi))

    def wrap_model(self, model_fn, c=None):
        def guided(x, t, **kwargs):
            batch = x.shape[0]
            missing = sorted(set(self.uncond_kwargs) - set(kwargs))
            if missing:
                raise ValueError(
                    f"classifier_free: uncond_kwargs names {missing}, which the conditional "
                    f"model_kwargs lack (it has {sorted(kwargs)})"
                )

            def stack(cond, uncond):
                uncond = jnp.broadcast_to(uncond, (batch,) + jnp.shape(uncond)[1:])
                return jnp.concatenate([cond, uncond.astype(jnp.asarray(cond).dtype)])

            # A kwarg may be a pytree (e.g. GLIDE's precomputed text_emb dict): leaf by leaf.
            both = {name: jax.tree.map(stack, cond, self.uncond_kwargs.get(name, cond))
                    for name, cond in kwargs.items()}
            out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), **both)
            call = None if c is None else c.at(x, t, kwargs)
            scale = resolve(self.scale, call)
            return mix_outputs(out[:batch], out[batch:], self.mean_channels or x.shape[-1],
                               lambda cond, uncond: self.combine(cond, uncond, scale, call))

        return guided


def classifier_free(scale, uncond_kwargs: dict, mean_channels: int | None = None, *,
                    rescale=None) -> ClassifierFree:
    """`ClassifierFree`; scale and rescale may be numbers or ScaleFn's (traced either way;
    rescale=None leaves the rescaling out of the program)."""
    return ClassifierFree(as_scale(scale), as_uncond(uncond_kwargs), mean_channels,
                          None if rescale is None else as_scale(rescale))


def as_uncond(uncond_kwargs: dict) -> dict:
    def as_batch(value):
        value = jnp.asarray(value)
        return value[None] if value.ndim == 0 else value

    return {k: jax.tree.map(as_batch, v) for k, v in uncond_kwargs.items()}


# --------------------------------------------------------------------------- projections


def _noised(sched: Schedule, clean, level, key):
    """q_sample(clean, level) at levels [B] >= 0; the clean image itself at level -1 (the data)."""
    level = batch_levels(clean, level)
    noisy = D.q_sample(sched, clean, jnp.maximum(level, 0),
                       jax.random.normal(key, clean.shape, clean.dtype))
    return jnp.where(per_example(level >= 0, clean), noisy, clean)


RESIZERS = ("matlab", "jax")


def _check_resizer(resizer: str):
    if resizer not in RESIZERS:
        raise ValueError(f"ilvr resizer={resizer!r} does not exist: choose 'matlab' (the official "
                         "ILVR code's, MATLAB imresize) or 'jax' (jax.image.resize)")


def low_pass(x, factor: int, resizer: str = "matlab"):
    """phi_N of ILVR on x [B, H, W, C]: bicubic downsampling by `factor` (antialiased), then
    bicubic upsampling back; factor 1 is the identity.

    resizer="matlab": the official ILVR code's resizer, MATLAB's imresize (`diffjax.core.resize`),
        which reflects the image at its edges. resizer="jax": jax.image.resize, which truncates
        the kernel there and renormalises: the same filter from ~3.5 factor pixels in, but on the
        edge row it is off by ~27 % of phi's RMS for white noise (~7 % for a 1/f image), fading
        out by ~2.5 factor pixels; at 256 px with factor 32 that band is most of the image."""
    _check_resizer(resizer)
    if factor == 1:
        return x
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"ilvr down_factor={factor} does not divide the image size {h}x{w}")
    if resizer == "matlab":
        return R.imresize(R.imresize(x, (h // factor, w // factor)), (h, w)).astype(x.dtype)
    small = jax.image.resize(x, (b, h // factor, w // factor, c), "cubic", antialias=True)
    return jax.image.resize(small, x.shape, "cubic", antialias=True)


@flax.struct.dataclass
class ILVR(Transform):
    """Iterative latent variable refinement (Choi et al. 2021, Alg. 1): after the step that gives x
    at `level`, x <- x - phi_N(x) + phi_N(y_level), y_level ~ q(y_level | reference), for steps whose
    index i = level + 1 lies in t_range = [lo, hi] (respaced indices; default all).

    official_index=True reproduces the official ILVR code, which noises the reference with the
    step's own index i (one level noisier than the paper's y_{i-1}) and so never uses the clean
    reference at the last step. `resizer` picks phi_N's resizer (see `low_pass`); the default,
    "matlab", is the official code's, so that phi_N is the paper's filter up to float32 rounding,
    edges included."""

    reference: Any
    t_range: Any
    down_factor: int = flax.struct.field(pytree_node=False)
    official_index: bool = flax.struct.field(pytree_node=False, default=False)
    resizer: str = flax.struct.field(pytree_node=False, default="matlab")

    def project(self, c):
        x, level = c.x, c.t
        ref_level = level + 1 if self.official_index else level
        target = _noised(c.schedule, self.reference.astype(x.dtype), ref_level, c.key)
        phi = lambda a: low_pass(a, self.down_factor, self.resizer)  # noqa: E731
        refined = x - phi(x) + phi(target)
        step = level + 1
        active = (step >= self.t_range[0]) & (step <= self.t_range[1])
        return jnp.where(per_example(active, x), refined, x)


def ilvr(reference, down_factor: int, t_range=None, official_index: bool = False,
         resizer: str = "matlab") -> ILVR:
    _check_resizer(resizer)
    lo, hi = (0, np.iinfo(np.int32).max) if t_range is None else t_range
    return ILVR(jnp.asarray(reference), jnp.asarray([lo, hi], jnp.int32), int(down_factor),
                official_index, resizer)


@flax.struct.dataclass
class Inpaint(Transform):
    """Inpainting by replacement: `mask` (1 = known, [B, H, W, 1] or [B, H, W, C]) and the known
    image [B, H, W, C]. on_x0: GLIDE's denoised_fn, x0 <- m known + (1 - m) x0; on_xt: after each
    step x <- m q_sample(known, level) + (1 - m) x (exactly `known` at the last step).

    With `jump_length` / `resample_count` set (RePaint, Lugmayr et al. 2022, sec. 4.2) the sampler
    walks the noise levels with resampling: every `jump_length` levels it goes back up
    `jump_length` levels through the forward process and denoises them again, `resample_count - 1`
    times, which lets the generated region harmonise with the known one."""

    mask: Any
    known: Any
    on_x0: bool = flax.struct.field(pytree_node=False, default=True)
    on_xt: bool = flax.struct.field(pytree_node=False, default=True)
    jump_length: int = flax.struct.field(pytree_node=False, default=1)
    resample_count: int = flax.struct.field(pytree_node=False, default=1)

    def x0(self, c):
        if not self.on_x0:
            return c.x0
        return self.mask * self.known.astype(c.x0.dtype) + (1 - self.mask) * c.x0

    def project(self, c):
        if not self.on_xt:
            return c.x
        known = _noised(c.schedule, self.known.astype(c.x.dtype), c.t, c.key)
        return self.mask * known + (1 - self.mask) * c.x

    def levels(self, num_timesteps):
        if self.resample_count <= 1:
            return None
        return repaint_levels(num_timesteps, self.jump_length, self.resample_count)


def inpaint(mask, known, *, on_x0=True, on_xt=True, jump_length=1, resample_count=1) -> Inpaint:
    mask = jnp.asarray(mask, jnp.float32)
    known = jnp.asarray(known)
    if mask.ndim != known.ndim or mask.shape[:-1] != known.shape[:-1]:
        raise ValueError(
            f"inpaint: mask of shape {mask.shape} does not match the known image {known.shape}: "
            "use [B, H, W, 1] or the image's shape, 1 where the pixel is known"
        )
    if jump_length < 1 or resample_count < 1:
        raise ValueError(
            f"inpaint: jump_length={jump_length} and resample_count={resample_count} must be >= 1"
        )
    return Inpaint(mask, known, on_x0, on_xt, int(jump_length), int(resample_count))


def repaint_levels(num_timesteps: int, jump_length: int, resample_count: int) -> np.ndarray:
    """RePaint's walk over noise levels as [S, 2] int32 (from, to) pairs; to = from - 1 is a
    denoising step (level -1 = the data), to = from + 1 a forward-noising step.

    Going down from level T-1, on reaching a level l with l % jump_length == 0 and
    l + jump_length <= T - 1, the walk goes back up jump_length levels and down again, and does so
    resample_count - 1 times at each such level (resample_count = 1: the plain schedule)."""
    if jump_length < 1 or resample_count < 1:
        raise ValueError("jump_length and resample_count must be >= 1")
    pairs, level = [], num_timesteps - 1
    jumps_done = {}
    while level >= 0:
        pairs.append((level, level - 1))
        level -= 1
        if (
            level >= 0
            and level % jump_length == 0
            and level + jump_length <= num_timesteps - 1
            and jumps_done.get(level, 0) < resample_count - 1
        ):
            jumps_done[level] = jumps_done.get(level, 0) + 1
            for _ in range(jump_length):
                pairs.append((level, level + 1))
                level += 1
    return np.asarray(pairs, dtype=np.int32)

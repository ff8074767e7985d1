"""Guidance as small composable transforms of a denoiser, in the manner of optax.

A transform is a pytree (its scales, masks, reference images and labels are traced arrays, so
changing them never recompiles a sampling loop; its functions and shape-like settings are static)
with up to five hooks, each a no-op by default:

    wrap_model(model_fn) -> model_fn     change the network's output (classifier-free guidance)
    grad(x, t, model_kwargs) -> g | None  a gradient of log p(... | x_t) added to the score
    denoised(x0) -> x0                   a projection of the x0 prediction (GLIDE inpainting)
    post_step(x, level, key, sched) -> x a projection after each step (ILVR, inpainting on x_t)
    levels(num_timesteps) -> [S, 2]      a non-monotone walk over noise levels (RePaint)

Samplers apply the score gradient the way guided-diffusion does: the ancestral sampler shifts the
mean, mean + Sigma g (`condition_mean`, Sohl-Dickstein et al. 2015); DDIM and the ODE solvers
shift the noise prediction, eps - sqrt(1 - abar_t) g (`condition_score`, Song et al. 2021), with
pred_xstart re-derived from it and not re-clipped. `t` given to `grad` is the model's timestep
(the original one, as the classifier was trained on).

`chain(a, b, ...)` composes transforms. Order rules: model wrappers nest with the first one
innermost; gradients add; `denoised` and `post_step` projections apply in the given order (so on
pixels two projections both touch, the later one wins); at most one transform may define `levels`.
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
from diffjax.core.schedules import Schedule


class Transform:
    """Base class: every hook is the identity / absent."""

    def wrap_model(self, model_fn):
        return model_fn

    def grad(self, x, t, model_kwargs):
        return None

    def denoised(self, x0):
        return x0

    def post_step(self, x, level, key, sched: Schedule):
        return x

    def levels(self, num_timesteps: int):
        return None


# --------------------------------------------------------------------------- score guidance


@flax.struct.dataclass
class Energy(Transform):
    """g = scale * grad_x log_density_fn(x_t, t, **model_kwargs).sum(): guidance by any
    differentiable log-density or reward of the noisy image (a classifier's log p(y | x_t), a
    CLIP-like score, a user's function). `log_density_fn` returns one value per example [B]."""

    scale: Any
    log_density_fn: Callable = flax.struct.field(pytree_node=False)

    def grad(self, x, t, model_kwargs):
        total = lambda x_: jnp.sum(self.log_density_fn(x_, t, **model_kwargs))  # noqa: E731
        return self.scale * jax.grad(total)(x.astype(jnp.float32))


def energy(log_density_fn: Callable, scale=1.0) -> Energy:
    return Energy(scale=jnp.asarray(scale, jnp.float32), log_density_fn=log_density_fn)


def classifier(logits_fn: Callable, scale=1.0, label_key: str = "y") -> Energy:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1-2): g = scale * grad_x log p(y | x_t, t)
    with log p = log_softmax(logits_fn(x_t, t)) at the labels `model_kwargs[label_key]`.
    `logits_fn(x, t) -> [B, num_classes]`, e.g. `lambda x, t: clf.apply(clf_vars, x, t)`."""

    return Energy(scale=jnp.asarray(scale, jnp.float32),
                  log_density_fn=_LabelLogProb(logits_fn, label_key))


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


def condition_mean(p_mean_var: dict, gradient) -> jnp.ndarray:
    """The ancestral sampler's guided mean: mean + variance * g (GD's condition_mean)."""
    return p_mean_var["mean"].astype(jnp.float32) + p_mean_var["variance"] * gradient


def condition_score(sched: Schedule, p_mean_var: dict, x, t, gradient) -> dict:
    """p_mean_var with the noise prediction shifted by the gradient: eps' = eps - sqrt(1-abar_t) g,
    pred_xstart and mean re-derived from eps' (no re-clipping), variance unchanged (GD's
    condition_score).

    GD converts pred_xstart to eps and back; that round trip multiplies float32 rounding by
    sqrt(1/abar_t) (~2e4 at the last cosine step) even when g = 0. Its closed form,
    x0' = x0 + (1 - abar_t) / sqrt(abar_t) g, is the same number without that noise, so a zero
    gradient leaves the prediction untouched."""
    alpha_bar = D.extract(sched.alphas_cumprod, t, x.ndim)
    out = dict(p_mean_var)
    out["pred_xstart"] = p_mean_var["pred_xstart"] + (1 - alpha_bar) / jnp.sqrt(alpha_bar) * gradient
    out["mean"] = D.q_posterior_mean_variance(sched, out["pred_xstart"], x, t)[0]
    return out


# --------------------------------------------------------------------------- classifier-free


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
    `mean_channels` = image channels (the channels that get mixed)."""

    scale: Any
    uncond_kwargs: dict
    mean_channels: int = flax.struct.field(pytree_node=False)

    def wrap_model(self, model_fn):
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
            cond, uncond = out[:batch], out[batch:]
            c = self.mean_channels
            mixed = uncond[..., :c] + self.scale * (cond[..., :c] - uncond[..., :c])
            return jnp.concatenate([mixed, cond[..., c:]], axis=-1)

        return guided


def classifier_free(scale, uncond_kwargs: dict, mean_channels: int = 3) -> ClassifierFree:
    def as_batch(value):
        value = jnp.asarray(value)
        return value[None] if value.ndim == 0 else value

    uncond = {k: jax.tree.map(as_batch, v) for k, v in uncond_kwargs.items()}
    return ClassifierFree(jnp.asarray(scale, jnp.float32), uncond, mean_channels)


# --------------------------------------------------------------------------- projections


def _noised(sched: Schedule, clean, level, key):
    """q_sample(clean, level) for level >= 0; the clean image itself at level -1 (the data)."""
    t = jnp.full((clean.shape[0],), jnp.maximum(level, 0), jnp.int32)
    noisy = D.q_sample(sched, clean, t, jax.random.normal(key, clean.shape, clean.dtype))
    return jnp.where(level >= 0, noisy, clean)


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

    def post_step(self, x, level, key, sched):
        ref_level = level + 1 if self.official_index else level
        target = _noised(sched, self.reference.astype(x.dtype), ref_level, key)
        phi = lambda a: low_pass(a, self.down_factor, self.resizer)  # noqa: E731
        refined = x - phi(x) + phi(target)
        step = level + 1
        active = (step >= self.t_range[0]) & (step <= self.t_range[1])
        return jnp.where(active, refined, x)


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

    def denoised(self, x0):
        if not self.on_x0:
            return x0
        return self.mask * self.known.astype(x0.dtype) + (1 - self.mask) * x0

    def post_step(self, x, level, key, sched):
        if not self.on_xt:
            return x
        known = _noised(sched, self.known.astype(x.dtype), level, key)
        return self.mask * known + (1 - self.mask) * x

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


# --------------------------------------------------------------------------- composition


@flax.struct.dataclass
class Chain(Transform):
    """Transforms applied together; see the module docstring for the order rules."""

    transforms: tuple

    def wrap_model(self, model_fn):
        for transform in self.transforms:
            model_fn = transform.wrap_model(model_fn)
        return model_fn

    def grad(self, x, t, model_kwargs):
        grads = [g for g in (tr.grad(x, t, model_kwargs) for tr in self.transforms) if g is not None]
        return sum(grads[1:], grads[0]) if grads else None

    def denoised(self, x0):
        for transform in self.transforms:
            x0 = transform.denoised(x0)
        return x0

    def post_step(self, x, level, key, sched):
        for transform, k in zip(self.transforms, jax.random.split(key, len(self.transforms))):
            x = transform.post_step(x, level, k, sched)
        return x

    def levels(self, num_timesteps):
        walks = [w for w in (t.levels(num_timesteps) for t in self.transforms) if w is not None]
        if len(walks) > 1:
            raise ValueError("chain(...) holds more than one transform with a resampling schedule")
        return walks[0] if walks else None


def chain(*transforms: Transform) -> Chain:
    """Compose transforms (None entries are skipped)."""
    kept = tuple(t for t in transforms if t is not None)
    for t in kept:
        if not isinstance(t, Transform):
            raise TypeError(f"chain(...) takes guidance transforms, got {type(t).__name__}")
    return Chain(kept)

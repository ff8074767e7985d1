"""The newer guidance methods, each a transform (or a scale) on the contract of
`diffjax.core.guidance_contract`, so each works with every sampler and composes with the rest:

    interval(scale, sigma_lo, sigma_hi)     guidance in a limited interval (Kynkaanniemi et al. 2024)
    adaptive_projected(scale, uncond, ...)  adaptive projected guidance, APG (Sadat et al. 2024)
    cfg_plus_plus(lam, uncond)              CFG++ (Chung et al. 2024)
    autoguidance(weak, scale)               guidance by a weaker model (Karras et al. 2024)
    dynamic_threshold(percentile)           dynamic thresholding (Saharia et al. 2022)
    dps(operator, measurement, scale)       diffusion posterior sampling (Chung et al. 2023)
    universal(loss_fn, scale)               a loss on the x0 estimate (Bansal et al. 2023)

docs/guidance.md has each one's formula and a short example.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from diffjax.core import diffusion as D
from diffjax.core import guidance as G


def _norm(a):
    """Per-example Euclidean norm [B, 1, ..., 1] over every other axis (floored above 0, so that
    its gradient and the divisions by it stay finite)."""
    squares = jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1)
    return G.per_example(jnp.sqrt(jnp.maximum(squares, 1e-30)), a)


def _apply(fn, value, params):
    """fn(value), or fn(value, params) when the transform holds traced parameters for it."""
    return fn(value) if params is None else fn(value, params)


# --------------------------------------------------------------------------- interval


def _interval_scale(c, scale, sigma_lo, sigma_hi, outside):
    level = c.noise_level
    return jnp.where((level > sigma_lo) & (level <= sigma_hi), scale, outside)


def interval(scale, sigma_lo, sigma_hi=math.inf, outside=1.0) -> G.ScaleFn:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024): the scale is `scale`
    where the noise level sigma_t = sqrt((1 - abar_t) / abar_t) (EDM's, Karras et al. 2022) lies
    in (sigma_lo, sigma_hi], and `outside` elsewhere: 1 for classifier-free guidance (the
    conditional model: their w = 1), 0 for a score term. A scale: pass it to any transform, e.g.
    `classifier_free(interval(2.0, 0.28, 5.42), null)` (their EDM2 ImageNet-512 interval). Every
    bound is traced. The unconditional branch is evaluated outside the interval too (one compiled
    loop), so the interval saves no network calls here."""
    return G.scale_fn(_interval_scale, scale=scale, sigma_lo=sigma_lo, sigma_hi=sigma_hi,
                      outside=outside)


# --------------------------------------------------------------------------- CFG variants


def to_x0(c, mean):
    """The x0 of a network's mean channels [B, ...] at the context's (x, t) (c.config.mean_type)."""
    kind = c.config.mean_type
    if kind == "epsilon":
        return D.predict_xstart_from_eps(c.schedule, c.x, c.t, mean)
    if kind == "v":
        return D.predict_xstart_from_v(c.schedule, c.x, c.t, mean)
    if kind == "start_x":
        return mean
    raise ValueError(f"mean_type={kind!r}: this guidance works on x0 and needs an epsilon, v or "
                     f"start_x model")


def from_x0(c, x0):
    """The network's mean channels that give x0 [B, ...] at the context's (x, t) (`to_x0` inverted)."""
    kind = c.config.mean_type
    if kind == "start_x":
        return x0
    eps = D.predict_eps_from_xstart(c.schedule, c.x, c.t, x0)
    return D.v_target(c.schedule, x0, c.t, eps) if kind == "v" else eps


@flax.struct.dataclass
class AdaptiveProjected(G.ClassifierFree):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts
    of high guidance scales in diffusion models"), on the x0 predictions D_c, D_u of the
    two branches (per image, norms over every pixel and channel):

        Delta = (D_c - D_u) min(1, r / |D_c - D_u|),   Delta_par = <Delta, D_c> D_c / |D_c|^2,
        D = D_c + (w - 1) (Delta - Delta_par + eta Delta_par).

    eta = 1 and r = inf is classifier-free guidance (D_u + w (D_c - D_u)); the paper's default is
    eta = 0 (drop the update's component along D_c, the one that oversaturates). w, eta and r are
    traced. Their momentum term (a running average of Delta across steps) is not here: the
    contract has no state that survives a step. Build with `adaptive_projected`."""

    eta: Any = 0.0
    norm_threshold: Any = math.inf

    def combine(self, cond, uncond, scale, c):
        if c is None:
            raise ValueError("adaptive projected guidance works on x0: it needs the sampler's "
                             "context (run it in a sampler)")
        d_cond, d_uncond = to_x0(c, cond), to_x0(c, uncond)
        delta = d_cond - d_uncond
        delta = delta * jnp.minimum(1.0, G.resolve(self.norm_threshold, c) / _norm(delta))
        unit = d_cond / _norm(d_cond)
        parallel = G.per_example(jnp.sum((delta * unit).reshape(delta.shape[0], -1), 1), delta) * unit
        guided = d_cond + (scale - 1) * (delta - parallel + G.resolve(self.eta, c) * parallel)
        return from_x0(c, guided)


def adaptive_projected(scale, uncond_kwargs: dict, *, eta=0.0, norm_threshold=math.inf,
                       mean_channels: int | None = None) -> AdaptiveProjected:
    """`AdaptiveProjected`: `classifier_free`'s arguments plus eta and the norm threshold r."""
    return AdaptiveProjected(G.as_scale(scale), G.as_uncond(uncond_kwargs), mean_channels, None,
                             G.as_scale(eta), G.as_scale(norm_threshold))


def _cfg_pp_weight(c, lam):
    """lam / (1 - e^-h), h = lambda_{t-1} - lambda_t: the grid's next log-SNR step."""
    next_log_snr = 0.5 * (jnp.log(c.abar_next) - jnp.log1p(-c.abar_next))  # +inf at the data
    return lam / -jnp.expm1(c.log_snr - next_log_snr)


def cfg_plus_plus(lam, uncond_kwargs: dict, mean_channels: int | None = None) -> G.ClassifierFree:
    """CFG++ (Chung et al. 2024): DDIM with x0 from eps_lam = eps_u + lam (eps_c - eps_u),
    lam in [0, 1], and the unconditional noise to move on,

        x_{t-1} = alpha_{t-1} x0(eps_lam) + sigma_{t-1} eps_u.

    Written with x0's, that step is (sigma_{t-1} / sigma_t) x_t + alpha_{t-1} (1 - e^-h) D with
    D = D_u + w (D_c - D_u) and w = lam / (1 - e^-h), h = lambda_{t-1} - lambda_t the log-SNR
    step to the grid's next level: classifier-free guidance with that step-dependent weight,
    which is what this returns. DDIM (eta = 0) is then exactly the paper's algorithm; the other
    samplers see the same guided x0 at each level (not the paper's per-solver variants). At the
    last step (to the data) w = lam. Off the grid (a solver's intermediate level on the training
    chain) h is that chain's one step and w is large: use CFG++ with on-grid samplers."""
    return G.classifier_free(G.scale_fn(_cfg_pp_weight, lam=lam), uncond_kwargs, mean_channels)


# --------------------------------------------------------------------------- autoguidance


@flax.struct.dataclass
class Autoguidance(G.Transform):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself"): D = D_weak + w (D_main - D_weak), the weak model a smaller or less trained
    version of the main one, both with the same conditioning. Mixed on the mean channels of the
    network output (linear, so the same in eps, v or x0); the learned variance is the main
    model's. The weak model must take the same timesteps and predict the same quantity. w = 1 is
    the main model. The weak model's variables and w are traced. Build with `autoguidance`."""

    scale: Any
    weak_variables: Any
    weak_fn: Callable = flax.struct.field(pytree_node=False)
    mean_channels: int | None = flax.struct.field(pytree_node=False, default=None)

    def wrap_model(self, model_fn, c=None):
        def guided(x, t, **kwargs):
            main = model_fn(x, t, **kwargs)
            weak = _apply_model(self.weak_fn, self.weak_variables, x, t, kwargs)
            w = G.resolve(self.scale, c, x, t, kwargs)
            return G.mix_outputs(main, weak, self.mean_channels or x.shape[-1],
                                 lambda d_main, d_weak: d_weak + w * (d_main - d_weak))

        return guided


def _apply_model(fn, variables, x, t, kwargs):
    return fn(x, t, **kwargs) if variables is None else fn(variables, x, t, **kwargs)


def autoguidance(weak, scale, mean_channels: int | None = None) -> Autoguidance:
    """weak: `(module_or_apply_fn, variables)` (called as `module.apply(variables, x, t, **kw)` or
    `apply_fn(variables, x, t, **kw)`; its variables traced) or a plain `fn(x, t, **kw)`."""
    fn, variables = weak if isinstance(weak, tuple) else (weak, None)
    if variables is not None and hasattr(fn, "apply"):
        fn = fn.apply
    return Autoguidance(G.as_scale(scale), variables, fn, mean_channels)


# --------------------------------------------------------------------------- x0 and measurements


@flax.struct.dataclass
class DynamicThreshold(G.Transform):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per image, s = the
    `percentile` quantile of |x0| (over every pixel and channel), s <- max(s, 1), and
    x0 <- clip(x0, -s, s) / s, before the static clip (which then changes nothing). An x0 with
    |x0| <= 1 everywhere is left as it is. percentile (e.g. 0.995) is traced, and may be a
    ScaleFn; the quantile interpolates linearly between order statistics (numpy's default)."""

    percentile: Any

    def x0(self, c):
        x0 = c.x0
        s = jnp.maximum(_quantile(jnp.abs(x0), G.resolve(self.percentile, c)), 1.0)
        return jnp.clip(x0, -s, s) / s


def _quantile(a, q):
    """The q-quantile [B, 1, ..., 1] of each a[b] (q a number or [B, 1, ..., 1])."""
    ordered = jnp.sort(a.reshape(a.shape[0], -1), axis=1)
    position = jnp.reshape(jnp.broadcast_to(q, (a.shape[0],) + (1,) * (a.ndim - 1)), (-1, 1))
    position = jnp.clip(position, 0.0, 1.0) * (ordered.shape[1] - 1)
    below = jnp.floor(position).astype(jnp.int32)
    above = jnp.minimum(below + 1, ordered.shape[1] - 1)
    low, high = (jnp.take_along_axis(ordered, i, axis=1) for i in (below, above))
    return G.per_example((low + (position - below) * (high - low))[:, 0], a)


def dynamic_threshold(percentile=0.995) -> DynamicThreshold:
    return DynamicThreshold(G.as_scale(percentile))


@flax.struct.dataclass
class PosteriorSampling(G.Transform):
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1) for a measurement y = A(x0) + n
    with a differentiable operator A: after each step from x_t,

        x_{t-1} <- x_{t-1} - zeta grad_{x_t} |y - A(x0_hat(x_t))|_2,

    x0_hat the denoiser at x_t (through the chain's model wrappers and x0 hooks, unclipped; one
    more network evaluation and its backward pass per step). The norm is per image (the official
    code takes one norm over the batch; per image keeps the images independent); squared=True
    uses |.|^2 (the paper's Alg. 1 with a constant zeta). zeta may be a ScaleFn, evaluated at the
    step's start. `operator(x0)` -> [B, ...], or `operator(x0, params)` with traced `params` (a
    mask, a kernel); the measurement is traced. Build with `dps`."""

    measurement: Any
    scale: Any
    operator: Callable = flax.struct.field(pytree_node=False)
    params: Any = None
    squared: bool = flax.struct.field(pytree_node=False, default=False)

    def project(self, c):
        def misfit(x_t):
            x0 = c.denoise_at(x_t, c.t_prev).x0
            r = (self.measurement - _apply(self.operator, x0, self.params)).reshape(x0.shape[0], -1)
            squares = jnp.sum(jnp.square(r), axis=1)
            return jnp.sum(squares if self.squared else jnp.sqrt(jnp.maximum(squares, 1e-30)))

        gradient = jax.grad(misfit)(c.x_prev.astype(jnp.float32))
        zeta = G.resolve(self.scale, c.replace(x=c.x_prev, t=c.t_prev))
        return c.x - zeta * gradient


def dps(operator: Callable, measurement, scale=1.0, *, params=None,
        squared: bool = False) -> PosteriorSampling:
    return PosteriorSampling(jnp.asarray(measurement), G.as_scale(scale), operator, params,
                             squared)


@flax.struct.dataclass
class Universal(G.Transform):
    """Universal guidance's forward guidance (Bansal et al. 2023): a loss l on the x0
    estimate, differentiated through the denoiser,

        eps' = eps + s sqrt(1 - abar_t) grad_{x_t} l(x0_hat(x_t)),

    i.e. the score term g = -s grad_{x_t} l(x0_hat(x_t)) (so the ancestral sampler shifts its mean
    by -s Sigma grad l, as for classifier guidance). `loss_fn(x0) -> [B]` (lower is better; e.g.
    a clean classifier's cross-entropy, a distance to a target), or `loss_fn(x0, params)` with
    traced params. One more network evaluation and its backward pass per call. s is traced (may
    be a ScaleFn). Their backward guidance and per-step recurrence are not included."""

    scale: Any
    loss_fn: Callable = flax.struct.field(pytree_node=False)
    params: Any = None

    def score(self, c):
        total = lambda x_: jnp.sum(_apply(self.loss_fn, c.denoise_at(x_).x0, self.params))  # noqa: E731
        return -G.resolve(self.scale, c) * jax.grad(total)(c.x.astype(jnp.float32))


def universal(loss_fn: Callable, scale=1.0, *, params=None) -> Universal:
    return Universal(G.as_scale(scale), loss_fn, params)

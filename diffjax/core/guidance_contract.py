"""The guidance contract: one for every way of steering a sampler, composed like optax transforms.

A transform is a pytree (its scales, masks, references and weights are traced arrays, so changing
them never recompiles a sampling loop; its functions and shape-like settings are static). It has
up to five hooks, each receiving one `GuidanceContext` `c` and each the identity by default:

    wrap_model(model_fn, c) -> model_fn  the network's output: classifier-free guidance and its
                                          variants, autoguidance (a wrapper may be called on a
                                          larger batch than c's: `c.at(x, t, kwargs)` is its own)
    x0(c) -> x0                          a new x0 estimate, before clipping (dynamic thresholding,
                                          inpainting's replacement); eps follows from it
    score(c) -> g | None                 a score term, grad_x log p(y | x_t) (classifier, CLIP,
                                          universal guidance); None when it adds nothing
    project(c) -> x                      x_{t-1} after the step from c.x_prev (ILVR, inpainting on
                                          x_t, diffusion posterior sampling)
    levels(num_timesteps) -> [S, 2]      a non-monotone walk over the levels (RePaint)

The samplers call them in that order through one function, `diffjax.core.samplers.denoise` (every
sampler, the ODE solvers included, sees the network only through it), and the loop calls
`project` after each step. The score enters as guided-diffusion does: the ancestral sampler shifts
its mean, mean + Sigma g (`condition_mean`, Sohl-Dickstein et al. 2015); DDIM and the ODE solvers
shift the noise, eps - sqrt(1 - abar_t) g (`condition_score`, Song et al. 2021), pred_xstart
re-derived and not re-clipped.

Time: `c.t` is the level, the index into `c.schedule` (respaced; -1 is the data); `c.t_model` the
network's timestep (the original one; t * 1000 / T as a float with rescale_timesteps). The
continuous time is alpha-bar, abar_t = alphas_cumprod[t], with alpha = sqrt(abar), sigma =
sqrt(1 - abar), `noise_level` = sigma / alpha (EDM's sigma, Karras et al. 2022) and `log_snr` =
log(alpha / sigma) (Lu et al.'s lambda). A scale may be a number or a `ScaleFn`, a function of the
context with traced parameters (`scale_fn`; `guidance_methods.interval`).

Composition, `chain(a, b, ...)`: one rule, the given order, each hook seeing the context as the
hooks before it left it. Model wrappers nest, the first innermost (b wraps the model a returned);
x0 hooks and projections apply in turn (on values both touch, the later one wins); score terms add
(a sum: their order cannot matter); at most one transform may define `levels`.

This module is the contract (`GuidanceContext`, `Transform`, `chain`, scales, `predict`);
`diffjax.core.guidance` holds the classic transforms and re-exports the contract,
`diffjax.core.guidance_methods` the newer methods (guidance interval, adaptive projected guidance,
CFG++, autoguidance, dynamic thresholding, diffusion posterior sampling, universal guidance).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from diffjax.core import diffusion as D
from diffjax.core.schedules import Schedule


def per_example(values, x):
    """[B] (or a scalar) -> [B, 1, ..., 1] against x [B, ...]."""
    values = jnp.asarray(values)
    return values.reshape((-1,) + (1,) * (x.ndim - 1)) if values.ndim == 1 else values


def batch_levels(x, t):
    """Levels as [B] int32: a scalar (the loop) or per-example levels."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))


def _level_of(schedule: Schedule, config, t_model):
    """The level of the network's timesteps t_model [B] in `schedule` (model_timesteps inverted)."""
    original = jnp.asarray(t_model)
    if config.rescale_timesteps:
        original = original * (schedule.original_num_steps / 1000.0)
    original = jnp.round(original).astype(jnp.int32)
    return jnp.searchsorted(schedule.timestep_map, original).astype(jnp.int32)


# --------------------------------------------------------------------------- the context


@flax.struct.dataclass
class GuidanceContext:
    """What every hook sees, for a batch x [B, H, W, C] (fields a stage has not reached are None).

    x         the point: x_t (wrap_model, x0, score); x_{t-1}, after the step (project)
    t         [B] int32, x's level in `schedule`; t_model [B], the network's timestep
    output    the network's output after the model wrappers [B, H, W, C or 2C] (x0, score)
    x0        the x0 estimate: unclipped in x0 hooks, as the sampler uses it in score hooks
    variance  Var of p(x_{t-1} | x_t), broadcastable to x (x0, score)
    model_kwargs, key   the conditioning; a PRNG key (project: one per step and transform; the
                        other hooks: one per level when the sampler's Context has a key, as
                        samplers.sample's does, else None)
    x_prev, t_prev      project only: the point the step started from, and its level
    schedule, config, network, guidance   what `denoise_at` runs again

    Properties: abar, alpha, sigma, noise_level, log_snr, abar_next (the next level's alpha-bar,
    1 at the data) as [B, 1, ..., 1]; eps = (x - alpha x0) / sigma."""

    x: Any = None
    t: Any = None
    t_model: Any = None
    output: Any = None
    x0: Any = None
    variance: Any = None
    model_kwargs: Any = None
    key: Any = None
    x_prev: Any = None
    t_prev: Any = None
    schedule: Any = None
    guidance: Any = None
    config: Any = flax.struct.field(pytree_node=False, default=None)
    network: Any = flax.struct.field(pytree_node=False, default=None)

    def _table(self, table):
        """table[t] as [B, 1, ..., 1], 1 at the data (t = -1)."""
        if self.schedule is None or self.t is None:
            raise ValueError("this guidance needs the noise level: run it inside a sampler "
                             "(diffjax.core.samplers), whose context carries the schedule and t")
        values = jnp.take(table, jnp.maximum(self.t, 0))
        return per_example(jnp.where(self.t >= 0, values, 1.0), self.x)

    @property
    def abar(self):
        return self._table(self.schedule.alphas_cumprod)

    @property
    def abar_next(self):
        return self._table(self.schedule.alphas_cumprod_prev)

    @property
    def alpha(self):
        return jnp.sqrt(self.abar)

    @property
    def sigma(self):
        return jnp.sqrt(1 - self.abar)

    @property
    def noise_level(self):
        return jnp.sqrt((1 - self.abar) / self.abar)

    @property
    def log_snr(self):
        return 0.5 * (jnp.log(self.abar) - jnp.log1p(-self.abar))

    @property
    def eps(self):
        return (self.x - self.alpha * self.x0) / self.sigma

    def at(self, x, t_model, model_kwargs=None) -> "GuidanceContext":
        """The context of one network call inside a wrapper: x [B', ...] at timesteps t_model [B']."""
        return self.replace(x=x, t=_level_of(self.schedule, self.config, t_model), t_model=t_model,
                            model_kwargs=model_kwargs, output=None, x0=None, variance=None)

    def denoise_at(self, x, t=None) -> "GuidanceContext":
        """The denoiser at x [B, ...] (level t, default c.t) as a differentiable function of x: the
        network through the chain's model wrappers and x0 hooks, unclipped (`predict`)."""
        if self.network is None:
            raise ValueError("this guidance runs the denoiser again: it needs the sampler's "
                             "context (run it in a sampler)")
        t = self.t if t is None else batch_levels(x, t)
        return predict(self.guidance, self.network, self.schedule, self.config, x, t,
                       self.model_kwargs, key=self.key)[0]


def predict(guidance, network, schedule: Schedule, config, x, t, model_kwargs, *,
            clip_denoised=False, key=None):
    """The network at x [B, ...], levels t [B], through the model wrappers and x0 hooks of
    `guidance`. Returns (the context with output, x0 and variance; p_mean_variance's dict)."""
    c = GuidanceContext(x=x, t=t, t_model=D.model_timesteps(schedule, config, t),
                        model_kwargs=model_kwargs, key=key, schedule=schedule, guidance=guidance,
                        config=config, network=network)
    output = guidance.wrap_model(network, c)(x, c.t_model, **model_kwargs)
    variance = D.model_variance(schedule, config, D.split_model_output(config, output, x)[1], x, t)[0]
    c = c.replace(output=output, variance=variance)
    out = D.p_mean_variance(schedule, config, output, x, t, clip_denoised=clip_denoised,
                            denoised_fn=lambda x0: guidance.x0(c.replace(x0=x0)))
    return c.replace(x0=out["pred_xstart"]), out


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


# --------------------------------------------------------------------------- scales


@flax.struct.dataclass
class ScaleFn:
    """A scale that depends on the context: fn(c, **params) -> a number, [B] or [B, 1, ..., 1].
    `params` are traced (a pytree; a parameter may itself be a ScaleFn), `fn` is static: keep it
    one module-level function so that a new value does not look like a new program to jit."""

    params: dict
    fn: Callable = flax.struct.field(pytree_node=False)

    def __call__(self, c):
        return self.fn(c, **{k: resolve(v, c) for k, v in self.params.items()})


def scale_fn(fn: Callable, **params) -> ScaleFn:
    """A scale schedule, e.g. `scale_fn(lambda c, w: w * c.sigma, w=3.0)`: w is traced."""
    return ScaleFn({k: as_scale(v) for k, v in params.items()}, fn)


def as_scale(value):
    """A ScaleFn as it is, anything else a float32 array (traced)."""
    return value if isinstance(value, ScaleFn) else jnp.asarray(value, jnp.float32)


def resolve(scale, c, x=None, t_model=None, model_kwargs=None):
    """The value of `scale` in context c (in a wrapper's own call at (x, t_model) when given)."""
    if not isinstance(scale, ScaleFn):
        return scale
    if c is None:
        raise ValueError("a scale that is a function of the context (ScaleFn) needs the sampler's "
                         "context: call the hook from a sampler, or give it a GuidanceContext")
    if x is not None:
        c = c.at(x, t_model, model_kwargs)
    return per_example(scale(c), c.x)


# --------------------------------------------------------------------------- the base


class Transform:
    """Base class: every hook is the identity / absent (module docstring: the contract).

    `grad`, `denoised` and `post_step` run one hook outside a sampler (tests, GD's cond_fn and
    denoised_fn), with a context holding only what they are given."""

    def wrap_model(self, model_fn, c=None):
        return model_fn

    def x0(self, c):
        return c.x0

    def score(self, c):
        return None

    def project(self, c):
        return c.x

    def levels(self, num_timesteps: int):
        return None

    def grad(self, x, t, model_kwargs):
        """The score term at x with the network's timesteps t."""
        return self.score(GuidanceContext(x=x, t_model=t, model_kwargs=model_kwargs))

    def denoised(self, x0):
        return self.x0(GuidanceContext(x=x0, x0=x0))

    def post_step(self, x, level, key, sched: Schedule):
        """The projection of x, which a step took to `level`."""
        return self.project(GuidanceContext(x=x, t=batch_levels(x, level), key=key, schedule=sched))


# --------------------------------------------------------------------------- composition


@flax.struct.dataclass
class Chain(Transform):
    """Transforms applied together; the module docstring states the one order rule."""

    transforms: tuple

    def wrap_model(self, model_fn, c=None):
        for transform in self.transforms:
            model_fn = transform.wrap_model(model_fn, c)
        return model_fn

    def x0(self, c):
        for transform in self.transforms:
            c = c.replace(x0=transform.x0(c))
        return c.x0

    def score(self, c):
        terms = [g for g in (tr.score(c) for tr in self.transforms) if g is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def project(self, c):
        keys = jax.random.split(c.key, len(self.transforms)) if self.transforms else []
        for transform, k in zip(self.transforms, keys):
            c = c.replace(x=transform.project(c.replace(key=k)))
        return c.x

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

"""Samplers: one step signature, one `lax.scan` loop, one jit for the whole loop.

Noise levels are the (respaced) schedule indices: x at level i has alpha-bar `abar_i`; level -1 is
the data (abar = 1). A sampler step takes x from level t to t - 1:

    x_next, state, pred_xstart = sampler.step(ctx, state, x, t, key, noise)

where `ctx` (a `Context`) carries the schedule, the diffusion config, the model and the guidance,
`state` is the sampler's own carry (the previous x0 prediction for multistep solvers) and `noise`
is an optional override of the noise the step would draw from `key` (for parity with stored noise).

This module holds the guided denoiser (`denoise`), the ancestral sampler and DDIM, the loop, and
`SAMPLERS`, the registry of every named sampler; the higher-order ODE solvers (DPM-Solver++,
UniPC, iPNDM, Heun / EDM) and the `Sampler` base live in `diffjax.core.solvers`, below this module:
they reach `denoise` as `ctx.denoise`, so the registry here can list them without an import cycle.

Samplers are pytrees: numeric settings such as DDIM's eta are traced, so changing them does not
recompile. Guidance transforms (`diffjax.core.guidance`, `guidance_methods`) plug into every
sampler: the network, x0 and score hooks through `denoise(..., mode)`, projections after each step
through the loop (`Context.project`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import solvers as SV
from diffjax.core.schedules import Schedule
from diffjax.core.solvers import Sampler, batch_timesteps, noise_like, nonzero_mask


@flax.struct.dataclass
class Context:
    """What a step needs besides x. model_fn(x, t_model, **model_kwargs) -> model output. `key`
    (optional) seeds the guidance context's key in `denoise` (folded with the level)."""

    schedule: Schedule
    model_kwargs: dict
    clip_denoised: Any
    guidance: G.Transform
    config: D.DiffusionConfig = flax.struct.field(pytree_node=False)
    model_fn: Callable = flax.struct.field(pytree_node=False)
    key: Any = None

    def denoise(self, x, t, mode: str = "score") -> dict:
        """`denoise(self, x, t, mode)`: how the solvers, which sit below this module, call it."""
        return denoise(self, x, t, mode)

    def project(self, x_next, to, key, x, frm):
        """The guidance's projections of x_next, which a step took from x at level `frm` to level
        `to` (the `project` hooks, e.g. ILVR, inpainting on x_t, posterior sampling)."""
        c = G.GuidanceContext(
            x=x_next, t=batch_timesteps(x, to), x_prev=x, t_prev=batch_timesteps(x, frm), key=key,
            model_kwargs=self.model_kwargs, schedule=self.schedule, guidance=self.guidance,
            config=self.config, network=self.model_fn)
        return self.guidance.project(c)


def denoise(ctx: Context, x, t, mode: str = "score") -> dict:
    """p_mean_variance at respaced timesteps t [B] with the guidance applied (its contract:
    `diffjax.core.guidance_contract`): the network through the model wrappers (classifier-free,
    autoguidance), the x0 hooks before clipping (inpainting, thresholding), then the score terms
    as GD's condition_mean (mode="mean": the ancestral sampler) or condition_score (mode="score":
    DDIM and the ODE solvers). Returns dict of mean, variance, log_variance, pred_xstart."""
    key = None if ctx.key is None else jax.random.fold_in(ctx.key, jnp.reshape(t, (-1,))[0])
    c, out = G.predict(ctx.guidance, ctx.model_fn, ctx.schedule, ctx.config, x, t,
                       ctx.model_kwargs, clip_denoised=ctx.clip_denoised, key=key)
    gradient = ctx.guidance.score(c)
    if gradient is None:
        return out
    if mode == "mean":
        return dict(out, mean=G.condition_mean(out, gradient))
    return G.condition_score(ctx.schedule, out, x, t, gradient)


@flax.struct.dataclass
class DDPM(Sampler):
    """Ancestral sampling (Ho et al. 2020, Alg. 2): x_{t-1} = mu(x_t, t) + sigma_t z, no noise at
    the last step; classifier guidance shifts mu by Sigma g (GD's p_sample)."""

    name = "ddpm"

    def step(self, ctx, state, x, t, key, noise=None):
        tb = batch_timesteps(x, t)
        out = denoise(ctx, x, tb, mode="mean")
        z = noise_like(key, x, noise)
        sample = out["mean"] + nonzero_mask(tb, x) * jnp.exp(0.5 * out["log_variance"]) * z
        return sample, state, out["pred_xstart"]


@flax.struct.dataclass
class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. 12): x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} -
    sigma^2) eps + sigma z with sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t))
    sqrt(1 - abar_t / abar_{t-1}); eta = 0 is deterministic, eta = 1 ancestral-like (GD's ddim_sample).
    eps is re-derived from the (clipped) x0 prediction."""

    eta: Any = 0.0
    name = "ddim"

    def step(self, ctx, state, x, t, key, noise=None):
        sched = ctx.schedule
        tb = batch_timesteps(x, t)
        out = denoise(ctx, x, tb, mode="score")
        eps = D.predict_eps_from_xstart(sched, x, tb, out["pred_xstart"])
        abar = D.extract(sched.alphas_cumprod, tb, x.ndim)
        abar_prev = D.extract(sched.alphas_cumprod_prev, tb, x.ndim)
        sigma = (self.eta * jnp.sqrt((1 - abar_prev) / (1 - abar))
                 * jnp.sqrt(1 - abar / abar_prev))
        mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
        sample = mean + nonzero_mask(tb, x) * sigma * noise_like(key, x, noise)
        return sample, state, out["pred_xstart"]


# Every named sampler, the original four first (messages and CLI choices list them in this order).
SAMPLERS = {"ddpm": DDPM, "ddim": DDIM, "dpm++2m": SV.DPMSolverPP2M, "heun": SV.Heun,
            "dpm++3m": SV.DPMSolverPP3M, "dpm++2s": SV.DPMSolverPP2S, "unipc": SV.UniPC,
            "ipndm": SV.IPNDM}


def get_sampler(sampler: str | Sampler, **kwargs) -> Sampler:
    """A sampler instance from its name (a key of SAMPLERS, e.g. "ddim", "dpm++3m", "unipc") with
    its settings as keyword arguments, or the instance itself."""
    if isinstance(sampler, Sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {sampler!r}: choose one of {', '.join(map(repr, SAMPLERS))}"
        )
    return SAMPLERS[sampler](**kwargs)


# --------------------------------------------------------------------------- the loop


def default_levels(num_timesteps: int) -> np.ndarray:
    """[T, 2] (from, to) pairs T-1 -> T-2 -> ... -> 0 -> -1 (the data)."""
    start = np.arange(num_timesteps - 1, -1, -1, dtype=np.int32)
    return np.stack([start, start - 1], axis=1)


class _Progress:
    """A tqdm bar driven from inside a compiled loop through jax.debug.callback."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.bar = total, desc, None

    def __call__(self, step):
        from tqdm.auto import tqdm

        if self.bar is None:  # a new run of the compiled loop
            self.bar = tqdm(total=self.total, desc=self.desc, leave=True)
        self.bar.update(1)
        if self.bar.n >= self.total:
            self.bar.close()
            self.bar = None


def _checkpointed_scan(body, carry, inputs, segments: int | None):
    """`lax.scan(body, carry, inputs)`; with `segments`, the same loop cut into segments of
    ceil(N / segments) steps (at most `segments` of them, the last one possibly shorter), run as an
    outer scan whose body, the inner scan over one segment, is `jax.checkpoint`ed. Reverse-mode
    differentiation then keeps only the carry at each segment's start and recomputes the
    segment's steps in the backward pass (two-level checkpointing: Griewank 1992, Chen et al.
    2016): memory for O(segments + N / segments) steps instead of O(N), O(sqrt N) at segments =
    sqrt N, for one more forward pass.
    Without differentiation the result and the cost are those of the plain scan."""
    if segments is None:
        return jax.lax.scan(body, carry, inputs)
    num_steps = jax.tree.leaves(inputs)[0].shape[0]
    length = -(-num_steps // segments)
    full = num_steps // length
    segment = jax.checkpoint(lambda c, xs: jax.lax.scan(body, c, xs))
    head = jax.tree.map(lambda a: a[: full * length].reshape((full, length) + a.shape[1:]), inputs)
    carry, ys = jax.lax.scan(segment, carry, head)
    ys = jax.tree.map(lambda a: a.reshape((full * length,) + a.shape[2:]), ys)
    if full * length < num_steps:
        carry, tail = segment(carry, jax.tree.map(lambda a: a[full * length:], inputs))
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
    return carry, ys


def _num_segments(checkpoint_segments, num_steps: int) -> int | None:
    if checkpoint_segments is None:
        return None
    if checkpoint_segments == "sqrt":
        return max(1, round(np.sqrt(num_steps)))
    if (isinstance(checkpoint_segments, (int, np.integer)) and not isinstance(checkpoint_segments, bool)
            and checkpoint_segments >= 1):
        return int(checkpoint_segments)
    raise ValueError(f"checkpoint_segments={checkpoint_segments!r}: use None (no checkpointing), "
                     "'sqrt' (about sqrt(steps) segments) or a number of segments >= 1")


def sample_loop(
    ctx: Context,
    sampler: Sampler,
    x_T,
    key,
    *,
    step_noise=None,
    progress: bool = False,
    intermediates: bool = False,
    start_level: int | None = None,
    checkpoint_segments: int | str | None = None,
):
    """Run `sampler` from x_T [B, ...] at level T-1 down to the data, as one lax.scan (jit the
    caller). The walk over levels comes from the guidance (RePaint) or is the plain descent; a
    forward step (to = from + 1) draws x_{l+1} ~ N(sqrt(1 - beta_{l+1}) x_l, beta_{l+1} I) and
    restarts a multistep sampler's history. `step_noise` [S, B, ...] replaces the noise drawn by
    step s. Returns x_0, or (x_0, {"sample": [S, B, ...], "pred_xstart": [S, B, ...]}).

    start_level: x_T is x at this level (0 <= start_level <= T-1) and the walk starts at its first
        visit there: decoding from `ddim_invert(..., t_stop=start_level)`, or SDEdit.
    checkpoint_segments: for jax.grad through the loop, "sqrt" (~sqrt(S) segments) or a number of
        segments: the backward pass stores the carries at segment boundaries and recomputes the
        steps inside each segment, so memory grows as sqrt(S), not S (see `_checkpointed_scan`).
        None (default): a plain scan."""
    sched = ctx.schedule
    walk = ctx.guidance.levels(sched.num_timesteps)
    has_jumps = walk is not None
    walk = default_levels(sched.num_timesteps) if walk is None else walk
    if start_level is not None:
        if not 0 <= start_level < sched.num_timesteps:
            raise ValueError(f"start_level={start_level} is not a level of this {sched.num_timesteps}"
                             f"-step schedule: choose 0 <= start_level <= {sched.num_timesteps - 1}")
        walk = walk[np.flatnonzero(walk[:, 0] == start_level)[0]:]
    num_steps = walk.shape[0]
    if step_noise is not None and step_noise.shape[:1] != (num_steps,):
        raise ValueError(
            f"step_noise has {step_noise.shape[0]} steps; this loop takes {num_steps} "
            f"(shape [{num_steps}, *x.shape])"
        )
    segments = _num_segments(checkpoint_segments, num_steps)
    bar = _Progress(num_steps, f"{getattr(sampler, 'name', 'sampling')} x{num_steps}") if progress else None

    def down(x, state, frm, to, key, noise):
        k_step, k_post = jax.random.split(key)
        x_next, state, pred = sampler.step(ctx, state, x, frm, k_step, noise)
        return ctx.project(x_next, to, k_post, x, frm), state, pred

    def up(x, state, frm, to, key, noise):
        beta = sched.betas[to]
        z = jax.random.normal(key, x.shape, x.dtype)
        return jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * z, sampler.init(x), jnp.zeros_like(x)

    def body(carry, inputs):
        x, state = carry
        index, frm, to, key, noise = inputs
        if has_jumps:
            x, state, pred = jax.lax.cond(to > frm, up, down, x, state, frm, to, key, noise)
        else:
            x, state, pred = down(x, state, frm, to, key, noise)
        if bar is not None:
            jax.debug.callback(bar, index)
        return (x, state), ((x, pred) if intermediates else None)

    walk = jnp.asarray(walk)
    inputs = (jnp.arange(num_steps), walk[:, 0], walk[:, 1], jax.random.split(key, num_steps),
              step_noise)
    (x, _), history = _checkpointed_scan(body, (x_T, sampler.init(x_T)), inputs, segments)
    if intermediates:
        return x, {"sample": history[0], "pred_xstart": history[1]}
    return x


def _ddim_point(x0, eps, abar):
    """sqrt(abar) x0 + sqrt(1 - abar) eps: the point at alpha-bar `abar` [B, 1, ...] of the
    deterministic DDIM path through (x0, eps) (Song et al. 2021, eq. 12 with sigma = 0)."""
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps


def _ddim_eps(ctx: Context, x, tb):
    """The noise a DDIM step sees at x, respaced timesteps tb [B]: re-derived from the guided (and
    clipped) x0 prediction. Returns (eps, pred_xstart)."""
    out = denoise(ctx, x, tb, mode="score")
    return D.predict_eps_from_xstart(ctx.schedule, x, tb, out["pred_xstart"]), out["pred_xstart"]


def ddim_reverse_step(ctx: Context, x, t):
    """x_{t+1} from x_t along the deterministic DDIM path (GD's ddim_reverse_sample): x0 and eps
    at t, then x_{t+1} = sqrt(abar_{t+1}) x0 + sqrt(1 - abar_{t+1}) eps. Returns (x_{t+1}, x0)."""
    tb = batch_timesteps(x, t)
    eps, x0 = _ddim_eps(ctx, x, tb)
    return _ddim_point(x0, eps, D.extract(ctx.schedule.alphas_cumprod_next, tb, x.ndim)), x0


def ddim_invert(ctx: Context, x0, *, t_stop: int | None = None, fixed_point_iterations: int = 0,
                progress: bool = False):
    """DDIM inversion: encode data x0 [B, ...] to its latent at level `t_stop` (default T-1) by
    walking the deterministic DDIM path up from the data (level -1, abar = 1) through levels
    0, 1, ..., t_stop: t_stop + 1 steps, the mirror of DDIM decoding from t_stop
    (`sample_loop(ctx, DDIM(), x_t, key, start_level=t_stop)`); t_stop = -1 returns x0.

    A step from level l to l + 1 keeps an (x0, eps) pair with x_l = sqrt(abar_l) x0 +
    sqrt(1 - abar_l) eps and moves to sqrt(abar_{l+1}) x0 + sqrt(1 - abar_{l+1}) eps. The
    explicit scheme (Song et al. 2021, sec. 4.3; GD's ddim_reverse_sample) takes the model's
    prediction at the start, at (x_l, l), and from the data at (x0, 0). Each of the
    `fixed_point_iterations` takes it again at the end, at (x_{l+1}, l+1), which is what decoding
    from x_{l+1} will see, and solves the step again holding its eps (where sigma_l sigma_{l+1} < 1,
    sigma = sqrt((1 - abar) / abar): low noise) or its x0 (high noise; holding eps there would
    contract by only ~1 - sigma_l / sigma_{l+1}, ~1 at the last cosine step). A fixed point is an
    exact inverse of the decoding step (fixed-point inversion, Pan et al. 2023), so invert then
    decode returns x0 to rounding once the iterations have converged (a few to a dozen; they
    converge where the step is small against the denoiser's Lipschitz constant).
    Model calls: (1 + fixed_point_iterations) (t_stop + 1)."""
    sched = ctx.schedule
    num = sched.num_timesteps
    t_stop = num - 1 if t_stop is None else int(t_stop)
    if not -1 <= t_stop < num:
        raise ValueError(f"ddim_invert t_stop={t_stop} is not a level of this {num}-step "
                         f"schedule: choose -1 (the data) <= t_stop <= {num - 1}")
    if fixed_point_iterations < 0:
        raise ValueError(f"fixed_point_iterations={fixed_point_iterations} must be >= 0")
    bar = _Progress(t_stop + 1, "ddim inversion") if progress and t_stop >= 0 else None

    def body(x, level):  # x at level - 1 -> x at level
        abar = D.extract(sched.alphas_cumprod_prev, batch_timesteps(x, level), x.ndim)  # 1 at the data
        abar_next = D.extract(sched.alphas_cumprod, batch_timesteps(x, level), x.ndim)
        # Hold eps where sigma sigma' < 1, x0 elsewhere: for unit-scale data the iteration then
        # contracts by ~(1 - sigma / sigma') sigma'^2 / (1 + sigma'^2) holding eps and by
        # ~(sigma' / sigma - 1) / (1 + sigma'^2) holding x0, and the first is the smaller one
        # exactly when sigma sigma' < 1.
        hold_x0 = (1 - abar) * (1 - abar_next) > abar * abar_next
        sqrt_one_minus_abar = jnp.sqrt(jnp.where(hold_x0, 1 - abar, 1.0))  # divides where > 0

        def refine(y, t):
            eps, pred = _ddim_eps(ctx, y, batch_timesteps(y, t))
            x0_from_eps = (x - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
            eps_from_x0 = (x - jnp.sqrt(abar) * pred) / sqrt_one_minus_abar
            return jnp.where(hold_x0, _ddim_point(pred, eps_from_x0, abar_next),
                             _ddim_point(x0_from_eps, eps, abar_next))

        # The explicit step: the model at the start (at level 0 from the data, where abar = 1 and
        # eps is held).
        x_next = refine(x, jnp.maximum(level - 1, 0))
        x_next = jax.lax.fori_loop(0, fixed_point_iterations, lambda _, y: refine(y, level), x_next)
        if bar is not None:
            jax.debug.callback(bar, level)
        return x_next, None

    x, _ = jax.lax.scan(body, x0, jnp.arange(t_stop + 1))
    return x


# --------------------------------------------------------------------------- the notebook API


def _as_model_fn(apply, variables):
    if variables is None:
        return apply
    if hasattr(apply, "apply"):
        return lambda x, t, **kw: apply.apply(variables, x, t, **kw)
    return lambda x, t, **kw: apply(variables, x, t, **kw)


def _data_sharding(batch: int):
    """(batch sharding, replicated sharding) over every device when there are several and the
    batch divides evenly; None otherwise."""
    devices = jax.devices()
    if len(devices) < 2 or batch % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    P = jax.sharding.PartitionSpec
    return jax.sharding.NamedSharding(mesh, P("data")), jax.sharding.NamedSharding(mesh, P())


def _sample_impl(key, variables, schedule, sampler, guidance, model_kwargs, clip_denoised, x_T,
                 noise_scale=1.0, *, apply, shape, config, progress, intermediates,
                 checkpoint_segments=None):
    key_x, key_loop = jax.random.split(key)
    x = noise_scale * jax.random.normal(key_x, shape, jnp.float32) if x_T is None else x_T
    shardings = _data_sharding(shape[0])
    if shardings is not None:
        x = jax.lax.with_sharding_constraint(x, shardings[0])
    ctx = Context(schedule=schedule, model_kwargs=model_kwargs, clip_denoised=clip_denoised,
                  guidance=guidance, config=config, model_fn=_as_model_fn(apply, variables),
                  key=jax.random.fold_in(key_loop, 1))
    return sample_loop(ctx, sampler, x, key_loop, progress=progress, intermediates=intermediates,
                       checkpoint_segments=checkpoint_segments)


_sample_jit = jax.jit(
    _sample_impl,
    static_argnames=("apply", "shape", "config", "progress", "intermediates", "checkpoint_segments"),
)


def sample(
    key,
    model,
    schedule: Schedule,
    shape,
    *,
    sampler: str | Sampler = "ddim",
    guidance: G.Transform | None = None,
    config: D.DiffusionConfig | None = None,
    model_kwargs: dict | None = None,
    clip_denoised=True,
    x_T=None,
    progress: bool = False,
    return_intermediates: bool = False,
    noise_scale=1.0,
    gradient_checkpointing: bool = False,
):
    """Draw samples [*shape] (NHWC) with one jit-compiled loop.

    model: `(module_or_apply_fn, variables)` — called as `module.apply(variables, x, t, **kw)` or
        `apply_fn(variables, x, t, **kw)` — or a plain `model_fn(x, t, **kw)`; t is the original
        timestep. Prefer the pair: its variables are traced, while a plain function is a static
        argument (a new closure each call recompiles).
    sampler: a name of SAMPLERS ("ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2s", "unipc",
        "ipndm", "heun") or an instance (e.g. `DDIM(eta=0.5)`, `solvers.Heun(s_churn=40.0)`).
    guidance: a `diffjax.core.guidance` transform or chain; scales, masks, references are traced.
    model_kwargs: conditioning arrays with a leading batch dim (e.g. {"y": labels}).
    noise_scale: the drawn x_T is noise_scale * N(0, I) (traced; GLIDE's upsample_temp = 0.997 for
        its upsampler); the noise of the steps themselves is not scaled, as in GLIDE. Not with x_T.
    gradient_checkpointing: for jax.grad of a loss on the samples with respect to x_T, the
        variables, model_kwargs or the guidance's scales: the loop keeps ~sqrt(steps) carries
        and recomputes the steps between them in the backward pass (memory O(sqrt(steps)) instead
        of O(steps), one more forward pass); the samples are the same.
    The batch is sharded across all devices when there are several and it divides evenly.
    """
    if x_T is not None and not (isinstance(noise_scale, (int, float)) and noise_scale == 1.0):
        raise ValueError("sample(..., x_T=..., noise_scale=...): noise_scale scales the drawn x_T; "
                         "with an explicit x_T scale it yourself and leave noise_scale=1.0")
    apply, variables = model if isinstance(model, tuple) else (model, None)
    config = config or D.DiffusionConfig()
    traced = (key, variables, schedule, get_sampler(sampler), guidance or G.chain(),
              model_kwargs or {}, jnp.asarray(clip_denoised), x_T)
    noise_scale = jnp.asarray(noise_scale, jnp.float32)
    shardings = _data_sharding(shape[0])
    if shardings is not None:
        # Inputs committed to one device (e.g. restored weights) must join the mesh: replicate
        # them (a no-op for arrays already there), and split the batch-major ones.
        batch_sharded, replicated = shardings
        *traced, x_T = jax.device_put(traced, replicated)
        traced[5] = jax.device_put(traced[5], batch_sharded)
        x_T = x_T if x_T is None else jax.device_put(x_T, batch_sharded)
        traced = (*traced, x_T)
        noise_scale = jax.device_put(noise_scale, replicated)
    return _sample_jit(*traced, noise_scale, apply=apply, shape=tuple(shape), config=config,
                       progress=progress, intermediates=return_intermediates,
                       checkpoint_segments="sqrt" if gradient_checkpointing else None)

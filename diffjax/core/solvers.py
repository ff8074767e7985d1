"""ODE solvers of the probability-flow ODE, each a step rule on the discrete chain.

Every sampler has one step signature,

    x_next, state, pred_xstart = sampler.step(ctx, state, x, t, key, noise=None)

taking x from level t of `ctx.schedule` to level t - 1 (level -1 is the data), with `state` the
solver's carry through the `lax.scan` loop (`init(x)` builds it; the loop calls `init` again after a
RePaint forward jump, which restarts a multistep history). Numeric settings are traced dataclass
fields; `evaluations_per_step` is the number of network calls a step makes (at most: the step to
the data is always first order, one call), so NFE <= steps x evaluations_per_step.

The solvers see the network only through `ctx.denoise(x, t, mode="score")` (the guided denoiser of
`diffjax.core.samplers`: classifier-free wrapping, the score gradient as guided-diffusion's
condition_score, x0 projections), so every guidance transform works with every solver. This module
sits below `samplers` (which holds `Context`, `denoise`, DDPM, DDIM, the loop and the registry of
all named samplers) and therefore does not import it.

Notation (Lu et al. 2022): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t =
log(alpha_t / sigma_t), h = lambda_{t-1} - lambda_t > 0; EDM's noise level s_t = sigma_t / alpha_t
and x~ = x / alpha_t (Karras et al. 2022). In data prediction the exact solution from s to t is

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda,

and a Taylor expansion of x0 in lambda gives the coefficients alpha_t C_k(h) of its k-th
derivative, C_k(h) = int_0^h e^(u - h) u^k / k! du: C_0 = 1 - e^-h, C_k = h^k / k! - C_{k-1}.

Solvers that evaluate the network off the grid (DPM-Solver++(2S)'s intermediate point, EDM's churn)
choose among the training chain's timesteps when given it (`chain=spec.schedule()`, every step),
and among the grid's own stops otherwise; see each class.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from diffjax.core import diffusion as D
from diffjax.core.schedules import Schedule, vp_marginals


class Sampler:
    """Base of every sampler (module docstring: the step signature); stateless samplers carry an
    empty dict. `samplers` re-exports it."""

    name = "sampler"
    evaluations_per_step = 1

    def init(self, x):
        return {}


def batch_timesteps(x, t):
    """Timesteps as [B] int32: a scalar t (the loop) or per-example t (GD's single steps)."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))


def nonzero_mask(tb, x):
    """[B, 1, ..., 1] float mask of t != 0 (no noise is added at the last step)."""
    return (tb != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def noise_like(key, x, noise):
    """`noise` if given, else a fresh N(0, I) draw shaped like x."""
    return jax.random.normal(key, x.shape, x.dtype) if noise is None else noise


def _per_example(values, x):
    return values.reshape((-1,) + (1,) * (x.ndim - 1))


def _marginals(sched: Schedule, tb, x):
    """(alpha, sigma, lambda) at level t and at level t - 1 (the data: 1, 0, +inf), each
    [B, 1, ..., 1] in x's dtype."""
    now = vp_marginals(D.extract(sched.alphas_cumprod, tb, x.ndim).astype(x.dtype))
    nxt = vp_marginals(D.extract(sched.alphas_cumprod_prev, tb, x.ndim).astype(x.dtype))
    return now, nxt


def _x0(ctx, x, tb):
    return ctx.denoise(x, tb, mode="score")["pred_xstart"]


def _push(history, value):
    """history [K, ...] with `value` in front and the oldest entry dropped."""
    return jnp.concatenate([value[None], history[:-1]], axis=0)


def _order(state, tb, x, most):
    """The order a multistep step can take: `most`, limited by the history it has (a warm start
    of order 1, 2, ...) and by the steps left (the last steps use order 2, then 1, as Lu et al.'s
    lower-order final steps), [B, 1, ..., 1] int32."""
    return _per_example(jnp.minimum(jnp.minimum(most, state["count"] + 1), tb + 1), x)


def _eval_levels(solver_chain, ctx, tb):
    """Where a step may evaluate off the grid: (a context on that table, the table's alphas_cumprod
    [L], the index in it of the stops t and t - 1). The training chain if the solver holds it,
    else the grid's own stops."""
    if solver_chain is None:
        return ctx, ctx.schedule.alphas_cumprod, tb, tb - 1
    if solver_chain.num_timesteps != ctx.schedule.original_num_steps:
        raise ValueError(
            f"the solver's chain has {solver_chain.num_timesteps} steps but the schedule was "
            f"respaced from {ctx.schedule.original_num_steps}: pass chain=spec.schedule() of the "
            f"same DiffusionSpec")
    stops = ctx.schedule.timestep_map
    index = jnp.take(stops, tb)
    below = jnp.where(tb > 0, jnp.take(stops, jnp.maximum(tb - 1, 0)), -1)
    return ctx.replace(schedule=solver_chain), solver_chain.alphas_cumprod, index, below


def _nearest_level(values, target, lo, hi):
    """Per example, the index in [lo, hi] of the entry of the increasing `values` [L] nearest to
    target [B] (lo, hi [B] int, lo <= hi)."""
    right = jnp.clip(jnp.searchsorted(values, target), lo, hi)
    left = jnp.clip(right - 1, lo, hi)
    closer = jnp.abs(jnp.take(values, left) - target) <= jnp.abs(jnp.take(values, right) - target)
    return jnp.where(closer, left, right).astype(jnp.int32)


# --------------------------------------------------------------------------- DPM-Solver++


@flax.struct.dataclass
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), the multistep second-order solver of the
    diffusion ODE in data prediction, on the discrete schedule:

        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i,

    with D = x0_{i-1} (first order) at the first step and at the final step to the data (sigma = 0,
    where it returns the x0 prediction). Classifier guidance enters as GD's condition_score.
    The solver prefers levels spaced evenly in lambda; GD's evenly-in-t respacings put a long last
    step after short ones (r_i ~ 0.2 at 10 cosine steps), where DDIM can still be as accurate."""

    name = "dpm++2m"

    def init(self, x):
        per_example = (x.shape[0],) + (1,) * (x.ndim - 1)
        return {"x0": jnp.zeros_like(x), "h": jnp.zeros(per_example, x.dtype),
                "count": jnp.zeros((), jnp.int32)}

    def step(self, ctx, state, x, t, key, noise=None):
        tb = batch_timesteps(x, t)
        x0 = _x0(ctx, x, tb)
        (_, sigma, lam), (alpha_next, sigma_next, lam_next) = _marginals(ctx.schedule, tb, x)
        h = lam_next - lam
        second = (state["count"] > 0) & (nonzero_mask(tb, x) > 0)
        r = jnp.where(second, state["h"] / jnp.where(second, h, 1.0), 1.0)
        d = jnp.where(second, (1 + 0.5 / r) * x0 - (0.5 / r) * state["x0"], x0)
        sample = (sigma_next / sigma) * x - alpha_next * jnp.expm1(-h) * d
        return sample, {"x0": x0, "h": h, "count": state["count"] + 1}, x0


@flax.struct.dataclass
class DPMSolverPP3M(Sampler):
    """DPM-Solver++(3M): the third-order member of Lu et al.'s (2022, sec. 4) multistep family in
    data prediction, its weights derived from the Taylor expansion of the module docstring, with
    x0 differences in lambda over the last three stops s0 > s1 > s2:

        r0 = h0 / h, r1 = h1 / h  (h0 = lambda_s0 - lambda_s1, h1 = lambda_s1 - lambda_s2),
        D1_0 = (x0_s0 - x0_s1) / r0,  D1_1 = (x0_s1 - x0_s2) / r1,
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)  ~ h x0',   D2 = (D1_0 - D1_1) / (r0 + r1)  ~ h^2 x0'' / 2,
        x_t = (sigma_t / sigma_s0) x - alpha_t phi1 x0_s0 + alpha_t phi2 D1 - 2 alpha_t phi3 D2,

    phi1 = e^-h - 1, phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2, i.e. alpha_t C_1(h) / h and
    alpha_t C_2(h) / h^2 (module docstring) times h x0' and h^2 x0''. The factor 2 on the D2 term
    makes the step exact for an x0 quadratic in lambda; weighing D2 by phi3 alone, as some
    implementations do, leaves an h^3 error per step (measured: order 1.3 instead of 3.1 in
    tests/test_solvers.py's setting). Order 1, 2 at the first steps (warm start), and at the last
    two steps (lower-order final steps: 2, then 1 for the step to the data, which returns x0)."""

    name = "dpm++3m"

    def init(self, x):
        per_example = (2, x.shape[0]) + (1,) * (x.ndim - 1)
        return {"x0": jnp.zeros((2,) + x.shape, x.dtype), "lam": jnp.zeros(per_example, x.dtype),
                "count": jnp.zeros((), jnp.int32)}

    def step(self, ctx, state, x, t, key, noise=None):
        tb = batch_timesteps(x, t)
        x0 = _x0(ctx, x, tb)
        (_, sigma, lam), (alpha_next, sigma_next, lam_next) = _marginals(ctx.schedule, tb, x)
        order = _order(state, tb, x, 3)
        h = jnp.where(order > 1, lam_next - lam, 1.0)  # finite where higher orders are used
        x0_1, x0_2 = state["x0"]
        lam_1, lam_2 = state["lam"]
        r0 = jnp.where(order > 1, (lam - lam_1) / h, 1.0)
        r1 = jnp.where(order > 2, (lam_1 - lam_2) / h, 1.0)
        d1_0 = (x0 - x0_1) / r0
        d1_1 = (x0_1 - x0_2) / r1
        d1 = jnp.where(order > 2, d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), d1_0)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi1 = jnp.expm1(-(lam_next - lam))
        phi2 = jnp.expm1(-h) / h + 1
        phi3 = phi2 / h - 0.5
        sample = (sigma_next / sigma) * x - alpha_next * phi1 * x0
        sample = sample + jnp.where(order > 1, alpha_next * phi2 * d1, 0.0)
        sample = sample - jnp.where(order > 2, 2 * alpha_next * phi3 * d2, 0.0)
        new = {"x0": _push(state["x0"], x0), "lam": _push(state["lam"], lam),
               "count": state["count"] + 1}
        return sample, new, x0


@flax.struct.dataclass
class DPMSolverPP2S(Sampler):
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1): singlestep second order in data prediction, with
    an intermediate point u between the stops s and t:

        x_u = (sigma_u / sigma_s) x_s - alpha_u (e^{-r h} - 1) x0_s,   r = (lambda_u - lambda_s) / h,
        D = (1 - 1/(2r)) x0_s + 1/(2r) x0(x_u, u),
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D.

    The network takes integer timesteps, so u is a training timestep: with `chain` (the training
    chain, `spec.schedule()`), the one strictly between the two stops whose lambda is nearest the
    midpoint (lambda_s + lambda_t) / 2, and r is computed from its own lambda, so the step stays
    exactly second order (r ~ 1/2). When the stops are adjacent training steps, or without `chain`,
    u is the next stop t itself (r = 1: the exponential-integrator trapezoid, also second order).
    Two evaluations per step; the step to the data is first order (returns x0, one evaluation)."""

    chain: Schedule | None = None
    name = "dpm++2s"
    evaluations_per_step = 2

    def step(self, ctx, state, x, t, key, noise=None):
        tb = batch_timesteps(x, t)
        x0 = _x0(ctx, x, tb)
        (_, sigma, lam), (alpha_next, sigma_next, lam_next) = _marginals(ctx.schedule, tb, x)
        more = nonzero_mask(tb, x) > 0

        def second(_):
            on, abar_levels, top, below = _eval_levels(self.chain, ctx, tb)
            _, _, lam_levels = vp_marginals(abar_levels)  # decreasing in the level
            mid = ((lam + lam_next) / 2).reshape(-1).astype(lam_levels.dtype)
            inside = top - below > 1  # a training step strictly between the stops
            u = _nearest_level(-lam_levels, -mid, below + 1, jnp.maximum(top - 1, below + 1))
            u = jnp.maximum(jnp.where(inside, u, below), 0)
            alpha_u, sigma_u, lam_u = vp_marginals(D.extract(abar_levels, u, x.ndim).astype(x.dtype))
            h = jnp.where(more, lam_next - lam, 1.0)
            r = jnp.where(more, (lam_u - lam) / h, 1.0)
            x_u = (sigma_u / sigma) * x - alpha_u * jnp.expm1(-r * h) * x0
            d = (1 - 0.5 / r) * x0 + (0.5 / r) * _x0(on, x_u, u)
            return jnp.where(more, (sigma_next / sigma) * x - alpha_next * jnp.expm1(-h) * d, x0)

        # The step to the data (t == 0) needs no second evaluation.
        sample = jax.lax.cond(jnp.any(more), second, lambda _: x0, None)
        return sample, state, x0


# --------------------------------------------------------------------------- UniPC


def _taylor_weights(r, count, g):
    """Weights w [B, P] with sum_k w_k r_k^(j-1) = g_j, j = 1..n, over the first n = count [B]
    slots of r [B, P] (the others get w = 0); a one-point system takes its h -> 0 limit w = 1/2."""
    size = r.shape[-1]
    j = jnp.arange(size)
    used = j[None] < count[:, None]  # [B, P]
    powers = r[:, None, :] ** j[None, :, None]  # [B, row j, point k]
    block = used[:, :, None] & used[:, None, :]
    matrix = jnp.where(block, powers, jnp.eye(size, dtype=r.dtype)[None])
    w = jnp.linalg.solve(matrix, jnp.where(used, g, 0.0)[..., None])[..., 0]
    return jnp.where((count[:, None] == 1) & (j[None] == 0), 0.5, w)


@flax.struct.dataclass
class UniPC(Sampler):
    """UniPC (Zhao et al. 2023) with the data-prediction model: the predictor UniP-p and the
    corrector UniC-p, which reuses the next step's evaluation (no extra network call) and raises
    the order to p + 1. From stop s (x_s, x0 history m_0 = x0_s, m_k at lambda_{s_k}) to t:

        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) m_0 + alpha_t B(h) sum_k a_k D_k / r_k,
        D_k = m_k - m_0,  r_k = (lambda_{s_k} - lambda_s) / h,
        sum_k a_k r_k^(j-1) = j! C_j(h) / (h^j B(h)),  j = 1..n   (C_j: module docstring).

    The predictor uses the p - 1 stops before s; the corrector redoes the step with x0 at the
    predicted x_t added as the point r = 1, and the x0 it used is kept for the next step (evaluated
    at the predicted, not the corrected, x_t: no extra evaluation). bh2: B(h) = 1 - e^-h (bh1: h).
    A solved system does not depend on B; B enters through the one-point systems, which take their
    h -> 0 limit a = 1/2 (so UniP-2 with bh2 is DPM-Solver++(2M)). Warm start and final steps use
    lower orders as DPM-Solver++(3M); the step to the data returns x0, so no corrector follows it.
    `order` = p (static: it sizes the history), 2 by default: third order overall."""

    order: int = flax.struct.field(pytree_node=False, default=2)
    variant: str = flax.struct.field(pytree_node=False, default="bh2")
    name = "unipc"

    def __post_init__(self):
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC(variant={self.variant!r}): choose 'bh1' (B(h) = h) or 'bh2' "
                             f"(B(h) = 1 - e^-h)")
        if not isinstance(self.order, int) or not 1 <= self.order <= 3:
            raise ValueError(f"UniPC(order={self.order!r}): the predictor order p is 1, 2 or 3")

    def init(self, x):
        per_example = (x.shape[0],) + (1,) * (x.ndim - 1)
        return {"x": jnp.zeros_like(x), "sigma": jnp.ones(per_example, x.dtype),
                "x0": jnp.zeros((self.order,) + x.shape, x.dtype),
                "lam": jnp.zeros((self.order,) + per_example, x.dtype),
                "order": jnp.ones(x.shape[:1], jnp.int32), "count": jnp.zeros((), jnp.int32)}

    def _update(self, active, x_s, sigma_s, lam_s, m0, alpha_t, sigma_t, lam_t, points, lams, n):
        """x_t from stop s with the first n [B] of points [P, B, ...] (x0 at lambdas [P, B, ...])."""
        h = jnp.where(active, lam_t - lam_s, 1.0)
        base = (sigma_t / sigma_s) * x_s - alpha_t * jnp.expm1(-h) * m0
        size = points.shape[0]
        if size == 0:
            return base
        used = jnp.arange(size)[:, None] < n[None]  # [P, B]
        r = jnp.where(used, ((lams - lam_s) / h).reshape(size, -1), 1.0)  # 1: keeps D/r finite
        b = -jnp.expm1(-h) if self.variant == "bh2" else h
        g, c = [], -jnp.expm1(-h.reshape(-1))  # G_0 = C_0; G_j = j! C_j / h^j = 1 - (j/h) G_{j-1}
        for j in range(1, size + 1):
            c = 1 - j / h.reshape(-1) * c
            g.append(c / b.reshape(-1))
        w = _taylor_weights(r.T, n, jnp.stack(g, axis=-1))  # [B, P]
        terms = (points - m0[None]) / r.reshape(lams.shape)
        return base + alpha_t * b * jnp.einsum("kb...,bk->b...", terms, w)

    def step(self, ctx, state, x, t, key, noise=None):
        tb = batch_timesteps(x, t)
        x0 = _x0(ctx, x, tb)
        (alpha, sigma, lam), (alpha_next, sigma_next, lam_next) = _marginals(ctx.schedule, tb, x)
        p = self.order
        # Corrector of the step that led here: the predictor's points, and (lambda_t, x0) in the
        # next slot, n = the predictor's order.
        n = state["order"]
        slot = (jnp.arange(p)[:, None] == (n - 1)[None]).reshape((p, -1) + (1,) * (x.ndim - 1))
        corrected = self._update(
            state["count"] > 0, state["x"], state["sigma"], state["lam"][0], state["x0"][0],
            alpha, sigma, lam,
            jnp.where(slot, x0[None], jnp.concatenate([state["x0"][1:], x0[None]])),
            jnp.where(slot, lam[None], jnp.concatenate([state["lam"][1:], lam[None]])), n)
        x = jnp.where(state["count"] > 0, corrected, x)
        # Predictor to t - 1 from the p - 1 stops before t; the step to the data returns x0.
        order = _order(state, tb, x, p).reshape(-1)
        more = nonzero_mask(tb, x) > 0
        predicted = self._update(more, x, sigma, lam, x0, alpha_next, sigma_next, lam_next,
                                 state["x0"][: p - 1], state["lam"][: p - 1], order - 1)
        sample = jnp.where(more, predicted, x0)
        new = {"x": x, "sigma": sigma, "x0": _push(state["x0"], x0),
               "lam": _push(state["lam"], lam), "order": order, "count": state["count"] + 1}
        return sample, new, x0


# --------------------------------------------------------------------------- EDM-style (sigma)


# Adams-Bashforth weights of orders 1..4 on eps_t, eps_{t+1}, ... (equal steps).
_ADAMS_BASHFORTH = (
    (1.0, 0.0, 0.0, 0.0),
    (3 / 2, -1 / 2, 0.0, 0.0),
    (23 / 12, -16 / 12, 5 / 12, 0.0),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


@flax.struct.dataclass
class IPNDM(Sampler):
    """Improved pseudo-numerical method iPNDM (Zhang & Chen 2022, DEIS, app.; after Liu et al.'s
    PNDM): a linear multistep Adams-Bashforth method on the noise prediction in EDM's variables,
    dx~/ds = eps(x~, s),

        x~_{t-1} = x~_t + (s_{t-1} - s_t) sum_k w_k eps_{t+k},

    with the fixed (equal-step) weights of order min(4, steps so far + 1): a lower-order warm start
    instead of PNDM's Runge-Kutta one. The weights assume equal steps in s; on other grids (log-SNR,
    Karras) the method is second order. eps is re-derived from the (guided, clipped) x0 prediction,
    as DDIM does, which the order-1 step equals; the step to the data returns x0. `order` (static,
    <= 4) caps the order."""

    order: int = flax.struct.field(pytree_node=False, default=4)
    name = "ipndm"

    def __post_init__(self):
        if not isinstance(self.order, int) or not 1 <= self.order <= 4:
            raise ValueError(f"IPNDM(order={self.order!r}): the order is 1, 2, 3 or 4")

    def init(self, x):
        return {"eps": jnp.zeros((3,) + x.shape, x.dtype), "count": jnp.zeros((), jnp.int32)}

    def step(self, ctx, state, x, t, key, noise=None):
        tb = batch_timesteps(x, t)
        x0 = _x0(ctx, x, tb)
        (alpha, sigma, _), (alpha_next, sigma_next, _) = _marginals(ctx.schedule, tb, x)
        s, s_next = sigma / alpha, sigma_next / alpha_next
        eps = (x / alpha - x0) / s
        order = jnp.minimum(self.order, state["count"] + 1)
        weights = jnp.asarray(_ADAMS_BASHFORTH, x.dtype)[order - 1]
        history = jnp.concatenate([eps[None], state["eps"]])
        slope = jnp.tensordot(weights, history, axes=1)
        sample = alpha_next * (x / alpha + (s_next - s) * slope)
        # The step to the data is an Euler step, i.e. x0, as in every sampler here: the short
        # interval s_0 -> 0 extrapolated with eps from steps of the grid's size is first order.
        sample = jnp.where(nonzero_mask(tb, x) > 0, sample, x0)
        return sample, {"eps": _push(state["eps"], eps), "count": state["count"] + 1}, x0


@flax.struct.dataclass
class Heun(Sampler):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2) on the discrete schedule; with
    s_churn = 0 (the default) its deterministic Heun method (Alg. 1). In the variance-exploding
    variables x~ = x / sqrt(abar), s_t = sqrt((1 - abar_t) / abar_t) the probability-flow ODE is
    dx~/ds = (x~ - D(x~; s)) / s, D the x0 prediction. Per step:

        gamma = min(s_churn / N, sqrt(2) - 1) if s_tmin <= s_t <= s_tmax else 0,
        s^ = s_t (1 + gamma),  x~^ = x~_t + sqrt(s^2 - s_t^2) s_noise z,
        d = (x~^ - D(x~^; s^)) / s^,  x~' = x~^ + (s_{t-1} - s^) d,
        x~_{t-1} = x~^ + (s_{t-1} - s^) (d + d') / 2,  d' = (x~' - D(x~'; s_{t-1})) / s_{t-1},

    an Euler step (to the x0 prediction) at the last step, where s = 0. The model only knows
    training timesteps, so s^ is rounded to the nearest level at or above s_t, as EDM does for
    discrete-time models: among the training chain's timesteps with `chain=spec.schedule()`, else
    among the grid's stops (where a small gamma rounds back to s_t: no churn). N is the number of
    stops. Euler steps (which are DDIM steps) are also taken from levels above `sigma_max`: GD's
    cosine schedule starts at s ~ 2e4, where the trapezoid multiplies the error of d' by
    s / s_{t-1}; EDM treats those models the same way by starting at sigma ~ 80 (it skips their 8
    noisiest steps). Two model evaluations per step below sigma_max."""

    sigma_max: Any = 80.0
    s_churn: Any = 0.0
    s_tmin: Any = 0.0
    s_tmax: Any = math.inf
    s_noise: Any = 1.0
    chain: Schedule | None = None
    name = "heun"
    evaluations_per_step = 2

    def step(self, ctx, state, x, t, key, noise=None):
        sched = ctx.schedule
        tb = batch_timesteps(x, t)
        (alpha, sigma, _), (alpha_next, sigma_next, _) = _marginals(sched, tb, x)
        s, s_next = sigma / alpha, sigma_next / alpha_next
        # Churn: raise the noise level to a level s^ >= s of the table the model can take.
        on, abar_levels, top, _ = _eval_levels(self.chain, ctx, tb)
        alpha_levels, sigma_levels, _ = vp_marginals(abar_levels)
        s_levels = sigma_levels / alpha_levels  # increasing in the level
        steps = sched.num_timesteps
        churn = (s >= self.s_tmin) & (s <= self.s_tmax)
        gamma = jnp.where(churn, jnp.minimum(self.s_churn / steps, math.sqrt(2) - 1), 0.0)
        target = (s * (1 + gamma)).reshape(-1).astype(s_levels.dtype)
        hat = _nearest_level(s_levels, target, top, jnp.full_like(top, s_levels.shape[0] - 1))
        alpha_hat, sigma_hat, _ = vp_marginals(
            D.extract(abar_levels, hat, x.ndim).astype(x.dtype))
        # At the stop's own level nothing changes: the table's s there may differ from s in the
        # last bit, which sqrt(s^2 - s^2) would turn into noise of size sqrt(2 s ulp(s)).
        same = _per_example(hat == top, x)
        alpha_hat = jnp.where(same, alpha, alpha_hat)
        s_hat = jnp.where(same, s, sigma_hat / alpha_hat)
        z = noise_like(key, x, noise)
        raised = x / alpha + jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0)) * self.s_noise * z
        x_hat = jnp.where(same, x, alpha_hat * raised)
        xv = jnp.where(same, x / alpha, raised)
        x0 = _x0(on, x_hat, hat)
        d = (xv - x0) / s_hat
        euler = xv + (s_next - s_hat) * d
        more = (nonzero_mask(tb, x) > 0) & (s_hat <= self.sigma_max)

        def correct(_):
            x_mid = euler * alpha_next
            x0_mid = _x0(ctx, x_mid, jnp.maximum(tb - 1, 0))
            d_mid = (euler - x0_mid) / jnp.where(more, s_next, 1.0)
            return jnp.where(more, xv + (s_next - s_hat) * 0.5 * (d + d_mid), euler)

        # Euler-only steps (the last one, and those above sigma_max) skip the second model call.
        xv_next = jax.lax.cond(jnp.any(more), correct, lambda _: euler, None)
        return xv_next * alpha_next, state, x0

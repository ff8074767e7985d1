"""ODE solvers against closed forms.

* Order of convergence on Gaussian data (tests/_gaussian.py), where the exact flow is known: on a
  fine training chain (4000 linear steps) and Karras stops, the error at N and 2N steps falls by
  2^order. The reference is the exact flow to level 0 followed by the exact x0 prediction there,
  which is what every sampler's last step returns (against the ODE's end itself the error has a
  floor of ~1e-4 that hides third order).
* iPNDM's Adams-Bashforth weights: one step with an exact history is exact for eps polynomial in
  sigma of degree < order, and off by exactly C_k h^(k+1) k! for degree k.
* Network evaluations per step, where DPM-Solver++(2S) and EDM's churn evaluate off the grid, and
  that EDM's churn samples the data distribution.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.core import guidance as G
from diffjax.core import samplers as SM
from diffjax.core import schedules as S
from diffjax.core import solvers as SV
from diffjax.core.spec import DiffusionSpec
from diffjax.core.timegrid import TimeGrid
from diffjax.core import samplers as SM_core  # the loop itself (diffjax.sample takes a model)
from tests._gaussian import MU, STD, X0_CFG, exact_sample, gaussian_denoiser
from tests._util import first_quick

SPEC = DiffusionSpec("linear", 4000)
BETAS = SPEC.training_betas()
CHAIN = SPEC.schedule()  # every training step


def karras(steps):
    return SPEC.schedule(TimeGrid("karras", steps=steps, betas=BETAS))


def errors(sampler, steps_list, x_T):
    out = []
    for steps in steps_list:
        sched = karras(steps)
        x = SM_core.sample(jax.random.PRNGKey(1), gaussian_denoiser(CHAIN), sched, x_T.shape,
                           sampler=sampler, config=X0_CFG, clip_denoised=False, x_T=x_T)
        out.append(float(np.max(np.abs(np.asarray(x) - exact_sample(sched, x_T)))))
    return out


ORDERS = [
    ("ddim", 1, (20, 40)),
    ("dpm++2m", 2, (40, 80)),
    ("dpm++3m", 3, (40, 80)),
    ("dpm++2s", 2, (20, 40)),
    (SV.DPMSolverPP2S(chain=CHAIN), 2, (20, 40)),
    ("unipc", 3, (40, 80)),
    (SV.UniPC(variant="bh1"), 3, (40, 80)),
    (SV.UniPC(order=3), 4, (40, 80)),
    ("ipndm", 2, (40, 80)),  # fixed equal-step weights: second order on other grids
    ("heun", 2, (40, 80)),
]


@pytest.mark.parametrize("sampler, order, steps", ORDERS,
                         ids=[o[0] if isinstance(o[0], str) else repr(o[0])[:40] for o in ORDERS])
def test_solvers_converge_to_the_exact_flow_at_their_order(sampler, order, steps):
    x_T = jax.random.normal(jax.random.PRNGKey(0), (64, 2, 2, 1))
    coarse, fine = errors(sampler, steps, np.asarray(x_T))
    observed = math.log2(coarse / fine)
    assert abs(observed - order) < 0.35, (observed, coarse, fine)


# A chain whose EDM noise level s is linear in t, so that every 20th step is an equal step in s.
_S_CHAIN = np.linspace(0.1, 4.1, 401)
_EQUAL = S.Schedule.from_betas(*S.respace_betas(
    1 - (1 / (1 + _S_CHAIN**2)) / np.append(1.0, 1 / (1 + _S_CHAIN[:-1] ** 2)), range(0, 401, 20)),
    401)


def ipndm_step_miss(order, degree, k=15):
    """With eps(x~, s) = (s/2)^degree the flow is x~' = eps: the exact x~_{k-1} minus IPNDM's one
    step from level k, given the exact eps at the three levels above."""
    abar = np.asarray(_EQUAL.alphas_cumprod, np.float64)
    s, alpha = np.sqrt((1 - abar) / abar), np.sqrt(abar)
    alpha_of = jnp.asarray(1 / np.sqrt(1 + _S_CHAIN**2), jnp.float32)
    s_of = jnp.asarray(_S_CHAIN, jnp.float32)

    def model_fn(x, t):  # x0 = x / alpha - s eps
        a, v = alpha_of[t].reshape(-1, 1), s_of[t].reshape(-1, 1)
        return x / a - v * (v / 2) ** degree

    ctx = SM.Context(_EQUAL, {}, False, G.chain(), X0_CFG, model_fn)
    x = jnp.full((2, 1), 0.7 * alpha[k], jnp.float32)
    history = jnp.stack([jnp.full((2, 1), (s[k + j] / 2) ** degree, jnp.float32) for j in (1, 2, 3)])
    state = {"eps": history, "count": jnp.int32(3)}
    x_next, _, _ = SV.IPNDM(order=order).step(ctx, state, x, k, jax.random.PRNGKey(0))
    integral = 2 * ((s[k - 1] / 2) ** (degree + 1) - (s[k] / 2) ** (degree + 1)) / (degree + 1)
    return 0.7 + integral - float(x_next[0, 0]) / alpha[k - 1], s[k - 1] - s[k]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_weights_are_adams_bashforth(order):
    """One step is exact for eps of degree < order in s, and misses degree `order` by the
    Adams-Bashforth error C h^(order+1) p^(order), C = 1/2, 5/12, 3/8, 251/720 (equal steps)."""
    exact, _ = ipndm_step_miss(order, order - 1)
    assert abs(exact) < 2e-6, exact
    miss, h = ipndm_step_miss(order, order)
    constant = {1: 1 / 2, 2: 5 / 12, 3: 3 / 8, 4: 251 / 720}[order]
    np.testing.assert_allclose(miss, constant * h ** (order + 1) * math.factorial(order) / 2**order,
                               rtol=2e-2)


def count_evaluations(sampler, steps):
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return gaussian_denoiser(CHAIN)(x, t)

    sched = SPEC.schedule(steps)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))  # 3: not split over devices
    SM_core.sample(jax.random.PRNGKey(1), model_fn, sched, x_T.shape, sampler=sampler,
                   config=X0_CFG, clip_denoised=False, x_T=x_T).block_until_ready()
    jax.effects_barrier()
    return len(calls)


EVALUATED = dict(
    {name: SM.get_sampler(name) for name in SM.SAMPLERS},
    heun=SV.Heun(sigma_max=jnp.inf),  # no Euler-only steps from the top
    **{"dpm++2s+chain": SV.DPMSolverPP2S(chain=CHAIN),
       "heun+churn": SV.Heun(sigma_max=jnp.inf, s_churn=10.0, chain=CHAIN)})


@pytest.mark.parametrize("name", sorted(EVALUATED))
def test_evaluations_per_step(name):
    steps, sampler = 6, EVALUATED[name]
    # every step makes evaluations_per_step calls but the step to the data, which makes one
    expected = (steps - 1) * sampler.evaluations_per_step + 1
    assert count_evaluations(sampler, steps) == expected


def recorded_timesteps(sampler, sched, x, level):
    seen = []

    def model_fn(x, t):
        jax.debug.callback(lambda tt: seen.append(int(np.asarray(tt)[0])), t)
        return gaussian_denoiser(CHAIN)(x, t)

    ctx = SM.Context(sched, {}, False, G.chain(), X0_CFG, model_fn)
    sampler.step(ctx, sampler.init(x), x, level, jax.random.PRNGKey(0))
    jax.effects_barrier()
    return seen


def test_dpm_solver_2s_evaluates_at_the_training_step_nearest_the_lambda_midpoint():
    sched = SPEC.schedule(10)
    stops = np.asarray(sched.timestep_map)
    abar = np.cumprod(1 - BETAS)
    lam = 0.5 * np.log(abar / (1 - abar))
    x = jnp.ones((2, 1))
    for level in (9, 5, 1):
        first, mid = recorded_timesteps(SV.DPMSolverPP2S(chain=CHAIN), sched, x, level)
        top, below = stops[level], stops[level - 1]
        assert first == top and below < mid < top
        target = (lam[top] + lam[below]) / 2
        best = np.min(np.abs(lam[below + 1:top] - target))
        assert abs(lam[mid] - target) <= best + 1e-3  # float32 lambdas on the device
        # without the chain the intermediate point is the next stop
        assert recorded_timesteps(SV.DPMSolverPP2S(), sched, x, level) == [top, below]


def test_churn_evaluates_at_the_training_level_nearest_the_raised_sigma():
    sched = SPEC.schedule(20)
    stops = np.asarray(sched.timestep_map)
    abar = np.cumprod(1 - BETAS)
    sigma = np.sqrt((1 - abar) / abar)
    x = jnp.ones((2, 1))
    churn = 3.0
    for level in (15, 8, 2):
        seen = recorded_timesteps(SV.Heun(s_churn=churn, sigma_max=1e9, chain=CHAIN), sched, x,
                                  level)
        top = stops[level]
        target = sigma[top] * (1 + min(churn / 20, math.sqrt(2) - 1))
        assert seen[0] == top + int(np.argmin(np.abs(sigma[top:] - target))), seen
        assert seen[0] > top and seen[1] == stops[level - 1]
        plain = recorded_timesteps(SV.Heun(sigma_max=1e9, chain=CHAIN), sched, x, level)
        assert plain == [top, stops[level - 1]]


def test_churn_samples_the_data_distribution():
    """A stochastic sampler: its variance is off by a first-order discretisation error (measured
    +0.015, +0.010, +0.005 at 50, 100, 200 steps with s_churn = 0.8 N), so 100 steps and s_noise =
    1 (EDM's 1.003 inflates the noise on purpose)."""
    sched = SPEC.schedule(100)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2048, 2, 2, 1))
    kw = {"config": X0_CFG, "clip_denoised": False, "x_T": x_T}
    plain = SM_core.sample(jax.random.PRNGKey(1), gaussian_denoiser(CHAIN), sched, x_T.shape,
                           sampler="heun", **kw)
    churned = SM_core.sample(
        jax.random.PRNGKey(1), gaussian_denoiser(CHAIN), sched, x_T.shape,
        sampler=SV.Heun(s_churn=80.0, s_tmin=0.05, s_tmax=50.0, chain=CHAIN), **kw)
    churned = np.asarray(churned)
    assert np.mean(np.abs(churned - np.asarray(plain))) > 0.1  # the churn does move samples
    assert abs(churned.mean() - MU) < 0.02 and abs(churned.std() - STD) < 0.02


@pytest.mark.parametrize("name", first_quick(["dpm++3m", "dpm++2s", "unipc", "ipndm"], 1))
def test_repaint_runs_on_the_solvers(name):
    """RePaint walks back up the chain, where the loop restarts a solver's history with `init`
    (tests/test_guidance.py runs RePaint with DDPM and DDIM only)."""
    sched = SPEC.schedule(8)
    known = jax.random.uniform(jax.random.PRNGKey(3), (4, 4, 4, 1), minval=-1, maxval=1)
    mask = jnp.zeros((4, 4, 4, 1)).at[:, 1:3, 1:3].set(1.0)
    kw = {"config": X0_CFG, "clip_denoised": False, "sampler": name}
    repaint = SM_core.sample(jax.random.PRNGKey(0), gaussian_denoiser(CHAIN), sched, known.shape,
                             guidance=G.inpaint(mask, known, jump_length=2, resample_count=3), **kw)
    plain = SM_core.sample(jax.random.PRNGKey(0), gaussian_denoiser(CHAIN), sched, known.shape,
                           guidance=G.inpaint(mask, known), **kw)
    repaint = np.asarray(repaint)
    assert np.all(np.isfinite(repaint))
    np.testing.assert_array_equal(repaint[:, 1:3, 1:3], np.asarray(known)[:, 1:3, 1:3])
    assert np.max(np.abs(repaint - np.asarray(plain))) > 1e-3


def test_solver_settings_are_checked():
    with pytest.raises(ValueError, match="'bh1'"):
        SV.UniPC(variant="bh3")
    with pytest.raises(ValueError, match="1, 2 or 3"):
        SV.UniPC(order=4)
    with pytest.raises(ValueError, match="1, 2, 3 or 4"):
        SV.IPNDM(order=5)
    with pytest.raises(ValueError, match="same DiffusionSpec"):
        SM_core.sample(jax.random.PRNGKey(0), gaussian_denoiser(CHAIN), S.make_schedule("linear", 1000, "5"),
                       (2, 1), sampler=SV.DPMSolverPP2S(chain=CHAIN), config=X0_CFG)

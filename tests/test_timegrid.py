"""Time grids against their closed forms: each stop is the training timestep nearest (brute force
over the whole chain) to the grid's target in its own variable, targets written out from the papers'
formulas; the step count stays exact; guided-diffusion respacing strings are unchanged."""
import numpy as np
import pytest

from diffjax.core import schedules as S
from diffjax.core.spec import DiffusionSpec
from diffjax.core.timegrid import TimeGrid

T = 1000
BETAS = S.get_named_beta_schedule("linear", T)
ABAR = np.cumprod(1 - BETAS)
LAMBDA = 0.5 * np.log(ABAR / (1 - ABAR))
SIGMA = np.sqrt((1 - ABAR) / ABAR)  # EDM's noise level


def brute_nearest(values, targets):
    return np.array([int(np.argmin(np.abs(values - v))) for v in targets])


def test_logsnr_stops_are_nearest_to_uniform_log_snr():
    steps = 12  # coarse enough that no two targets share a timestep
    targets = np.linspace(LAMBDA[-1], LAMBDA[0], steps)
    kept = TimeGrid("logsnr", steps=steps).timesteps(BETAS)
    np.testing.assert_array_equal(kept, np.sort(brute_nearest(LAMBDA, targets)))
    assert kept[0] == 0 and kept[-1] == T - 1
    # each stop's lambda is within half a training step of its uniform target
    gaps = np.abs(np.diff(LAMBDA))
    local_gap = np.maximum(gaps[np.minimum(kept, T - 2)], gaps[np.maximum(kept - 1, 0)])
    assert np.all(np.abs(LAMBDA[kept] - targets[::-1]) <= 0.5 * local_gap + 1e-12)


@pytest.mark.parametrize("rho", [7.0, 3.0, 1.0])
def test_karras_stops_follow_edm_eq_5(rho):
    steps = 10
    i = np.arange(steps)
    s_max, s_min = SIGMA[-1], SIGMA[0]
    targets = (s_max ** (1 / rho) + i / (steps - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    kept = TimeGrid("karras", steps=steps, rho=rho).timesteps(BETAS)
    expected = brute_nearest(SIGMA, targets)
    assert len(set(expected)) == steps  # the check is only meaningful without collisions
    np.testing.assert_array_equal(kept, np.sort(expected))


def test_quadratic_stops():
    steps = 8
    targets = (T - 1) * (np.arange(steps) / (steps - 1)) ** 2
    kept = TimeGrid("quadratic", steps=steps).timesteps(T)
    np.testing.assert_array_equal(kept, np.round(targets).astype(int))


@pytest.mark.parametrize("kind", ["logsnr", "karras", "quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 60, 300, T])
def test_collisions_keep_the_step_count_exact(kind, steps):
    kept = TimeGrid(kind, steps=steps).timesteps(BETAS)
    assert len(kept) == steps and np.all(np.diff(kept) > 0)
    assert kept[-1] == T - 1 and (steps == 1 or kept[0] == 0)
    if steps == T:
        np.testing.assert_array_equal(kept, np.arange(T))


def test_a_bound_grid_goes_through_the_spec():
    spec = DiffusionSpec("cosine", T)
    grid = TimeGrid("karras", steps=18, betas=spec.training_betas())
    sched = spec.schedule(grid)
    np.testing.assert_array_equal(sched.timestep_map, grid.timesteps(spec.training_betas()))
    assert sched.num_timesteps == 18
    with pytest.raises(ValueError, match="betas=spec.training_betas"):
        spec.schedule(TimeGrid("logsnr", steps=18))
    with pytest.raises(ValueError, match="1000-step chain, not of 500"):
        grid.timesteps(500)


def test_parse_and_respacing_strings():
    assert TimeGrid.parse("logsnr20") == TimeGrid("logsnr", steps=20)
    assert TimeGrid.parse("karras7") == TimeGrid("karras", steps=7)
    assert TimeGrid.parse("quadratic5") == TimeGrid("quadratic", steps=5)
    assert TimeGrid.parse(25) == TimeGrid("uniform", steps=25)
    assert TimeGrid.parse(None) == TimeGrid()
    for text in ("250", "10,15,20", "ddim25", "fast27"):
        np.testing.assert_array_equal(TimeGrid.parse(text).timesteps(T),
                                      sorted(S.space_timesteps(T, text)))
    with pytest.raises(ValueError, match="step count after 'logsnr'"):
        TimeGrid.parse("logsnr")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TimeGrid("karras", steps=0)
    with pytest.raises(ValueError, match="at most 1000 stops"):
        TimeGrid("quadratic", steps=1001).timesteps(T)


def test_vp_marginals_on_host_and_device():
    alpha, sigma, lam = S.vp_marginals(ABAR)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(-lam), SIGMA, rtol=1e-10)
    sched = S.make_schedule("linear", T)
    _, _, lam32 = S.vp_marginals(sched.alphas_cumprod)
    np.testing.assert_allclose(lam32, LAMBDA, atol=2e-3)  # float32 tables near abar = 1
    _, _, at_data = S.vp_marginals(np.array([1.0]))
    assert at_data[0] == np.inf

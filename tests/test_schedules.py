"""Schedules and respacing against guided-diffusion's own arrays (diffusion.npz) and definitions."""
import math

import numpy as np
import pytest

from diffjax.core import schedules as S
from diffjax.compat import guided_diffusion as gdc

GOLDEN_SCHEDULES = {
    "a_linear1000": dict(noise_schedule="linear"),
    "b_cosine1000": dict(noise_schedule="cosine"),
    "c_cosine_ddim25": dict(noise_schedule="cosine", timestep_respacing="ddim25"),
    "d_linear_r50": dict(noise_schedule="linear", timestep_respacing="50"),
}

# The tables that go through np.log. +, -, *, / and sqrt are correctly rounded on every CPU; NumPy's
# log is not the same function everywhere: on AVX-512 CPUs (where the golden vectors were written)
# it is Intel's SVML, elsewhere the C library's. They differ by one unit in the last place on ~2 %
# of log(1 - alphas_cumprod) (19 of the linear schedule's 1000; the C library's value was the
# correctly rounded one in 18). GD's own code run on the same machine gives the same as ours.
LOG_TABLES = ("log_one_minus_alphas_cumprod", "posterior_log_variance_clipped")


@pytest.mark.parametrize("name", sorted(GOLDEN_SCHEDULES))
def test_compat_tables_equal_gd_float64(golden, name):
    g = golden("diffusion")
    gd = gdc.create_gaussian_diffusion(steps=1000, learn_sigma=True, **GOLDEN_SCHEDULES[name])
    for table in S.TABLE_NAMES:
        ref = g[f"sched.{name}.{table}"]
        assert ref.dtype == np.float64
        if table in LOG_TABLES:
            np.testing.assert_array_max_ulp(getattr(gd, table), ref, maxulp=1)
        else:  # Same float64 operations in the same order: bit-identical, not merely close.
            np.testing.assert_array_equal(getattr(gd, table), ref, err_msg=table)
    np.testing.assert_array_equal(gd.timestep_map, g[f"sched.{name}.timestep_map"])
    assert gd.num_timesteps == len(g[f"sched.{name}.betas"])


@pytest.mark.parametrize("name", sorted(GOLDEN_SCHEDULES))
def test_device_schedule_is_float32_cast_of_gd(golden, name):
    g = golden("diffusion")
    kw = GOLDEN_SCHEDULES[name]
    sched = S.make_schedule(kw["noise_schedule"], 1000, kw.get("timestep_respacing"))
    for table in S.TABLE_NAMES:
        got = np.asarray(getattr(sched, table))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, g[f"sched.{name}.{table}"].astype(np.float32))
    np.testing.assert_array_equal(sched.timestep_map, g[f"sched.{name}.timestep_map"])
    assert sched.original_num_steps == 1000


def test_space_timesteps_matches_gd(golden):
    g = golden("diffusion")
    keys = g.keys("fn.space_timesteps.")
    assert len(keys) == 9
    for key in keys:
        _, _, total, spec = key.split(".")
        got = gdc.space_timesteps(int(total), spec.replace("_", ","))
        assert isinstance(got, set)
        np.testing.assert_array_equal(sorted(got), g[key], err_msg=key)


def test_cosine_schedule_follows_its_definition():
    # Nichol & Dhariwal eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), s=0.008,
    # beta_t = 1 - abar(t)/abar(t-1) clipped to 0.999.
    T = 1000
    f = lambda i: math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = S.get_named_beta_schedule("cosine", T)
    expected = np.minimum([1 - f(i + 1) / f(i) for i in range(T)], 0.999)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas.max() == 0.999 and betas[-1] == 0.999


def test_linear_schedule_stretches_with_T():
    b1000 = S.get_named_beta_schedule("linear", 1000)
    assert b1000[0] == pytest.approx(1e-4) and b1000[-1] == pytest.approx(0.02)
    b4000 = S.get_named_beta_schedule("linear", 4000)
    assert b4000[0] == pytest.approx(2.5e-5) and b4000[-1] == pytest.approx(0.005)


def test_full_respacing_is_the_identity():
    full = S.make_schedule("cosine", 1000)
    same = S.make_schedule("cosine", 1000, "1000")
    for table in S.TABLE_NAMES + ("timestep_map",):
        np.testing.assert_array_equal(getattr(full, table), getattr(same, table))
    np.testing.assert_array_equal(full.timestep_map, np.arange(1000))
    # and the respaced betas equal the original ones up to float64 rounding
    np.testing.assert_allclose(
        S.respace_betas(S.get_named_beta_schedule("cosine", 1000), range(1000))[0],
        S.get_named_beta_schedule("cosine", 1000),
        rtol=1e-12,
    )


def test_respaced_chain_keeps_alpha_bar_of_kept_steps():
    base = S.schedule_tables(S.get_named_beta_schedule("linear", 1000))
    sched = S.make_schedule("linear", 1000, "10,15,20")
    kept = np.asarray(sched.timestep_map)
    assert len(kept) == 45
    np.testing.assert_allclose(
        np.asarray(sched.alphas_cumprod), base["alphas_cumprod"][kept].astype(np.float32),
        rtol=1e-6,
    )


def test_fast27_is_glides_schedule():
    steps = sorted(S.space_timesteps(1000, "fast27"))
    assert len(steps) == 27
    base = sorted(S.space_timesteps(1000, "10,10,3,2,2"))
    assert base[-1] == 999 and 999 not in steps and 997 in steps
    assert sorted(set(base) - {999} | {997}) == steps


def test_user_betas():
    betas = np.full(10, 0.1)
    sched = S.make_schedule(betas)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), 0.9 ** np.arange(1, 11), rtol=1e-6)
    assert sched.num_timesteps == 10


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: S.make_schedule("quadratic"), "'linear', 'cosine'"),
        (lambda: S.space_timesteps(10, "ddim7"), "no integer stride gives exactly 7 of 10"),
        (lambda: S.space_timesteps(10, "5,6"), "section 1 spans 5 of the 10 steps and cannot hold 6"),
        (lambda: S.space_timesteps(100, "200"), "cannot hold 200"),
        (lambda: S.space_timesteps(100, "fast30"), "only 'fast27'"),
        (lambda: S.space_timesteps(100, "ten"), "'ten' is not understood"),
        (lambda: S.make_schedule([0.1, 0.0, 0.2]), "betas[1] = 0.0"),
        (lambda: S.make_schedule("linear", 0), "positive integer, got 0"),
    ],
)
def test_bad_schedules_raise_clear_errors(call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)

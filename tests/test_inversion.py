"""DDIM inversion to any level t and decoding from t, against closed forms and exact round trips.

Truths: (1) for data that is one known image x0, the exact noise predictor eps(x_t) = (x_t -
sqrt(abar_t) x0) / sqrt(1 - abar_t) makes the DDIM path a straight line, so the latent at every t
is known in closed form and decoding returns x0; (2) for x0 ~ N(mu, s^2) with the exact
E[x0 | x_t], the probability-flow ODE maps x0 to sqrt(abar_t s^2 + 1 - abar_t) (x0 - mu) / s +
sqrt(abar_t) mu at level t, which the inversion approaches as the steps shrink; (3) with the
fixed-point iterations the inversion is the exact inverse of the decoding steps for any denoiser,
so invert-to-t then decode-from-t returns x0 to rounding (float64: 1e-12)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import samplers as SM
from diffjax.core import schedules as S

MU, STD = 0.3, 0.5
X0_CFG = D.DiffusionConfig(mean_type="start_x", var_type="fixed_small")
EPS_CFG = D.DiffusionConfig(mean_type="epsilon", var_type="fixed_small")


def abar_table(sched):
    """alpha-bar indexed by the ORIGINAL timestep (what the model is called with)."""
    return jnp.zeros(sched.original_num_steps, sched.alphas_cumprod.dtype).at[
        sched.timestep_map].set(sched.alphas_cumprod)


def per_example(values, x):
    return values.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(sched, bend=False):
    """E[x0 | x_t] for x0 ~ N(MU, STD^2); bend=True adds 0.3 (1 - abar) tanh(x0 - MU): the exact
    predictor of no data, but a smooth nonlinear one, the identity at the data end."""
    table = abar_table(sched)

    def model_fn(x, t):
        abar = per_example(table[t], x)
        gain = STD**2 * jnp.sqrt(abar) / (abar * STD**2 + 1 - abar)
        x0 = MU + gain * (x - jnp.sqrt(abar) * MU)
        return x0 + 0.3 * (1 - abar) * jnp.tanh(x0 - MU) if bend else x0

    return model_fn


def point_mass_noise_predictor(sched, image):
    """The true noise of x_t for data that is always `image`."""
    table = abar_table(sched)

    def model_fn(x, t):
        abar = per_example(table[t], x)
        return (x - jnp.sqrt(abar) * image) / jnp.sqrt(1 - abar)

    return model_fn


def context(sched, model_fn, config=X0_CFG):
    return SM.Context(sched, {}, False, G.chain(), config, model_fn)


def invert(ctx, x0, t_stop, iterations=0):
    return jax.jit(lambda x: SM.ddim_invert(ctx, x, t_stop=t_stop,
                                            fixed_point_iterations=iterations))(x0)


def decode(ctx, x_t, t_stop):
    if t_stop == -1:
        return x_t
    return jax.jit(lambda x: SM.sample_loop(ctx, SM.DDIM(), x, jax.random.PRNGKey(0),
                                            start_level=t_stop))(x_t)


def test_point_mass_data_inverts_along_a_straight_line_and_decodes_back():
    sched = S.make_schedule("linear", 1000, "20")
    image = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4, 2), minval=-1, maxval=1)
    ctx = context(sched, point_mass_noise_predictor(sched, image), EPS_CFG)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    # From the data the first step takes eps at level 0: e = (1 - sqrt(abar_0)) x0 / sqrt(1 - abar_0);
    # the path through (x0, e) is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e.
    e = (1 - np.sqrt(abar[0])) * np.asarray(image) / np.sqrt(1 - abar[0])
    for t_stop in (-1, 0, 7, 19):
        latent = invert(ctx, image, t_stop)
        expected = image if t_stop == -1 else np.sqrt(abar[t_stop]) * image + np.sqrt(1 - abar[t_stop]) * e
        np.testing.assert_allclose(latent, expected, atol=1e-5)
        np.testing.assert_allclose(decode(ctx, latent, t_stop), image, atol=1e-5)


@pytest.mark.parametrize("t_stop", [9, 24, 49])
def test_explicit_and_fixed_point_inversions_follow_the_exact_flow(t_stop):
    """At 50 and 100 steps, both inversions land near the exact ODE map of x0 to level t_stop, and
    the error halves with the step (first-order schemes)."""
    x0 = MU + STD * jax.random.normal(jax.random.PRNGKey(3), (256, 2, 2, 1))
    for iterations in (0, 4):
        errors = []
        for scale in (1, 2):
            sched = S.make_schedule("cosine", 1000, str(50 * scale))
            level = (t_stop + 1) * scale - 1  # the same noise level on the finer grid
            abar = float(sched.alphas_cumprod[level])
            exact = np.sqrt(abar * STD**2 + 1 - abar) * (np.asarray(x0) - MU) / STD + np.sqrt(abar) * MU
            latent = invert(context(sched, gaussian_denoiser(sched)), x0, level, iterations)
            errors.append(np.abs(np.asarray(latent) - exact).max())
        assert errors[0] < 0.15 and 1.6 < errors[0] / errors[1] < 2.6, (iterations, errors)


@pytest.mark.parametrize("schedule, steps, bend", [("cosine", 10, False), ("linear", 25, True)])
def test_fixed_point_inversion_then_decoding_returns_the_data(schedule, steps, bend):
    """The exact Gaussian denoiser on 10 long cosine steps, a nonlinear one on 25 linear steps."""
    sched = S.make_schedule(schedule, 1000, str(steps))
    x0 = MU + STD * jax.random.normal(jax.random.PRNGKey(3), (64, 4, 4, 1))
    ctx = context(sched, gaussian_denoiser(sched, bend))
    for t_stop in (steps // 2, steps - 1):
        latent = invert(ctx, x0, t_stop, iterations=12)
        np.testing.assert_allclose(decode(ctx, latent, t_stop), x0, rtol=0, atol=1e-5)
    # without the iterations the explicit scheme leaves the first-order error of each step
    explicit = decode(ctx, invert(ctx, x0, steps - 1), steps - 1)
    assert np.abs(np.asarray(explicit) - np.asarray(x0)).max() > 1e-3


def float64_schedule(name: str, steps: int) -> S.Schedule:
    """make_schedule(name, 1000, str(steps)) with float64 tables (call under jax.enable_x64):
    float32 tables are each rounded on their own, which alone leaves ~1e-7 between them."""
    timestep_map = np.asarray(S.make_schedule(name, 1000, str(steps)).timestep_map)
    betas, _ = S.respace_betas(S.get_named_beta_schedule(name, 1000), timestep_map)
    return S.Schedule(**{k: jnp.asarray(v, jnp.float64) for k, v in S.schedule_tables(betas).items()},
                      timestep_map=jnp.asarray(timestep_map, jnp.int32), original_num_steps=1000)


def test_fixed_point_inversion_is_exact_in_float64():
    with jax.enable_x64(True):
        sched = float64_schedule("cosine", 10)
        x0 = MU + STD * jax.random.normal(jax.random.PRNGKey(3), (64, 4, 4, 1), jnp.float64)
        ctx = context(sched, gaussian_denoiser(sched, bend=True))
        for t_stop in (4, 9):
            latent = invert(ctx, x0, t_stop, iterations=40)
            assert latent.dtype == jnp.float64
            np.testing.assert_allclose(decode(ctx, latent, t_stop), x0, rtol=0, atol=1e-12)


def test_levels_are_checked():
    sched = S.make_schedule("linear", 1000, "10")
    ctx = context(sched, gaussian_denoiser(sched))
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="t_stop=10 is not a level"):
        SM.ddim_invert(ctx, x, t_stop=10)
    with pytest.raises(ValueError, match="start_level=-1 is not a level"):
        SM.sample_loop(ctx, SM.DDIM(), x, jax.random.PRNGKey(0), start_level=-1)
    # decoding from the top level is the plain loop
    full = SM.sample_loop(ctx, SM.DDIM(), x + 1, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(
        SM.sample_loop(ctx, SM.DDIM(), x + 1, jax.random.PRNGKey(0), start_level=9), full)

"""Samplers against closed forms: for Gaussian data x0 ~ N(mu, s^2 I) the exact x0-predictor is
E[x0 | x_t] = mu + s^2 sqrt(abar) / (abar s^2 + 1 - abar) (x_t - sqrt(abar) mu), and the
probability-flow ODE carries x at level T-1 to exactly mu + s z, z = (x - sqrt(abar_T) mu) /
sqrt(abar_T s^2 + 1 - abar_T). Also: one compilation per shape, the progress bar, inversion,
device sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import samplers as SM
from diffjax.core import schedules as S
from diffjax.core import samplers as SM_core  # the loop itself (diffjax.sample takes a model)
from tests._gaussian import MU, STD, X0_CFG, exact_ode_end, gaussian_denoiser


def _run(sampler, steps, x_T, key=jax.random.PRNGKey(1), guidance=None):
    sched = S.make_schedule("cosine", 1000, str(steps))
    out = SM_core.sample(key, gaussian_denoiser(sched), sched, x_T.shape, sampler=sampler,
                         config=X0_CFG, clip_denoised=False, x_T=x_T, guidance=guidance)
    return sched, np.asarray(out)


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpm++2m", 2), ("heun", 2)])
def test_ode_samplers_converge_to_the_exact_flow_at_their_order(sampler, order):
    """The error to the exact ODE solution falls as steps grow, by ~2^order per doubling."""
    x_T = jax.random.normal(jax.random.PRNGKey(0), (512, 2, 2, 1))
    errors = []
    for steps in (10, 25, 50, 100):
        sched, out = _run(sampler, steps, x_T)
        errors.append(np.max(np.abs(out - exact_ode_end(sched, np.asarray(x_T)))))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    ratio = errors[-2] / errors[-1]
    assert (1.6 < ratio < 2.6) if order == 1 else ratio > 3.5, (ratio, errors)
    assert errors[-1] < {"ddim": 5e-2, "dpm++2m": 1e-2, "heun": 1e-3}[sampler], errors
    # ... hence the right mean and variance
    assert abs(out.mean() - MU) < 0.05 and abs(out.std() - STD) < 0.05


def test_second_order_solvers_beat_ddim():
    x_T = jax.random.normal(jax.random.PRNGKey(0), (256, 2, 2, 1))
    err = {}
    for sampler in ("ddim", "dpm++2m", "heun"):
        sched, out = _run(sampler, 50, x_T)
        err[sampler] = np.max(np.abs(out - exact_ode_end(sched, np.asarray(x_T))))
    assert err["dpm++2m"] < err["ddim"] / 1.5 and err["heun"] < err["ddim"] / 10, err


def test_ancestral_sampler_matches_the_data_distribution():
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4096, 2, 2, 1))
    _, out = _run("ddpm", 100, x_T)
    assert abs(out.mean() - MU) < 0.02
    assert abs(out.std() - STD) < 0.02
    _, out = _run(SM.DDIM(eta=1.0), 100, x_T)
    assert abs(out.mean() - MU) < 0.02 and abs(out.std() - STD) < 0.02


def test_ddim_inversion_round_trips():
    sched = S.make_schedule("cosine", 1000, "200")
    x0 = MU + STD * jax.random.normal(jax.random.PRNGKey(3), (8, 2, 2, 1))
    ctx = SM.Context(sched, {}, False, G.chain(), X0_CFG, gaussian_denoiser(sched))
    latent = jax.jit(lambda x: SM.ddim_invert(ctx, x))(x0)
    # the exact flow maps x0 to sqrt(abar s^2 + 1 - abar) (x0 - mu) / s + sqrt(abar) mu
    abar = float(sched.alphas_cumprod[-1])
    expected = np.sqrt(abar * STD**2 + 1 - abar) * (np.asarray(x0) - MU) / STD + np.sqrt(abar) * MU
    np.testing.assert_allclose(latent, expected, atol=2e-2)
    back = jax.jit(lambda x: SM.sample_loop(ctx, SM.DDIM(), x, jax.random.PRNGKey(0)))(latent)
    np.testing.assert_allclose(back, x0, atol=2e-2)


def test_changing_traced_settings_never_recompiles():
    sched = S.make_schedule("linear", 100, "10")
    variables = {"w": jnp.float32(0.1)}

    def apply(v, x, t, y=None):
        return jnp.concatenate([v["w"] * x + 0.01 * y[:, None, None, None], 0 * x], -1)

    cfg = D.DiffusionConfig(var_type="learned_range")
    mask = jnp.zeros((4, 8, 8, 1))
    known = jnp.zeros((4, 8, 8, 3))
    logits = lambda x, t: jnp.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], -1)  # noqa: E731
    before = SM._sample_jit._cache_size()
    for i, sampler in enumerate([SM.DDIM(eta=0.0), SM.DDIM(eta=0.7)]):
        guidance = G.chain(
            G.classifier(logits, scale=1.0 + i),
            G.classifier_free(3.0 - i, {"y": jnp.zeros(4, jnp.int32)}),
            G.ilvr(known + i, 2, t_range=(i, 9)),
            G.inpaint(mask + 0.5 * i, known - i),
        )
        SM_core.sample(jax.random.PRNGKey(i), (apply, {"w": variables["w"] * (i + 1)}), sched,
                       (4, 8, 8, 3), sampler=sampler, guidance=guidance, config=cfg,
                       model_kwargs={"y": jnp.arange(4) + i}, clip_denoised=bool(i))
    assert SM._sample_jit._cache_size() - before == 1


def test_progress_bar_counts_every_step(capfd):
    sched = S.make_schedule("cosine", 100, "7")
    for _ in range(2):
        SM_core.sample(jax.random.PRNGKey(0), gaussian_denoiser(sched), sched, (2, 2, 2, 1),
                       config=X0_CFG, progress=True)
        jax.effects_barrier()
    err = capfd.readouterr().err
    assert err.count("7/7") >= 2


def test_batch_is_sharded_across_devices():
    assert len(jax.devices()) == 4
    sched = S.make_schedule("cosine", 100, "5")
    out = SM_core.sample(jax.random.PRNGKey(0), gaussian_denoiser(sched), sched, (8, 2, 2, 1),
                         config=X0_CFG)
    assert len(out.sharding.device_set) == 4


def test_unknown_sampler():
    with pytest.raises(ValueError, match="'ddpm', 'ddim', 'dpm\\+\\+2m', 'heun'"):
        SM.get_sampler("euler")

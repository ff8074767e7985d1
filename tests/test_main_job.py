"""The quick start's main job (`python -m diffjax`) and the closed-form denoiser it evaluates."""
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.cli import check as main_job
from diffjax.core import diffusion as D
from diffjax.core import schedules as S


def test_posterior_mean_denoiser_is_bayes_optimal():
    """At low noise E[x0 | x_t] is the data image x_t came from; at t = T-1 of a cosine chain
    (abar ~ 0) it is the data mean."""
    sched = S.make_schedule("cosine", 100, "20")
    data = jax.random.uniform(jax.random.PRNGKey(0), (5, 4, 4, 1), minval=-1, maxval=1)
    fn = main_job.posterior_mean_denoiser(sched, data)
    t = jnp.array([0, 19])
    x_t = D.q_sample(sched, data[:2], t, 0.01 * jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1)))
    out = fn(x_t, D.model_timesteps(sched, D.DiffusionConfig(), t))
    np.testing.assert_allclose(out[0], data[0], atol=1e-5)
    np.testing.assert_allclose(out[1], data.mean(0), atol=1e-3)


def test_main_job_runs_and_reports_a_bound_above_the_floor(capsys):
    main_job.main(["--images", "4", "--size", "4"])
    lines = capsys.readouterr().out.splitlines()
    floor = float(lines[1].split("=")[1].split()[0])
    assert floor == np.log2(4) / 16
    rows = [line.split() for line in lines[4:] if line.strip()]
    assert len(rows) == 5
    for row in rows:
        assert float(row[-2]) > floor  # a variational bound cannot beat the data's entropy

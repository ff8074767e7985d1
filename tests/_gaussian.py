"""Closed forms for Gaussian data x0 ~ N(MU, STD^2 I), shared by the sampler and solver tests.

The exact x0-predictor is E[x0 | x_t] = MU + STD^2 sqrt(abar) / (abar STD^2 + 1 - abar)
(x_t - sqrt(abar) MU), and the probability-flow ODE keeps z = (x - sqrt(abar) MU) /
sqrt(abar STD^2 + 1 - abar) fixed: it carries x at level T-1 to x = sqrt(abar) MU +
sqrt(abar STD^2 + 1 - abar) z at every level, and to exactly MU + STD z at the data."""
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion as D

MU, STD = 0.3, 0.5
X0_CFG = D.DiffusionConfig(mean_type="start_x", var_type="fixed_small")


def gaussian_denoiser(sched):
    """The exact E[x0 | x_t] for x0 ~ N(MU, STD^2), called with ORIGINAL timesteps: those of
    `sched` (give the training chain itself, `spec.schedule()`, to cover every training step)."""
    abar_of = jnp.zeros(sched.original_num_steps).at[sched.timestep_map].set(sched.alphas_cumprod)

    def model_fn(x, t):
        abar = abar_of[t].reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
        gain = STD**2 * jnp.sqrt(abar) / (abar * STD**2 + 1 - abar)
        return MU + gain * (x - jnp.sqrt(abar) * MU)

    return model_fn


def _flow_invariant(sched, x_T):
    abar = float(sched.alphas_cumprod[-1])
    return (np.asarray(x_T, np.float64) - np.sqrt(abar) * MU) / np.sqrt(abar * STD**2 + 1 - abar)


def exact_ode_end(sched, x_T):
    """Where the probability-flow ODE carries x_T (at the schedule's top level) at the data."""
    return MU + STD * _flow_invariant(sched, x_T)


def exact_sample(sched, x_T):
    """What an exact solver returns here: the flow to level 0, then the x0 prediction there (the
    step to the data of every sampler). It differs from `exact_ode_end` by the factor
    STD sqrt(abar_0) / sqrt(abar_0 STD^2 + 1 - abar_0) on z (1 - 5e-5 on a 4000-step linear chain),
    which sets a floor to the error against the ODE's end."""
    abar = float(sched.alphas_cumprod[0])
    gain = STD**2 * np.sqrt(abar) / np.sqrt(abar * STD**2 + 1 - abar)
    return MU + gain * _flow_invariant(sched, x_T)

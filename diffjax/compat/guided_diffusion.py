"""openai/guided-diffusion's vocabulary on top of diffjax's functional core.

A thin façade for porting scripts line by line and for checking every number against the
original code: no maths lives here (it is in `diffjax.schedules` / `diffjax.diffusion`). Images
are NHWC; timesteps int [B]; randomness is explicit (`noise=` / `key=` where GD draws its own).
`model_fn(x, t, **model_kwargs)` receives ORIGINAL timesteps (float t * 1000 / T with
`rescale_timesteps=True`), as guided-diffusion's `_WrappedModel` passes them.
See ../shared/design/compat_guided_diffusion.md for the whole surface.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from diffjax import diffusion as D
from diffjax import schedules as S
from diffjax.diffusion import (  # noqa: F401  (GD's free functions, same names and semantics)
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from diffjax.schedules import get_named_beta_schedule, space_timesteps  # noqa: F401


class GaussianDiffusion:
    """A (possibly respaced) diffusion with GD's attributes and method signatures.

    Attributes: the float64 numpy tables of GD (`betas`, `alphas_cumprod`, ...), `num_timesteps`,
    `original_num_steps`, `timestep_map`; `schedule` (the float32 `diffjax.schedules.Schedule`
    pytree) and `config` (`diffjax.diffusion.DiffusionConfig`) for the functional API.
    All methods are jit-compatible.
    """

    def __init__(self, *, betas, use_timesteps=None, model_mean_type="epsilon",
                 model_var_type="fixed_large", loss_type="mse", rescale_timesteps=False):
        betas = np.asarray(betas, dtype=np.float64)
        if use_timesteps is None:
            use_timesteps = range(len(betas))
        new_betas, timestep_map = S.respace_betas(betas, use_timesteps)
        for name, value in S.schedule_tables(new_betas).items():
            if name in S.TABLE_NAMES:
                setattr(self, name, value)
        self.num_timesteps = len(new_betas)
        self.original_num_steps = len(betas)
        self.timestep_map = timestep_map
        self.use_timesteps = set(int(t) for t in timestep_map)
        self.rescale_timesteps = rescale_timesteps
        self.config = D.DiffusionConfig(
            mean_type=model_mean_type,
            var_type=model_var_type,
            loss_type=loss_type,
            rescale_timesteps=rescale_timesteps,
        )
        self.schedule = S.Schedule.from_betas(new_betas, timestep_map, len(betas))

    # -- helpers -------------------------------------------------------------------------------
    def _model(self, model_fn, model_kwargs):
        """model_fn with the conditioning bound: (x, model_t) -> output."""
        return functools.partial(model_fn, **(model_kwargs or {}))

    def _output(self, model_fn, x, t, model_kwargs):
        return self._model(model_fn, model_kwargs)(
            x, D.model_timesteps(self.schedule, self.config, t)
        )

    @staticmethod
    def _need(value, name, what):
        if value is None:
            raise ValueError(
                f"{name}= is required: diffjax has no global random state, pass {what} explicitly"
            )
        return value

    # -- forward process -----------------------------------------------------------------------
    def q_mean_variance(self, x_start, t):
        return D.q_mean_variance(self.schedule, x_start, t)

    def q_sample(self, x_start, t, noise=None):
        noise = self._need(noise, "noise", "standard normal noise of x_start's shape")
        return D.q_sample(self.schedule, x_start, t, noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        return D.q_posterior_mean_variance(self.schedule, x_start, x_t, t)

    # -- reverse process -----------------------------------------------------------------------
    def p_mean_variance(self, model_fn, x, t, clip_denoised=True, denoised_fn=None,
                        model_kwargs=None):
        return D.p_mean_variance(
            self.schedule, self.config, self._output(model_fn, x, t, model_kwargs), x, t,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        )

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return D.predict_xstart_from_eps(self.schedule, x_t, t, eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return D.predict_eps_from_xstart(self.schedule, x_t, t, pred_xstart)

    # -- losses --------------------------------------------------------------------------------
    def training_losses(self, model_fn, x_start, t, model_kwargs=None, noise=None):
        noise = self._need(noise, "noise", "standard normal noise of x_start's shape")
        terms = D.training_losses(
            self.schedule, self.config, self._model(model_fn, model_kwargs), x_start, t, noise
        )
        terms.pop("objective")
        return terms

    def _vb_terms_bpd(self, model_fn, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        return D.vb_terms_bpd(
            self.schedule, self.config, self._output(model_fn, x_t, t, model_kwargs),
            x_start, x_t, t, clip_denoised=clip_denoised,
        )

    def _prior_bpd(self, x_start):
        return D.prior_bpd(self.schedule, x_start)

    def calc_bpd_loop(self, model_fn, x_start, clip_denoised=True, model_kwargs=None, *, key=None):
        """GD's calc_bpd_loop; the per-timestep [B, T] arrays are in GD's order (column 0 is
        t = T-1). `key` draws the noise of every timestep."""
        key = self._need(key, "key", "a jax.random key")
        out = D.calc_bpd_loop(
            self.schedule, self.config, self._model(model_fn, model_kwargs), x_start, key,
            clip_denoised=clip_denoised,
        )
        for name in ("vb", "xstart_mse", "mse"):
            out[name] = jnp.flip(out[name], axis=1)
        return out


SpacedDiffusion = GaussianDiffusion


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
) -> GaussianDiffusion:
    """GD's script_util.create_gaussian_diffusion: same arguments, same defaults, same choices
    (learn_sigma -> learned-range variance, taking precedence over sigma_small as in GD)."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    return GaussianDiffusion(
        betas=betas,
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        model_mean_type="start_x" if predict_xstart else "epsilon",
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )

"""openai/guided-diffusion's vocabulary on top of diffjax's functional core.

A thin façade for porting scripts line by line and for checking every number against the
original code: no maths lives here (it is in `diffjax.core.schedules` / `diffjax.core.diffusion`). Images
are NHWC; timesteps int [B]; randomness is explicit (`noise=` / `key=` where GD draws its own).
`model_fn(x, t, **model_kwargs)` receives ORIGINAL timesteps (float t * 1000 / T with
`rescale_timesteps=True`), as guided-diffusion's `_WrappedModel` passes them.
See ../shared/design/compat_guided_diffusion.md for the whole surface.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import samplers as SM
from diffjax.core import schedules as S
from diffjax.core.diffusion import (  # noqa: F401  (GD's free functions, same names and semantics)
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from diffjax.core.schedules import get_named_beta_schedule, space_timesteps  # noqa: F401
from diffjax.core.spec import DiffusionSpec
from diffjax.core.timegrid import TimeGrid
from diffjax.compat.native import spec_from_flags
from diffjax.io.torch_pt import UnsafeCheckpointError, read_pt  # noqa: F401
from diffjax.compat.gd_models import (  # noqa: F401  (the models half of the façade)
    build,
    classifier_defaults,
    create_classifier,
    create_model,
    diffusion_defaults,
    load_state_dict,
    model_and_diffusion_defaults,
    sr_create_model,
    sr_model_and_diffusion_defaults,
)
from diffjax.models.layers import timestep_embedding  # noqa: F401


@flax.struct.dataclass
class _CondFn(G.Transform):
    """GD's cond_fn(x, t, **model_kwargs) -> scaled gradient, as a score term (t: the network's
    timestep, as GD's _WrappedModel gives it)."""

    cond_fn: object = flax.struct.field(pytree_node=False)

    def score(self, c):
        return self.cond_fn(c.x, c.t_model, **c.model_kwargs)


@flax.struct.dataclass
class _DenoisedFn(G.Transform):
    """GD's denoised_fn(pred_xstart) -> pred_xstart, as an x0 hook (before clipping, as GD)."""

    denoised_fn: object = flax.struct.field(pytree_node=False)

    def x0(self, c):
        return self.denoised_fn(c.x0)


class GaussianDiffusion:
    """A (possibly respaced) diffusion with GD's attributes and method signatures.

    Attributes: the float64 numpy tables of GD (`betas`, `alphas_cumprod`, ...), `num_timesteps`,
    `original_num_steps`, `timestep_map`; `schedule` (the float32 `diffjax.core.schedules.Schedule`
    pytree) and `config` (`diffjax.core.diffusion.DiffusionConfig`) for the functional API.
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

    @classmethod
    def from_spec(cls, spec: DiffusionSpec, grid=None) -> "GaussianDiffusion":
        """The (respaced to `grid`) diffusion of a native DiffusionSpec."""
        cfg = spec.config
        betas = spec.training_betas()
        return cls(betas=betas, use_timesteps=TimeGrid.parse(grid).timesteps(len(betas)),
                   model_mean_type=cfg.mean_type, model_var_type=cfg.var_type,
                   loss_type=cfg.loss_type, rescale_timesteps=cfg.rescale_timesteps)

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

    def _context(self, model_fn, clip_denoised, denoised_fn, cond_fn, model_kwargs):
        hooks = G.chain(
            _CondFn(cond_fn) if cond_fn is not None else None,
            _DenoisedFn(denoised_fn) if denoised_fn is not None else None,
        )
        return SM.Context(schedule=self.schedule, model_kwargs=dict(model_kwargs or {}),
                          clip_denoised=clip_denoised, guidance=hooks, config=self.config,
                          model_fn=model_fn)

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

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        gradient = cond_fn(x, D.model_timesteps(self.schedule, self.config, t), **(model_kwargs or {}))
        return G.condition_mean(p_mean_var, gradient)

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        gradient = cond_fn(x, D.model_timesteps(self.schedule, self.config, t), **(model_kwargs or {}))
        return G.condition_score(self.schedule, p_mean_var, x, t, gradient)

    # -- sampling ------------------------------------------------------------------------------
    def _step(self, sampler, model_fn, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs,
              noise):
        ctx = self._context(model_fn, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        sample, _, pred_xstart = sampler.step(ctx, sampler.init(x), x, t, None, noise)
        return {"sample": sample, "pred_xstart": pred_xstart}

    def p_sample(self, model_fn, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None, *, noise):
        """x_{t-1} ~ p(x_{t-1} | x_t) with the given standard-normal `noise` (GD's randn_like)."""
        return self._step(SM.DDPM(), model_fn, x, t, clip_denoised, denoised_fn, cond_fn,
                          model_kwargs, noise)

    def ddim_sample(self, model_fn, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0, *, noise=None):
        if noise is None:
            noise = jnp.zeros_like(x) if isinstance(eta, (int, float)) and eta == 0 else \
                self._need(None, "noise", "standard normal noise for eta > 0")
        return self._step(SM.DDIM(eta=eta), model_fn, x, t, clip_denoised, denoised_fn, cond_fn,
                          model_kwargs, noise)

    def ddim_reverse_sample(self, model_fn, x, t, clip_denoised=True, denoised_fn=None,
                            model_kwargs=None, eta=0.0):
        if not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError(f"ddim_reverse_sample is deterministic: eta must be 0.0, got {eta!r}")
        ctx = self._context(model_fn, clip_denoised, denoised_fn, None, model_kwargs)
        sample, pred_xstart = SM.ddim_reverse_step(ctx, x, t)
        return {"sample": sample, "pred_xstart": pred_xstart}

    def _loop(self, sampler, model_fn, shape, noise, clip_denoised, denoised_fn, cond_fn,
              model_kwargs, progress, key, step_noise, deterministic, intermediates):
        shape = tuple(shape)
        if key is None and (noise is None or (step_noise is None and not deterministic)):
            self._need(None, "key", "a jax.random key (or noise= and step_noise=)")
        key = jax.random.PRNGKey(0) if key is None else key  # unused when fully determined
        key_x, key_loop = jax.random.split(key)
        x_T = jax.random.normal(key_x, shape, jnp.float32) if noise is None else noise
        if x_T.shape != shape:
            raise ValueError(f"noise has shape {x_T.shape}, expected shape={shape}")
        ctx = self._context(model_fn, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        out = SM.sample_loop(ctx, sampler, x_T, key_loop, step_noise=step_noise,
                             progress=progress, intermediates=intermediates)
        return out

    def p_sample_loop(self, model_fn, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, progress=False, *, key=None,
                      step_noise=None):
        """Ancestral sampling from x_T = noise (or drawn from key) down to x_0. Per-step noise:
        step_noise[i] at the i-th step (i = 0 is t = T-1), or drawn from key."""
        return self._loop(SM.DDPM(), model_fn, shape, noise, clip_denoised, denoised_fn, cond_fn,
                          model_kwargs, progress, key, step_noise, False, False)

    def p_sample_loop_progressive(self, model_fn, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None,
                                  progress=False, *, key=None, step_noise=None):
        """Per-step {"sample", "pred_xstart"} stacked on a leading axis [T, ...]."""
        return self._loop(SM.DDPM(), model_fn, shape, noise, clip_denoised, denoised_fn, cond_fn,
                          model_kwargs, progress, key, step_noise, False, True)[1]

    def ddim_sample_loop(self, model_fn, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, progress=False, eta=0.0, *, key=None,
                         step_noise=None):
        deterministic = isinstance(eta, (int, float)) and eta == 0
        return self._loop(SM.DDIM(eta=eta), model_fn, shape, noise, clip_denoised, denoised_fn,
                          cond_fn, model_kwargs, progress, key, step_noise, deterministic, False)

    def ddim_sample_loop_progressive(self, model_fn, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None,
                                     progress=False, eta=0.0, *, key=None, step_noise=None):
        deterministic = isinstance(eta, (int, float)) and eta == 0
        return self._loop(SM.DDIM(eta=eta), model_fn, shape, noise, clip_denoised, denoised_fn,
                          cond_fn, model_kwargs, progress, key, step_noise, deterministic, True)[1]

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
    (learn_sigma -> learned-range variance, taking precedence over sigma_small as in GD); the
    flags become a DiffusionSpec in `diffjax.compat.native.spec_from_flags`."""
    spec, grid = spec_from_flags(dict(
        steps=steps, learn_sigma=learn_sigma, sigma_small=sigma_small,
        noise_schedule=noise_schedule, use_kl=use_kl, predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps, rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing))
    return GaussianDiffusion.from_spec(spec, grid)

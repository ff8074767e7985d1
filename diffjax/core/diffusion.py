"""Gaussian diffusion as pure functions over a `Schedule`.

Shapes: images x are [B, H, W, C] (NHWC; any trailing shape works), timesteps t are int [B]
indices into the (respaced) schedule. A model output for a learned variance carries 2C channels
(the mean part first, then the variance values), as in openai/guided-diffusion (GD).

Models are called through `model_fn(x_t, model_t) -> output`, where `model_t = model_timesteps(...)`
is the timestep the network was trained with: the original (pre-respacing) timestep, scaled to
[0, 1000) when `rescale_timesteps` is set (GD's `_WrappedModel`).

Sources: Ho et al. 2020 (DDPM: q, the posterior, the eps parameterisation, the discretised decoder),
Nichol & Dhariwal 2021 (learned-range variance interpolated in log space, the hybrid loss with a
stop-gradient on the mean, L_vlb in bits), Salimans & Ho 2022 (v-prediction).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core.schedules import Schedule

MEAN_TYPES = ("epsilon", "start_x", "previous_x", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
_ALIASES = {
    "eps": "epsilon",
    "x0": "start_x",
    "xstart": "start_x",
    "xprev": "previous_x",
    "hybrid": "mse",  # mse on the mean + vb on the variance, when the variance is learned
}

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """What the model predicts and how it is trained; static (hashable) under jit.

    mean_type: "epsilon" | "start_x" | "previous_x" | "v"
    var_type: "fixed_small" | "fixed_large" | "learned" | "learned_range"
    loss_type: "mse" | "rescaled_mse" | "kl" | "rescaled_kl" (with a learned variance the MSE
        losses add GD's vb term: the hybrid loss)
    rescale_timesteps: feed the model t * 1000 / original_num_steps as a float (improved-diffusion)
    """

    mean_type: str = "epsilon"
    var_type: str = "fixed_large"
    loss_type: str = "mse"
    rescale_timesteps: bool = False

    def __post_init__(self):
        for field, choices in (
            ("mean_type", MEAN_TYPES),
            ("var_type", VAR_TYPES),
            ("loss_type", LOSS_TYPES),
        ):
            value = getattr(self, field)
            canonical = _ALIASES.get(value, value) if isinstance(value, str) else value
            if canonical not in choices:
                raise ValueError(
                    f"{field}={value!r} does not exist: choose one of "
                    f"{', '.join(map(repr, choices))}"
                )
            object.__setattr__(self, field, canonical)

    @property
    def learned_variance(self) -> bool:
        return self.var_type in ("learned", "learned_range")

    @property
    def is_vb(self) -> bool:
        return self.loss_type in ("kl", "rescaled_kl")

    def model_channels(self, channels: int) -> int:
        """Output channels the model must produce for images of `channels` channels."""
        return 2 * channels if self.learned_variance else channels


def extract(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """table[t] [B] reshaped to [B, 1, ..., 1] (ndim dims) for broadcasting against x."""
    values = jnp.take(table, t, axis=0)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def model_timesteps(sched: Schedule, config: DiffusionConfig, t: jnp.ndarray) -> jnp.ndarray:
    """The timestep the network sees: the original timestep of respaced index t, as float
    t * 1000 / original_num_steps with `rescale_timesteps` (GD's _WrappedModel)."""
    original = jnp.take(sched.timestep_map, t, axis=0)
    if config.rescale_timesteps:
        return original.astype(jnp.float32) * (1000.0 / sched.original_num_steps)
    return original


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------- forward process


def q_mean_variance(sched: Schedule, x_start, t):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): (mean, variance, log_variance)."""
    nd = x_start.ndim
    mean = extract(sched.sqrt_alphas_cumprod, t, nd) * x_start
    variance = extract(sched.one_minus_alphas_cumprod, t, nd)
    log_variance = extract(sched.log_one_minus_alphas_cumprod, t, nd)
    return mean, variance, log_variance


def q_sample(sched: Schedule, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, noise ~ N(0, I) of x_start's shape."""
    if noise.shape != x_start.shape:
        raise ValueError(f"noise has shape {noise.shape}, expected x_start's {x_start.shape}")
    nd = x_start.ndim
    return (
        extract(sched.sqrt_alphas_cumprod, t, nd) * x_start
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, nd) * noise
    )


def q_posterior_mean_variance(sched: Schedule, x_start, x_t, t):
    """q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7): (mean, variance, log_variance_clipped); the log
    variance at t=0 (where the variance is 0) is clipped to its t=1 value."""
    nd = x_t.ndim
    mean = extract(sched.posterior_mean_coef1, t, nd) * x_start + extract(
        sched.posterior_mean_coef2, t, nd
    ) * x_t
    variance = extract(sched.posterior_variance, t, nd)
    log_variance = extract(sched.posterior_log_variance_clipped, t, nd)
    return mean, variance, log_variance


# --------------------------------------------------------------------------- parameterisations


def _difference(t, a, x, b, y):
    """a[t] x - b[t] y for tables a, b [T]: the shape of every parameterisation change."""
    return extract(a, t, x.ndim) * x - extract(b, t, x.ndim) * y


def predict_xstart_from_eps(sched: Schedule, x_t, t, eps):
    """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
    return _difference(t, sched.sqrt_recip_alphas_cumprod, x_t, sched.sqrt_recipm1_alphas_cumprod, eps)


def predict_eps_from_xstart(sched: Schedule, x_t, t, pred_xstart):
    """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1)."""
    nd = x_t.ndim
    return (extract(sched.sqrt_recip_alphas_cumprod, t, nd) * x_t - pred_xstart) / extract(
        sched.sqrt_recipm1_alphas_cumprod, t, nd
    )


def predict_xstart_from_xprev(sched: Schedule, x_t, t, xprev):
    """x_0 = (x_{t-1} - coef2 x_t) / coef1, inverting the posterior mean."""
    return _difference(t, sched.recip_posterior_mean_coef1, xprev,
                       sched.posterior_mean_coef2_over_coef1, x_t)


def predict_xstart_from_v(sched: Schedule, x_t, t, v):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, v = sqrt(abar) eps -
    sqrt(1 - abar) x_0)."""
    return _difference(t, sched.sqrt_alphas_cumprod, x_t, sched.sqrt_one_minus_alphas_cumprod, v)


def v_target(sched: Schedule, x_start, t, noise):
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
    return _difference(t, sched.sqrt_alphas_cumprod, noise, sched.sqrt_one_minus_alphas_cumprod,
                       x_start)


def split_model_output(config: DiffusionConfig, model_output, x):
    """(mean part [B, ..., C], variance values [B, ..., C] or None) of a model output."""
    channels = x.shape[-1]
    expected = config.model_channels(channels)
    if model_output.shape[:-1] != x.shape[:-1] or model_output.shape[-1] != expected:
        raise ValueError(
            f"model output has shape {tuple(model_output.shape)}, expected "
            f"{tuple(x.shape[:-1]) + (expected,)}: var_type={config.var_type!r} needs "
            f"{expected} channels ({'mean and variance' if config.learned_variance else 'mean only'}) "
            f"for {channels}-channel images"
        )
    if config.learned_variance:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def model_variance(sched: Schedule, config: DiffusionConfig, var_values, x, t):
    """(variance, log_variance) of p(x_{t-1} | x_t).

    learned: var_values is the log variance. learned_range: var_values v in [-1, 1] interpolates
    the LOG variance between the posterior variance (v=-1) and beta_t (v=+1) (Nichol & Dhariwal
    eq. 15). fixed_small: the posterior variance; fixed_large: beta_t, with the t=0 value replaced
    by the posterior variance at t=1 (a better decoder likelihood, as GD).
    """
    nd = x.ndim
    if config.var_type == "learned":
        return jnp.exp(var_values), var_values
    if config.var_type == "learned_range":
        min_log = extract(sched.posterior_log_variance_clipped, t, nd)
        max_log = extract(sched.log_betas, t, nd)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if config.var_type == "fixed_small":
        tables = sched.posterior_variance, sched.posterior_log_variance_clipped
    else:
        tables = sched.fixed_large_variance, sched.fixed_large_log_variance
    # Broadcastable [B, 1, 1, 1] rather than expanded: callers broadcast against x.
    return extract(tables[0], t, nd), extract(tables[1], t, nd)


def p_mean_variance(
    sched: Schedule,
    config: DiffusionConfig,
    model_output,
    x,
    t,
    clip_denoised=True,
    denoised_fn: Callable | None = None,
):
    """p(x_{t-1} | x_t) from a model output: dict of mean, variance, log_variance, pred_xstart
    (and eps, the noise implied by pred_xstart).

    `denoised_fn(pred_xstart)` is applied before clipping to [-1, 1]; `clip_denoised` may be a
    traced bool. The mean of eps / x0 / v models is the posterior mean at pred_xstart; a
    previous_x model outputs the mean itself.
    """
    mean_out, var_values = split_model_output(config, model_output, x)
    variance, log_variance = model_variance(sched, config, var_values, x, t)

    def process_xstart(x0):
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised is False:
            return x0
        return jnp.where(clip_denoised, jnp.clip(x0, -1, 1), x0)

    if config.mean_type == "previous_x":
        pred_xstart = process_xstart(predict_xstart_from_xprev(sched, x, t, mean_out))
        mean = mean_out
    else:
        if config.mean_type == "start_x":
            raw = mean_out
        elif config.mean_type == "epsilon":
            raw = predict_xstart_from_eps(sched, x, t, mean_out)
        else:
            raw = predict_xstart_from_v(sched, x, t, mean_out)
        pred_xstart = process_xstart(raw)
        mean, _, _ = q_posterior_mean_variance(sched, pred_xstart, x, t)
    return {
        "mean": mean,
        "variance": variance,
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
    }


# --------------------------------------------------------------------------- likelihood terms


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Phi(x) by the tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log P(x) of images on the 8-bit grid of [-1, 1] under N(means, e^(2 log_scales)) integrated
    over each pixel's bin of width 2/255, the outer bins extended to -inf / +inf (DDPM sec. 3.3).
    Probabilities are clamped at 1e-12 before the log. Elementwise, in nats."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_terms_bpd(
    sched: Schedule, config: DiffusionConfig, model_output, x_start, x_t, t, clip_denoised=True
):
    """One term of the variational bound, in bits per dimension: the decoder NLL -log p(x_0 | x_1)
    at t == 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)). Returns dict of output [B]
    and pred_xstart."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(sched, x_start, x_t, t)
    out = p_mean_variance(sched, config, model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    kl = kl / np.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    decoder_nll = mean_flat(jnp.broadcast_to(decoder_nll, x_start.shape)) / np.log(2.0)
    return {"output": jnp.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}


def prior_bpd(sched: Schedule, x_start):
    """KL(q(x_T | x_0) || N(0, I)) in bits per dimension [B]; not learnt, ~0 for a good schedule."""
    t = jnp.full((x_start.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(sched, x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)


# --------------------------------------------------------------------------- training


def training_losses(
    sched: Schedule,
    config: DiffusionConfig,
    model_fn: ModelFn,
    x_start,
    t,
    noise,
    weights=None,
):
    """Per-example training terms at timesteps t [B] with the given noise, as GD.

    kl / rescaled_kl: loss = L_t in bits (x T for rescaled_kl: an estimate of the whole bound).
    mse / rescaled_mse: mse = mean_flat((target - prediction)^2), the target being the noise, x_0,
    the posterior mean or v; with a learned variance loss = mse + vb, where vb is L_t computed on
    a stop-gradient copy of the mean output so that it trains the variance only (Nichol & Dhariwal
    sec. 3.1), scaled by T/1000 for rescaled_mse.

    Returns dict of [B] arrays (loss, and mse / vb where they exist) and `objective`, the scalar to
    minimise: mean(weights * loss) (weights from an importance sampler; default 1).
    """
    x_t = q_sample(sched, x_start, t, noise)
    model_output = model_fn(x_t, model_timesteps(sched, config, t))
    terms = {}
    if config.is_vb:
        split_model_output(config, model_output, x_t)  # channel check with a clear message
        terms["loss"] = vb_terms_bpd(
            sched, config, model_output, x_start, x_t, t, clip_denoised=False
        )["output"]
        if config.loss_type == "rescaled_kl":
            terms["loss"] = terms["loss"] * sched.num_timesteps
    else:
        mean_out, var_values = split_model_output(config, model_output, x_t)
        if var_values is not None:
            frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_values], axis=-1)
            vb = vb_terms_bpd(sched, config, frozen, x_start, x_t, t, clip_denoised=False)
            terms["vb"] = vb["output"]
            if config.loss_type == "rescaled_mse":
                # L_vlb is a sum of T terms; GD's 1000 is the step count the MSE weighting assumed.
                terms["vb"] = terms["vb"] * (sched.num_timesteps / 1000.0)
        if config.mean_type == "previous_x":
            target = q_posterior_mean_variance(sched, x_start, x_t, t)[0]
        elif config.mean_type == "start_x":
            target = x_start
        elif config.mean_type == "epsilon":
            target = noise
        else:
            target = v_target(sched, x_start, t, noise)
        terms["mse"] = mean_flat((target - mean_out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    w = jnp.ones_like(terms["loss"]) if weights is None else weights
    terms["objective"] = jnp.mean(w * terms["loss"])
    return terms


# --------------------------------------------------------------------------- bits per dimension


def calc_bpd_loop(
    sched: Schedule,
    config: DiffusionConfig,
    model_fn: ModelFn,
    x_start,
    key,
    clip_denoised=True,
):
    """The whole variational bound of x_start [B, ...] in bits/dim, one model call per timestep
    (GD's calc_bpd_loop), as one `lax.scan`: jit it as a whole.

    Returns dict of total_bpd [B] = sum_t vb + prior_bpd, prior_bpd [B], and per-timestep vb,
    xstart_mse, mse (of the implied noise) [B, T], with column t holding timestep t (GD stacks
    them from t = T-1 down; `diffjax.compat.guided_diffusion` reverses to match).
    """
    num = sched.num_timesteps
    batch = x_start.shape[0]

    def step(_, inputs):
        t_scalar, step_key = inputs
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(step_key, x_start.shape, x_start.dtype)
        x_t = q_sample(sched, x_start, t, noise)
        model_output = model_fn(x_t, model_timesteps(sched, config, t))
        out = vb_terms_bpd(sched, config, model_output, x_start, x_t, t, clip_denoised)
        eps = predict_eps_from_xstart(sched, x_t, t, out["pred_xstart"])
        return None, (
            out["output"],
            mean_flat((out["pred_xstart"] - x_start) ** 2),
            mean_flat((eps - noise) ** 2),
        )

    keys = jax.random.split(key, num)
    _, (vb, xstart_mse, mse) = jax.lax.scan(step, None, (jnp.arange(num), keys))
    prior = prior_bpd(sched, x_start)
    vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T
    return {
        "total_bpd": vb.sum(axis=1) + prior,
        "prior_bpd": prior,
        "vb": vb,
        "xstart_mse": xstart_mse,
        "mse": mse,
    }

"""The guidance contract and the methods of the literature on it: the context's time convention,
the composition rule, traced scales, each method against its paper's formula on Gaussian data with
the exact denoiser (closed forms written here, in float64 numpy), every method with every sampler,
and the pipeline / command-line surfaces (autoguidance bundles, CLIP guidance)."""
import functools
import json
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import guidance_methods as GM
from diffjax.core import samplers as SM
from diffjax.core import schedules as S
from tests._util import samplers_quick_first

SAMPLERS = ["ddpm", "ddim", "dpm++2m", "heun", "dpm++3m", "dpm++2s", "unipc", "ipndm"]
X0 = D.DiffusionConfig(mean_type="start_x", var_type="fixed_small")
EPS = D.DiffusionConfig(var_type="learned_range")
SCHED = S.make_schedule("cosine", 1000, "10")
KEY = jax.random.PRNGKey(0)
# Gaussian data per label y: x0 ~ N(MEANS[y], STDS[y]^2 I); label 2 is the "unconditional" one.
MEANS, STDS = np.array([0.4, -0.3, 0.05]), np.array([0.5, 0.45, 0.7])
NULL = {"y": jnp.full((1,), 2)}
LABELS = jnp.array([0, 1, 0, 1])


def abar_np(sched, t):
    """alpha-bar at levels t as float64 [B, 1, 1, 1] (the schedule's own float32 values)."""
    return np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)].reshape(-1, 1, 1, 1)


def gaussian_x0(x, abar, mean, std):
    """E[x0 | x_t] for x0 ~ N(mean, std^2 I): mean + std^2 sqrt(abar) / (abar std^2 + 1 - abar)
    (x_t - sqrt(abar) mean); also its gain d E / d x_t."""
    gain = std**2 * np.sqrt(abar) / (abar * std**2 + 1 - abar)
    return mean + gain * (x - np.sqrt(abar) * mean), gain


def gaussian_model(sched, means=MEANS, stds=STDS):
    """The exact x0-predictor of label y (a start_x network), at ORIGINAL timesteps."""
    abar_of = jnp.zeros(sched.original_num_steps).at[sched.timestep_map].set(sched.alphas_cumprod)
    means, stds = jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)

    def model_fn(x, t, y):
        abar = abar_of[t].reshape(-1, 1, 1, 1)
        mean, std = means[y].reshape(-1, 1, 1, 1), stds[y].reshape(-1, 1, 1, 1)
        return mean + std**2 * jnp.sqrt(abar) / (abar * std**2 + 1 - abar) * (x - jnp.sqrt(abar) * mean)

    return model_fn


GAUSS = gaussian_model(SCHED)


def denoise_at(guidance, x, t, model_fn=GAUSS, config=X0, sched=SCHED, mode="score", clip=False,
               y=LABELS):
    ctx = SM.Context(sched, {"y": y}, clip, guidance, config, model_fn)
    return SM.denoise(ctx, x, jnp.full((x.shape[0],), t), mode)


def toy_eps(x, t, y):
    """A conditional eps-model with learned-range variance channels (nonlinear in x)."""
    scale = 0.5 + 0.1 * jnp.tanh(t.astype(jnp.float32) / 500).reshape(-1, 1, 1, 1)
    eps = scale * jnp.tanh(x) + 0.3 * (y.astype(jnp.float32).reshape(-1, 1, 1, 1) - 0.5)
    return jnp.concatenate([eps, jnp.tanh(x.mean(-1, keepdims=True)) * jnp.ones_like(x) * 0.3], -1)


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("rescale", [False, True])
def test_context_time_convention(rescale):
    """t is the level, t_model the network's timestep, abar = alphas_cumprod[t] (1 at the data),
    noise_level = sqrt((1 - abar) / abar), log_snr = -log(noise_level); `at` inverts
    model_timesteps; eps = (x - alpha x0) / sigma."""
    config = D.DiffusionConfig(rescale_timesteps=rescale)
    sched = S.make_schedule("linear", 1000, "ddim25")
    t = jnp.arange(-1, 25)
    x = jax.random.normal(KEY, (26, 2, 2, 1))
    c = G.GuidanceContext(x=x, t=t, schedule=sched, config=config, x0=0.3 * x)
    abar = np.concatenate([[1.0], np.asarray(sched.alphas_cumprod, np.float64)]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(c.abar, abar, rtol=1e-7)
    np.testing.assert_allclose(c.alpha**2 + c.sigma**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(c.noise_level, np.sqrt((1 - abar) / abar), rtol=1e-5)
    np.testing.assert_allclose(c.log_snr[1:], -0.5 * np.log((1 - abar[1:]) / abar[1:]), rtol=1e-5)
    np.testing.assert_allclose(c.abar_next[1:, 0, 0, 0], np.concatenate([[1.0], abar[1:-1, 0, 0, 0]]),
                               rtol=1e-7)
    levels = jnp.arange(25)
    t_model = D.model_timesteps(sched, config, levels)
    np.testing.assert_array_equal(c.at(x[1:], t_model).t, levels)
    eps = D.predict_eps_from_xstart(sched, x[1:], levels, 0.3 * x[1:])
    np.testing.assert_allclose(c.replace(x=x[1:], t=levels, x0=0.3 * x[1:]).eps, eps, rtol=2e-4,
                               atol=1e-5)


@flax.struct.dataclass
class Affine(G.Transform):
    """A user's transform: x0 -> a x0 + b and the projection x -> a x + b."""

    a: float
    b: float

    def x0(self, c):
        return self.a * c.x0 + self.b

    def project(self, c):
        return self.a * c.x + self.b


def test_composition_order():
    """One rule: the given order, each hook seeing what the previous left (wrappers nest, the
    first innermost); score terms add."""
    x = jax.random.normal(KEY, (4, 3, 3, 1))
    x0 = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 1))
    first, second = Affine(2.0, 1.0), Affine(-0.5, 3.0)
    np.testing.assert_allclose(G.chain(first, second).denoised(x0), -0.5 * (2 * x0 + 1) + 3.0,
                               rtol=1e-6)
    np.testing.assert_allclose(G.chain(second, first).denoised(x0), 2 * (-0.5 * x0 + 3.0) + 1.0,
                               rtol=1e-6)
    np.testing.assert_allclose(G.chain(first, second).post_step(x, 3, KEY, SCHED),
                               -0.5 * (2 * x + 1) + 3.0, rtol=1e-6)
    # classifier-free then autoguidance: autoguidance wraps the guided model (and vice versa).
    main = lambda x_, t_, y: x_ + y.reshape(-1, 1, 1, 1)  # noqa: E731
    weak = lambda x_, t_, y: 0.5 * x_  # noqa: E731
    y = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(-1)
    t = jnp.zeros(4, jnp.int32)
    cfg, ag = G.classifier_free(3.0, {"y": jnp.zeros(1)}), GM.autoguidance(weak, 2.0)
    cond, uncond, w = x + y.reshape(-1, 1, 1, 1), x, 0.5 * x
    guided = uncond + 3.0 * (cond - uncond)
    np.testing.assert_allclose(G.chain(cfg, ag).wrap_model(main)(x, t, y=y), w + 2.0 * (guided - w),
                               rtol=1e-5)
    ag_cond, ag_uncond = w + 2.0 * (cond - w), w + 2.0 * (uncond - w)
    np.testing.assert_allclose(G.chain(ag, cfg).wrap_model(main)(x, t, y=y),
                               ag_uncond + 3.0 * (ag_cond - ag_uncond), rtol=1e-5)
    # score terms add, whatever their order
    a = G.energy(lambda x_, t_: -jnp.sum(x_**2, (1, 2, 3)), 1.0)
    b = G.energy(lambda x_, t_: jnp.sum(x_, (1, 2, 3)), 2.0)
    np.testing.assert_array_equal(G.chain(a, b).grad(x, t, {}), G.chain(b, a).grad(x, t, {}))


def test_hooks_see_the_documented_context():
    """Inside denoise: the x0 hook sees the unclipped x0 with its variance, the score hook the
    clipped x0; the loop's projection sees the step's start point and both levels."""
    seen = {}

    @flax.struct.dataclass
    class Spy(G.Transform):
        def x0(self, c):
            seen["x0"] = (c.x0, c.variance, c.t, c.t_model)
            return c.x0

        def score(self, c):
            seen["score"] = c.x0
            return None

        def project(self, c):
            seen["project"] = (c.x, c.t, c.x_prev, c.t_prev)
            return c.x

    x = 3.0 * jax.random.normal(KEY, (4, 2, 2, 1))
    out = denoise_at(Spy(), x, 4, clip=True)
    raw = GAUSS(x, jnp.full(4, int(SCHED.timestep_map[4])), LABELS)
    np.testing.assert_array_equal(seen["x0"][0], raw)
    np.testing.assert_array_equal(seen["x0"][3], SCHED.timestep_map[4])
    np.testing.assert_array_equal(seen["x0"][1], out["variance"])
    np.testing.assert_array_equal(seen["score"], jnp.clip(raw, -1, 1))
    ctx = SM.Context(SCHED, {"y": LABELS}, False, Spy(), X0, GAUSS)
    x_next = SM.DDIM().step(ctx, {}, x, 4, KEY)[0]
    ctx.project(x_next, 3, KEY, x, 4)
    np.testing.assert_array_equal(seen["project"][0], x_next)
    np.testing.assert_array_equal(seen["project"][2], x)
    assert list(seen["project"][1]) == [3] * 4 and list(seen["project"][3]) == [4] * 4


def test_scales_are_traced_and_may_follow_the_noise_level():
    """New values of a scale, a rescale, an interval's bounds, APG's eta, a DPS step or a weak
    model's weights compile nothing new."""
    before = SM._sample_jit._cache_size()
    for i in range(3):
        guidance = G.chain(
            G.classifier_free(GM.interval(2.0 + i, 0.1 * i, 10.0 - i), NULL, rescale=0.1 * i),
            GM.adaptive_projected(1.0 + i, NULL, eta=0.5 * i, norm_threshold=5.0 + i),
            GM.autoguidance((_weak_apply, {"w": jnp.float32(0.5 + i)}), 1.0 + i),
            GM.dps(_masked, jnp.zeros((4, 2, 2, 1)) + i, 0.1 * i, params=jnp.ones((1, 2, 2, 1))),
        )
        SM.sample(jax.random.PRNGKey(i), (_model_apply, {"w": jnp.float32(1.0)}), SCHED,
                  (4, 2, 2, 1), sampler="ddim", guidance=guidance, config=X0,
                  model_kwargs={"y": LABELS})
    assert SM._sample_jit._cache_size() - before == 1


def _model_apply(v, x, t, y):
    return v["w"] * GAUSS(x, t, y)


def _weak_apply(v, x, t, y):
    return v["w"] * GAUSS(x, t, y) + 0.1


def _masked(x0, mask):
    return x0 * mask


# --------------------------------------------------------------------------- each method


def test_classifier_free_mixes_the_image_channels_of_a_one_channel_model():
    """mean_channels defaults to the image's: a 1-channel learned-variance model's variance
    channel passes through (a default of 3 would have mixed it)."""
    x = jax.random.normal(KEY, (4, 3, 3, 1))
    t = jnp.array([3, 100, 400, 900])
    cond, uncond = toy_eps(x, t, LABELS), toy_eps(x, t, jnp.full(4, 2))
    out = G.classifier_free(2.5, NULL).wrap_model(toy_eps)(x, t, y=LABELS)
    np.testing.assert_allclose(out[..., :1], uncond[..., :1] + 2.5 * (cond[..., :1] - uncond[..., :1]),
                               rtol=1e-5)
    np.testing.assert_array_equal(out[..., 1:], cond[..., 1:])


def test_cfg_rescale_matches_the_conditional_spread():
    """Lin et al. 2024, sec. 3.4: std(out) = phi std(cond) + (1 - phi) std(cfg) per image, on
    the mixed channels; phi = 0 is plain CFG; the variance channels are the conditional's."""
    x = jax.random.normal(KEY, (4, 4, 4, 3))
    t = jnp.array([3, 100, 400, 900])
    cond, uncond = (np.asarray(toy_eps(x, t, y), np.float64) for y in (LABELS, jnp.full(4, 2)))
    cfg = uncond[..., :3] + 5.0 * (cond[..., :3] - uncond[..., :3])
    std = lambda a: a.reshape(4, -1).std(1)  # noqa: E731
    for phi in (0.0, 0.7, 1.0):
        out = np.asarray(G.classifier_free(5.0, NULL, rescale=phi).wrap_model(toy_eps)(x, t, y=LABELS))
        np.testing.assert_allclose(std(out[..., :3]), phi * std(cond[..., :3]) + (1 - phi) * std(cfg),
                                   rtol=1e-5)
        want = cfg * (phi * std(cond[..., :3]) / std(cfg) + 1 - phi).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(out[..., :3], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[..., 3:], cond[..., 3:].astype(np.float32))


def test_guidance_interval_guides_only_inside():
    """Kynkaanniemi et al. 2024: weight w where sigma_t in (lo, hi], 1 (the conditional model)
    elsewhere, on every level of a 10-step cosine grid."""
    x = jax.random.normal(KEY, (4, 2, 2, 1))
    abar = np.asarray(SCHED.alphas_cumprod, np.float64)
    sigma = np.sqrt((1 - abar) / abar)
    lo, hi = 0.5, 20.0
    interval = G.classifier_free(GM.interval(4.0, lo, hi), NULL)
    inside = 0
    for t in range(10):
        got = denoise_at(interval, x, t)["pred_xstart"]
        a = abar_np(SCHED, [t])
        d_c = gaussian_x0(np.asarray(x, np.float64), a, MEANS[LABELS].reshape(-1, 1, 1, 1),
                          STDS[LABELS].reshape(-1, 1, 1, 1))[0]
        d_u = gaussian_x0(np.asarray(x, np.float64), a, MEANS[2], STDS[2])[0]
        w = 4.0 if lo < sigma[t] <= hi else 1.0
        inside += w == 4.0
        np.testing.assert_allclose(got, d_u + w * (d_c - d_u), rtol=2e-5, atol=2e-6)
    assert 0 < inside < 10


def _apg_reference(d_c, d_u, w, eta, r):
    """Sadat et al. 2024, on x0's [B, ...] in float64."""
    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    norm = lambda a: np.linalg.norm(flat(a), axis=1).reshape(-1, 1, 1, 1)  # noqa: E731
    delta = d_c - d_u
    delta = delta * np.minimum(1.0, r / norm(delta))
    parallel = (np.sum(flat(delta * d_c), 1).reshape(-1, 1, 1, 1) / norm(d_c) ** 2) * d_c
    return d_c + (w - 1) * (delta - parallel + eta * parallel)


def test_adaptive_projected_guidance_is_the_papers_update():
    """On an eps-model: APG's x0 against the paper's equations (x0 from eps by the schedule);
    eta = 1, r = inf is CFG; eta = 0 moves orthogonally to D_c; r bounds the update."""
    x = jax.random.normal(KEY, (4, 4, 4, 3))
    for t in (2, 6, 9):
        a = abar_np(SCHED, [t])
        t_model = jnp.full(4, int(SCHED.timestep_map[t]))
        to_x0 = lambda eps: (np.asarray(x, np.float64) - np.sqrt(1 - a) * eps) / np.sqrt(a)  # noqa: E731
        d_c = to_x0(np.asarray(toy_eps(x, t_model, LABELS)[..., :3], np.float64))
        d_u = to_x0(np.asarray(toy_eps(x, t_model, jnp.full(4, 2))[..., :3], np.float64))
        for eta, r in ((0.0, math.inf), (0.3, 2.0), (1.0, math.inf)):
            apg = GM.adaptive_projected(4.0, NULL, eta=eta, norm_threshold=r)
            got = np.asarray(denoise_at(apg, x, t, toy_eps, EPS)["pred_xstart"], np.float64)
            want = _apg_reference(d_c, d_u, 4.0, eta, r)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            if eta == 1.0:
                np.testing.assert_allclose(got, d_u + 4.0 * (d_c - d_u), rtol=1e-4,
                                           atol=1e-4 * np.abs(want).max())
        update = want - d_c  # eta = 1 last; check the eta = 0 update's direction separately
        got0 = np.asarray(denoise_at(GM.adaptive_projected(4.0, NULL), x, t, toy_eps, EPS)
                          ["pred_xstart"], np.float64)
        update = (got0 - d_c).reshape(4, -1)
        cosine = np.sum(update * d_c.reshape(4, -1), 1) / (
            np.linalg.norm(update, axis=1) * np.linalg.norm(d_c.reshape(4, -1), axis=1))
        assert np.abs(cosine).max() < 1e-3


def test_cfg_plus_plus_with_ddim_is_the_papers_algorithm():
    """Chung et al. 2024 on Gaussian classes, written in float64 from the paper: x0 from
    eps_lam = eps_u + lam (eps_c - eps_u), then x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 -
    abar_{t-1}) eps_u."""
    x_T = jax.random.normal(KEY, (4, 3, 3, 1))
    lam = 0.6
    got = SM.sample(KEY, GAUSS, SCHED, x_T.shape, sampler="ddim", config=X0, clip_denoised=False,
                    guidance=GM.cfg_plus_plus(lam, NULL), model_kwargs={"y": LABELS}, x_T=x_T)
    x = np.asarray(x_T, np.float64)
    mean_c, std_c = MEANS[LABELS].reshape(-1, 1, 1, 1), STDS[LABELS].reshape(-1, 1, 1, 1)
    for t in range(9, -1, -1):
        a = abar_np(SCHED, [t])
        a_prev = abar_np(SCHED, [t - 1]) if t > 0 else 1.0
        eps = lambda d: (x - np.sqrt(a) * d) / np.sqrt(1 - a)  # noqa: E731
        eps_c = eps(gaussian_x0(x, a, mean_c, std_c)[0])
        eps_u = eps(gaussian_x0(x, a, MEANS[2], STDS[2])[0])
        eps_lam = eps_u + lam * (eps_c - eps_u)
        x0_lam = (x - np.sqrt(1 - a) * eps_lam) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0_lam + np.sqrt(1 - a_prev) * eps_u
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
    plain = SM.sample(KEY, GAUSS, SCHED, x_T.shape, sampler="ddim", config=X0, clip_denoised=False,
                      guidance=G.classifier_free(lam, NULL), model_kwargs={"y": LABELS}, x_T=x_T)
    assert np.abs(np.asarray(plain) - x).max() > 1e-2  # not CFG with the same number


def test_autoguidance_is_weak_plus_w_times_the_difference():
    """Karras et al. 2024 with two exact Gaussian denoisers (the weak one too wide)."""
    x = jax.random.normal(KEY, (4, 2, 2, 1))
    weak = gaussian_model(SCHED, stds=2 * STDS)
    for w in (1.0, 2.5):
        got = denoise_at(GM.autoguidance(weak, w), x, 5)["pred_xstart"]
        a = abar_np(SCHED, [5])
        mean, std = MEANS[LABELS].reshape(-1, 1, 1, 1), STDS[LABELS].reshape(-1, 1, 1, 1)
        d_main = gaussian_x0(np.asarray(x, np.float64), a, mean, std)[0]
        d_weak = gaussian_x0(np.asarray(x, np.float64), a, mean, 2 * std)[0]
        np.testing.assert_allclose(got, d_weak + w * (d_main - d_weak), rtol=1e-5, atol=1e-6)


def test_dynamic_thresholding_is_imagens():
    """Saharia et al. 2022, sec. 2.3: s = max(quantile_p |x0|, 1), x0 <- clip(x0, -s, s) / s."""
    x0 = 2.0 * jax.random.normal(KEY, (3, 4, 4, 3))
    x0 = x0.at[2].set(0.5 * jnp.tanh(x0[2]))  # |x0| < 1: untouched
    got = np.asarray(GM.dynamic_threshold(0.9).denoised(x0))
    ref = np.asarray(x0, np.float64)
    s = np.maximum(np.quantile(np.abs(ref.reshape(3, -1)), 0.9, axis=1), 1.0).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(got, np.clip(ref, -s, s) / s, rtol=1e-6)
    np.testing.assert_array_equal(got[2], x0[2])
    assert np.abs(got).max() <= 1.0
    # a percentile per image (a ScaleFn: e.g. one that follows the noise level)
    pct = np.array([0.5, 0.99, 0.7])
    per_image = GM.dynamic_threshold(G.scale_fn(_given, value=pct))
    got = np.asarray(per_image.x0(G.GuidanceContext(x=x0, x0=x0)))
    s = np.maximum([np.quantile(np.abs(ref[b]), pct[b]) for b in range(3)], 1.0).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(got, np.clip(ref, -s, s) / s, rtol=1e-6)


def _given(c, value):
    return value


@pytest.mark.parametrize("squared", [False, True])
def test_posterior_sampling_step_is_the_papers(squared):
    """Chung et al. 2023, Alg. 1: x_{t-1} <- x'_{t-1} - zeta grad_{x_t} |y - A x0(x_t)|, here with
    a masking operator A and the exact Gaussian denoiser, whose gradient is closed-form:
    -gain A^T r / |r| (-2 gain A^T r squared), r = y - A x0."""
    shape = (4, 3, 3, 1)
    x_t, x_next, y = (jax.random.normal(k, shape) for k in jax.random.split(KEY, 3))
    mask = (jax.random.uniform(jax.random.PRNGKey(9), (1,) + shape[1:]) > 0.4).astype(jnp.float32)
    dps = GM.dps(_masked, y, 0.3, params=mask, squared=squared)
    ctx = SM.Context(SCHED, {"y": LABELS}, False, G.chain(dps), X0, GAUSS)
    got = ctx.project(x_next, 4, KEY, x_t, 5)
    a = abar_np(SCHED, [5])
    d, gain = gaussian_x0(np.asarray(x_t, np.float64), a, MEANS[LABELS].reshape(-1, 1, 1, 1),
                          STDS[LABELS].reshape(-1, 1, 1, 1))
    m = np.asarray(mask, np.float64)
    r = np.asarray(y, np.float64) - m * d
    norm = np.linalg.norm(r.reshape(4, -1), axis=1).reshape(-1, 1, 1, 1)
    grad = -2 * gain * m * r if squared else -gain * m * r / norm
    np.testing.assert_allclose(got, np.asarray(x_next, np.float64) - 0.3 * grad, rtol=1e-5,
                               atol=1e-6)


def _l2_loss(x0, target):
    return 0.5 * jnp.sum((x0 - target) ** 2, axis=(1, 2, 3))


@pytest.mark.parametrize("mode", ["score", "mean"])
def test_universal_guidance_differentiates_through_the_denoiser(mode):
    """Bansal et al. 2023 with l = |x0 - target|^2 / 2 and the exact Gaussian denoiser:
    g = -s grad_x l(x0(x)) = -s gain (x0 - target); eps - sigma g (DDIM), mean + Sigma g (DDPM)."""
    x = jax.random.normal(KEY, (4, 2, 2, 1))
    target = jnp.full((1, 2, 2, 1), 0.7)
    plain = denoise_at(G.chain(), x, 6, mode=mode)
    got = denoise_at(GM.universal(_l2_loss, 1.5, params=target), x, 6, mode=mode)
    a = abar_np(SCHED, [6])
    d, gain = gaussian_x0(np.asarray(x, np.float64), a, MEANS[LABELS].reshape(-1, 1, 1, 1),
                          STDS[LABELS].reshape(-1, 1, 1, 1))
    g = -1.5 * gain * (d - 0.7)
    if mode == "score":
        np.testing.assert_allclose(got["pred_xstart"], d + (1 - a) / np.sqrt(a) * g, rtol=1e-5,
                                   atol=1e-6)
    else:
        np.testing.assert_allclose(got["mean"], plain["mean"] + plain["variance"] * g, rtol=1e-5,
                                   atol=1e-6)


# --------------------------------------------------------------------------- every sampler


@flax.struct.dataclass
class Switch(G.Transform):
    """The method methods[index] (index traced): every method of the matrix in one compiled loop
    per sampler. Itself a transform written on the contract."""

    index: object
    methods: tuple

    def _pick(self, branch):
        return jax.lax.switch(self.index, [functools.partial(branch, m) for m in self.methods])

    def wrap_model(self, model_fn, c=None):
        def picked(x, t, **kw):
            return self._pick(lambda m: m.wrap_model(model_fn, c)(x, t, **kw))
        return picked

    def x0(self, c):
        return self._pick(lambda m: m.x0(c))

    # A method that runs the denoiser again (c.denoise_at) sees the chain of itself alone.
    def score(self, c):
        def branch(m):
            g = m.score(c.replace(guidance=m))
            return jnp.zeros(c.x.shape, jnp.float32) if g is None else g
        return self._pick(branch)

    def project(self, c):
        return self._pick(lambda m: m.project(c.replace(guidance=m)))


MATRIX_SHAPE = (2, 4, 4, 3)
MATRIX_SCHED = S.make_schedule("cosine", 1000, "5")
MATRIX_LABELS = jnp.array([0, 1])
MASK = jnp.zeros((1, 4, 4, 1)).at[:, :, :2].set(1.0)
MEASURED = jnp.full(MATRIX_SHAPE, 0.6)
METHODS = ["plain", "classifier", "cfg", "cfg_rescale", "interval", "apg", "cfg++", "autoguidance",
           "dynamic_threshold", "dps", "universal"]
ACTIVE = dict(classifier=3.0, cfg=3.0, rescale=0.7, lo=0.5, hi=5.0, eta=0.0, r=1.0, lam=0.6,
              weak=jnp.float32(0.7), ag=2.0, pct=0.9, zeta=2.0, s=2.0)
# The settings at which a method is the identity (the plain conditional sample).
NEUTRAL = dict(ACTIVE, classifier=0.0, cfg=1.0, rescale=0.0, lo=0.0, hi=0.0, ag=1.0, pct=0.0,
               zeta=0.0, s=0.0)


def _toy_logits(x, t):
    m = x.mean((1, 2, 3))
    return jnp.stack([m, -m, 0.5 * m], -1)


def _toy_apply(v, x, t, y):
    return toy_eps(x, t, y) * v


def _matrix_methods(p):
    null = {"y": jnp.full((1,), 2)}
    return (
        G.chain(),
        G.classifier(_toy_logits, p["classifier"]),
        G.classifier_free(p["cfg"], null),
        G.classifier_free(p["cfg"], null, rescale=p["rescale"]),
        G.classifier_free(GM.interval(3.0, p["lo"], p["hi"]), null),
        GM.adaptive_projected(p["cfg"], null, eta=p["eta"], norm_threshold=p["r"]),
        GM.cfg_plus_plus(p["lam"], null),
        GM.autoguidance((_toy_apply, p["weak"]), p["ag"]),
        GM.dynamic_threshold(p["pct"]),
        # posterior sampling at the lower noise levels only (a scale that follows the level)
        GM.dps(_masked, MEASURED, GM.interval(p["zeta"], 0.0, 2.0, outside=0.0), params=MASK),
        GM.universal(_l2_loss, p["s"], params=jnp.full((1, 4, 4, 3), -0.5)),
    )


def _matrix_run(sampler, method, params):
    guidance = Switch(jnp.int32(METHODS.index(method)), _matrix_methods(params))
    return np.asarray(SM.sample(KEY, (_toy_apply, jnp.float32(1.0)), MATRIX_SCHED, MATRIX_SHAPE,
                                sampler=sampler, guidance=guidance, config=EPS,
                                model_kwargs={"y": MATRIX_LABELS}))


@pytest.mark.parametrize("sampler", samplers_quick_first(SAMPLERS))
def test_every_method_with_every_sampler(sampler):
    """One compiled loop per sampler runs every method: finite, changing the sample, the
    identity at its neutral setting (CFG++ has none), and posterior sampling towards the
    measurement."""
    before = SM._sample_jit._cache_size()
    plain = _matrix_run(sampler, "plain", ACTIVE)
    assert np.all(np.isfinite(plain))
    for method in METHODS[1:]:
        active = _matrix_run(sampler, method, ACTIVE)
        assert np.all(np.isfinite(active)), method
        assert np.abs(active - plain).max() > 1e-3, method
        if method != "cfg++":
            np.testing.assert_allclose(_matrix_run(sampler, method, NEUTRAL), plain, atol=2e-4,
                                       err_msg=method)
    misfit = lambda a: np.abs(np.asarray(MASK) * (a - np.asarray(MEASURED))).sum()  # noqa: E731
    assert misfit(_matrix_run(sampler, "dps", ACTIVE)) < 0.8 * misfit(plain)
    assert SM._sample_jit._cache_size() - before == 1


# --------------------------------------------------------------------------- diffjax.sample, CLI


@pytest.fixture(scope="module")
def bundles():
    """Two tiny class-conditional 8x8 grayscale bundles with a null label, random weights (no
    init to compile)."""
    from diffjax.bundle import DiffusionModel
    from diffjax.pipelines import training as TR
    from tests.test_train import tiny_config

    experiment, trainer, _ = TR.experiment_and_trainer(tiny_config(label_dropout=0.1))
    args, kwargs = trainer.module.example_inputs(1)
    shapes = jax.eval_shape(lambda: trainer.module.init(KEY, *args, **kwargs))["params"]

    def make(seed):
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), shapes)
        description = dict(experiment.description(), use="params")
        return DiffusionModel.from_description(description, {"params": params})

    return make(0), make(1)


def test_sample_takes_an_autoguidance_bundle_and_guidance_factories(bundles):
    """autoguidance= is GM.autoguidance with the weak bundle's network and weights; a function
    given as guidance= receives the unconditional kwargs (the null label)."""
    import diffjax
    from diffjax import images

    main, weak = bundles
    common = dict(labels=1, steps=4, sampler="ddim")
    got = diffjax.sample(main, KEY, 2, autoguidance=weak, autoguidance_scale=2.5, **common)
    _, k_sample = jax.random.split(jax.random.fold_in(KEY, 0))
    want = SM.sample(k_sample, (main.module, main.variables()), main.spec.schedule(4),
                     (2,) + main.image_shape, sampler="ddim", config=main.spec.config,
                     guidance=GM.autoguidance((weak.module, weak.variables()), 2.5),
                     model_kwargs={"y": jnp.array([1, 1])})
    assert np.abs(got.astype(int) - images.to_uint8(want)).max() <= 1
    assert np.any(got != diffjax.sample(main, KEY, 2, **common))
    seen = []
    diffjax.sample(main, KEY, 2, guidance=lambda null: seen.append(null) or GM.adaptive_projected(
        3.0, null), **common)
    np.testing.assert_array_equal(seen[0]["y"], [main.conditioning.kinds[0].null_label])
    with pytest.raises(ValueError, match="needs autoguidance_scale"):
        diffjax.sample(main, KEY, 2, autoguidance=weak, **common)
    other = weak.replace(image_shape=(4, 4, 1))
    with pytest.raises(ValueError, match="same kind"):
        diffjax.sample(main, KEY, 2, autoguidance=other, autoguidance_scale=2.0, **common)


def test_clip_guidance_through_sample_and_the_command_line(golden, tmp_path):
    """diffjax.sample(clip=...) guides a GLIDE base model toward its prompts (its scale traced:
    one compiled loop), and `--clip_text/--clip_image` .pt files give the same samples."""
    import diffjax
    from diffjax.cli import sample as sample_cli
    from diffjax.compat import glide_clip as GC
    from diffjax.io.loading import load
    from tests._tiny_glide import write_vocab
    from tests._util import PARITY, require
    from tests.test_glide_clip import encoder_state_dicts
    from tests.test_sample_cli import _glide_checkpoint
    from tests.test_torch_pt import state_dict_file

    from diffjax import tokenizer as tokenizer_lib

    g = golden("glide_clip_tiny")
    clip_vocab = require(PARITY / "vocab" / GC.CLIP_VOCAB_FILE)
    vocab = write_vocab(tmp_path / "tokenizer")
    path = _glide_checkpoint(tmp_path, "base", tokenizer_lib.load(str(vocab)).n_vocab,
                             image_size=16)
    clip = GC.create_clip_model(g.config["clip_config"])
    text_sd, image_sd = encoder_state_dicts(g)
    variables = GC.load_clip_state_dict(clip, text_sd, image_sd)
    model = load(path)
    common = dict(prompts="a corgi", tokenizer=str(vocab), steps=3, batch_size=2)
    before = SM._sample_jit._cache_size()
    guided = {s: diffjax.sample(model, KEY, 2, clip=(clip.module, variables), clip_scale=s,
                                clip_tokenizer=clip_vocab, **common) for s in (0.0, 30.0)}
    assert np.any(guided[30.0] != guided[0.0])
    assert SM._sample_jit._cache_size() - before == 1
    config = tmp_path / "clip.json"
    config.write_text(json.dumps({k: v for k, v in g.config["clip_config"].items()}))
    out = tmp_path / "clip.npz"
    sample_cli.main(["--checkpoint", str(path), "--prompt", "a corgi", "--bpe", str(vocab),
                     "--num_samples", "2", "--batch_size", "2", "--steps", "3", "--clip_text",
                     str(state_dict_file(tmp_path / "text.pt", text_sd)), "--clip_image",
                     str(state_dict_file(tmp_path / "image.pt", image_sd)), "--clip_config",
                     str(config), "--clip_vocab", str(clip_vocab), "--clip_scale", "30",
                     "--out", str(out), "--no_progress"])
    np.testing.assert_array_equal(np.load(out)["arr_0"], guided[30.0])
    with pytest.raises(ValueError, match="both --clip_text and --clip_image"):
        sample_cli.main(["--checkpoint", str(path), "--prompt", "x", "--bpe", str(vocab),
                         "--clip_text", "t.pt", "--no_progress"])

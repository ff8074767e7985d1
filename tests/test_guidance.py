"""Guidance transforms: their defining identities, and that every one composes with every sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import schedules as S
from diffjax.core import samplers as SM_core  # the loop itself (diffjax.sample takes a model)
from tests.test_resize import reference_imresize
from tests._util import samplers_quick_first

SAMPLERS = ["ddpm", "ddim", "dpm++2m", "heun", "dpm++3m", "dpm++2s", "unipc", "ipndm"]
SCHED = S.make_schedule("cosine", 1000, "8")
CFG = D.DiffusionConfig(var_type="learned_range")
SHAPE = (4, 8, 8, 3)
KEY = jax.random.PRNGKey(0)


def toy_model(x, t, y=None):
    """A small conditional eps-model with learned-range variance channels."""
    scale = 0.5 + 0.1 * jnp.tanh(t.astype(jnp.float32) / 500).reshape(-1, 1, 1, 1)
    label = 0.0 if y is None else 0.2 * (y.astype(jnp.float32).reshape(-1, 1, 1, 1) - 1.5)
    eps = scale * jnp.tanh(x) + label
    return jnp.concatenate([eps, jnp.tanh(x.mean(-1, keepdims=True)) * jnp.ones_like(x) * 0.3], -1)


def toy_logits(x, t):
    m = x.mean((1, 2, 3))
    return jnp.stack([m, -m, 0.5 * m, m**2], -1)


def run(sampler, guidance=None, y=None, key=KEY):
    kw = {} if y is None else {"y": y}
    return np.asarray(SM_core.sample(key, toy_model, SCHED, SHAPE, sampler=sampler,
                                     guidance=guidance, config=CFG, model_kwargs=kw))


LABELS = jnp.array([0, 1, 2, 3])


@pytest.mark.parametrize("sampler", samplers_quick_first(SAMPLERS))
def test_classifier_guidance_at_scale_zero_is_unguided(sampler):
    plain = run(sampler, y=LABELS)
    zero = run(sampler, G.classifier(toy_logits, 0.0), y=LABELS)
    guided = run(sampler, G.classifier(toy_logits, 5.0), y=LABELS)
    np.testing.assert_allclose(zero, plain, atol=1e-5)
    assert np.max(np.abs(guided - plain)) > 1e-3


def test_classifier_is_energy_of_the_label_log_probability():
    x = jax.random.normal(KEY, SHAPE)
    t = jnp.array([10, 200, 500, 999])
    g_clf = G.classifier(toy_logits, 2.0).grad(x, t, {"y": LABELS})
    log_p = lambda x_, t_, y: jnp.take_along_axis(  # noqa: E731
        jax.nn.log_softmax(toy_logits(x_, t_)), y[:, None], 1)[:, 0]
    g_energy = G.energy(log_p, 2.0).grad(x, t, {"y": LABELS})
    np.testing.assert_allclose(g_clf, g_energy, rtol=1e-6)
    # energy of a Gaussian log-density: scale * grad = -scale (x - c)
    c = 0.25
    g = G.energy(lambda x_, t_: -0.5 * jnp.sum((x_ - c) ** 2, axis=(1, 2, 3)), 3.0).grad(x, t, {})
    np.testing.assert_allclose(g, -3.0 * (x - c), rtol=1e-6)


def test_classifier_needs_labels():
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\]"):
        G.classifier(toy_logits).grad(jnp.zeros(SHAPE), jnp.zeros(4, jnp.int32), {})


def test_classifier_free_endpoints_and_formula():
    x = jax.random.normal(KEY, SHAPE)
    t = jnp.array([3, 100, 400, 900])
    null = {"y": jnp.full((1,), 9)}
    cond = toy_model(x, t, y=LABELS)
    uncond = toy_model(x, t, y=jnp.full(4, 9))
    calls = []

    def counting(x_, t_, **kw):
        calls.append(x_.shape[0])
        return toy_model(x_, t_, **kw)

    for w, expected_eps in ((1.0, cond[..., :3]), (0.0, uncond[..., :3]),
                            (3.0, uncond[..., :3] + 3.0 * (cond[..., :3] - uncond[..., :3]))):
        out = G.classifier_free(w, null).wrap_model(counting)(x, t, y=LABELS)
        np.testing.assert_allclose(out[..., :3], expected_eps, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out[..., 3:], cond[..., 3:], rtol=1e-6)  # variance: cond branch
    assert calls == [8, 8, 8]  # one batched call per evaluation


def test_classifier_free_sampling_endpoints():
    null = {"y": jnp.full((1,), 9)}
    np.testing.assert_allclose(run("ddim", G.classifier_free(1.0, null), y=LABELS),
                               run("ddim", y=LABELS), atol=1e-5)
    np.testing.assert_allclose(run("ddim", G.classifier_free(0.0, null), y=LABELS),
                               run("ddim", y=jnp.full(4, 9)), atol=1e-5)


def test_ilvr_with_factor_one_pins_x_to_the_noised_reference():
    ref = jax.random.uniform(jax.random.PRNGKey(5), SHAPE, minval=-1, maxval=1)
    x = jax.random.normal(KEY, SHAPE)
    key = jax.random.PRNGKey(7)
    level = 4
    out = G.ilvr(ref, 1).post_step(x, level, key, SCHED)
    expected = D.q_sample(SCHED, ref, jnp.full(4, level), jax.random.normal(key, SHAPE))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # the official code's index noises the reference one level more
    out = G.ilvr(ref, 1, official_index=True).post_step(x, level, key, SCHED)
    expected = D.q_sample(SCHED, ref, jnp.full(4, level + 1), jax.random.normal(key, SHAPE))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # outside t_range nothing changes; at the end of a loop x is the reference itself
    np.testing.assert_array_equal(G.ilvr(ref, 1, t_range=(6, 7)).post_step(x, level, key, SCHED), x)
    np.testing.assert_allclose(run("ddpm", G.ilvr(ref, 1)), ref, atol=1e-6)


def test_ilvr_matches_the_reference_at_low_frequencies():
    ref = jax.image.resize(jax.random.uniform(jax.random.PRNGKey(5), (4, 2, 2, 3), minval=-1,
                                              maxval=1), SHAPE, "linear")
    free = run("ddpm")
    guided = run("ddpm", G.ilvr(ref, 4))
    low = lambda a: np.asarray(G.low_pass(jnp.asarray(a), 4))  # noqa: E731
    assert np.abs(low(guided) - low(ref)).mean() < 0.2 * np.abs(low(free) - low(ref)).mean()



def test_ilvr_filters_with_the_official_resizer_by_default():
    """x <- x - phi(x) + phi(y_level), phi = up(down(.)) with MATLAB's imresize (the official ILVR
    code's Resizer), checked against the per-pixel float64 definition, borders included."""
    shape = (2, 8, 8, 2)
    ref = jax.random.uniform(jax.random.PRNGKey(5), shape, minval=-1, maxval=1)
    x = jax.random.normal(KEY, shape)
    key, level = jax.random.PRNGKey(7), 4
    target = np.asarray(D.q_sample(SCHED, ref, jnp.full(2, level), jax.random.normal(key, shape)))

    def phi(a):
        out = np.empty(a.shape)
        for b, c in np.ndindex(a.shape[0], a.shape[3]):
            small = reference_imresize(np.asarray(a[b, :, :, c], np.float64), (4, 4))
            out[b, :, :, c] = reference_imresize(small, (8, 8))
        return out

    expected = np.asarray(x) - phi(np.asarray(x)) + phi(target)
    np.testing.assert_allclose(G.ilvr(ref, 2).post_step(x, level, key, SCHED), expected, atol=2e-5)


def test_ilvr_jax_resizer_differs_only_near_the_borders():
    shape, factor = (2, 32, 32, 1), 2
    ref = jax.random.uniform(jax.random.PRNGKey(5), shape, minval=-1, maxval=1)
    x = jax.random.normal(KEY, shape)
    key, level = jax.random.PRNGKey(7), 3
    official = np.asarray(G.ilvr(ref, factor).post_step(x, level, key, SCHED))
    other = np.asarray(G.ilvr(ref, factor, resizer="jax").post_step(x, level, key, SCHED))
    band = 4 * factor  # the two filters share every tap from 3.5 factor pixels in
    np.testing.assert_allclose(other[:, band:-band, band:-band], official[:, band:-band, band:-band],
                               atol=1e-5)
    assert np.abs(other - official)[:, :factor].max() > 0.05
    with pytest.raises(ValueError, match="resizer='bilinear' does not exist"):
        G.ilvr(ref, factor, resizer="bilinear")


@pytest.mark.parametrize("sampler", samplers_quick_first(SAMPLERS))
def test_inpainting_returns_the_known_region_exactly(sampler):
    known = jax.random.uniform(jax.random.PRNGKey(3), SHAPE, minval=-1, maxval=1)
    mask = jnp.zeros(SHAPE[:-1] + (1,)).at[:, :, :4].set(1.0)
    out = run(sampler, G.inpaint(mask, known))
    np.testing.assert_array_equal(out[:, :, :4], np.asarray(known)[:, :, :4])
    assert np.max(np.abs(out[:, :, 4:] - np.asarray(known)[:, :, 4:])) > 0.1
    # x0 replacement alone (GLIDE's denoised_fn) also pins it at the last step of DDPM / DDIM
    if sampler in ("ddpm", "ddim"):
        out = run(sampler, G.inpaint(mask, known, on_xt=False))
        np.testing.assert_allclose(out[:, :, :4], np.asarray(known)[:, :, :4], atol=1e-6)


def test_repaint_walk():
    T, j, r = 20, 5, 3
    walk = G.repaint_levels(T, j, r)
    assert walk[0, 0] == T - 1 and walk[-1, 1] == -1
    assert np.all(np.abs(walk[:, 1] - walk[:, 0]) == 1)
    assert np.all(walk[1:, 0] == walk[:-1, 1])  # a connected walk
    ups = walk[walk[:, 1] > walk[:, 0]]
    # jump points 0, 5, 10 (15 + 5 > 19): each jumped from r - 1 = 2 times, j levels up each time
    assert len(ups) == 3 * 2 * j
    starts = [int(a) for a, b in ups if (a % j == 0)]
    assert sorted(set(starts)) == [0, 5, 10]
    np.testing.assert_array_equal(G.repaint_levels(T, j, 1), np.stack(
        [np.arange(T - 1, -1, -1), np.arange(T - 2, -2, -1)], 1))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_repaint_inpainting(sampler):
    known = jax.random.uniform(jax.random.PRNGKey(3), SHAPE, minval=-1, maxval=1)
    mask = jnp.zeros(SHAPE[:-1] + (1,)).at[:, 2:6, 2:6].set(1.0)
    repaint = G.inpaint(mask, known, jump_length=2, resample_count=3)
    out = run(sampler, repaint)
    np.testing.assert_array_equal(out[:, 2:6, 2:6], np.asarray(known)[:, 2:6, 2:6])
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out - run(sampler, G.inpaint(mask, known)))) > 1e-3


def test_chain_order_rules():
    x = jax.random.normal(KEY, SHAPE)
    t = jnp.array([1, 2, 3, 4])
    a = G.energy(lambda x_, t_: -jnp.sum(x_**2, (1, 2, 3)), 1.0)
    b = G.energy(lambda x_, t_: jnp.sum(x_, (1, 2, 3)), 2.0)
    np.testing.assert_allclose(G.chain(a, b).grad(x, t, {}), -2 * x + 2.0, rtol=1e-6)
    ones, zeros = jnp.ones(SHAPE), jnp.zeros(SHAPE)
    full = jnp.ones(SHAPE[:-1] + (1,))
    later_wins = G.chain(G.inpaint(full, ones), G.inpaint(full, zeros)).denoised(x)
    np.testing.assert_array_equal(later_wins, zeros)
    with pytest.raises(ValueError, match="more than one"):
        G.chain(G.inpaint(full, ones, resample_count=2), G.inpaint(full, ones, resample_count=2)
                ).levels(10)


@pytest.mark.parametrize("sampler", samplers_quick_first(SAMPLERS))
def test_one_chain_of_everything_runs_on_every_sampler(sampler):
    known = jax.random.uniform(jax.random.PRNGKey(3), SHAPE, minval=-1, maxval=1)
    mask = jnp.zeros(SHAPE[:-1] + (1,)).at[:, :2].set(1.0)
    everything = G.chain(
        G.classifier_free(2.0, {"y": jnp.full((1,), 9)}),
        G.classifier(toy_logits, 1.0),
        G.ilvr(known, 2, t_range=(3, 7)),
        G.inpaint(mask, known),
    )
    out = run(sampler, everything, y=LABELS)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, :2], np.asarray(known)[:, :2])

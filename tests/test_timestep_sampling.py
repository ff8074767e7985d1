"""Timestep samplers: GD's loss-second-moment rule, unbiased weights, functional state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.core import timestep_sampling as TS


def test_uniform_sampler():
    s = TS.create_named_schedule_sampler("uniform", 10)
    state = s.init()
    t, w = s.sample(state, jax.random.PRNGKey(0), 20000)
    assert t.dtype == jnp.int32 and t.shape == (20000,)
    np.testing.assert_array_equal(w, 1.0)
    counts = np.bincount(np.asarray(t), minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200
    assert s.update(state, t, jnp.ones(20000)) == state


def test_history_keeps_the_last_losses_of_each_timestep_in_order():
    H = 3
    s = TS.LossSecondMomentSampler(4, history_per_term=H)
    state = s.init()
    rng = np.random.default_rng(0)
    recorded = {t: [] for t in range(4)}
    update = jax.jit(s.update)
    for _ in range(5):
        t = rng.integers(0, 4, size=6)
        t[:2] = 1  # a timestep drawn twice in one batch records both, in batch order
        losses = rng.random(6).astype(np.float32)
        for ti, li in zip(t, losses):
            recorded[int(ti)].append(li)
        state = update(state, jnp.asarray(t), jnp.asarray(losses))
    for ti, values in recorded.items():
        last = values[-H:]
        assert int(state.counts[ti]) == len(last)
        np.testing.assert_array_equal(np.asarray(state.history[ti, : len(last)]), last)


def test_weights_before_and_after_warm_up():
    s = TS.LossSecondMomentSampler(3, history_per_term=2, uniform_prob=0.1)
    state = s.init()
    state = s.update(state, jnp.array([0, 0, 1, 1, 2]), jnp.array([1.0, 1.0, 2.0, 2.0, 4.0]))
    np.testing.assert_array_equal(s.weights(state), 1.0)  # t=2 has one loss only: still uniform
    state = s.update(state, jnp.array([2]), jnp.array([4.0]))
    rms = np.array([1.0, 2.0, 4.0])
    expected = rms / rms.sum() * 0.9 + 0.1 / 3
    np.testing.assert_allclose(s.weights(state), expected, rtol=1e-6)


def test_importance_weights_are_unbiased():
    """E_{t~p}[w(t) L_t] = mean_t L_t: exactly as a sum over t, and by Monte Carlo."""
    T = 5
    s = TS.LossSecondMomentSampler(T, history_per_term=1, uniform_prob=0.0)
    losses = jnp.array([0.1, 0.5, 1.0, 2.0, 8.0])
    state = s.update(s.init(), jnp.arange(T), losses)
    p = np.asarray(s.weights(state)) / float(jnp.sum(s.weights(state)))
    w = 1 / (T * p)
    assert float(np.sum(p * w * np.asarray(losses))) == pytest.approx(float(losses.mean()), rel=1e-6)
    t, weights = jax.jit(s.sample, static_argnums=2)(state, jax.random.PRNGKey(1), 200_000)
    np.testing.assert_allclose(weights, w[np.asarray(t)], rtol=1e-6)
    estimate = float(jnp.mean(weights * losses[t]))
    assert estimate == pytest.approx(float(losses.mean()), rel=0.02)
    freq = np.bincount(np.asarray(t), minlength=T) / len(t)
    np.testing.assert_allclose(freq, p, atol=0.01)


def test_state_is_a_pytree_that_round_trips():
    s = TS.LossSecondMomentSampler(6)
    state = s.update(s.init(), jnp.array([1, 2]), jnp.array([0.5, 0.25]))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 2
    again = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
    np.testing.assert_array_equal(again.history, state.history)
    np.testing.assert_array_equal(s.weights(again), s.weights(state))


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="'loss-second-moment'"):
        TS.create_named_schedule_sampler("importance", 10)

"""Timestep samplers with explicit, checkpointable state.

A sampler is a small static object (hashable: pass it as a jit static argument or close over it)
with three pure functions:

    state = sampler.init()                               # a pytree: keep it in the train state
    t, weights = sampler.sample(state, key, batch_size)  # t [B] int32, weights [B] float32
    state = sampler.update(state, t, losses)             # after the step, with per-example losses

The weights make the importance-sampled loss unbiased: E_t~p[w(t) L_t] = mean_t L_t, w = 1/(T p(t)).
Source: Nichol & Dhariwal 2021, sec. 3.3 (L_vlb importance sampling, p_t ~ sqrt(E[L_t^2])) and
GD's resample.py (history of 10 losses per term, 0.001 uniform mixing).
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

SAMPLER_NAMES = ("uniform", "loss-second-moment")


class _Sampler:
    num_timesteps: int

    def weights(self, state) -> jnp.ndarray:
        """Unnormalised sampling weights [T]."""
        raise NotImplementedError

    def sample(self, state, key, batch_size: int):
        """(t [B] int32 ~ p, importance weights [B] float32 = 1 / (T p(t)))."""
        w = self.weights(state)
        p = w / jnp.sum(w)
        t = jax.random.choice(key, self.num_timesteps, (batch_size,), p=p)
        return t.astype(jnp.int32), (1.0 / (self.num_timesteps * p[t])).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class UniformSampler(_Sampler):
    """t ~ U{0, ..., T-1}, weights 1. Its state is empty."""

    num_timesteps: int

    def init(self):
        return {}

    def weights(self, state):
        return jnp.ones((self.num_timesteps,), jnp.float32)

    def update(self, state, t, losses):
        return state


@flax.struct.dataclass
class LossHistory:
    """The last `history_per_term` losses of every timestep, oldest first: history [T, H] float32,
    counts [T] int32 (how many of a row are filled)."""

    history: jnp.ndarray
    counts: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class LossSecondMomentSampler(_Sampler):
    """p(t) proportional to sqrt(mean of the last H losses^2 at t), mixed with `uniform_prob` of the
    uniform distribution; uniform until every timestep has H losses recorded."""

    num_timesteps: int
    history_per_term: int = 10
    uniform_prob: float = 0.001

    def init(self) -> LossHistory:
        return LossHistory(
            history=jnp.zeros((self.num_timesteps, self.history_per_term), jnp.float32),
            counts=jnp.zeros((self.num_timesteps,), jnp.int32),
        )

    def weights(self, state: LossHistory):
        warmed_up = jnp.all(state.counts == self.history_per_term)
        w = jnp.sqrt(jnp.mean(state.history**2, axis=-1))
        w = w / jnp.sum(w) * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return jnp.where(warmed_up, w, jnp.ones_like(w))

    def update(self, state: LossHistory, t, losses) -> LossHistory:
        """Record losses [B] at timesteps t [B] in batch order (a timestep drawn twice records both;
        a full row drops its oldest loss), as GD's update_with_all_losses."""
        full = self.history_per_term

        def record(carry, item):
            history, counts = carry
            ti, loss = item
            row, count = history[ti], counts[ti]
            shifted = jnp.concatenate([row[1:], loss[None]])
            filled = row.at[jnp.minimum(count, full - 1)].set(loss)
            history = history.at[ti].set(jnp.where(count == full, shifted, filled))
            counts = counts.at[ti].set(jnp.minimum(count + 1, full))
            return (history, counts), None

        items = (jnp.asarray(t, jnp.int32), jnp.asarray(losses, jnp.float32))
        (history, counts), _ = jax.lax.scan(record, (state.history, state.counts), items)
        return LossHistory(history=history, counts=counts)


def create_named_schedule_sampler(name: str, num_timesteps: int, **kwargs) -> _Sampler:
    """GD's names: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps, **kwargs)
    raise ValueError(
        f"unknown schedule sampler {name!r}: choose one of {', '.join(map(repr, SAMPLER_NAMES))}"
    )

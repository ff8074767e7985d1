"""The train state and its one construction path: a fresh state (random or given parameters)
created directly with its shardings over the mesh, parameters and optimizer state split over
"fsdp" when the mesh has that axis."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from diffjax import parallel


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (checkpointed whole).

    step: int32 []; params: the model's "params"; ema: tuple of params trees, one per rate of
    TrainConfig.ema_rates; opt_state: optax state; rng: uint32 [2] base key (fold_in(rng, step) is
    the step's key); sampler_state: the timestep sampler's; bad_steps: consecutive non-finite
    steps; skipped: all skipped steps."""

    step: jnp.ndarray
    params: Any
    ema: tuple
    opt_state: Any
    rng: jnp.ndarray
    sampler_state: Any
    bad_steps: jnp.ndarray
    skipped: jnp.ndarray


def _raw_key(key):
    """uint32 key data of a typed or raw PRNG key (raw data checkpoints like any array)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def new_state(module, optimizer, sampler, ema_rates, key, params=None) -> TrainState:
    """A fresh TrainState; `params` (e.g. a loaded model's) replace the random init."""
    key_params, key_rng = jax.random.split(key)
    if params is None:
        args, kwargs = module.example_inputs(1)
        params = module.init({"params": key_params}, *args, **kwargs)["params"]
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=tuple(params for _ in ema_rates),
        opt_state=optimizer.init(params),
        rng=_raw_key(key_rng),
        sampler_state=sampler.init(),
        bad_steps=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def state_shardings(init, mesh, key, fsdp_min_size: int = 2**14):
    """(abstract state, its shardings) of `init(key)` over `mesh`."""
    abstract = jax.eval_shape(init, key)
    return abstract, parallel.state_shardings(mesh, abstract, fsdp_min_size)


def create_state(init, mesh, key, fsdp_min_size: int = 2**14):
    """(state, its shardings): `init(key)` created directly with its shardings."""
    _, shardings = state_shardings(init, mesh, key, fsdp_min_size)
    return jax.jit(init, out_shardings=shardings)(key), shardings

"""Training checkpoints: orbax's CheckpointManager with the data iterator's state beside the
train state, asynchronous saves, keep-last-N / keep-every-K retention and a save on SIGTERM.

A checkpoint of step s holds two items:
* "state": the TrainState pytree (params, EMA params, optimizer state, step, rng, timestep-sampler
  state, counters), restored with the shardings of an abstract target;
* "data": the iterator state (JSON), so a resumed run reads the very next batch.

orbax writes each step into a temporary directory and renames it when complete, so a process
killed at any moment (even SIGKILL) leaves the last finished checkpoint intact; the unfinished one
is ignored on restart and its temporary directory cleaned up.

Multi-host: every process calls save and restore. Each writes the shards its devices own (one
copy of a replicated array), process 0 writes the JSON item and, after all processes are done
(a barrier), commits the step by the rename; a run with a different number of processes restores
it through the shardings of its own abstract target. The directory may be local (shared by all
processes of a multi-host run) or gs://... (orbax reads and writes both through etils.epath).
"""
from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffjax import paths


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """every: save period in steps; keep: the last N kept; keep_every: checkpoints at multiples of
    K are kept forever (None: none); async_save: write in a background thread."""

    every: int = 1000
    keep: int = 3
    keep_every: int | None = None
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"checkpoint every={self.every}, keep={self.keep}: both must be >= 1")


class PreemptionFlag:
    """A preemption notice (SIGTERM): `reached(dispatch)` is True at the one dispatch where every
    process saves and exits.

    One process: a Python SIGTERM handler sets a flag, and the loop stops at the next dispatch
    boundary (the previous handler is restored by `close()`). Several processes: they must agree on
    the step, or each would save a different one and no checkpoint would be complete. JAX's
    preemption service does that: its own SIGTERM handler (installed by jax.distributed.initialize)
    tells every process of a notice to any of them, and
    `multihost_utils.reached_preemption_sync_point` turns True on all of them at the same
    dispatch index (the largest index any process had reached, plus one); so no Python handler
    is installed then, which would replace JAX's."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        self._multiprocess = jax.process_count() > 1
        if self._multiprocess:
            return
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self._event.set()

    def reached(self, dispatch: int) -> bool:
        """Whether to save and stop after dispatch number `dispatch`. Every process must call it
        after every dispatch, with consecutive numbers (JAX's sync protocol counts in ones)."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(int(dispatch))
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class CheckpointManager:
    """`save(step, state, data_state)`, `restore(abstract_state) -> (state, data_state) | None`."""

    def __init__(self, directory: str | pathlib.Path, config: CheckpointConfig = CheckpointConfig()):
        self.directory = paths.as_path(directory)  # local or gs://... (orbax reads both)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            keep_period=config.keep_every,
            enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True,  # leftovers of a save interrupted by a kill
            create=True,
        )
        # Handlers named up front (not just item names) so that item_metadata can read a
        # checkpoint's shapes without a target: restore(None) needs them.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
        """Start saving (asynchronously when configured); True when a save was started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        return self._manager.save(int(step), args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None):
        """(state, data_state) of `step` (default: the latest), placed with the shardings of
        `abstract_state` (a pytree of jax.ShapeDtypeStruct with .sharding): any mesh and any
        number of processes, whatever the saving run had (each process reads the pieces its
        devices hold). abstract_state=None reads every array whole onto this process's first
        device, as saved trees of arrays (for inspection: no TrainState, any topology). None
        when the directory holds no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        if abstract_state is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_state = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                self._manager.item_metadata(step)["state"])
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["data"] or {})

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)

"""Training checkpoints: orbax's CheckpointManager with the data iterator's state beside the
train state, asynchronous saves, keep-last-N / keep-every-K retention and a save on SIGTERM.

A checkpoint of step s holds two items:
* "state": the TrainState pytree (params, EMA params, optimizer state, step, rng, timestep-sampler
  state, counters), restored with the shardings of an abstract target;
* "data": the iterator state (JSON), so a resumed run reads the very next batch.

orbax writes each step into a temporary directory and renames it when complete, so a process
killed at any moment (even SIGKILL) leaves the last finished checkpoint intact; the unfinished one
is ignored on restart and its temporary directory cleaned up.
"""
from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


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
    """Set by SIGTERM (a preemption notice): the loop saves and exits at the next step boundary.
    The previous handler is restored by `close()`."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class CheckpointManager:
    """`save(step, state, data_state)`, `restore(abstract_state) -> (state, data_state) | None`."""

    def __init__(self, directory: str | pathlib.Path, config: CheckpointConfig = CheckpointConfig()):
        self.directory = pathlib.Path(directory).absolute()
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            keep_period=config.keep_every,
            enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True,  # leftovers of a save interrupted by a kill
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))

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
        `abstract_state` (a pytree of jax.ShapeDtypeStruct with .sharding); None when the
        directory holds no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
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

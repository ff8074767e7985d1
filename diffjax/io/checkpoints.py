"""Training checkpoints: orbax's CheckpointManager with the data iterator's state beside the
train state, asynchronous saves, keep-last-N / keep-every-K retention and a save on SIGTERM.

A checkpoint of step s holds four items:
* "state": the TrainState pytree (params, EMA params, optimizer state, step, rng, timestep-sampler
  state, counters), restored with the shardings of an abstract target;
* "data": the iterator state (JSON), so a resumed run reads the very next batch;
* "model": the description of the model being trained (a DiffusionModel's JSON), so that a run
  directory loads as a bundle (`diffjax.load(workdir)`);
* "checksums": a checksum of every array of the state, verified on restore: a damaged checkpoint is
  reported by name and the previous one used.

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
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


_CHECKSUM_ROW = 32
"""Elements summed per row before the rows are summed: no wider than XLA:CPU's tree-reduction
window (32), so the first sum fuses with the multiply and nothing the size of the array is
materialised (one fused sum over everything was rewritten into reduce-windows over a full-size
product: a scratch buffer as large as the tree, 1.6x a 200 MiB model's size at the peak of a save)."""


def _leaf_checksum(x):
    """sum_i bits(x_i) * (2 i + 1) mod 2^32 over the flattened array: integer arithmetic, so the
    value does not depend on how the array is sharded or the sum ordered, and any single flipped
    bit changes it (an odd multiplier keeps every bit position)."""
    x = jnp.asarray(x).reshape(-1)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        wide = jax.lax.bitcast_convert_type(x, jnp.uint64)
        bits = (wide ^ (wide >> 32)).astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)

    def weighted_sum(b, start, shape):
        # Weights 2 i + 1 of the flat index i = start + row * width + column (uint32 wraps).
        index = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1) + jnp.uint32(start)
        if len(shape) == 2:
            index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, 0) * jnp.uint32(shape[1])
        return jnp.sum(b.reshape(shape) * (index * jnp.uint32(2) + jnp.uint32(1)), axis=-1,
                       dtype=jnp.uint32)

    rows = x.size // _CHECKSUM_ROW
    main = rows * _CHECKSUM_ROW
    # The barrier keeps XLA from merging the two sums back into one (see _CHECKSUM_ROW).
    partial = jax.lax.optimization_barrier(
        weighted_sum(bits[:main], 0, (rows, _CHECKSUM_ROW)))
    tail = weighted_sum(bits[main:], main, (x.size - main,))
    return jnp.sum(partial, dtype=jnp.uint32) + tail


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def _path_name(path) -> str:
    """'a/b/0' for a key path, whether the tree holds dataclasses, dicts or sequences (a
    TrainState and the plain dicts it restores to give the same names)."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def checksums(tree) -> dict[str, int]:
    """A checksum of every array of `tree`, keyed by its path (computed where the arrays live:
    sharded arrays need no gathering)."""
    sums = _checksums(tree)
    return {_path_name(path): int(np.asarray(value.addressable_data(0)
                                             if hasattr(value, "addressable_data") else value))
            for path, value in jax.tree_util.tree_leaves_with_path(sums)}


class CorruptCheckpointError(ValueError):
    """A checkpoint's arrays do not match the checksums written with them."""


def verify_checksums(tree, expected: dict, where: str) -> None:
    """Raise CorruptCheckpointError naming the first array whose checksum differs."""
    got = checksums(tree)
    bad = sorted(k for k in expected if got.get(k) != int(expected[k]))
    if bad:
        raise CorruptCheckpointError(
            f"{where}: {len(bad)} array(s) do not match the checksums written with them (first: "
            f"{bad[0]}): the files were changed or damaged after saving")


class CheckpointManager:
    """`save(step, state, data_state, model)`, `restore(abstract_state) -> (state, data_state)`.

    A checkpoint holds the items "state", "data", "model" (the bundle description of what is
    trained, JSON) and "checksums" (of every array of the state, JSON), verified on restore.
    read_only=True opens the directory without creating or cleaning anything (readers must not
    touch a running trainer's in-progress saves)."""

    ITEMS = ("state", "data", "model", "checksums")

    def __init__(self, directory: str | pathlib.Path, config: CheckpointConfig = CheckpointConfig(),
                 read_only: bool = False):
        self.directory = paths.as_path(directory)  # local or gs://... (orbax reads both)
        self.config = config
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            keep_period=config.keep_every,
            enable_async_checkpointing=config.async_save and not read_only,
            # leftovers of a save interrupted by a kill; never by a reader (it may be in progress)
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        # Handlers named up front (not just item names) so that item_metadata can read a
        # checkpoint's shapes without a target: restore(None) needs them.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "model": ocp.JsonCheckpointHandler(),
                           "checksums": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _has(self, step: int, item: str) -> bool:
        return (self.directory / str(step) / item).exists()

    def save(self, step: int, state: Any, data_state: dict | None, model: dict | None = None, *,
             force: bool = False) -> bool:
        """Start saving (asynchronously when configured); True when a save was started."""
        if self.read_only:
            raise PermissionError(f"{self.directory} was opened read-only")
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
                     checksums=ocp.args.JsonSave(checksums(state)))
        if model is not None:
            items["model"] = ocp.args.JsonSave(model)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def model(self, step: int | None = None) -> dict | None:
        """The bundle description saved with `step` (default: the latest), or None."""
        step = self.latest_step() if step is None else step
        if step is None or not self._has(step, "model"):
            return None
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.JsonRestore()))["model"])

    def _restore_step(self, step: int, abstract_state: Any):
        if abstract_state is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_state = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                self._manager.item_metadata(step)["state"])
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        if self._has(step, "checksums"):
            items["checksums"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if "checksums" in items:
            verify_checksums(restored["state"], dict(restored["checksums"] or {}),
                             f"checkpoint {self.directory}/{step}")
        return restored["state"], dict(restored["data"] or {})

    def restore(self, abstract_state: Any, step: int | None = None, *, log=None):
        """(state, data_state) of `step`, placed with the shardings of `abstract_state` (a pytree
        of jax.ShapeDtypeStruct with .sharding): any mesh and any number of processes, whatever
        the saving run had. abstract_state=None reads every array whole onto this process's first
        device, as saved trees of arrays. Checksums are verified. Without `step`, the newest
        checkpoint that restores and verifies: a damaged or unreadable newer one is skipped with
        a warning naming it (through `log`, default stderr). None when there is no checkpoint."""
        if step is not None:
            return self._restore_step(step, abstract_state)
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        for candidate in reversed(self.all_steps()):
            try:
                result = self._restore_step(candidate, abstract_state)
            except (CorruptCheckpointError, ValueError, OSError, KeyError) as err:
                log(f"diffjax: WARNING: checkpoint step {candidate} in {self.directory} is "
                    f"unusable ({type(err).__name__}: {str(err)[:300]}); falling back to the "
                    f"previous one")
                continue
            self.restored_step = candidate
            return result
        if self.all_steps():
            raise CorruptCheckpointError(
                f"no checkpoint in {self.directory} restores and verifies (steps "
                f"{self.all_steps()}): move the directory away to start afresh, or restore it "
                f"from a copy")
        return None

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

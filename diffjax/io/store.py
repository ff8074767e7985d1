"""`diffjax.save` / `diffjax.load`: a `DiffusionModel` as one orbax checkpoint, and every way in.

A saved bundle is an orbax PyTree checkpoint (readable with plain orbax, no pickle) of
{"weights": {name: params}, "arrays": {...}} whose custom metadata holds the bundle's JSON
description (`DiffusionModel.description()`) and a checksum of every array, checked on load so a
flipped byte is an error, not silently different weights. It is written beside its target and
renamed into place only when complete: a failed save never replaces a good bundle.

`load(source)` accepts a bundle directory, a training run directory (its newest checkpoint), a
directory or file in a format diffjax wrote before the bundle (diffjax.io.legacy), a PyTorch .pt
with a preset, or a pretrained name (diffjax.io.pretrained). Readers open everything read-only.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from diffjax import paths
from diffjax.bundle import FORMAT, DiffusionModel
from diffjax.io.checkpoints import checksums, verify_checksums

METADATA_KEY = "diffjax"


def _checkpointer():
    # Uncompressed: compression buffers about one more copy of the weights while saving (~0.75x
    # of the file measured) and saves ~7% of the disk on float32 weights.
    # A bundle is host arrays written or read by one process: in a multi-process run, orbax's
    # default (every process joins a barrier) would hang when process 0 exports alone.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                               barrier_sync_key_prefix=f"bundle{me}")
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False,
                                                        multiprocessing_options=alone),
                            multiprocessing_options=alone)


def write_atomically(out: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """Run `write(tmp_dir)` in a temporary sibling of `out`, then move the result to `out`
    (replacing what was there) only when it succeeded."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():  # put the good one back
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(model: DiffusionModel, path, *, overwrite: bool = False) -> pathlib.Path:
    """Save `model` as one orbax checkpoint directory at `path`; returns the absolute path.
    An existing `path` is replaced only with overwrite=True, and only once the new one is
    complete."""
    out = pathlib.Path(path).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another path or pass "
                              f"overwrite=True (the old one is replaced only once the new one "
                              f"is complete)")
    arrays = {"weights": dict(model.weights), "arrays": dict(model.arrays)}
    metadata = {METADATA_KEY: model.description(), "checksums": checksums(arrays)}
    checkpointer = _checkpointer()

    def write(tmp):
        checkpointer.save(tmp, ocp.args.PyTreeSave(arrays), custom_metadata=metadata)

    write_atomically(out, write)
    return out


def bundle_metadata(path) -> dict | None:
    """The custom metadata of an orbax PyTree checkpoint directory, or None if it is not one."""
    path = pathlib.Path(path)
    if not (path / "_CHECKPOINT_METADATA").is_file():
        return None
    try:
        return _checkpointer().metadata(path).custom_metadata or {}
    except (OSError, ValueError, KeyError):
        return None


def restore_tree(path, device=None) -> Any:
    """Every array of an orbax PyTree checkpoint, whole, on one device (default: the first)."""
    checkpointer = _checkpointer()
    device = device or jax.local_devices()[0]
    item = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(sharding=jax.sharding.SingleDeviceSharding(device)), item)
    return checkpointer.restore(path, ocp.args.PyTreeRestore(restore_args=restore_args))


def read_bundle(path) -> DiffusionModel:
    """A bundle saved by `save` (checksums verified)."""
    path = pathlib.Path(path).absolute()
    metadata = bundle_metadata(path)
    if not metadata or METADATA_KEY not in metadata:
        raise FileNotFoundError(f"{path} is not a {FORMAT} checkpoint (diffjax.save writes one)")
    tree = restore_tree(path)
    verify_checksums(tree, metadata.get("checksums", {}), str(path))
    return DiffusionModel.from_description(metadata[METADATA_KEY], tree.get("weights", {}),
                                           tree.get("arrays", {}))


def is_bundle(path) -> bool:
    metadata = bundle_metadata(path)
    return bool(metadata) and METADATA_KEY in metadata


def local_path(source) -> pathlib.Path | None:
    """`source` as a local path if it names an existing file or directory, else None."""
    if not isinstance(source, (str, os.PathLike)) or paths.is_remote(source):
        return None
    path = pathlib.Path(source).expanduser()
    return path if path.exists() else None

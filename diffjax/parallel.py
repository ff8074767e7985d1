"""Device mesh, shardings, and host-local <-> global arrays.

diffjax shards with `jax.jit` over a named `Mesh` (the JAX docs' recommendation since `pmap` went
into maintenance): a "data" axis over which the batch is split, and an optional "fsdp" axis over
which parameters and optimizer state are split as well (ZeRO-3 / FSDP: each device keeps 1/fsdp of
every large tensor; XLA all-gathers them for the forward pass). The batch is split over BOTH axes,
so every device sees a distinct slice of it.

The same code runs on one CPU, several local devices, or (after `jax.distributed.initialize()`)
many hosts: every process feeds its own slice of the global batch (`host_to_global`).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over every device


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all), with data = #devices / fsdp.

    Devices are placed by `jax.make_mesh`, which follows the physical topology (TPU ICI rings),
    or, on a multi-slice TPU pod, by `mesh_utils.create_hybrid_device_mesh` with "data" split over
    the slices (only the gradient all-reduce crosses the slower data-centre network; fsdp's
    per-layer all-gathers stay on ICI). Then each process's devices are made contiguous along the
    batch, keeping their topology order: process p's devices hold rows [p B / P, (p + 1) B / P)
    of every global batch, the rows `diffjax.data` gives it, so a global batch is the same rows in
    the same order on any topology. Axes are `AxisType.Auto` (shardings propagate as with
    `jit`'s in/out_shardings; jax.make_mesh's default is Explicit).
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(
            f"fsdp={fsdp} does not divide the {len(devices)} devices: choose a divisor of "
            f"{len(devices)} (1 keeps parameters replicated)"
        )
    shape, auto = (len(devices) // fsdp, fsdp), (AxisType.Auto, AxisType.Auto)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices) // slices} devices of "
                             f"each of the {slices} slices: choose a divisor of "
                             f"{len(devices) // slices} (fsdp stays within a slice)")
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, fsdp), (slices, 1),
                                                    devices)
    else:
        grid = jax.make_mesh(shape, (DATA, FSDP), auto, devices=devices).devices
    return Mesh(process_major(grid), (DATA, FSDP), axis_types=auto)


def process_major(grid: np.ndarray) -> np.ndarray:
    """`grid` (an array of devices) reordered, read row-major, so that each process's devices are
    contiguous and processes come in index order; a stable sort: the order of one process's
    devices is kept, and a grid already in that order is returned unchanged."""
    flat = list(grid.flat)
    order = sorted(range(len(flat)), key=lambda i: flat[i].process_index)
    return np.asarray([flat[i] for i in order], dtype=object).reshape(grid.shape)


def num_batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch dimension is cut into (every device gets one)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim_leading: int = 0) -> NamedSharding:
    """Sharding of a batch-major array; `ndim_leading` unsharded axes may come first (e.g. the
    steps axis of a stack of batches fed to a multi-step dispatch)."""
    return NamedSharding(mesh, P(*([None] * ndim_leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2**14) -> P:
    """The PartitionSpec of one parameter-shaped array: its largest axis divisible by fsdp_size is
    split over "fsdp"; arrays smaller than `min_size` elements (biases, norms: gathering them costs
    more than it saves) and arrays with no divisible axis stay replicated."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_tree: Any, min_size: int = 2**14) -> Any:
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs): parameter-like leaves split over
    "fsdp" by `fsdp_spec`, everything else replicated."""
    size = mesh.shape[FSDP]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size, min_size)), abstract_tree
    )


def host_to_global(tree: Any, sharding: NamedSharding) -> Any:
    """This process's slice of a batch (numpy, batch axis after the sharding's leading axes) ->
    global jax Arrays; with one process this is just a sharded device_put."""
    def put(x):
        x = np.asarray(x)
        spec = sharding.spec
        lead = len(spec) - 1
        global_shape = list(x.shape)
        global_shape[lead] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree.map(put, tree)


def global_to_host(tree: Any) -> Any:
    """Fully materialised numpy copies of global arrays (all-gathered across processes)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of the global batch; checks that every device gets the same share."""
    shards = num_batch_shards(mesh)
    if global_batch % shards:
        raise ValueError(
            f"global batch_size={global_batch} is not divisible by the {shards} devices of the "
            f"mesh {dict(mesh.shape)}: choose a multiple of {shards}"
        )
    return global_batch // jax.process_count()

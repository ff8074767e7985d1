"""Input-pipeline speed on real JPEGs: images/s of the training iterator (decode, guided-diffusion's
BOX-halve + BICUBIC resize + centre crop to --image_size, random flip, scale to [-1, 1]) with 0
(synchronous, on the training thread), 1, 2, 4 grain worker processes (data.workers), and the time of
a training step fed by it beside the same step fed a synthetic batch.

    python bench/data.py [--images 2000] [--source_size 256] [--image_size 64] [--batch 64]
        [--workers 0 1 2 4] [--threads 0] [--steps 20] [--width 32] [--depth 2] [--dir DIR]

The JPEG folder (--images files of about --source_size px, quality 90, 8 classes by file-name prefix)
is written to a temporary directory, or to --dir and reused when it is already there.

The step is a STAND-IN of fixed cost, not diffjax's trainer (which is being reorganised): a jitted
forward + backward + SGD update of a small conv net (--depth 3x3 convs of --width channels at
--image_size, a reconstruction loss), donated state, fed exactly as `diffjax.train` feeds its step:
dispatch step k (asynchronous), then fetch and transfer batch k + 1 while it runs. "synthetic" feeds
one fixed host batch through the same transfer, so the difference is the cost of loading alone.
Target (issue #19): with enough workers the real-input step is within 5 % of the synthetic one, and
images/s grows with workers up to the cores. The workers share the cores with the step: on a
machine with few cores they compete with it.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffjax import data as data_lib


def write_jpegs(folder: pathlib.Path, count: int, size: int, seed: int = 0) -> None:
    """`count` photo-like JPEGs (smooth colour fields + texture noise) of size x (size .. 1.33 size)
    px, named "c{class}_{i}.jpg"; kept when the folder already holds `count` of them."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = size, int(size * rng.uniform(1.0, 4 / 3))
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        image = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"c{i % 8}_{i}.jpg", quality=90)


def throughput(config: data_lib.DataConfig, source, batch: int, workers: int, threads: int,
               batches: int) -> tuple[float, float, float]:
    """(start-up seconds to the first batch, images/s over `batches` batches once the prefetch
    buffers made during the start-up are used up, CPU ms of the calling thread per batch: what
    loading costs the training thread, which on a busy machine says more than images/s)."""
    dataset = data_lib.batched_dataset(config, source, batch)
    with data_lib.BatchIterator(dataset, workers=workers, threads=threads,
                                prefetch=config.prefetch) as iterator:
        start = time.perf_counter()
        iterator.next()
        first = time.perf_counter() - start
        # Drain what was prefetched while the first batch was waited for: steady state only.
        for _ in range(config.prefetch * max(workers, threads, 1)):
            iterator.next()
        start, cpu = time.perf_counter(), time.thread_time()
        for _ in range(batches):
            iterator.next()
        cpu_ms = (time.thread_time() - cpu) / batches * 1e3
        return first, batches * batch / (time.perf_counter() - start), cpu_ms


def stand_in_step(width: int, depth: int, channels: int):
    """(init(key) -> params, jitted step(params, images) -> params): SGD on the reconstruction
    loss of `depth` 3x3 convs (channels -> width -> ... -> channels, ReLU between)."""
    shapes = [(3, 3, channels, width)] + [(3, 3, width, width)] * (depth - 2) + [(3, 3, width, channels)]

    def init(key):
        keys = jax.random.split(key, len(shapes))
        return [jax.random.normal(k, s) / np.sqrt(9 * s[2]) for k, s in zip(keys, shapes)]

    def loss(params, x):
        h = x
        for i, kernel in enumerate(params):
            h = jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h) if i < len(params) - 1 else h
        return jnp.mean(jnp.square(h - x))

    def step(params, x):
        grads = jax.grad(loss)(params, x)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    return init, jax.jit(step, donate_argnums=0)


def step_time(step, params, next_host_batch, steps: int) -> float:
    """Seconds per step of `steps` steps fed as diffjax.train feeds them (see the docstring)."""
    batch = jax.device_put(next_host_batch())
    params = step(params, batch)  # compile and warm up
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(steps):
        params = step(params, batch)
        batch = jax.device_put(next_host_batch())
    jax.block_until_ready(params)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--threads", type=int, default=0, help="data.threads per process")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=15, help="batches timed for images/s")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dir", default="", help="JPEG folder to create or reuse")
    args = parser.parse_args()

    tmp = None if args.dir else tempfile.TemporaryDirectory()
    folder = pathlib.Path(args.dir or tmp.name)
    start = time.perf_counter()
    write_jpegs(folder, args.images, args.source_size)
    megabytes = sum(f.stat().st_size for f in folder.glob("*.jpg")) / 2**20
    print(f"{args.images} JPEGs of ~{args.source_size} px ({megabytes:.0f} MB) in {folder} "
          f"({time.perf_counter() - start:.1f} s); {os.cpu_count()} cores, jax "
          f"{jax.default_backend()}", flush=True)
    config = data_lib.DataConfig(source="folder", path=str(folder), image_size=args.image_size,
                                 channels=3, resize="center_crop", prefetch=args.prefetch)
    source = data_lib.make_source(config)

    print(f"\nimages/s of the iterator (batch {args.batch}, {args.image_size} px, "
          f"threads {args.threads}):")
    for workers in args.workers:
        first, rate, cpu_ms = throughput(config, source, args.batch, workers, args.threads,
                                         args.batches)
        print(f"  workers={workers}: {rate:7.1f} images/s, {cpu_ms:6.1f} ms CPU of the training "
              f"thread per batch (first batch after {first:.2f} s)", flush=True)

    init, step = stand_in_step(args.width, args.depth, 3)
    synthetic = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.image_size,
                                                          args.image_size, 3)).astype(np.float32)
    print(f"\nstand-in train step ({args.depth} convs x {args.width} ch at {args.image_size} px, "
          f"batch {args.batch}, forward + backward + SGD), {args.steps} steps:")
    # Synthetic and real steps alternate, so that a change in the machine's load hits both.
    for workers in args.workers:
        base = step_time(step, init(jax.random.key(0)), lambda: synthetic, args.steps)
        dataset = data_lib.batched_dataset(config, source, args.batch)
        with data_lib.BatchIterator(dataset, workers=workers, threads=args.threads,
                                    prefetch=args.prefetch) as iterator:
            iterator.next()  # start the workers before the clock
            seconds = step_time(step, init(jax.random.key(0)),
                                lambda: iterator.next()["image"], args.steps)
        print(f"  workers={workers}: synthetic {base * 1e3:6.1f} ms/step, real JPEGs "
              f"{seconds * 1e3:6.1f} ms/step ({(seconds / base - 1) * 100:+.1f} %)", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":  # the workers re-import this file (spawn): run only in the parent
    main()

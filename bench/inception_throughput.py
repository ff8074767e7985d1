"""Throughput of FID Inception-v3 feature extraction (images/s), as the evaluator runs it: uint8
NHWC batches through the jit-compiled apply sharded over all local devices, features to host.

    python bench/inception_throughput.py [--batch-size 64] [--sizes 299 64] [--steps 5]
        [--weights pt_inception-2015-12-05-6726825d.pth] [--preprocess pytorch_fid]

Without --weights the network has random weights (speed does not depend on their values).
"""
from __future__ import annotations

from diffjax import hugepages

if __name__ == "__main__":
    hugepages.reexec()  # first: glibc reads its malloc tunables only when a process starts

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.pipelines.evaluation import inception, metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[299, 64])
    p.add_argument("--steps", type=int, default=5, help="timed batches per size")
    p.add_argument("--weights", default=None)
    p.add_argument("--preprocess", choices=inception.PREPROCESSING, default="pytorch_fid")
    args = p.parse_args(argv)

    if args.weights:
        module, variables = inception.load_fid_inception(args.weights, args.preprocess)
    else:
        module = inception.FIDInceptionV3(preprocess=args.preprocess)
        variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    fn = metrics.FeatureExtractor(module, variables, args.batch_size)
    batch = fn.batch_size
    devices = jax.local_devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}; "
          f"global batch {batch}; preprocess {args.preprocess}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        fn(images)  # compile + first run
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn(images)  # returns host arrays: the timing includes transfers both ways
        dt = time.perf_counter() - t0
        print(f"{size}x{size} input, batch {batch}: {args.steps * batch / dt:9.1f} images/s "
              f"({dt / args.steps * 1e3:.0f} ms/batch over {args.steps} batches; "
              f"compile + first batch {first:.1f} s)")


if __name__ == "__main__":
    main()

"""Forward-pass time of the ADM UNet: diffjax (float32 and bfloat16 compute) and, optionally, the
original guided-diffusion PyTorch code on the same machine in the same run.

    python bench/forward.py [--configs cifar10 adm64] [--dtypes float32 bfloat16] [--repeats 5]
        [--warmup 2] [--batch N] [--conv-algorithms direct winograd]
        [--reference-src PATH/TO/guided-diffusion] [--threads 1]

Configurations (guided_diffusion.script_util.create_model flags):
* cifar10: the CIFAR-10 ADM-like model of ../shared/design/TARGETS.md: 32 px, 128 channels, 2 res
  blocks, channel_mult 1,2,2,2, attention at 16 px, 4 heads, learn_sigma, scale-shift norm,
  resblock up/down; batch 16.
* adm64: the released 64x64_diffusion.pt model (the README's MODEL_FLAGS); batch 4 by default.

Compile time (jit lower + compile) is reported separately; the forward time is the median of
`--repeats` calls after `--warmup` calls, each waited for with block_until_ready. The contenders
are timed round-robin (one call of each in turn), so that other jobs on a shared machine slow them
alike. Weights are random
(speed does not depend on their values); with --reference-src the SAME weights are loaded into the
PyTorch model, its output is compared with diffjax's float32 output (a check that both sides time the
same network), and the ratio diffjax / PyTorch is printed (target on CPU: <= 0.8).
"""
from __future__ import annotations

from diffjax import cpu_flags, hugepages

if __name__ == "__main__":
    hugepages.reexec()  # first: glibc reads its malloc tunables only when a process starts

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.compat import gd_models

CONFIGS = {
    "cifar10": (16, dict(image_size=32, num_channels=128, num_res_blocks=2, channel_mult="1,2,2,2",
                         attention_resolutions="16", num_heads=4, learn_sigma=True,
                         use_scale_shift_norm=True, resblock_updown=True)),
    "adm64": (4, dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
                      class_cond=True, dropout=0.1, learn_sigma=True, num_head_channels=64,
                      resblock_updown=True, use_new_attention_order=True, use_scale_shift_norm=True)),
}


def _interleaved_medians(fns: dict, repeats: int, warmup: int) -> dict:
    """(median wall seconds, median process-CPU / wall) per callable, timed round-robin so that
    other jobs on a shared machine load every contender alike. CPU / wall shows how many cores a
    contender really got (below the thread count when other jobs compete)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    walls = {name: [] for name in fns}
    usage = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            walls[name].append(wall)
            usage[name].append((time.process_time() - c0) / wall)
    return {name: (statistics.median(walls[name]), statistics.median(usage[name])) for name in fns}


def random_state_dict(shapes, rng) -> dict:
    """Random float32 weights for a state-dict layout (key -> shape), scaled like PyTorch's default
    init so activations stay O(1): speed does not depend on the values."""
    return {k: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:])) if len(s) > 1 else
                0.1 * rng.standard_normal(s) + (0.0 if k.endswith("bias") else 1.0)
                ).astype(np.float32) for k, s in shapes.items()}


def _inputs(flags, batch, rng):
    size = flags["image_size"]
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    y = rng.integers(0, gd_models.NUM_CLASSES, batch) if flags.get("class_cond") else None
    return x, t, y


def diffjax_forward(flags, dtype, state_dict, x, t, y, conv_algorithm="direct"):
    """(compile seconds, forward thunk, float32 output) of the jit-compiled diffjax model."""
    module = gd_models.create_model(**flags, use_fp16=(dtype == "bfloat16"))
    module = module.clone(conv_algorithm=conv_algorithm)
    variables = gd_models.load_state_dict(module, state_dict)
    kw = {} if y is None else {"y": jnp.asarray(y)}
    args = (variables, jnp.asarray(x), jnp.asarray(t), kw)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda v, x, t, kw: module.apply(v, x, t, **kw)).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = np.asarray(compiled(*args), np.float32)
    return compile_s, lambda: compiled(*args).block_until_ready(), out


def torch_forward(flags, state_dict, x, t, y, threads):
    """(forward thunk, NHWC output) of guided-diffusion's own model, float32, eval, no_grad."""
    import torch
    from guided_diffusion import script_util

    torch.set_num_threads(threads)
    model = script_util.create_model(**{**flags, "use_fp16": False}).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    tt = torch.from_numpy(t)
    kw = {} if y is None else {"y": torch.from_numpy(y)}

    def forward():
        with torch.no_grad():
            return model(xt, tt, **kw)

    return forward, forward().numpy().transpose(0, 2, 3, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["cifar10", "adm64"])
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=None, help="override the per-config batch size")
    p.add_argument("--conv-algorithms", nargs="+", choices=["direct", "winograd", "auto"],
                   default=["direct"], help="diffjax's conv_algorithm field: each one listed is "
                   "timed, interleaved with the others")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reference-src", default=None,
                   help="a guided-diffusion checkout: also time the original PyTorch code")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both sides (default: all cores). 1 makes XLA single-threaded "
                        "too, the fairest comparison on a machine shared with other jobs")
    p.add_argument("--xla-cpu-flags", choices=sorted(cpu_flags.FLAG_SETS),
                   default=cpu_flags.DEFAULT,
                   help="XLA:CPU flag set (diffjax.cpu_flags), chosen before JAX starts")
    args = p.parse_args(argv)
    cpu_flags.use(args.xla_cpu_flags)
    if args.threads == 1:  # read when the CPU backend starts, i.e. at the first jax.devices()
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                                   "false intra_op_parallelism_threads=1").strip()
    elif args.threads is not None and args.threads != os.cpu_count():
        print(f"note: --threads {args.threads} limits PyTorch only; XLA uses all {os.cpu_count()} cores")
    threads = args.threads or os.cpu_count()

    if args.reference_src:
        sys.path.insert(0, os.path.abspath(args.reference_src))
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} (XLA:CPU flags {args.xla_cpu_flags}) on {dev.platform} ({dev.device_kind}); {os.cpu_count()} CPUs, "
          f"{threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f}; median of {args.repeats} after {args.warmup} warm-up")
    rng = np.random.default_rng(0)
    for name in args.configs:
        batch, flags = CONFIGS[name]
        batch = args.batch or batch
        shapes = gd_models.state_dict_shapes(gd_models.create_model(**flags))
        state_dict = random_state_dict(shapes, rng)
        n_params = sum(int(np.prod(s)) for s in shapes.values())
        x, t, y = _inputs(flags, batch, rng)
        print(f"\n{name}: {n_params / 1e6:.1f} M params, batch {batch}, {flags['image_size']} px")
        fns, outs = {}, {}
        for dtype in args.dtypes:
            for algorithm in args.conv_algorithms:
                label = dtype if args.conv_algorithms == ["direct"] else f"{dtype} {algorithm}"
                compile_s, fns[f"diffjax {label}"], outs[label] = diffjax_forward(
                    flags, dtype, state_dict, x, t, y, algorithm)
                print(f"  diffjax {label:8s}: compile {compile_s:.1f} s")
        ref = None
        if args.reference_src:
            try:
                fns["PyTorch float32"], ref = torch_forward(flags, state_dict, x, t, y, threads)
            except ImportError as err:
                print(f"  PyTorch reference not run: {err}")
        medians = _interleaved_medians(fns, args.repeats, args.warmup)
        for label, (seconds, cores) in medians.items():
            print(f"  {label:26s}: forward {seconds:7.3f} s   (CPU time / wall time {cores:.2f})")
        if ref is not None:
            torch_s = medians["PyTorch float32"][0]
            for label, out in outs.items():
                err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
                print(f"  ratio diffjax {label} / PyTorch float32: "
                      f"{medians[f'diffjax {label}'][0] / torch_s:.2f}   (output rel. difference {err:.1e})")
        print(f"  load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

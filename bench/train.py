"""Training-step speed of diffjax (and, with --reference-src, of guided-diffusion's PyTorch step on
the same machine in the same run): step time, images/s, compile time, peak memory, and where the
device's peak is known (or --peak-tflops) the model FLOP utilisation (MFU) from XLA's cost analysis.

    python bench/train.py [--configs default cifar10] [--batch N] [--repeats 5] [--warmup 2]
        [--dtype float32|bfloat16] [--attention auto] [--reference-src PATH/TO/guided-diffusion]
        [--threads 2]

Configurations (../shared/design/TARGETS.md):
* default: the bundled Fashion-MNIST UNet (32 ch, 1 res block, mult 1,2,2, attention at 8x8, 4
  heads, scale-shift, up/down resblocks, learn_sigma, 10 classes), 1 channel 32x32, batch 8;
* cifar10: the CIFAR-10 ADM-like model (128 ch, 2 res blocks, mult 1,2,2,2, attention at 16, 4
  heads, learn_sigma, scale-shift, up/down; 42.9 M params), 3 channels, batch 16;
* adm64: guided-diffusion's ImageNet-64 model (192 ch, 3 res blocks, attention 32,16,8, 64-channel
  heads, class-conditional, new attention order), batch 4 per device.

One step = the hybrid loss (MSE + L_vlb on a stop-gradient mean) at uniform t, backward, global
norm clipping (diffjax only), AdamW, EMA. Times are medians of --repeats dispatches after --warmup,
each waited for; the PyTorch step is GD's TrainLoop.run_step without its logging (forward_backward
on the batch, optimizer step, EMA update). Ratio target on CPU: diffjax <= 0.8x PyTorch.
"""
from __future__ import annotations

from diffjax import cpu_flags, hugepages

if __name__ == "__main__":
    hugepages.reexec()  # first: glibc reads its malloc tunables only when a process starts

import argparse
import os
import resource
import statistics
import sys
import time

import jax
import ml_collections
import numpy as np

from diffjax import parallel
from diffjax.pipelines import training as T
from diffjax.pipelines.training import loop, metrics
from diffjax.pipelines.training.state import create_state

CONFIGS = {
    "default": (8, 32, 1, 10, dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                                   attention_resolutions=(8,), num_heads=4,
                                   use_scale_shift_norm=True, resblock_updown=True)),
    "cifar10": (16, 32, 3, 0, dict(model_channels=128, num_res_blocks=2, channel_mult=(1, 2, 2, 2),
                                   attention_resolutions=(16,), num_heads=4,
                                   use_scale_shift_norm=True, resblock_updown=True)),
    "adm64": (4, 64, 3, 1000, dict(model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
                                   attention_resolutions=(32, 16, 8), num_head_channels=64,
                                   use_scale_shift_norm=True, resblock_updown=True,
                                   use_new_attention_order=True)),
}


def experiment(name, batch, dtype, attention="einsum"):
    default_batch, size, channels, classes, model = CONFIGS[name]
    c = ml_collections.ConfigDict()
    c.data = dict(source="fashion_mnist", image_size=size, channels=channels)
    c.model = {**model, "attention_impl": attention}
    c.diffusion = dict(beta_schedule="cosine", num_steps=1000, variance="learned_range")
    c.conditioning = {"class": dict(num_classes=classes)} if classes else {}
    c.train = dict(task="diffusion", batch_size=batch or default_batch, total_steps=10,
                   ema_rates=(0.9999,), compute_dtype=dtype)
    c.optim = dict(lr=1e-4, weight_decay=0.0)
    return c


def _median(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_diffjax(config, repeats, warmup):
    trainer, _, _ = T.trainer_from_config(config)
    mesh = parallel.make_mesh(1)
    state, shardings = create_state(trainer.init, mesh, jax.random.PRNGKey(0))
    tc = trainer.config
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (1, tc.batch_size) + trainer.image_shape).astype(np.float32),
             # Every config here has 10 or 1000 classes.
             "label": rng.integers(0, 10, (1, tc.batch_size)).astype(np.int32)}
    batch = parallel.host_to_global(batch, parallel.batch_sharding(mesh, 1))
    start = time.perf_counter()
    lowered = T.compile_steps(trainer, mesh, shardings).lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def step():
        holder[0], out = compiled(holder[0], batch)
        jax.block_until_ready(out)

    seconds = _median(step, repeats, warmup)
    # The whole batch's count (every device's share); on a GPU from a CPU lowering of the step.
    flops = loop.step_flops(trainer, mesh, shardings, state, batch, lowered)
    n_params = sum(x.size for x in jax.tree.leaves(holder[0].params))
    device = jax.devices()[0]
    peak_mem = None
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        peak_mem = stats.get("peak_bytes_in_use", 0) / 2**30
    return dict(seconds=seconds, compile_s=compile_s, flops=flops, params=n_params, peak_gib=peak_mem)


def bench_torch(name, batch, repeats, warmup, threads):
    import torch
    from guided_diffusion import script_util
    from guided_diffusion.resample import UniformSampler

    torch.set_num_threads(threads)
    default_batch, size, channels, classes, model = CONFIGS[name]
    batch = batch or default_batch
    flags = dict(model)
    rates = flags.pop("attention_resolutions")
    unet = script_util.create_model(
        size, flags.pop("model_channels"), flags.pop("num_res_blocks"),
        channel_mult=",".join(map(str, flags.pop("channel_mult"))),
        attention_resolutions=",".join(map(str, rates)), learn_sigma=True,
        class_cond=bool(classes), **flags)
    if channels != 3:  # GD's factory is RGB-only: swap the first and last convs
        from guided_diffusion.nn import conv_nd
        unet.input_blocks[0][0] = conv_nd(2, channels, unet.input_blocks[0][0].out_channels, 3, padding=1)
        unet.out[-1] = conv_nd(2, unet.out[-1].in_channels, 2 * channels, 3, padding=1)
    if classes:
        unet.label_emb = torch.nn.Embedding(classes, unet.label_emb.embedding_dim)
    diffusion = script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True,
                                                      noise_schedule="cosine")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in unet.parameters()]
    sampler = UniformSampler(diffusion)
    x = torch.rand(batch, channels, size, size) * 2 - 1
    kwargs = {"y": torch.randint(0, classes, (batch,))} if classes else {}

    def step():
        opt.zero_grad()
        t, weights = sampler.sample(batch, "cpu")
        losses = diffusion.training_losses(unet, x, t, model_kwargs=kwargs)
        (losses["loss"] * weights).mean().backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.mul_(0.9999).add_(p, alpha=1 - 0.9999)

    return _median(step, repeats, warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["default", "cifar10"])
    p.add_argument("--batch", type=int, default=None, help="override the per-config global batch")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["einsum", "xla", "cudnn", "auto"], default="einsum",
                   help="the UNet's attention_impl (auto: cuDNN flash attention on a GPU in bf16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reference-src", default=None, help="a guided-diffusion checkout")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s per device for the MFU (default: the device's datasheet)")
    p.add_argument("--xla-cpu-flags", choices=sorted(cpu_flags.FLAG_SETS),
                   default=cpu_flags.default(training=True),
                   help="XLA:CPU flag set (diffjax.cpu_flags), chosen before JAX starts")
    args = p.parse_args(argv)
    cpu_flags.use(args.xla_cpu_flags)
    if args.reference_src:
        sys.path.insert(0, os.path.abspath(args.reference_src))
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} (XLA:CPU flags {args.xla_cpu_flags}) on {dev.platform} ({dev.device_kind}), {jax.device_count()} "
          f"device(s); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median of "
          f"{args.repeats} after {args.warmup} warm-up")
    for name in args.configs:
        config = experiment(name, args.batch, args.dtype, args.attention)
        batch = config.train.batch_size
        rss0 = _rss_gib()
        r = bench_diffjax(config, args.repeats, args.warmup)
        print(f"\n{name}: {r['params'] / 1e6:.2f} M params, global batch {batch}, {args.dtype}")
        mem = (f"peak device memory {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else
               f"peak RSS {_rss_gib():.2f} GiB (+{_rss_gib() - rss0:.2f})")
        print(f"  diffjax : step {r['seconds']:.3f} s, {batch / r['seconds']:.1f} images/s, "
              f"compile {r['compile_s']:.1f} s, {mem}")
        dtype = args.dtype if args.dtype != "auto" else \
            ("float32" if dev.platform == "cpu" else "bfloat16")  # TrainConfig's "auto"
        peak = args.peak_tflops * 1e12 or metrics.peak_flops(dev.device_kind, dtype)
        if peak and r["flops"]:
            mfu = metrics.mfu(r["flops"], r["seconds"], peak, jax.device_count())
            print(f"  MFU     : {100 * mfu:.1f} % of {peak / 1e12:g} TFLOP/s per device ({dtype}; "
                  f"{r['flops'] / 1e12:.3g} TFLOP per step by XLA's cost analysis)")
        if args.reference_src:
            try:
                ref = bench_torch(name, args.batch, args.repeats, args.warmup, args.threads)
            except ImportError as err:
                print(f"  PyTorch reference not run: {err}")
                continue
            print(f"  PyTorch : step {ref:.3f} s, {batch / ref:.1f} images/s ({args.threads} threads)")
            print(f"  ratio diffjax / PyTorch: {r['seconds'] / ref:.2f}  (target <= 0.8 on CPU)")


if __name__ == "__main__":
    main()

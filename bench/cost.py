"""FLOPs, memory and MFU of the released models' train step and sampling step, from XLA's
ahead-of-time analysis: the programs are compiled for abstract shapes (no weights are made or read)
on whatever backend JAX finds, for a given mesh and batch.

    python bench/cost.py --preset adm-64 --batch 8 [--devices 4 --fsdp 4] [--dtype bfloat16]
        [--remat] [--variants main] [--step-time 0.52 --peak-tflops 989]
    python bench/cost.py --flags "--image_size 32 --num_channels 64 ..." --batch 4   (GD flags)

Presets: adm-64, adm-128, adm-256, adm-256-uncond, adm-512, the upsamplers adm-64-256 and
adm-128-512, glide-base, glide-upsample, or any released checkpoint's own name (64x64_diffusion,
base, lsun_bedroom, ...: diffjax.io.convert.preset_config).

* Train step: the one `python -m diffjax train` compiles to fine-tune the preset (its loss, AdamW,
  one EMA; parameters and optimizer state float32, compute in --dtype, default the preset's own:
  bfloat16 for use_fp16 presets), over a (data, fsdp) mesh of --devices devices (on CPU that many
  host devices are made). FLOPs per image: XLA's cost analysis of the lowered step (the whole
  batch, as written, before XLA's optimisations; with --remat the recomputed forward pass counts
  too) / batch; the compiled program's count (per device, after optimisation) is shown beside it.
  XLA:GPU gives no count of a lowered program: there the programs are lowered once more for one
  CPU device (traced as for the GPU) and counted.
* One sampling step: the denoiser and a DDIM update, unguided (classifier-free guidance doubles
  the denoiser's batch), the batch split over every device and the parameters replicated as
  diffjax.sample does; a text model's caption is encoded once per request, not in the step.
* Peak memory per device: XLA's memory analysis of the compiled program (arguments, outputs and
  temporaries, the donated state aliased), for the train step without and with rematerialisation
  (the network's use_checkpoint) and without and with FSDP (--fsdp F, or all devices, when
  --devices > 1).
* The largest batch that fits: the memory of a program is linear in its per-device batch b,
  fixed + b * per_image (fixed: the state, its gradients and the optimizer's temporaries;
  per_image: activations), both fitted from compiles at --batch and twice --batch; a device of
  C GB (nominal, taken as GiB) holds b <= (usable * C - fixed) / per_image, usable = --usable
  (default 0.75, JAX's default share of GPU memory, XLA_PYTHON_CLIENT_MEM_FRACTION). Measured on
  CPU this estimates an accelerator: XLA:GPU and XLA:TPU fuse differently, and a GPU's
  convolution workspace comes on top. On a device that reports its memory limit
  (memory_stats()["bytes_limit"], GPU / TPU) the largest batch on that device is printed too.
* MFU: with --step-time (seconds per train step measured at --batch on --devices devices),
  train FLOPs per step / step time / (peak x devices); peak: --peak-tflops per device, else the
  datasheet value of the device JAX finds (diffjax.pipelines.training.metrics.PEAK_TFLOPS).

The last line, for scripts (peak: the train step at --batch, as --remat and --fsdp ask):
    cost: NAME train GFLOP/image <f> sample-step GFLOP/image <g> peak GiB/device <m>
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import parallel
from diffjax.bundle import DiffusionModel
from diffjax.compat.native import bundle_parts
from diffjax.conditioning import Text
from diffjax.core import guidance as G
from diffjax.core import samplers as SM
from diffjax.io import convert
from diffjax.models.registry import build_network
from diffjax.pipelines.training import loop, metrics
from diffjax.pipelines.training.config import experiment_from_config
from diffjax.pipelines.training.state import state_shardings
from diffjax.pipelines.training.step import Trainer, build_trainer, compile_steps

PRESETS = {"adm-64": "64x64_diffusion", "adm-128": "128x128_diffusion",
           "adm-256": "256x256_diffusion", "adm-256-uncond": "256x256_diffusion_uncond",
           "adm-512": "512x512_diffusion", "adm-64-256": "64_256_upsampler",
           "adm-128-512": "128_512_upsampler", "glide-base": "base", "glide-upsample": "upsample"}
CAPACITIES_GB = (16, 80, 141)
GIB = 2**30


# --------------------------------------------------------------------------- the models


def preset_model(preset: str | None = None, flags: str | None = None) -> DiffusionModel:
    """The DiffusionModel of a preset (an alias of PRESETS or a released checkpoint's name) or
    of a guided-diffusion flag string, without weights: its network, spec and conditioning."""
    config = convert.preset_config(flags=flags) if flags is not None else \
        convert.preset_config(PRESETS.get(preset.lower(), preset))
    return DiffusionModel(weights={"params": {}}, **bundle_parts(config, convert.build_model(config)))


def compute_dtype(model: DiffusionModel, dtype: str = "preset") -> str:
    """`dtype`, or for "preset" the network's own compute dtype."""
    return model.network.get("dtype", "float32") if dtype == "preset" else dtype


def preset_trainer(model: DiffusionModel, batch: int, *, dtype: str = "preset",
                   remat: bool = False, fsdp: int = 1) -> Trainer:
    """The Trainer that fine-tunes `model` (`diffjax train` with init_from the model) at global
    `batch`, computing in `dtype`."""
    h, _, c = model.image_shape
    config = ml_collections.ConfigDict(dict(
        data=dict(image_size=h, channels=c),
        train=dict(batch_size=batch, total_steps=1, compute_dtype=compute_dtype(model, dtype),
                   remat=remat, fsdp=fsdp),
        init_from=model.provenance.get("name") or "preset"))
    return build_trainer(experiment_from_config(config, model))


def _sharded(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def train_inputs(trainer: Trainer, mesh, batch: int):
    """(abstract state, its shardings, abstract batches [1, batch, ...]) of a train step."""
    abstract, shardings = state_shardings(trainer.init, mesh, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    shapes = {"image": (trainer.image_shape, jnp.float32), "label": ((), jnp.int32)}
    text = trainer.conditioning.get(Text)
    if text is not None:
        shapes.update(tokens=((text.text_ctx,), jnp.int32), mask=((text.text_ctx,), jnp.bool_))
    batches = {k: jax.ShapeDtypeStruct((1, batch) + shape, dtype) for k, (shape, dtype) in
               shapes.items()}
    return state, shardings, _sharded(batches, parallel.batch_sharding(mesh, 1))


def lower_train_step(trainer: Trainer, mesh, batch: int):
    """The lowered train step (compile_steps, one step per dispatch) for abstract inputs."""
    state, shardings, batches = train_inputs(trainer, mesh, batch)
    return compile_steps(trainer, mesh, shardings).lower(state, batches)


def lower_sample_step(model: DiffusionModel, mesh, batch: int, dtype: str = "preset"):
    """One unguided DDIM step x_t -> x_{t-1} of `model`'s network computing in `dtype`, lowered
    for abstract inputs: the batch split over the mesh, the parameters replicated; a caption
    enters as its encoding (text_emb), as diffjax.sample passes it."""
    module = build_network(model.network, dtype=jnp.dtype(compute_dtype(model, dtype)))
    schedule, config = model.spec.schedule(), model.spec.config

    def init(key):
        args, kwargs = module.example_inputs(1)
        return module.init(key, *args, **kwargs)

    variables = jax.eval_shape(init, jax.random.PRNGKey(0))
    (x, _), kwargs = jax.eval_shape(lambda: module.example_inputs(batch))
    if "tokens" in kwargs:
        kwargs["text_emb"] = jax.eval_shape(
            functools.partial(module.apply, method="get_text_emb"), variables,
            kwargs.pop("tokens"), kwargs.pop("mask"))

    def step(variables, x, t, key, kwargs):
        ctx = SM.Context(schedule=schedule, model_kwargs=kwargs, clip_denoised=True,
                         guidance=G.chain(), config=config,
                         model_fn=functools.partial(module.apply, variables))
        return SM.DDIM().step(ctx, {}, x, t, key)[0]

    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(step).lower(
        _sharded(variables, replicated), _sharded(x, split),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated), _sharded(kwargs, split))


# --------------------------------------------------------------------------- the accounting


@dataclasses.dataclass(frozen=True)
class Cost:
    """What XLA says of one program: flops of the whole batch (lowered), flops per device
    (compiled), peak bytes per device, and the seconds spent lowering and compiling."""

    flops: float | None
    flops_per_device: float | None
    peak_bytes: int
    compile_s: float


def peak_bytes(compiled) -> int:
    """Memory of one device running `compiled`: arguments + outputs + temporaries - the donated
    arguments the outputs reuse (XLA's buffer assignment). (XLA:CPU's own peak_memory_in_bytes
    counts only the arguments.)"""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def analyse(lower) -> Cost:
    """Lower (`lower()` -> a jax Lowered) and compile a program, and read its cost. On CPU the
    program is compiled without LLVM's optimisations (it never runs; XLA's passes and buffer
    assignment, which the counts come from, are unchanged; a third less compile time)."""
    start = time.perf_counter()
    lowered = lower()
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    compiled = lowered.compile(compiler_options=options)
    seconds = time.perf_counter() - start
    return Cost(metrics.program_flops(lowered), metrics.program_flops(compiled),
                peak_bytes(compiled), seconds)


def fit_memory(b1: int, m1: float, b2: int, m2: float) -> tuple[float, float]:
    """(fixed bytes, bytes per image) of the line through (b1, m1) and (b2, m2), b the per-device
    batch, m the per-device peak."""
    per_image = (m2 - m1) / (b2 - b1)
    return m1 - per_image * b1, per_image


def largest_batch(fixed: float, per_image: float, capacity_bytes: float, devices: int) -> int:
    """The largest global batch (a multiple of `devices`) whose per-device share fits
    `capacity_bytes`: fixed + b * per_image <= capacity; 0 when not even one image fits."""
    room = capacity_bytes - fixed
    if room < per_image:
        return 0
    return int(room // max(per_image, 1.0)) * devices


# --------------------------------------------------------------------------- the script


def _variants(args, devices: int) -> list[tuple[bool, int]]:
    """(remat, fsdp) of every train-step program to measure, the main one (the flags') first."""
    main = (args.remat, args.fsdp)
    if args.variants == "main":
        return [main]
    fsdp = args.fsdp if args.fsdp > 1 else devices
    combos = [(r, f) for f in sorted({1, fsdp}) for r in (False, True)]
    return [main] + [c for c in combos if c != main]


def _label(remat: bool, fsdp: int) -> str:
    return "+".join(["remat"] * remat + [f"fsdp={fsdp}"] * (fsdp > 1)) or "plain"


def _gf(flops, batch) -> str:
    return "n/a" if flops is None else f"{flops / batch / 1e9:.2f}"


def cost_line(out: dict) -> str:
    """The script's last line (the module docstring's format) from main's result."""
    def number(x):  # nan where the backend gave no count (jax 0.11's GPU lowering gives none)
        return f"{x:.3f}" if x else "nan"

    return (f"cost: {out['name']} train GFLOP/image {number(out['train_gflop_per_image'])} "
            f"sample-step GFLOP/image {number(out['sample_gflop_per_image'])} "
            f"peak GiB/device {number(out['peak_gib'])}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help=f"one of {', '.join(PRESETS)} or a released name")
    which.add_argument("--flags", help="a guided-diffusion flag string instead of a preset")
    p.add_argument("--batch", type=int, default=8, help="global batch (a multiple of --devices)")
    p.add_argument("--devices", type=int, default=0,
                   help="mesh size (default: every device; on CPU, host devices to make)")
    p.add_argument("--fsdp", type=int, default=1, help="the mesh's fsdp axis for the main program")
    p.add_argument("--remat", action="store_true", help="the main program rematerialises")
    p.add_argument("--dtype", default="preset", choices=["preset", "float32", "bfloat16"])
    p.add_argument("--variants", default="all", choices=["all", "main"],
                   help="all: also with/without remat and FSDP; main: only the flags' program")
    p.add_argument("--usable", type=float, default=0.75, help="usable share of device memory")
    p.add_argument("--step-time", type=float, default=0.0, help="a measured train step, seconds")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s per device")
    args = p.parse_args(argv)
    if args.devices:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before any JAX call
    devices = jax.devices()[:args.devices or None]
    n = len(devices)
    if args.devices and n < args.devices:
        p.error(f"--devices {args.devices}: JAX finds only {n} {jax.default_backend()} devices")
    if args.batch % n:
        p.error(f"--batch {args.batch} is not a multiple of the {n} devices")
    name = args.preset or "flags"
    model = preset_model(args.preset, args.flags)
    dtype = compute_dtype(model, args.dtype)
    out = {"name": name, "dtype": dtype, "devices": n, "batch": args.batch}
    print(f"{name}: {model.network['class']}, {'x'.join(map(str, model.image_shape))}, compute "
          f"{dtype}, {n} {jax.default_backend()} device(s) ({devices[0].device_kind}), global "
          f"batch {args.batch}; jax {jax.__version__}", flush=True)

    variants = _variants(args, n)
    table = {}
    for remat, fsdp in variants:
        mesh = parallel.make_mesh(fsdp, devices)
        costs = []
        for batch in (args.batch, 2 * args.batch):
            trainer = preset_trainer(model, batch, dtype=args.dtype, remat=remat, fsdp=fsdp)
            costs.append(analyse(functools.partial(lower_train_step, trainer, mesh, batch)))
            print(f"  compiled the train step ({_label(remat, fsdp)}, batch {batch}) in "
                  f"{costs[-1].compile_s:.1f} s", file=sys.stderr, flush=True)
        per_device = args.batch // n
        fixed, per_image = fit_memory(per_device, costs[0].peak_bytes, 2 * per_device,
                                      costs[1].peak_bytes)
        table[(remat, fsdp)] = (costs, fixed, per_image)
    train, _, _ = table[variants[0]]
    mesh = parallel.make_mesh(1, devices)
    sample = analyse(functools.partial(lower_sample_step, model, mesh, args.batch, args.dtype))
    if train[0].flops is None and jax.default_backend() != "cpu":
        # XLA:GPU counts no lowered program (jax 0.10-0.11): the same programs, traced as for
        # this backend, lowered (not compiled) for one CPU device (the trainer's own count,
        # loop.step_flops, for the train step).
        trainer = preset_trainer(model, args.batch, dtype=args.dtype, remat=args.remat)
        state, shardings, batches = train_inputs(trainer, mesh, args.batch)
        train[0] = dataclasses.replace(train[0], flops=loop.step_flops(
            trainer, mesh, shardings, state, batches, lowered=None))
        cpu = parallel.make_mesh(1, jax.devices("cpu")[:1])
        sample = dataclasses.replace(sample, flops=metrics.program_flops(
            lower_sample_step(model, cpu, args.batch, args.dtype)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(
        preset_trainer(model, args.batch, dtype=args.dtype).init, jax.random.PRNGKey(0)).params))

    print(f"\n{n_params / 1e6:.1f} M parameters")
    print(f"train step  GFLOP/image {_gf(train[0].flops, args.batch)} (lowered; compiled "
          f"{_gf(train[0].flops_per_device and train[0].flops_per_device * n, args.batch)})")
    print(f"sample step GFLOP/image {_gf(sample.flops, args.batch)} (one DDIM step; compiled "
          f"{_gf(sample.flops_per_device and sample.flops_per_device * n, args.batch)}), peak "
          f"{sample.peak_bytes / GIB:.2f} GiB/device, compiled in {sample.compile_s:.1f} s")
    usable = ", ".join(f"{c}" for c in CAPACITIES_GB)
    print(f"\ntrain step memory per device (XLA memory analysis; fixed + per image fitted at "
          f"{args.batch // n} and {2 * args.batch // n} images per device)")
    print(f"{'program':<18}{'peak GiB':>10}{'fixed GiB':>11}{'MiB/image':>11}   largest global "
          f"batch in {usable} GB x {args.usable:g}{'compile s':>12}")
    for (remat, fsdp), (costs, fixed, per_image) in table.items():
        fits = [largest_batch(fixed, per_image, args.usable * c * GIB, n) for c in CAPACITIES_GB]
        print(f"{_label(remat, fsdp):<18}{costs[0].peak_bytes / GIB:>10.2f}{fixed / GIB:>11.2f}"
              f"{per_image / 2**20:>11.1f}   {' / '.join(map(str, fits)):<37}"
              f"{sum(c.compile_s for c in costs):>10.1f}")
        out.setdefault("programs", {})[_label(remat, fsdp)] = dict(
            peak_gib=costs[0].peak_bytes / GIB, fixed_gib=fixed / GIB,
            mib_per_image=per_image / 2**20, fits=dict(zip(CAPACITIES_GB, fits)))

    # The device's own limit (JAX's usable share already taken), where the backend reports one.
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        _, fixed, per_image = table[variants[0]]
        out["fits_here"] = largest_batch(fixed, per_image, limit, n)
        print(f"largest global batch of {_label(*variants[0])} on these devices ({limit / GIB:.1f} "
              f"GiB usable each): {out['fits_here']}")

    peak = args.peak_tflops * 1e12 or metrics.peak_flops(devices[0].device_kind, dtype)
    if args.step_time and peak and train[0].flops:
        value = metrics.mfu(train[0].flops, args.step_time, peak, n)
        out["mfu"] = value
        print(f"\nMFU {100 * value:.1f} % at {args.step_time:g} s per step of {args.batch} images "
              f"on {n} x {peak / 1e12:g} TFLOP/s")
    elif args.step_time:
        print("\nMFU: the device's peak is unknown; pass --peak-tflops")
    out.update(train_gflop_per_image=(train[0].flops or 0) / args.batch / 1e9,
               sample_gflop_per_image=(sample.flops or 0) / args.batch / 1e9,
               peak_gib=train[0].peak_bytes / GIB, params=n_params)
    print(cost_line(out), flush=True)
    return out


if __name__ == "__main__":
    main()

"""Sampling speed: 50-step DDIM on the CIFAR-10 ADM-like model (batch 16), with and without
classifier guidance; optionally guided-diffusion's own ddim_sample_loop on the same machine, in the
same run, with the same weights.

    python bench/sample.py [--steps 50] [--batch 16] [--repeats 2] [--no-guidance]
        [--reference-src PATH/TO/guided-diffusion] [--threads 2]

diffjax runs the whole loop as one jit-compiled program (compile time reported separately: the
first call minus a steady-state call); GD runs its Python loop. The guided runs use a noisy
classifier of the same width (EncoderUNetModel, attention pool, 10 classes) at scale 1.0. The
ratio diffjax / PyTorch is printed per workload (target on CPU: <= 0.5).

Time to equal quality: the cheapest cell of the committed steps-versus-quality table
(bench/results/steps_quality.json, --table) whose Frechet distance is at most DDIM-50's, run on this
model with that solver, grid and NFE, against GD's DDIM-50 (with --reference-src and --steps 50).
"""
from __future__ import annotations

from diffjax import cpu_flags, hugepages

if __name__ == "__main__":
    hugepages.reexec()  # first: glibc reads its malloc tunables only when a process starts

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import CONFIGS, random_state_dict  # noqa: E402
from steps_quality import make_sampler, time_grid  # noqa: E402

from diffjax.core import guidance as G  # noqa: E402
from diffjax.core import samplers as SM  # noqa: E402
from diffjax.compat import gd_models  # noqa: E402
from diffjax.compat import guided_diffusion as gdc  # noqa: E402
from diffjax.compat.native import spec_from_flags  # noqa: E402

# The 1000-step chain of every run here, as GD's create_gaussian_diffusion flags.
DIFFUSION = dict(steps=1000, learn_sigma=True, noise_schedule="linear")
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "steps_quality.json")

CLASSIFIER = dict(image_size=32, in_channels=3, model_channels=128, out_channels=10,
                  num_res_blocks=2, attention_resolutions=(2,), channel_mult=(1, 2, 2, 2),
                  num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                  pool="attention")


def _timed(fn, repeats, name=""):
    """(first call minus the steady state: compile time, the median steady-state seconds, the
    last call's output)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    print(f"  {name} first call (compile + run): {first:.1f} s", flush=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    steady = statistics.median(times)
    return first - steady, steady, out


def bench_diffjax(unet, unet_sd, schedule, config, x_T, y, repeats, *, sampler="ddim",
                  classifier=None, name="diffjax"):
    """diffjax's loop on `schedule`, guided by `classifier` ((module, state_dict), scale 1) if
    given: (compile seconds, steady seconds, samples)."""
    variables = gd_models.load_state_dict(unet, unet_sd)
    guidance = G.chain()
    if classifier is not None:
        clf, clf_sd = classifier
        clf_vars = gd_models.load_state_dict(clf, clf_sd)
        guidance = G.classifier(lambda x, t: clf.apply(clf_vars, x, t), 1.0)
    args = dict(sampler=sampler, guidance=guidance, config=config, model_kwargs={"y": y},
                x_T=x_T)

    def run():
        return jax.block_until_ready(SM.sample(jax.random.PRNGKey(0), (unet, variables),
                                                    schedule, x_T.shape, **args))

    compile_s, seconds, out = _timed(run, repeats, name)
    return compile_s, seconds, np.asarray(out)


def equal_quality_cell(path) -> dict:
    """The cheapest cell (fewest evaluations, then lowest distance) of a steps-quality table whose
    Frechet distance is at most its DDIM-50 reference's:
    {solver, nfe, steps, grid_kind, fd, ref}."""
    with open(path) as f:
        settings = json.load(f)["settings"]
    ref = settings["reference_cell"]["fd"]
    cells = [{"solver": s, **c} for s, row in settings["cells"].items() for c in row.values()
             if c["fd"] <= ref]
    best = min(cells, key=lambda c: (c["nfe"], c["fd"]))
    return {k: best[k] for k in ("solver", "nfe", "steps", "grid_kind", "fd")} | {"ref": ref}


def bench_solver(unet, unet_sd, cell, x_T, y, repeats):
    """diffjax's `cell` (solver on its grid of the chain), unguided: steady seconds."""
    spec, _ = spec_from_flags(DIFFUSION)
    schedule = spec.schedule(time_grid(cell["grid_kind"], cell["steps"], spec))
    return bench_diffjax(unet, unet_sd, schedule, spec.config, x_T, y, repeats,
                         sampler=make_sampler(cell["solver"], spec),
                         name=f"diffjax {cell['solver']}")[1]


def bench_torch(unet_flags, unet_sd, clf_sd, gd_steps, x_T, y, guided, repeats, threads):
    """GD's ddim_sample_loop in float32 on the GPU when torch sees one (cuDNN's default TF32
    convolutions, as XLA's default precision), else on `threads` CPU threads."""
    import torch
    from guided_diffusion import script_util, unet

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = script_util.create_model(**{**unet_flags, "use_fp16": False}).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in unet_sd.items()})
    model.to(device)
    diffusion = script_util.create_gaussian_diffusion(**DIFFUSION,
                                                      timestep_respacing=f"ddim{gd_steps}")
    kwargs = {"y": torch.from_numpy(np.array(y)).to(device)}
    cond_fn = None
    if guided:
        clf = unet.EncoderUNetModel(**CLASSIFIER).eval()
        clf.load_state_dict({k: torch.from_numpy(v) for k, v in clf_sd.items()})
        clf.to(device)

        def cond_fn(x, t, y=None):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_probs = torch.log_softmax(clf(x_in, t), dim=-1)
                selected = log_probs[range(len(log_probs)), y.view(-1)]
                return torch.autograd.grad(selected.sum(), x_in)[0]

    noise = torch.from_numpy(np.ascontiguousarray(np.asarray(x_T).transpose(0, 3, 1, 2))).to(device)

    def run():
        with torch.no_grad():
            out = diffusion.ddim_sample_loop(model, tuple(noise.shape), noise=noise,
                                             model_kwargs=kwargs, cond_fn=cond_fn, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    _, seconds, out = _timed(run, repeats, "PyTorch")
    return seconds, out.cpu().numpy().transpose(0, 2, 3, 1), device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-guidance", action="store_true", help="only the unguided loop")
    p.add_argument("--reference-src", default=None, help="a guided-diffusion checkout")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--table", default=TABLE, help="the steps-quality table whose cheapest "
                   "cell at DDIM-50's distance is timed against GD's DDIM-50 ('' to skip)")
    p.add_argument("--xla-cpu-flags", choices=sorted(cpu_flags.FLAG_SETS),
                   default=cpu_flags.DEFAULT,
                   help="XLA:CPU flag set (diffjax.cpu_flags), chosen before JAX starts")
    args = p.parse_args(argv)
    cpu_flags.use(args.xla_cpu_flags)
    if args.reference_src:
        sys.path.insert(0, os.path.abspath(args.reference_src))

    _, flags = CONFIGS["cifar10"]
    flags = {**flags, "class_cond": True}
    rng = np.random.default_rng(0)
    unet = gd_models.create_model(**flags)  # 1000 classes, as GD's create_model hard-codes
    unet_sd = random_state_dict(gd_models.state_dict_shapes(unet), rng)
    clf = gd_models.build("EncoderUNetModel", **CLASSIFIER)
    clf_sd = random_state_dict(gd_models.state_dict_shapes(clf), rng)
    gd = gdc.create_gaussian_diffusion(**DIFFUSION, timestep_respacing=f"ddim{args.steps}")
    x_T = jnp.asarray(rng.standard_normal((args.batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch))

    dev = jax.devices()[0]
    print(f"jax {jax.__version__} (XLA:CPU flags {args.xla_cpu_flags}) on {dev.platform}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.2f}; {args.steps}-step DDIM, batch {args.batch}, CIFAR-10 "
          f"ADM-like UNet; median of {args.repeats} after a first (compiling) call")
    for guided in ([False] if args.no_guidance else [False, True]):
        name = "classifier-guided" if guided else "unguided"
        compile_s, seconds, ours = bench_diffjax(
            unet, unet_sd, gd.schedule, gd.config, x_T, y, args.repeats,
            classifier=(clf, clf_sd) if guided else None)
        print(f"\n{name}: diffjax {seconds:8.2f} s ({seconds / args.steps:.3f} s/step, "
              f"{args.batch / seconds:.2f} images/s), compile {compile_s:.1f} s")
        if args.reference_src:
            try:
                ref_s, ref, ref_device = bench_torch(flags, unet_sd, clf_sd, args.steps, x_T, y,
                                                     guided, args.repeats, args.threads)
            except ImportError as err:
                print(f"  PyTorch reference not run: {err}")
                continue
            diff = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
            where = ref_device if ref_device != "cpu" else f"{args.threads} threads"
            print(f"{name}: PyTorch {ref_s:8.2f} s ({ref_s / args.steps:.3f} s/step, "
                  f"{args.batch / ref_s:.2f} images/s, {where})\n"
                  f"  ratio diffjax / PyTorch: {seconds / ref_s:.2f}   "
                  f"(samples rel. difference {diff:.1e})")
            if not guided and args.table and args.steps == 50:
                cell = equal_quality_cell(args.table)
                fast_s = bench_solver(unet, unet_sd, cell, x_T, y, args.repeats)
                print(f"time to equal quality: diffjax {cell['solver']} ({cell['grid_kind']}, "
                      f"{cell['nfe']} NFE) {fast_s:.2f} s vs PyTorch DDIM-50 {ref_s:.2f} s: "
                      f"ratio {fast_s / ref_s:.2f} (target <= 0.3; Frechet distance "
                      f"{cell['fd']:.1f} vs DDIM-50's {cell['ref']:.1f} in {args.table})")


if __name__ == "__main__":
    main()

"""Time to the first image: a fresh Python process goes from nothing to a grid of samples, as a
user's script or notebook does, with the breakdown.

    python bench/first_image.py [--models default,adm-imagenet64-cond] [--steps 10]
        [--num_samples 4] [--home DIR]

For each model a new interpreter (a subprocess) runs

    import diffjax                                    # import (jax, flax, orbax, diffjax)
    model = diffjax.load(SOURCE)                      # load (read and verify the bundle)
    images = diffjax.sample(model, key, n, ...)       # compile + sample (the first call)
    diffjax.show(images)                              # show (the grid)

and reports each phase; "first image" is the wall time from launching the process to the grid.
The first sample call is split into compile (tracing, lowering and XLA compilation, as jax's
monitoring events report them) and sample (the rest: running the loop).

Models (random weights: the times depend on the architecture only):
  default              the bundled default (configs/default.py: 1.1 M-parameter class-conditional
                       UNet, 32x32x1), loaded from a saved bundle folder, sampled as its training
                       run does: 10 images (one per class), 40-step DDPM, classifier-free w = 2
  adm-imagenet64-cond  ADM-G ImageNet 64 (the 64x64_diffusion preset, 296 M parameters), saved
                       under its pretrained name in $DIFFJAX_HOME and loaded by that name;
                       `--num_samples` images, `--steps` DDIM steps

The bundles are written first into --home (default: a temporary folder, removed at the end; an
existing bundle there is reused), each by a process of its own. diffjax is imported inside the
functions: the measured process must import it itself, and the parent imports nothing heavy. The
last line is `first_image {JSON}`: per model, seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("default", "adm-imagenet64-cond")
PHASES = ("start", "import", "load", "compile", "sample", "show")


# --------------------------------------------------------------------------- the child


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def child(source: str, request: dict, launched: float) -> None:
    """The measured process: what a user runs, timed phase by phase; prints one JSON line.
    Compilation (tracing, lowering, XLA) is what jax itself reports through its monitoring
    events, so "sample" is the first call's remainder: the sampling loop's run."""
    begun = time.time()
    tick = time.perf_counter()
    import jax

    import diffjax

    compiling = [0.0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiling.__setitem__(0, compiling[0] + seconds)
        if event in COMPILE_EVENTS else None)
    times = {"start": begun - launched}

    def lap(name):
        nonlocal tick
        now = time.perf_counter()
        times[name] = now - tick
        tick = now

    lap("import")
    model = diffjax.load(source)
    lap("load")
    compiling[0] = 0.0
    images = diffjax.sample(model, jax.random.PRNGKey(0), **request)
    lap("first_call")
    times["compile"] = compiling[0]
    times["sample"] = times.pop("first_call") - compiling[0]
    diffjax.show(images)
    lap("show")
    times["first_image"] = time.time() - launched
    sampling = {**model.sampling, **{k: v for k, v in request.items() if k != "labels"}}
    if "steps" in request:  # the request's grid replaces the model's
        sampling.pop("grid", None)
    info = {"device": jax.devices()[0].platform, "params_m": model.num_params / 1e6,
            "images": list(images.shape),
            "sampling": {k: sampling.get(k) for k in ("sampler", "steps", "grid",
                                                      "guidance_scale") if sampling.get(k)}}
    print("CHILD " + json.dumps({"times": times, "info": info}), flush=True)


# --------------------------------------------------------------------------- the bundles


def _random_params(module, seed: int):
    """Random weights of a module's shapes (no init compile: a 300 M-parameter init would take
    longer than everything measured): normals of std 0.02, norm scales 1, biases 0."""
    import jax
    import numpy as np

    args, kwargs = module.example_inputs(1)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(shape.shape, shape.dtype)
        if name == "bias":
            return np.zeros(shape.shape, shape.dtype)
        return (0.02 * rng.standard_normal(shape.shape)).astype(shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _default_bundle():
    """The bundled default config's model (its description as a training run writes it), with
    random weights."""
    sys.path.insert(0, str(REPO / "configs"))
    import default as default_config

    from diffjax.bundle import DiffusionModel
    from diffjax.models.registry import NETWORKS
    from diffjax.pipelines.training.config import experiment_from_config

    experiment = experiment_from_config(default_config.get_config())
    description = experiment.description()
    network = dict(experiment.network)
    module = NETWORKS[network.pop("class")](**network)
    params = _random_params(module, 0)
    return DiffusionModel.from_description(
        description, {name: params for name in description["weights"]})


def _imagenet64_bundle():
    """The 64x64_diffusion preset (ADM-G ImageNet 64), as `diffjax.load("adm-imagenet64-cond")`
    converts it, with random weights."""
    from diffjax.bundle import DiffusionModel
    from diffjax.compat.native import bundle_parts
    from diffjax.io import convert

    config = convert.preset_config("64x64_diffusion")
    module = convert.build_model(config)
    return DiffusionModel(weights={"params": _random_params(module, 1)},
                          **bundle_parts(config, module))


def write(home: pathlib.Path, name: str) -> None:
    """Write the model's bundle into `home` (run in a process of its own, so that the measuring
    parent holds neither the weights nor jax)."""
    import diffjax

    start = time.perf_counter()
    model = _default_bundle() if name == "default" else _imagenet64_bundle()
    diffjax.save(model, home / name)
    print(f"wrote {name} to {home / name} ({model.num_params / 1e6:.1f} M params, "
          f"{time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


def prepare(home: pathlib.Path, name: str) -> tuple[str, dict]:
    """The model's bundle in `home` (written unless there); -> (what the child loads, its request
    or None for the command line's)."""
    if not (home / name).exists():
        subprocess.run([sys.executable, __file__, "--write", name, "--home", str(home)],
                       env=_env(home), check=True)
    return (str(home / name), {"num_samples": 10, "labels": list(range(10))}) \
        if name == "default" else (name, None)


# --------------------------------------------------------------------------- the parent


def _env(home: pathlib.Path) -> dict:
    return dict(os.environ, DIFFJAX_HOME=str(home),
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def measure(source: str, request: dict, home: pathlib.Path) -> dict:
    env = _env(home)
    launched = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--child", source, "--request", json.dumps(request),
         "--launched", repr(launched)],
        env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the measured process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("CHILD ")][-1]
    return json.loads(line[len("CHILD "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of adm-imagenet64-cond")
    parser.add_argument("--num_samples", type=int, default=4, help="images of adm-imagenet64-cond")
    parser.add_argument("--home", default="", help="where the bundles are written (kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--request", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.request), args.launched)
    if args.write:
        return write(pathlib.Path(args.home), args.write)
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models {','.join(unknown)}: choose from {', '.join(MODELS)}")
    with tempfile.TemporaryDirectory(prefix="first_image_") as tmp:
        home = pathlib.Path(args.home or tmp).absolute()
        home.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in names:
            source, request = prepare(home, name)
            if request is None:
                labels = [207, 360, 387, 974, 88, 979, 417, 279][:args.num_samples]
                labels += [1] * (args.num_samples - len(labels))
                request = {"num_samples": args.num_samples, "labels": labels, "sampler": "ddim",
                           "steps": args.steps}
            results[name] = measure(source, request, home)
    print(f"{'model':22s}" + "".join(f"{p:>9s}" for p in PHASES) + f"{'first image':>13s}"
          "   (seconds; compile + sample = the first diffjax.sample call)")
    for name, r in results.items():
        t = r["times"]
        print(f"{name:22s}" + "".join(f"{t[p]:9.1f}" for p in PHASES) + f"{t['first_image']:13.1f}"
              f"   {r['info']['params_m']:.1f} M params on {r['info']['device']}, "
              f"images {r['info']['images']}, {r['info']['sampling']}")
    summary = {name: {**{k: round(v, 2) for k, v in r["times"].items()},
                      "device": r["info"]["device"], "images": r["info"]["images"],
                      **r["info"]["sampling"]}
               for name, r in results.items()}
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}, "
          f"{os.cpu_count()} CPUs")
    print("first_image " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

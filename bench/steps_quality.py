"""Steps versus quality: the Fréchet distance on the feature classifier's features (FID's formula
on the Fashion-MNIST classifier of diffjax.pipelines.evaluation.classifier; the test split as the
reference) of every solver at a list of network-evaluation budgets (NFE), with time per image, plus
the 1000-step ancestral baseline; a JSON, a plot and a grid of each solver's samples at 10 NFE.

    python bench/steps_quality.py --model runs/default/model --classifier runs/fmnist_classifier \
        [--samples 10000] [--solvers ddim,dpm++2m,...] [--nfe 5,8,10,15,20,50,100] \
        [--batch_size 250] [--guidance_scale 2] [--grids dpm++2m=logsnr,...] [--resume] \
        [--clip on|off] [--eta 0] [--no_baseline] [--ref REF.npz] \
        [--out bench/results/steps_quality.json] [--plot steps_quality.png] \
        [--grid grid.png] [--grid_nfe 10]

NFE is counted, not assumed: for each cell the solver takes the most steps whose network
evaluations fit the budget, and the evaluations are those its loop really makes, counted by a run
of the same sampler on the same grid with a stand-in network that records each call
(`count_evaluations`): a 2-evaluation solver's step to the data and Heun's Euler steps above its
sigma_max take one call. A classifier-free-guided evaluation (one batched call on [x; x]) counts
as one, as in the DPM-Solver and EDM papers. Every cell starts from the same noise and labels
(balanced classes: sample i has class i mod K), so cells differ only by the solver and the grid.

The JSON: {"reference": {"ddim": {"50": fd}}, "<solver>": {"<nfe>": fd, ...}, ...,
"settings": {what was run, and per cell "cells": {solver: {nfe: {steps, nfe, grid,
seconds_per_image, accuracy, high_frequency, mean_intensity}}}}}; "ddpm" holds the ancestral
baseline under the chain's length ("1000"). Time per image is the steady-state wall time (the
first batch of a cell, which compiles, is left out when there are more). `accuracy`: how often
the classifier gives a sample its class; `high_frequency`: speckle, the energy left after a 3x3
box blur; `mean_intensity` in [0, 1] (real images: settings' *_real_train_images). With --resume
the cells already in --out under the same settings are kept, so a long run can be stopped and
restarted.

--variants replaces the table by a comparison of sampling variants (solver, grid, guidance scale,
clipping, eta), one --grid row each: how the speckle of few-step samples was traced (see
docs/steps_quality.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import diffjax
from diffjax import images as images_lib
from diffjax.core import samplers as SM
from diffjax.core.timegrid import TimeGrid
from diffjax.pipelines.evaluation import classifier as C
from diffjax.pipelines.evaluation import metrics

NFES = (5, 8, 10, 15, 20, 50, 100)
REFERENCE = ("ddim", 50)  # the original code's DDIM-50 (GD's "ddim50" respacing)
BASELINE = "ddpm"  # ancestral sampling over every step of the chain
GRID_NFE = 10  # the budget whose samples the grid shows by default
# The stops each solver is run on by default: GD's own respacings for its two samplers ("ddim":
# GD's "ddimN", the stride grid of its DDIM sampler; "uniform": GD's "N"), log-SNR for the
# exponential integrators (Lu et al. 2022 recommend it for pixel-space models), EDM's rho = 7
# for Heun and iPNDM, which step in sigma (Karras et al. 2022).
DEFAULT_GRIDS = {"ddpm": "uniform", "ddim": "ddim", "dpm++2m": "logsnr", "dpm++3m": "logsnr",
                 "dpm++2s": "logsnr", "unipc": "logsnr", "ipndm": "karras", "heun": "karras"}
GRID_KINDS = ("ddim", "uniform", "quadratic", "logsnr", "karras")
# The settings two runs' cells must share to sit in one table (--resume, --merge); batch_size
# too: each batch's noise is drawn from the seed folded with its index.
SAME_RUN = ("samples", "model", "classifier", "reference_images", "guidance_scale", "seed",
            "batch_size", "grids", "clip_denoised", "ddim_eta")


def time_grid(kind: str, steps: int, spec: diffjax.DiffusionSpec) -> TimeGrid:
    """The TimeGrid of `steps` stops of a kind: "ddim" is GD's "ddimN" respacing, "all" every step,
    the others TimeGrid kinds (those that place stops by noise level hold the chain's betas)."""
    if kind == "all":
        return TimeGrid()
    if kind == "ddim":
        return TimeGrid("respacing", respacing=f"ddim{steps}")
    if kind not in GRID_KINDS:
        raise ValueError(f"grid kind {kind!r}: choose one of {', '.join(GRID_KINDS)}")
    betas = spec.training_betas() if kind in ("logsnr", "karras") else None
    return TimeGrid(kind, steps=steps, betas=betas)


def make_sampler(name: str, spec: diffjax.DiffusionSpec, eta: float = 0.0) -> SM.Sampler:
    """The named sampler; DPM-Solver++(2S) holds the training chain, so that its intermediate
    point is the training step nearest the log-SNR midpoint (otherwise it is the next stop);
    `eta` is DDIM's."""
    if name == "dpm++2s":
        return SM.get_sampler(name, chain=spec.schedule())
    return SM.get_sampler(name, **({"eta": eta} if name == "ddim" else {}))


def count_evaluations(sampler: SM.Sampler, schedule, spec: diffjax.DiffusionSpec,
                      channels: int = 1) -> int:
    """Network calls `sampler` makes on `schedule`, counted: the loop runs on a [1, 4, 4, C]
    image with a stand-in network (output 0) that records each call through a debug callback.
    The branches that skip a call (a first-order last step, Euler steps) depend on the grid only,
    so the count is that of the real network."""
    calls = []

    def network(x, t, **_):
        jax.debug.callback(lambda _: calls.append(1), t)
        return jnp.zeros(x.shape[:-1] + (spec.output_channels(channels),), x.dtype)

    jax.block_until_ready(SM.sample(jax.random.PRNGKey(0), network, schedule, (1, 4, 4, channels),
                                    sampler=sampler, config=spec.config))
    jax.effects_barrier()
    return len(calls)


@dataclasses.dataclass(frozen=True)
class Cell:
    """What one measurement samples: `solver` on `steps` stops of grid `kind` (`nfe` counted
    evaluations), with classifier-free guidance `scale` (None: the model's default, which may be
    none; 1: the conditional model alone, one network pass per evaluation), x0 clipping `clip`
    and DDIM's `eta`."""

    solver: str
    kind: str
    steps: int
    nfe: int = 0
    scale: float | None = None
    clip: bool = True
    eta: float = 0.0

    def grid(self, spec) -> TimeGrid:
        return time_grid(self.kind, self.steps, spec)

    def describe(self) -> str:
        grid = f"{self.kind}{self.steps}" if self.kind != "all" else "all"
        extras = ([] if self.scale is None else [f"w{self.scale:g}"]) \
            + ["noclip"] * (not self.clip) + [f"eta{self.eta:g}"] * (self.eta != 0)
        return ":".join([self.solver, grid, *extras])

    @classmethod
    def parse(cls, text: str, spec) -> Cell:
        """'solver:grid[:wS][:noclip][:etaE]' (grid: a kind and a step count, e.g. logsnr10,
        ddim50, uniform40, or 'all'), its evaluations counted."""
        solver, _, rest = text.partition(":")
        grid, *options = rest.split(":") if rest else [""]
        kind = grid.rstrip("0123456789")
        if grid == "all":
            kind, steps = "all", spec.num_steps
        elif kind in GRID_KINDS and grid[len(kind):]:
            steps = int(grid[len(kind):])
        else:
            raise ValueError(f"variant {text!r}: give solver:grid with grid a kind of "
                             f"{', '.join(GRID_KINDS)} and a step count (e.g. ddim:ddim50), or "
                             f"'all'; options wS, noclip, etaE")
        cell = cls(solver, kind, steps)
        for option in options:
            if option == "noclip":
                cell = dataclasses.replace(cell, clip=False)
            elif option[:1] == "w" or option[:3] == "eta":
                name = "scale" if option[0] == "w" else "eta"
                cell = dataclasses.replace(cell, **{name: float(option.lstrip("weta"))})
            else:
                raise ValueError(f"variant {text!r}: unknown option {option!r} (wS, noclip, etaE)")
        sampler = make_sampler(solver, spec)
        return dataclasses.replace(cell, nfe=count_evaluations(sampler, spec.schedule(
            cell.grid(spec)), spec))


def plan_cell(solver: str, budget: int, kind: str, spec, channels: int = 1) -> Cell:
    """The cell of `solver` at an NFE budget: the most steps of grid `kind` whose counted
    evaluations fit the budget (at least one step). Step counts the kind cannot place (GD's
    "ddimN" exists only where an integer stride gives N steps) are passed over."""
    sampler = make_sampler(solver, spec)

    def cost(steps):
        if not 1 <= steps <= spec.num_steps or not _placeable(kind, steps, spec):
            return None
        return count_evaluations(sampler, spec.schedule(time_grid(kind, steps, spec)), spec,
                                 channels)

    steps = min(max(1, budget // sampler.evaluations_per_step), spec.num_steps)
    nfe = cost(steps)
    while steps > 1 and (nfe is None or nfe > budget):
        steps -= 1
        nfe = cost(steps)
    if nfe is None:
        raise ValueError(f"{solver}: no {kind} grid fits {budget} evaluations")
    while (more := cost(steps + 1)) is not None and more <= budget:
        steps, nfe = steps + 1, more
    return Cell(solver, kind, steps, nfe)


def _placeable(kind: str, steps: int, spec) -> bool:
    """Whether a grid of this kind has exactly `steps` stops on the chain."""
    try:
        return len(time_grid(kind, steps, spec).timesteps(spec.training_betas())) == steps
    except ValueError:  # GD's "ddimN" for an N no integer stride gives
        return False


def draw(model, cell: Cell, key, num: int, labels):
    """uint8 [num, H, W, C] samples of a cell: one compiled call."""
    if cell.scale == 1.0:  # the conditional model itself: no unconditional branch to evaluate
        model = model.replace(sampling={k: v for k, v in model.sampling.items()
                                        if k != "guidance_scale"})
    return diffjax.sample(model, key, num, sampler=make_sampler(cell.solver, model.spec, cell.eta),
                          steps=cell.grid(model.spec), clip_denoised=cell.clip, labels=labels,
                          guidance_scale=None if cell.scale == 1.0 else cell.scale)


def run_cell(model, cell: Cell, num: int, labels, key, batch_size: int):
    """Samples of a cell (uint8 [num, H, W, C]), seconds per image at steady state, and whether
    that time includes compilation (a single batch). Every batch has `batch_size` images (the
    last one's extra images are dropped), so the loop compiles once."""
    chunks, times = [], []
    for i, first in enumerate(range(0, num, batch_size)):
        start = time.perf_counter()
        images = draw(model, cell, jax.random.fold_in(key, i), batch_size,
                      None if labels is None else labels[first:first + batch_size])
        times.append(time.perf_counter() - start)
        chunks.append(images)
    steady = times[1:] or times
    return np.concatenate(chunks)[:num], sum(steady) / (len(steady) * batch_size), len(times) == 1


class Scorer:
    """Fréchet distance (and class accuracy) of uint8 samples against the reference features."""

    def __init__(self, classifier_path, ref=None, batch_size: int = 500):
        self.classifier = C.load_classifier(classifier_path)
        self.extractor = self.classifier.extractor(batch_size)
        if ref is None:  # the test split, as the data config of the classifier shapes it
            images, _ = C.real_images(self.classifier.data, "test")
            self.reference = C.feature_statistics(self.extractor, images, progress=False)
            self.reference_name = f"{self.classifier.data.source} test split ({len(images)} images)"
        else:
            self.reference, self.reference_name = C.reference_statistics(
                self.classifier, self.extractor, ref)

    def score(self, images, labels=None) -> dict:
        running, logits = metrics.RunningStatistics(), []
        for out in self.extractor.batches(images, progress=False):
            running.update(out["features"])
            logits.append(out["logits"])
        accuracy = None if labels is None else C.accuracy(np.concatenate(logits), labels)
        return {"fd": running.result().frechet_distance(self.reference), "accuracy": accuracy,
                "high_frequency": high_frequency(images),
                "mean_intensity": float(np.mean(images) / 255.0)}

    def floor(self, num: int, seed: int = 0) -> dict:
        """The scores of `num` real training images: the distance sampling error alone gives at
        this sample count, and real images' high-frequency energy."""
        images, labels = C.real_images(self.classifier.data, "train", num, seed)
        return self.score(images, labels)


def high_frequency(images) -> float:
    """Speckle: the mean squared difference between uint8 images [N, H, W, C] (read in [0, 1])
    and their 3x3 box blur (edges replicated). Isolated pixels raise it; smooth shapes and flat
    background do not."""
    x = np.asarray(images, np.float32) / 255.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    blur = sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return float(np.mean((x - blur) ** 2))


# --------------------------------------------------------------------------- outputs


def layout(reference: float, table: dict, settings: dict) -> dict:
    """The JSON of the issue: the DDIM-50 reference, one {nfe: fd} per solver, the settings."""
    ref_solver, ref_nfe = REFERENCE
    out = {"reference": {ref_solver: {str(ref_nfe): reference}}}
    out.update({s: {str(n): fd for n, fd in row.items()} for s, row in table.items()})
    out["settings"] = settings
    return out


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(table: dict, reference: float, path, title: str) -> None:
    """distance against NFE, log-log, one line per solver, DDIM-50 as a dashed line (PIL only)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 760, 480, 70, 150, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    draw.rectangle([x0, y1, x1, y0], outline="black")
    points = [(n, fd) for row in table.values() for n, fd in row.items()] + [(1, reference)]
    nfes = [n for n, _ in points if n > 1] or [1, 10]
    fds = [fd for _, fd in points]
    lx = np.log10([min(nfes), max(nfes)])
    ly = np.log10([min(fds), max(fds)])
    ly = ly if ly[1] > ly[0] else ly + np.array([-0.5, 0.5])

    def xy(n, fd):
        fx = (np.log10(n) - lx[0]) / max(lx[1] - lx[0], 1e-9)
        fy = (np.log10(fd) - ly[0]) / (ly[1] - ly[0])
        return x0 + fx * (x1 - x0), y0 - fy * (y0 - y1)

    for n in sorted({n for n, _ in points if n > 1}):
        x, _ = xy(n, fds[0])
        draw.line([(x, y0), (x, y0 + 4)], fill="black")
        draw.text((x - 8, y0 + 8), str(n), fill="black")
    for frac in np.linspace(0, 1, 5):
        value = 10 ** (ly[0] + frac * (ly[1] - ly[0]))
        y = y0 - frac * (y0 - y1)
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    _, ry = xy(nfes[0], reference)
    for x in range(int(x0), int(x1), 12):
        draw.line([(x, ry), (x + 6, ry)], fill="black")
    draw.text((x0 + 6, ry - 14), "DDIM-50", fill="black")
    for i, (solver, row) in enumerate(table.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        line = [xy(n, row[n]) for n in sorted(row) if n > 1]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([(x1 + 8, top + 10 + 16 * i), (x1 + 28, top + 10 + 16 * i)], fill=colour, width=3)
        draw.text((x1 + 34, top + 4 + 16 * i), solver, fill="black")
    draw.text((x0, 12), title, fill="black")
    draw.text(((x0 + x1) // 2 - 60, height - 22), "network evaluations (NFE)", fill="black")
    image.save(path)


# --------------------------------------------------------------------------- the run


def _parse_grids(text: str) -> dict:
    grids = dict(DEFAULT_GRIDS)
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        solver, eq, kind = item.partition("=")
        if not eq or kind not in GRID_KINDS:
            raise ValueError(f"--grids {item!r}: give SOLVER=KIND with KIND one of "
                             f"{', '.join(GRID_KINDS)}")
        grids[solver] = kind
    return grids


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, **kwargs):
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*names, **kwargs)

    flag("model", required=True, help="a diffusion model (a training run's DIR/model, or "
         "anything diffjax.load reads)")
    flag("classifier", required=True, help="a feature-classifier workdir (python -m diffjax "
         "feature-classifier)")
    flag("ref", default=None, help="reference images (GD npz, arr_0) instead of the test split")
    flag("samples", type=int, default=10000, help="samples per cell")
    flag("solvers", default=",".join(SM.SAMPLERS), help="comma-separated sampler names")
    flag("nfe", default=",".join(map(str, NFES)), help="comma-separated NFE budgets")
    flag("grids", default="", help="SOLVER=KIND,... overrides of the default grids "
         f"{DEFAULT_GRIDS}; KIND one of {', '.join(GRID_KINDS)}")
    flag("no_baseline", action="store_true", help="skip the ancestral baseline over every step")
    flag("guidance_scale", type=float, default=None, help="classifier-free guidance scale "
         "(default: the model's own; 1: the conditional model, one network pass per "
         "evaluation)")
    flag("clip", choices=("on", "off"), default=None, help="clip each x0 prediction to [-1, 1] "
         "(default: the model's own, else on)")
    flag("eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    flag("grid_nfe", type=int, default=GRID_NFE, help="the budget whose samples --grid shows")
    flag("grid_per_class", type=int, default=1, help="--grid columns per class")
    flag("variants", default=None, help="instead of the table: compare sampling variants "
         "'solver:grid[:wS][:noclip][:etaE],...' (e.g. ddpm:uniform40:w2,ddim:ddim50:noclip,"
         "ddim:ddim50:eta1): the scores of each in --out as {\"variants\": {...}}, and --grid "
         "with one row per variant")
    flag("batch_size", type=int, default=250, help="images per compiled sampling call")
    flag("seed", type=int, default=0)
    flag("out", default="bench/results/steps_quality.json")
    flag("plot", default=None, help="PNG of distance against NFE")
    flag("grid", default=None, help="PNG of each solver's samples at --grid_nfe")
    flag("resume", action="store_true", help="keep the cells already in --out (same settings)")
    flag("merge", nargs="+", default=None, metavar="JSON",
         help="no sampling: join the cells of runs split by --solvers (the same settings, e.g. "
              "one process per solver on one accelerator) into --out, with the table and plot")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # orbax warns on every read-only open
    model = diffjax.load(args.model)
    scale = args.guidance_scale if args.guidance_scale is not None else \
        model.sampling.get("guidance_scale")
    scale = scale if model.conditioning.droppable else None
    clip = model.sampling.get("clip_denoised", True) if args.clip is None else args.clip == "on"
    classes = None
    if model.conditioning.inputs == frozenset({"y"}):
        classes = model.network["num_classes"] - model.conditioning.droppable
    padded = -(-args.samples // args.batch_size) * args.batch_size  # whole batches
    labels = None if classes is None else np.arange(padded, dtype=np.int32) % classes
    key = jax.random.PRNGKey(args.seed)
    if args.merge:
        cells = merge(args, model.spec.num_steps)
        if args.grid and cells:
            write_grid(model, cells, key, classes, args.grid, args.grid_per_class)
        return 0
    scorer = Scorer(args.classifier, args.ref, batch_size=min(args.samples, 500))
    data = scorer.classifier.data
    if (data.image_size, data.image_size, data.channels) != tuple(model.image_shape):
        raise ValueError(f"the classifier scores {data.image_size} px {data.channels}-channel "
                         f"images; the model samples {model.image_shape}")
    settings = {"samples": args.samples, "model": os.fspath(args.model),
                "model_description": model.describe(), "weights": model.use,
                "classifier": os.fspath(args.classifier),
                "classifier_test_accuracy": scorer.classifier.metrics.get("test_accuracy"),
                "reference_images": scorer.reference_name, "guidance_scale": scale,
                "labels": None if labels is None else "balanced: sample i has class i mod K",
                "seed": args.seed, "batch_size": args.batch_size,
                "clip_denoised": clip, "ddim_eta": args.eta,
                "nfe": "network evaluations counted per cell (settings.cells.*.nfe <= the "
                       "budget); a classifier-free-guided evaluation, one call on [x; x], is one",
                "seconds_per_image": "steady-state wall time per image on this machine",
                "machine": f"jax {jax.__version__} {jax.default_backend()} "
                           f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs"}
    if args.ref is None:  # the test split: training images are other real images
        real = scorer.floor(args.samples, args.seed)
        settings.update({f"{k}_real_train_images": real[k]
                         for k in ("fd", "high_frequency", "mean_intensity")})
        _log(f"real: {args.samples} training images score {real}")

    def measure(cell: Cell) -> dict:
        _log(f"{cell.describe()}: {cell.nfe} evaluations, {args.samples} samples ...")
        images, seconds, with_compile = run_cell(model, cell, args.samples, labels, key,
                                                 args.batch_size)
        score = scorer.score(images, None if labels is None else labels[:args.samples])
        _log(f"  {score}, {seconds * 1e3:.1f} ms/image")
        return {**score, "steps": cell.steps, "nfe": cell.nfe,
                "grid": cell.grid(model.spec).describe(), "grid_kind": cell.kind,
                "seconds_per_image": seconds, "includes_compile": with_compile}

    def grid_png(cells: list):
        if args.grid and cells:
            write_grid(model, cells, key, classes, args.grid, args.grid_per_class)

    if args.variants:
        cells = [Cell.parse(v.strip(), model.spec) for v in args.variants.split(",") if v.strip()]
        records = {}
        for cell in cells:
            records[cell.describe()] = measure(cell)
            _write_json(args.out, {"variants": records, "settings": settings})
        grid_png(cells)
    else:
        how = {"scale": scale, "clip": clip, "eta": args.eta}
        grid_png(run_table(args, model, settings, measure, how))
    return 0


def run_table(args, model, settings, measure, how: dict) -> list:
    """The steps-versus-quality table: every solver at every budget (sampling as `how` says:
    Cell's scale, clip and eta), the DDIM-50 reference and the ancestral baseline; writes
    the JSON, prints the markdown table, draws the plot. Returns the cells at --grid_nfe and
    the DDIM-50 reference."""
    spec, channels = model.spec, model.image_shape[-1]
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    for s in solvers:
        SM.get_sampler(s)  # an unknown name is an error naming the choices
    budgets = sorted({int(n) for n in args.nfe.split(",") if n.strip()})
    grids = _parse_grids(args.grids)
    settings["grids"] = grids
    cells, reference = {}, None  # solver -> {budget: record}; the DDIM-50 record
    out = pathlib.Path(args.out)
    if args.resume and out.exists():
        old = json.loads(out.read_text())["settings"]
        if all(old.get(k) == settings[k] for k in SAME_RUN):
            cells = {s: {int(n): c for n, c in row.items()} for s, row in old["cells"].items()}
            reference = old.get("reference_cell")
            _log(f"resuming: {sum(map(len, cells.values()))} cells from {out}")
        else:
            _log(f"--resume: {out} was run with other settings; starting afresh")

    def cell_of(solver, budget, kind) -> Cell:
        planned = plan_cell(solver, budget, kind, spec, channels)
        return dataclasses.replace(planned, **how)

    # The reference first (a solver's cell that is the same run reuses it), then the cheap
    # budgets before the dear ones, so that a run stopped early has whole columns.
    plan = [(*REFERENCE, "ddim")] + [(s, n, grids.get(s, "uniform")) for n in budgets
                                     for s in solvers]
    if not args.no_baseline:
        plan.append((BASELINE, spec.num_steps, "all"))

    def lookup(solver, budget, kind):
        if (solver, budget, kind) == plan[0] and reference is not None:
            return reference
        record = cells.get(solver, {}).get(budget)
        return record if record is not None and record["grid_kind"] == kind else None

    for i, (solver, budget, kind) in enumerate(plan):
        record = lookup(solver, budget, kind) or measure(cell_of(solver, budget, kind))
        if i == 0:
            reference = record
        else:
            cells.setdefault(solver, {})[budget] = record
        settings["cells"] = {s: {str(n): c for n, c in sorted(row.items())}
                             for s, row in cells.items()}
        settings["reference_cell"] = reference
        _write_json(out, layout(reference["fd"], table(cells), settings))
    return finish(args, cells, reference, solvers, how, args.samples)


def finish(args, cells: dict, reference: dict, solvers: list, how: dict, samples: int) -> list:
    """Prints the markdown table and draws the plot of the measured `cells` (`samples` per cell);
    returns the cells the grid shows: each solver's at --grid_nfe, then DDIM-50 to compare
    against."""
    print(markdown(cells, reference["fd"], samples))
    if args.plot:
        plot({s: row for s, row in table(cells).items() if s in solvers}, reference["fd"],
             args.plot, f"Frechet distance (classifier features, {samples} samples) vs NFE")
    return [Cell(s, r["grid_kind"], r["steps"], r["nfe"], **how) for s in solvers
            if (r := cells.get(s, {}).get(args.grid_nfe)) is not None] + \
        [Cell(REFERENCE[0], reference["grid_kind"], reference["steps"], reference["nfe"], **how)]


def merge(args, chain_steps: int | None = None) -> list:
    """--merge: the cells of several runs of the same settings (split by --solvers) joined into
    one --out, in --solvers order; a cell measured twice keeps the first file's. The cells of
    --solvers x --nfe (and the ancestral baseline over `chain_steps`, unless --no_baseline) that no
    file has are listed in settings.missing. Returns the grid's cells, as run_table does, sampled
    as the runs sampled (scale, clipping, eta)."""
    runs = [json.loads(pathlib.Path(path).read_text())["settings"] for path in args.merge]
    first = runs[0]
    how = {"scale": first["guidance_scale"], "clip": first["clip_denoised"],
           "eta": first["ddim_eta"]}
    for path, run in zip(args.merge[1:], runs[1:]):
        differ = [k for k in SAME_RUN if run.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"--merge: {path} was run with other settings than "
                             f"{args.merge[0]} ({', '.join(differ)}): only runs of one table "
                             f"can be joined")
    found = {}
    for run in runs:
        for solver, row in run.get("cells", {}).items():
            for budget, record in row.items():
                found.setdefault(solver, {}).setdefault(int(budget), record)
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    order = solvers + [BASELINE] + sorted(set(found) - set(solvers) - {BASELINE})
    cells = {s: dict(sorted(found[s].items())) for s in order if s in found}
    reference = next(r["reference_cell"] for r in runs if r.get("reference_cell"))
    budgets = sorted({int(n) for n in args.nfe.split(",") if n.strip()})
    missing = {s: [n for n in budgets if n not in found.get(s, {})] for s in solvers}
    if chain_steps and not args.no_baseline and chain_steps not in found.get(BASELINE, {}):
        missing[BASELINE] = missing.get(BASELINE, []) + [chain_steps]
    missing = {s: gaps for s, gaps in missing.items() if gaps}
    sources = [{"file": pathlib.Path(path).name, "machine": run.get("machine"),
                "solvers": sorted(run.get("cells", {}))} for path, run in zip(args.merge, runs)]
    settings = {**first, "cells": {s: {str(n): c for n, c in row.items()}
                                   for s, row in cells.items()},
                "reference_cell": reference, "merged_from": sources, "missing": missing}
    _write_json(args.out, layout(reference["fd"], table(cells), settings))
    return finish(args, cells, reference, solvers, how, first["samples"])


def _write_json(path, value) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(cells: dict) -> dict:
    """{solver: {budget: distance}} of the measured cells."""
    return {s: {n: c["fd"] for n, c in sorted(row.items())} for s, row in cells.items() if row}


def write_grid(model, cells: list, key, classes, path, per_class: int = 1) -> None:
    """One row per cell, `per_class` columns per class (10 columns for an unconditional model),
    every row from the same noise and labels, labelled with the cell."""
    cols = (classes or 10) * per_class
    labels = None if classes is None else np.arange(cols, dtype=np.int32) % classes
    images = [draw(model, c, key, cols, labels) for c in cells]
    names = [c.describe() for c in cells]
    images_lib.grid(np.concatenate(images), cols, scale=2, row_labels=names).save(path)


def markdown(cells: dict, reference: float, samples: int) -> str:
    """The table: one row per solver, distance and ms per image per NFE budget."""
    columns = sorted({n for row in cells.values() for n in row})
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for solver, row in cells.items():
        entries = ["" if (c := row.get(n)) is None else
                   f"{c['fd']:.2f} ({c['seconds_per_image'] * 1e3:.0f} ms)"
                   + ("" if c["nfe"] == n else f" [{c['nfe']}]") for n in columns]
        lines.append(f"| {solver} | " + " | ".join(entries) + " |")
    lines.append(f"\nDDIM-50 reference: {reference:.2f}; {samples} samples per cell; "
                 f"(t ms): time per image; [k]: the cell used k < NFE evaluations.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""bench/steps_quality.py. Fast: the network evaluations it counts agree with each solver's own
definition (closed forms: one call per step; DPM-Solver++(2S) two but one at the step to the data;
Heun one at the last step and at the stops above its sigma_max); the planner takes the most steps
whose evaluations fit a budget, passing over step counts a grid cannot place; --resume keeps cells
only under the same settings; the committed bench/results/steps_quality.json has the issue's
layout and cells whose grids really cost what they record; the speckle measure and the plot.
Slow: the whole script on a random tiny model, and the counter for every solver."""
import dataclasses
import json
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

import diffjax
from diffjax.core import samplers as SM
from diffjax.data import DataConfig
from diffjax.models.feature_classifier import FeatureClassifier
from diffjax.models.registry import network_config
from diffjax.pipelines.training import loop as T
from tests._util import REPO

sys.path.insert(0, str(REPO / "bench"))
import steps_quality as SQ

SIZE, CLASSES, CHAIN = 8, 3, 100  # 100 steps: DDIM-50 (GD's "ddim50") exists
RESULTS = REPO / "bench" / "results"
SHORT = diffjax.DiffusionSpec(beta_schedule="cosine", num_steps=CHAIN)
# The default Fashion-MNIST model's chain (the committed results' "1000-step cosine chain").
DEFAULT = diffjax.DiffusionSpec(beta_schedule="cosine", num_steps=1000)


def _evaluations_of(solver: str, schedule) -> int:
    """Network calls of `solver` on a respaced schedule, from the solvers' definitions (not by
    running them)."""
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    steps = len(abar)
    if solver == "dpm++2s":
        return 2 * steps - 1  # two per step, one at the step to the data
    if solver == "heun":  # two per step but one at the last and from levels above sigma_max = 80
        s = np.sqrt((1 - abar) / abar)
        return steps + int(np.sum(s[1:] <= 80.0))
    return steps  # one per step; UniPC's corrector reuses the next step's evaluation


def _evaluations(solver, grid, spec):
    return _evaluations_of(solver, spec.schedule(grid))


@pytest.fixture
def closed_form_counter(monkeypatch):
    """count_evaluations replaced by the closed forms: the planner tested without compiling."""
    monkeypatch.setattr(SQ, "count_evaluations",
                        lambda sampler, schedule, spec, channels=1:
                        _evaluations_of(sampler.name, schedule))


# --------------------------------------------------------------------------- counting, planning


@pytest.mark.parametrize("solver", ["heun", "dpm++2s"])
def test_counted_evaluations_match_the_solvers_definitions(solver):
    # Karras on the cosine chain puts the first stops above sigma_max (~2e4 at the top): Heun's
    # Euler-only steps are exercised, so the count is below two per step.
    grid = SQ.time_grid(SQ.DEFAULT_GRIDS[solver], 6, SHORT)
    counted = SQ.count_evaluations(SQ.make_sampler(solver, SHORT), SHORT.schedule(grid), SHORT)
    assert counted == _evaluations(solver, grid, SHORT)
    assert counted == {"heun": 10, "dpm++2s": 11}[solver]  # 6 + 4 corrector calls; 2 * 6 - 1


@pytest.mark.slow
@pytest.mark.parametrize("solver", list(SM.SAMPLERS))
def test_counted_evaluations_match_every_solvers_definition(solver):
    for kind in ("logsnr", "karras", "uniform"):
        grid = SQ.time_grid(kind, 7, SHORT)
        counted = SQ.count_evaluations(SQ.make_sampler(solver, SHORT), SHORT.schedule(grid),
                                       SHORT)
        assert counted == _evaluations(solver, grid, SHORT), kind


@pytest.mark.parametrize("solver,budget,steps,nfe", [
    ("dpm++2s", 10, 5, 9),  # two a step, one at the last: 5 steps cost 9, 6 would cost 11
    ("dpm++2s", 5, 3, 5),
    ("unipc", 8, 8, 8),
    ("ddim", 11, 10, 10),  # GD's "ddim11" does not exist on 100 steps (no stride gives 11)
])
def test_plan_takes_the_most_steps_that_fit(closed_form_counter, solver, budget, steps, nfe):
    cell = SQ.plan_cell(solver, budget, SQ.DEFAULT_GRIDS[solver], SHORT)
    assert (cell.steps, cell.nfe) == (steps, nfe)
    if solver == "ddim":
        assert not SQ._placeable("ddim", 11, SHORT) and SQ._placeable("ddim", 10, SHORT)


def test_plan_for_heun_counts_its_euler_steps(closed_form_counter):
    for budget in (5, 8, 10, 20):
        cell = SQ.plan_cell("heun", budget, "karras", DEFAULT)
        assert cell.nfe == _evaluations("heun", cell.grid(DEFAULT), DEFAULT) <= budget
        longer = SQ.time_grid("karras", cell.steps + 1, DEFAULT)
        assert _evaluations("heun", longer, DEFAULT) > budget
        assert cell.nfe < 2 * cell.steps - 1  # some steps start above sigma_max: one call


def test_time_grid_kinds():
    assert list(SQ.time_grid("ddim", 10, SHORT).timesteps(CHAIN)) == list(range(0, 100, 10))
    assert len(SQ.time_grid("karras", 9, DEFAULT).timesteps(DEFAULT.training_betas())) == 9
    with pytest.raises(ValueError, match="grid kind"):
        SQ.time_grid("cubic", 5, SHORT)


# --------------------------------------------------------------------------- resume


def _args(out, **over):
    values = {"solvers": "ddim,dpm++2s", "nfe": "5", "grids": "", "no_baseline": True,
              "out": str(out), "plot": None, "samples": 4, "grid_nfe": 5, "resume": True}
    return types.SimpleNamespace(**{**values, **over})


def _settings(**over):
    return {"samples": 4, "model": "m", "classifier": "c", "reference_images": "r",
            "guidance_scale": None, "seed": 0, "batch_size": 2, "clip_denoised": True,
            "ddim_eta": 0.0, **over}


def test_resume_keeps_cells_only_under_the_same_settings(closed_form_counter, tmp_path, capsys):
    model = types.SimpleNamespace(spec=SHORT, image_shape=(SIZE, SIZE, 1))
    measured = []

    def measure(cell):
        measured.append((cell.solver, cell.steps))
        return {"fd": float(len(measured)), "steps": cell.steps, "nfe": cell.nfe,
                "grid": cell.describe(), "grid_kind": cell.kind, "seconds_per_image": 0.1}

    out = tmp_path / "sq.json"
    how = {"scale": None, "clip": True, "eta": 0.0}
    grid_cells = SQ.run_table(_args(out), model, _settings(), measure, how)
    assert measured == [("ddim", 50), ("ddim", 5), ("dpm++2s", 3)]
    assert [(c.solver, c.steps) for c in grid_cells] == [("ddim", 5), ("dpm++2s", 3), ("ddim", 50)]
    first = json.loads(out.read_text())
    assert {k: first[k] for k in ("reference", "ddim", "dpm++2s")} == {
        "reference": {"ddim": {"50": 1.0}}, "ddim": {"5": 2.0}, "dpm++2s": {"5": 3.0}}

    SQ.run_table(_args(out, nfe="5,8"), model, _settings(), measure, how)  # only NFE 8 is new
    assert measured[3:] == [("ddim", 8), ("dpm++2s", 4)]
    second = json.loads(out.read_text())
    assert second["ddim"] == {"5": 2.0, "8": 4.0} and second["reference"] == first["reference"]

    SQ.run_table(_args(out), model, _settings(batch_size=3), measure, how)  # other noise
    assert measured[5:] == [("ddim", 50), ("ddim", 5), ("dpm++2s", 3)]
    assert "| ddim | 7.00" in capsys.readouterr().out  # the markdown table of the last run


def test_merge_joins_runs_split_by_solver_and_refuses_other_settings(closed_form_counter,
                                                                    tmp_path):
    """One process per solver (as on an accelerator), then --merge: the union of their cells,
    in --solvers order, each run's own measurement; runs of other settings are not joined."""
    model = types.SimpleNamespace(spec=SHORT, image_shape=(SIZE, SIZE, 1))
    how = {"scale": None, "clip": True, "eta": 0.0}

    def measure_by(offset):
        def measure(cell):
            return {"fd": offset + cell.steps, "steps": cell.steps, "nfe": cell.nfe,
                    "grid": cell.describe(), "grid_kind": cell.kind, "seconds_per_image": 0.1}
        return measure

    parts = []
    for i, solver in enumerate(["dpm++2s", "ddim"]):  # each run measures DDIM-50 too
        parts.append(tmp_path / f"{solver}.json")
        SQ.run_table(_args(parts[-1], solvers=solver, nfe="5,8", resume=False), model,
                     _settings(), measure_by(100.0 * (i + 1)), how)
    out = tmp_path / "merged.json"
    cells = SQ.merge(_args(out, merge=[str(p) for p in parts], solvers="ddim,dpm++2s",
                           nfe="5,8,10", no_baseline=False), CHAIN)
    merged = json.loads(out.read_text())
    # DDIM-50 from the first file; each solver's cells from its own run (offsets 100 and 200)
    assert merged["reference"] == {"ddim": {"50": 150.0}}
    assert list(merged)[1:3] == ["ddim", "dpm++2s"]
    assert merged["ddim"] == {"5": 205.0, "8": 208.0}
    assert merged["dpm++2s"] == {"5": 103.0, "8": 104.0}  # 2S fits 3 and 4 steps
    # NFE 10 and the ancestral baseline over the whole chain were in no file
    assert merged["settings"]["missing"] == {"ddim": [10], "dpm++2s": [10], "ddpm": [CHAIN]}
    assert [(m["file"], m["solvers"]) for m in merged["settings"]["merged_from"]] == [
        ("dpm++2s.json", ["dpm++2s"]), ("ddim.json", ["ddim"])]
    assert [(c.solver, c.steps) for c in cells] == [("ddim", 5), ("dpm++2s", 3), ("ddim", 50)]

    SQ.run_table(_args(tmp_path / "other.json", solvers="ddim", resume=False), model,
                 _settings(batch_size=3), measure_by(0.0), how)
    with pytest.raises(ValueError, match=r"other\.json was run with other settings.*batch_size"):
        SQ.merge(_args(out, merge=[str(parts[0]), str(tmp_path / "other.json")]))


def test_time_to_equal_quality_takes_the_cheapest_cell_at_ddim50s_distance(tmp_path):
    """bench/sample.py times, against GD's DDIM-50, the cell with the fewest evaluations whose
    distance is at most DDIM-50's (the lower distance among equally cheap ones)."""
    import sample as bench_sample

    def cell(fd, nfe, kind="logsnr"):
        return {"fd": fd, "nfe": nfe, "steps": nfe, "grid_kind": kind}

    table = {"settings": {"reference_cell": cell(150.0, 50, "ddim"), "cells": {
        "ddim": {"10": cell(270.0, 10, "ddim"), "50": cell(150.0, 50, "ddim")},
        "dpm++2m": {"8": cell(151.0, 8), "10": cell(149.0, 10)},
        "dpm++3m": {"8": cell(160.0, 8), "10": cell(140.0, 10)},
        "heun": {"15": cell(130.0, 14, "karras")}}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    assert bench_sample.equal_quality_cell(path) == {
        "solver": "dpm++3m", "nfe": 10, "steps": 10, "grid_kind": "logsnr", "fd": 140.0,
        "ref": 150.0}


# --------------------------------------------------------------------------- the committed table


def _budgets(row):
    return sorted(int(n) for n in row)


def test_committed_results_have_the_issue_layout_and_honest_nfe():
    result = json.loads((RESULTS / "steps_quality.json").read_text())
    ref = result["reference"]["ddim"]["50"]
    assert list(result["reference"]) == ["ddim"] and list(result["reference"]["ddim"]) == ["50"]
    settings = result.pop("settings")
    del result["reference"]
    assert set(result) == set(SM.SAMPLERS)  # the library's solver names, every one of them
    missing = settings.get("missing", {})  # solver -> why some of its budgets were not run
    for solver, row in result.items():
        assert {5, 8, 10} <= set(_budgets(row)), solver
        assert {15, 20} <= set(_budgets(row)) or missing.get(solver), solver
        assert all(isinstance(v, float) and np.isfinite(v) and v > 0 for v in row.values())
    cells = settings["cells"]
    reference = settings["reference_cell"]
    assert (reference["fd"], reference["steps"], reference["nfe"]) == (ref, 50, 50)
    assert reference["grid_kind"] == "ddim"
    for solver, row in cells.items():
        for budget, cell in row.items():
            assert cell["fd"] == result[solver][budget]
            grid = SQ.time_grid(cell["grid_kind"], cell["steps"], DEFAULT)
            if cell["grid_kind"] != "all":
                assert cell["grid_kind"] == settings["grids"][solver]
            assert cell["nfe"] == _evaluations(solver, grid, DEFAULT) <= int(budget)
            if cell["grid_kind"] != "all" and SQ._placeable(cell["grid_kind"], cell["steps"] + 1,
                                                             DEFAULT):
                longer = SQ.time_grid(cell["grid_kind"], cell["steps"] + 1, DEFAULT)
                assert _evaluations(solver, longer, DEFAULT) > int(budget), (solver, budget)
            assert cell["seconds_per_image"] >= 0
            if not cell.get("printed_only"):  # a record recovered from a printed table has no more
                assert cell["seconds_per_image"] > 0 and 0 <= cell["accuracy"] <= 1
    assert settings["samples"] >= 200


def test_committed_pictures_are_small_pngs():
    from PIL import Image

    for name in ("steps_quality.png", "steps_quality_grid_nfe10.png"):
        path = RESULTS / name
        assert path.stat().st_size < 400_000, name
        with Image.open(path) as image:
            assert image.format == "PNG"


# --------------------------------------------------------------------------- measures, plot


def test_high_frequency_is_zero_on_flat_images_and_high_on_a_checkerboard():
    flat = np.full((2, 16, 16, 1), 200, np.uint8)
    assert SQ.high_frequency(flat) == 0.0
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None, None] * 4,
                           (1, 64, 64, 1))
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[None, :, :, None]
    # Inside a 0/1 checkerboard each pixel is 4/9 from its 3x3 mean; a linear ramp has none.
    assert abs(SQ.high_frequency(board) - 16 / 81) < 0.02
    assert SQ.high_frequency(ramp) < 1e-4


def test_plot_draws_one_line_per_solver(tmp_path):
    from PIL import Image

    table = {"ddim": {5: 300.0, 10: 200.0, 20: 150.0}, "unipc": {5: 220.0, 10: 160.0}}
    SQ.plot(table, 140.0, tmp_path / "p.png", "test")
    pixels = {tuple(p) for p in np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
              .reshape(-1, 3)}
    assert set(SQ._COLOURS[:2]) <= pixels and SQ._COLOURS[2] not in pixels


# --------------------------------------------------------------------------- the whole script


def _tiny_model():
    c = ml_collections.ConfigDict()
    c.data = {"source": "fashion_mnist", "image_size": SIZE, "channels": 1}
    c.model = {"model_channels": 32, "num_res_blocks": 0, "channel_mult": (1,),
               "attention_resolutions": (), "num_heads": 1}
    c.diffusion = {"beta_schedule": "cosine", "num_steps": CHAIN, "variance": "learned_range"}
    c.conditioning = {"class": {"num_classes": CLASSES, "dropout": 0.1}}
    c.train = {"task": "diffusion", "batch_size": 2, "total_steps": 1}
    c.eval = {"guidance_scale": 2.0}
    experiment, trainer, _ = T.experiment_and_trainer(c)
    return T.model_from_state(experiment, trainer.init(jax.random.PRNGKey(0)))


def _tiny_classifier():
    module = FeatureClassifier(num_classes=CLASSES, widths=(4,), features=6)
    variables = module.init(jax.random.PRNGKey(1), np.zeros((1, SIZE, SIZE, 1), np.float32))
    data = DataConfig(source="fashion_mnist", image_size=SIZE, channels=1, resize="pad")
    return diffjax.DiffusionModel(
        network=network_config(module), weights={"params": variables["params"]},
        kind="feature_classifier", image_shape=(SIZE, SIZE, 1),
        extra={"data": dataclasses.asdict(data), "metrics": {}})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steps_quality")
    diffjax.save(_tiny_model(), tmp / "model")
    diffjax.save(_tiny_classifier(), tmp / "classifier" / "model")
    rng = np.random.default_rng(0)
    np.savez(tmp / "ref.npz", arr_0=rng.integers(0, 256, (40, SIZE, SIZE, 1), dtype=np.uint8))
    out = tmp / "sq.json"
    argv = ["--model", tmp / "model", "--classifier", tmp / "classifier", "--ref", tmp / "ref.npz",
            "--samples", "6", "--batch_size", "4", "--solvers", "ddim,dpm++2s,heun",
            "--nfe", "4,10", "--out", out, "--plot", tmp / "plot.png", "--grid", tmp / "grid.png"]
    assert SQ.main(list(map(str, argv))) == 0
    return tmp, json.loads(out.read_text())


@pytest.mark.slow
def test_script_writes_the_issue_layout(run):
    _, result = run
    assert list(result) == ["reference", "ddim", "dpm++2s", "heun", "ddpm", "settings"]
    assert list(result["reference"]) == ["ddim"] and list(result["reference"]["ddim"]) == ["50"]
    for solver in ("ddim", "dpm++2s", "heun"):
        assert list(result[solver]) == ["4", "10"]
    assert list(result["ddpm"]) == [str(CHAIN)]  # the ancestral baseline over every step
    settings = result["settings"]
    assert settings["samples"] == 6 and settings["guidance_scale"] == 2.0
    assert settings["reference_cell"]["steps"] == 50 and settings["reference_cell"]["nfe"] == 50
    for solver, row in settings["cells"].items():
        for budget, cell in row.items():
            assert cell["fd"] == result[solver][budget]
            grid = SQ.time_grid(cell["grid_kind"], cell["steps"], SHORT)
            assert cell["nfe"] == _evaluations(solver, grid, SHORT) <= int(budget)
    ddpm = settings["cells"]["ddpm"][str(CHAIN)]
    assert ddpm["steps"] == ddpm["nfe"] == CHAIN


@pytest.mark.slow
def test_script_writes_plot_and_grid(run):
    from PIL import Image

    tmp, _ = run
    assert Image.open(tmp / "plot.png").size[0] > 0
    # 3 solvers and the DDIM-50 row x 3 classes of 16 px tiles, 2 px pads
    with Image.open(tmp / "grid.png") as grid:
        assert grid.size[1] == 4 * (2 * SIZE + 2) + 2

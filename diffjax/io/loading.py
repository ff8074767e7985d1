"""`diffjax.load(source)`: every way to a `DiffusionModel`, through one function.

source: a pretrained name ("adm-imagenet64-cond", ...; diffjax.io.pretrained), a bundle saved by
`diffjax.save`, a training run directory (its newest verified checkpoint), a directory diffjax
wrote before the bundle (diffjax.io.legacy), a PyTorch `.pt` with `preset=` (converted once and
cached), or a DiffusionModel (returned as it is). Everything is opened read-only.
"""
from __future__ import annotations

import pathlib

import ml_collections

from diffjax.bundle import DiffusionModel
from diffjax.io import legacy, pretrained, store
from diffjax.io.checkpoints import CheckpointConfig, CheckpointManager


def read_run(path, step: int | None = None) -> DiffusionModel:
    """The model of a training run: its description and every weight set (the parameters and
    each EMA) of the newest checkpoint that restores and verifies (or of `step`)."""
    path = pathlib.Path(path).absolute()
    manager = CheckpointManager(path / "checkpoints", CheckpointConfig(async_save=False),
                                read_only=True)
    try:
        restored = manager.restore(None, step)
        if restored is None:
            raise FileNotFoundError(f"{path}/checkpoints holds no checkpoint yet: train first "
                                    f"(python -m diffjax train --workdir {path})")
        found = step if step is not None else manager.restored_step
        description = manager.model(found)
    finally:
        manager.close()
    state, _ = restored
    emas = [name for name in description["weights"] if name != "params"]  # in ema_rates order
    weights = {"params": state["params"]}
    weights.update({name: ema for name, ema in zip(emas, state["ema"])})
    model = DiffusionModel.from_description(description, weights)
    return model.replace(provenance={**model.provenance, "run": str(path), "step": int(found)})


def load(source, *, ema: int | str | None = None, preset=None, key=None,
         dtype: str | None = None, progress: bool = True) -> DiffusionModel:
    """The DiffusionModel of `source` (module docstring). ema: which weights sample (an EMA index,
    -1 for the trained parameters, or a weight name; default the model's own choice); preset: the
    preset of a .pt file; key: the nested state dict of a .pt holding several (e.g. "ema");
    dtype: the compute dtype ("float32", "bfloat16"; default the model's)."""
    if isinstance(source, DiffusionModel):
        model = source
    else:
        model = _read(source, preset=preset, key=key, progress=progress)
    if ema is not None:
        model = model.using(ema)
    if dtype is not None and model.network.get("dtype") is not None:
        model = model.replace(network=dict(model.network, dtype=dtype))
    return model


def _read(source, *, preset, key, progress) -> DiffusionModel:
    path = store.local_path(source)
    if path is None:
        if pretrained.is_name(source):
            return pretrained.load_pretrained(source, progress=progress)
        raise FileNotFoundError(
            f"{source!r} is neither a file or directory nor a pretrained name: give a saved model, "
            f"a training run directory, a .pt with preset=..., or a name from `python -m diffjax "
            f"pretrained list`{_hint(source)}")
    if path.is_file():
        if preset is None:
            raise ValueError(f"{path} is a file: a PyTorch checkpoint needs preset= (e.g. "
                             f"'64x64_diffusion'; `python -m diffjax pretrained list`) to say what "
                             f"network it holds")
        return pretrained.convert_cached(path, preset, key=key, progress=progress)
    if store.is_bundle(path):
        return store.read_bundle(path)
    old = legacy.read(path)
    if old is not None:
        return old
    if (path / "checkpoints").is_dir():
        return read_run(path)
    raise FileNotFoundError(f"{path} holds no diffjax model: expected a directory written by "
                            f"diffjax.save, a training run directory (with checkpoints/), or a "
                            f"converted checkpoint")


def _hint(source) -> str:
    try:
        pretrained.lookup(str(source))
    except KeyError as err:
        text = str(err).strip("'\"")
        return f" ({text.split(':')[0].split('(')[-1].rstrip(')')})" if "did you mean" in text else ""
    return ""


def load_converted(directory):
    """(module, variables, preset) of a converted checkpoint: the network, its variables and the
    preset it was converted with (kept in the model's provenance)."""
    path = store.local_path(directory)
    if path is None or not path.is_dir() or not (store.is_bundle(path) or legacy.is_converted(path)):
        raise FileNotFoundError(f"{pathlib.Path(directory).absolute()} is not a checkpoint written "
                                f"by python -m diffjax convert (no saved model with a preset)")
    model = load(path)
    if "preset" not in model.provenance:
        raise FileNotFoundError(f"{path} is not a checkpoint written by python -m diffjax convert "
                                f"(its model has no preset)")
    return model.module, model.variables(), ml_collections.ConfigDict(model.provenance["preset"])

"""A released PyTorch checkpoint -> a `DiffusionModel`.

The `.pt` file is read by `diffjax.io.torch_pt` (no torch, no pickled code run), one tensor at a
time, straight into the Flax parameters, so peak memory stays near one copy of the weights. The
key/shape check is strict: every missing, unexpected or mis-shaped tensor is listed in one error.
The preset (a released checkpoint's name, or a guided-diffusion flag string) says what network,
diffusion and conditioning the weights belong to (`diffjax.compat.native.bundle_parts`).
"""
from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping

from tqdm.auto import tqdm

from diffjax.bundle import DiffusionModel
from diffjax.compat import gd_models, gd_presets, glide_presets
from diffjax.compat.native import bundle_parts
from diffjax.io import store, torch_pt
from diffjax.io.torch_mapping import load_state_dict


def preset_config(preset=None, *, flags: str | None = None, kind: str = "diffusion",
                  family: str = gd_presets.GD, num_classes: int = gd_models.NUM_CLASSES):
    """The preset-shaped config of a released checkpoint's name (guided-diffusion,
    improved-diffusion or GLIDE: base, upsample, base-inpaint, upsample-inpaint), or of a
    guided-diffusion flag string."""
    if flags is not None:
        return gd_presets.config_from_flags(flags, kind=kind, family=family,
                                            num_classes=num_classes)
    if not isinstance(preset, str):
        return preset
    if preset in glide_presets.PRESETS:
        return glide_presets.get_config(preset)
    return gd_presets.get_config(preset)


def build_model(config):
    """The Flax module a preset-shaped config describes (its factory with its model flags)."""
    if config.get("family") == glide_presets.FAMILY:
        return glide_presets.build_model(config)
    factory = getattr(gd_models, config.factory)
    return factory(num_classes=config.num_classes, **config.model)


class _Progress(Mapping):
    """A state dict that advances a progress bar by each tensor's bytes as it is read."""

    def __init__(self, state_dict: torch_pt.LazyStateDict, bar):
        self._sd, self._bar = state_dict, bar

    def __getitem__(self, key):
        value = self._sd[key]
        self._bar.update(value.nbytes)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


def convert_model(pt_path, preset, *, key=None, progress: bool = True) -> DiffusionModel:
    """The bundle of `pt_path` (a .pt file) under `preset` (a name or a preset-shaped config; it
    travels in the bundle's provenance). `key` picks a nested state dict (e.g. "ema"; see
    `torch_pt.find_state_dict`)."""
    config = preset_config(preset)
    module = build_model(config)
    pt_path = pathlib.Path(pt_path)
    with torch_pt.open_pt(pt_path, key=key) as state_dict:
        total = sum(ref.nbytes for ref in state_dict.refs.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{pt_path.name} -> {config.name}",
                  disable=not progress) as bar:
            variables = load_state_dict(module, _Progress(state_dict, bar))
    parts = bundle_parts(config, module)
    source = {"file": pt_path.name, "bytes": pt_path.stat().st_size, "key": key}
    parts["provenance"] = {**parts["provenance"], **source,
                           "preset": {**config.to_dict(), "source": source}}
    return DiffusionModel(weights={"params": variables["params"]}, **parts)


def check_output(out, inputs) -> pathlib.Path:
    """`out` as an absolute path, refused when it is or contains one of `inputs` (replacing it
    would delete the input)."""
    out = pathlib.Path(out).absolute()
    for source in inputs:
        source = pathlib.Path(source).absolute()
        if source == out or out in source.parents:
            raise ValueError(f"--out {out} contains the input {source}: writing there would "
                             f"replace it; choose an output directory outside the input's")
    return out


def convert(pt_path, preset, out, *, key=None, overwrite: bool = False,
            progress: bool = True) -> pathlib.Path:
    """Convert and save to `out` (atomically: an existing `out` is replaced only with
    overwrite=True, and only once the new bundle is complete); returns its path."""
    out = check_output(out, [pt_path])
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --overwrite "
                              f"(the old checkpoint is replaced only once the new one is "
                              f"complete)")
    if out.exists() and store.bundle_metadata(out) is None:
        raise FileExistsError(f"{out} exists and is not a diffjax model: --overwrite replaces only "
                              f"a model written by diffjax; choose an empty or new --out")
    model = convert_model(pt_path, preset, key=key, progress=progress)
    return store.save(model, out, overwrite=True)



"""`python -m diffjax.convert`: a released PyTorch checkpoint -> an orbax checkpoint for diffjax.

    python -m diffjax.convert --pt 64x64_diffusion.pt --preset 64x64_diffusion --out ckpt/adm64
    python -m diffjax.convert --pt model.pt --flags "--image_size 64 --num_channels 128 ..." --out ckpt/x

The `.pt` file is read by `diffjax.io.torch_pt` (no torch, no pickled code run), one
tensor at a time, straight into the Flax parameters, so peak memory stays near one copy of the
weights. The key/shape check is strict: every missing, unexpected or mis-shaped tensor is listed
in one error. The output directory is an orbax PyTree checkpoint of the variables whose custom
metadata holds `config`: the preset (model class, factory flags, diffusion flags) plus `source`,
where the weights came from (`ocp.Checkpointer(...).metadata(dir).custom_metadata`). It is written
beside the target and renamed into place only when complete, so a failed conversion never
replaces a good checkpoint. `load_converted(dir)` gives back (module, variables, config).
"""

from __future__ import annotations

from diffjax import hugepages

if __name__ == "__main__":
    hugepages.reexec()  # first: glibc reads its malloc tunables only when a process starts

import argparse
import os
import pathlib
import shutil
import sys
from collections.abc import Iterator, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from diffjax.io import torch_pt
from diffjax.compat import gd_models, gd_presets, glide_presets

def build_model(config):
    """The Flax module a preset-shaped config describes (its `factory` with its `model` flags)."""
    if config.get("family") == glide_presets.FAMILY:
        return glide_presets.build_model(config)
    factory = getattr(gd_models, config.factory)
    return factory(num_classes=config.num_classes, **config.model)


class _Progress(Mapping):
    """A state dict that advances a progress bar by each tensor's bytes as it is read."""

    def __init__(self, state_dict: torch_pt.LazyStateDict, bar: tqdm):
        self._sd, self._bar = state_dict, bar

    def __getitem__(self, key) -> np.ndarray:
        value = self._sd[key]
        self._bar.update(value.nbytes)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


def _checkpointer():
    # Uncompressed: compression buffers about one more copy of the weights while saving (~0.75x of
    # the file measured) and saves ~7% of the disk on float32 weights.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _write_in_place(out: pathlib.Path, write) -> None:
    """Run `write(tmp_dir)` beside `out`, then move the result to `out` (replacing it) only on success."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():  # put the good checkpoint back
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(
    pt_path, config, out_dir, *, key=None, overwrite: bool = False, progress: bool = True
) -> pathlib.Path:
    """Convert `pt_path` with a preset-shaped `config` and save it to `out_dir`; returns its path.

    `key` picks a nested state dict (e.g. "ema"; see `torch_pt.find_state_dict`). An existing
    `out_dir` is replaced only with `overwrite=True`, and only after the new one is complete.
    """
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists: choose another --out or pass --overwrite "
            f"(the old checkpoint is replaced only once the new one is complete)"
        )
    module = build_model(config)
    pt_path = pathlib.Path(pt_path)
    with torch_pt.open_pt(pt_path, key=key) as state_dict:
        total = sum(ref.nbytes for ref in state_dict.refs.values())
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"{pt_path.name} -> {config.name}",
            disable=not progress,
        ) as bar:
            variables = gd_models.load_state_dict(module, _Progress(state_dict, bar))
    # The preset travels with the weights, plus where they came from.
    metadata = {
        **config.to_dict(),
        "source": {"file": pt_path.name, "bytes": pt_path.stat().st_size, "key": key},
    }
    checkpointer = _checkpointer()

    def write(tmp):
        checkpointer.save(tmp, ocp.args.PyTreeSave(variables), custom_metadata={"config": metadata})

    out.parent.mkdir(parents=True, exist_ok=True)
    _write_in_place(out, write)
    return out


def load_converted(directory):
    """(module, variables, config) from a directory written by `convert`; `module.apply(variables, ...)`.

    `config` is the preset it was converted with, plus `source` (the .pt file's name and size).
    """
    directory = pathlib.Path(directory).absolute()
    checkpointer = _checkpointer()
    metadata = checkpointer.metadata(directory) if directory.is_dir() else None
    if metadata is None or "config" not in (metadata.custom_metadata or {}):
        raise FileNotFoundError(
            f"{directory} is not a checkpoint written by python -m diffjax.convert "
            f"(no orbax checkpoint with a 'config' in its custom metadata)"
        )
    config = ml_collections.ConfigDict(metadata.custom_metadata["config"])
    # Onto the default device, whatever the machine that converted it had.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(sharding=device), metadata.item_metadata.tree
    )
    variables = checkpointer.restore(directory, ocp.args.PyTreeRestore(restore_args=restore_args))
    return build_model(config), variables, config


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m diffjax.convert", description=__doc__.split("\n")[0]
    )
    p.add_argument("--pt", required=True, help="the PyTorch checkpoint (.pt)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a preset of configs/pretrained.py, e.g. 64x64_diffusion, "
                       "or of GLIDE: base, upsample, base-inpaint, upsample-inpaint")
    which.add_argument("--flags", help="guided-diffusion flag string, as in its README")
    p.add_argument(
        "--kind",
        default="diffusion",
        choices=["diffusion", "super_resolution", "classifier"],
        help="with --flags: UNetModel, SuperResModel or EncoderUNetModel",
    )
    p.add_argument(
        "--family",
        default="guided-diffusion",
        choices=["guided-diffusion", "improved-diffusion"],
        help="with --flags: whose defaults fill the flags not given",
    )
    p.add_argument(
        "--num_classes",
        type=int,
        default=gd_models.NUM_CLASSES,
        help="with --flags: classes of a class-conditional model or classifier",
    )
    p.add_argument(
        "--key", help="name of the state dict inside the .pt when it holds several (e.g. ema)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out once the new checkpoint is complete"
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    try:
        if args.preset in glide_presets.PRESETS:  # base, upsample, base-inpaint, upsample-inpaint
            config = glide_presets.get_config(args.preset)
        elif args.preset:
            config = gd_presets.get_config(args.preset)
        else:
            config = gd_presets.config_from_flags(
                args.flags, kind=args.kind, family=args.family, num_classes=args.num_classes
            )
        out = convert(
            args.pt,
            config,
            args.out,
            key=args.key,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except Exception as e:  # one line whatever failed (a hostile .pt can raise anything): no traceback
        sys.exit(f"error: {str(e) or type(e).__name__}")
    print(f"wrote {out} ({config.model_class}, preset {config.name})")


if __name__ == "__main__":
    main()

"""Pretrained models by name: every released guided-diffusion, improved-diffusion and GLIDE
checkpoint (diffusion models, noisy classifiers, upsamplers).

`diffjax.load("adm-imagenet64-cond")` looks in the cache directory (`DIFFJAX_HOME`, default
~/.cache/diffjax, read when called): a converted bundle there is loaded; a `.pt` there is
converted once and the bundle kept beside it; a missing file is downloaded (with a progress bar;
its SHA-256 is printed and recorded in the bundle's provenance, and the conversion's strict
key/shape check refuses a truncated or wrong file), and offline the error prints the URL and the
exact path to put the file at. `python -m diffjax pretrained list` prints the table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import urllib.error
import urllib.request

from diffjax.bundle import DiffusionModel
from diffjax.compat import gd_presets, glide_presets
from diffjax.core import fields
from diffjax.io import convert, store


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A released checkpoint: diffjax's name, the preset it converts with, its file and URL,
    and what it is."""

    name: str
    preset: str
    resolution: str
    params_m: float
    size_mb: int
    what: str

    @property
    def config(self):
        return convert.preset_config(self.preset)

    @property
    def file(self) -> str:
        return self.config.checkpoint

    @property
    def url(self) -> str:
        return self.config.url


# name, preset, resolution, parameters (millions), float32 size (MB; counted from the presets'
# state-dict layouts), what it is
_TABLE = [
    ("adm-imagenet64-cond", "64x64_diffusion", "64", 295.9, 1184, "ADM-G ImageNet 64 (class-conditional)"),
    ("adm-imagenet64-classifier", "64x64_classifier", "64", 65.4, 262, "noisy ImageNet classifier for ADM-G 64"),
    ("adm-imagenet128-cond", "128x128_diffusion", "128", 421.5, 1686, "ADM-G ImageNet 128"),
    ("adm-imagenet128-classifier", "128x128_classifier", "128", 42.6, 170, "noisy classifier for ADM-G 128"),
    ("adm-imagenet256-cond", "256x256_diffusion", "256", 553.8, 2215, "ADM-G ImageNet 256"),
    ("adm-imagenet256-uncond", "256x256_diffusion_uncond", "256", 552.8, 2211, "ADM ImageNet 256 (unconditional)"),
    ("adm-imagenet256-classifier", "256x256_classifier", "256", 54.1, 216, "noisy classifier for ADM-G 256"),
    ("adm-imagenet512-cond", "512x512_diffusion", "512", 559.0, 2236, "ADM-G ImageNet 512"),
    ("adm-imagenet512-classifier", "512x512_classifier", "512", 54.4, 218, "noisy classifier for ADM-G 512"),
    ("adm-upsampler-64-256", "64_256_upsampler", "64->256", 311.8, 1247, "ADM-U 64 -> 256 (class-conditional)"),
    ("adm-upsampler-128-512", "128_512_upsampler", "128->512", 308.8, 1235, "ADM-U 128 -> 512 (class-conditional)"),
    ("adm-lsun-bedroom", "lsun_bedroom", "256", 552.8, 2211, "ADM LSUN bedroom"),
    ("adm-lsun-cat", "lsun_cat", "256", 552.8, 2211, "ADM LSUN cat"),
    ("adm-lsun-horse", "lsun_horse", "256", 552.8, 2211, "ADM LSUN horse"),
    ("adm-lsun-horse-nodropout", "lsun_horse_nodropout", "256", 552.8, 2211, "ADM LSUN horse (no dropout)"),
    ("iddpm-imagenet64-uncond", "imagenet64_uncond_100M_1500K", "64", 121.1, 484, "improved DDPM ImageNet 64, hybrid loss"),
    ("iddpm-imagenet64-uncond-vlb", "imagenet64_uncond_vlb_100M_1500K", "64", 121.1, 484, "improved DDPM ImageNet 64, L_vlb"),
    ("iddpm-imagenet64-cond", "imagenet64_cond_270M_250K", "64", 273.0, 1092, "improved DDPM ImageNet 64, class-conditional"),
    ("iddpm-cifar10-uncond", "cifar10_uncond_50M_500K", "32", 52.5, 210, "improved DDPM CIFAR-10, hybrid loss"),
    ("iddpm-cifar10-uncond-vlb", "cifar10_uncond_vlb_50M_500K", "32", 52.5, 210, "improved DDPM CIFAR-10, L_vlb"),
    ("iddpm-upsampler-64-256", "upsample_cond_500K", "64->256", 279.8, 1119, "improved DDPM 64 -> 256 upsampler"),
    ("iddpm-lsun-bedroom-bs128", "lsun_uncond_100M_1200K_bs128", "256", 113.7, 455, "improved DDPM LSUN bedroom (1.2M steps)"),
    ("iddpm-lsun-bedroom-bs64", "lsun_uncond_100M_2400K_bs64", "256", 113.7, 455, "improved DDPM LSUN bedroom (2.4M steps)"),
    ("glide-base", "base", "64", 385.0, 1540, "GLIDE (filtered) text-to-image base"),
    ("glide-upsample", "upsample", "64->256", 398.4, 1593, "GLIDE (filtered) text-conditional upsampler"),
    ("glide-base-inpaint", "base-inpaint", "64", 385.0, 1540, "GLIDE (filtered) inpainting base"),
    ("glide-upsample-inpaint", "upsample-inpaint", "64->256", 398.4, 1593, "GLIDE (filtered) inpainting upsampler"),
]
REGISTRY = {row[0]: Pretrained(*row) for row in _TABLE}
# The released presets' own names (gd_presets / glide_presets) are accepted too.
_BY_PRESET = {p.preset: p for p in REGISTRY.values()}


def cache_dir() -> pathlib.Path:
    """$DIFFJAX_HOME, else ~/.cache/diffjax (read when called, never at import)."""
    return pathlib.Path(os.environ.get("DIFFJAX_HOME") or
                        pathlib.Path.home() / ".cache" / "diffjax").expanduser()


def lookup(name: str) -> Pretrained:
    if name in REGISTRY:
        return REGISTRY[name]
    if name in _BY_PRESET:
        return _BY_PRESET[name]
    raise KeyError(f"no pretrained model {name!r}{fields.closest(name, list(REGISTRY))}: "
                   f"`python -m diffjax pretrained list` prints them all")


def is_name(source) -> bool:
    return isinstance(source, str) and (source in REGISTRY or source in _BY_PRESET)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: pathlib.Path, progress: bool = True) -> pathlib.Path:
    """`url` -> `dest` through a temporary sibling (a broken download never looks complete)."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if total is not None and tmp.stat().st_size != total:
            raise OSError(f"download of {url} stopped at {tmp.stat().st_size} of {total} bytes")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(name: str, *, progress: bool = True, offline: bool = False) -> pathlib.Path:
    """The `.pt` of a pretrained model in the cache, downloaded when missing."""
    entry = lookup(name)
    pt = cache_dir() / entry.file
    if pt.is_file():
        return pt
    if not offline:
        try:
            return download(entry.url, pt, progress)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = f"the download failed ({type(err).__name__}: {err})"
        else:  # pragma: no cover
            reason = ""
    else:
        reason = "offline"
    raise FileNotFoundError(
        f"pretrained model {entry.name!r} is not in the cache and {reason}. Download\n  "
        f"{entry.url}\nand put it at\n  {pt}\n(the cache is $DIFFJAX_HOME, else "
        f"~/.cache/diffjax), then load it again")


def load_pretrained(name: str, *, progress: bool = True, offline: bool = False) -> DiffusionModel:
    """The bundle of a pretrained name: converted once, then read from the cache."""
    entry = lookup(name)
    bundle_dir = cache_dir() / entry.name
    if store.is_bundle(bundle_dir):
        return store.read_bundle(bundle_dir)
    pt = fetch(name, progress=progress, offline=offline)
    model = convert.convert_model(pt, entry.config, progress=progress)
    model = model.replace(provenance={**model.provenance, "pretrained": entry.name,
                                      "sha256": _sha256(pt)})
    store.save(model, bundle_dir, overwrite=True)
    return model


def convert_cached(pt_path, preset, *, key=None, progress: bool = True) -> DiffusionModel:
    """A .pt file with a preset: converted once, the bundle kept in the cache under the file's
    name, size and modification time (a changed file converts again)."""
    pt_path = pathlib.Path(pt_path).absolute()
    stat = pt_path.stat()
    config = convert.preset_config(preset)
    tag = f"{pt_path.stem}-{config.name}-{stat.st_size}-{int(stat.st_mtime)}"
    bundle_dir = cache_dir() / "converted" / tag
    if store.is_bundle(bundle_dir):
        return store.read_bundle(bundle_dir)
    model = convert.convert_model(pt_path, config, key=key, progress=progress)
    store.save(model, bundle_dir, overwrite=True)
    return model


def table() -> list[tuple]:
    """(name, resolution, params, size, URL) of every pretrained model."""
    return [(p.name, p.resolution, f"{p.params_m:.1f} M" if p.params_m else "-",
             f"{p.size_mb} MB" if p.size_mb else "-", p.url) for p in REGISTRY.values()]


def clear(name: str) -> None:
    """Remove a pretrained model's converted bundle from the cache (its .pt stays)."""
    shutil.rmtree(cache_dir() / lookup(name).name, ignore_errors=True)


__all__ = ["REGISTRY", "Pretrained", "cache_dir", "lookup", "is_name", "fetch",
           "load_pretrained", "convert_cached", "table", "clear", "gd_presets", "glide_presets"]

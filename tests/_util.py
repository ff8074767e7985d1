"""Shared helpers for the tests: golden-file access and the parity error metric."""
import json
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DIFFJAX_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "parity"
PRESETS = SHARED / "presets"


def require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"golden data {path} is absent (set DIFFJAX_SHARED to the shared/ folder)")
    return path


class Golden:
    """An npz of golden vectors with its parsed `__config__`."""

    def __init__(self, path):
        self.path = path
        self.npz = np.load(path)
        self.config = json.loads(str(self.npz["__config__"]))

    def __getitem__(self, key):
        return self.npz[key]

    def __contains__(self, key):
        return key in self.npz.files

    def keys(self, prefix=""):
        return [k for k in self.npz.files if k.startswith(prefix)]

    def state_dict(self):
        return {k: self.npz[k] for k in self.config["state_dict_keys"]}


def nchw_to_nhwc(a):
    """Golden files are NCHW; diffjax is NHWC."""
    a = np.asarray(a)
    return np.moveaxis(a, -3, -1) if a.ndim >= 4 else a


def rel_err(a, b):
    """max|a-b| / max|b|: the parity metric of compat_guided_diffusion.md."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

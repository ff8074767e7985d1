"""Local paths and bucket URLs (gs://...) through one code path: etils.epath, which orbax uses for
checkpoints too. A bucket needs a filesystem backend on the machine (`pip install gcsfs`, or
TensorFlow's gfile); local paths need nothing."""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/dir (anything with a scheme)."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: URLs as given, local paths made absolute (relative to the working
    directory of the process that was given them)."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def write_with(path: epath.Path, write: Callable[[pathlib.Path], None]) -> None:
    """Call write(local file path) and leave the result at `path`: directly for a local path,
    through a temporary file and one upload for a bucket (writers such as PIL's save want a
    real file name)."""
    if not is_remote(path):
        write(pathlib.Path(os.fspath(path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = pathlib.Path(tmp) / path.name
        write(local)
        path.write_bytes(local.read_bytes())

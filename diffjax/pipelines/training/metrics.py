"""Metrics of a run, on process 0: the console (through the progress bar), `metrics.jsonl`, and
TensorBoard event files written by tensorboardX (scalars, the sample grid as an image, and the
run's hyper-parameters). tensorboardX writes without TensorFlow."""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from diffjax import paths


def _console(text: str) -> None:
    """A line that does not break a tqdm progress bar."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(text, file=sys.stderr, flush=True)


class MetricWriter:
    """Scalars to the console, to `metrics.jsonl` and to TensorBoard; images and hyper-parameters
    to TensorBoard. Only process 0 writes.

    A bucket object cannot be appended to: for a gs:// workdir the files are written to a local
    staging folder and copied up whole (every UPLOAD_EVERY_S seconds and at close)."""

    UPLOAD_EVERY_S = 60.0

    def __init__(self, workdir: str | os.PathLike, console: bool = True):
        self.active = jax.process_index() == 0
        self.console = console
        if not self.active:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes

        self.workdir = paths.as_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._remote = paths.is_remote(self.workdir)
        local = pathlib.Path(tempfile.mkdtemp(prefix="diffjax_metrics_")) if self._remote \
            else pathlib.Path(os.fspath(self.workdir))
        if self._remote and (self.workdir / "metrics.jsonl").exists():  # a resumed run appends
            (local / "metrics.jsonl").write_bytes((self.workdir / "metrics.jsonl").read_bytes())
        self._local, self._uploaded = local, time.monotonic()
        self._jsonl = open(local / "metrics.jsonl", "a")
        self._tb = SummaryWriter(logdir=str(local / "tensorboard"), flush_secs=30)

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self.flush()
        if self.console:
            _console(f"[step {step}] " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def write_image(self, step: int, name: str, image) -> None:
        """An RGB image (a PIL image or uint8 [H, W, 3]) under `name`."""
        if self.active:
            self._tb.add_image(name, np.asarray(image.convert("RGB") if hasattr(image, "convert")
                                                else image), int(step), dataformats="HWC")

    def write_hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's flattened config beside its final metrics (TensorBoard's HParams tab)."""
        if not self.active:
            return
        plain = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                 for k, v in hparams.items()}
        numbers = {f"final/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and np.isfinite(v)}
        self._tb.add_hparams(plain, numbers, name="hparams")

    def flush(self, upload: bool = False):
        """Flush to disk; for a gs:// workdir also copy up, when `upload` or when the last copy
        is UPLOAD_EVERY_S old."""
        if not self.active:
            return
        self._jsonl.flush()
        self._tb.flush()
        if self._remote and (upload or time.monotonic() - self._uploaded > self.UPLOAD_EVERY_S):
            for file in [self._local / "metrics.jsonl",
                         *(self._local / "tensorboard").rglob("events.out.tfevents*")]:
                rel = file.relative_to(self._local)
                (self.workdir / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.workdir / rel).write_bytes(file.read_bytes())
            self._uploaded = time.monotonic()

    def close(self):
        if self.active:
            self.flush(upload=True)
            self._jsonl.close()
            self._tb.close()

"""Metrics of a run, on process 0: the console (through the progress bar), `metrics.jsonl`, and
TensorBoard event files written by tensorboardX (scalars, the sample grid as an image, and the
run's hyper-parameters). tensorboardX writes without TensorFlow.

Model FLOP utilisation: MFU = FLOPs per step / step time / (peak FLOP/s per device x devices), the
FLOPs counted by XLA's cost analysis of the step (`program_flops`), the peak from the device's
datasheet (`peak_flops`) or given."""
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

# Dense peak TFLOP/s per device by compute dtype (vendor datasheets, without sparsity); a device
# kind (jax.Device.device_kind) takes the first entry whose name it contains, case ignored.
# float32 on A100 / H100 / H200 is TF32 on the tensor cores, which XLA uses for float32 matmuls
# and convolutions at JAX's default precision; V100 has no bfloat16 units (its 125 is float16);
# on TPU float32 speed depends on the matmul precision, so it is left unknown.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 495.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 495.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0}),
    ("TPU v5", {"bfloat16": 459.0}),  # v5p reports "TPU v5" (v5e "TPU v5 lite", matched above)
    ("TPU v6 lite", {"bfloat16": 918.0}),
)


def peak_flops(device_kind: str, dtype) -> float | None:
    """The dense peak FLOP/s of one `device_kind` device computing in `dtype`, or None when the
    table does not know it."""
    dtype = np.dtype(dtype).name
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None


def program_flops(stage) -> float | None:
    """FLOPs of a lowered or compiled JAX program by XLA's cost analysis (None if the backend
    gives none). A lowered program is counted before XLA's optimisations and whole (every
    device's share); a compiled one per device. XLA counts a rolled loop's body once."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return flops if flops > 0 else None


def mfu(flops_per_step: float, seconds_per_step: float, peak: float, devices: int) -> float:
    """Model FLOP utilisation: the fraction of `devices` x `peak` FLOP/s the step achieves."""
    return flops_per_step / seconds_per_step / (peak * devices)


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

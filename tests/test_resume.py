"""Exact resume: `python -m diffjax train` killed with SIGKILL at a random moment and restarted
with the same command ends with bit-identical state (parameters, EMA, optimizer state, rng,
timestep-sampler state) to an uninterrupted run; SIGTERM saves and exits."""
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from diffjax.io import checkpoints
from diffjax.io.checkpoints import CheckpointManager
from tests._util import REPO

TOTAL_STEPS = 30

CONFIG = textwrap.dedent(f"""
    import ml_collections

    def get_config():
        c = ml_collections.ConfigDict()
        c.data = dict(source="fashion_mnist", image_size=32, channels=1, resize="pad", seed=1)
        c.model = dict(model_channels=32, num_res_blocks=0, channel_mult=(1, 1),
                       attention_resolutions=(), num_heads=1)
        c.diffusion = dict(beta_schedule="cosine", num_steps=100, variance="learned_range")
        c.conditioning = {{"class": dict(num_classes=10, dropout=0.2)}}
        c.train = dict(task="diffusion", batch_size=8, total_steps={TOTAL_STEPS},
                       steps_per_dispatch=2, ema_rates=(0.9, 0.999),
                       schedule_sampler="loss-second-moment", seed=3)
        c.optim = dict(lr=1e-3, warmup_steps=5, schedule="cosine")
        c.checkpoint = dict(every=2, keep=2, async_save=True)
        c.eval = dict(per_class=0)
        c.log_every = 2
        return c
""")


def _command(config, workdir):
    return [sys.executable, "-m", "diffjax", "train", "--config", str(config), "--workdir", str(workdir)]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return env


def _final_state(workdir):
    manager = CheckpointManager(pathlib.Path(workdir) / "checkpoints")
    assert manager.latest_step() == TOTAL_STEPS
    state, data_state = manager.restore(None)
    manager.close()
    return state, data_state


def _steps(workdir):
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


@pytest.mark.slow  # three training processes, each compiling: ~3 min on 2 cores
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path):
    config = tmp_path / "config.py"
    config.write_text(CONFIG)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(_command(config, straight), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    proc = subprocess.Popen(_command(config, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not _steps(killed) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        # A random moment of the training run (a save may well be in flight).
        time.sleep(random.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    at = _steps(killed)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert at and max(at) < TOTAL_STEPS, f"killed too late: checkpoints {at}"

    resumed = subprocess.run(_command(config, killed), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {max(at)}" in resumed.stderr or "resuming at step" in resumed.stderr

    (a, data_a), (b, data_b) = _final_state(straight), _final_state(killed)
    assert data_a == data_b == {"next_batch": TOTAL_STEPS}
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # two training processes, each compiling: ~2 min on 2 cores
def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    config = tmp_path / "config.py"
    config.write_text(CONFIG)
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_command(config, workdir), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not _steps(workdir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: saved step" in err
    saved = int(err.split("SIGTERM: saved step ")[1].split(",")[0])
    assert max(_steps(workdir)) == saved < TOTAL_STEPS


def _numpy_checksum(x) -> int:
    """The documented checksum, sum_i bits(x_i) (2 i + 1) mod 2^32, in exact numpy integers."""
    x = np.asarray(x).reshape(-1)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint64)
    else:
        bits = x.view(f"u{x.dtype.itemsize}").astype(np.uint64)
    index = np.arange(x.size, dtype=np.uint64)
    return int(np.sum(bits * (2 * index + 1) % 2**32) % 2**32)


def test_checksums_follow_their_formula():
    """Every dtype a state holds, sizes on and off the 32-element rows the sum is split into,
    a scalar and an empty array."""
    rng = np.random.default_rng(0)
    tree = {"conv": rng.standard_normal((3, 3, 64, 65)).astype(np.float32),
            "odd": rng.standard_normal(4097 * 3).astype(np.float32),
            "short": rng.standard_normal(31).astype(np.float32),
            "bf16": rng.standard_normal(77).astype(jax.numpy.bfloat16),
            "int8": rng.integers(-128, 128, 5001).astype(np.int8),
            "mask": rng.random(40) < 0.5, "scalar": np.float32(3.0), "empty": np.zeros(0, np.float32)}
    got = checkpoints.checksums({k: jax.numpy.asarray(v) for k, v in tree.items()})
    assert got == {k: _numpy_checksum(v) for k, v in tree.items()}


def test_checksums_need_no_copy_of_the_state():
    """The compiled checksum program's scratch stays a small fraction of the arrays it reads
    (one fused sum over everything kept a full-size product: 1.6x a 200 MiB model at the peak of
    saving it)."""
    rng = np.random.default_rng(0)
    tree = {"w": jax.numpy.asarray(rng.standard_normal((3, 3, 256, 256)), np.float32),
            "b": jax.numpy.asarray(rng.standard_normal((512, 1000)), np.float32)}
    stats = checkpoints._checksums.lower(tree).compile().memory_analysis()
    assert stats.temp_size_in_bytes <= stats.argument_size_in_bytes / 8, stats

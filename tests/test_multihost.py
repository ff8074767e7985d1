"""Multi-host training with real processes: N CPU processes on this machine joined by
jax.distributed with gloo collectives (launch/local.sh, or the same command spawned directly where a
test must signal one process).

* 2 processes (1 device each) train to the same parameters as 1 process (2 devices) with the same
  global batch and seed (and, in the slow test, on configs/default.py);
* a checkpoint saved by 1 process resumes in 2, and the reverse, to the same end state;
* SIGKILL of one process makes the other exit with an error within the heartbeat timeout, and
  restarting both resumes from the last checkpoint;
* SIGTERM to every process (a preemption notice) gives one checkpoint, of the same step on all.

Every subprocess has a timeout, so a hang fails the test instead of blocking; they share a
persistent compilation cache, so only the first run of each topology compiles.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from diffjax.io.checkpoints import CheckpointManager
from tests._util import REPO, write_class_images

LOCAL_SH = REPO / "launch" / "local.sh"
HEARTBEAT_S = 10  # the dead-peer timeout these tests run with (the default is 60 s)
# One step count for every run: it is part of the compiled program (the LR schedule), so all runs
# of a topology share one entry of the compilation cache.
TOTAL_STEPS = 40
RUN_TIMEOUT_S = 420


def _config_text(data_path, total_steps, every, extra=""):
    return textwrap.dedent(f"""
        import ml_collections

        def get_config():
            c = ml_collections.ConfigDict()
            c.data = dict(source="folder", path={str(data_path)!r}, image_size=8, channels=3,
                          resize="center_crop", seed=1)
            c.model = dict(model_channels=32, num_res_blocks=0, channel_mult=(1,),
                           attention_resolutions=(), num_heads=1)
            c.diffusion = dict(beta_schedule="cosine", num_steps=100, variance="learned_range")
            c.conditioning = {{"class": dict(num_classes=4, dropout=0.2)}}
            c.train = dict(task="diffusion", batch_size=8, total_steps={total_steps},
                           steps_per_dispatch=1, ema_rates=(0.9,), seed=3)
            c.optim = dict(lr=1e-3, warmup_steps=2, schedule="cosine")
            c.checkpoint = dict(every={every}, keep=20, async_save=True)
            c.eval = dict(per_class=0)
            c.log_every = 1
            {extra}
            return c
    """)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every run: CPU only, one compilation cache for the module."""
    cache = tmp_path_factory.mktemp("jax_cache")
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", HEARTBEAT_TIMEOUT=str(HEARTBEAT_S))
    e.pop("XLA_FLAGS", None)  # the processes set their own device counts
    return e


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """64 random 8x8 RGB images of 4 classes (GD's file-name prefix convention)."""
    return write_class_images(tmp_path_factory.mktemp("images"), 64, 4)


def _write_config(path, images, every=4, extra=""):
    path.write_text(_config_text(images, TOTAL_STEPS, every, extra))
    return path


def _one_process(config, workdir, env, devices=2):
    """`python -m diffjax train` in one process with `devices` CPU devices (no jax.distributed)."""
    run = subprocess.run([sys.executable, "-m", "diffjax", "train", "--config", str(config),
                          "--workdir", str(workdir)], env=dict(env, JAX_NUM_CPU_DEVICES=str(devices)),
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _local_sh(n, config, workdir, env):
    run = subprocess.run([str(LOCAL_SH), str(n), "--config", str(config), "--workdir",
                          str(workdir)], env=env, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n, config, workdir, env, logdir):
    """The n processes of launch/local.sh, started directly (to signal them one by one); their
    stderr goes to logdir/p{i}.log."""
    port, procs = _free_port(), []
    for i in range(n):
        log = open(logdir / f"p{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-u", "-m", "diffjax", "train", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={n}", f"--process_id={i}", f"--heartbeat_timeout={HEARTBEAT_S}",
             "--config", str(config), "--workdir", str(workdir)],
            env=dict(env, JAX_NUM_CPU_DEVICES="1"), stdout=subprocess.DEVNULL, stderr=log,
            cwd=REPO))
    return procs


def _reap(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def _steps(workdir):
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def _wait_for(predicate, procs, timeout=RUN_TIMEOUT_S):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting for the run"
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.05)


def _state(workdir, step=None):
    manager = CheckpointManager(pathlib.Path(workdir) / "checkpoints")
    try:
        state, data = manager.restore(None, step)
        return jax.tree.map(np.asarray, state), data
    finally:
        manager.close()


def _max_diff(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(la, lb))


def _resume_from(source, step, workdir):
    """workdir/checkpoints holding only `source`'s checkpoint of `step`."""
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / str(step), workdir / "checkpoints" / str(step))


# --------------------------------------------------------------------------- same parameters


@pytest.fixture(scope="module")
def runs(tmp_path_factory, images, env):
    """TOTAL_STEPS straight in 1 process (2 devices); steps 5.. in 2 processes (1 device each,
    launch/local.sh) from the 1-process checkpoint of step 4; steps 9.. in 1 process from that
    2-process run's checkpoint of step 8. Returns the workdirs."""
    root = tmp_path_factory.mktemp("runs")
    config = _write_config(root / "config.py", images)
    out = {name: root / name for name in ("one", "one_then_two", "two_then_one")}
    _one_process(config, out["one"], env)
    _resume_from(out["one"], 4, out["one_then_two"])
    two = _local_sh(2, config, out["one_then_two"], env)
    assert "resuming at step 4" in two.stderr
    assert "2 cpu device(s)" in two.stderr and "global batch 8" in two.stderr
    _resume_from(out["one_then_two"], 8, out["two_then_one"])
    one = _one_process(config, out["two_then_one"], env)
    assert "resuming at step 8" in one.stderr
    return out


@pytest.mark.slow  # the shared 1 -> 2 -> 1 process runs: ~8 min on 2 cores
def test_two_processes_reach_the_parameters_of_one(runs):
    """Same global batches (data.py's process-count-independent order), same keys: after steps
    5-40 in 2 processes the whole state agrees with the 1-process run to float tolerance (the
    cross-process all-reduce may order sums differently), and so does every logged loss."""
    one, one_data = _state(runs["one"])
    two, two_data = _state(runs["one_then_two"])
    assert one_data == two_data == {"next_batch": TOTAL_STEPS}
    diff = _max_diff(one, two)
    print(f"max |param 1 process - 2 processes| = {diff:.3g}")
    assert diff < 1e-5
    rows = [{r["step"]: r["loss"] for r in map(json.loads, (runs[k] / "metrics.jsonl")
                                               .read_text().splitlines())}
            for k in ("one", "one_then_two")]
    # Only process 0 writes the run's files: one row per step it ran.
    assert sorted(rows[1]) == list(range(5, TOTAL_STEPS + 1))
    np.testing.assert_allclose([rows[1][k] for k in sorted(rows[1])],
                               [rows[0][k] for k in sorted(rows[1])], rtol=1e-5)


@pytest.mark.slow  # the shared 1 -> 2 -> 1 process runs: ~8 min on 2 cores
def test_checkpoints_restore_across_process_counts(runs):
    """Saved by 1 process and resumed by 2, saved by 2 and resumed by 1: the end states are the
    uninterrupted run's; a restored checkpoint equals the saved one, exactly."""
    one, _ = _state(runs["one"])
    for name in ("one_then_two", "two_then_one"):
        state, data = _state(runs[name])
        assert data == {"next_batch": TOTAL_STEPS}
        diff = _max_diff(one, state)
        print(f"{name}: max |param - uninterrupted 1 process| = {diff:.3g}")
        assert diff < 1e-5
    assert _max_diff(_state(runs["one"], 4)[0], _state(runs["one_then_two"], 4)[0]) == 0.0
    assert _max_diff(_state(runs["one_then_two"], 8)[0], _state(runs["two_then_one"], 8)[0]) == 0.0


def _losses(workdir):
    """{step: logged loss} of a run (only process 0 writes them)."""
    rows = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow  # the shared 1 -> 2 -> 1 process runs: ~8 min on 2 cores
def test_the_process_layout_changes_no_bit(runs):
    """The same devices (a 2-device mesh), spread over 1 process or 2: every device runs the same
    program on the same rows and the gradient all-reduce adds the same 2 partial sums (a + b is
    exact-commutative), so the runs are bit-identical: every state leaf, every logged loss."""
    one, two = _state(runs["one"])[0], _state(runs["one_then_two"])[0]
    assert _max_diff(one, two) == 0.0
    losses = _losses(runs["one_then_two"])
    assert losses == {k: v for k, v in _losses(runs["one"]).items() if k in losses}


@pytest.mark.slow  # the shared 1 -> 2 -> 1 process runs: ~8 min on 2 cores
def test_another_device_count_changes_only_the_rounding_of_the_batch_sum(tmp_path, runs, images,
                                                                         env):
    """1 device instead of 2, from the same checkpoint (step 4): step 5 sees the same parameters,
    batch, timesteps and noise, and computes the same per-example losses l_i >= 0; only the batch
    mean is summed differently (8 terms at once vs 4 + 4 and an all-reduce). Any order of summing
    B terms errs by at most (B - 1) u sum |l_i| (Higham, Accuracy and Stability of Numerical
    Algorithms, 2002, eq. 4.4; u = 2^-24), so the two logged losses differ by at most
    2 (B - 1) u mean(l). Parameters are not bounded this way after more steps: Adam divides by
    sqrt(v) + eps, so a parameter whose gradient is ~0 moves by O(lr) on that rounding
    (docs/pods.md, "Determinism")."""
    config = tmp_path / "config.py"
    config.write_text(_config_text(images, 5, every=5))  # total_steps does not enter step 5's loss
    _resume_from(runs["one"], 4, tmp_path / "one_device")
    _one_process(config, tmp_path / "one_device", env, devices=1)
    got, want = _losses(tmp_path / "one_device")[5], _losses(runs["one"])[5]
    batch, u = 8, 2.0 ** -24
    print(f"step 5 loss, 1 device {got!r} vs 2 devices {want!r}: rel {abs(got - want) / want:.2g} "
          f"(bound {2 * (batch - 1) * u:.2g})")
    assert abs(got - want) <= 2 * (batch - 1) * u * want


# --------------------------------------------------------------------------- failures


@pytest.mark.slow  # two 2-process runs: ~80-120 s on a loaded 2-core machine
def test_killed_process_stops_the_other_then_both_resume(tmp_path, images, env):
    """SIGKILL of process 1: process 0 exits non-zero with an error naming the cause within the
    heartbeat timeout (+ slack for a loaded machine), no hang; the same command on both then
    resumes from the last complete checkpoint and finishes."""
    config = _write_config(tmp_path / "config.py", images, every=8)
    workdir = tmp_path / "run"
    procs = _spawn(2, config, workdir, env, tmp_path)
    try:
        _wait_for(lambda: _steps(workdir), procs)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        procs[0].wait(timeout=HEARTBEAT_S + 60)
        elapsed = time.time() - killed_at
    finally:
        _reap(procs)
    err = (tmp_path / "p0.log").read_text()
    print(f"process 0 exited {elapsed:.1f} s after process 1 was killed "
          f"(heartbeat timeout {HEARTBEAT_S} s), status {procs[0].returncode}")
    assert procs[0].returncode != 0
    assert elapsed < HEARTBEAT_S + 20
    assert ("diffjax: process 0 of 2 stopped" in err and "restart ALL 2 processes" in err) or \
        "another task died" in err, err[-3000:]
    last = max(_steps(workdir))
    assert last < TOTAL_STEPS, "the run finished before the kill"

    procs = _spawn(2, config, workdir, env, tmp_path)
    try:
        for p in procs:
            p.wait(timeout=RUN_TIMEOUT_S)
    finally:
        _reap(procs)
    err = (tmp_path / "p0.log").read_text()
    assert [p.returncode for p in procs] == [0, 0], err[-3000:]
    assert f"resuming at step {last}" in err
    assert _state(workdir)[1] == {"next_batch": TOTAL_STEPS}


@pytest.mark.slow  # a 2-process run: ~1 min on 2 cores
def test_sigterm_to_every_process_saves_one_consistent_checkpoint(tmp_path, images, env):
    """SIGTERM to process 0, then to process 1 half a second later: both save the SAME step (JAX's
    preemption sync point) and exit with 143; that checkpoint is complete and restorable."""
    config = _write_config(tmp_path / "config.py", images, every=1000)
    workdir = tmp_path / "run"
    procs = _spawn(2, config, workdir, env, tmp_path)
    try:
        _wait_for(lambda: (workdir / "metrics.jsonl").exists()
                  and (workdir / "metrics.jsonl").read_text().count("\n") >= 2, procs)
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=120)
    finally:
        _reap(procs)
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [143, 143], logs[0][-3000:] + logs[1][-3000:]
    saved = [int(log.split("SIGTERM: saved step ")[1].split(",")[0]) for log in logs]
    print(f"SIGTERM: processes saved steps {saved}; checkpoints {_steps(workdir)}")
    assert saved[0] == saved[1] and 0 < saved[0] < TOTAL_STEPS
    assert _steps(workdir) == [saved[0]]  # every=1000: the preemption checkpoint is the only one
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    state, data = _state(workdir)
    assert int(state["step"]) == saved[0] and data == {"next_batch": saved[0]}


# --------------------------------------------------------------------------- the default config


@pytest.mark.slow
def test_default_config_two_processes_match_one(tmp_path, env):
    """configs/default.py (the bundled Fashion-MNIST UNet, global batch 16) for 3 steps: 2
    processes reach the parameters of 1."""
    from diffjax.data import fashion_mnist

    try:
        fashion_mnist("train")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    config = tmp_path / "config.py"
    config.write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("default", {str(REPO / 'configs' / 'default.py')!r})
        default = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(default)

        def get_config():
            c = default.get_config()
            c.train.total_steps = 3
            c.checkpoint = dict(every=3, keep=1)
            c.eval = dict(per_class=0)
            c.log_every = 1
            return c
    """))
    _one_process(config, tmp_path / "one", env)
    _local_sh(2, config, tmp_path / "two", env)
    one, _ = _state(tmp_path / "one")
    two, _ = _state(tmp_path / "two")
    diff = _max_diff(one, two)
    print(f"default config: max |param 1 process - 2 processes| = {diff:.3g}")
    assert diff < 1e-5


class _FakeDevice:
    def __init__(self, id, process_index):
        self.id, self.process_index = id, process_index


def test_mesh_keeps_each_process_on_a_contiguous_block_of_the_batch():
    """A topology order that interleaves two hosts' devices (as a TPU ring order may) becomes
    process-major, each process's devices keeping their order; an ordered grid stays as it is."""
    from diffjax import parallel

    grid = np.empty(8, dtype=object)
    grid[:] = [_FakeDevice(i, i % 2) for i in range(8)]
    out = parallel.process_major(grid.reshape(4, 2))
    assert out.shape == (4, 2)
    assert [d.id for d in out.flat] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert [d.id for d in parallel.process_major(out).flat] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_make_mesh_uses_every_device_with_auto_axes():
    from diffjax import parallel

    mesh = parallel.make_mesh(2)
    assert dict(mesh.shape) == {"data": jax.device_count() // 2, "fsdp": 2}
    assert set(mesh.devices.flat) == set(jax.devices())
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert parallel.make_mesh(1, jax.devices()[:2]).devices.size == 2


# --------------------------------------------------------------------------- start-up logic


def test_cluster_detection_follows_jax():
    """The launchers JAX detects by itself (its SLURM / Open MPI variable names); a one-task SLURM
    job or a plain shell is a single process."""
    from diffjax import distributed as d

    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
             "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
    assert d.detect_cluster(slurm) == "slurm"
    assert d.detect_cluster(dict(slurm, SLURM_NTASKS="1")) is None
    assert d.detect_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}) == "openmpi"
    assert d.detect_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "env"
    if d.importlib.util.find_spec("libtpu") is None:
        assert d.detect_cluster({}) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="yes"), "--distributed='yes': choose one of"),
    (dict(num_processes=2, process_id=2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (dict(mode="off", num_processes=2), "--distributed=off contradicts"),
    (dict(heartbeat_timeout=0), "--heartbeat_timeout=0"),
])
def test_distributed_config_errors_name_the_fix(kwargs, message):
    from diffjax import distributed as d

    with pytest.raises(ValueError, match=message):
        d.DistributedConfig(**kwargs)


def test_paths_keep_local_paths_and_urls(tmp_path):
    from diffjax import paths

    assert str(paths.as_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert paths.is_remote("gs://bucket/x") and not paths.is_remote(tmp_path)
    assert os.fspath(paths.as_path("rel/dir")) == os.path.abspath("rel/dir")
    paths.write_with(paths.as_path(tmp_path / "a.txt"), lambda p: p.write_text("x"))
    assert (tmp_path / "a.txt").read_text() == "x"

"""The pod launchers pin what they run: `--dry-run` of launch/tpu_pod.sh and launch/slurm.sbatch
prints the exact pip commands, which install every version of requirements.txt and the accelerator
wheel of the same jax release, and runs nothing (a fake gcloud / python on PATH would record it)."""
import os
import shlex
import subprocess

import pytest

from tests._util import REPO

LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def requirements() -> dict:
    """{name: version} of requirements.txt, read here independently of launch/pins.sh."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


@pytest.fixture
def sandbox(tmp_path):
    """An environment whose PATH starts with fakes of every command the launchers may run; each
    fake appends its command line to tmp_path/called."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name in ("gcloud", "srun", "python3.11", "pip", "tar"):
        fake = fakes / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*" >> {tmp_path / "called"}\n')
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "VENV"))}
    env.update(PATH=f"{fakes}:{env['PATH']}", HOME=str(tmp_path / "home"))
    return tmp_path, env


def _dry_run(args, env):
    out = subprocess.run(["bash", *args], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _pip_install(lines, prefix):
    """The arguments of the one `pip install` command (not the --no-deps one) printed after
    `prefix`, shell-unquoted."""
    commands = [shlex.split(line[len(prefix):]) for line in lines if line.startswith(prefix)]
    installs = [c for c in commands if len(c) > 2 and c[0].endswith("pip") and c[1] == "install"
                and "--no-deps" not in c]
    assert len(installs) == 1, lines
    return installs[0][2:]


def _pins(args, accelerator):
    """{name: version} of the name==version arguments; checks the accelerator extra of jax."""
    pins = dict(a.split("==") for a in args if "==" in a)
    want = requirements()
    assert pins.pop(f"jax[{accelerator}]") == want["jax"]
    return pins


def test_tpu_pod_install_pins_requirements_and_the_matching_libtpu(sandbox):
    tmp, env = sandbox
    lines = _dry_run(["launch/tpu_pod.sh", "--dry-run", "install"], env)
    args = _pip_install(lines, "worker$ ")
    pins = _pins(args, "tpu")
    gcsfs = pins.pop("gcsfs")  # the one extra: gs:// paths on the workers
    assert pins == requirements() and gcsfs
    assert args[args.index("-f") + 1] == LIBTPU_INDEX
    # every worker prints what it installed, and this checkout goes in without touching the pins
    assert any("pip freeze" in line for line in lines if line.startswith("worker$ "))
    assert any("pip install --no-deps -e ~/diffjax" in line for line in lines)
    assert not (tmp / "called").exists(), "a dry run ran a command"


def test_tpu_pod_multislice_runs_on_every_slice(sandbox):
    tmp, env = sandbox
    env.update(NUM_SLICES="2", WORKDIR="gs://bucket/runs/x")
    lines = _dry_run(["launch/tpu_pod.sh", "--dry-run", "run", "--config.train.fsdp=4"], env)
    ssh = [shlex.split(line[2:]) for line in lines if line.startswith("+ gcloud")]
    assert [c[5] for c in ssh] == ["diffjax-pod-0", "diffjax-pod-1"]
    assert all("--config.train.fsdp=4" in c[-1] and "--distributed=on" in c[-1] for c in ssh)
    create = _dry_run(["launch/tpu_pod.sh", "--dry-run", "create"], env)
    assert any("queued-resources create" in line and "--node-count=2" in line for line in create)
    assert not (tmp / "called").exists()


def test_slurm_installs_the_pins_with_cuda_wheels_and_runs_in_that_environment(sandbox):
    tmp, env = sandbox
    env["VENV"] = str(tmp / "venv")
    lines = _dry_run(["launch/slurm.sbatch", "--dry-run", "configs/default.py", "/runs/x",
                      "--config.train.fsdp=8"], env)
    assert _pins(_pip_install(lines, "+ "), "cuda12") == requirements()
    srun = next(shlex.split(line[2:]) for line in lines if line.startswith("+ srun"))
    assert srun[2] == str(tmp / "venv" / "bin" / "python")
    assert srun[-5:] == ["--config", "configs/default.py", "--workdir", "/runs/x",
                         "--config.train.fsdp=8"]
    assert not (tmp / "called").exists() and not (tmp / "venv").exists()


def test_a_requirement_that_is_not_an_exact_pin_stops_the_launch(tmp_path):
    (tmp_path / "requirements.txt").write_text("jax==0.10.2\nflax>=0.12  # a range\n")
    out = subprocess.run(["bash", "-c", f"REPO={tmp_path}; source {REPO}/launch/pins.sh; "
                          "pin_args tpu"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "'flax>=0.12' is not an exact pin" in out.stderr

"""Multi-process start-up: JAX's distributed runtime on a TPU pod, a SLURM / Open MPI GPU cluster
or N CPU processes on one machine, set up before any computation.

Every process runs the same `python -m diffjax train ...`; `initialize` joins them into one JAX
program (`jax.distributed.initialize`), after which `jax.devices()` lists every device of every
process and one `jax.jit` computation spans them all.

How the processes find each other (`--distributed`):
* "auto" (default): explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`),
  or JAX_COORDINATOR_ADDRESS, or a launcher that JAX detects by itself: SLURM with more than one
  task (srun), Open MPI (mpirun), a Cloud TPU VM (libtpu installed; the TPU metadata names the
  workers). With none of these the run is one process and nothing is initialised.
* "on": always call `jax.distributed.initialize` (JAX fills in what the flags leave out).
* "off": one process, never initialised.

A dead peer is an error, never a hang (`--heartbeat_timeout`, default 60 s):
* a collective in flight fails at once when the peer's connection drops (gloo on CPU); the
  process prints which process it is, why it stopped and how to resume, and exits with status 1
  without waiting for JAX's shutdown barrier (`exit_on_error`);
* otherwise JAX's coordination service stops receiving the dead process's heartbeats and, after
  heartbeat_timeout seconds, terminates every other process with the message "Terminating process
  because the JAX distributed service detected fatal errors ... another task died".
Either way every process has exited within heartbeat_timeout + a few seconds of the failure;
restarting all of them with the same command resumes from the last complete checkpoint.

On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`): that is what
launch/local.sh and the tests run on.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable, Mapping

import jax

MODES = ("auto", "on", "off")
DEFAULT_HEARTBEAT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others (module docstring). Timeouts in seconds:
    heartbeat_timeout: a silent peer is declared dead after this long; initialization_timeout:
    how long to wait for every process to connect at start-up."""

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    initialization_timeout: int = 300

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--distributed={self.mode!r}: choose one of {MODES}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num_processes={self.num_processes} must be >= 1")
        if self.process_id is not None and self.num_processes is not None and not (
                0 <= self.process_id < self.num_processes):
            raise ValueError(f"--process_id={self.process_id} must be in [0, --num_processes="
                             f"{self.num_processes}): number the processes 0 .. "
                             f"{self.num_processes - 1}")
        if self.heartbeat_timeout < 1 or self.initialization_timeout < 1:
            raise ValueError(f"--heartbeat_timeout={self.heartbeat_timeout}, "
                             f"--initialization_timeout={self.initialization_timeout}: both must "
                             f"be >= 1 second")
        if self.mode == "off" and self.explicit:
            raise ValueError("--distributed=off contradicts --coordinator_address / "
                             "--num_processes / --process_id: drop one or the other")

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                           self.process_id))


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher visible in `env` (default: this process's environment, read
    now), as JAX's own cluster detection sees it: "env" (JAX_COORDINATOR_ADDRESS), "slurm" (more
    than one task), "openmpi", "cloud_tpu" (libtpu installed), or None for a plain single
    process."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "openmpi"
    if importlib.util.find_spec("libtpu") is not None and env.get("TPU_SKIP_MDS_QUERY") is None:
        return "cloud_tpu"
    return None


_STATE: dict[str, Any] = {"initialized": False, "config": DistributedConfig()}


def initialize(config: DistributedConfig = DistributedConfig()) -> bool:
    """Join the other processes (before any JAX computation); True when jax.distributed was
    initialised. Safe to call twice (the second call does nothing)."""
    if _STATE["initialized"]:
        return True
    _STATE["config"] = config
    cluster = detect_cluster()
    if config.mode == "off" or (config.mode == "auto" and not config.explicit and cluster is None):
        return False
    # Must precede the CPU backend's creation; it only affects CPU (host) computations, so it is
    # harmless on GPU / TPU and makes N CPU processes one program.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
            initialization_timeout=config.initialization_timeout,
            heartbeat_timeout_seconds=config.heartbeat_timeout,
        )
    except ValueError as err:
        if config.mode == "auto" and not config.explicit and cluster == "cloud_tpu":
            return False  # libtpu is installed but this is no Cloud TPU VM: one process
        raise ValueError(
            f"jax.distributed.initialize failed ({err}); cluster detected: {cluster or 'none'}. "
            f"Outside SLURM, Open MPI and Cloud TPU give every process --coordinator_address="
            f"HOST:PORT (process 0's address), --num_processes=N and --process_id=0..N-1, "
            f"or run launch/local.sh N for N processes on this machine") from None
    _STATE["initialized"] = True
    return True


def is_multiprocess() -> bool:
    return _STATE["initialized"] and jax.process_count() > 1


def exit_on_error(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs); in a multi-process run an exception is reported with this process's
    index and the way to resume, and the process exits at once (status 1): going through JAX's
    shutdown barrier instead would wait for peers that may be dead or stuck in a collective with
    this process."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported below, then the process ends
        if not is_multiprocess():
            raise
        traceback.print_exc()
        timeout = _STATE["config"].heartbeat_timeout
        print(f"\ndiffjax: process {jax.process_index()} of {jax.process_count()} stopped: "
              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
              f"diffjax: if another process of this run died (killed, preempted, out of memory) "
              f"this is the consequence: its collectives failed, and the JAX runtime ends every "
              f"process within --heartbeat_timeout={timeout} s of a peer going silent. Look for "
              f"the first error in the logs of all processes; then restart ALL "
              f"{jax.process_count()} processes with the same command: training resumes from "
              f"the last complete checkpoint.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


# --------------------------------------------------------------------------- command-line flags


def add_arguments(parser) -> None:
    """The command-line options of multi-process runs (`python -m diffjax train`)."""
    group = parser.add_argument_group("multi-process runs (TPU pods, GPU clusters)")
    group.add_argument("--distributed", default="auto", choices=MODES,
                       help="join other processes with jax.distributed: auto-detect, force, or "
                       "never (default: auto)")
    group.add_argument("--coordinator_address", "--coordinator-address", default=None,
                       help="HOST:PORT of process 0 (not needed under SLURM, Open MPI, Cloud TPU)")
    group.add_argument("--num_processes", "--num-processes", type=int, default=None,
                       help="number of processes of the run")
    group.add_argument("--process_id", "--process-id", type=int, default=None,
                       help="this process's index, 0 .. num_processes - 1")
    group.add_argument("--heartbeat_timeout", "--heartbeat-timeout", type=int,
                       default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                       help="seconds after which a silent process is declared dead and the run "
                       "stops with an error (default: %(default)s)")
    group.add_argument("--initialization_timeout", "--initialization-timeout", type=int,
                       default=300, help="seconds to wait at start-up for every process to "
                       "connect (default: %(default)s)")


def config_from_args(values) -> DistributedConfig:
    return DistributedConfig(mode=values.distributed,
                             coordinator_address=values.coordinator_address,
                             num_processes=values.num_processes, process_id=values.process_id,
                             heartbeat_timeout=values.heartbeat_timeout,
                             initialization_timeout=values.initialization_timeout)

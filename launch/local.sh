#!/usr/bin/env bash
# N CPU processes of `python -m diffjax train` on this machine, joined by jax.distributed with
# gloo collectives: a real multi-process run with no accelerator (what tests/test_multihost.py runs).
#
#   launch/local.sh N --config configs/default.py --workdir runs/local2 [--config.a.b=value ...]
#
# Environment: DEVICES_PER_PROCESS (CPU devices per process, default 1), PORT (the coordinator's
# port, default: a free one), HEARTBEAT_TIMEOUT (seconds, default 60: a dead process stops the
# others within this long), PYTHON (default python). SIGTERM / SIGINT to this script are forwarded
# to every process (a preemption notice: they agree on one step, save it and exit with 143).
# Exit status: the first non-zero status of a process, else 0.
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [python -m diffjax train flags...]   (N = number of processes, >= 1)" >&2
  exit 2
fi
N=$1
shift
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=cpu
export JAX_NUM_CPU_DEVICES=${DEVICES_PER_PROCESS:-1}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset XLA_FLAGS  # a --xla_force_host_platform_device_count here would override the device count

pids=()
forward() { kill -"$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < N; i++)); do
  "$PYTHON" -u -m diffjax train --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" \
    --process_id="$i" --heartbeat_timeout="${HEARTBEAT_TIMEOUT:-60}" "$@" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again until it ends.
  while true; do
    wait "$pid"
    rc=$?
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
done
exit $status

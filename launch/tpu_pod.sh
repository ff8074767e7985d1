#!/usr/bin/env bash
# Train on a Cloud TPU pod slice, or several (NUM_SLICES): the same `python -m diffjax train` on
# every worker VM, joined by jax.distributed (diffjax finds the workers through the TPU metadata:
# no address to give). docs/pods.md says how the mesh's data and fsdp axes map to hosts and slices.
#
#   launch/tpu_pod.sh [--dry-run] create                       # create the slice(s)
#   launch/tpu_pod.sh [--dry-run] install                      # copy this checkout, install the pins
#   launch/tpu_pod.sh [--dry-run] run [--config.a.b=value ...] # train (foreground; Ctrl-C stops all)
#   launch/tpu_pod.sh [--dry-run] stop                         # SIGTERM every worker: one checkpoint
#   launch/tpu_pod.sh [--dry-run] delete                       # delete the slice(s)
#
# --dry-run prints every command (and the commands each worker would run, as "worker$ ...") and
# runs none of them.
#
# install: every worker gets a virtual environment ~/diffjax-venv (made with PYTHON, default
# python3.11, the Python requirements.txt is tested with; apt-installed when missing) holding
# exactly the versions of requirements.txt, jax[tpu] of the same jax version (the libtpu that jax
# release pins, from the libtpu release index), GCSFS_PIN (gs:// paths for etils.epath), and this
# checkout (editable, --no-deps); then each worker prints the versions it has.
#
# Settings (environment): TPU_NAME (default diffjax-pod; with NUM_SLICES > 1 the slices are
# TPU_NAME-0, TPU_NAME-1, ...), NUM_SLICES (1; more is Multislice, created as one queued resource),
# ZONE (us-central2-b), ACCELERATOR (v4-32, per slice), VERSION (tpu-ubuntu2204-base), PROJECT
# (gcloud's default), CONFIG (configs/default.py), WORKDIR (required for run: gs://BUCKET/runs/NAME;
# every worker writes its checkpoint shards there, process 0 the metrics and images), DATA_DIR
# (optional: passed as --config.data.path, e.g. a gs:// tfds data_dir), HEARTBEAT_TIMEOUT (60 s).
# A rerun of `run` with the same WORKDIR resumes from its last checkpoint, with any slice size.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/pins.sh
source "$REPO/launch/pins.sh"

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
TPU_NAME=${TPU_NAME:-diffjax-pod}
NUM_SLICES=${NUM_SLICES:-1}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/default.py}
PYTHON=${PYTHON:-python3.11}
GCSFS_PIN=${GCSFS_PIN:-gcsfs==2026.10.1}
VENV='~/diffjax-venv'  # expanded by each worker's shell
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
if ((NUM_SLICES > 1)); then
  nodes=()
  for ((i = 0; i < NUM_SLICES; i++)); do nodes+=("$TPU_NAME-$i"); done
else
  nodes=("$TPU_NAME")
fi

on_all() {  # run the worker commands given as arguments (one shell command each) on every worker
  local cmd
  for cmd in "$@"; do echo "worker\$ $cmd"; done
  local script
  script=$(printf '%s && ' "$@")
  script=${script% && }
  local node pids=()
  for node in "${nodes[@]}"; do
    if ((${#nodes[@]} == 1)); then
      run "${gc[@]}" ssh "$node" "${where[@]}" --worker=all --command="$script"
    else  # every slice at once
      show "${gc[@]}" ssh "$node" "${where[@]}" --worker=all --command="$script"
      if [[ $DRY_RUN != 1 ]]; then
        "${gc[@]}" ssh "$node" "${where[@]}" --worker=all --command="$script" &
        pids+=($!)
      fi
    fi
  done
  local pid status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return $status
}

case "${1:-}" in
  create)
    if ((NUM_SLICES > 1)); then
      run "${gc[0]}" compute tpus queued-resources create "$TPU_NAME" "${where[@]}" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" \
        --node-count="$NUM_SLICES" --node-prefix="$TPU_NAME"
    else
      run "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
        --version="$VERSION"
    fi
    ;;
  install)
    pin_args tpu
    run tar -C "$REPO" --exclude=.git --exclude=runs -czf /tmp/diffjax.tgz .
    for node in "${nodes[@]}"; do
      run "${gc[@]}" scp /tmp/diffjax.tgz "$node":~/diffjax.tgz "${where[@]}" --worker=all
    done
    pip_install="$VENV/bin/pip install$(printf ' %q' "${PIN_ARGS[@]}" "$GCSFS_PIN" -f "$LIBTPU_INDEX")"
    on_all 'mkdir -p ~/diffjax && tar -C ~/diffjax -xzf ~/diffjax.tgz' \
      "command -v $PYTHON >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $PYTHON $PYTHON-venv; }" \
      "$PYTHON -m venv $VENV" \
      "$pip_install" \
      "$VENV/bin/pip install --no-deps -e ~/diffjax" \
      "echo \"\$(hostname): installed\" && $VENV/bin/pip freeze | grep -iE '$(freeze_filter)|^gcsfs=='"
    ;;
  run)
    shift
    : "${WORKDIR:?set WORKDIR=gs://BUCKET/runs/NAME (shared by every worker)}"
    extra=""
    if [[ -n "${DATA_DIR:-}" ]]; then extra="--config.data.path=$DATA_DIR"; fi
    # --distributed=on: every worker calls jax.distributed.initialize(), which reads the
    # coordinator, process count and index (and, with Multislice, the slices) from the TPU metadata.
    on_all "cd ~/diffjax && $VENV/bin/python -m diffjax train --distributed=on \
--heartbeat_timeout=${HEARTBEAT_TIMEOUT:-60} --config $CONFIG --workdir $WORKDIR $extra $*"
    ;;
  stop)
    # A preemption notice to every process: they agree on one step, save it and exit (143).
    on_all "pkill -TERM -u \$(id -u) -f 'python -m diffjax train' || true"
    ;;
  delete)
    if ((NUM_SLICES > 1)); then
      run "${gc[0]}" compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force --quiet
    else
      run "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    fi
    ;;
  *)
    echo "usage: $0 [--dry-run] create | install | run [--config.a.b=value ...] | stop | delete" >&2
    exit 2
    ;;
esac

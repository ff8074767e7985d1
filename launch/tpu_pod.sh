#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same `python -m diffjax train` on every worker VM, joined by
# jax.distributed (diffjax finds the workers through the TPU metadata: no address to give).
#
#   launch/tpu_pod.sh create                       # create the TPU VM slice
#   launch/tpu_pod.sh install                      # copy this checkout to every worker, pip install
#   launch/tpu_pod.sh run [--config.a.b=value ...] # train (in the foreground; Ctrl-C stops all)
#   launch/tpu_pod.sh stop                         # SIGTERM every worker: one checkpoint, then exit
#   launch/tpu_pod.sh delete                       # delete the slice
#
# Settings (environment): TPU_NAME (default diffjax-pod), ZONE (us-central2-b),
# ACCELERATOR (v4-32), VERSION (tpu-ubuntu2204-base), PROJECT (gcloud's default),
# CONFIG (configs/default.py), WORKDIR (required for run: gs://BUCKET/runs/NAME; every worker
# writes its checkpoint shards there, process 0 the metrics and images), DATA_DIR (optional:
# passed as --config.data.path, e.g. a gs:// tfds data_dir), HEARTBEAT_TIMEOUT (60 s).
# A rerun of `run` with the same WORKDIR resumes from its last checkpoint, with any slice size.
set -euo pipefail

TPU_NAME=${TPU_NAME:-diffjax-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/default.py}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

on_all() {  # run a command on every worker of the slice
  "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION"
    ;;
  install)
    tar -C "$REPO" --exclude=.git --exclude=runs -czf /tmp/diffjax.tgz .
    "${gc[@]}" scp /tmp/diffjax.tgz "$TPU_NAME":~/diffjax.tgz "${where[@]}" --worker=all
    # gcsfs lets etils.epath (metrics, images, config) read and write gs:// paths; orbax and
    # tensorstore write the checkpoints there natively.
    on_all 'mkdir -p ~/diffjax && tar -C ~/diffjax -xzf ~/diffjax.tgz && cd ~/diffjax &&
            pip install -q -U "jax[tpu]" && pip install -q -e . gcsfs'
    ;;
  run)
    shift
    : "${WORKDIR:?set WORKDIR=gs://BUCKET/runs/NAME (shared by every worker)}"
    extra=""
    if [[ -n "${DATA_DIR:-}" ]]; then extra="--config.data.path=$DATA_DIR"; fi
    # --distributed=on: every worker calls jax.distributed.initialize(), which reads the
    # coordinator, process count and index from the TPU metadata.
    on_all "cd ~/diffjax && python -m diffjax train --distributed=on \
            --heartbeat_timeout=${HEARTBEAT_TIMEOUT:-60} --config $CONFIG --workdir $WORKDIR \
            $extra $*"
    ;;
  stop)
    # A preemption notice to every process: they agree on one step, save it and exit (143).
    on_all "pkill -TERM -u \$(id -u) -f 'python -m diffjax train' || true"
    ;;
  delete)
    "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    echo "usage: $0 create | install | run [--config.a.b=value ...] | stop | delete" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# One accelerator check (issue 19), under ten minutes, on whatever accelerator JAX finds:
#   1. the parity tests against the original PyTorch code (guided-diffusion's golden outputs and
#      jax.nn.dot_product_attention / cuDNN attention against the einsum attention);
#   2. ADM-64's train step in bfloat16 at the largest batch that fits (bench/cost.py's memory
#      model on this device), timed by bench/train.py, with its MFU against the datasheet peak;
#   3. 50-step DDIM throughput (bench/sample.py's CIFAR-10 ADM-like model, unguided);
# then one table. Targets (issue 19): MFU >= 40 % bf16 on H100/H200; DDIM >= 1.5x the PyTorch
# original's images/s on the same GPU (pass --reference-src to run it beside).
#
#   bash bench/accelerator.sh [--quick] [--batch N] [--sample-batch N] [--attention auto]
#                             [--reference-src PATH/TO/guided-diffusion]
#
# --quick: the same stages reduced to run on a CPU in a few minutes (the bundled default model
# instead of ADM-64, 5 sampling steps, one parity file): checks the script end to end, not speed.
# --batch N: time the train step at global batch N and skip the search for the batch that fits
# (two compiles of the step: a GPU compile autotunes for minutes). --attention: the UNet's
# attention_impl for the train step (auto: cuDNN flash attention in bf16 on a GPU).
# Each stage stops after PARITY_S / COST_S / TRAIN_S / SAMPLE_S seconds (defaults 150 / 330 / 300
# / 200) and the table still prints. XLA_FLAGS passes through (--xla_gpu_autotune_level=0 trades
# the convolution autotuning, most of a GPU compile, for cuDNN's heuristic choice).
# Logs go to $LOGDIR (default a fresh temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
quick=0
ref=()
given_batch=""
sample_batch=""
attention=einsum
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick=1 ;;
    --batch) given_batch=$2; shift ;;
    --sample-batch) sample_batch=$2; shift ;;
    --attention) attention=$2; shift ;;
    --reference-src) ref=(--reference-src "$2"); shift ;;
    *) echo "bench/accelerator.sh: unknown argument $1 (--quick, --batch N, --sample-batch N," \
            "--attention IMPL, --reference-src PATH)" >&2; exit 2 ;;
  esac
  shift
done
limit() { local seconds=$1; shift; timeout -k 10 "$seconds" "$@"; }
LOGDIR=${LOGDIR:-$(mktemp -d)}
mkdir -p "$LOGDIR"
py=${PYTHON:-python}

read -r ndev backend < <($py -c 'import jax; d = jax.devices()[0]; print(jax.device_count(), f"{jax.default_backend()} {jax.device_count()}x {d.device_kind}")')
echo "accelerator: $backend; logs in $LOGDIR" >&2

if [[ $quick == 1 ]]; then
  parity=(tests/test_models.py -k "matches_reference")
  cost=(--flags "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1 --attention_resolutions 8 --num_heads 1 --learn_sigma True --diffusion_steps 100" --batch 2)
  train_config=default steps=5 sample_batch=${sample_batch:-2} dtype=float32
else
  parity=(tests/test_gd_parity.py tests/test_models.py -k "parity or reference or attention")
  cost=(--preset adm-64 --batch 8 --dtype bfloat16)
  train_config=adm64 steps=50 sample_batch=${sample_batch:-16} dtype=bfloat16
fi

# 1. Parity.
start=$SECONDS
failed=""
# On the accelerator (the suite's conftest defaults to CPU), at full float32 matmul precision:
# parity is a float32 statement (TF32 would round inputs to 10 mantissa bits).
parity_env=(JAX_DEFAULT_MATMUL_PRECISION=highest)
[[ $quick == 1 ]] || parity_env+=(JAX_PLATFORMS=)
limit "${PARITY_S:-150}" env "${parity_env[@]}" $py -m pytest -q -p no:cacheprovider "${parity[@]}" >"$LOGDIR/parity.log" 2>&1 && ok=pass || {
  ok=FAIL; failed="$failed parity"; }
parity_row="$ok ($(tail -1 "$LOGDIR/parity.log" | sed 's/=//g; s/^ *//; s/ *$//'), $((SECONDS - start)) s)"

# 2. The batch that fits, then the timed train step. On a device that reports no memory limit
#    (a CPU) the batch is bench/train.py's own.
#    A tenth is left over for what XLA's memory analysis does not see (cuDNN's workspace).
batch_flag=()
fits=""
if [[ -n $given_batch ]]; then
  batch_flag=(--batch "$given_batch")
  echo "the batch was given (--batch $given_batch): no search" >"$LOGDIR/cost.log"
else
  limit "${COST_S:-330}" $py bench/cost.py "${cost[@]}" --variants main >"$LOGDIR/cost.log" 2>&1 \
    || failed="$failed cost"
  fits=$(sed -n 's/^largest global batch .*: \([0-9]*\)$/\1/p' "$LOGDIR/cost.log")
  if [[ -n $fits && $quick == 0 ]] && (( fits * 9 / 10 / ndev > 0 )); then
    batch_flag=(--batch $(( fits * 9 / 10 / ndev * ndev )))
  fi
fi
limit "${TRAIN_S:-300}" $py bench/train.py --configs "$train_config" --dtype "$dtype" \
  --attention "$attention" --repeats 5 --warmup 2 "${batch_flag[@]}" \
  >"$LOGDIR/train.log" 2>&1 || failed="$failed train"
train_row=$(grep -m1 "diffjax :" "$LOGDIR/train.log" | sed 's/^ *diffjax *: *//' || true)
mfu_row=$(grep -m1 "MFU" "$LOGDIR/train.log" | sed 's/^ *MFU *: *//' || true)

# 3. DDIM throughput.
limit "${SAMPLE_S:-200}" $py bench/sample.py --steps "$steps" --batch "$sample_batch" --repeats 2 --no-guidance \
  "${ref[@]}" >"$LOGDIR/sample.log" 2>&1 || failed="$failed sample"
sample_row=$(grep -m1 "diffjax" "$LOGDIR/sample.log" | sed 's/^ *//' || true)
ref_row=$(grep -m1 "PyTorch [0-9 ]" "$LOGDIR/sample.log" | sed 's/^ *//' || true)

printf '\n%-24s %s\n' "accelerator" "$backend$([[ $quick == 1 ]] && echo ' (--quick: not a speed measurement)')"
printf '%-24s %s\n' "parity tests" "$parity_row"
printf '%-24s %s\n' "bench/cost.py" "$(tail -1 "$LOGDIR/cost.log")"
if [[ -n $given_batch ]]; then fits_row="not searched (--batch $given_batch)"
else fits_row="${fits:-n/a (the device reports no memory limit)}${batch_flag[1]:+ (timed at ${batch_flag[1]})}"; fi
printf '%-24s %s\n' "batch that fits" "$fits_row"
printf '%-24s %s\n' "train step ($train_config, $attention attention)" "${train_row:-FAILED, see $LOGDIR/train.log}"
printf '%-24s %s\n' "MFU (target >= 40 %)" "${mfu_row:-n/a (peak unknown for this device)}"
printf '%-24s %s\n' "DDIM $steps steps" "${sample_row:-FAILED, see $LOGDIR/sample.log}"
if [[ -n $ref_row ]]; then printf '%-24s %s\n' "PyTorch original" "$ref_row"; fi
if [[ -n $failed ]]; then echo "failed:$failed (logs in $LOGDIR)"; exit 1; fi

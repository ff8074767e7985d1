# Sourced by launch/tpu_pod.sh and launch/slurm.sbatch (needs REPO set): the exact package set they
# install, and the dry-run-aware way they run commands.
#
#   pin_args ACCEL   sets PIN_ARGS to every "name==version" of requirements.txt, then
#                    "jax[ACCEL]==<requirements.txt's jax>" (ACCEL: tpu -> the libtpu that jax release
#                    pins, from LIBTPU_INDEX; cuda12 -> jax-cuda12-plugin / -pjrt of that release and
#                    its CUDA wheels), and JAX_VERSION; fails on a line that is not an exact pin.
#   freeze_filter    an extended regex (grep -iE) for `pip freeze` lines of the pinned packages and the
#                    accelerator wheels: what the scripts print after installing.
#   show CMD...      prints "+ CMD", shell-quoted (copy-pasteable).
#   run CMD...       shows CMD and runs it, unless DRY_RUN=1.

LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html
ACCEL_PACKAGES=(libtpu jax-cuda12-plugin jax-cuda12-pjrt)

pin_args() {
  local accel=$1 line
  PIN_ARGS=() JAX_VERSION=""
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    [[ -z $line ]] && continue
    if [[ ! $line =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*==[A-Za-z0-9_.+!-]+$ ]]; then
      echo "requirements.txt: '$line' is not an exact pin (name==version)" >&2
      return 1
    fi
    PIN_ARGS+=("$line")
    if [[ ${line%%==*} == jax ]]; then JAX_VERSION=${line#*==}; fi
  done < "$REPO/requirements.txt"
  if [[ -z $JAX_VERSION ]]; then
    echo "requirements.txt pins no jax version (jax==X)" >&2
    return 1
  fi
  PIN_ARGS+=("jax[$accel]==$JAX_VERSION")
}

freeze_filter() {
  local names=() pin
  for pin in "${PIN_ARGS[@]}" "${ACCEL_PACKAGES[@]}"; do
    pin=${pin%%==*}
    pin=${pin%%\[*}
    pin=${pin//[-_.]/[-_.]}  # pip freeze may spell - _ . either way
    [[ " ${names[*]} " == *" $pin "* ]] || names+=("$pin")
  done
  local IFS='|'
  echo "^(${names[*]})=="
}

show() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

run() {
  show "$@"
  if [[ ${DRY_RUN:-0} != 1 ]]; then "$@"; fi
}

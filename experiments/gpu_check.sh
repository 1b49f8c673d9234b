#!/usr/bin/env bash
# The GPU check in one command (see experiments/gpu_check.py).
#
#   bash experiments/gpu_check.sh fetch     # on a machine with PyPI: the pinned wheels -> experiments/wheels (~4.4 MB)
#   bash experiments/gpu_check.sh [flags]   # on the GPU machine (no internet): installs from experiments/wheels only
#                                           # what is missing, then runs python -m experiments.gpu_check [flags]
#
# The GPU machine has jax (+ CUDA plugin), flax, optax, orbax-checkpoint and torch; they are never installed or
# replaced here. The carried packages go into a private directory ($GPU_CHECK_SITE, default
# ${TMPDIR:-/tmp}/recgpt_gpu_check_site) put first on PYTHONPATH, with --no-index --no-deps (nothing else can
# change); without pip, the wheels are unzipped there. Results and the log go to $OUT (the run tool's folder)
# or experiments/results.
set -euo pipefail
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s.%N)}" # the check's time budget counts from here
cd "$(dirname "$0")/.."

WHEELS=experiments/wheels
# module:requirement. Only what experiments/gpu_check.py imports beyond the preinstalled stack: ml_collections
# (recgpt_jax.config) and Grain (data.pipeline) with its dependencies that orbax/flax do not bring.
PKGS=(
  "ml_collections:ml_collections==1.1.0"
  "grain:grain==0.2.18"
  "array_record:array_record==0.8.6"
  "cloudpickle:cloudpickle==3.1.3"
  "portpicker:portpicker==1.6.0"
)
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "fetch" ]]; then
  mkdir -p "$WHEELS"
  reqs=()
  for pair in "${PKGS[@]}"; do reqs+=("${pair#*:}"); done
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" "${reqs[@]}"
  ls -l "$WHEELS"/*.whl
  du -ch "$WHEELS"/*.whl | tail -1
  exit 0
fi

SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/recgpt_gpu_check_site}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for pair in "${PKGS[@]}"; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  echo "installing into $SITE: ${missing[*]}"
  mkdir -p "$SITE"
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$SITE" \
    --find-links "$WHEELS" "${missing[@]}"; then
    echo "pip install failed; unzipping the wheels into $SITE instead"
    for req in "${missing[@]}"; do
      for whl in "$WHEELS/${req%%==*}-${req#*==}-"*.whl; do
        if [[ -e "$whl" ]]; then "$PY" -m zipfile -e "$whl" "$SITE"; fi
      done
    done
  fi
fi
for pair in "${PKGS[@]}"; do
  mod="${pair%%:*}"
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    if [[ "$mod" == "ml_collections" ]]; then
      echo "ml_collections is not importable: run 'bash experiments/gpu_check.sh fetch' where PyPI is reachable" \
        "and carry experiments/wheels to this machine" >&2
      exit 2
    fi
    echo "warning: $mod is not importable (gpu_check batches the data without Grain then)"
  fi
done

OUT_DIR="${OUT:-experiments/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
# A process that dies (not a failing variant or section: those are recorded and the run goes on) is followed by
# at most two reruns of what it did not finish, within the same time budget (see rerun_plan in gpu_check.py).
args=("$@")
for attempt in 1 2 3; do
  if "$PY" -m experiments.gpu_check --out="$OUT_DIR" "${args[@]}" 2>&1 | tee -a "$LOG"; then
    exit 0
  fi
  unset GPU_CHECK_SIMULATE_CRASH # (a test hook of gpu_check.py: the first process only)
  last="$(ls -t "$OUT_DIR"/gpu_check*.json 2>/dev/null | head -1)"
  [[ -n "$last" && $attempt -lt 3 ]] || exit 1
  plan="$("$PY" -m experiments.gpu_check --rerun_plan="$last" 2>/dev/null | tail -1)" || exit 1
  [[ -n "$plan" ]] || exit 1
  read -r -a extra <<<"$plan"
  args=("$@" "${extra[@]}")
  echo "gpu_check died (attempt $attempt); rerunning with: ${extra[*]}" | tee -a "$LOG"
done

#!/usr/bin/env bash
# One command for a GPU machine with torch/triton preinstalled and no network:
#   scripts/device_check.sh [OUTDIR]
# Installs fusedres (building the CUDA extension when CUTLASS headers are at hand: put the
# nvidia-cutlass wheel in .whl/), runs the cuda-marked tests, `fusedres check`, the block and
# training benchmarks, and ends with a summary table.  Every step has its own time limit and
# a failing step never stops the rest; the whole script is sized to finish in under 8 minutes.
set -u
OUTDIR=${1:-${OUT:-out}/device}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record status and duration
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  echo "=== [$name] $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t))
  tail -n 25 "$OUTDIR/$name.log"
  local status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=TIMEOUT
  [ $rc -ne 0 ] && [ $status = ok ] && status="FAIL(rc=$rc)"
  printf '%-16s %-12s %4ss\n' "$name" "$status" "$dt" >>"$SUMMARY"
}

# --- environment -------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  $PY -c 'import sys, torch, torchvision, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
  nvcc --version 2>/dev/null | tail -n 1
} | tee "$OUTDIR/env.txt"

# --- install (CUDA extension for sm_90 only, to save build time) -----------------------------
if ls .whl/nvidia_cutlass*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/cutlass-site .whl/nvidia_cutlass*.whl \
    && export FUSEDRES_CUTLASS_DIR=$(ls -d /tmp/cutlass-site/cutlass_library/source/include 2>/dev/null || true)
fi
export FUSEDRES_CUDA_ARCHS=${FUSEDRES_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
step install 240 $PY -m pip install --no-build-isolation --no-deps -e . -v
$PY -c 'import fusedres; print("backends available:", fusedres.available_backends())' | tee -a "$OUTDIR/env.txt"

# --- correctness on the GPU --------------------------------------------------------------
step tests 150 $PY -m pytest tests -m cuda -q -x --no-header -p no:cacheprovider --junitxml="$OUTDIR/tests.xml"
step check 90 $PY -m fusedres check --model resnet50 --batch 64 --device cuda --dtype bfloat16 --json "$OUTDIR/check.json"

# --- benchmarks --------------------------------------------------------------------------
if [ -f benchmarks/device_suite.sh ]; then
  # shellcheck source=/dev/null
  source benchmarks/device_suite.sh
fi

# --- summary -----------------------------------------------------------------------------
echo
echo "=== summary (total $(($(date +%s) - T0))s) ==="
cat "$OUTDIR/env.txt"
cat "$SUMMARY"
for f in "$OUTDIR"/*.summary; do [ -f "$f" ] && cat "$f"; done
exit 0

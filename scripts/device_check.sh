#!/usr/bin/env bash
# One prepared run for a GPU machine with torch/triton preinstalled and no network:
#   scripts/device_check.sh [OUTDIR]
#
# Steps in priority order, each with its own time limit, all inside one budget
# (DEVICE_CHECK_BUDGET seconds, default 540: 9 minutes of one 10-minute call), so that what
# matters most is measured first and a slow step can only cost the steps after it:
#
#   build          the CUDA extension (scripts/build_ext_gpu.sh), in the background beside smoke-triton
#   smoke-triton   GPU numerics of the Triton kernels: converted ResNet-18/50 against torchvision,
#                  the train kernels (cuda-marked tests, autotuner off)
#   smoke-cuda     the same for the CUDA extension's kernels, once it is built
#   smoke-sm90a    (after smoke-cuda) the opt-in sm_90a kernels (FUSEDRES_CUDA_SM90A=require; the build
#                  has FUSEDRES_CUDA_ARCHS=90a): the cuda-marked extension tests through them
#   bench-blocks   every distinct ResNet-18/-50 block at batch 256 and 64: eager, cudnn-fused,
#                  fusedres-cuda, fusedres-triton (fusedres bench --suite gpu-blocks)
#   bench-models   ResNet-50 and -18 at batch 256, 64 and 1, the same contenders (--suite gpu-models)
#   bench-train    one training step of ResNet-50: eager, compile, fusedres; img/s and peak memory
#   bench-compile  torch.compile (default mode) on the block and model rows (--suite gpu-compile)
#   smoke-tma      (after smoke-cuda) the opt-in TMA kernel of 1x1 convs and its persistent form, their numerics
#   smoke-hoisted  the opt-in hoisted main loop (FUSEDRES_TRITON_HOISTED=1): the cuda-marked Triton tests
#   smoke-splitk   the opt-in split-K path (FUSEDRES_TRITON_SPLITK=1): converted models against torchvision
#   bench-max      max-autotune on three representative blocks (--suite gpu-max)
#   bench-tma      the Bottleneck blocks with FUSEDRES_TRITON_TMA=1 (eager, fusedres-triton)
#   bench-hoisted  every block with FUSEDRES_TRITON_HOISTED=1 (eager, fusedres-triton)
#   bench-splitk   ResNet-50 and -18 at batch 1 and 64 with FUSEDRES_TRITON_SPLITK=1 (eager, fusedres-triton)
#   bench-sm90a    every block with FUSEDRES_CUDA_SM90A=1 (eager, cudnn-fused, fusedres-cuda)
#   bench-persistent  bench-tma's blocks with FUSEDRES_TRITON_PERSISTENT=1 too (the persistent TMA kernel)
#   check          fusedres check (inference) and check-train (one training step)
#   tests-full     every cuda-marked test
#   host-overhead  host vs GPU time of a converted ResNet-50 (benchmarks/host_overhead.py)
#   train-memory   activation memory of a training step
#
# Each bench step writes its JSON into OUTDIR/results when it ends (its own --time-budget stops it
# starting new workloads well before the step's limit); OUTDIR/summary.txt gets one line per step as
# it ends, so a run cut short still says what it did.  DEVICE_CHECK_STEPS=a,b runs only the named
# steps; DEVICE_CHECK_SCALE scales every limit and budget.
#
# DEVICE_CHECK_DRY_RUN=1: the same steps on the CPU at toy sizes (device cpu, 32x32 images, batch 2,
# one timed round, no extension build, no torch.compile), so that the script cannot rot between GPU
# runs: tests/test_device_check.py runs it in CI.
set -u
OUTDIR=${1:-${OUT:-out}/device}
mkdir -p "$OUTDIR/results"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
SCALE=${DEVICE_CHECK_SCALE:-1}
DRY=${DEVICE_CHECK_DRY_RUN:-0}
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)
secs() { awk -v s="$1" -v k="$SCALE" 'BEGIN { printf "%d", s * k }'; }
DEADLINE=$((T0 + $(secs "${DEVICE_CHECK_BUDGET:-540}")))

if [ "$DRY" = 1 ]; then
  # Toy sizes; the GPU-only contenders become skipped rows; compile rows are skipped (their cost
  # on 2 CPU cores would dominate) but still named.
  BENCH=(--device cpu --size 32 --batch 2 --dtype float32 --no-channels-last --repeats 1 --warmup 0
         --compile-on none --time-budget 20)
  CHECK=(--device cpu --model resnet18 --batch 2 --size 32 --dtype float32 --repeats 1)
  MEMORY=(--device cpu --batch 1 --size 64)
else
  BENCH=(--device cuda)
  CHECK=(--device cuda --dtype bfloat16)
  MEMORY=(--device cuda --batch 64 --dtype bf16 --channels-last)
fi

step() {  # step NAME LIMIT_S COMMAND...: run within its limit and the run's budget, log, record
  local name=$1 limit left t rc status
  limit=$(secs "$2")
  shift 2
  case ",${DEVICE_CHECK_STEPS:-all}," in ",all,"|*",$name,"*) ;; *) return 0 ;; esac
  left=$((DEADLINE - $(date +%s) - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    printf '%-14s %-12s %4ss  %s\n' "$name" "NO-TIME" 0 "budget spent" >>"$SUMMARY"
    return 0
  fi
  t=$(date +%s)
  echo "=== [$name] (limit ${limit}s) $*"
  timeout --kill-after=5 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status="FAIL(rc=$rc)"; fi
  tail -n 12 "$OUTDIR/$name.log"
  printf '%-14s %-12s %4ss  %s\n' "$name" "$status" "$(($(date +%s) - t))" \
    "$(grep -E '(passed|failed|error|skipped).* in [0-9.]+s' "$OUTDIR/$name.log" | tail -n 1 | tr -d '=')" >>"$SUMMARY"
}

bench() {  # bench NAME LIMIT_S SUITE [FLAGS...]: a fusedres bench suite into OUTDIR/results
  local name=$1 limit=$2 suite=$3
  shift 3
  step "$name" "$limit" $PY -m fusedres bench --suite "$suite" "$@" "${BENCH[@]}" \
    --results-dir "$OUTDIR/results" --summary "$OUTDIR/$name.summary"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # A copied checkout can carry a stale .git: the commit given by the caller wins.
  echo "commit: ${FUSEDRES_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  [ "$DRY" = 1 ] && echo "DRY RUN on the CPU (toy sizes): nothing here measures a GPU"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c 'import sys, torch, torchvision, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)'
} | tee "$OUTDIR/env.txt"

# Autotuning results persist on disk, so each later process (tests, benches) re-uses them; every
# tile the benchmarks tune is also merged into results/tiles.json (commit it into
# fusedres/backends/triton/tiles.json: the next runs, and users, skip that autotuning).
export TRITON_CACHE_AUTOTUNING=1
export FUSEDRES_TRITON_TILES_OUT="$OUTDIR/results/tiles.json"
if [ "$DRY" = 1 ]; then
  step build 60 $PY -c 'import fusedres; print("dry run: no extension build")'
  FUSEDRES_TRITON_AUTOTUNE=0 step smoke-triton 120 $PY -m pytest -m cuda -q -rfE -p no:cacheprovider \
    tests/test_gpu_models.py tests/test_triton_cuda.py tests/test_training_triton.py tests/test_triton_train.py
else
  # The extension builds on all cores while the Triton numerics (which do not need it) run; for
  # sm_90a (the GPU is an H100/H200), so that the opt-in CUTLASS 3.x kernels are in it too.
  # If the sm_90a translation units fail to build there, it retries for plain sm_90 so that the
  # other CUDA steps still run (smoke-sm90a then fails: FUSEDRES_CUDA_SM90A=require).
  (step build 240 bash -c 'FUSEDRES_CUDA_ARCHS=${FUSEDRES_CUDA_ARCHS:-90a} bash scripts/build_ext_gpu.sh \
     || { echo "sm_90a build failed; building for sm_90 only"; FUSEDRES_CUDA_ARCHS=90 bash scripts/build_ext_gpu.sh; }') &
  BUILD_PID=$!
  FUSEDRES_TRITON_AUTOTUNE=0 step smoke-triton 120 $PY -m pytest -m cuda -q -rfE -p no:cacheprovider \
    tests/test_gpu_models.py tests/test_triton_cuda.py tests/test_training_triton.py tests/test_triton_train.py \
    -k "not compile and not graph"
  wait $BUILD_PID
fi
$PY -c 'import fusedres; print("backends available:", fusedres.available_backends())' 2>&1 | tee -a "$OUTDIR/env.txt"
FUSEDRES_TRITON_AUTOTUNE=0 step smoke-cuda 60 $PY -m pytest -m cuda -q -rfE -p no:cacheprovider \
  tests/test_cuda_ext.py tests/test_gpu_models.py -k "cuda and not compile and not graph"
# The opt-in sm_90a kernels (CUTLASS 3.x, TMA + wgmma): their first numerics on a GPU.  =require
# makes a conv they refuse (or a build without them) an error instead of a silent fall-back to
# the 2.x kernels, so every passing conv test ran them.
FUSEDRES_CUDA_SM90A=require FUSEDRES_TRITON_AUTOTUNE=0 step smoke-sm90a 60 $PY -m pytest -m cuda -q -rfE -p no:cacheprovider \
  tests/test_cuda_ext.py tests/test_gpu_models.py -k "cuda and not compile and not graph"
# The opt-in TMA kernel of 1x1 convs (FUSEDRES_TRITON_TMA=1): its first numerics on a GPU.
FUSEDRES_TRITON_AUTOTUNE=0 step smoke-tma 60 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_triton.py -k tma
# The opt-in hoisted main loop (FUSEDRES_TRITON_HOISTED=1): its first numerics on a GPU (a dry run
# on the CPU runs its interpreter tests instead).
if [ "$DRY" = 1 ]; then
  HOISTED_TESTS=(tests/test_triton.py tests/test_triton_train.py -k hoisted)
else
  HOISTED_TESTS=(-m cuda tests/test_triton_cuda.py tests/test_triton_train.py tests/test_gpu_models.py
                 -k "not compile and not graph")
fi
FUSEDRES_TRITON_HOISTED=1 FUSEDRES_TRITON_AUTOTUNE=0 step smoke-hoisted 60 $PY -m pytest -q -rfE -p no:cacheprovider \
  "${HOISTED_TESTS[@]}"
# The opt-in split-K path (FUSEDRES_TRITON_SPLITK=1): its first numerics through whole converted models
# (its per-conv tests, test_split_k_small_layers, already ran in smoke-triton; a dry run on the CPU runs
# the interpreter tests instead).
if [ "$DRY" = 1 ]; then
  SPLITK_TESTS=(tests/test_triton.py -k "split_k and 3x3")
else
  SPLITK_TESTS=(-m cuda tests/test_gpu_models.py -k "triton and (resnet50 or nan_pixel or autocast_fp32 or cuda_graphs)")
fi
FUSEDRES_TRITON_SPLITK=1 FUSEDRES_TRITON_AUTOTUNE=0 step smoke-splitk 45 $PY -m pytest -q -rfE -p no:cacheprovider \
  "${SPLITK_TESTS[@]}"

bench bench-blocks 140 gpu-blocks --time-budget "$(secs 110)"
bench bench-models 60 gpu-models --time-budget "$(secs 40)"
bench bench-train 70 gpu-train --model resnet50 --batch 128 --compile-on resnet50/b128 --time-budget "$(secs 50)"
bench bench-compile 60 gpu-compile --time-budget "$(secs 45)"
bench bench-max 60 gpu-max --time-budget "$(secs 45)"
# The TMA kernel against the cp.async one on the Bottleneck blocks (the 1x1 convs), into its own file.
FUSEDRES_TRITON_TMA=1 step bench-tma 60 $PY -m fusedres bench --suite gpu-blocks --only "bottleneck_*" \
  --contenders eager,fusedres-triton --time-budget "$(secs 45)" "${BENCH[@]}" --notes "FUSEDRES_TRITON_TMA=1" \
  --json "$OUTDIR/results/gpu-blocks-tma.json" --summary "$OUTDIR/bench-tma.summary"
# The hoisted main loop against the default one on every block, into its own file.
FUSEDRES_TRITON_HOISTED=1 step bench-hoisted 60 $PY -m fusedres bench --suite gpu-blocks \
  --contenders eager,fusedres-triton --time-budget "$(secs 45)" "${BENCH[@]}" --notes "FUSEDRES_TRITON_HOISTED=1" \
  --json "$OUTDIR/results/gpu-blocks-hoisted.json" --summary "$OUTDIR/bench-hoisted.summary"
# Split-K against the one-pass kernel (bench-models' fusedres-triton rows) where it applies: small batches.
FUSEDRES_TRITON_SPLITK=1 step bench-splitk 50 $PY -m fusedres bench --suite gpu-models --batch 1,64 \
  --contenders eager,fusedres-triton --time-budget "$(secs 35)" "${BENCH[@]}" --notes "FUSEDRES_TRITON_SPLITK=1" \
  --json "$OUTDIR/results/gpu-models-splitk.json" --summary "$OUTDIR/bench-splitk.summary"
# The sm_90a kernels against the CUTLASS 2.x ones (bench-blocks) on every block, into its own file.
FUSEDRES_CUDA_SM90A=1 step bench-sm90a 60 $PY -m fusedres bench --suite gpu-blocks \
  --contenders eager,cudnn-fused,fusedres-cuda --time-budget "$(secs 45)" "${BENCH[@]}" --notes "FUSEDRES_CUDA_SM90A=1" \
  --json "$OUTDIR/results/gpu-blocks-sm90a.json" --summary "$OUTDIR/bench-sm90a.summary"
# The persistent TMA kernel against bench-tma's one tile per program, on the same blocks.
FUSEDRES_TRITON_TMA=1 FUSEDRES_TRITON_PERSISTENT=1 step bench-persistent 50 $PY -m fusedres bench --suite gpu-blocks \
  --only "bottleneck_*" --contenders eager,fusedres-triton --time-budget "$(secs 35)" "${BENCH[@]}" \
  --notes "FUSEDRES_TRITON_TMA=1 FUSEDRES_TRITON_PERSISTENT=1" \
  --json "$OUTDIR/results/gpu-blocks-persistent.json" --summary "$OUTDIR/bench-persistent.summary"

step check 40 $PY -m fusedres check "${CHECK[@]}" --json "$OUTDIR/results/check.json"
step check-train 40 $PY -m fusedres check --mode train "${CHECK[@]}" --json "$OUTDIR/results/check_train.json"
FUSEDRES_TRITON_AUTOTUNE=0 step tests-full 120 $PY -m pytest -m cuda -q -rfE -p no:cacheprovider tests
if [ "$DRY" != 1 ]; then  # needs a GPU to keep busy
  step host-overhead 90 $PY benchmarks/host_overhead.py --backends eager triton cuda --batches 64 \
    --json "$OUTDIR/results/host_overhead.json"
fi
step train-memory 45 $PY benchmarks/train_memory.py "${MEMORY[@]}" --json "$OUTDIR/results/train_memory.json"

echo
echo "=== summary (total $(($(date +%s) - T0))s of a ${DEVICE_CHECK_BUDGET:-540}s budget) ==="
cat "$OUTDIR/env.txt" "$SUMMARY"
for f in "$OUTDIR"/*.summary; do [ -f "$f" ] && cat "$f"; done
exit 0

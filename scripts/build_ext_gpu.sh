#!/usr/bin/env bash
# Build fusedres._C in place on the (offline) GPU machine, from the nvidia-cutlass wheel
# carried in .whl/: install the wheel's headers into a scratch dir, point setup.py at them
# (FUSEDRES_CUTLASS_DIR) and run an editable install with all cores, for sm_90 (FUSEDRES_CUDA_ARCHS,
# default 90; scripts/device_check.sh builds 90a).
#
#   bash scripts/build_ext_gpu.sh        # PYTHON, FUSEDRES_CUDA_ARCHS, MAX_JOBS, CUTLASS_SITE override
#
# The .whl/ wheel: pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0
# (nvidia_cutlass-4.2.0.0-py3-none-any.whl, pure headers + Python).
# Then: PYTHONPATH=. python -m pytest tests/test_cuda_ext.py -q
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${CUTLASS_SITE:-/tmp/site}

shopt -s nullglob
wheels=(.whl/nvidia_cutlass*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "build_ext_gpu: no .whl/nvidia_cutlass*.whl here; download it first (see the header of this script)" >&2
  exit 1
fi
"$PY" -m pip install -q --upgrade --no-index --no-deps --target "$SITE" "${wheels[0]}"
export FUSEDRES_CUTLASS_DIR="$SITE/cutlass_library/source/include"
export FUSEDRES_CUDA_ARCHS=${FUSEDRES_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-16}
test -f "$FUSEDRES_CUTLASS_DIR/cutlass/cutlass.h" || { echo "no CUTLASS headers in $FUSEDRES_CUTLASS_DIR" >&2; exit 1; }

t0=$SECONDS
set +e
"$PY" -m pip install -v --no-build-isolation --no-deps -e . >/tmp/fusedres_build_ext.log 2>&1
status=$?
set -e
grep "fusedres setup:" /tmp/fusedres_build_ext.log || true
echo "build_ext_gpu: pip exit $status, build took $((SECONDS - t0)) s (sm_${FUSEDRES_CUDA_ARCHS}, MAX_JOBS=$MAX_JOBS)"
if [[ $status -ne 0 ]]; then
  tail -40 /tmp/fusedres_build_ext.log
  # An offline machine may lack what pip's editable build needs (setuptools>=64, wheel);
  # a plain in-place build needs only setuptools and gives the same fusedres/_C*.so.
  echo "build_ext_gpu: pip failed; trying 'setup.py build_ext --inplace'"
  t0=$SECONDS
  "$PY" setup.py build_ext --inplace >/tmp/fusedres_build_ext.log 2>&1 || { tail -40 /tmp/fusedres_build_ext.log; exit 1; }
  echo "build_ext_gpu: in-place build took $((SECONDS - t0)) s"
fi
echo "ptxas: $(grep -c 'bytes spill stores' /tmp/fusedres_build_ext.log) kernel reports," \
  "$(grep 'bytes spill stores' /tmp/fusedres_build_ext.log | grep -vc ' 0 bytes spill stores, 0 bytes spill loads') with spills"
"$PY" -c "
import fusedres._C, torch
from fusedres.backends import cuda
print('fusedres._C:', fusedres._C.__file__)
print('cuda backend available:', cuda.is_available(), cuda.why_unavailable())
if torch.cuda.is_available():
    print('GPU:', torch.cuda.get_device_name())
"

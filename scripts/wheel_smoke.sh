#!/usr/bin/env bash
# Build the fusedres wheel with the CUDA extension, install it into a fresh venv (its
# dependencies resolved by pip, nothing borrowed from the build environment), and check
# on a machine without a GPU that:
#   * the wheel contains fusedres/_C*.so and it loads, registering torch.ops.fusedres.*,
#   * the op schemas are the documented ones and the fake impls give the right shapes,
#   * a failing input check (TORCH_CHECK) inside the extension raises with its whole message,
#   * the cuda backend reports itself unavailable with a clear reason (no GPU),
#   * ptxas reported no register spills for any kernel in the build (-Xptxas -v).
#
# Usage: bash scripts/wheel_smoke.sh   (PYTHON=... to pick the build interpreter; it needs
# torch, setuptools, wheel and nvidia-cutlass: the build runs with --no-build-isolation).
# About 3 minutes on 2 cores: ~1 min compile, ~1.5 min venv + install.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fusedres-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS

echo "== building the wheel ($PY)"
# -v: the compiler output (and with it ptxas's resource report) goes to the log.
if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" . \
    >"$WORK/build.log" 2>&1; then
  tail -50 "$WORK/build.log"
  echo "FAIL: wheel build failed" >&2
  exit 1
fi
WHEEL=$(ls "$WORK"/dist/fusedres-*.whl)
echo "   $(basename "$WHEEL") built in $((SECONDS - t0)) s"

echo "== checking the wheel contents"
listing=$("$PY" -m zipfile -l "$WHEEL")
if ! grep -q "fusedres/_C.*\.so" <<<"$listing"; then
  grep "fusedres setup:" "$WORK/build.log" || true
  echo "FAIL: the wheel has no fusedres/_C*.so" >&2
  exit 1
fi

echo "== checking ptxas resource usage"
n_kernels=$(grep -c "bytes spill stores" "$WORK/build.log" || true)
spills=$(grep "bytes spill stores" "$WORK/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" || true)
if [[ $n_kernels -eq 0 ]]; then
  echo "FAIL: no ptxas resource report in the build log (was -Xptxas=-v dropped?)" >&2
  exit 1
fi
if [[ -n $spills ]]; then
  echo "$spills"
  echo "FAIL: register spills in the kernels above" >&2
  exit 1
fi
echo "   $n_kernels kernel builds (kernels x archs), 0 bytes spilled"
grep -o "Used [0-9]* registers" "$WORK/build.log" | sort | uniq -c | sed 's/^/   /'

echo "== installing into a fresh venv"
t1=$SECONDS
"$PY" -m venv "$WORK/venv"
if ! "$WORK/venv/bin/python" -m pip install -q "$WHEEL" >"$WORK/install.log" 2>&1; then
  tail -40 "$WORK/install.log"
  echo "FAIL: installing the wheel into a fresh venv failed" >&2
  exit 1
fi
"$WORK/venv/bin/python" -m pip check
echo "   installed in $((SECONDS - t1)) s"

echo "== smoke test"
# Run outside the source tree so that `import fusedres` is the installed wheel.
cd "$WORK"
"$WORK/venv/bin/python" - "$ROOT" <<'EOF'
import os
import sys

import torch

import fusedres
import fusedres._C
from fusedres.backends import cuda

root = sys.argv[1]
for mod in (fusedres, fusedres._C):
    assert not os.path.abspath(mod.__file__).startswith(root), f"{mod.__name__} imported from the source tree"
print("  fusedres._C:", fusedres._C.__file__)

conv = torch.ops.fusedres.conv_bn_act_cuda.default
tail = torch.ops.fusedres.block_tail_cuda.default
expected = (
    "fusedres::conv_bn_act_cuda(Tensor x, Tensor weight, Tensor scale, Tensor shift, "
    "Tensor? residual, Tensor? mean, Tensor? var, float eps, int[2] stride, int[2] padding, int[2] dilation, "
    "int groups, bool relu) -> Tensor"
)
assert str(conv._schema) == expected, str(conv._schema)
assert str(tail._schema).startswith("fusedres::block_tail_cuda(Tensor y, Tensor weight"), str(tail._schema)
assert torch._C._dispatch_has_kernel_for_dispatch_key(conv.name(), "CUDA")

cl = torch.channels_last
x = torch.empty(2, 64, 15, 13, dtype=torch.bfloat16, device="meta").contiguous(memory_format=cl)
w = torch.empty(128, 64, 3, 3, dtype=torch.bfloat16, device="meta")
s = torch.empty(128, device="meta")
out = conv(x, w, s, s, None, s, s, 1e-5, [2, 2], [1, 1], [1, 1], 1, True)
assert out.shape == (2, 128, 8, 7) and out.is_contiguous(memory_format=cl), (out.shape, out.stride())
xd = torch.empty(2, 32, 30, 26, dtype=torch.bfloat16, device="meta").contiguous(memory_format=cl)
wd = torch.empty(128, 32, 1, 1, dtype=torch.bfloat16, device="meta")
out = tail(out, torch.empty(128, 128, 3, 3, dtype=torch.bfloat16, device="meta"), s, s, xd, wd, s, s,
           None, None, 0.0, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, [4, 4], True)
assert out.shape == (2, 128, 8, 7), out.shape
print("  schemas and fake impls: ok")

# The CUDA kernel's input checks run before any CUDA call, so CPU tensors sent straight to its
# dispatch key make a TORCH_CHECK in _C fail here too (libstdc++ linked statically into _C.so
# truncated such messages, or crashed the process, see setup.py).
cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
bad = torch.randn(1, 16, 8, dtype=torch.bfloat16)
try:
    conv.redispatch(cuda_key, bad, torch.randn(16, 16, 3, 3, dtype=torch.bfloat16), torch.ones(16),
                    torch.ones(16), None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, True)
except RuntimeError as exc:
    assert "x must be 4-D (N, C, H, W), got [1, 16, 8]" in str(exc), str(exc)
    print("  C++ input check raises:", str(exc).splitlines()[0])
else:
    raise AssertionError("a 3-D x passed the C++ input checks")

if torch.cuda.is_available():
    print("  GPU present; cuda backend available:", cuda.is_available(), cuda.why_unavailable())
else:
    assert not cuda.is_available()
    reason = cuda.why_unavailable()
    assert "torch.cuda.is_available() is False" in reason, reason
    try:
        fusedres.conv_bn_act(torch.randn(1, 8, 6, 6), torch.randn(8, 8, 3, 3), torch.ones(8),
                             torch.zeros(8), backend="cuda")
    except fusedres.BackendUnavailableError as exc:
        print("  backend='cuda' without a GPU:", exc)
    else:
        raise AssertionError("backend='cuda' ran without a GPU")
print("wheel smoke test: ok")
EOF
echo "== done in $((SECONDS - t0)) s"

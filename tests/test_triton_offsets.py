"""int64 addressing of the Triton conv kernel, checked on CPU through the interpreter.

A tensor whose images sit more than 2**31 elements apart is built as a strided view of a
large, mostly untouched CPU allocation (the OS maps its pages lazily, so only the few
touched pages cost memory).  With three images and a batch stride just below 2**31 every
stride still fits in int32, but ``n * stride`` for the last image does not: a kernel that
forms that product in int32 reads and writes the wrong elements (or faults).  The GPU test
with a real > 2**31-element tensor is ``tests/test_triton_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from fusedres import backends

pytest.importorskip("triton")
if torch.cuda.is_available() or not backends.is_available("triton"):
    pytest.skip("interpreter-only test (the GPU variant is in test_triton_cuda.py)", allow_module_level=True)

from fusedres.backends.triton import launch as tl_launch  # noqa: E402

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("ieee_fp32")]

N, C, K, H, W = 3, 8, 16, 4, 4
BATCH_STRIDE = 2**31 - 4096  # an int32; 2 * BATCH_STRIDE is not


def _far_apart(c: int, fill: torch.Tensor | None, dtype=torch.float16) -> torch.Tensor:
    """``(N, c, H, W)`` channels_last images ``BATCH_STRIDE`` elements apart, filled from ``fill``."""
    per = c * H * W
    store = torch.empty((N - 1) * BATCH_STRIDE + per, dtype=dtype)  # ~8.6 GB virtual, ~KB touched
    t = store.as_strided((N, c, H, W), (BATCH_STRIDE, 1, W * c, c))
    if fill is None:
        t.fill_(float("nan"))
    else:
        t.copy_(fill)
    return t


def _ref(x, w, s, b, residual=None, xd=None, wd=None, sd=None, bd=None):
    acc = torch.nn.functional.conv2d(x.double(), w.double(), padding=1) * s.double().view(1, -1, 1, 1)
    acc = acc + b.double().view(1, -1, 1, 1)
    if residual is not None:
        acc = acc + residual.double()
    if xd is not None:
        skip = torch.nn.functional.conv2d(xd.double(), wd.double())
        acc = acc + skip * sd.double().view(1, -1, 1, 1) + bd.double().view(1, -1, 1, 1)
    return acc.relu()


def _assert_close(out, ref):
    assert out.is_contiguous() is False and out.stride(0) == BATCH_STRIDE  # the far-apart view itself
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-2 * ref.abs().max().item(), f"max abs err {err:.3e}"


@pytest.mark.parametrize("branch", ["residual", "downsample"])
def test_int32_overflowing_offsets(branch):
    """x, out and the residual (or the downsample input) with images 2**31 - 4096 elements apart."""
    torch.manual_seed(0)
    x = _far_apart(C, torch.randn(N, C, H, W))
    out = _far_apart(K, None)
    w = (torch.randn(K, C, 3, 3) / 8).half()
    s, b = torch.rand(K) + 0.5, torch.randn(K) / 4
    res = ds = None
    extra = {}
    if branch == "residual":
        res = extra["residual"] = _far_apart(K, torch.randn(N, K, H, W))
    else:
        xd = _far_apart(C, torch.randn(N, C, H, W))
        wd = (torch.randn(K, C, 1, 1) / 4).half()
        sd, bd = torch.rand(K) + 0.5, torch.randn(K) / 4
        ds = (xd, tl_launch.kernel_weight(wd), sd, bd, (1, 1))
        extra = dict(xd=xd, wd=wd, sd=sd, bd=bd)
    tl_launch.launch(x, tl_launch.kernel_weight(w), s, b, res, out, (1, 1), (1, 1), (1, 1), 1, True, ds=ds)
    _assert_close(out, _ref(x, w, s, b, **extra))

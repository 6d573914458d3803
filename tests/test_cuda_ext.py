"""The compiled extension ``fusedres._C`` and the ``cuda`` backend.

Without a GPU: the extension loads, its schemas are registered, the fake (meta)
implementations give the right shapes and layout, and the backend declines or refuses
with clear reasons.  With a GPU (``@pytest.mark.cuda``): numerics against the float64
reference for every shape family, ``opcheck`` on both ops, and agreement with Triton.

Tolerance (flash-attention style): the error of the fused kernel against the float64
reference may be at most twice PyTorch's own error in the same dtype, plus a small atol.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres import backends
from fusedres.backends import ConvSpec
from fusedres.backends import torch_ref

if importlib.util.find_spec("fusedres._C") is None:
    pytest.skip(
        "fusedres._C is not built (no CUDA compiler / CUTLASS headers, or FUSEDRES_SKIP_CUDA_BUILD=1)",
        allow_module_level=True,
    )

# Built: it must load (a broken build fails here instead of being skipped).
import fusedres._C  # noqa: E402,F401
from fusedres.backends import cuda as cuda_backend  # noqa: E402

CONV_SCHEMA = (
    "fusedres::conv_bn_act_cuda(Tensor x, Tensor weight, Tensor scale, Tensor shift, "
    "Tensor? residual, Tensor? mean, Tensor? var, float eps, int[2] stride, int[2] padding, int[2] dilation, "
    "int groups, bool relu) -> Tensor"
)
TAIL_SCHEMA = (
    "fusedres::block_tail_cuda(Tensor y, Tensor weight, Tensor scale, Tensor shift, Tensor x, "
    "Tensor ds_weight, Tensor ds_scale, Tensor ds_shift, Tensor? mean, Tensor? var, float eps, "
    "Tensor? ds_mean, Tensor? ds_var, float ds_eps, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, int[2] ds_stride, bool relu) -> Tensor"
)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _spec(**kw):
    base = dict(
        device_type="cuda", dtype=torch.bfloat16, in_channels=64, out_channels=64, kernel_size=(3, 3),
        stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True, has_residual=False,
        channels_last=True, requires_grad=False, batch=8, input_size=(56, 56), ds_input_size=(112, 112),
    )
    base.update(kw)
    return ConvSpec(**base)


# --------------------------------------------------------------------------- no GPU needed


def test_schemas_registered():
    assert str(torch.ops.fusedres.conv_bn_act_cuda.default._schema) == CONV_SCHEMA
    assert str(torch.ops.fusedres.block_tail_cuda.default._schema) == TAIL_SCHEMA


def test_cuda_kernel_registered_for_cuda_key_only():
    for op in (torch.ops.fusedres.conv_bn_act_cuda, torch.ops.fusedres.block_tail_cuda):
        name = op.default.name()
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")


@pytest.mark.parametrize(
    "n,cin,h,w,cout,k,stride,padding,dilation",
    [
        (2, 64, 56, 56, 64, 3, (1, 1), (1, 1), (1, 1)),
        (3, 32, 17, 15, 48, 3, (2, 2), (1, 1), (1, 1)),
        (1, 16, 20, 21, 24, 3, (1, 2), (2, 0), (2, 1)),
        (2, 8, 33, 33, 64, 7, (2, 2), (3, 3), (1, 1)),
        (4, 256, 14, 14, 1024, 1, (1, 1), (0, 0), (1, 1)),
    ],
)
def test_fake_conv_shape_and_layout(n, cin, h, w, cout, k, stride, padding, dilation):
    x = _cl(torch.empty(n, cin, h, w, dtype=torch.bfloat16, device="meta"))
    wt = torch.empty(cout, cin, k, k, dtype=torch.bfloat16, device="meta")
    s = torch.empty(cout, device="meta")
    out = torch.ops.fusedres.conv_bn_act_cuda(x, wt, s, s, None, None, None, 0.0, stride, padding, dilation, 1,
                                              True)
    ref = torch.nn.functional.conv2d(
        torch.empty(n, cin, h, w, device="meta"), torch.empty(cout, cin, k, k, device="meta"),
        None, stride, padding, dilation,
    )
    assert out.shape == ref.shape
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_fake_block_tail_shape():
    y = _cl(torch.empty(2, 128, 28, 28, dtype=torch.float16, device="meta"))
    x = _cl(torch.empty(2, 64, 56, 56, dtype=torch.float16, device="meta"))
    w = torch.empty(128, 128, 3, 3, dtype=torch.float16, device="meta")
    wd = torch.empty(128, 64, 1, 1, dtype=torch.float16, device="meta")
    s = torch.empty(128, device="meta")
    out = torch.ops.fusedres.block_tail_cuda(y, w, s, s, x, wd, s, s, None, None, 0.0, None, None, 0.0,
                                             [1, 1], [1, 1], [1, 1], 1, [2, 2], True)
    assert out.shape == (2, 128, 28, 28)
    assert out.dtype == torch.float16
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_fake_rejects_groups():
    x = _cl(torch.empty(1, 16, 8, 8, dtype=torch.bfloat16, device="meta"))
    w = torch.empty(16, 8, 3, 3, dtype=torch.bfloat16, device="meta")
    s = torch.empty(16, device="meta")
    with pytest.raises(RuntimeError, match="groups must be 1"):
        torch.ops.fusedres.conv_bn_act_cuda(x, w, s, s, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 2, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_without_gpu_says_why():
    assert not cuda_backend.is_available()
    assert "torch.cuda.is_available() is False" in cuda_backend.why_unavailable()
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(backends.BackendUnavailableError, match="no usable GPU"):
        fusedres.conv_bn_act(x, torch.randn(8, 8, 3, 3), torch.ones(8), torch.zeros(8), backend="cuda")


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(device_type="cpu"), "CUDA tensors"),
        (dict(dtype=torch.float32), "fp16/bf16 only"),
        (dict(dtype=torch.float64), "fp16/bf16 only"),
        (dict(requires_grad=True), "forward-only"),
        (dict(groups=2), "groups=2"),
        (dict(out_channels=20), "out_channels=20 is not a multiple of 8"),
        (dict(in_channels=12, ds_in_channels=16, ds_stride=(2, 2)), "in_channels=12 is not a multiple of 8"),
        (dict(ds_in_channels=12, ds_stride=(2, 2)), "ds_in_channels=12 is not a multiple of 8"),
        (dict(kernel_size=(33, 1)), "exceeds 32"),
        (dict(in_channels=0), "zero input or output channels"),
        (dict(out_channels=0), "zero input or output channels"),
    ],
)
def test_unsupported_reasons(kw, needle):
    reason = cuda_backend.unsupported_reason(_spec(**kw))
    assert reason is not None and needle in reason


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_supported_specs(dtype):
    assert cuda_backend.unsupported_reason(_spec(dtype=dtype)) is None
    assert cuda_backend.unsupported_reason(_spec(dtype=dtype, ds_in_channels=256, ds_stride=(2, 2))) is None
    assert cuda_backend.unsupported_reason(_spec(dtype=dtype, kernel_size=(7, 7), in_channels=8)) is None
    # conv_bn_act pads input channels (the ResNet stem)
    assert cuda_backend.unsupported_reason(_spec(dtype=dtype, kernel_size=(7, 7), in_channels=3)) is None


@pytest.mark.parametrize("cin", [1, 3, 8, 12])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pad_channels_keeps_the_convolution(cin, channels_last):
    x = torch.randn(2, cin, 9, 11, dtype=torch.bfloat16)
    x = _cl(x) if channels_last else x
    w = torch.randn(16, cin, 7, 7, dtype=torch.bfloat16)
    xp, wp = cuda_backend._pad_channels(x), cuda_backend._kernel_weight(w, torch.bfloat16)
    assert xp.shape[1] % cuda_backend.ALIGNMENT == 0 and xp.shape[1] == wp.shape[1] < cin + 8
    assert xp.is_contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=3)
    torch.testing.assert_close(torch.nn.functional.conv2d(xp.double(), wp.double(), padding=3), ref)


def test_kernel_weight_cache_follows_the_data():
    """The padded/cast filter is cached per weight and rebuilt when its data changes,
    in place (version counter) or by Module._apply (.half()/.float(): a new storage)."""
    conv = torch.nn.Conv2d(3, 16, 7, bias=False)
    first = cuda_backend._kernel_weight(conv.weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and first.shape[1] == cuda_backend.ALIGNMENT
    assert cuda_backend._kernel_weight(conv.weight, torch.bfloat16) is first
    with torch.no_grad():
        conv.weight.mul_(2)
    doubled = cuda_backend._kernel_weight(conv.weight, torch.bfloat16)
    torch.testing.assert_close(doubled[:, :3].float(), (conv.weight * 1).bfloat16().float())
    conv.half().float()  # same parameter object and version, new storage with rounded values
    rounded = cuda_backend._kernel_weight(conv.weight, torch.bfloat16)
    assert rounded is not doubled
    assert torch.equal(rounded[:, :3], conv.weight.detach().bfloat16())


@pytest.mark.parametrize("cin", [3, 64])
def test_backend_traces_fullgraph(cin):
    """The backend's Python path (layout conversion, channel padding, op call) compiles
    without graph breaks; meta tensors stand in for CUDA ones, the op's fake impl runs."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    spec = _spec(in_channels=cin, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3))
    x = torch.randn(2, cin, 32, 32, dtype=torch.bfloat16, device="meta")
    w = torch.randn(64, cin, 7, 7, dtype=torch.bfloat16, device="meta")
    s = torch.randn(64, device="meta")
    graphs = EagerAndRecordGraphs()
    fn = torch.compile(lambda *a: cuda_backend.conv_bn_act(*a, None, spec), fullgraph=True, backend=graphs)
    out = fn(x, w, s, s)
    assert out.shape == (2, 64, 16, 16) and out.is_contiguous(memory_format=torch.channels_last)
    assert len(graphs.graphs) == 1


def test_cpu_tensors_have_no_kernel():
    x = _cl(torch.randn(1, 8, 6, 6, dtype=torch.bfloat16))
    w = torch.randn(8, 8, 3, 3, dtype=torch.bfloat16)
    s = torch.ones(8)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.fusedres.conv_bn_act_cuda(x, w, s, s, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, True)


_CHECK_ERRORS_SCRIPT = r"""
import torch, fusedres._C
# Straight to the CUDA kernel with CPU tensors: its input checks (ops.cu) run before any CUDA
# call, so no GPU is needed to make a TORCH_CHECK in fusedres._C fail and format its message.
op = torch.ops.fusedres.conv_bn_act_cuda.default
cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
w, s = torch.randn(16, 16, 3, 3, dtype=torch.bfloat16), torch.ones(16)
for x, message in [
    (torch.randn(1, 16, 8, dtype=torch.bfloat16), "x must be 4-D (N, C, H, W), got [1, 16, 8]"),
    (torch.randn(1, 16, 8, 8), "x must be bfloat16 or float16, got Float"),
    (torch.randn(1, 16, 8, 8, dtype=torch.bfloat16), "x must be channels_last-contiguous"),
    (torch.randn(1, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last),
     "x must be a CUDA tensor, got cpu"),
]:
    try:
        op.redispatch(cuda_key, x, w, s, s, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, True)
    except RuntimeError as exc:
        assert message in str(exc), (message, str(exc))
        print("raised:", message, flush=True)
    else:
        raise AssertionError("no error for " + message)
"""


def test_kernel_checks_raise_without_gpu():
    """A failing TORCH_CHECK in the compiled kernel raises RuntimeError with its whole message.

    In a subprocess: with libstdc++ linked statically into _C.so (see setup.py) formatting the
    message truncated it after the first number here and killed the process (SIGSEGV) on the
    H100 machine.
    """
    proc = subprocess.run([sys.executable, "-c", _CHECK_ERRORS_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("raised:") == 4


# --------------------------------------------------------------------------- GPU

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation): every shape family.  Odd
# spatial sizes and channel counts that are not multiples of the 128x128x64 tile exercise
# the predicated edges.
CONV_CASES = {
    "1x1": (2, 64, 14, 14, 256, 1, 1, 0, 1),
    "1x1_s2_odd": (2, 64, 15, 15, 128, 1, 2, 0, 1),
    "3x3": (2, 64, 13, 11, 64, 3, 1, 1, 1),
    "3x3_s2": (3, 32, 17, 17, 48, 3, 2, 1, 1),
    "3x3_dil2": (1, 16, 20, 19, 24, 3, 1, 2, 2),
    "3x3_nopad": (2, 24, 9, 9, 40, 3, 1, 0, 1),
    "3x3_asym": (2, 16, 12, 15, 32, 3, (1, 2), (0, 1), (2, 1)),
    "7x7_s2": (2, 8, 33, 33, 64, 7, 2, 3, 1),
    "n1_7x7_spatial": (1, 512, 7, 7, 512, 3, 1, 1, 1),
    "r18_layer1": (4, 64, 56, 56, 64, 3, 1, 1, 1),
    "r18_layer2_conv1": (4, 64, 56, 56, 128, 3, 2, 1, 1),
    "r50_layer1_conv1": (4, 256, 56, 56, 64, 1, 1, 0, 1),
    "r50_layer3_conv2": (4, 256, 14, 14, 256, 3, 1, 1, 1),
    "r50_layer4_conv3": (4, 512, 7, 7, 2048, 1, 1, 0, 1),
}
DTYPES = [torch.bfloat16, torch.float16]


def _inputs(n, cin, h, w, cout, k, dtype, scale_dtype=torch.float32):
    x = _cl(torch.randn(n, cin, h, w, device="cuda", dtype=dtype))
    wt = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype)
    scale = (torch.rand(cout, device="cuda") + 0.5).to(scale_dtype)
    shift = (torch.randn(cout, device="cuda") * 0.1).to(scale_dtype)
    return x, wt, scale, shift


def _spec_for(x, w, stride, padding, dilation, relu, residual, **kw):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return ConvSpec(
        device_type="cuda", dtype=x.dtype, in_channels=x.shape[1], out_channels=w.shape[0],
        kernel_size=tuple(w.shape[2:]), stride=pair(stride), padding=pair(padding),
        dilation=pair(dilation), groups=1, relu=relu, has_residual=residual, channels_last=True,
        requires_grad=False, batch=x.shape[0], input_size=tuple(x.shape[2:]), **kw,
    )


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


def _assert_close_to_ref(out, ref64, torch_same_dtype, atol):
    err = (out.double() - ref64).abs().max().item()
    err_torch = (torch_same_dtype.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + atol, f"max error {err:.3e} vs torch {err_torch:.3e} (+atol {atol})"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "id"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_act_matches_reference(case, relu, residual, dtype):
    n, cin, h, w, cout, k, stride, padding, dilation = CONV_CASES[case]
    x, wt, scale, shift = _inputs(n, cin, h, w, cout, k, dtype)
    spec = _spec_for(x, wt, stride, padding, dilation, relu, residual)
    oh, ow = fusedres.functional.conv_out_hw(h, w, spec.kernel_size, spec.stride, spec.padding, spec.dilation)
    res = _cl(torch.randn(n, cout, oh, ow, device="cuda", dtype=dtype)) if residual else None

    out = torch.ops.fusedres.conv_bn_act_cuda(
        x, wt, scale, shift, res, None, None, 0.0, list(spec.stride), list(spec.padding), list(spec.dilation),
        1, relu
    )
    ref64 = torch_ref.conv_bn_act(*_f64(x, wt, scale, shift, res), spec)
    same = torch_ref.conv_bn_act(x, wt, scale, shift, res, spec)
    assert out.shape == ref64.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_close_to_ref(out, ref64, same, atol=1e-3)


def _bn_stats(cout, dtype):
    mean = torch.randn(cout, device="cuda").to(dtype)
    var = (torch.rand(cout, device="cuda") * 2 + 0.1).to(dtype)
    return mean, var


def _fold64(scale, shift, mean, var, eps):
    s = scale.double() / torch.sqrt(var.double() + eps)
    return s, shift.double() - mean.double() * s


@pytest.mark.cuda
@pytest.mark.parametrize("stats_dtype", ["fp32", "input"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_statistics_folded_in_the_kernel(dtype, stats_dtype):
    """With running mean/var the fold kernel normalises itself: (conv - mean) * scale / sqrt(var + eps) + shift."""
    sd = torch.float32 if stats_dtype == "fp32" else dtype
    x, wt, scale, shift = _inputs(2, 32, 9, 9, 64, 3, dtype, scale_dtype=sd)
    mean, var = _bn_stats(64, sd)
    res = _cl(torch.randn(2, 64, 9, 9, device="cuda", dtype=dtype))
    out = torch.ops.fusedres.conv_bn_act_cuda(x, wt, scale, shift, res, mean, var, 1e-3, [1, 1], [1, 1], [1, 1], 1,
                                              True)
    spec = _spec_for(x, wt, 1, 1, 1, True, True)
    s64, b64 = _fold64(scale, shift, mean, var, 1e-3)
    ref64 = torch_ref.conv_bn_act(*_f64(x, wt), s64, b64, res.double(), spec)
    same = torch_ref.conv_bn_act(x, wt, s64.float(), b64.float(), res, spec)
    _assert_close_to_ref(out, ref64, same, atol=1e-3)

    # Block tail: each branch with its own statistics and eps.
    y, w2, s2, b2 = _inputs(2, 64, 9, 9, 64, 3, dtype, scale_dtype=sd)
    xd, wd, sd_, bd = _inputs(2, 32, 17, 17, 64, 1, dtype)
    m2, v2 = _bn_stats(64, sd)
    md, vd = _bn_stats(64, torch.float32)
    tail = torch.ops.fusedres.block_tail_cuda(y, w2, s2, b2, xd, wd, sd_, bd, m2, v2, 1e-5, md, vd, 1e-3,
                                              [1, 1], [1, 1], [1, 1], 1, [2, 2], True)
    tspec = _spec_for(y, w2, 1, 1, 1, True, False, ds_in_channels=32, ds_stride=(2, 2), ds_input_size=(17, 17))
    (s64, b64), (sd64, bd64) = _fold64(s2, b2, m2, v2, 1e-5), _fold64(sd_, bd, md, vd, 1e-3)
    ref64 = torch_ref.block_tail(y.double(), w2.double(), s64, b64, xd.double(), wd.double(), sd64, bd64, tspec)
    same = torch_ref.block_tail(y, w2, s64.float(), b64.float(), xd, wd, sd64.float(), bd64.float(), tspec)
    _assert_close_to_ref(tail, ref64, same, atol=1e-3)


# (N, C_mid, H', W', C_out, kernel, stride, padding, C_in, H, W, ds_stride)
TAIL_CASES = {
    "r18_layer2": (2, 128, 28, 28, 128, 3, 1, 1, 64, 56, 56, 2),
    "r18_layer4": (2, 512, 7, 7, 512, 3, 1, 1, 256, 14, 14, 2),
    "r50_layer1": (2, 64, 56, 56, 256, 1, 1, 0, 64, 56, 56, 1),
    "r50_layer3": (2, 256, 14, 14, 1024, 1, 1, 0, 512, 28, 28, 2),
    "odd": (3, 24, 9, 9, 40, 3, 1, 1, 16, 17, 17, 2),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "id"])
@pytest.mark.parametrize("case", list(TAIL_CASES))
def test_block_tail_matches_reference(case, relu, dtype):
    n, cmid, h, w, cout, k, stride, padding, cin, xh, xw, ds_stride = TAIL_CASES[case]
    y, wt, scale, shift = _inputs(n, cmid, h, w, cout, k, dtype)
    x, wd, ds_scale, ds_shift = _inputs(n, cin, xh, xw, cout, 1, dtype)
    spec = _spec_for(y, wt, stride, padding, 1, relu, False, ds_in_channels=cin, ds_stride=(ds_stride, ds_stride),
                     ds_input_size=(xh, xw))

    out = torch.ops.fusedres.block_tail_cuda(
        y, wt, scale, shift, x, wd, ds_scale, ds_shift, None, None, 0.0, None, None, 0.0,
        [stride] * 2, [padding] * 2, [1, 1], 1, [ds_stride] * 2, relu,
    )
    ref64 = torch_ref.block_tail(*_f64(y, wt, scale, shift, x, wd, ds_scale, ds_shift), spec)
    same = torch_ref.block_tail(y, wt, scale, shift, x, wd, ds_scale, ds_shift, spec)
    assert out.shape == ref64.shape
    _assert_close_to_ref(out, ref64, same, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_nchw_and_same_dtype_scale(dtype):
    """Through ``fusedres.conv_bn_act(backend="cuda")``: NCHW input (converted by the
    backend), scale/shift in the activation dtype, NCHW-strided weight."""
    x, wt, scale, shift = _inputs(2, 32, 15, 15, 64, 3, dtype, scale_dtype=dtype)
    x = x.contiguous()
    res = torch.randn(2, 64, 8, 8, device="cuda", dtype=dtype)
    out = fusedres.conv_bn_act(x, wt, scale, shift, stride=2, padding=1, residual=res, backend="cuda")
    spec = _spec_for(x, wt, 2, 1, 1, True, True)
    ref64 = torch_ref.conv_bn_act(*_f64(x, wt, scale, shift, res), spec)
    same = torch_ref.conv_bn_act(x, wt, scale, shift, res, spec)
    _assert_close_to_ref(out, ref64, same, atol=1e-3)


@pytest.mark.cuda
def test_functional_block_tail_and_auto():
    y, wt, scale, shift = _inputs(2, 64, 28, 28, 128, 3, torch.bfloat16)
    x, wd, sd, bd = _inputs(2, 32, 56, 56, 128, 1, torch.bfloat16)
    out = fusedres.block_tail(y, wt, scale, shift, x, wd, sd, bd, padding=1, ds_stride=2, backend="cuda")
    auto = fusedres.block_tail(y, wt, scale, shift, x, wd, sd, bd, padding=1, ds_stride=2, backend="auto")
    torch.testing.assert_close(out, auto, rtol=0, atol=0)  # auto picks this backend first


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cin", [1, 3, 12])
def test_input_channel_padding(cin, dtype):
    """C_in not a multiple of 8 (the ResNet stem has 3): the backend pads with zero channels."""
    x, wt, scale, shift = _inputs(2, cin, 37, 37, 64, 7, dtype)
    out = fusedres.conv_bn_act(x, wt, scale, shift, stride=2, padding=3, backend="cuda")
    spec = _spec_for(x, wt, 2, 3, 1, True, False)
    ref64 = torch_ref.conv_bn_act(*_f64(x, wt, scale, shift, None), spec)
    same = torch_ref.conv_bn_act(x, wt, scale, shift, None, spec)
    _assert_close_to_ref(out, ref64, same, atol=1e-3)


@pytest.mark.cuda
def test_auto_falls_back_for_unaligned_channels():
    x, wt, scale, shift = _inputs(1, 16, 16, 16, 20, 3, torch.bfloat16)  # C_out = 20
    with pytest.raises(backends.BackendUnavailableError, match="out_channels=20 is not a multiple of 8"):
        fusedres.conv_bn_act(x, wt, scale, shift, padding=1, backend="cuda")
    out = fusedres.conv_bn_act(x, wt, scale, shift, padding=1, backend="auto")
    spec = _spec_for(x, wt, 1, 1, 1, True, False)
    ref64 = torch_ref.conv_bn_act(*_f64(x, wt, scale, shift, None), spec)
    same = torch_ref.conv_bn_act(x, wt, scale, shift, None, spec)
    _assert_close_to_ref(out, ref64, same, atol=1e-3)


_KERNEL_ERRORS_SCRIPT = r"""
import torch, fusedres
op = torch.ops.fusedres.conv_bn_act_cuda
cl = lambda t: t.contiguous(memory_format=torch.channels_last)

def inputs(cin):
    x = cl(torch.randn(1, cin, 8, 8, device="cuda", dtype=torch.bfloat16))
    w = (torch.randn(16, cin, 3, 3, device="cuda") / 8).to(torch.bfloat16)
    return x, w, torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda") * 0.1

def expect(fragment, *args):
    try:
        op(*args, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, True)
    except RuntimeError as exc:
        assert fragment in str(exc), (fragment, str(exc))
        print("raised:", fragment, flush=True)
    else:
        raise AssertionError("no error for " + fragment)

x, w, s, b = inputs(12)
expect("multiples of 8", x, w, s, b)
x, w, s, b = inputs(16)
expect("x must be channels_last", x.contiguous(), w, s, b)
expect("x must be bfloat16 or float16", x.float(), w.float(), s, b)
expect("scale must have shape", x, w, s[:8], b)
"""


@pytest.mark.cuda
def test_kernel_errors_are_clear():
    """Bad input reaching the C++ op raises RuntimeError with the message (it must not crash).

    Run in a subprocess: on the H100 check of 2026-11-27 the first failing TORCH_CHECK inside
    fusedres._C killed the process (SIGSEGV) instead of raising; a crash must fail this test,
    not take the rest of the suite down with it.
    """
    proc = subprocess.run([sys.executable, "-c", _KERNEL_ERRORS_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("raised:") == 4


@pytest.mark.cuda
def test_empty_batch():
    x, wt, scale, shift = _inputs(1, 16, 8, 8, 16, 3, torch.bfloat16)
    out = torch.ops.fusedres.conv_bn_act_cuda(x[:0], wt, scale, shift, None, None, None, 0.0, [1, 1], [1, 1], [1, 1],
                                              1, True)
    assert out.shape == (0, 16, 8, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("stats", [False, True], ids=["folded", "bn-stats"])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_conv_bn_act(residual, stats):
    x, wt, scale, shift = _inputs(2, 16, 10, 10, 32, 3, torch.bfloat16)
    res = _cl(torch.randn(2, 32, 5, 5, device="cuda", dtype=torch.bfloat16)) if residual else None
    mean, var = _bn_stats(32, scale.dtype) if stats else (None, None)
    torch.library.opcheck(
        torch.ops.fusedres.conv_bn_act_cuda.default,
        (x, wt, scale, shift, res, mean, var, 1e-5 if stats else 0.0, [2, 2], [1, 1], [1, 1], 1, True),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("stats", [False, True], ids=["folded", "bn-stats"])
def test_opcheck_block_tail(stats):
    y, wt, scale, shift = _inputs(2, 16, 6, 6, 32, 3, torch.float16)
    x, wd, sd, bd = _inputs(2, 8, 11, 11, 32, 1, torch.float16)
    mean, var = _bn_stats(32, scale.dtype) if stats else (None, None)
    ds_mean, ds_var = _bn_stats(32, sd.dtype) if stats else (None, None)
    eps = 1e-5 if stats else 0.0
    torch.library.opcheck(
        torch.ops.fusedres.block_tail_cuda.default,
        (y, wt, scale, shift, x, wd, sd, bd, mean, var, eps, ds_mean, ds_var, eps, [1, 1], [1, 1], [1, 1], 1, [2, 2],
         True),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["3x3_s2", "r50_layer1_conv1", "7x7_s2"])
def test_matches_triton(case):
    if not backends.is_available("triton"):
        pytest.skip("triton backend not available")
    n, cin, h, w, cout, k, stride, padding, dilation = CONV_CASES[case]
    x, wt, scale, shift = _inputs(n, cin, h, w, cout, k, torch.bfloat16)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    out = fusedres.conv_bn_act(x, wt, scale, shift, backend="cuda", **kw)
    try:
        tri = fusedres.conv_bn_act(x, wt, scale, shift, backend="triton", **kw)
    except backends.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    spec = _spec_for(x, wt, stride, padding, dilation, True, False)
    ref64 = torch_ref.conv_bn_act(*_f64(x, wt, scale, shift, None), spec)
    # Both within bf16 rounding of the exact result, hence of each other.
    tol = 4 * 2.0**-8 * ref64.abs().max().item()
    assert (out.double() - tri.double()).abs().max().item() <= tol


@pytest.mark.cuda
def test_batch_chunking_over_2gib():
    """Tensors of 2 GiB or more run in batch chunks (CUTLASS's 32-bit offsets); each output
    element's accumulation order does not depend on its batch index, so the first and last
    samples must match single-sample calls bit for bit."""
    n = 1100  # x, residual and out are 1100 * 64 * 128 * 128 * 2 B = 2.3 GB each
    x, wt, scale, shift = _inputs(n, 64, 128, 128, 64, 1, torch.bfloat16)
    res = _cl(torch.randn(n, 64, 128, 128, device="cuda", dtype=torch.bfloat16))
    args = (None, None, 0.0, [1, 1], [0, 0], [1, 1], 1, True)
    out = torch.ops.fusedres.conv_bn_act_cuda(x, wt, scale, shift, res, *args)
    for i in (0, n - 1):
        one = torch.ops.fusedres.conv_bn_act_cuda(x[i : i + 1], wt, scale, shift, res[i : i + 1], *args)
        assert torch.equal(out[i : i + 1], one), f"sample {i} differs"


def test_epilogue_relu_keeps_nan_in_sass():
    """The CUTLASS epilogue's ReLU is a NaN-propagating max (``max.NaN.f32`` -> ``FMNMX.NAN``):
    every float min/max in the compiled kernels keeps NaN, as torch.relu does.  Read from the
    extension's SASS (Triton ships cuobjdump), so it is checked without a GPU."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("no cuobjdump in the triton package")
    sass = subprocess.run([cuobjdump, "-sass", fusedres._C.__file__], capture_output=True, text=True,
                          timeout=600).stdout
    ops = re.findall(r"\bFMNMX(?:\.[A-Z0-9]+)*", sass)
    assert ops, "no float min/max found in the extension's SASS"
    assert all(".NAN" in op for op in ops), sorted(set(ops))



@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("FUSEDRES_CUDA_SM90A") not in ("1", "require"),
                    reason="the sm_90a kernels are opt-in (FUSEDRES_CUDA_SM90A=1, an extension built with 90a)")
def test_sm90a_kernels_run_when_opted_in():
    """With FUSEDRES_CUDA_SM90A=1 on an sm_90 GPU (and the extension built with 90a), eval convs
    run the CUTLASS 3.x kernel (ConvUniversal) and the numerics tests above check it; the
    device check runs them so (scripts/device_check.sh, smoke-sm90a)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("sm_90a SASS runs on compute capability 9.0 only")
    x, wt, scale, shift = _inputs(2, 64, 14, 14, 64, 3, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.fusedres.conv_bn_act_cuda(x, wt, scale, shift, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1,
                                            True)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("ConvUniversal" in n for n in names), names
    assert not any("fold_weight" in n for n in names), names  # the scale goes to the epilogue instead


@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("FUSEDRES_CUDA_SM90A") not in ("1", "require"),
                    reason="the sm_90a kernels are opt-in (FUSEDRES_CUDA_SM90A=1, an extension built with 90a)")
def test_sm90a_small_bn_scale_keeps_fp16_precision():
    """On the sm_90a path the BN scale multiplies the fp32 accumulator, so a BN weight of 1e-4
    costs fp16 no precision (folded into an fp16 filter it would: README, the `cuda` backend)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("sm_90a SASS runs on compute capability 9.0 only")
    x, wt, _, shift = _inputs(2, 64, 14, 14, 64, 3, torch.float16)
    scale = torch.full((64,), 1e-4, device="cuda")
    spec = _spec_for(x, wt, 1, 1, 1, False, False)
    out = torch.ops.fusedres.conv_bn_act_cuda(x, wt, scale, shift * 1e-4, None, None, None, 0.0, [1, 1], [1, 1],
                                              [1, 1], 1, False)
    ref64 = torch_ref.conv_bn_act(*_f64(x, wt, scale, shift * 1e-4, None), spec)
    rel = ((out.double() - ref64).abs().max() / ref64.abs().max()).item()
    assert rel < 2e-3, rel

"""Numerics and registration of the ``triton`` backend.

Without a GPU these run the real kernels through the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), with the interpreter's small fixed tile, so
the tiny problems below still span several row, column and channel tiles with ragged
edges.  With a GPU the same tests run on CUDA tensors.

Every result is compared with the float64 ``torch`` reference backend on upcast inputs.
Two bounds must hold: ``||ours - ref|| / ||ref||`` below a per-dtype bound, and the
flash-attention criterion ``max|ours - ref| <= 2 * max|torch(same dtype) - ref| + atol``,
i.e. we may not be more than twice as far from fp64 as PyTorch itself.  Outputs are
NaN-poisoned before each kernel run so that an element the kernel skips fails.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv

import fusedres
from fusedres import backends

pytest.importorskip("triton")
if not backends.is_available("triton"):
    pytest.skip("triton backend unavailable (no GPU and not interpreting)", allow_module_level=True)

from fusedres.backends.triton import launch as tl_launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.usefixtures("ieee_fp32")] + ([pytest.mark.interpret] if DEVICE == "cpu" else [])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ||ours - ref|| / ||ref||: the output rounding dominates for bf16/fp16 (unit roundoff
# 2^-8 / 2^-11); fp32 is IEEE (TF32 is switched off in these tests).
REL_BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Additive slack of the flash-attention criterion, relative to max|ref|.
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}


def _rand(*shape, dtype, channels_last=False):
    t = torch.randn(*shape, dtype=torch.float32, device=DEVICE).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _affine(k, dtype=torch.float32):
    scale = (torch.rand(k, device=DEVICE) + 0.5).to(dtype)
    shift = torch.randn(k, device=DEVICE).to(dtype)
    return scale, shift


def _torch_same_dtype(fn):
    """The torch reference in the test dtype, or None where this device lacks the kernel."""
    try:
        return fn()
    except RuntimeError:
        return None


def _check(out, ref64, same_dtype, dtype):
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "kernel left (poisoned) output elements unwritten"
    diff = (out.double() - ref64)
    rel = (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
    assert rel <= REL_BOUND[dtype], f"relative error {rel:.3g} > {REL_BOUND[dtype]:.3g}"
    if same_dtype is not None:
        ours = diff.abs().max().item()
        theirs = (same_dtype.double() - ref64).abs().max().item()
        atol = ATOL[dtype] * ref64.abs().max().item()
        assert ours <= 2 * theirs + atol, f"max error {ours:.3g} > 2 * torch's {theirs:.3g} + {atol:.3g}"


def _poisoned(shape, dtype, channels_last):
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


# (N, C, K, H, W, kernel, stride, padding, dilation, groups, residual, relu)
CONV_CASES = {
    "3x3": (2, 20, 24, 9, 7, 3, 1, 1, 1, 1, True, True),
    "3x3-s2": (2, 20, 24, 9, 8, 3, 2, 1, 1, 1, False, True),
    "3x3-unpadded": (2, 12, 16, 9, 8, 3, 2, 0, 1, 1, True, True),
    "1x1": (2, 40, 36, 5, 6, 1, 1, 0, 1, 1, True, False),
    "1x1-s2": (3, 24, 40, 7, 7, 1, 2, 0, 1, 1, False, True),
    "stem-7x7": (1, 3, 16, 13, 11, 7, 2, 3, 1, 1, False, True),
    "dilated": (2, 16, 20, 9, 9, 3, 1, 2, 2, 1, True, True),
    "groups4": (2, 16, 24, 6, 5, 3, 1, 1, 1, 4, True, True),
    "groups2-1x1": (2, 40, 32, 4, 5, 1, 1, 0, 1, 2, False, False),
    "asym": (2, 12, 20, 8, 9, 3, (1, 2), (0, 1), (2, 1), 1, False, True),
    "1-pixel": (1, 17, 33, 1, 1, 1, 1, 0, 1, 1, True, True),
}


def _conv_case_matches_fp64(spec, dtype, channels_last, split_k=None, x_fill=None):
    """Launch the kernel on one ``CONV_CASES``-style problem and check it against fp64 (``split_k``:
    forced to the launcher; ``x_fill``: edits ``x`` in place first, e.g. NaN/inf into it)."""
    n, c, k, h, w, ks, stride, padding, dilation, groups, has_res, relu = spec
    x = _rand(n, c, h, w, dtype=dtype, channels_last=channels_last)
    if x_fill is not None:
        x_fill(x)
    wt = _rand(k, c // groups, ks, ks, dtype=dtype) / math.sqrt(c // groups * ks * ks)
    scale, shift = _affine(k)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    ref_shape = fusedres.conv_bn_act(x[:1].double(), wt.double(), scale.double(), shift.double(),
                                     backend="torch", **kwargs).shape
    oh, ow = ref_shape[2:]
    # Residual in the other memory format than x: the kernel reads it through its strides.
    res = _rand(n, k, oh, ow, dtype=dtype, channels_last=not channels_last) if has_res else None

    ref64 = fusedres.conv_bn_act(x.double(), wt.double(), scale.double(), shift.double(),
                                 residual=None if res is None else res.double(), backend="torch", **kwargs)
    same = _torch_same_dtype(lambda: fusedres.conv_bn_act(x, wt, scale, shift, residual=res,
                                                           backend="torch", **kwargs))
    p = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    out = _poisoned((n, k, oh, ow), dtype, channels_last)
    tl_launch.launch(x, tl_launch.kernel_weight(wt), scale, shift, res, out,
                     p(stride), p(padding), p(dilation), groups, relu, split_k=split_k)
    if x_fill is not None:  # non-finite input: the same NaN/inf pattern as the reference, same finite values
        same_nan = torch.isnan(out) == torch.isnan(ref64)
        assert same_nan.all(), f"{(~same_nan).sum().item()} elements differ in NaN-ness from the reference"
        fin = torch.isfinite(ref64)
        assert torch.equal(torch.isinf(out), torch.isinf(ref64)) and torch.equal(out[~fin & ~torch.isnan(out)],
                                                                                 ref64[~fin & ~torch.isnan(out)].to(dtype))
        torch.testing.assert_close(out[fin].double(), ref64[fin], rtol=REL_BOUND[dtype] * 10, atol=ATOL[dtype] * 10)
        return
    _check(out, ref64, same, dtype)


@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_act_matches_fp64(case, dtype, channels_last):
    _conv_case_matches_fp64(CONV_CASES[case], dtype, channels_last)


# Cases whose channels per group are a multiple of every BLOCK_K (the hoisted loop's EVEN_K).
EVEN_CASES = {
    "3x3-even": (1, 64, 20, 5, 6, 3, 1, 1, 1, 1, True, True),
    "3x3-s2-groups2-even": (1, 128, 24, 7, 6, 3, 2, 1, 1, 2, False, True),
    "1x1-even": (2, 64, 24, 3, 4, 1, 1, 0, 1, 1, True, False),
}


def _spy_kernel(monkeypatch):
    """Record the flags of every launch of the conv kernel (interpreter path)."""
    seen = []
    real = tl_launch._conv_bn_act_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append({f: kw.get(f) for f in ("HOISTED", "EVEN_K", "PROLOGUE_BN", "EMIT_STATS", "SPLIT_K")})
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(tl_launch, "_conv_bn_act_fwd_kernel", Spy())
    return seen


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernel: GPU runs set FUSEDRES_TRITON_HOISTED=1 themselves")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES) + list(EVEN_CASES))
def test_hoisted_main_loop_matches_fp64(case, dtype, monkeypatch):
    """The opt-in hoisted main loop (FUSEDRES_TRITON_HOISTED=1): every conv case, channels_last,
    against fp64, for 16-bit operands (fp32 keeps the default loop); EVEN_K exactly when the
    channels per group are a multiple of 64."""
    monkeypatch.setattr(tl_launch, "HOISTED_ENABLED", True)
    seen = _spy_kernel(monkeypatch)
    _conv_case_matches_fp64({**CONV_CASES, **EVEN_CASES}[case], dtype, True)
    if dtype == torch.float32:
        assert [s["HOISTED"] for s in seen] == [None]
    else:
        assert [s["HOISTED"] for s in seen] == [True] and seen[0]["EVEN_K"] == (case in EVEN_CASES)


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernel: GPU runs set FUSEDRES_TRITON_HOISTED=1 themselves")
@pytest.mark.parametrize("ks, hoisted", [(15, True), (16, None), (17, None)])
def test_hoisted_loop_limits_on_filter_size(ks, hoisted, monkeypatch):
    """The hoisted loop's padding bits hold up to 16 rows and 15 columns of taps (bit 31 marks a row
    past M; a 16th column there zeroed every right-border row: max error 2.1 for a padded 1x16 filter,
    found by a review); larger filters run the default loop.  Both match fp64 at the border."""
    monkeypatch.setattr(tl_launch, "HOISTED_ENABLED", True)
    seen = _spy_kernel(monkeypatch)
    _conv_case_matches_fp64((1, 8, 8, 4, 5, ks, 1, ks // 2, 1, 1, False, True), torch.bfloat16, True)
    assert [s["HOISTED"] for s in seen] == [hoisted]


def test_every_block_k_divides_the_even_k_unit():
    tiles = (*tl_launch.GPU_CONFIGS, *tl_launch.FMA_CONFIGS, tl_launch.INTERPRET_CONFIG)
    assert all(tl_launch._MAX_BLOCK_K % t.block_k == 0 for t in tiles) and tl_launch._MAX_BLOCK_K == 64


def test_default_launch_passes_no_hoisted_flag(monkeypatch):
    """Without FUSEDRES_TRITON_HOISTED the kernel's flags are the verified ones (no HOISTED)."""
    monkeypatch.setattr(tl_launch, "HOISTED_ENABLED", False)
    seen = _spy_kernel(monkeypatch)
    x = _rand(1, 8, 4, 4, dtype=torch.float32, channels_last=True)
    wt = _rand(8, 8, 3, 3, dtype=torch.float32)
    out = _poisoned((1, 8, 4, 4), torch.float32, True)
    tl_launch.launch(x, tl_launch.kernel_weight(wt), *_affine(8), None, out, (1, 1), (1, 1), (1, 1), 1, True)
    assert seen == [{"HOISTED": None, "EVEN_K": None, "PROLOGUE_BN": False, "EMIT_STATS": False, "SPLIT_K": None}]


# --------------------------------------------------------------------------- split-K (opt-in)

@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernel: GPU runs set FUSEDRES_TRITON_SPLITK=1 themselves")
@pytest.mark.parametrize("split", [3, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_split_k_matches_fp64(case, dtype, split, monkeypatch):
    """The opt-in split-K pair (partials, then the epilogue kernel): every conv case against fp64,
    channels_last (NCHW in the next test); 16 splits leave some splits with no step at all (these
    problems have 1-49 steps at the interpreter's tile), whose zero partials must not change the sum.  Two launches: the
    partial kernel with only ``SPLIT_K`` among the epilogue flags, then the epilogue."""
    seen = _spy_kernel(monkeypatch)
    _conv_case_matches_fp64(CONV_CASES[case], dtype, True, split_k=split)
    assert seen == [{"HOISTED": None, "EVEN_K": None, "PROLOGUE_BN": False, "EMIT_STATS": False, "SPLIT_K": True}]


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernel: GPU runs set FUSEDRES_TRITON_SPLITK=1 themselves")
@pytest.mark.parametrize("case", ["3x3", "1x1", "groups4", "asym"])
def test_split_k_nchw_matches_fp64(case):
    _conv_case_matches_fp64(CONV_CASES[case], torch.float32, False, split_k=2)


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernels: GPU runs set the switches themselves")
@pytest.mark.parametrize("split", [3, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES) + list(EVEN_CASES))
def test_split_k_with_hoisted_loop_matches_fp64(case, dtype, split, monkeypatch):
    """Both opt-ins: each split starts the hoisted loop's counters and offsets at its first step
    (5 splits start mid-row of taps, e.g. the dilated 3x3's 9 steps at taps 0, 2, 4, 6, 8; the
    ragged-channel cases mid-tap)."""
    monkeypatch.setattr(tl_launch, "HOISTED_ENABLED", True)
    seen = _spy_kernel(monkeypatch)
    _conv_case_matches_fp64({**CONV_CASES, **EVEN_CASES}[case], dtype, True, split_k=split)
    assert [(s["HOISTED"], s["SPLIT_K"]) for s in seen] == [(True, True)]


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernel: GPU runs set FUSEDRES_TRITON_SPLITK=1 themselves")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["3x3", "1x1"])
def test_split_k_keeps_nan_and_inf(case, dtype):
    """NaN and +-inf inputs: the split sum and the epilogue's ReLU give the reference's NaN/inf pattern."""
    def fill(x):
        x[0, 0, 1, 1] = float("nan")
        x[-1, 1, 2, 2] = float("inf")
        x[-1, 2, 0, 0] = -float("inf")
    _conv_case_matches_fp64(CONV_CASES[case], dtype, True, split_k=3, x_fill=fill)


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernel: GPU runs set FUSEDRES_TRITON_SPLITK=1 themselves")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["3x3", "groups4"])
def test_split_k_bn_stats_epilogue_matches_fp64(case, dtype):
    """The epilogue kernel folds an eval BN's statistics itself (BN_STATS), as the one-pass kernel."""
    n, c, k, h, w, ks, stride, padding, dilation, groups, has_res, relu = CONV_CASES[case]
    x = _rand(n, c, h, w, dtype=dtype, channels_last=True)
    wt = _rand(k, c // groups, ks, ks, dtype=dtype) / math.sqrt(c // groups * ks * ks)
    gamma, beta, mean, var = _bn_params(k, dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    s64, b64 = _fold64(gamma, beta, mean, var, 1e-3)
    oh, ow = fusedres.conv_bn_act(x[:1].double(), wt.double(), s64, b64, backend="torch", **kwargs).shape[2:]
    res = _rand(n, k, oh, ow, dtype=dtype, channels_last=False)
    ref64 = fusedres.conv_bn_act(x.double(), wt.double(), s64, b64, residual=res.double(), backend="torch", **kwargs)
    same = _torch_same_dtype(lambda: fusedres.conv_bn_act(x, wt, gamma, beta, residual=res, running_mean=mean,
                                                           running_var=var, eps=1e-3, backend="torch", **kwargs))
    out = _poisoned((n, k, oh, ow), dtype, True)
    tl_launch.launch(x, tl_launch.kernel_weight(wt), gamma, beta, res, out, (stride,) * 2, (padding,) * 2,
                     (dilation,) * 2, groups, relu, bn_stats=(mean, var, 1e-3), split_k=4)
    _check(out, ref64, same, dtype)


def test_split_k_factor():
    """Splits only when the tiles leave more than half the SMs idle, at most the maximum, at most
    steps // SPLIT_K_MIN_STEPS, and never so many that a program gets no step."""
    f, lo, hi = tl_launch.split_k_factor, tl_launch.SPLIT_K_MIN_STEPS, tl_launch.SPLIT_K_MAX
    assert (lo, hi) == (4, 16)
    assert f(tiles=132, steps=72, sms=132) == 1
    assert f(tiles=100, steps=72, sms=132) == 1  # a second wave would be as ragged
    assert f(tiles=60, steps=72, sms=132) == 2
    # ResNet-50's 7x7 3x3 conv at batch 1: 16 would give 15 shares of 5 steps and an empty one
    assert f(tiles=4, steps=72, sms=132) == 15
    assert f(tiles=4, steps=9, sms=132) == 2
    assert f(tiles=4, steps=lo - 1, sms=132) == 1
    assert f(tiles=1, steps=10 ** 6, sms=132) == hi
    assert f(tiles=0, steps=72, sms=132) == 1 and f(tiles=4, steps=0, sms=132) == 1
    for tiles in range(1, 140):  # no empty split, and never more than asked
        for steps in range(1, 200, 7):
            split = f(tiles=tiles, steps=steps, sms=132)
            per = -(-steps // split)
            assert 1 <= split <= hi and (split - 1) * per < steps


def test_split_k_argument_errors():
    x = _rand(1, 8, 4, 4, dtype=torch.float32, channels_last=True)
    wt = tl_launch.kernel_weight(_rand(8, 8, 1, 1, dtype=torch.float32))
    out = _poisoned((1, 8, 4, 4), torch.float32, True)
    with pytest.raises(ValueError, match="split_k=0"):
        tl_launch.launch(x, wt, *_affine(8), None, out, (1, 1), (0, 0), (1, 1), 1, True, split_k=0)
    with pytest.raises(ValueError, match="split_k=2.*prologue"):  # train mode is never split
        tl_launch._launch(x, wt, *_affine(8), None, out, (1, 1), (0, 0), (1, 1), 1, True, prologue=_affine(8),
                          split_k=2)


# (N, C_mid, C_in, K, H_in, W_in, kernel, stride, padding, dilation, groups, ds_stride, relu): BasicBlock
# tail (3x3 main conv on the already-strided y) and Bottleneck tails (1x1), strided or not; a dilated
# and a grouped 3x3 main conv next to the (ungrouped) downsample GEMM.
TAIL_CASES = {
    "basic-s2": (2, 24, 12, 24, 9, 7, 3, 1, 1, 1, 1, 2, True),
    "bottleneck-s1": (2, 16, 20, 40, 5, 6, 1, 1, 0, 1, 1, 1, True),
    "bottleneck-s2-norelu": (2, 16, 36, 40, 7, 8, 1, 1, 0, 1, 1, 2, False),
    "dilated": (1, 12, 8, 20, 7, 6, 3, 1, 2, 2, 1, 1, True),
    "groups4": (1, 16, 12, 24, 7, 5, 3, 1, 1, 1, 4, 2, True),
}


@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TAIL_CASES))
def test_block_tail_matches_fp64(case, dtype, channels_last, split_k=None):
    n, cm, cin, k, h, w, ks, stride, padding, dilation, groups, ds_stride, relu = TAIL_CASES[case]
    oh, ow = (h - 1) // ds_stride + 1, (w - 1) // ds_stride + 1
    y = _rand(n, cm, oh, ow, dtype=dtype, channels_last=channels_last)
    x = _rand(n, cin, h, w, dtype=dtype, channels_last=channels_last)
    wt = _rand(k, cm // groups, ks, ks, dtype=dtype) / math.sqrt(cm // groups * ks * ks)
    wd = _rand(k, cin, 1, 1, dtype=dtype) / math.sqrt(cin)
    (s, b), (sd, bd) = _affine(k), _affine(k)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, ds_stride=ds_stride, relu=relu)
    ref64 = fusedres.block_tail(y.double(), wt.double(), s.double(), b.double(), x.double(), wd.double(),
                                sd.double(), bd.double(), backend="torch", **kwargs)
    same = _torch_same_dtype(lambda: fusedres.block_tail(y, wt, s, b, x, wd, sd, bd, backend="torch", **kwargs))
    out = _poisoned((n, k, oh, ow), dtype, channels_last)
    tl_launch.launch(y, tl_launch.kernel_weight(wt), s, b, None, out, (stride,) * 2, (padding,) * 2, (dilation,) * 2,
                     groups, relu, ds=(x, tl_launch.kernel_weight(wd), sd, bd, (ds_stride,) * 2), split_k=split_k)
    _check(out, ref64, same, dtype)


def _bn_params(k, dtype):
    """An eval BN's (weight, bias, running_mean, running_var) in ``dtype``, var well away from 0."""
    return (_rand(k, dtype=torch.float32).abs().add(0.5).to(dtype), _rand(k, dtype=dtype),
            _rand(k, dtype=dtype), (torch.rand(k, device=DEVICE) * 2 + 0.1).to(dtype))


def _fold64(gamma, beta, mean, var, eps):
    s = gamma.double() / torch.sqrt(var.double() + eps)
    return s, beta.double() - mean.double() * s


@pytest.mark.parametrize("param_dtype", ["fp32", "input"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["3x3", "groups4", "1x1-s2"])
def test_conv_bn_stats_epilogue_matches_fp64(case, dtype, param_dtype):
    """BN_STATS: the epilogue normalises with the running statistics itself (no host-side fold)."""
    n, c, k, h, w, ks, stride, padding, dilation, groups, has_res, relu = CONV_CASES[case]
    x = _rand(n, c, h, w, dtype=dtype, channels_last=True)
    wt = _rand(k, c // groups, ks, ks, dtype=dtype) / math.sqrt(c // groups * ks * ks)
    gamma, beta, mean, var = _bn_params(k, torch.float32 if param_dtype == "fp32" else dtype)
    eps = 1e-3
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    s64, b64 = _fold64(gamma, beta, mean, var, eps)
    oh, ow = fusedres.conv_bn_act(x[:1].double(), wt.double(), s64, b64, backend="torch", **kwargs).shape[2:]
    res = _rand(n, k, oh, ow, dtype=dtype, channels_last=True) if has_res else None
    ref64 = fusedres.conv_bn_act(x.double(), wt.double(), s64, b64, residual=None if res is None else res.double(),
                                 backend="torch", **kwargs)
    same = _torch_same_dtype(lambda: fusedres.conv_bn_act(x, wt, gamma, beta, residual=res, running_mean=mean,
                                                           running_var=var, eps=eps, backend="torch", **kwargs))
    p = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    out = _poisoned((n, k, oh, ow), dtype, True)
    tl_launch.launch(x, tl_launch.kernel_weight(wt), gamma, beta, res, out, p(stride), p(padding), p(dilation),
                     groups, relu, bn_stats=(mean, var, eps))
    _check(out, ref64, same, dtype)
    # The public op routes the statistics to the kernel and gives the same result.
    via_api = fusedres.conv_bn_act(x, wt, gamma, beta, residual=res, running_mean=mean, running_var=var, eps=eps,
                                   backend="triton", **kwargs)
    torch.testing.assert_close(via_api, out, rtol=0, atol=0)


@pytest.mark.parametrize("split_k", [None, 4], ids=["one-pass", "split4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["basic-s2", "bottleneck-s2-norelu"])
def test_block_tail_bn_stats_epilogue_matches_fp64(case, dtype, split_k):
    """Both branches' eval BN statistics (their own eps) folded in the epilogue; ``split4``: by the
    opt-in split-K epilogue kernel."""
    n, cm, cin, k, h, w, ks, stride, padding, _, _, ds_stride, relu = TAIL_CASES[case]
    oh, ow = (h - 1) // ds_stride + 1, (w - 1) // ds_stride + 1
    y = _rand(n, cm, oh, ow, dtype=dtype, channels_last=True)
    x = _rand(n, cin, h, w, dtype=dtype, channels_last=True)
    wt = _rand(k, cm, ks, ks, dtype=dtype) / math.sqrt(cm * ks * ks)
    wd = _rand(k, cin, 1, 1, dtype=dtype) / math.sqrt(cin)
    bn, ds_bn = _bn_params(k, dtype), _bn_params(k, torch.float32)
    (s64, b64), (sd64, bd64) = _fold64(*bn, 1e-5), _fold64(*ds_bn, 1e-3)
    kwargs = dict(stride=stride, padding=padding, ds_stride=ds_stride, relu=relu)
    ref64 = fusedres.block_tail(y.double(), wt.double(), s64, b64, x.double(), wd.double(), sd64, bd64,
                                backend="torch", **kwargs)
    stats = dict(running_mean=bn[2], running_var=bn[3], eps=1e-5, ds_running_mean=ds_bn[2],
                 ds_running_var=ds_bn[3], ds_eps=1e-3)
    same = _torch_same_dtype(lambda: fusedres.block_tail(y, wt, bn[0], bn[1], x, wd, ds_bn[0], ds_bn[1],
                                                         backend="torch", **stats, **kwargs))
    out = _poisoned((n, k, oh, ow), dtype, True)
    tl_launch.launch(y, tl_launch.kernel_weight(wt), bn[0], bn[1], None, out, (stride,) * 2, (padding,) * 2, (1, 1),
                     1, relu, ds=(x, tl_launch.kernel_weight(wd), ds_bn[0], ds_bn[1], (ds_stride,) * 2),
                     bn_stats=(bn[2], bn[3], 1e-5, ds_bn[2], ds_bn[3], 1e-3), split_k=split_k)
    _check(out, ref64, same, dtype)
    if split_k is not None:
        return
    # The public op routes both branches' statistics to the kernel and gives the same result.
    via_api = fusedres.block_tail(y, wt, bn[0], bn[1], x, wd, ds_bn[0], ds_bn[1], backend="triton", **stats, **kwargs)
    torch.testing.assert_close(via_api, out, rtol=0, atol=0)


def test_bn_stats_with_autograd_fold_on_the_host():
    """With a gradient needed the statistics are folded by differentiable torch ops, not the kernel."""
    x = _rand(2, 8, 5, 5, dtype=torch.float32, channels_last=True)
    wt = (_rand(12, 8, 3, 3, dtype=torch.float32) / 8).requires_grad_()
    gamma, beta, mean, var = _bn_params(12, torch.float32)
    gamma.requires_grad_()
    out = fusedres.conv_bn_act(x, wt, gamma, beta, padding=1, running_mean=mean, running_var=var, eps=1e-5,
                               backend="triton")
    out.sum().backward()
    wt2, g2 = wt.detach().clone().requires_grad_(), gamma.detach().clone().requires_grad_()
    s, b = fusedres.functional.fold_stats(g2, beta, (mean, var, 1e-5))
    fusedres.conv_bn_act(x, wt2, s, b, padding=1, backend="torch").sum().backward()
    torch.testing.assert_close(wt.grad, wt2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gamma.grad, g2.grad, rtol=1e-4, atol=1e-4)


def test_bn_stats_requiring_grad_fold_on_the_host():
    """Running statistics that require grad (torch.func, meta-learning) get their gradient.

    Only the statistics require grad here: they must still count as "a gradient is needed",
    else the kernel folds them and the gradient is silently lost (the output did not even
    require grad).
    """
    x = _rand(2, 8, 5, 5, dtype=torch.float32, channels_last=True)
    wt = _rand(12, 8, 3, 3, dtype=torch.float32) / 8
    gamma, beta, mean, var = _bn_params(12, torch.float32)
    mean.requires_grad_()
    var.requires_grad_()
    out = fusedres.conv_bn_act(x, wt, gamma, beta, padding=1, running_mean=mean, running_var=var, eps=1e-5,
                               backend="triton")
    assert out.requires_grad
    out.square().sum().backward()
    m2, v2 = mean.detach().clone().requires_grad_(), var.detach().clone().requires_grad_()
    s, b = fusedres.functional.fold_stats(gamma, beta, (m2, v2, 1e-5))
    fusedres.conv_bn_act(x, wt, s, b, padding=1, backend="torch").square().sum().backward()
    torch.testing.assert_close(mean.grad, m2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.grad, v2.grad, rtol=1e-4, atol=1e-4)

    # Block tail: only the downsample branch's statistics require grad.
    y = _rand(2, 8, 3, 3, dtype=torch.float32, channels_last=True)
    xd = _rand(2, 4, 5, 5, dtype=torch.float32, channels_last=True)
    w2, wd = _rand(12, 8, 3, 3, dtype=torch.float32) / 8, _rand(12, 4, 1, 1, dtype=torch.float32) / 2
    bn, ds_bn = _bn_params(12, torch.float32), _bn_params(12, torch.float32)
    ds_mean = ds_bn[2].clone().requires_grad_()
    out = fusedres.block_tail(y, w2, bn[0], bn[1], xd, wd, ds_bn[0], ds_bn[1], padding=1, ds_stride=2,
                              running_mean=bn[2], running_var=bn[3], ds_running_mean=ds_mean,
                              ds_running_var=ds_bn[3], backend="triton")
    assert out.requires_grad
    out.sum().backward()
    dm2 = ds_bn[2].clone().requires_grad_()
    s, b = fusedres.functional.fold_stats(bn[0], bn[1], (bn[2], bn[3], 1e-5))
    sd, bd = fusedres.functional.fold_stats(ds_bn[0], ds_bn[1], (dm2, ds_bn[3], 1e-5))
    fusedres.block_tail(y, w2, s, b, xd, wd, sd, bd, padding=1, ds_stride=2, backend="torch").sum().backward()
    torch.testing.assert_close(ds_mean.grad, dm2.grad, rtol=1e-4, atol=1e-4)


def test_strided_affine_vectors():
    """scale/shift and the BN statistics as strided 1-D views (columns of a 2-D tensor).

    The kernel reads them at unit stride, so the launcher must hand it contiguous copies;
    reading the views' storage directly mixed up channels.
    """
    x = _rand(2, 8, 5, 5, dtype=torch.float32, channels_last=True)
    wt = _rand(12, 8, 3, 3, dtype=torch.float32) / 8
    cols = [torch.stack([v, torch.full_like(v, 1e3)], 1)[:, 0] for v in _bn_params(12, torch.float32)]
    assert not cols[0].is_contiguous()
    stats = dict(running_mean=cols[2], running_var=cols[3], eps=1e-5)
    for kw in ({}, stats):
        ref = fusedres.conv_bn_act(x, wt, cols[0], cols[1], padding=1, backend="torch", **kw)
        out = fusedres.conv_bn_act(x, wt, cols[0], cols[1], padding=1, backend="triton", **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    y = _rand(2, 8, 3, 3, dtype=torch.float32, channels_last=True)
    xd = _rand(2, 4, 5, 5, dtype=torch.float32, channels_last=True)
    wd = _rand(12, 4, 1, 1, dtype=torch.float32) / 2
    ds_stats = {f"ds_{k}": v for k, v in stats.items()}
    for kw in ({}, {**stats, **ds_stats}):
        args = (y, wt, cols[0], cols[1], xd, wd, cols[1].abs(), cols[0])
        ref = fusedres.block_tail(*args, padding=1, ds_stride=2, backend="torch", **kw)
        out = fusedres.block_tail(*args, padding=1, ds_stride=2, backend="triton", **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bn_stats_argument_errors_name_the_argument():
    x = _rand(1, 8, 4, 4, dtype=torch.float32)
    wt = _rand(8, 8, 1, 1, dtype=torch.float32)
    s, b = _affine(8)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        fusedres.conv_bn_act(x, wt, s, b, running_mean=b, backend="triton")
    with pytest.raises(ValueError, match="running_var must have 8 elements"):
        fusedres.conv_bn_act(x, wt, s, b, running_mean=b, running_var=s[:4], backend="triton")
    with pytest.raises(ValueError, match="ds_eps must be a non-negative number"):
        fusedres.block_tail(x, wt, s, b, x, wt, s, b, ds_running_mean=b, ds_running_var=s, ds_eps=-1.0)


@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
def test_public_op_keeps_memory_format_and_dtype_affine(channels_last):
    """Through fusedres.conv_bn_act: torch's output layout, and scale/shift in the input dtype."""
    dtype = torch.bfloat16
    x = _rand(2, 16, 6, 6, dtype=dtype, channels_last=channels_last)
    wt = _rand(24, 16, 3, 3, dtype=dtype) / 12
    scale, shift = _affine(24, dtype)
    out = fusedres.conv_bn_act(x, wt, scale, shift, padding=1, backend="triton")
    ref = torch.nn.functional.conv2d(x, wt, padding=1)
    assert out.stride() == ref.stride()
    ref64 = fusedres.conv_bn_act(x.double(), wt.double(), scale.double(), shift.double(), padding=1, backend="torch")
    _check(out, ref64, None, dtype)


def test_weight_cache_follows_in_place_updates():
    x = _rand(1, 8, 5, 5, dtype=torch.float32, channels_last=True)
    wt = _rand(16, 8, 3, 3, dtype=torch.float32)
    scale, shift = _affine(16)
    first = fusedres.conv_bn_act(x, wt, scale, shift, padding=1, relu=False, backend="triton")
    with torch.no_grad():
        wt.mul_(-1.0)  # bumps the version counter: the cached re-layout must be rebuilt
    second = fusedres.conv_bn_act(x, wt, scale, shift, padding=1, relu=False, backend="triton")
    torch.testing.assert_close(second - shift.view(1, -1, 1, 1), -(first - shift.view(1, -1, 1, 1)))


def test_autograd_matches_reference():
    def run(backend):
        torch.manual_seed(1)
        leaf = lambda *s: torch.randn(*s, device=DEVICE, requires_grad=True)  # noqa: E731
        x, w, s, b, r = leaf(2, 8, 6, 5), leaf(12, 8, 3, 3), leaf(12), leaf(12), leaf(2, 12, 3, 3)
        y, xd, wd, sd, bd = leaf(2, 8, 3, 3), leaf(2, 6, 6, 5), leaf(12, 6, 1, 1), leaf(12), leaf(12)
        o1 = fusedres.conv_bn_act(x, w, s, b, stride=2, padding=1, residual=r, backend=backend)
        o2 = fusedres.block_tail(y, w, s, b, xd, wd, sd, bd, padding=1, ds_stride=2, backend=backend)
        (o1.square().sum() + o2.sin().sum()).backward()
        return [o1, o2] + [t.grad for t in (x, w, s, b, r, y, xd, wd, sd, bd)]

    for ours, ref in zip(run("triton"), run("torch")):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def _opcheck_args(requires_grad):
    x = _rand(2, 8, 5, 5, dtype=torch.float32, channels_last=True).requires_grad_(requires_grad)
    w = (_rand(16, 8, 3, 3, dtype=torch.float32) / 8).requires_grad_(requires_grad)
    s, b = _affine(16)
    return x, w, s, b


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_conv_bn_act(requires_grad):
    x, w, s, b = _opcheck_args(requires_grad)
    r = _rand(2, 16, 3, 3, dtype=torch.float32).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fusedres.conv_bn_act_triton.default,
                          (x, w, s, b, r, None, None, 0.0, [2, 2], [1, 1], [1, 1], 1, True))
    w_grouped = w[:, :4].detach().clone().requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fusedres.conv_bn_act_triton.default,
                          (x, w_grouped, s, b, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 2, False))
    if not requires_grad:  # running statistics are an inference-only input (see ops.py)
        mean, var = _affine(16)[1], _affine(16)[0]
        torch.library.opcheck(torch.ops.fusedres.conv_bn_act_triton.default,
                              (x, w, s, b, r, mean, var, 1e-5, [2, 2], [1, 1], [1, 1], 1, True))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_block_tail(requires_grad):
    y, w, s, b = _opcheck_args(requires_grad)
    x = _rand(2, 6, 10, 9, dtype=torch.float32).requires_grad_(requires_grad)
    wd = (_rand(16, 6, 1, 1, dtype=torch.float32) / 3).requires_grad_(requires_grad)
    sd, bd = _affine(16)
    torch.library.opcheck(torch.ops.fusedres.block_tail_triton.default,
                          (y, w, s, b, x, wd, sd, bd, None, None, 0.0, None, None, 0.0,
                           [1, 1], [1, 1], [1, 1], 1, [2, 2], True))
    if not requires_grad:
        torch.library.opcheck(torch.ops.fusedres.block_tail_triton.default,
                              (y, w, s, b, x, wd, sd, bd, bd, sd, 1e-5, b, s, 1e-3,
                               [1, 1], [1, 1], [1, 1], 1, [2, 2], True))


def test_forward_ad_and_func_transforms_are_refused_not_dropped(monkeypatch):
    """The triton ops' autograd is backward-only: a dual tensor's tangent was dropped (None, a silent
    zero ``torch.func.jvp``) and ``torch.func.grad`` failed inside torch.  Asked for by name the
    backend now refuses such calls clearly; ``auto`` takes the reference (on CUDA it had picked triton,
    the cuda backend declining any differentiable call)."""
    import torch.autograd.forward_ad as fwAD

    x, tx = _rand(1, 4, 6, 6, dtype=torch.float32), _rand(1, 4, 6, 6, dtype=torch.float32)
    wt = _rand(8, 4, 3, 3, dtype=torch.float32) * 0.3
    scale, shift = _affine(8)

    def f(backend):
        return lambda xx: fusedres.conv_bn_act(xx, wt, scale, shift, padding=1, backend=backend)

    refused = pytest.raises(fusedres.BackendUnavailableError, match="forward-mode AD or a torch.func transform")
    with refused:
        torch.func.jvp(f("triton"), (x,), (tx,))
    with refused:
        torch.func.grad(lambda xx: f("triton")(xx).sum())(x)
    with refused, fwAD.dual_level():
        f("triton")(fwAD.make_dual(x, tx))
    y = _rand(1, 4, 3, 3, dtype=torch.float32)
    with refused, fwAD.dual_level():
        fusedres.block_tail(fwAD.make_dual(y, torch.randn_like(y)), wt, scale, shift, x, wt[:, :, :1, :1], scale,
                            shift, padding=1, ds_stride=2, backend="triton")
    _, want = torch.func.jvp(f("torch"), (x,), (tx,))
    monkeypatch.setattr(backends, "_warned", set())  # the fallback warns once per process and reason
    with pytest.warns(RuntimeWarning, match="falls back"):
        _, got = torch.func.jvp(f("auto"), (x,), (tx,))
    torch.testing.assert_close(got, want)
    # plain autograd is not refused (the ops' backward is registered)
    xg = x.clone().requires_grad_()
    f("triton")(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.func.grad(lambda xx: f("torch")(xx).sum())(x))
    spec = backends.ConvSpec(device_type="cuda", dtype=torch.bfloat16, in_channels=64, out_channels=64,
                             kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True,
                             has_residual=False, channels_last=True, requires_grad=True, transform=True, batch=1,
                             input_size=(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's one-time warning
        assert backends.select("auto", spec).NAME == "torch"


# case: (op, argument index, bad value, the error's text)
_BAD_OP_ARGS = {
    "scale": ("conv", 2, lambda a: a["s"][:4], r"scale must be a \(16,\) tensor"),
    "residual": ("conv", 4, lambda a: a["r"][:, :, :2], r"residual must be a \(2, 16, 3, 3\)"),
    "weight": ("conv", 1, lambda a: a["w"][:, :4], r"weight \(16, 4, 3, 3\) with groups=1 does not fit x's 8 channels"),
    "mean": ("conv", 5, lambda a: a["s"], "mean and var must be given together"),
    "dtype": ("conv", 1, lambda a: a["w"].double(), "x and weight must be 4-D fp16, bf16 or fp32 tensors of one dtype"),
    "dilation": ("conv", 10, lambda a: [1, 0], "invalid stride"),
    "ds_scale": ("tail", 6, lambda a: a["s"][:4], r"ds_scale must be a \(16,\) tensor"),
    "ds_input": ("tail", 4, lambda a: a["xd"][:, :, :3], "the downsample branch"),
    "ds_stride": ("tail", 18, lambda a: [0, 2], "invalid ds_stride"),
}


@pytest.mark.parametrize("case", list(_BAD_OP_ARGS))
def test_ops_check_their_arguments(case):
    """Called directly (as compiled graphs call them) the ops reject bad operands, naming them,
    eagerly (ValueError) and in their fake implementations (torch._check); they used to read
    past the end of a 4-element scale or a too small residual."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, s, b = _opcheck_args(False)
    a = dict(s=s, w=w, r=_rand(2, 16, 3, 3, dtype=torch.float32), xd=_rand(2, 6, 5, 5, dtype=torch.float32))
    wd = _rand(16, 6, 1, 1, dtype=torch.float32)
    conv = [x, w, s, b, a["r"], None, None, 0.0, [2, 2], [1, 1], [1, 1], 1, True]
    tail = [x[:, :, :3, :3], w, s, b, a["xd"], wd, *_affine(16), None, None, 0.0, None, None, 0.0,
            [1, 1], [1, 1], [1, 1], 1, [2, 2], True]
    which, index, value, needle = _BAD_OP_ARGS[case]
    op, args = {"conv": (torch.ops.fusedres.conv_bn_act_triton, conv),
                "tail": (torch.ops.fusedres.block_tail_triton, tail)}[which]
    args[index] = value(a)
    with pytest.raises(ValueError, match=needle):
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        with pytest.raises(RuntimeError, match=needle):
            op(*fake)


def test_train_op_checks_its_arguments():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, _, _ = _opcheck_args(False)
    op = torch.ops.fusedres.conv_train_fwd_triton
    geom = ([1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"weight \(16, 8, 3, 3\) with groups=2 does not fit"):
        op(x, w, None, None, [1, 1], [1, 1], [1, 1], 2)
    with pytest.raises(ValueError, match="in_scale must be an fp32 \\(8,\\)"):
        op(x, w, torch.ones(4, device=DEVICE), torch.ones(8, device=DEVICE), *geom)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        with pytest.raises(RuntimeError, match=r"in_scale must be a \(8,\) tensor of torch.float32"):
            op(fx, fw, mode.from_tensor(torch.ones(4, device=DEVICE)), mode.from_tensor(torch.ones(8, device=DEVICE)),
               *geom)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("kind", ["basic", "bottleneck-groups"])
def test_converted_block_matches_torchvision(kind):
    if kind == "basic":
        ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), _bn(16))
        block = tv.BasicBlock(8, 16, stride=2, downsample=ds)
        block.bn1, block.bn2 = _bn(16), _bn(16)
    else:  # ResNeXt-style: 3x3 grouped conv, 1x1 tail with a stride-2 downsample
        ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), _bn(32))
        block = tv.Bottleneck(16, 8, stride=2, downsample=ds, groups=4, base_width=32)  # width 16
        block.bn1, block.bn2, block.bn3 = _bn(16), _bn(16), _bn(32)
        assert block.conv2.groups == 4 and block.conv2.in_channels == 16
    block = block.to(DEVICE).eval()
    x = _rand(2, block.conv1.in_channels, 9, 8, dtype=torch.float32, channels_last=True)
    with torch.no_grad():
        ref = block(x)
        fusedres.convert(block, backend="triton")
        out = block(x)
    assert type(block).__module__ == "fusedres.modules"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_unsupported_reasons_are_explicit():
    mod = backends.get("triton")
    x = torch.empty(1, 4, 3, 3, device=DEVICE, dtype=torch.float64)
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        fusedres.conv_bn_act(x, torch.empty(4, 4, 1, 1, device=DEVICE, dtype=torch.float64),
                             torch.ones(4, device=DEVICE, dtype=torch.float64),
                             torch.zeros(4, device=DEVICE, dtype=torch.float64), backend="triton")
    from fusedres.backends import ConvSpec

    spec = ConvSpec("meta", torch.float32, 4, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, False, True, False,
                    batch=1, input_size=(3, 3))
    assert "meta" in mod.unsupported_reason(spec)


_PRECISION_SCRIPT = """
import sys
import torch
import fusedres
from fusedres.backends.triton import launch

exec(sys.argv[1])
got = launch.dot_precision(torch.float32)
assert got == sys.argv[2], f"dot_precision(float32) is {got!r}, expected {sys.argv[2]!r}"
assert launch.dot_precision(torch.bfloat16) == "tf32"
dev = "cuda" if torch.cuda.is_available() else "cpu"
x, w = torch.randn(2, 8, 5, 5, device=dev), torch.randn(12, 8, 3, 3, device=dev) / 8
s, b = torch.rand(12, device=dev) + 0.5, torch.randn(12, device=dev)
out = fusedres.conv_bn_act(x, w, s, b, padding=1, backend="triton")
ref = fusedres.conv_bn_act(x.double(), w.double(), s.double(), b.double(), padding=1, backend="torch")
torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
"""


@pytest.mark.parametrize("setting, expected", [
    ("", "tf32"),
    ("torch.backends.cudnn.allow_tf32 = False", "ieee"),
    ("torch.backends.cudnn.conv.fp32_precision = 'ieee'", "ieee"),
    ("torch.backends.cudnn.conv.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.cudnn.fp32_precision = 'ieee'", "ieee"),
    ("torch.backends.fp32_precision = 'ieee'", "ieee"),
    ("torch.backends.fp32_precision = 'tf32'; torch.backends.cudnn.conv.fp32_precision = 'none'", "tf32"),
], ids=["default", "legacy-off", "conv-ieee", "conv-tf32", "cudnn-ieee", "generic-ieee", "conv-inherits"])
def test_dot_precision_follows_torch_tf32_settings(setting, expected):
    """fp32 convs take TF32 exactly when PyTorch's cuDNN convs would, under either API.

    Once the new ``fp32_precision`` API is used, reading the legacy ``cudnn.allow_tf32``
    raises, which used to fail every fp32 Triton conv.  The settings are process-global,
    hence a subprocess per case.
    """
    if setting and not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("this PyTorch has no fp32_precision API")
    proc = subprocess.run([sys.executable, "-c", _PRECISION_SCRIPT, setting, expected], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_prune_configs_respects_shared_memory_and_problem_size():
    sm80 = 163 * 1024
    kept = tl_launch.prune_configs(tl_launch.GPU_CONFIGS, M=64 * 56 * 56, CG=64, KG=64, CD=0,
                                   elem_size=4, smem_limit=sm80)
    assert kept and all(c.smem_bytes(4) <= sm80 and c.block_n <= 64 for c in kept)
    # Undersized tiles go where bigger ones fit: no 16/32-wide N or 16-deep K tile on a 64-channel layer.
    assert all(c.block_n == 64 and c.block_k >= 32 and c.block_m >= 64 for c in kept)
    # ... but the stem's 3 input channels keep their 16-deep K tiles, and IEEE fp32 keeps its FMA tiles.
    stem = tl_launch.prune_configs(tl_launch.GPU_CONFIGS, M=64 * 112 * 112, CG=3, KG=64, CD=0,
                                   elem_size=2, smem_limit=sm80)
    assert stem and all(c.block_k == 16 for c in stem)
    fma = tl_launch.prune_configs(tl_launch.FMA_CONFIGS, M=64 * 56 * 56, CG=64, KG=64, CD=0,
                                  elem_size=4, smem_limit=sm80, fma=True)
    assert len(fma) > 1 and all(c.block_k == 16 for c in fma)
    tiny = tl_launch.prune_configs(tl_launch.GPU_CONFIGS, M=8, CG=3, KG=4, CD=0, elem_size=2, smem_limit=sm80)
    assert [(c.block_m, c.block_n, c.block_k) for c in tiny] == [(32, 16, 16)]


def test_torch_compile_fullgraph_converted_block():
    """Dynamo traces a converted block into one graph holding the two custom ops."""
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), _bn(16))
    block = tv.BasicBlock(8, 16, stride=2, downsample=ds)
    block.bn1, block.bn2 = _bn(16), _bn(16)
    block = fusedres.convert(block.to(DEVICE).eval(), backend="triton")
    x = _rand(2, 8, 7, 6, dtype=torch.float32, channels_last=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=record)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("conv_bn_act_triton" in t for t in targets) == 1
    assert sum("block_tail_triton" in t for t in targets) == 1


def test_autotuner_early_prune_maps_configs(monkeypatch):
    """The autotuner hook sees Triton Configs and the launch's arguments; check its selection."""
    monkeypatch.setattr(tl_launch, "_max_shared_mem", lambda device: 227 * 1024)
    configs = tl_launch._autotuned_kernel.configs
    x = torch.empty(1, dtype=torch.bfloat16)
    args = dict(x_ptr=x, M=64 * 28 * 28, CG=128, KG=128, CD=256, soc=1, src=1, HAS_RESIDUAL=True)
    tc_kept = tl_launch._early_prune(configs, args, HAS_DOWNSAMPLE=True, PROLOGUE_BN=False, DOT_PRECISION="tf32")
    fma_kept = tl_launch._early_prune(configs, args, HAS_DOWNSAMPLE=False, PROLOGUE_BN=False, DOT_PRECISION="ieee")
    pro_kept = tl_launch._early_prune(configs, args, HAS_DOWNSAMPLE=False, PROLOGUE_BN=True, DOT_PRECISION="tf32")
    as_tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)  # noqa: E731
                           for c in cs}
    assert as_tiles(tc_kept) and all(m * n // (32 * w) <= tl_launch.DS_ACC_REGS for m, n, _, w in as_tiles(tc_kept))
    assert as_tiles(fma_kept) == {(c.block_m, c.block_n, c.block_k, c.num_warps) for c in tl_launch.FMA_CONFIGS}
    excluded = {(c.block_m, c.block_n, c.block_k, c.num_warps) for c in tl_launch.PROLOGUE_EXCLUDED}
    assert as_tiles(pro_kept) and not as_tiles(pro_kept) & excluded
    # The opt-in hoisted loop with the BN prologue also drops the tile that spilled there (sm_80, Triton 3.6).
    hoisted_kept = as_tiles(tl_launch._early_prune(configs, args, HAS_DOWNSAMPLE=False, PROLOGUE_BN=True,
                                                   DOT_PRECISION="tf32", HOISTED=True))
    spilled = {(c.block_m, c.block_n, c.block_k, c.num_warps) for c in tl_launch.HOISTED_PROLOGUE_EXCLUDED}
    assert spilled <= as_tiles(pro_kept) and hoisted_kept == as_tiles(pro_kept) - spilled
    # An NCHW output or residual (rows contiguous) keeps only the tiles that did not spill there.
    for strides in (dict(soc=28 * 28, src=1), dict(soc=1, src=28 * 28)):
        nchw_kept = as_tiles(tl_launch._early_prune(
            configs, {**args, **strides}, HAS_DOWNSAMPLE=False, PROLOGUE_BN=False, DOT_PRECISION="tf32"))
        assert nchw_kept and all(m <= tl_launch.M_CONTIG_BLOCK_M and m * n // (32 * w) <= tl_launch.M_CONTIG_ACC_REGS
                                 for m, n, _, w in nchw_kept)
        assert nchw_kept < as_tiles(tl_launch._early_prune(configs, args, HAS_DOWNSAMPLE=False, PROLOGUE_BN=False,
                                                           DOT_PRECISION="tf32"))


def test_direct_eager_path_equals_registered_op():
    """Eager inference skips the dispatcher; it must compute exactly what the op computes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mod = backends.get("triton")
    x = _rand(2, 8, 6, 5, dtype=torch.bfloat16, channels_last=True)
    w = nn.Parameter(_rand(16, 8, 3, 3, dtype=torch.bfloat16) / 8, requires_grad=False)
    s, b = _affine(16)
    spec = backends.ConvSpec(
        device_type=x.device.type, dtype=x.dtype, in_channels=8, out_channels=16, kernel_size=(3, 3),
        stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True, has_residual=False, channels_last=True,
        requires_grad=False, batch=2, input_size=(6, 5), dispatch=False,
    )
    assert not backends.needs_dispatch(False, (x, w, s, b, None))
    with FakeTensorMode() as fake_mode:
        assert backends.needs_dispatch(False, (fake_mode.from_tensor(x), w, s, b, None))
    direct = mod.conv_bn_act(x, w, s, b, None, spec)
    via_op = torch.ops.fusedres.conv_bn_act_triton(x, w, s, b, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1,
                                                   True)
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)


def test_autotune_key_buckets_rows_to_powers_of_two():
    """Tuned tiles are keyed on M rounded up to a power of two (a new batch size in the bucket
    reuses the tile); that is sound only if pruning sees nothing finer than the bucket."""
    assert "M_BUCKET" in tl_launch._AUTOTUNE_KEY and "M" not in tl_launch._AUTOTUNE_KEY
    kw = dict(CG=64, KG=64, CD=0, elem_size=2, smem_limit=227 * 1024)
    for precision in ("tf32", "ieee"):
        for m in (1, 17, 33, 100, 1000, 4097, 7 * 56 * 56, 64 * 56 * 56):
            bucket = tl_launch._pow2_at_least(m, 32)
            assert m <= bucket and (bucket == 32 or bucket < 2 * m)
            base = tl_launch.base_configs(precision)
            same = lambda mm: tl_launch.prune_configs(base, M=mm, fma=precision == "ieee", **kw)  # noqa: E731
            assert same(m) == same(bucket), (precision, m)


def test_shipped_tile_table_round_trip(tmp_path, monkeypatch):
    """Tuned tiles are written per arch under a process-independent key, read back for the same
    problem, and ignored when no longer among the problem's candidates."""
    key = (4096, 56, 56, 56, 56, 64, 64, 0, 1, 1, 1, 0, (1, 1), (1, 1), (1, 1), (1, 1), 3, 3, True, False,
           False, True, False, False, True, "tf32", False, torch.bfloat16, torch.float32, torch.float32,
           torch.float32, 0, True)
    tile = tl_launch.TileConfig(128, 64, 64, 3, 8)
    monkeypatch.setattr(tl_launch, "_tile_cache", {key: tile, key[:-1] + (False,): tl_launch.TileConfig(64, 64, 64, 4, 4)})
    path = tmp_path / "tiles.json"
    assert tl_launch.dump_tiles(str(path), "sm90") == 1  # the untuned entry (autotune off) is not recorded
    text = tl_launch.table_key(key)
    assert "bfloat16" in text and "torch." not in text and not text.endswith("|0|True")
    monkeypatch.setattr(tl_launch, "TILES_FILE", str(path))
    monkeypatch.setattr(tl_launch, "_shipped", {})
    assert tl_launch.shipped_tile("sm90", key, [tl_launch.TileConfig(64, 64, 64, 4, 4), tile]) == tile
    assert tl_launch.shipped_tile("sm90", key, [tl_launch.TileConfig(64, 64, 64, 4, 4)]) is None  # not a candidate any more
    assert tl_launch.shipped_tile("sm80", key, [tile]) is None  # another arch
    assert tl_launch.load_tiles(str(tmp_path / "missing.json")) == {}


# --------------------------------------------------------------------------- TMA 1x1 kernel (opt-in)


def _tma_case(n, c, k, h, w, dtype, mode):
    """Operands of a 1x1 conv for the TMA kernel (channels_last; ``mode`` names the epilogue parts:
    ``bn`` eval statistics, ``res`` a residual, ``relu``) and a checker of an output against float64
    and torch in ``dtype`` (``_check``)."""
    x = _rand(n, c, h, w, dtype=dtype, channels_last=True)
    wt = _rand(k, c, 1, 1, dtype=dtype) / math.sqrt(c)
    scale, shift = _affine(k)
    stats = (torch.rand(k, device=DEVICE) * 0.2, torch.rand(k, device=DEVICE) + 0.5, 1e-5) if "bn" in mode else None
    res = _rand(n, k, h, w, dtype=dtype, channels_last=True) if "res" in mode else None
    relu = "relu" in mode
    kw = {} if stats is None else dict(running_mean=stats[0], running_var=stats[1], eps=stats[2])

    def check(out):
        ref64 = fusedres.conv_bn_act(x.double(), wt.double(), scale.double(), shift.double(), relu=relu,
                                     residual=None if res is None else res.double(), backend="torch",
                                     **{a: (b.double() if torch.is_tensor(b) else b) for a, b in kw.items()})
        same = _torch_same_dtype(lambda: fusedres.conv_bn_act(x, wt, scale, shift, residual=res, relu=relu,
                                                               backend="torch", **kw))
        _check(out, ref64, same, dtype)

    return (x, tl_launch.kernel_weight(wt), scale, shift, res, relu, stats), check


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["affine", "bn+res+relu", "res", "bn"])
def test_tma_1x1_matches_fp64(dtype, mode, monkeypatch):
    """The opt-in TMA GEMM kernel of 1x1 convs (FUSEDRES_TRITON_TMA=1): ragged rows and channels
    (the descriptors' out-of-bounds zero fill), every epilogue variant, against float64."""
    used = []
    monkeypatch.setattr(tl_launch, "TMA_ENABLED", True)
    real = tl_launch._launch_tma
    monkeypatch.setattr(tl_launch, "_launch_tma", lambda *a, **k: used.append(1) or real(*a, **k))
    n, c, k, h, w = 2, 40, 24, 5, 7  # M = 70 rows: ragged against every tile
    (x, wt, scale, shift, res, relu, stats), check = _tma_case(n, c, k, h, w, dtype, mode)
    out = _poisoned((n, k, h, w), dtype, True)
    tl_launch.launch(x, wt, scale, shift, res, out, (1, 1), (0, 0), (1, 1), 1, relu, bn_stats=stats)
    assert used == [1]
    check(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["affine", "bn+res+relu"])
@pytest.mark.parametrize("c,group_m,sms", [(40, 8, 3), (136, 1, 5), (136, 8, 1)], ids=["k1-g8-p3", "k3-g1-p5", "k3-g8-p1"])
def test_tma_1x1_persistent_equals_one_tile_per_program(dtype, mode, c, group_m, sms, monkeypatch):
    """The persistent TMA kernel (FUSEDRES_TRITON_PERSISTENT=1): ``sms`` programs loop over the
    6 ragged tiles of a 126 x 136 GEMM (2 x 3 tiles of 64x64; one program takes all of them, 3
    programs 2 each, 5 programs 2/1/1/1/1) over ``c`` input channels (one reduction step, or three
    with a ragged last one: the flattened loop's tile boundaries fall inside the reduction), in
    groups of ``group_m`` row tiles (1: the programs cross group boundaries), and give exactly the
    one-tile-per-program kernel's output, which is also checked against float64."""
    monkeypatch.setattr(tl_launch, "TMA_ENABLED", True)
    monkeypatch.setattr(tl_launch, "PERSISTENT_PROGRAMS", sms)
    launched = []
    kernel = tl_launch._conv1x1_tma_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                launched.append((grid, kw["NUM_SMS"]))
                return kernel[grid](*args, **kw)
            return run

    monkeypatch.setattr(tl_launch, "_conv1x1_tma_fwd_kernel", Spy())
    n, k, h, w = 2, 136, 9, 7  # M = 126 rows, 136 channels: ragged against 64x64 tiles
    (x, wt, scale, shift, res, relu, stats), check = _tma_case(n, c, k, h, w, dtype, mode)
    outs = []
    for persistent in (False, True):
        monkeypatch.setattr(tl_launch, "PERSISTENT_ENABLED", persistent)
        out = _poisoned((n, k, h, w), dtype, True)
        tl_launch.launch(x, wt, scale, shift, res, out, (1, 1), (0, 0), (1, 1), 1, relu, bn_stats=stats,
                         config=tl_launch.TileConfig(64, 64, 64, 3, 4, group_m=group_m))
        outs.append(out)
    assert launched == [((6,), 0), ((sms,), sms)]
    assert torch.equal(outs[0], outs[1])
    check(outs[1])


def test_tma_persistent_programs_rule(monkeypatch):
    """One program per SM, for the 128x128 tile only (the 128x64 one fits two CTAs per SM, which
    overlap each other already), and only with more tiles than SMs."""
    monkeypatch.setattr(tl_launch, "PERSISTENT_ENABLED", True)
    monkeypatch.setattr(tl_launch, "interpreting", lambda: False)
    monkeypatch.setattr(tl_launch, "_sm90_sm_count", lambda device: 132)
    big, small = tl_launch.TileConfig(128, 128, 64, 3, 8), tl_launch.TileConfig(128, 64, 64, 3, 8)
    assert tl_launch._persistent_programs(400, big, None) == 132
    assert tl_launch._persistent_programs(132, big, None) == 0
    assert tl_launch._persistent_programs(400, small, None) == 0
    monkeypatch.setattr(tl_launch, "PERSISTENT_ENABLED", False)
    assert tl_launch._persistent_programs(400, big, None) == 0


def test_tma_persistent_only_with_more_tiles_than_sms(monkeypatch):
    """With no more tiles than SMs the persistent launch would be the same schedule: one tile each."""
    monkeypatch.setattr(tl_launch, "TMA_ENABLED", True)
    monkeypatch.setattr(tl_launch, "PERSISTENT_ENABLED", True)
    monkeypatch.setattr(tl_launch, "PERSISTENT_PROGRAMS", 6)  # the 6 tiles of this 126 x 136 GEMM
    grids = []
    kernel = tl_launch._conv1x1_tma_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tl_launch, "_conv1x1_tma_fwd_kernel", Spy())
    x = _rand(2, 40, 9, 7, dtype=torch.bfloat16, channels_last=True)
    wt = tl_launch.kernel_weight(_rand(136, 40, 1, 1, dtype=torch.bfloat16))
    out = _poisoned((2, 136, 9, 7), torch.bfloat16, True)
    scale, shift = _affine(136)
    tl_launch.launch(x, wt, scale, shift, None, out, (1, 1), (0, 0), (1, 1), 1, True,
                     config=tl_launch.TileConfig(64, 64, 64, 3, 4))
    assert grids == [(6,)]


def test_tma_declines_what_it_cannot_compute(monkeypatch):
    monkeypatch.setattr(tl_launch, "TMA_ENABLED", True)
    x = _rand(2, 16, 5, 5, dtype=torch.bfloat16, channels_last=True)
    w1 = tl_launch.kernel_weight(_rand(8, 16, 1, 1, dtype=torch.bfloat16))
    out = torch.empty(2, 8, 5, 5, dtype=torch.bfloat16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    args = (x, w1, None, out, (1, 1), (0, 0), (1, 1), 1)
    assert tl_launch.tma_eligible(*args)
    assert not tl_launch.tma_eligible(x, w1, None, out, (2, 2), (0, 0), (1, 1), 1)  # strided
    assert not tl_launch.tma_eligible(x.contiguous(), w1, None, out, (1, 1), (0, 0), (1, 1), 1)  # NCHW input
    assert not tl_launch.tma_eligible(x.float(), w1, None, out, (1, 1), (0, 0), (1, 1), 1)  # fp32
    w3 = tl_launch.kernel_weight(_rand(8, 16, 3, 3, dtype=torch.bfloat16))
    assert not tl_launch.tma_eligible(x, w3, None, out, (1, 1), (0, 0), (1, 1), 1)  # 3x3
    x12 = _rand(2, 12, 5, 5, dtype=torch.bfloat16, channels_last=True)
    w12 = tl_launch.kernel_weight(_rand(8, 12, 1, 1, dtype=torch.bfloat16))
    assert not tl_launch.tma_eligible(x12, w12, None, out, (1, 1), (0, 0), (1, 1), 1)  # 12 channels: rows not 16 B


def test_model_trunk_plan_on_triton():
    """A converted model's one plan for its stem and stages (``fusedres.modules.run_trunk``) serves
    the ``triton`` eval route too: the second call runs through it and matches torchvision (through
    the interpreter without a GPU; on a GPU, the kernels themselves)."""
    import copy

    from fusedres import plan

    torch.manual_seed(0)
    ref = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10).to(DEVICE).eval()
    fused = fusedres.convert(copy.deepcopy(ref), backend="triton")
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    with torch.no_grad(), backends.record() as used:
        first = fused(x)
        assert [p.route for k, p in plan._PLANS[fused].items() if k[0] == "trunk"] == ["trunk"]
        second = fused(x)  # through the trunk plan
        want = ref(x)
    assert used == {"triton"}
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernel: GPU runs set FUSEDRES_TRITON_SPLITK=1 themselves")
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("split", [2, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(TAIL_CASES))
def test_split_k_block_tail_matches_fp64(case, dtype, split, channels_last, monkeypatch):
    """The block tail split: the main and the downsample GEMM's steps as one range shared out (2 and
    3 splits put a share across the two GEMMs; 16 leaves empty shares), both sums and affines in the
    epilogue kernel."""
    seen = _spy_kernel(monkeypatch)
    test_block_tail_matches_fp64(case, dtype, channels_last, split_k=split)
    assert [s["SPLIT_K"] for s in seen] == [True]


@pytest.mark.skipif(DEVICE != "cpu", reason="opt-in kernels: GPU runs set the switches themselves")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(TAIL_CASES))
def test_split_k_block_tail_with_hoisted_loop_matches_fp64(case, dtype, monkeypatch):
    monkeypatch.setattr(tl_launch, "HOISTED_ENABLED", True)
    seen = _spy_kernel(monkeypatch)
    test_block_tail_matches_fp64(case, dtype, True, split_k=3)
    assert [(s["HOISTED"], s["SPLIT_K"]) for s in seen] == [(True, True)]

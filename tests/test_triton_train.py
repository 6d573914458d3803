"""Train-mode flags of the Triton conv kernel: ``EMIT_STATS`` and ``PROLOGUE_BN``.

``launch.conv_train_fwd`` computes ``z = conv2d(a, w)`` with ``a = relu(x*in_scale + in_shift)``
(applied in the operand load) or ``a = x``, plus the batch mean / biased variance of ``z`` from
the kernel's per-tile partials.  References: ``a`` from the torch BN-apply
(``fusedres.training.ops.bn_act`` on the CPU: fp32 math, rounded once to the dtype, exactly what
the kernel feeds its dot), then a float64 conv and ``torch.var_mean`` in float64.

Without a GPU the ``cpu`` cases run through the interpreter (its fixed 32x16x16 tile, so the
small problems below have ragged row and channel tiles); the ``cuda`` cases run on a GPU.
Outputs are NaN-poisoned first, so a row or channel the kernel skips fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from fusedres.backends.triton import launch as L  # noqa: E402
from fusedres.training import ops as train_ops  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpret),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# ||z - ref|| / ||ref||: fp32 is IEEE (TF32 off below); bf16 is dominated by the output rounding.
REL_BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# (N, C_in, H, W, C_out, k, stride, padding, groups): M = N*OH*OW is never a multiple of the
# tile rows, C_out / groups never of the tile columns.
CASES = {
    "3x3-pad-groups": (2, 12, 9, 7, 20, 3, 1, 1, 2),
    "1x1-stride2": (3, 8, 7, 5, 24, 1, 2, 0, 1),
    "3x3-stride2-pad": (1, 5, 11, 11, 6, 3, 2, 1, 1),
}


pytestmark = pytest.mark.usefixtures("ieee_fp32")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(case, dtype, device, channels_last, x_offset=0.0, x_spread=1.0, w_positive=False, seed=0):
    n, c, h, w, k, ks, stride, pad, groups = CASES[case]
    x = (torch.randn(n, c, h, w, generator=_gen(seed)) * x_spread + x_offset).to(dtype)
    wt = torch.rand if w_positive else torch.randn
    weight = (wt(k, c // groups, ks, ks, generator=_gen(seed + 1)) * 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    oh = (h + 2 * pad - ks) // stride + 1
    ow = (w + 2 * pad - ks) // stride + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.full((n, k, oh, ow), float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    geom = ((stride, stride), (pad, pad), (1, 1), groups)
    return x.to(device), weight.to(device), out.to(device), geom


def _run(x, weight, out, geom, in_scale=None, in_shift=None):
    stride, padding, dilation, groups = geom
    return L.conv_train_fwd(x, L.kernel_weight(weight), out, stride, padding, dilation, groups, in_scale, in_shift)


def _reference(x, weight, geom, in_scale=None, in_shift=None):
    """fp64 conv of the operand the kernel multiplies, and fp64 ``(mean, biased var)`` of it."""
    a = x.cpu()
    if in_scale is not None:
        a = train_ops.bn_act(a, in_scale.cpu(), in_shift.cpu(), relu=True)  # torch path on CPU
    stride, padding, dilation, groups = geom
    z = F.conv2d(a.double(), weight.cpu().double(), None, stride, padding, dilation, groups)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    return z, mean, var


def _check(z, mean, var, ref, dtype, var_rtol=1e-4):
    z_ref, mean_ref, var_ref = ref
    assert z.dtype == dtype and not z.isnan().any()
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (z.shape[1],)
    rel = (z.cpu().double() - z_ref).norm() / z_ref.norm()
    assert rel <= REL_BOUND[dtype], rel
    # The statistics come from the fp32 accumulator (not the rounded z): fp32-accurate in all dtypes.
    std = var_ref.sqrt()
    assert ((mean.cpu().double() - mean_ref).abs() <= 1e-5 * (mean_ref.abs() + std) + 1e-7).all()
    torch.testing.assert_close(var.cpu().double(), var_ref, rtol=var_rtol, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", list(CASES))
def test_emit_stats_matches_fp64(device, dtype, channels_last, case):
    x, weight, out, geom = _problem(case, dtype, device, channels_last)
    z, mean, var = _run(x, weight, out, geom)
    assert z is out and z.stride() == out.stride()
    _check(z, mean, var, _reference(x, weight, geom), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_emit_stats_large_mean_small_spread(device, channels_last):
    # |mean| / std of z is about 1e4: fp32 E[z^2] - E[z]^2 would return noise (z^2 ~ 100 has an
    # ulp of ~1e-5, the variance is ~1e-7); per-tile centred M2 + Chan's merge must not.
    x, weight, out, geom = _problem(
        "3x3-pad-groups", torch.float32, device, channels_last, x_offset=3.0, x_spread=1e-3, w_positive=True
    )
    pad_free = (geom[0], (0, 0), geom[2], geom[3])  # no padded border: the spread stays tiny
    out = out[..., 1:-1, 1:-1].clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref = _reference(x, weight, pad_free)
    assert (ref[1].abs() / ref[2].sqrt()).min() > 1e3  # the regime this test is about
    z, mean, var = _run(x, weight, out, pad_free)
    _check(z, mean, var, ref, torch.float32, var_rtol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", list(CASES))
def test_prologue_bn_relu_matches_fp64(device, dtype, channels_last, case):
    # Large positive shifts: relu(0 * scale + shift) = shift != 0, so a kernel that pads the raw
    # input (instead of the normalized activation) gets every border pixel wrong.  A few channels
    # get a large negative shift (all-zero after the ReLU).
    x, weight, out, geom = _problem(case, dtype, device, channels_last)
    c = x.shape[1]
    in_scale = (torch.rand(c, generator=_gen(7)) + 0.5).to(device)
    in_shift = (torch.randn(c, generator=_gen(8)) + 4.0).to(device)
    in_shift[::3] = -6.0
    z, mean, var = _run(x, weight, out, geom, in_scale, in_shift)
    ref = _reference(x, weight, geom, in_scale, in_shift)
    _check(z, mean, var, ref, dtype)
    if geom[1] != (0, 0):  # the classic bug (pad, then normalize) differs from the reference at the border
        xp = F.pad(x.cpu().float(), [geom[1][1]] * 2 + [geom[1][0]] * 2)
        wrong = F.conv2d(torch.relu(xp * in_scale.cpu().view(1, -1, 1, 1) + in_shift.cpu().view(1, -1, 1, 1)),
                         weight.cpu().float(), None, geom[0], 0, geom[2], geom[3])
        assert (wrong.double() - ref[0]).abs().max() > 1.0


@pytest.mark.interpret
@pytest.mark.parametrize("case", list(CASES) + ["3x3-even"])
def test_hoisted_main_loop_train_flags(case, monkeypatch):
    """The opt-in hoisted main loop (FUSEDRES_TRITON_HOISTED=1, 16-bit operands) with the BN
    prologue and the statistics epilogue, through the interpreter, channels_last (EVEN_K: 64
    channels per group)."""
    if torch.cuda.is_available():
        pytest.skip("opt-in kernel: GPU runs set FUSEDRES_TRITON_HOISTED=1 themselves")
    monkeypatch.setattr(L, "HOISTED_ENABLED", True)
    monkeypatch.setitem(CASES, "3x3-even", (1, 64, 5, 6, 20, 3, 1, 1, 1))
    dtype = torch.bfloat16
    x, weight, out, geom = _problem(case, dtype, "cpu", True)
    c = x.shape[1]
    in_scale = torch.rand(c, generator=_gen(7)) + 0.5
    in_shift = torch.randn(c, generator=_gen(8)) + 4.0
    in_shift[::3] = -6.0
    z, mean, var = _run(x, weight, out, geom, in_scale, in_shift)
    _check(z, mean, var, _reference(x, weight, geom, in_scale, in_shift), dtype)


def test_conv_train_fwd_rejects_bad_prologue_arguments():
    x, weight, out, geom = _problem("1x1-stride2", torch.float32, "cpu", False)
    c = x.shape[1]
    with pytest.raises(ValueError, match="in_scale and in_shift"):
        _run(x, weight, out, geom, torch.ones(c), None)
    with pytest.raises(ValueError, match="in_shift must be an fp32"):
        _run(x, weight, out, geom, torch.ones(c), torch.ones(c + 1))


def test_merge_stats_is_chan_combination():
    """The host merge on hand-made partials: tiles of 4 rows, the last one ragged (2 rows)."""
    g = _gen(3)
    z = torch.randn(10, 3, generator=g, dtype=torch.float64) * 0.01 + 100.0
    tiles = torch.split(z, 4)
    psum = torch.stack([t.sum(0) for t in tiles]).float()
    pm2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles]).float()
    mean, var = L.merge_stats(psum, pm2, 10, 4)
    var_ref, mean_ref = torch.var_mean(z, dim=0, correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_train_fwd_op_opcheck(device):
    x, weight, _, geom = _problem("3x3-pad-groups", torch.float32, device, True)
    c = x.shape[1]
    stride, padding, dilation, groups = geom
    args = (x, weight, torch.rand(c, device=device) + 0.5, torch.randn(c, device=device),
            list(stride), list(padding), list(dilation), groups)
    z, mean, var = torch.ops.fusedres.conv_train_fwd_triton(*args)
    assert z.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fusedres.conv_train_fwd_triton.default, args)

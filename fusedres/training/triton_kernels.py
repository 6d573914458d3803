"""Triton kernels for train-mode BatchNorm: batch statistics, BN-apply (+residual) + ReLU, and
the two passes of the BN/ReLU/residual backward.

Every kernel sees an activation ``(N, C, H, W)`` as a matrix ``[M = N*H*W, C]`` addressed
through its strides ``(s_n, s_c, s_hw)``, so NCHW and channels_last tensors take the same code
(``s_hw`` is 1 for NCHW and ``C`` for channels_last).  A program owns a
``[BLOCK_M, BLOCK_C]`` tile; offsets are int64 so tensors above 2**31 elements are safe.
Everything accumulates in fp32.

Reductions (statistics and backward sums) write one row of per-channel partials per program
along ``M``; the host adds the ``P`` rows (a tiny ``[P, C]`` second pass), so no atomics and a
deterministic result.  The statistics are *shifted* sums ``sum(z - k_c)`` and
``sum((z - k_c)**2)`` with ``k_c`` one sample of channel ``c``: with the shift near the mean
the variance ``E[(z-k)^2] - E[z-k]^2`` does not cancel catastrophically even when
``|mean| >> std``.

These are standalone passes.  In the training chain's forward the statistics and the
BN-apply + ReLU between two convs are fused into the conv kernel of ``fusedres/backends/triton``
(``EMIT_STATS`` / ``PROLOGUE_BN``, via ``ops.conv_stats``), so there ``bn_act`` only serves the
block tail and backward's recomputation; ``channel_stats`` (``ops.batch_stats``) remains the
statistics pass for a tensor that did not come out of that kernel (the chain no longer calls it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["channel_stats", "bn_act", "bn_bwd_reduce", "bn_bwd_apply", "mc_strides"]

# Tile sizes: 64 channels x 64 rows keeps 2 fp32 accumulators at 32 registers/thread with 4 warps.
_BLOCK_M = 64
_BLOCK_C = 64
# Rows of M each reduction program covers (a multiple of _BLOCK_M): enough work per program to
# amortise the partial-row store, few enough programs that the [P, C] pass stays tiny.
_ROWS_PER_PROG = 2048


def mc_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """``(s_n, s_c, s_hw)`` of a 4-D tensor whose H and W dims flatten into one (NCHW or channels_last)."""
    s_n, s_c, s_h, s_w = t.stride()
    if t.shape[2] > 1 and t.shape[3] > 1 and s_h != t.shape[3] * s_w:
        raise ValueError(
            f"tensor of shape {tuple(t.shape)} and strides {t.stride()} is neither NCHW nor "
            "channels_last contiguous; call .contiguous() first"
        )
    return s_n, s_c, (s_w if t.shape[3] > 1 else s_h)


@triton.jit
def _tile_offsets(m0, pid_c, M, C, HW, s_n, s_c, s_hw, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    ms = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n = ms // HW
    hw = ms % HW
    off = n[:, None] * s_n + hw[:, None] * s_hw + cs[None, :].to(tl.int64) * s_c
    mask = (ms < M)[:, None] & (cs < C)[None, :]
    return off, mask


@triton.jit
def _channel_stats_kernel(
    z_ptr, pivot_ptr, psum_ptr, psq_ptr,
    M, C, HW, s_n, s_c, s_hw, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partials ``psum[p, c] = sum(z - k_c)`` and ``psq[p, c] = sum((z - k_c)^2)`` over rows ``p*R .. (p+1)*R``."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pivot = tl.load(pivot_ptr + cs, mask=cs < C, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    start = pid_m * rows_per_prog
    for m0 in range(start, start + rows_per_prog, BLOCK_M):
        off, mask = _tile_offsets(m0, pid_c, M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        v = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - pivot[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    out = pid_m.to(tl.int64) * C + cs
    tl.store(psum_ptr + out, tl.sum(acc1, axis=0), mask=cs < C)
    tl.store(psq_ptr + out, tl.sum(acc2, axis=0), mask=cs < C)


@triton.jit
def _bn_act_kernel(
    z_ptr, scale_ptr, shift_ptr, r_ptr, zd_ptr, dscale_ptr, dshift_ptr, out_ptr,
    M, C, HW,
    zs_n, zs_c, zs_hw, rs_n, rs_c, rs_hw, ds_n, ds_c, ds_hw, os_n, os_c, os_hw,
    HAS_RES: tl.constexpr, HAS_DS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = act(z*scale[c] + shift[c] (+ r) (+ zd*dscale[c] + dshift[c]))``, computed in fp32."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    off, mask = _tile_offsets(m0, pid_c, M, C, HW, zs_n, zs_c, zs_hw, BLOCK_M, BLOCK_C)
    scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RES:
        roff, _ = _tile_offsets(m0, pid_c, M, C, HW, rs_n, rs_c, rs_hw, BLOCK_M, BLOCK_C)
        acc += tl.load(r_ptr + roff, mask=mask, other=0.0).to(tl.float32)
    if HAS_DS:
        doff, _ = _tile_offsets(m0, pid_c, M, C, HW, ds_n, ds_c, ds_hw, BLOCK_M, BLOCK_C)
        dscale = tl.load(dscale_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        dshift = tl.load(dshift_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        zd = tl.load(zd_ptr + doff, mask=mask, other=0.0).to(tl.float32)
        acc += zd * dscale[None, :] + dshift[None, :]
    if RELU:  # NaN stays NaN, as in torch.relu (a plain max would return 0)
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    ooff, _ = _tile_offsets(m0, pid_c, M, C, HW, os_n, os_c, os_hw, BLOCK_M, BLOCK_C)
    tl.store(out_ptr + ooff, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(
    g_ptr, y_ptr, z_ptr, mean_ptr, psg_ptr, psgx_ptr,
    M, C, HW, gs_n, gs_c, gs_hw, ys_n, ys_c, ys_hw, zs_n, zs_c, zs_hw, rows_per_prog,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partials of ``sum(gp)`` and ``sum(gp * (z - mean[c]))`` with ``gp = g * (y > 0)`` (or ``g``)."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + cs, mask=cs < C, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    start = pid_m * rows_per_prog
    for m0 in range(start, start + rows_per_prog, BLOCK_M):
        goff, mask = _tile_offsets(m0, pid_c, M, C, HW, gs_n, gs_c, gs_hw, BLOCK_M, BLOCK_C)
        zoff, _ = _tile_offsets(m0, pid_c, M, C, HW, zs_n, zs_c, zs_hw, BLOCK_M, BLOCK_C)
        gp = tl.load(g_ptr + goff, mask=mask, other=0.0).to(tl.float32)
        if HAS_MASK:
            yoff, _ = _tile_offsets(m0, pid_c, M, C, HW, ys_n, ys_c, ys_hw, BLOCK_M, BLOCK_C)
            y = tl.load(y_ptr + yoff, mask=mask, other=0.0).to(tl.float32)
            # A multiply, not tl.where: tl.where here crashes Triton 3.8's sm_90 compiler (fp32).
            gp = gp * (y > 0.0).to(tl.float32)
        z = tl.load(z_ptr + zoff, mask=mask, other=0.0).to(tl.float32)
        acc1 += gp
        acc2 += gp * tl.where(mask, z - mean[None, :], 0.0)
    out = pid_m.to(tl.int64) * C + cs
    tl.store(psg_ptr + out, tl.sum(acc1, axis=0), mask=cs < C)
    tl.store(psgx_ptr + out, tl.sum(acc2, axis=0), mask=cs < C)


@triton.jit
def _bn_bwd_apply_kernel(
    g_ptr, y_ptr, z_ptr, mean_ptr, a_ptr, b_ptr, c_ptr, gz_ptr, gp_ptr,
    M, C, HW,
    gs_n, gs_c, gs_hw, ys_n, ys_c, ys_hw, zs_n, zs_c, zs_hw, os_n, os_c, os_hw, ps_n, ps_c, ps_hw,
    HAS_MASK: tl.constexpr, WRITE_GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``gz = a[c]*gp + b[c]*(z - mean[c]) + c[c]`` with ``gp = g * (y > 0)``; optionally also stores ``gp``."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    goff, mask = _tile_offsets(m0, pid_c, M, C, HW, gs_n, gs_c, gs_hw, BLOCK_M, BLOCK_C)
    zoff, _ = _tile_offsets(m0, pid_c, M, C, HW, zs_n, zs_c, zs_hw, BLOCK_M, BLOCK_C)
    gp = tl.load(g_ptr + goff, mask=mask, other=0.0).to(tl.float32)
    if HAS_MASK:
        yoff, _ = _tile_offsets(m0, pid_c, M, C, HW, ys_n, ys_c, ys_hw, BLOCK_M, BLOCK_C)
        y = tl.load(y_ptr + yoff, mask=mask, other=0.0).to(tl.float32)
        gp = gp * (y > 0.0).to(tl.float32)  # same mask arithmetic as the reduction kernel
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + zoff, mask=mask, other=0.0).to(tl.float32)
    gz = a[None, :] * gp + b[None, :] * (z - mean[None, :]) + c[None, :]
    ooff, _ = _tile_offsets(m0, pid_c, M, C, HW, os_n, os_c, os_hw, BLOCK_M, BLOCK_C)
    tl.store(gz_ptr + ooff, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    if WRITE_GP:
        poff, _ = _tile_offsets(m0, pid_c, M, C, HW, ps_n, ps_c, ps_hw, BLOCK_M, BLOCK_C)
        tl.store(gp_ptr + poff, gp.to(gp_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host launchers


def _mchw(t: torch.Tensor) -> tuple[int, int, int]:
    n, c, h, w = t.shape
    return n * h * w, c, h * w


def _reduce_grid(M: int, C: int) -> tuple[int, int]:
    return triton.cdiv(C, _BLOCK_C), max(1, triton.cdiv(M, _ROWS_PER_PROG))


def channel_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased per-channel ``(mean, var)`` of ``z`` ``(N, C, H, W)`` over ``N, H, W``, both fp32 ``(C,)``."""
    M, C, HW = _mchw(z)
    pivot = z[0, :, 0, 0].float().contiguous()
    grid = _reduce_grid(M, C)
    psum = torch.empty((grid[1], C), device=z.device, dtype=torch.float32)
    psq = torch.empty_like(psum)
    _channel_stats_kernel[grid](
        z, pivot, psum, psq, M, C, HW, *mc_strides(z), _ROWS_PER_PROG,
        BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C,
    )
    s1 = psum.sum(0) / M
    var = (psq.sum(0) / M - s1 * s1).clamp_min_(0.0)
    return pivot + s1, var


def bn_act(z, scale, shift, residual=None, zd=None, dscale=None, dshift=None, *, relu: bool):
    """``act(z*scale + shift (+ residual) (+ zd*dscale + dshift))`` in ``z``'s dtype and memory format."""
    M, C, HW = _mchw(z)
    out = torch.empty_like(z)
    r = residual if residual is not None else z
    d = zd if zd is not None else z
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(C, _BLOCK_C))
    _bn_act_kernel[grid](
        z, scale, shift, r, d,
        dscale if dscale is not None else scale, dshift if dshift is not None else shift, out,
        M, C, HW, *mc_strides(z), *mc_strides(r), *mc_strides(d), *mc_strides(out),
        HAS_RES=residual is not None, HAS_DS=zd is not None, RELU=relu,
        BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C,
    )
    return out


def bn_bwd_reduce(g, y, z, mean):
    """Per-channel fp32 ``(sum(gp), sum(gp * (z - mean)))`` with ``gp = g * (y > 0)`` (``y=None``: ``gp = g``)."""
    M, C, HW = _mchw(z)
    grid = _reduce_grid(M, C)
    psg = torch.empty((grid[1], C), device=z.device, dtype=torch.float32)
    psgx = torch.empty_like(psg)
    yy = y if y is not None else g
    _bn_bwd_reduce_kernel[grid](
        g, yy, z, mean, psg, psgx, M, C, HW,
        *mc_strides(g), *mc_strides(yy), *mc_strides(z), _ROWS_PER_PROG,
        HAS_MASK=y is not None, BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C,
    )
    return psg.sum(0), psgx.sum(0)


def bn_bwd_apply(g, y, z, mean, a, b, c, *, write_gp: bool):
    """``gz = a*gp + b*(z - mean) + c`` (``z``'s dtype and format) and, if ``write_gp``, ``gp`` itself."""
    M, C, HW = _mchw(z)
    gz = torch.empty_like(z)
    gp = torch.empty_like(g) if write_gp else gz
    yy = y if y is not None else g
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(C, _BLOCK_C))
    _bn_bwd_apply_kernel[grid](
        g, yy, z, mean, a, b, c, gz, gp, M, C, HW,
        *mc_strides(g), *mc_strides(yy), *mc_strides(z), *mc_strides(gz), *mc_strides(gp),
        HAS_MASK=y is not None, WRITE_GP=write_gp, BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C,
    )
    return gz, (gp if write_gp else None)

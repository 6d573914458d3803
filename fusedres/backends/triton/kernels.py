"""Triton implicit-GEMM convolution with a fused BatchNorm/residual/downsample/ReLU epilogue.

The math, for one output element ``out[n, k, oh, ow]`` of a conv with ``G`` groups,
``Cg = C_in / G`` input and ``Kg = C_out / G`` output channels per group, ``g = k // Kg``::

    acc  = sum_{kh, kw, c < Cg} x[n, g*Cg + c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw] * w[k, c, kh, kw]
    z    = acc * scale[k] + shift[k]
           (BN_STATS: z = (acc - mean[k]) * scale[k] / sqrt(var[k] + eps) + shift[k], i.e.
            scale/shift are an eval BatchNorm's weight/bias, folded here in the epilogue)
    z   += residual[n, k, oh, ow]                                   (HAS_RESIDUAL)
    z   += (sum_{c < C_d} xd[n, c, oh*dsh, ow*dsw] * wd[k, c]) * ds_scale[k] + ds_shift[k]
                                                                    (HAS_DOWNSAMPLE; with
           BN_STATS its own ds_mean/ds_var/ds_eps normalise it the same way)
    out  = relu(z) if RELU else z          (NaN-propagating, as torch.relu)

(taps that fall into the zero padding contribute nothing).  Two train-mode flags change this:

* ``PROLOGUE_BN``: the operand is ``relu(x * in_scale[c] + in_shift[c])`` instead of ``x``,
  applied per input channel to each gathered ``A`` tile in fp32 and rounded to the operand
  dtype before ``tl.dot``, so the previous BN-apply + ReLU never reaches memory.  Padded
  taps are 0 *after* the affine: the zero padding pads the normalized activation.
* ``EMIT_STATS``: ``out = acc`` (the raw, pre-BN conv output; scale/shift, residual,
  downsample and ReLU must be off) and each program writes, for its ``BLOCK_M`` rows and
  ``BLOCK_N`` channels, the fp32 per-channel ``sum(acc)`` and ``M2 = sum((acc - tile_mean)^2)``
  of its valid rows to row ``pid_m`` of two ``[cdiv(M, BLOCK_M), C_out]`` workspaces.  The
  statistics come from the fp32 accumulator, before the output is rounded.  Centring on the
  tile mean keeps ``M2`` free of cancellation; the host merges tiles exactly with Chan's
  parallel formula (``launch.merge_stats``).

As a GEMM this is
``(M x Kred) @ (Kred x Kg)`` per group with ``M = N * OH * OW`` output pixels (rows),
``Kg`` output channels (columns) and ``Kred = KH * KW * Cg`` reduction terms; the ``A``
operand is never materialised (no im2col): each ``BLOCK_M x BLOCK_K`` tile is gathered
straight from ``x`` for one filter tap ``(kh, kw)`` and one block of ``BLOCK_K`` input
channels.  The downsample branch is a second, plain GEMM ``(M x C_d) @ (C_d x Kg)`` over
the block input in the same program, so the block tail is one launch and no intermediate
tensor ever reaches global memory.  Accumulation is fp32; the epilogue runs on the fp32
accumulator and rounds once, on the store.

Tiling and register pressure
----------------------------
A program owns one ``BLOCK_M x BLOCK_N`` output tile of one group: an fp32 accumulator of
``BLOCK_M * BLOCK_N / (32 * num_warps)`` registers per thread (64 at 128x128 with 8 warps,
128 with the downsample accumulator too), plus the pipelined ``A``/``B`` tiles, which
live in shared memory (``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * elem_size`` bytes).
The per-row decomposition ``m -> (n, oh, ow)`` and the row base addresses are computed
once, before the reduction loop; inside it a tap only shifts the row addresses by a
scalar and re-derives a ``BLOCK_M`` boolean vector for the padding border (skipped at
compile time when ``PADDED`` is false: with zero padding every tap of a valid output
pixel lies inside ``x``, e.g. all 1x1 convs).  The loop is a
single flat loop over ``KH * KW * ceil(Cg / BLOCK_K)`` steps (not three nested loops) so
that Triton's software pipeliner sees every step, even when ``Cg`` fits in one
``BLOCK_K`` block (ResNet's 64-channel layers would otherwise give a one-trip inner loop).

Layouts
-------
Every tensor is addressed through its strides, so NCHW and channels_last inputs,
residuals and outputs all work without copies.  channels_last is the fast path: the
channel stride is then 1 (Triton specialises integer arguments equal to 1), so the ``A``
tile's ``BLOCK_K`` channels are contiguous and load as 16-byte vectors, as do the
output's ``BLOCK_N`` channels on the store.  The weight is expected as
``(KH, KW, Cg, C_out)`` contiguous (output channel fastest), which makes the ``B`` tile
load contiguous too; the host re-arranges it once and caches it.

``DOT_UPCAST`` feeds ``tl.dot`` fp32 copies of bf16 tiles.  Only the host's interpreter
path sets it: the Triton interpreter keeps bf16 as raw 16-bit integers in numpy and its
``dot`` multiplies those bit patterns.  Products of bf16 values are exact in fp32, so the
upcast computes what the bf16 tensor-core MMA computes (fp32 accumulation).  The
interpreter's fp32 -> bf16 cast also truncates, so under ``DOT_UPCAST`` the ``PROLOGUE_BN``
operand is rounded to nearest even on its bits instead.

Offsets that scale with the batch (``n * stride_n`` and the spatial terms) are computed in
int64 once per row, so tensors beyond 2**31 elements are addressed correctly; per-tile
channel offsets stay int32.  The weight is limited to < 2**31 elements (checked on the host).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _affine(scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, k, k_ok, BN_STATS: tl.constexpr):
    """Per-channel fp32 ``(scale, shift)`` for channels ``k``: as given, or folded from BN statistics.

    With ``BN_STATS`` the pointers hold an eval BatchNorm's weight, bias, running mean and
    running variance: ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``,
    computed here in fp32 so the host launches nothing for the fold.
    """
    scale = tl.load(scale_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if BN_STATS:
        mean = tl.load(mean_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + k, mask=k_ok, other=1.0).to(tl.float32)
        # rsqrt, as torch.rsqrt in the reference fold: the IEEE-rounded div_rn/sqrt_rn pair
        # cost sm_90 up to 40 B of register spills in the 3x3 fp32 block tail (aot report),
        # for nothing visible after the output's rounding.
        scale = scale * tl.math.rsqrt(var + eps)
        shift = shift - mean * scale
    return scale, shift


@triton.jit
def _prologue_bn(a, a_mask, in_scale_ptr, in_shift_ptr, c, c_ok, x_ptr, DOT_UPCAST: tl.constexpr):
    """``relu(a * in_scale[c] + in_shift[c])`` (``PROLOGUE_BN``) in fp32, rounded to the operand dtype
    as the materialised activation would be; masked taps (padding, ragged rows/channels) are forced
    to 0 after the affine, since ``relu(shift)`` need not be 0."""
    in_scale = tl.load(in_scale_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    in_shift = tl.load(in_shift_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    a_bn = tl.maximum(a.to(tl.float32) * in_scale[None, :] + in_shift[None, :], 0.0,
                      propagate_nan=tl.PropagateNan.ALL)
    a_bn = tl.where(a_mask, a_bn, 0.0)
    if DOT_UPCAST:
        # Interpreter only: its fp32 -> bf16 cast truncates.  Round to nearest even on the bits,
        # as the GPU cast does, and stay fp32 (the dot upcasts anyway).
        bits = a_bn.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return a_bn.to(x_ptr.dtype.element_ty)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped ("L2-swizzled") order: GROUP_M consecutive
    row tiles sweep all column tiles together, so their A rows and the whole B slice stay
    L2-resident."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % num_in_group) % group_rows, (pid % num_in_group) // group_rows


@triton.jit
def _conv_bn_act_fwd_kernel(
    # tensors
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    xd_ptr, wd_ptr, ds_scale_ptr, ds_shift_ptr,
    in_scale_ptr, in_shift_ptr, stat_sum_ptr, stat_m2_ptr,
    mean_ptr, var_ptr, ds_mean_ptr, ds_var_ptr, eps, ds_eps,
    # problem size (M = N * OH * OW rows; CG/KG channels per group; CD downsample channels);
    # M_BUCKET, M rounded up to a power of two, is not read: the autotuner keys on it
    M, M_BUCKET, H, W, OH, OW, CG, KG, CD,
    # strides, in elements
    sxn, sxc, sxh, sxw,
    swh, sww, swc, swk,
    srn, src, srh, srw,
    son, soc, soh, sow,
    sdn, sdc, sdh, sdw,
    swdc, swdk,
    # conv geometry
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, ds_sh, ds_sw,
    # compile-time specialisation
    KH: tl.constexpr, KW: tl.constexpr, PADDED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_DOWNSAMPLE: tl.constexpr, RELU: tl.constexpr,
    PROLOGUE_BN: tl.constexpr, EMIT_STATS: tl.constexpr, BN_STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HOISTED: tl.constexpr = False, EVEN_K: tl.constexpr = False, SPLIT_K: tl.constexpr = False,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``out`` for group ``program_id(1)``; see the module docstring.

    ``SPLIT_K`` (opt-in, eval only: no residual, ReLU, BN, prologue or statistics flag is read):
    program ``program_id(2)`` of ``num_programs(2)`` runs its contiguous share of the reduction
    steps and stores its raw fp32 partial tile to ``stat_sum_ptr``, a row-major
    ``[num_programs(2), M, C_out]`` workspace (with ``HAS_DOWNSAMPLE`` also its share of the
    downsample GEMM, into slices ``[num_programs(2), 2 * num_programs(2))``);
    :func:`_split_k_epilogue_kernel` then sums the partials in split order and applies the epilogue.
    """
    g = tl.program_id(1)
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, KG, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < KG
    k_out = g * KG + offs_n  # global output channel of each column

    # Row decomposition m -> (n, oh, ow), once per program.
    ohw = OH * OW
    nb = offs_m // ohw
    rem = offs_m - nb * ohw
    oh = rem // OW
    ow = rem - oh * OW
    nb64 = nb.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    ih0 = oh * conv_sh - pad_h
    iw0 = ow * conv_sw - pad_w
    # Row base of x for tap (0, 0), channel g*CG; int64 because n * sxn grows with the batch.
    x_row = nb64 * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw + (g * CG).to(tl.int64) * sxc
    w_col = k_out * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(CG, BLOCK_K)
    if SPLIT_K:
        # This program's contiguous share [lo, hi) of all the reduction steps: the main GEMM's
        # KH * KW * c_blocks, then (HAS_DOWNSAMPLE) the downsample GEMM's ceil(CD / BLOCK_K), so the
        # programs get equal work whatever the two lengths; [s_lo, s_hi) is its part of the main loop.
        n_main = KH * KW * c_blocks
        n_all = n_main
        if HAS_DOWNSAMPLE:
            n_all = n_main + tl.cdiv(CD, BLOCK_K)
        per = tl.cdiv(n_all, tl.num_programs(2))
        lo = tl.program_id(2) * per
        hi = tl.minimum(lo + per, n_all)
        s_lo = tl.minimum(lo, n_main)
        s_hi = tl.minimum(hi, n_main)
    else:
        s_lo = 0
        s_hi = KH * KW * c_blocks
    if HOISTED:
        # The same loop with its address math hoisted: the tap (kh, kw) and the channel block c0
        # advance as counters (no integer division per step), and the A and B pointer tiles of
        # tap (0, 0), channel block 0 are formed once, so a step adds one scalar offset to each,
        # itself advanced by one of three increments chosen by the counters.
        a_ptrs = x_ptr + x_row[:, None] + (offs_k * sxc)[None, :]
        b_ptrs = w_ptr + (offs_k * swc)[:, None] + w_col[None, :]
        c0 = tl.full((), 0, tl.int32)
        kh = tl.full((), 0, tl.int32)
        kw = tl.full((), 0, tl.int32)
        # Offsets of (kh, kw, c0) from tap (0, 0), block 0, advanced by one of three increments:
        # the next channel block, the next tap in the row (channels wrap), the next row of taps.
        a_off = tl.full((), 0, tl.int64)
        b_off = tl.full((), 0, tl.int32)
        c_back = (c_blocks - 1) * BLOCK_K  # the last channel block's c0, undone when the channels wrap
        sxc64, sxw64, sxh64 = a_off + sxc, a_off + sxw, a_off + sxh  # int64 (a stride may be a constant 1)
        a_dc = BLOCK_K * sxc64
        a_dw = dil_w * sxw64 - c_back * sxc64
        a_dh = dil_h * sxh64 - ((KW - 1) * dil_w) * sxw64 - c_back * sxc64
        b_dc = BLOCK_K * swc
        b_dw = sww - c_back * swc
        b_dh = swh - (KW - 1) * sww - c_back * swc
        # The padding border: which rows and columns of taps fall outside x, per output row, as one
        # bit per row of taps (bit kh) and one per column (bit 16 + kw), found once here, so a step
        # tests one mask (hbit | wbit, advanced with the tap) per row instead of two bounds.  Filters
        # up to 16 rows and 15 columns of taps (the launcher keeps larger ones on the default loop: a
        # 16th column would be bit 31, which is taken).  Bit 31 marks a row past
        # M (always in the mask): how m_ok is folded in changed sm_80's register allocation under
        # Triton 3.6 and 3.8 (the aot report's spills), and this form left the fewest.
        tl.static_assert(KH <= 16 and KW <= 15, "HOISTED: filters up to 16 rows and 15 columns of taps")
        hbit = tl.full((), 1, tl.uint32)
        wbit = tl.full((), 1 << 16, tl.uint32)
        if PADDED:
            off_x = (m_ok == 0).to(tl.uint32) << 31
            for t in tl.static_range(KH):
                ih_t = ih0 + t * dil_h
                off_x = off_x | (((ih_t < 0) | (ih_t >= H)).to(tl.uint32) << t)
            for t in tl.static_range(KW):
                iw_t = iw0 + t * dil_w
                off_x = off_x | (((iw_t < 0) | (iw_t >= W)).to(tl.uint32) << (16 + t))
        if SPLIT_K:  # the counters and offsets of step s_lo (the offsets are linear in kh, kw, c0)
            tap0 = s_lo // c_blocks
            c0 = (s_lo - tap0 * c_blocks) * BLOCK_K
            kh = tap0 // KW
            kw = tap0 - kh * KW
            a_off = (kh * dil_h) * sxh64 + (kw * dil_w) * sxw64 + c0 * sxc64
            b_off = kh * swh + kw * sww + c0 * swc
            hbit = hbit << kh.to(tl.uint32)
            wbit = wbit << kw.to(tl.uint32)
        for step in range(s_lo, s_hi):
            if PADDED:
                row_ok = (off_x & (hbit | wbit | 0x80000000)) == 0
            else:
                row_ok = m_ok
            cc = c0 + offs_k
            if EVEN_K:  # CG is a multiple of BLOCK_K: every channel block is full
                c_ok = offs_k < BLOCK_K
                a_mask = row_ok[:, None] & c_ok[None, :]
                b_mask = n_ok[None, :] & c_ok[:, None]
            else:
                c_ok = cc < CG
                a_mask = row_ok[:, None] & c_ok[None, :]
                b_mask = c_ok[:, None] & n_ok[None, :]
            a = tl.load(a_ptrs + a_off, mask=a_mask, other=0.0)
            if PROLOGUE_BN:
                a = _prologue_bn(a, a_mask, in_scale_ptr + g * CG, in_shift_ptr + g * CG, cc, c_ok, x_ptr, DOT_UPCAST)
            b = tl.load(b_ptrs + b_off, mask=b_mask, other=0.0)
            if DOT_UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            c0 += BLOCK_K
            next_tap = c0 >= CG
            c0 = tl.where(next_tap, 0, c0)
            kw = tl.where(next_tap, kw + 1, kw)
            next_row = kw == KW
            kw = tl.where(next_row, 0, kw)
            kh = tl.where(next_row, kh + 1, kh)
            wbit = tl.where(next_row, 1 << 16, tl.where(next_tap, wbit << 1, wbit))
            hbit = tl.where(next_row, hbit << 1, hbit)
            a_off += tl.where(next_row, a_dh, tl.where(next_tap, a_dw, a_dc))
            b_off += tl.where(next_row, b_dh, tl.where(next_tap, b_dw, b_dc))
    else:
        for step in range(s_lo, s_hi):
            tap = step // c_blocks
            c0 = (step - tap * c_blocks) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            if PADDED:
                row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            else:  # without padding every tap of a valid output pixel lies inside x
                row_ok = m_ok
            cc = c0 + offs_k
            c_ok = cc < CG
            tap_off = (kh * dil_h).to(tl.int64) * sxh + (kw * dil_w).to(tl.int64) * sxw
            a_mask = row_ok[:, None] & c_ok[None, :]
            a = tl.load(x_ptr + (x_row + tap_off)[:, None] + (cc * sxc)[None, :], mask=a_mask, other=0.0)
            if PROLOGUE_BN:  # what _prologue_bn computes, kept inline: this loop's SASS stays as verified
                in_scale = tl.load(in_scale_ptr + g * CG + cc, mask=c_ok, other=0.0).to(tl.float32)
                in_shift = tl.load(in_shift_ptr + g * CG + cc, mask=c_ok, other=0.0).to(tl.float32)
                a_bn = tl.maximum(a.to(tl.float32) * in_scale[None, :] + in_shift[None, :], 0.0,
                                  propagate_nan=tl.PropagateNan.ALL)
                a_bn = tl.where(a_mask, a_bn, 0.0)
                if DOT_UPCAST:
                    bits = a_bn.to(tl.uint32, bitcast=True)
                    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                    a = bits.to(tl.float32, bitcast=True)
                else:
                    a = a_bn.to(x_ptr.dtype.element_ty)
            b = tl.load(
                w_ptr + (kh * swh + kw * sww) + (cc * swc)[:, None] + w_col[None, :],
                mask=c_ok[:, None] & n_ok[None, :], other=0.0,
            )
            if DOT_UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if SPLIT_K:  # the raw partial tile; the epilogue runs in _split_k_epilogue_kernel
        split = tl.program_id(2)
        ws_row = (split.to(tl.int64) * M + offs_m.to(tl.int64)) * (KG * tl.num_programs(1))
        tl.store(stat_sum_ptr + ws_row[:, None] + k_out[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
        if HAS_DOWNSAMPLE:
            # This program's part of the downsample GEMM's steps (its share [lo, hi) past the main
            # GEMM's), into workspace slices [splits, 2 * splits); the loop is the one-pass kernel's below.
            d_lo = tl.maximum(lo, n_main) - n_main
            d_hi = tl.maximum(hi, n_main) - n_main
            xd_row = nb64 * sdn + (oh64 * ds_sh) * sdh + (ow64 * ds_sw) * sdw
            wd_col = k_out * swdk
            acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d_step in range(d_lo, d_hi):
                cc = d_step * BLOCK_K + offs_k
                c_ok = cc < CD
                a = tl.load(xd_ptr + xd_row[:, None] + (cc * sdc)[None, :], mask=m_ok[:, None] & c_ok[None, :],
                            other=0.0)
                b = tl.load(wd_ptr + (cc * swdc)[:, None] + wd_col[None, :], mask=c_ok[:, None] & n_ok[None, :],
                            other=0.0)
                if DOT_UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc_d = tl.dot(a, b, acc_d, input_precision=DOT_PRECISION)
            wsd_row = ((split + tl.num_programs(2)).to(tl.int64) * M + offs_m.to(tl.int64)) * (
                KG * tl.num_programs(1))
            tl.store(stat_sum_ptr + wsd_row[:, None] + k_out[None, :], acc_d, mask=m_ok[:, None] & n_ok[None, :])
        return

    if EMIT_STATS:
        # Train mode: out is the raw conv output and this tile's per-channel statistics go to
        # row pid_m of the [num_m_tiles, C_out] workspaces: the sum over the tile's valid rows
        # and M2 = sum((acc - tile_mean)^2), centred on the tile's own mean so that no
        # E[z^2] - E[z]^2 cancellation occurs; the host merges tiles with Chan's formula.
        z = acc
        # Rows beyond M hold exact zeros (their A rows load as 0 and the prologue zeroes
        # masked taps), so the sum needs no mask; the centred M2 does.
        n_rows = min(M - pid_m * BLOCK_M, BLOCK_M)
        t_sum = tl.sum(acc, axis=0)
        dev = tl.where(m_ok[:, None], acc - (t_sum / n_rows)[None, :], 0.0)
        t_m2 = tl.sum(dev * dev, axis=0)
        st_off = pid_m.to(tl.int64) * (KG * tl.num_programs(1)) + k_out
        tl.store(stat_sum_ptr + st_off, t_sum, mask=n_ok)
        tl.store(stat_m2_ptr + st_off, t_m2, mask=n_ok)
    else:
        scale, shift = _affine(scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, k_out, n_ok, BN_STATS)
        z = acc * scale[None, :] + shift[None, :]

    if HAS_DOWNSAMPLE:
        # 1x1 conv with stride (ds_sh, ds_sw), no padding: row (n, oh, ow) reads pixel
        # (oh * ds_sh, ow * ds_sw) of the block input; a plain GEMM over its CD channels.
        xd_row = nb64 * sdn + (oh64 * ds_sh) * sdh + (ow64 * ds_sw) * sdw
        wd_col = k_out * swdk
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, CD, BLOCK_K):
            cc = c0 + offs_k
            c_ok = cc < CD
            a = tl.load(
                xd_ptr + xd_row[:, None] + (cc * sdc)[None, :],
                mask=m_ok[:, None] & c_ok[None, :], other=0.0,
            )
            b = tl.load(
                wd_ptr + (cc * swdc)[:, None] + wd_col[None, :],
                mask=c_ok[:, None] & n_ok[None, :], other=0.0,
            )
            if DOT_UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc_d = tl.dot(a, b, acc_d, input_precision=DOT_PRECISION)
        ds_scale, ds_shift = _affine(ds_scale_ptr, ds_shift_ptr, ds_mean_ptr, ds_var_ptr, ds_eps, k_out, n_ok,
                                     BN_STATS)
        z += acc_d * ds_scale[None, :] + ds_shift[None, :]

    mask = m_ok[:, None] & n_ok[None, :]
    k_out64 = k_out.to(tl.int64)
    if HAS_RESIDUAL:
        r_row = nb64 * srn + oh64 * srh + ow64 * srw
        res = tl.load(res_ptr + r_row[:, None] + (k_out64 * src)[None, :], mask=mask, other=0.0)
        z += res.to(tl.float32)
    if RELU:  # NaN stays NaN, as in torch.relu (a plain max, PTX max.f32, returns 0 for it)
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    o_row = nb64 * son + oh64 * soh + ow64 * sow
    tl.store(out_ptr + o_row[:, None] + (k_out64 * soc)[None, :], z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tma_tile_acc(a_desc, b_desc, m0, n0, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """The fp32 accumulator of the output tile at ``(m0, n0)``: its whole reduction, by TMA."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([m0, k0])
        b = b_desc.load([k0, n0])
        if DOT_UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _tma_tile_epilogue(acc, m0, n0, N, scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, r_desc, o_desc,
                       HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, BN_STATS: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """The one-pass epilogue of the output tile at ``(m0, n0)``: the affine or the eval BN statistics,
    the residual, the NaN-propagating ReLU, one rounding on the store."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    scale, shift = _affine(scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, offs_n, offs_n < N, BN_STATS)
    z = acc * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        z += r_desc.load([m0, n0]).to(tl.float32)
    if RELU:  # NaN stays NaN, as in torch.relu
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    o_desc.store([m0, n0], z.to(o_desc.dtype))


@triton.jit
def _conv1x1_tma_fwd_kernel(
    a_desc, b_desc, scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, r_desc, o_desc,
    M, N, K,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, BN_STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr = 0,
):
    """A 1x1, stride-1, unpadded, ungrouped conv over channels_last tensors as the plain GEMM it is,
    with both operands brought in by the TMA copy engine (tensor descriptors) on sm_90.

    ``a_desc`` describes the input as ``(M, K)`` (``M = N * H * W`` pixels, ``K = C_in``, rows
    contiguous), ``b_desc`` the re-laid-out weight as ``(K, N)`` (``N = C_out``), ``r_desc`` and
    ``o_desc`` the residual and the output as ``(M, N)`` (channels_last).  Out-of-bounds rows and
    channels of a tile load as zeros and are not stored (the descriptors' bounds).  The epilogue
    is :func:`_conv_bn_act_fwd_kernel`'s for this case: the affine or the eval BN statistics, the
    residual, the NaN-propagating ReLU, one rounding on the store.  No address arithmetic at all:
    every tile moves by TMA, so the main loop is the copy issue, the barrier wait and the MMAs,
    and the epilogue holds no 2-D offset tensor (which spilled at 128x128 tiles with 8 warps).
    Opt-in (``FUSEDRES_TRITON_TMA=1``, see ``launch.tma_eligible``) until a GPU run has verified it.

    ``NUM_SMS`` > 0 makes it persistent (opt-in, ``FUSEDRES_TRITON_PERSISTENT=1``): a grid of
    ``NUM_SMS`` programs, program ``p`` computing tiles ``p, p + NUM_SMS, ...`` in the same grouped
    order, each exactly as the one-tile-per-program launch computes it.  The tile loop is flattened
    with the reduction loop (``tl.range(flatten=True)``), so the software pipeliner can issue the
    next tile's first loads while this tile's epilogue runs: a 1x1 conv over 64 or 128 channels
    has one or two reduction steps per tile, and without that overlap each program waits out its
    loads, its MMAs and its epilogue in turn.  The epilogue's tile index is a second counter, as in
    Triton's persistent matmul tutorial, so that the epilogue does not depend on values the
    pipeliner moves ahead.
    """
    if NUM_SMS > 0:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        tile_c = tl.program_id(0) - NUM_SMS
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tma_tile_acc(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                                DOT_PRECISION, DOT_UPCAST)
            tile_c += NUM_SMS
            pid_m, pid_n = _tile_ids(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _tma_tile_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, scale_ptr, shift_ptr, mean_ptr, var_ptr,
                               eps, r_desc, o_desc, HAS_RESIDUAL, RELU, BN_STATS, BLOCK_N)
    else:
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tma_tile_acc(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                            DOT_PRECISION, DOT_UPCAST)
        _tma_tile_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, scale_ptr, shift_ptr, mean_ptr, var_ptr, eps,
                           r_desc, o_desc, HAS_RESIDUAL, RELU, BN_STATS, BLOCK_N)


@triton.jit
def _split_k_epilogue_kernel(
    ws_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, res_ptr, out_ptr,
    ds_scale_ptr, ds_shift_ptr, ds_mean_ptr, ds_var_ptr, ds_eps,
    M, K, OH, OW, SPLITS,
    srn, src, srh, srw,
    son, soc, soh, sow,
    HAS_RESIDUAL: tl.constexpr, HAS_DOWNSAMPLE: tl.constexpr, RELU: tl.constexpr, BN_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The epilogue of a split-K conv (``SPLIT_K`` in :func:`_conv_bn_act_fwd_kernel`) for one
    ``BLOCK_M x BLOCK_N`` tile: ``acc`` is the sum of the ``SPLITS`` fp32 partial tiles of the
    ``[SPLITS, M, K]`` workspace, added in split order (deterministic), then the same epilogue as
    the one-pass kernel: the affine or the eval BN statistics, the residual, the NaN-propagating
    ReLU, one rounding on the store.  ``K`` is every output channel (all groups).  With
    ``HAS_DOWNSAMPLE`` the workspace is ``[2 * SPLITS, M, K]``: the main GEMM's partials, then the
    downsample GEMM's, each summed in split order and given its own affine (or BN statistics)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < K
    mask = m_ok[:, None] & n_ok[None, :]
    m64 = offs_m.to(tl.int64)
    ws = ws_ptr + m64[:, None] * K + offs_n[None, :]
    acc = tl.load(ws, mask=mask, other=0.0)
    # int64 through a 0-d tensor: M (or K) equal to 1 reaches the kernel as a constant int
    split_stride = (tl.full((), 0, tl.int64) + M) * K
    for s in range(1, SPLITS):
        acc += tl.load(ws + s * split_stride, mask=mask, other=0.0)
    scale, shift = _affine(scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, offs_n, n_ok, BN_STATS)
    z = acc * scale[None, :] + shift[None, :]
    if HAS_DOWNSAMPLE:
        acc_d = tl.load(ws + SPLITS * split_stride, mask=mask, other=0.0)
        for s in range(SPLITS + 1, 2 * SPLITS):
            acc_d += tl.load(ws + s * split_stride, mask=mask, other=0.0)
        ds_scale, ds_shift = _affine(ds_scale_ptr, ds_shift_ptr, ds_mean_ptr, ds_var_ptr, ds_eps, offs_n, n_ok,
                                     BN_STATS)
        z += acc_d * ds_scale[None, :] + ds_shift[None, :]
    ohw = OH * OW
    nb = m64 // ohw
    rem = m64 - nb * ohw
    oh = rem // OW
    ow = rem - oh * OW
    n64 = offs_n.to(tl.int64)
    if HAS_RESIDUAL:
        r_row = nb * srn + oh * srh + ow * srw
        z += tl.load(res_ptr + r_row[:, None] + (n64 * src)[None, :], mask=mask, other=0.0).to(tl.float32)
    if RELU:  # NaN stays NaN, as in torch.relu
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    o_row = nb * son + oh * soh + ow * sow
    tl.store(out_ptr + o_row[:, None] + (n64 * soc)[None, :], z.to(out_ptr.dtype.element_ty), mask=mask)

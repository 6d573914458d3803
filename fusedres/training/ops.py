"""The per-channel passes of train-mode BN, each with a Triton and a torch implementation.

Shapes: activations are ``(N, C, H, W)`` (NCHW or channels_last); per-channel vectors are
``(C,)`` in the statistics dtype (fp32, or fp64 for fp64 activations).

* :func:`conv_stats`     ``z = conv(relu(a*in_scale + in_shift) or a)`` and its ``(mean, var)``.
* :func:`batch_stats`    ``(mean, var)`` over ``N, H, W`` (biased var).
* :func:`bn_act`         ``act(z*scale + shift (+ residual) (+ zd*dscale + dshift))``.
* :func:`bn_bwd_reduce`  ``(sum(gp), sum(gp*(z - mean)))``, ``gp = g * (y > 0)``.
* :func:`bn_bwd_apply`   ``a*gp + b*(z - mean) + c`` (and ``gp``).

The Triton kernels run for CUDA tensors in fp16/bf16/fp32 outside ``torch.compile``; the torch
ops run everywhere else (CPU, fp64, and under ``torch.compile``, where Inductor fuses them).
Both compute in fp32 (fp64 for fp64); the Triton kernels round once to the activation dtype.

Eagerly on tensors that Triton does not take (the CPU training path), the torch side uses
ATen's own BatchNorm kernels, one vectorised pass each instead of a chain of elementwise ops:
``batch_norm_update_stats`` for the statistics, BatchNorm's eval kernel + in-place add/ReLU
for the apply, and ``threshold_backward`` + ``native_batch_norm_backward`` for
:func:`bn_backward` (the reduce and the apply in one call, for statistics of the local batch).
fp16/bf16 activations take them mixed with fp32 per-channel vectors (fp32 math); :func:`bn_act`
rounds each BN's result and then the sum, where eager torchvision rounds them.  On 2 CPU cores a ResNet-50 training step
(batch 8, NCHW input) went from 1.33 s to 0.87 s in fp32 and from 1.02 s to 0.51 s under bf16
autocast (eager: 0.49 s), measured 2026-11-27.

:func:`conv_stats` on the Triton path is a single launch of the conv kernel of
``fusedres/backends/triton`` (statistics from its epilogue, the previous BN-apply + ReLU in
its operand load, so that activation never reaches memory); on the torch path it is
:func:`bn_act` + ``conv2d`` + :func:`batch_stats`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import triton_kernels as _tk
    from ..backends.triton import ops as _conv_ops
except ImportError:  # no triton: the torch path serves every call
    _tk = _conv_ops = None

_DIMS = (0, 2, 3)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def use_triton(t: torch.Tensor) -> bool:
    return (
        _tk is not None
        and t.is_cuda
        and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and not torch.compiler.is_compiling()
    )


def _c(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _aten_bn(acts, vecs=()) -> bool:
    """Whether ATen's BatchNorm kernels serve these activations and per-channel vectors.

    Eagerly, off the Triton path: activations (``None`` entries ignored) of one floating dtype,
    vectors in its statistics dtype (fp32 for fp16/bf16, which ATen's kernels take mixed).
    """
    acts = [t for t in acts if t is not None]
    dt = acts[0].dtype
    return (
        not torch.compiler.is_compiling()
        and dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and all(t.dtype == dt for t in acts)
        and all(v.dtype == stats_dtype(dt) for v in vecs if v is not None)
        and not use_triton(acts[0])
    )


def conv_stats(a, weight, geom, in_scale=None, in_shift=None):
    """``(z, mean, var)``: ``z = conv2d(a', weight)`` with ``a' = relu(a*in_scale[c] + in_shift[c])``
    (``in_scale``/``in_shift`` ``(C_in,)``) or ``a' = a``, and the biased per-channel statistics of ``z``.

    ``geom = (stride, padding, dilation, groups)``; ``a`` ``(N, C_in, H, W)``, ``weight`` in ``a``'s dtype.
    """
    stride, padding, dilation, groups = geom
    if use_triton(a):
        if in_scale is not None:
            in_scale, in_shift = in_scale.float(), in_shift.float()
        z, mean, var = _conv_ops.conv_train_fwd_unchecked(
            a, weight, in_scale, in_shift, list(stride), list(padding), list(dilation), groups
        )
        if z.numel() == 0:  # an empty share of a synchronised batch: no moments to merge
            return (z, *batch_stats(z))
        return z, mean, var
    if in_scale is not None:
        a = bn_act(a, in_scale, in_shift, relu=True)
    z = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    return (z, *batch_stats(z))


def batch_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased ``(mean, var)`` per channel of ``z``: Triton's fused reduction, ATen's BatchNorm
    statistics kernel, or ``var_mean`` (under ``torch.compile``)."""
    if z.numel() == 0:  # an empty share of a synchronised batch (ATen's kernel refuses it)
        zero = z.new_zeros(z.shape[1], dtype=stats_dtype(z.dtype))
        return zero, zero.clone()
    if use_triton(z):
        return _tk.channel_stats(z)
    if _aten_bn([z]):
        # BatchNorm's own statistics kernel, the one eager nn.BatchNorm2d uses (var_mean over
        # N, H, W was 3x slower on NCHW and 30x on channels_last, 2 CPU cores): the biased
        # (mean, var).  fp16/bf16 get fp32 statistics when given fp32 running buffers, here
        # throwaway ones that momentum 0 leaves as they are.
        if z.dtype in (torch.float16, torch.bfloat16):
            c = z.shape[1]
            rm, rv = z.new_zeros(c, dtype=torch.float32), z.new_ones(c, dtype=torch.float32)
            return torch.ops.aten.batch_norm_update_stats(z, rm, rv, 0.0)
        return torch.ops.aten.batch_norm_update_stats(z, None, None, 0.0)
    var, mean = torch.var_mean(z.to(stats_dtype(z.dtype)), dim=_DIMS, correction=0)
    return mean, var


def _affine(z, scale, shift):
    """``z*scale[c] + shift[c]`` by BatchNorm's eval kernel, in ``z``'s dtype and memory format."""
    c = z.shape[1]
    return torch.batch_norm(z, scale, shift, scale.new_zeros(c), scale.new_ones(c), False, 0.0, 0.0, False)


def bn_act(z, scale, shift, residual=None, zd=None, dscale=None, dshift=None, *, relu: bool):
    if use_triton(z) and z.numel() > 0:
        return _tk.bn_act(z, scale, shift, residual, zd, dscale, dshift, relu=relu)
    if _aten_bn([z, residual, zd], [scale, shift, dscale, dshift]):
        # Eager torchvision's order of operations, each a single vectorised pass in any memory
        # format: BatchNorm's eval kernel with (mean, var, eps) = (0, 1, 0) per BN (z*scale +
        # shift in the statistics dtype, rounded once to the activation dtype), then the adds
        # and the ReLU in place.  fp16/bf16 are rounded where eager rounds them (after each BN
        # and after the add): computing the sum in fp32 first meant converting every operand
        # to fp32 and back (ATen's CPU kernels copy mixed-dtype operands), ResNet-50's bf16
        # autocast step 745 against 698 ms (2 cores, 2026-12-01).  (addcmul with (1, C, 1, 1)
        # operands took 2.3 ms where BatchNorm's kernel takes 0.7 on a 8x64x56x56
        # channels_last tensor.)
        out = _affine(z, scale, shift)
        if zd is not None:
            out.add_(_affine(zd, dscale, dshift))
        if residual is not None:
            out.add_(residual)
        return out.relu_() if relu else out
    acc = z.to(scale.dtype) * _c(scale) + _c(shift)
    if residual is not None:
        acc = acc + residual
    if zd is not None:
        acc = acc + (zd.to(scale.dtype) * _c(dscale) + _c(dshift))
    if relu:
        acc = torch.relu(acc)
    return acc.to(z.dtype)


def bn_bwd_reduce(g, y, z, mean):
    if use_triton(z) and z.numel() > 0:
        return _tk.bn_bwd_reduce(g, y, z, mean)
    gp = g.to(mean.dtype)
    if y is not None:
        gp = gp * (y > 0)
    return gp.sum(_DIMS), (gp * (z.to(mean.dtype) - _c(mean))).sum(_DIMS)


def bn_bwd_apply(g, y, z, mean, a, b, c, *, write_gp: bool):
    if use_triton(z) and z.numel() > 0:
        return _tk.bn_bwd_apply(g, y, z, mean, a, b, c, write_gp=write_gp)
    gp = g.to(mean.dtype)
    if y is not None:
        gp = gp * (y > 0)
    gz = (gp * _c(a) + (z.to(mean.dtype) - _c(mean)) * _c(b) + _c(c)).to(z.dtype)
    return gz, (gp.to(g.dtype) if write_gp else None)


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format.  ATen's CPU kernels are slow on operands of different
    layouts: ``threshold_backward`` of an NCHW gradient and a channels_last output took 15.4 ms
    on 8x256x56x56 bf16, 0.66 ms with both channels_last (a copy: 0.16 ms; 2 cores).  The
    gradient arriving at a channels_last chain from an NCHW one (a chain at 4x4 or less runs NCHW
    on CPU, :func:`fusedres.training.train_memory_format`) is such an operand.  A gradient batched by
    ``vmap`` (``autograd.grad(..., is_grads_batched=True)``, a vectorised Jacobian) stays as it
    is: vmap cannot lay out a batched tensor channels_last."""
    if torch._C._functorch.is_legacy_batchedtensor(t) or torch._C._functorch.is_batchedtensor(t):
        return t
    fmt = torch.channels_last if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) \
        and not like.is_contiguous() else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def bn_backward(g, y, z, mean, invstd, gamma, *, write_gp: bool):
    """BN(+ReLU) backward over the local batch through ATen's fused kernel, or ``None``.

    ``(g_z, g_gamma, g_beta, gp)`` with ``gp = g * (y > 0)`` (``g`` when ``y`` is ``None``),
    ``g_gamma = invstd * sum(gp * (z - mean))`` (also when ``gamma`` is ``None``), ``g_beta =
    sum(gp)``; the same formula as :func:`bn_bwd_reduce` + :func:`bn_bwd_apply`, computed by
    ``native_batch_norm_backward`` (fp16/bf16 activations with fp32 vectors included).  Returns
    ``None`` where that kernel does not apply (Triton tensors, activations of different dtypes,
    vectors not in the statistics dtype, ``torch.compile``): the caller uses the two-pass form.
    """
    if not _aten_bn([g, y, z], [mean, invstd, gamma]):
        return None
    g = _in_layout_of(g, z)
    gp = g if y is None else torch.ops.aten.threshold_backward(g, y, 0)
    gz, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
        gp, z, gamma, None, None, mean, invstd, True, 0.0, [True, True, True]
    )
    return gz, g_gamma, g_beta, (gp if write_gp else None)

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
Both compute in fp32 (fp64 for fp64) and round once to the activation dtype.

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


def conv_stats(a, weight, geom, in_scale=None, in_shift=None):
    """``(z, mean, var)``: ``z = conv2d(a', weight)`` with ``a' = relu(a*in_scale[c] + in_shift[c])``
    (``in_scale``/``in_shift`` ``(C_in,)``) or ``a' = a``, and the biased per-channel statistics of ``z``.

    ``geom = (stride, padding, dilation, groups)``; ``a`` ``(N, C_in, H, W)``, ``weight`` in ``a``'s dtype.
    """
    stride, padding, dilation, groups = geom
    if use_triton(a):
        if in_scale is not None:
            in_scale, in_shift = in_scale.float(), in_shift.float()
        return _conv_ops.conv_train_fwd_impl(
            a, weight, in_scale, in_shift, list(stride), list(padding), list(dilation), groups
        )
    if in_scale is not None:
        a = bn_act(a, in_scale, in_shift, relu=True)
    z = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    return (z, *batch_stats(z))


def batch_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased ``(mean, var)`` per channel of ``z``, one fused reduction (Triton) or ``var_mean``."""
    if use_triton(z):
        return _tk.channel_stats(z)
    var, mean = torch.var_mean(z.to(stats_dtype(z.dtype)), dim=_DIMS, correction=0)
    return mean, var


def bn_act(z, scale, shift, residual=None, zd=None, dscale=None, dshift=None, *, relu: bool):
    if use_triton(z):
        return _tk.bn_act(z, scale, shift, residual, zd, dscale, dshift, relu=relu)
    acc = z.to(scale.dtype) * _c(scale) + _c(shift)
    if residual is not None:
        acc = acc + residual
    if zd is not None:
        acc = acc + (zd.to(scale.dtype) * _c(dscale) + _c(dshift))
    if relu:
        acc = torch.relu(acc)
    return acc.to(z.dtype)


def bn_bwd_reduce(g, y, z, mean):
    if use_triton(z):
        return _tk.bn_bwd_reduce(g, y, z, mean)
    gp = g.to(mean.dtype)
    if y is not None:
        gp = gp * (y > 0)
    return gp.sum(_DIMS), (gp * (z.to(mean.dtype) - _c(mean))).sum(_DIMS)


def bn_bwd_apply(g, y, z, mean, a, b, c, *, write_gp: bool):
    if use_triton(z):
        return _tk.bn_bwd_apply(g, y, z, mean, a, b, c, write_gp=write_gp)
    gp = g.to(mean.dtype)
    if y is not None:
        gp = gp * (y > 0)
    gz = (gp * _c(a) + (z.to(mean.dtype) - _c(mean)) * _c(b) + _c(c)).to(z.dtype)
    return gz, (gp.to(g.dtype) if write_gp else None)

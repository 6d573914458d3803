"""``torch.library`` registration of the Triton ops: schema, eager kernel, fake, autograd.

The forward is one Triton launch; the backward (bottom of this file) runs through ATen.

``fusedres::conv_bn_act_triton`` and ``fusedres::block_tail_triton`` are ``custom_op`` s:
opaque to ``torch.compile`` (Dynamo records one call, the fake implementation gives it the
output's shape, dtype and strides without running anything), so a converted ResNet
traces with ``fullgraph=True`` and the eager kernel - weight re-layout cache, autotuner
and all - runs unchanged inside the compiled graph and inside CUDA-graph capture (warm
each shape up once before capturing: the first call of a shape autotunes).

Each implementation checks its arguments (shapes, dtypes, devices, geometry), and so does
each fake one with ``torch._check``.  The backend module calls ``*_unchecked`` directly for
eager inference on plain tensors (see ``_direct`` in ``__init__.py``): the same function
without the dispatcher's host cost, and without re-checking what ``fusedres.functional``
has just checked.

Output memory format: channels_last when the input (``x``, resp. ``y``) is channels_last,
otherwise contiguous NCHW - what ``torch.nn.functional.conv2d`` returns for these inputs.
The kernel writes either through the output's strides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from .. import op_checks, register_flops
from . import launch as _launch


def _out_hw(h, w, kh, kw, stride, padding, dilation):
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def _memory_format(x: Tensor) -> torch.memory_format:
    # Same rule as fusedres.functional: channels_last only when it is not also plain-contiguous.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _new_out(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    oh, ow = _out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    return torch.empty(
        (x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
    )


# --------------------------------------------------------------------------- argument checks
#
# The ops are public (``torch.ops.fusedres.*``) and compiled graphs call them without going
# through ``fusedres.functional``, so they check what the kernel relies on (a wrong shape would
# make it read past the end of a tensor) with the checks every backend's ops share
# (``fusedres/backends/op_checks.py``): :func:`_require` in the eager implementations and
# ``torch._check`` in the fake ones.  They cost about as much host time as allocating the
# output, so the backend's eager path, which ``fusedres.functional`` has validated when it
# prepared the call, calls the ``*_unchecked`` functions instead.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_require = op_checks.require("triton")


def _check_conv(check, x_name, x, w_name, weight, stride, padding, dilation, groups, stride_name="stride"):
    return op_checks.check_conv(check, _DTYPES, x_name, x, w_name, weight, stride, padding, dilation, groups,
                                stride_name)


def _check_vectors(check, x, n, named, dtypes=None) -> None:
    op_checks.check_vectors(check, x, n, named, dtypes)


def _check_conv_bn_act(check, *args, **kw):
    """The operands of :func:`conv_bn_act_impl`."""
    op_checks.check_conv_bn_act(check, _DTYPES, *args, **kw)


def _check_block_tail(check, *args, **kw):
    """The operands of :func:`block_tail_impl`."""
    op_checks.check_block_tail(check, _DTYPES, *args, **kw)


def conv_bn_act_impl(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    mean: Optional[Tensor],
    var: Optional[Tensor],
    eps: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
) -> Tensor:
    """``act(conv2d(x, weight) * scale[k] + shift[k] (+ residual))``, one Triton launch.

    ``x`` ``(N, C, H, W)``, ``weight`` ``(K, C / groups, KH, KW)``, ``scale``/``shift`` ``(K,)``,
    ``residual`` ``(N, K, OH, OW)`` or None; returns ``(N, K, OH, OW)`` in ``x.dtype``.
    With ``mean``/``var`` ``(K,)`` (an eval BatchNorm's running statistics, both or neither)
    ``scale``/``shift`` are the BN's weight and bias and the epilogue computes
    ``(conv - mean) * scale / sqrt(var + eps) + shift``: no host-side fold.
    """
    _check_conv_bn_act(_require, x, weight, scale, shift, residual, mean, var, stride, padding, dilation, groups,
                       eps=eps)
    return conv_bn_act_unchecked(x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups,
                                 relu)


def conv_bn_act_unchecked(x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups, relu):
    """:func:`conv_bn_act_impl` without the argument checks, for callers that have made them.

    The one difference: ``weight`` may be in another dtype than ``x`` (autocast, see
    ``fusedres.functional``); :func:`launch.kernel_weight` casts it once and caches the copy.
    """
    out = _new_out(x, weight, stride, padding, dilation)
    return _launch.launch(
        x, _launch.kernel_weight(weight, x.dtype), scale, shift, residual, out,
        tuple(stride), tuple(padding), tuple(dilation), groups, relu,
        bn_stats=_bn_stats(mean, var, eps),
    )


def _bn_stats(mean, var, eps) -> tuple | None:
    return None if mean is None else (mean, var, eps)


conv_bn_act_triton = torch.library.custom_op("fusedres::conv_bn_act_triton", mutates_args=())(conv_bn_act_impl)


@conv_bn_act_triton.register_fake
def _(x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups, relu):
    _check_conv_bn_act(torch._check, x, weight, scale, shift, residual, mean, var, stride, padding, dilation, groups,
                       eps=eps)
    return _new_out(x, weight, stride, padding, dilation)


def block_tail_impl(
    y: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    x: Tensor,
    ds_weight: Tensor,
    ds_scale: Tensor,
    ds_shift: Tensor,
    mean: Optional[Tensor],
    var: Optional[Tensor],
    eps: float,
    ds_mean: Optional[Tensor],
    ds_var: Optional[Tensor],
    ds_eps: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    ds_stride: list[int],
    relu: bool,
) -> Tensor:
    """``act(conv2d(y, weight)*scale + shift + conv2d(x, ds_weight, stride=ds_stride)*ds_scale + ds_shift)``.

    Both GEMMs run in one Triton launch (see ``kernels.py``).  ``y`` ``(N, C, H, W)``,
    ``x`` ``(N, C_d, H_d, W_d)``, ``ds_weight`` ``(K, C_d, 1, 1)``; returns ``(N, K, OH, OW)``.
    ``mean``/``var``/``ds_mean``/``ds_var``: running statistics of both BNs (all four or
    none), normalised in the epilogue as in :func:`conv_bn_act_impl`.
    """
    _check_block_tail(_require, y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, ds_mean, ds_var,
                      stride, padding, dilation, groups, ds_stride, eps=eps, ds_eps=ds_eps)
    return block_tail_unchecked(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean,
                                ds_var, ds_eps, stride, padding, dilation, groups, ds_stride, relu)


def block_tail_unchecked(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var,
                         ds_eps, stride, padding, dilation, groups, ds_stride, relu):
    """:func:`block_tail_impl` without the argument checks, for callers that have made them."""
    out = _new_out(y, weight, stride, padding, dilation)
    ds = (x, _launch.kernel_weight(ds_weight, y.dtype), ds_scale, ds_shift, tuple(ds_stride))
    bn = _bn_stats(mean, var, eps)
    ds_bn = _bn_stats(ds_mean, ds_var, ds_eps)
    return _launch.launch(
        y, _launch.kernel_weight(weight, y.dtype), scale, shift, None, out,
        tuple(stride), tuple(padding), tuple(dilation), groups, relu, ds=ds,
        bn_stats=bn + ds_bn if bn is not None else None,
    )


block_tail_triton = torch.library.custom_op("fusedres::block_tail_triton", mutates_args=())(block_tail_impl)


@block_tail_triton.register_fake
def _(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var, ds_eps,
      stride, padding, dilation, groups, ds_stride, relu):
    _check_block_tail(torch._check, y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, ds_mean,
                      ds_var, stride, padding, dilation, groups, ds_stride, eps=eps, ds_eps=ds_eps)
    return _new_out(y, weight, stride, padding, dilation)


def conv_train_fwd_impl(
    x: Tensor,
    weight: Tensor,
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode conv with fused statistics (and optionally the previous BN + ReLU), one launch.

    ``z = conv2d(a, weight)`` with ``a = relu(x * in_scale[c] + in_shift[c])`` when
    ``in_scale``/``in_shift`` ``(C,)`` fp32 are given (never materialised), else ``a = x``.
    Returns ``(z, mean, var)``: ``z`` ``(N, K, OH, OW)`` in ``x.dtype`` (same memory-format
    rule as the other ops) and fp32 ``(K,)`` batch mean and biased variance of ``z`` over
    ``N, OH, OW``, from the fp32 accumulator.  Forward only (the training chain owns the
    backward, see ``fusedres/training/chain.py``).
    """
    _check_conv(_require, "x", x, "weight", weight, stride, padding, dilation, groups)
    return conv_train_fwd_unchecked(x, weight, in_scale, in_shift, stride, padding, dilation, groups)


def conv_train_fwd_unchecked(x, weight, in_scale, in_shift, stride, padding, dilation, groups):
    """:func:`conv_train_fwd_impl` without its argument checks, for the training chain, whose
    convs and BN vectors are its own modules' (the eval path skips them the same way)."""
    out = _new_out(x, weight, stride, padding, dilation)
    return _launch.conv_train_fwd(
        x, _launch.kernel_weight(weight), out, tuple(stride), tuple(padding), tuple(dilation), groups,
        in_scale, in_shift,
    )


conv_train_fwd_triton = torch.library.custom_op("fusedres::conv_train_fwd_triton", mutates_args=())(
    conv_train_fwd_impl
)


@conv_train_fwd_triton.register_fake
def _(x, weight, in_scale, in_shift, stride, padding, dilation, groups):
    _check_conv(torch._check, "x", x, "weight", weight, stride, padding, dilation, groups)
    torch._check((in_scale is None) == (in_shift is None), lambda: "in_scale and in_shift must be given together")
    _check_vectors(torch._check, x, x.shape[1], (("in_scale", in_scale), ("in_shift", in_shift)), (torch.float32,))
    stat = x.new_empty((weight.shape[0],), dtype=torch.float32)
    return _new_out(x, weight, stride, padding, dilation), stat, stat.new_empty(stat.shape)


# --------------------------------------------------------------------------- autograd
#
# Backward runs through ATen (the kernels are forward-only).  With g the gradient at the
# pre-activation z (g = grad_out where out > 0 under ReLU, which is what
# threshold_backward does on the ReLU output):
#     d residual = g
#     d shift    = sum_{n,h,w} g,    d scale = sum_{n,h,w} g * conv2d(x, w)   (conv recomputed)
#     d x, d w   = convolution_backward(g * scale, x, w)
# Reductions run in fp32 and are cast to each input's dtype.  For the block tail the same
# holds per branch, with the downsample conv's own scale and stride.


def _grad_at_preact(grad_out: Tensor, out: Tensor, relu: bool) -> Tensor:
    return torch.where(out > 0, grad_out, torch.zeros_like(grad_out)) if relu else grad_out


def _branch_grads(g32, inp, weight, scale, shift, stride, padding, dilation, groups, needs):
    """Grads of ``conv2d(inp, weight) * scale + shift`` for the flags ``needs`` = (inp, weight, scale, shift)."""
    need_in, need_w, need_scale, need_shift = needs
    g_scale = g_shift = g_in = g_w = None
    if need_scale:
        conv = torch.nn.functional.conv2d(inp, weight, None, stride, padding, dilation, groups)
        g_scale = (g32 * conv.float()).sum((0, 2, 3)).to(scale.dtype)
    if need_shift:
        g_shift = g32.sum((0, 2, 3)).to(shift.dtype)
    if need_in or need_w:
        g_conv = (g32 * scale.float().view(1, -1, 1, 1)).to(inp.dtype)
        g_in, g_w, _ = torch.ops.aten.convolution_backward(
            g_conv, inp, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_in, need_w, False],
        )
    return g_in, g_w, g_scale, g_shift


_NO_STATS_GRAD = (
    "fusedres: the Triton ops take BatchNorm running statistics (mean/var) only without autograd; "
    "fusedres.functional folds them into scale/shift with differentiable ops when a gradient is needed"
)


def _conv_bn_act_setup(ctx, inputs, output):
    x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups, relu = inputs
    ctx.has_stats = mean is not None
    ctx.save_for_backward(x, weight, scale, shift, output)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.relu = relu


def _conv_bn_act_backward(ctx, grad_out):
    if ctx.has_stats:
        raise RuntimeError(_NO_STATS_GRAD)
    x, weight, scale, shift, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need = ctx.needs_input_grad
    g = _grad_at_preact(grad_out, out, ctx.relu)
    g_x, g_w, g_scale, g_shift = _branch_grads(
        g.float(), x, weight, scale, shift, stride, padding, dilation, groups, need[:4]
    )
    g_res = g if need[4] else None
    return g_x, g_w, g_scale, g_shift, g_res, None, None, None, None, None, None, None, None


conv_bn_act_triton.register_autograd(_conv_bn_act_backward, setup_context=_conv_bn_act_setup)
register_flops("conv_bn_act_triton", "block_tail_triton")


@register_flop_formula(torch.ops.fusedres.conv_train_fwd_triton)
def _train_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape[0])


def _block_tail_setup(ctx, inputs, output):
    (y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var, ds_eps,
     stride, padding, dilation, groups, ds_stride, relu) = inputs
    ctx.has_stats = mean is not None
    ctx.save_for_backward(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, output)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.ds_stride = ds_stride
    ctx.relu = relu


def _block_tail_backward(ctx, grad_out):
    if ctx.has_stats:
        raise RuntimeError(_NO_STATS_GRAD)
    y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need = ctx.needs_input_grad
    g32 = _grad_at_preact(grad_out, out, ctx.relu).float()
    main = _branch_grads(g32, y, weight, scale, shift, stride, padding, dilation, groups, need[:4])
    skip = _branch_grads(g32, x, ds_weight, ds_scale, ds_shift, ctx.ds_stride, [0, 0], [1, 1], 1, need[4:8])
    return (*main, *skip, *(None,) * 12)


block_tail_triton.register_autograd(_block_tail_backward, setup_context=_block_tail_setup)

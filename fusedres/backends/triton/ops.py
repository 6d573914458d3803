"""``torch.library`` registration of the Triton ops: schema, eager kernel, fake, autograd.

``fusedres::conv_bn_act_triton`` and ``fusedres::block_tail_triton`` are ``custom_op`` s:
opaque to ``torch.compile`` (Dynamo records one call, the fake implementation gives it the
output's shape, dtype and strides without running anything), so a converted ResNet
traces with ``fullgraph=True`` and the eager kernel - weight re-layout cache, autotuner
and all - runs unchanged inside the compiled graph and inside CUDA-graph capture (warm
each shape up once before capturing: the first call of a shape autotunes).

Output memory format: channels_last when the input (``x``, resp. ``y``) is channels_last,
otherwise contiguous NCHW - what ``torch.nn.functional.conv2d`` returns for these inputs.
The kernel writes either through the output's strides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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


@torch.library.custom_op("fusedres::conv_bn_act_triton", mutates_args=())
def conv_bn_act_triton(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
) -> Tensor:
    """``act(conv2d(x, weight) * scale[k] + shift[k] (+ residual))``, one Triton launch.

    ``x`` ``(N, C, H, W)``, ``weight`` ``(K, C / groups, KH, KW)``, ``scale``/``shift`` ``(K,)``,
    ``residual`` ``(N, K, OH, OW)`` or None; returns ``(N, K, OH, OW)`` in ``x.dtype``.
    """
    out = _new_out(x, weight, stride, padding, dilation)
    return _launch.launch(
        x, _launch.kernel_weight(weight), scale, shift, residual, out,
        tuple(stride), tuple(padding), tuple(dilation), groups, relu,
    )


@conv_bn_act_triton.register_fake
def _(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    return _new_out(x, weight, stride, padding, dilation)


@torch.library.custom_op("fusedres::block_tail_triton", mutates_args=())
def block_tail_triton(
    y: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    x: Tensor,
    ds_weight: Tensor,
    ds_scale: Tensor,
    ds_shift: Tensor,
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
    """
    out = _new_out(y, weight, stride, padding, dilation)
    ds = (x, _launch.kernel_weight(ds_weight), ds_scale, ds_shift, tuple(ds_stride))
    return _launch.launch(
        y, _launch.kernel_weight(weight), scale, shift, None, out,
        tuple(stride), tuple(padding), tuple(dilation), groups, relu, ds=ds,
    )


@block_tail_triton.register_fake
def _(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, stride, padding, dilation, groups, ds_stride, relu):
    return _new_out(y, weight, stride, padding, dilation)

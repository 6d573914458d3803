"""The ``torch`` backend: the composite reference every other backend is checked against.

Plain ATen ops, so it runs on every device and dtype, is differentiable, and traces under
``torch.compile``.  It is deliberately written the obvious way; it is the definition of
what the fused kernels compute, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import even_channels, odd_bf16_cpu_channels

NAME = "torch"
#: ReLU is a separate op on the output (the eval stem may run it after the max-pool instead).
SEPARATE_RELU = True


def is_available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def unsupported_reason(spec) -> str | None:
    return None


def _affine(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # BN-apply in the promoted dtype (fp32 scale/shift on a bf16 conv output computes in fp32,
    # as the fused kernels do in their epilogue), cast back to the activation dtype by the caller.
    return t * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _conv(x, weight, stride, padding=(0, 0), dilation=(1, 1), groups=1):
    # The weight is in x's dtype except under autocast (see fusedres.functional), where
    # F.conv2d would cast it the same way.
    weight = weight.to(x.dtype)
    if groups == 1 and odd_bf16_cpu_channels(x, groups):  # oneDNN misplaces NaN/inf there (see the helper)
        x, weight = even_channels(x), even_channels(weight)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def conv_bn_act(x, weight, scale, shift, residual, spec):
    """``act(conv2d(x, weight) * scale[c] + shift[c] (+ residual))``."""
    out = _affine(_conv(x, weight, spec.stride, spec.padding, spec.dilation, spec.groups), scale, shift)
    if residual is not None:
        out = out + residual
    if spec.relu:
        out = torch.relu(out)
    return out.to(x.dtype)


def block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec):
    """``act(conv2d(y, weight)*scale + shift + conv2d(x, ds_weight, stride=ds_stride)*ds_scale + ds_shift)``."""
    main = _affine(_conv(y, weight, spec.stride, spec.padding, spec.dilation, spec.groups), scale, shift)
    skip = _affine(_conv(x, ds_weight, spec.ds_stride), ds_scale, ds_shift)
    out = main + skip
    if spec.relu:
        out = torch.relu(out)
    return out.to(y.dtype)

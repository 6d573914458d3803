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


#: Takes an eval BatchNorm's statistics itself, also when autograd needs the graph: see :func:`_affine`.
SUPPORTS_BN_STATS = True
BN_STATS_DIFFERENTIABLE = True


def _affine(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, stats=None) -> torch.Tensor:
    """BN-apply in the promoted dtype (fp32 vectors on a bf16 conv output compute in fp32, as the
    fused kernels do in their epilogue), cast back to the activation dtype by the caller.

    With ``stats = (mean, var, eps)`` (``scale``/``shift`` an eval BN's weight and bias) it is
    ``F.batch_norm``, torchvision's own op, in that dtype: the same values as the fold, and
    BatchNorm's own backward, whose weight gradient ``sum(g * (t - mean)) * invstd`` stays +-inf
    for an infinite upstream gradient where the fold's ``sum(g * t) * s' - mean * s' * sum(g)``
    is ``inf - inf = NaN``."""
    if stats is None:
        return t * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    mean, var, eps = stats
    wide = torch.float64 in (scale.dtype, shift.dtype, mean.dtype, var.dtype)
    dt = torch.promote_types(t.dtype, torch.float64 if wide else torch.float32)
    return F.batch_norm(t.to(dt), mean.to(dt), var.to(dt), scale.to(dt), shift.to(dt), False, 0.0, eps)


def _conv(x, weight, stride, padding=(0, 0), dilation=(1, 1), groups=1):
    # The weight is in x's dtype except under autocast (see fusedres.functional), where
    # F.conv2d would cast it the same way.
    weight = weight.to(x.dtype)
    if groups == 1 and odd_bf16_cpu_channels(x, groups):  # oneDNN misplaces NaN/inf there (see the helper)
        x, weight = even_channels(x), even_channels(weight)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def conv_bn_act(x, weight, scale, shift, residual, spec, stats=None):
    """``act(conv2d(x, weight) * scale[c] + shift[c] (+ residual))`` (with ``stats``: an eval BN, see :func:`_affine`)."""
    out = _affine(_conv(x, weight, spec.stride, spec.padding, spec.dilation, spec.groups), scale, shift, stats)
    if residual is not None:
        out = out + residual
    if spec.relu:
        out = torch.relu(out)
    return out.to(x.dtype)


def block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec, stats=None, ds_stats=None):
    """``act(conv2d(y, weight)*scale + shift + conv2d(x, ds_weight, stride=ds_stride)*ds_scale + ds_shift)``."""
    main = _affine(_conv(y, weight, spec.stride, spec.padding, spec.dilation, spec.groups), scale, shift, stats)
    skip = _affine(_conv(x, ds_weight, spec.ds_stride), ds_scale, ds_shift, ds_stats)
    out = main + skip
    if spec.relu:
        out = torch.relu(out)
    return out.to(y.dtype)

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

#: Takes an eval BN's running statistics and applies them with torch's own BatchNorm op, as
#: torchvision does, where a fold into ``scale``/``shift`` first can turn a huge but finite
#: BN scale into inf (``gamma * rsqrt(var + eps)``) and give +-inf or NaN where BatchNorm's
#: output is finite.  Only calls without autograd get the statistics
#: (:func:`fusedres.functional._resolve_stats`); the autograd path folds them differentiably, in
#: the running statistics too, which BatchNorm's op is not.
SUPPORTS_BN_STATS = True


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


def _bn(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, stats) -> torch.Tensor:
    """``_affine`` of the fold of ``stats = (mean, var, eps)`` (or ``scale``/``shift`` themselves
    with ``stats`` None), as ``F.batch_norm`` computes it, in the same promoted dtype as ``_affine``."""
    if stats is None:
        return _affine(t, scale, shift)
    mean, var, eps = stats
    vectors = (mean, var, scale, shift)
    wide = t.dtype
    for v in vectors:
        wide = torch.promote_types(wide, v.dtype)
    return F.batch_norm(t.to(wide), *(v.to(wide) for v in vectors), False, 0.0, eps)


def _conv(x, weight, stride, padding=(0, 0), dilation=(1, 1), groups=1):
    # The weight is in x's dtype except under autocast (see fusedres.functional), where
    # F.conv2d would cast it the same way.
    weight = weight.to(x.dtype)
    if groups == 1 and odd_bf16_cpu_channels(x, groups):  # oneDNN misplaces NaN/inf there (see the helper)
        x, weight = even_channels(x), even_channels(weight)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def conv_bn_act(x, weight, scale, shift, residual, spec, stats=None):
    """``act(conv2d(x, weight) * scale[c] + shift[c] (+ residual))``; with ``stats = (mean, var, eps)``,
    ``act(batch_norm(conv2d(x, weight)) (+ residual))`` with ``scale``/``shift`` as the BN's weight and bias."""
    out = _bn(_conv(x, weight, spec.stride, spec.padding, spec.dilation, spec.groups), scale, shift, stats)
    if residual is not None:
        out = out + residual
    if spec.relu:
        out = torch.relu(out)
    return out.to(x.dtype)


def block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec, stats=None, ds_stats=None):
    """``act(conv2d(y, weight)*scale + shift + conv2d(x, ds_weight, stride=ds_stride)*ds_scale + ds_shift)``
    (each BN by its statistics where given, as in :func:`conv_bn_act`)."""
    main = _bn(_conv(y, weight, spec.stride, spec.padding, spec.dilation, spec.groups), scale, shift, stats)
    skip = _bn(_conv(x, ds_weight, spec.ds_stride), ds_scale, ds_shift, ds_stats)
    out = main + skip
    if spec.relu:
        out = torch.relu(out)
    return out.to(y.dtype)

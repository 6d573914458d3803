"""The ``cpu`` backend: oneDNN convolution with BN folded into the weights and fused post-ops.

What runs, per call:

* ``conv_bn_act``: one ``mkldnn::_convolution_pointwise`` call, weights pre-multiplied by
  ``scale`` and ``shift`` passed as the bias, ReLU as a oneDNN post-op; with a residual,
  the ``.binary`` overload adds it (binary ``add`` post-op) before the ReLU.  This is the
  same oneDNN path Inductor's CPU backend emits after freezing.
* ``block_tail``: the 1x1 downsample conv (folded BN as bias) then the main conv with the
  downsample output as the binary ``add`` operand and ReLU: two oneDNN calls, no
  elementwise passes.

Activations run channels_last (oneDNN's fast layout on CPU).  An NCHW input is converted
explicitly once; the output is channels_last either way, which is the same values and
shape.

Folded weights (reordered into oneDNN's blocked layout per input shape) are cached per weight tensor (weakly, so nothing outlives the model) and
reused only while the weight's version counter and the exact ``scale``/``shift`` values are
unchanged, so changing a parameter, loading a checkpoint or toggling train/eval can never
leave a stale fold behind.

Inference only: calls that need autograd, or that run under ``torch.compile`` (Inductor
does this fusion itself there), are declined and ``auto`` takes the reference.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

NAME = "cpu"


def _has_pointwise() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def is_available() -> bool:
    return _has_pointwise()


def why_unavailable() -> str:
    return "this PyTorch build has no oneDNN (mkldnn) fused convolution ops"


def _bf16_ok() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def unsupported_reason(spec) -> str | None:
    if spec.device_type != "cpu":
        return f"tensors are on {spec.device_type}, the cpu backend runs on CPU tensors"
    if spec.requires_grad:
        return "autograd is needed and the oneDNN path is inference-only"
    if torch.compiler.is_compiling():
        return "running under torch.compile (Inductor fuses the reference itself)"
    if spec.dtype == torch.float32:
        return None
    if spec.dtype == torch.bfloat16 and _bf16_ok():
        return None
    return f"dtype {spec.dtype} is not supported by oneDNN on this CPU"


class _Fold:
    __slots__ = ("version", "scale", "shift", "weight", "bias", "packed")


# oneDNN picks a blocked weight layout per problem; the reorder costs about as much as the
# fold, so reordered weights are kept per input shape (a few shapes per model at most).
_MAX_PACKED_SHAPES = 8


_cache = WeakIdKeyDictionary()


def _folded(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> _Fold:
    """``weight * scale[:, None, None, None]`` and ``shift`` in the weight's dtype, cached."""
    if weight.is_inference():
        # Inference tensors (e.g. a model copied inside torch.inference_mode) have no version
        # counter, so an in-place update could not be detected: fold afresh on every call.
        return _new_fold(weight, scale, shift)
    entry = _cache.get(weight)
    if (
        entry is not None
        and entry.version == weight._version
        and torch.equal(entry.scale, scale)
        and torch.equal(entry.shift, shift)
    ):
        return entry
    entry = _new_fold(weight, scale, shift)
    _cache[weight] = entry
    return entry


def _new_fold(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> _Fold:
    w = (weight.float() * scale.float().view(-1, 1, 1, 1)).to(weight.dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    entry = _Fold()
    entry.version = None if weight.is_inference() else weight._version
    entry.scale = scale.detach().clone()
    entry.shift = shift.detach().clone()
    entry.weight = w
    entry.bias = shift.detach().to(weight.dtype).contiguous()
    entry.packed = {}
    return entry


def _packed(entry: _Fold, x: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """The folded weight reordered into oneDNN's preferred blocked layout for ``x``'s shape."""
    key = tuple(x.shape)
    w = entry.packed.get(key)
    if w is None:
        if len(entry.packed) >= _MAX_PACKED_SHAPES:
            entry.packed.clear()
        w = torch._C._nn.mkldnn_reorder_conv2d_weight(
            entry.weight.to_mkldnn(), list(padding), list(stride), list(dilation), groups, list(key)
        )
        entry.packed[key] = w
    return w


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _conv(x, w, b, spec_stride, spec_padding, spec_dilation, groups, residual, relu):
    attr = "relu" if relu else "none"
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(
            x, w, b, list(spec_padding), list(spec_stride), list(spec_dilation), groups, attr, [], ""
        )
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, w, b, list(spec_padding), list(spec_stride), list(spec_dilation), groups,
        "add", None, attr if relu else None, [], "",
    )


def _fused_conv(x, weight, scale, shift, stride, padding, dilation, groups, residual, relu):
    fold = _folded(weight, scale, shift)
    x = _cl(x)
    w = _packed(fold, x, stride, padding, dilation, groups)
    return _conv(x, w, fold.bias, stride, padding, dilation, groups, residual, relu)


def conv_bn_act(x, weight, scale, shift, residual, spec):
    res = _cl(residual) if residual is not None else None
    return _fused_conv(x, weight, scale, shift, spec.stride, spec.padding, spec.dilation, spec.groups, res, spec.relu)


def block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec):
    skip = _fused_conv(x, ds_weight, ds_scale, ds_shift, spec.ds_stride, (0, 0), (1, 1), 1, None, False)
    return _fused_conv(y, weight, scale, shift, spec.stride, spec.padding, spec.dilation, spec.groups, skip, spec.relu)


def clear_cache() -> None:
    """Drop every folded/reordered weight (see :func:`fusedres.clear_caches`)."""
    _cache.clear()

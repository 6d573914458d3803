"""The ``cpu`` backend: oneDNN convolution with BN folded into the weights and fused post-ops.

What runs, per call:

* ``conv_bn_act``: one ``mkldnn::_convolution_pointwise`` call, weights pre-multiplied by
  ``scale`` and ``shift`` passed as the bias; with a residual, the ``.binary`` overload adds
  it (binary ``add`` post-op).  This is the same oneDNN path Inductor's CPU backend emits
  after freezing.  ReLU then runs in place on the output (oneDNN's ReLU post-op would turn
  NaN into 0).
* ``block_tail``: the 1x1 downsample conv (folded BN as bias) then the main conv with the
  downsample output as the binary ``add`` operand, then the in-place ReLU: two oneDNN calls.

Activations run channels_last (oneDNN's fast layout on CPU).  An NCHW input is converted
explicitly once; the output is channels_last either way, which is the same values and
shape.

Folded weights (reordered into oneDNN's blocked layout per input shape) are cached per
weight tensor (weakly, so nothing outlives the model) and reused only while the weight's
data (storage, dtype and version counter: :class:`fusedres.backends.WeightCache`) and the
exact ``scale``/``shift`` values are unchanged, so changing a parameter, loading a
checkpoint, ``.half()`` / ``.to()`` or toggling train/eval can never leave a stale fold
behind.  Under autocast (an fp32 model run in bf16) the fold is made in fp32 and stored in
the activation dtype.

Inference only: calls that need autograd, or that run under ``torch.compile`` (Inductor
does this fusion itself there), are declined and ``auto`` takes the reference.
"""

from __future__ import annotations

import torch

from . import WeightCache

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
    __slots__ = ("scale", "shift", "weight", "bias", "packed")


# oneDNN picks a blocked weight layout per problem; the reorder costs about as much as the
# fold, so reordered weights are kept per input shape (a few shapes per model at most).
_MAX_PACKED_SHAPES = 8


_cache = WeightCache()


def _folded(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> _Fold:
    """``weight * scale[:, None, None, None]`` and ``shift`` in ``dtype`` (the activations'), cached.

    ``dtype`` differs from the weight's only under autocast (an fp32 model run in bf16): the
    fold is computed in fp32 and rounded once.  The entry is reused while the weight's data
    (see :class:`fusedres.backends.WeightCache`) and the exact ``scale``/``shift`` values
    are unchanged.
    """
    entry = _cache.get(weight, dtype)
    if entry is not None and torch.equal(entry.scale, scale) and torch.equal(entry.shift, shift):
        return entry
    w = (weight.float() * scale.float().view(-1, 1, 1, 1)).to(dtype)
    entry = _Fold()
    entry.scale = scale.detach().clone()
    entry.shift = shift.detach().clone()
    entry.weight = w.contiguous(memory_format=torch.channels_last)
    entry.bias = shift.detach().to(dtype).contiguous()
    entry.packed = {}
    return _cache.put(weight, entry, dtype)


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
    if residual is None:
        out = torch.ops.mkldnn._convolution_pointwise(
            x, w, b, list(spec_padding), list(spec_stride), list(spec_dilation), groups, "none", [], ""
        )
    else:
        out = torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, w, b, list(spec_padding), list(spec_stride), list(spec_dilation), groups,
            "add", None, None, [], "",
        )
    # ReLU in place on the fresh output, not as oneDNN's eltwise post-op: that one is max(x, 0),
    # which turns NaN into 0 where torch.relu keeps it (a diverged input or checkpoint would
    # give plausible-looking outputs).  The output is still cache-hot: ResNet-50 at batch 8
    # took 354 ms either way on 2 cores (median of 5, 2026-11-30).
    return out.relu_() if relu else out


def _fused_conv(x, weight, scale, shift, stride, padding, dilation, groups, residual, relu):
    fold = _folded(weight, scale, shift, x.dtype)
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

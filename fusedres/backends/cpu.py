"""The ``cpu`` backend: oneDNN convolution with BN folded into the weights and fused post-ops.

What runs, per call:

* ``conv_bn_act``: one ``mkldnn::_convolution_pointwise`` call, weights pre-multiplied by
  ``scale`` and ``shift`` passed as the bias (given an eval BN's running statistics, the fold
  normalises them first, and is cached with the filter); with a residual, the ``.binary`` overload adds
  it (binary ``add`` post-op in bf16, a separate in-place add in fp32: same values, faster).
  This is the same oneDNN path Inductor's CPU backend emits
  after freezing.  ReLU then runs in place on the output (oneDNN's ReLU post-op would turn
  NaN into 0).
* ``block_tail``: the 1x1 downsample conv (folded BN as bias) then the main conv accumulated
  into that output in place (oneDNN's ``sum`` post-op), then the in-place ReLU: two oneDNN calls.
* ``conv_bn_act_into``: ``conv_bn_act`` with a residual the caller gives up (a fused model's
  block input that nothing else can see: :meth:`fusedres.modules.FusedResNet`): the conv is
  accumulated into it in place the same way, which is cheaper than the binary post-op's separate
  operand and allocates nothing.

Activations run channels_last (oneDNN's fast layout on CPU).  An NCHW input is converted
explicitly once; the output is channels_last either way, which is the same values and
shape.

Folded weights (reordered into oneDNN's blocked layout per input shape) are cached per
weight tensor (weakly, so nothing outlives the model) and reused only while the weight's
data (storage, dtype and version counter: :class:`fusedres.backends.WeightCache`) and the
BN vectors' values (compared on every call) are unchanged, so changing a parameter, loading a
checkpoint, ``.half()`` / ``.to()`` or toggling train/eval can never leave a stale fold
behind, and an unchanged eval block runs no fold at all.  Under autocast (an fp32 model run in bf16) the fold is made in fp32 and stored in
the activation dtype.

Inference only: calls that need autograd, or that run under ``torch.compile`` (Inductor
does this fusion itself there), are declined and ``auto`` takes the reference.  So are calls
made while oneDNN is switched off (``torch.backends.mkldnn.enabled = False`` or its ``flags``
context), where torchvision's own convs do not use it either.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import WeightCache, data_key, even_channels, odd_bf16_cpu_channels, op_checks, register_flops

NAME = "cpu"


def _has_pointwise() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def is_available() -> bool:
    return _has_pointwise()


def why_unavailable() -> str:
    return "this PyTorch build has no oneDNN (mkldnn) fused convolution ops"


def _bf16_ok() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


#: Strides, paddings and dilations up to this are oneDNN's; one of 2**63 - 1 failed to build a
#: primitive (torch's own conv, the reference, takes it).
_MAX_GEOMETRY = 2**31 - 1


def unsupported_reason(spec) -> str | None:
    if spec.device_type != "cpu":
        return f"tensors are on {spec.device_type}, the cpu backend runs on CPU tensors"
    if spec.requires_grad:
        return "autograd (or forward-mode AD or a torch.func transform) is needed and the oneDNN path is inference-only"
    if torch.compiler.is_compiling():
        return "running under torch.compile (Inductor fuses the reference itself)"
    if not torch._C._get_mkldnn_enabled():
        return "oneDNN is switched off (torch.backends.mkldnn.enabled is False) and this backend's convolutions are oneDNN's"
    geometry = (*spec.stride, *spec.padding, *spec.dilation, *(spec.ds_stride or ()))
    if max(geometry) > _MAX_GEOMETRY:
        return f"a stride, padding or dilation above {_MAX_GEOMETRY} (oneDNN builds no convolution for it)"
    if spec.dtype == torch.float32:
        return None
    if spec.dtype == torch.bfloat16 and _bf16_ok():
        if spec.groups > 1 and (spec.in_channels // spec.groups) % 2:
            return ("a bf16 grouped conv with an odd channel count per group (oneDNN puts NaN at the wrong "
                    "output positions for a NaN or inf input there)")
        return None
    return f"dtype {spec.dtype} is not supported by oneDNN on this CPU"


class _Fold:
    """A cached fold: ``weight`` and ``bias`` for the oneDNN call.  ``affine`` is None, or, when
    the fold cannot reproduce conv-then-BN (a non-finite BN scale: ``var + eps == 0`` or an
    infinite gamma, a scale above ``_MAX_FOLDED_SCALE``, or a folded weight that overflows),
    ``(scale, shift)`` to apply to the
    output of the unscaled ``weight`` instead, as the reference does: there ``y * inf`` is
    +-inf where a folded filter's sum of infinities would be NaN."""

    __slots__ = ("values", "weight", "bias", "affine", "packed")


# oneDNN picks a blocked weight layout per problem; the reorder costs about as much as the
# fold, so reordered weights are kept per input shape (a few shapes per model at most).
_MAX_PACKED_SHAPES = 8


_cache = WeightCache()

# A BN scale, or a folded filter entry, above this is applied to the conv output instead of folded
# into the filter: a folded filter's partial sums can overflow where the unscaled conv's, scaled after,
# stay finite (a gamma of 3e38 gave 580 infinities torchvision did not have; weights of +-1e18 with a
# scale of 1e19 gave inf where torch's conv cancels to 0).  BN scales are gamma / sqrt(var + eps), at
# most a few thousand in trained models, and filter entries are small.
_MAX_FOLDED_SCALE = 2.0 ** 64


def _folded(weight: torch.Tensor, scale, shift, stats, dtype: torch.dtype) -> _Fold:
    """The folded filter and bias in ``dtype`` (the activations'), cached per weight.

    ``scale``/``shift`` are a folded affine, or with ``stats = (mean, var, eps)`` an eval BN's
    weight and bias (the fold is then ``scale / sqrt(var + eps)``, ``shift - mean * that``).
    ``dtype`` differs from the weight's only under autocast: the fold is computed in fp32
    and rounded once.  An entry is reused while the weight's data is unchanged
    (:class:`fusedres.backends.WeightCache`) and the vectors hold the same values: they are
    compared on every call (a few hundred floats), so no write to a BN tensor, in place,
    through ``.data`` or by replacing it, can leave a stale fold.
    """
    vectors = (scale, shift) + ((stats[0], stats[1]) if stats is not None else (None, None))
    eps = stats[2] if stats is not None else None
    entry = _cache.get(weight, (dtype, eps))
    if entry is not None:
        for a, b in zip(entry.values, vectors):  # a loop, not all(...): it runs on every call
            if a is None or b is None:
                if a is not b:
                    break
            elif a.dtype != b.dtype or not torch.equal(a, b):  # equal is False for another shape
                break
        else:
            return entry
    # The weight's stamp and the vectors' copies are taken first and the fold is made from those
    # copies: a write from another thread while this runs then leaves the entry stale, so the next
    # call folds again, where a stamp or copy taken after would keep a fold of the old values.
    key = data_key(weight)
    entry = _Fold()
    entry.values = values = tuple(None if v is None else v.detach().clone() for v in vectors)
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    s, t = values[0].to(wide), values[1].to(wide)
    if stats is not None:
        s = s * torch.rsqrt(values[3].to(wide) + eps)
        t = t - values[2].to(wide) * s
    w = weight.detach().to(wide)
    folded = (w * s.view(-1, 1, 1, 1)).to(dtype)
    # (amax propagates NaN, so a NaN anywhere fails the bounds too)
    if bool(s.abs().amax() <= _MAX_FOLDED_SCALE) and bool(folded.abs().amax() <= _MAX_FOLDED_SCALE):
        entry.weight, entry.bias, entry.affine = folded, t.to(dtype).contiguous(), None
    else:  # degenerate BN or a NaN/inf weight: torch's conv, then the BN on its output, as the reference
        entry.weight, entry.bias, entry.affine = w.to(dtype), None, _output_affine(entry.values, eps, s, t)
    entry.weight = entry.weight.contiguous(memory_format=torch.channels_last)
    entry.packed = {}
    return _cache.put(weight, entry, (dtype, eps), key=key)


def _output_affine(values, eps, s, t):
    """What a degenerate fold applies to the unscaled conv output ``y``: an eval BN's statistics
    through ``F.batch_norm``, torchvision's own op and order (scaling by ``gamma * invstd`` after
    a subtraction of the mean, which stays finite where a precomputed scale or shift overflows);
    a given affine as ``y * scale + shift``."""
    scale, shift, mean, var = values
    if mean is not None:
        vectors = (mean, var, scale, shift)
        if len({v.dtype for v in vectors}) > 1:  # F.batch_norm takes one dtype (fp32 with a bf16 input)
            vectors = tuple(v.to(s.dtype) for v in vectors)
        return lambda y: torch.nn.functional.batch_norm(y, *vectors, False, 0.0, eps)
    s, t = s.view(1, -1, 1, 1), t.view(1, -1, 1, 1)
    return lambda y: y.mul_(s).add_(t)


def _packed(x, fold: _Fold, stride, padding, dilation, groups):
    """``x`` channels_last and the folded filter reordered for its shape (cached per shape).

    A bf16 ``x`` with an odd channel count (a ResNet stem's 3; ``groups`` is 1 there, see
    :func:`unsupported_reason`) gets a zero channel appended, and the filter a zero input
    channel: oneDNN would otherwise put NaN at the wrong output positions for a NaN or inf
    input (:func:`fusedres.backends.odd_bf16_cpu_channels`); finite outputs are the same."""
    x = x.contiguous(memory_format=torch.channels_last)
    if odd_bf16_cpu_channels(x, groups):
        x = even_channels(x)
    shape = x.shape
    w = fold.packed.get(shape)
    if w is None:
        if len(fold.packed) >= _MAX_PACKED_SHAPES:
            fold.packed.clear()
        weight = fold.weight if fold.weight.shape[1] * groups == shape[1] else even_channels(fold.weight)
        w = fold.packed[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.contiguous(memory_format=torch.channels_last).to_mkldnn(), padding, stride, dilation, groups,
            list(shape),
        )
    return x, w


def _torch_conv(x, fold: _Fold, stride, padding, dilation, groups):
    """A degenerate fold's convolution (``fold.affine`` set): ``F.conv2d``, torchvision's own op.
    A NaN or inf weight reaches the outputs whose window overlaps the zero padding where torch's
    conv multiplies the padding (its native kernel, for small batch-1 inputs in fp32) and not where
    it skips it (oneDNN, which ``_packed``'s call always is): torch's choice, not ours."""
    x, w = x.contiguous(memory_format=torch.channels_last), fold.weight
    if odd_bf16_cpu_channels(x, groups):
        x, w = even_channels(x), even_channels(w)
    return torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)


def _conv(x, fold: _Fold, stride, padding, dilation, groups, residual, relu):
    """One oneDNN convolution with the folded filter (reordered for ``x``'s shape, cached) and
    bias, the residual added as a post-op, then the ReLU."""
    if fold.affine is not None:
        out = fold.affine(_torch_conv(x, fold, stride, padding, dilation, groups))
        if residual is not None:
            out.add_(residual)
        return out.relu_() if relu else out
    x, w = _packed(x, fold, stride, padding, dilation, groups)
    if residual is None or x.dtype == torch.float32:
        out = torch.ops.mkldnn._convolution_pointwise(x, w, fold.bias, padding, stride, dilation, groups, "none",
                                                      [], "")
        # fp32: the residual added by a separate pass, bit-identical to the binary post-op (both add
        # the same two fp32 values) and faster on oneDNN 3.12: a 1x1 64->256 conv at 56x56 took
        # 3.9 against 5.8 ms at batch 8, 0.36 against 0.51 ms at batch 1 (2 cores, AMD EPYC,
        # 2026-12-02).  bf16 keeps the post-op: it adds before rounding, like the eager path's
        # ``sum`` (``_conv_into``), and the separate add would round twice.
        if residual is not None:
            out.add_(residual)
    else:
        out = torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual.contiguous(memory_format=torch.channels_last), w, fold.bias, padding, stride, dilation,
            groups, "add", None, None, [], "",
        )
    # ReLU in place on the fresh output, not as oneDNN's eltwise post-op: that one is max(x, 0),
    # which turns NaN into 0 where torch.relu keeps it (a diverged input or checkpoint would
    # give plausible-looking outputs).  The output is still cache-hot: ResNet-50 at batch 8
    # took 354 ms either way on 2 cores (median of 5, 2026-11-30).
    return out.relu_() if relu else out


def _conv_into(acc, x, fold: _Fold, stride, padding, dilation, groups, relu):
    """``acc += conv(x) + bias`` in place (oneDNN's ``sum`` post-op), then the ReLU: for an
    ``acc`` this backend made itself (the downsample output), so no caller's tensor is
    written.  It reads ``acc`` where it writes it, which is cheaper than the binary ``add``
    post-op's separate operand: ResNet-50 b8 381.5 against 388.8 ms (2 cores, interleaved
    medians of 10, 2026-11-30), bit-identical output."""
    if fold.affine is not None:
        acc.add_(fold.affine(_torch_conv(x, fold, stride, padding, dilation, groups)))
    else:
        x, w = _packed(x, fold, stride, padding, dilation, groups)
        torch.ops.mkldnn._convolution_pointwise_.binary(acc, x, w, fold.bias, padding, stride, dilation, groups,
                                                        "add", 1.0, None, [], "")
    return acc.relu_() if relu else acc


def conv_bn_act_into(acc, x, weight, scale, shift, spec, stats=None):
    """``conv_bn_act`` with ``acc`` as the residual, written in place with the output (returned).

    Only for a residual the caller owns and gives up (:class:`fusedres.functional.PreparedConv`
    calls it for ``donate_residual=True``; eager calls only, never through the op, which
    mutates nothing).  Bit-identical to the binary post-op: both add the same two fp32 values.
    ResNet-50 b8 on 2 cores: 350 against 367 ms per forward (interleaved medians of 12,
    2026-11-30)."""
    fold = _folded(weight, scale, shift, stats, x.dtype)
    return _conv_into(acc.contiguous(memory_format=torch.channels_last), x, fold, spec.stride, spec.padding,
                      spec.dilation, spec.groups, spec.relu)


#: ReLU is a separate in-place pass over the output (see ``_conv``), not an epilogue: the eval stem
#: applies it after the max-pool instead, on a quarter of the elements (:mod:`fusedres.modules`).
SEPARATE_RELU = True

#: Takes an eval BatchNorm's running statistics and folds them into the cached filter itself.
SUPPORTS_BN_STATS = True


def conv_bn_act_impl(x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups, relu):
    """``act(conv2d(x, weight) * scale[k] + shift[k] (+ residual))`` (with ``mean``/``var``: an eval BN's
    weight and bias normalised by them), one oneDNN call; output channels_last."""
    stats = None if mean is None else (mean, var, eps)
    return _conv(x, _folded(weight, scale, shift, stats, x.dtype), stride, padding, dilation, groups, residual,
                 relu)


def block_tail_impl(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var,
                    ds_eps, stride, padding, dilation, groups, ds_stride, relu):
    """The block tail: the 1x1 downsample conv, then the main conv with it as the residual (two oneDNN calls)."""
    ds_stats = None if ds_mean is None else (ds_mean, ds_var, ds_eps)
    skip = _conv(x, _folded(ds_weight, ds_scale, ds_shift, ds_stats, y.dtype), ds_stride, (0, 0), (1, 1), 1,
                 None, False)
    stats = None if mean is None else (mean, var, eps)
    return _conv_into(skip, y, _folded(weight, scale, shift, stats, y.dtype), stride, padding, dilation, groups,
                      relu)


# The same two functions as torch.library ops, for calls that dispatch modes, profilers or
# tracers must see (``spec.dispatch``); eager inference calls the functions directly.  The ops
# check their operands (eager and fake alike, ``op_checks``): they are public, and a compiled
# graph calls them without ``fusedres.functional``.
_DTYPES = (torch.float32, torch.bfloat16)
# A bf16 call may pass the fp32 weight: under autocast the fold is made in fp32 from the master
# weight and rounded once, whether or not the op is dispatched (a profiler or a mode watching
# must not change the numerics, nor make every call fold again).
_W_DTYPES = (torch.float32,)
_require = op_checks.require("cpu")


@torch.library.custom_op("fusedres::conv_bn_act_cpu", mutates_args=())
def conv_bn_act_cpu(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], mean: Optional[Tensor],
    var: Optional[Tensor], eps: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
    relu: bool,
) -> Tensor:
    op_checks.check_conv_bn_act(_require, _DTYPES, x, weight, scale, shift, residual, mean, var, stride, padding,
                                dilation, groups, w_dtypes=_W_DTYPES, eps=eps)
    return conv_bn_act_impl(x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups, relu)


@torch.library.custom_op("fusedres::block_tail_cpu", mutates_args=())
def block_tail_cpu(
    y: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, x: Tensor, ds_weight: Tensor, ds_scale: Tensor,
    ds_shift: Tensor, mean: Optional[Tensor], var: Optional[Tensor], eps: float, ds_mean: Optional[Tensor],
    ds_var: Optional[Tensor], ds_eps: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
    ds_stride: list[int], relu: bool,
) -> Tensor:
    op_checks.check_block_tail(_require, _DTYPES, y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean,
                               var, ds_mean, ds_var, stride, padding, dilation, groups, ds_stride,
                               stats_together=False, w_dtypes=_W_DTYPES, eps=eps, ds_eps=ds_eps)
    return block_tail_impl(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean,
                           ds_var, ds_eps, stride, padding, dilation, groups, ds_stride, relu)


@conv_bn_act_cpu.register_fake
def _(x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups, relu):
    out = op_checks.check_conv_bn_act(torch._check, _DTYPES, x, weight, scale, shift, residual, mean, var, stride,
                                      padding, dilation, groups, w_dtypes=_W_DTYPES, eps=eps)
    return x.new_empty(out).contiguous(memory_format=torch.channels_last)


@block_tail_cpu.register_fake
def _(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var, ds_eps,
      stride, padding, dilation, groups, ds_stride, relu):
    out = op_checks.check_block_tail(torch._check, _DTYPES, y, weight, scale, shift, x, ds_weight, ds_scale,
                                     ds_shift, mean, var, ds_mean, ds_var, stride, padding, dilation, groups, ds_stride,
                                     stats_together=False, w_dtypes=_W_DTYPES, eps=eps, ds_eps=ds_eps)
    return y.new_empty(out).contiguous(memory_format=torch.channels_last)


register_flops("conv_bn_act_cpu", "block_tail_cpu")


def conv_bn_act(x, weight, scale, shift, residual, spec, stats=None):
    if not spec.dispatch:  # the op's implementation, inlined: eager inference with nothing watching
        return _conv(x, _folded(weight, scale, shift, stats, x.dtype), spec.stride, spec.padding, spec.dilation,
                     spec.groups, residual, spec.relu)
    mean, var, eps = stats if stats is not None else (None, None, 0.0)
    return torch.ops.fusedres.conv_bn_act_cpu(x, weight, scale, shift, residual, mean, var, eps, spec.stride,
                                              spec.padding, spec.dilation, spec.groups, spec.relu)


def block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec, stats=None, ds_stats=None):
    mean, var, eps = stats if stats is not None else (None, None, 0.0)
    ds_mean, ds_var, ds_eps = ds_stats if ds_stats is not None else (None, None, 0.0)
    op = torch.ops.fusedres.block_tail_cpu if spec.dispatch else block_tail_impl
    return op(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var, ds_eps,
              spec.stride, spec.padding, spec.dilation, spec.groups, spec.ds_stride, spec.relu)


def clear_cache() -> None:
    """Drop every folded/reordered weight (see :func:`fusedres.clear_caches`)."""
    _cache.clear()

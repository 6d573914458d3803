"""The ``cuda`` backend: CUTLASS implicit-GEMM conv kernels from the compiled ``fusedres._C``.

What runs, per call (sources in ``csrc/cuda``):

* ``conv_bn_act``: one small kernel folds the BN scale into the filter
  (``W * scale`` in fp32, rounded once, written KRSC) and writes the fp32 bias; given an
  eval BN's running statistics it normalises them itself
  (``scale / sqrt(var + eps)``, ``shift - mean * scale``), so nothing else runs; then one CUTLASS 2.x implicit-GEMM
  conv2d forward on tensor cores (fp16/bf16 in, fp32 accumulate) whose epilogue computes
  ``act(acc + shift[k] (+ residual))`` in fp32 and rounds once.  CUTLASS 2.x conv
  epilogues only take a scalar alpha, hence the fold; it is recomputed per call rather
  than cached because comparing ``scale``/``shift`` values against a cache would cost a
  device-to-host sync on every call.
* ``block_tail``: one kernel (after folding both filters): each output tile runs the
  main conv's implicit GEMM and then the 1x1 downsample conv's implicit GEMM into the same
  fp32 accumulators, and one epilogue computes ``act(acc + shift + ds_shift)``.  The
  downsample output never goes through memory.

Layout: the kernels read and write channels_last (NHWC).  An NCHW input or residual is
converted explicitly here (a visible copy per call; keep models channels_last to avoid
it).  The output is always channels_last (same values and shape).

Channel counts: the kernels need every channel count to be a multiple of 8 (128-bit
accesses).  ``conv_bn_act`` with other input channel counts (the ResNet stem, ``C_in = 3``)
pads the input and the filter with zero channels up to the next multiple of 8: a visible
copy of the input (the padded filter is cached per weight, as is the filter's cast to the
activation dtype under autocast).  It is correct but not fast: the kernel's K tile covers 32 channels of
one filter tap, so with 8 channels three quarters of each tile are masked off (the stem
runs at a fraction of the tensor cores' rate; CUTLASS's few-channels iterator would fix
that and is not built here).

Limits, declined by :func:`unsupported_reason` so ``auto`` falls back: CUDA tensors
only, fp16/bf16 only, no autograd (forward kernels only), ``groups == 1``, output channels
(and, for ``block_tail``, both input channel counts) multiples of 8, filters at most 32x32,
one sample and each filter under 2 GiB.
"""

from __future__ import annotations

import torch

from . import WeightCache, data_key, op_checks, register_flops

NAME = "cuda"

#: Channel counts must be multiples of this (8 x 16-bit = one 128-bit access).
ALIGNMENT = 8
#: CUTLASS's optimized activation iterator keeps one mask bit per filter row/column.
MAX_FILTER = 32
_MIN_CAPABILITY = (8, 0)
#: CUTLASS's iterators use 32-bit byte offsets: one sample (or filter) must stay below 2 GiB.
_MAX_BYTES = 2**31 - 1

try:
    from fusedres import _C  # noqa: F401  (loading it registers torch.ops.fusedres.*_cuda)
except ImportError as exc:
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def _out_hw(h, w, kernel_size, stride, padding, dilation):
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip((h, w), kernel_size, stride, padding, dilation)
    )


def _empty_out(x: torch.Tensor, cout: int, oh: int, ow: int) -> torch.Tensor:
    return torch.empty(
        (x.shape[0], cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )


if _IMPORT_ERROR is None:

    # The fakes check what the C++ ops check (ops.cu), with the checks every backend's ops
    # share, so a compiled graph reports the eager errors.
    _DTYPES = (torch.float16, torch.bfloat16)

    def _check_cuda_only(x, weight, groups, channels):
        torch._check(groups == 1, lambda: f"fusedres cuda: groups must be 1, got {groups}")
        for name, c in channels:
            torch._check(c % ALIGNMENT == 0,
                         lambda: f"fusedres cuda: {name}={c} is not a multiple of {ALIGNMENT} (128-bit accesses)")

    @torch.library.register_fake("fusedres::conv_bn_act_cuda")
    def _conv_bn_act_fake(x, weight, scale, shift, residual, mean, var, eps, stride, padding, dilation, groups,
                          relu):
        out = op_checks.check_conv_bn_act(torch._check, _DTYPES, x, weight, scale, shift, residual, mean, var,
                                          stride, padding, dilation, groups, eps=eps)
        _check_cuda_only(x, weight, groups, (("in_channels", x.shape[1]), ("out_channels", weight.shape[0])))
        return _empty_out(x, *out[1:])

    @torch.library.register_fake("fusedres::block_tail_cuda")
    def _block_tail_fake(
        y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var, ds_eps,
        stride, padding, dilation, groups, ds_stride, relu,
    ):
        out = op_checks.check_block_tail(torch._check, _DTYPES, y, weight, scale, shift, x, ds_weight, ds_scale,
                                         ds_shift, mean, var, ds_mean, ds_var, stride, padding, dilation, groups,
                                         ds_stride, stats_together=False, eps=eps, ds_eps=ds_eps)
        _check_cuda_only(y, weight, groups, (("in_channels", y.shape[1]), ("out_channels", weight.shape[0]),
                                             ("ds_in_channels", x.shape[1])))
        return _empty_out(y, *out[1:])

    register_flops("conv_bn_act_cuda", "block_tail_cuda")


def is_available() -> bool:
    return _IMPORT_ERROR is None and torch.cuda.is_available() and _capable()


def _capability() -> tuple[int, int]:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.major, props.minor


def _capable() -> bool:
    return _capability() >= _MIN_CAPABILITY


def why_unavailable() -> str:
    if _IMPORT_ERROR is not None:
        return (
            "the compiled extension fusedres._C is not importable (the package was built "
            f"without it, or it does not load here): {_IMPORT_ERROR}"
        )
    if not torch.cuda.is_available():
        return "fusedres._C is built, but torch.cuda.is_available() is False (no usable GPU)"
    if not _capable():
        cap = ".".join(map(str, _capability()))
        return f"the kernels need compute capability 8.0 or newer (tensor-core mma.sync), this GPU has {cap}"
    return ""


def unsupported_reason(spec) -> str | None:
    if spec.device_type != "cuda":
        return f"tensors are on {spec.device_type}, the cuda backend runs on CUDA tensors"
    if spec.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {spec.dtype} is not supported (the CUTLASS kernels are fp16/bf16 only)"
    if spec.requires_grad:
        return "autograd is needed and the CUDA kernels are forward-only"
    if spec.groups != 1:
        return f"groups={spec.groups} (grouped convolution is not implemented)"
    if spec.in_channels == 0 or spec.out_channels == 0:
        return "a conv with zero input or output channels (nothing for the kernels to tile)"
    channels = {"out_channels": spec.out_channels}
    if spec.has_downsample:  # conv_bn_act pads its input channels, block_tail does not
        channels.update(in_channels=spec.in_channels, ds_in_channels=spec.ds_in_channels)
    for name, c in channels.items():
        if c % ALIGNMENT:
            return f"{name}={c} is not a multiple of {ALIGNMENT} (128-bit accesses)"
    if max(spec.kernel_size) > MAX_FILTER:
        return f"kernel_size={spec.kernel_size} exceeds {MAX_FILTER}"
    return _size_limit_reason(spec)


def _size_limit_reason(spec) -> str | None:
    """What ``batch_chunk`` (csrc/cuda/ops.cu) refuses: one sample of an activation, or a
    folded filter, of 2 GiB or more (CUTLASS's 32-bit offsets; the batch is chunked)."""
    (h, w), (hd, wd), (oh, ow) = spec.input_size, spec.ds_input_size, spec.output_size
    kh, kw = spec.kernel_size
    k, cd = spec.out_channels, spec.ds_in_channels
    # conv_bn_act pads its input channels to the alignment (see _pad_channels).
    c = spec.in_channels if spec.has_downsample else -(-spec.in_channels // ALIGNMENT) * ALIGNMENT
    size = spec.dtype.itemsize
    for name, count in (("input sample", c * h * w), ("output sample", k * oh * ow),
                        ("downsample input sample", cd * hd * wd), ("filter", k * kh * kw * c),
                        ("downsample filter", k * cd)):
        if count * size > _MAX_BYTES:
            return f"one {name} is {count * size} bytes, 2 GiB or more: beyond the kernels' 32-bit offsets"
    return None


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a channels_last tensor the kernels can read with 128-bit accesses.

    A no-op for a channels_last tensor; one explicit copy for NCHW or (eagerly) for a view
    whose data pointer is not 16-byte aligned.  Under ``torch.compile`` there is no data
    pointer to look at; the op itself then rejects a misaligned view with a clear error.
    """
    t = t.contiguous(memory_format=torch.channels_last)
    if not torch.compiler.is_compiling() and t.data_ptr() % 16:
        t = t.clone(memory_format=torch.channels_last)
    return t


_weights = WeightCache()


def _kernel_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype`` with zero input channels appended up to a multiple of
    :data:`ALIGNMENT`, cached per weight (:class:`fusedres.backends.WeightCache`).

    A no-op (the weight itself) when neither is needed; the cast happens under autocast (an
    fp32 model run in fp16/bf16), the padding for the ResNet stem (3 channels).
    """
    pad = -weight.shape[1] % ALIGNMENT
    if pad == 0 and weight.dtype == dtype:
        return weight
    if torch.compiler.is_compiling():
        # Under torch.compile this is traced into the graph (no cache: no data to key on).
        return torch.nn.functional.pad(weight.to(dtype), (0, 0, 0, 0, 0, pad))
    wk = _weights.get(weight, dtype)
    if wk is None:
        key = data_key(weight)  # before the copy reads the weight (see WeightCache.put)
        wk = _weights.put(weight, torch.nn.functional.pad(weight.detach().to(dtype), (0, 0, 0, 0, 0, pad)), dtype,
                          key=key)
    return wk


def _pad_channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` (channels_last) with zero input channels appended up to a multiple of
    :data:`ALIGNMENT` (the convolution is unchanged with :func:`_kernel_weight`'s filter).
    Copies only when padding is needed."""
    c = x.shape[1]
    pad = -c % ALIGNMENT
    if pad == 0:
        return _nhwc(x)
    xp = torch.empty(
        (x.shape[0], c + pad, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
        memory_format=torch.channels_last,
    )
    xp[:, :c].copy_(x)
    xp[:, c:].zero_()
    return xp


#: Takes an eval BatchNorm's running statistics: the filter-fold kernel computes the
#: normalised scale and the epilogue's bias from them (no separate host-side fold).
SUPPORTS_BN_STATS = True
_NO_STATS = (None, None, 0.0)


def conv_bn_act(x, weight, scale, shift, residual, spec, stats=None):
    return torch.ops.fusedres.conv_bn_act_cuda(
        _pad_channels(x), _kernel_weight(weight, x.dtype), scale, shift,
        None if residual is None else _nhwc(residual), *(stats or _NO_STATS),
        list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups, spec.relu,
    )


def block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec, stats=None, ds_stats=None):
    return torch.ops.fusedres.block_tail_cuda(
        _nhwc(y), _kernel_weight(weight, y.dtype), scale, shift, _nhwc(x), _kernel_weight(ds_weight, y.dtype),
        ds_scale, ds_shift,
        *(stats or _NO_STATS), *(ds_stats or _NO_STATS),
        list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups,
        list(spec.ds_stride), spec.relu,
    )

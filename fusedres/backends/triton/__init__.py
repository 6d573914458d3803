"""The ``triton`` backend: fused implicit-GEMM conv kernels written in Triton.

* ``conv_bn_act`` -> ``torch.ops.fusedres.conv_bn_act_triton``: one launch computing
  ``act(conv2d(x, w) * scale + shift (+ residual))``.
* ``block_tail`` -> ``torch.ops.fusedres.block_tail_triton``: one launch computing the main
  conv and the 1x1 downsample conv as two GEMMs into one epilogue.

* ``torch.ops.fusedres.conv_train_fwd_triton`` (used by ``fusedres.training``): one launch
  computing a train-mode conv's pre-BN output and its batch statistics, optionally with the
  previous BN-apply + ReLU applied in the operand load.

An eval ``BasicBlock`` is therefore 2 launches and a ``Bottleneck`` 3.  Kernels:
``kernels.py``; host launch, tiles and autotuning: ``launch.py``; op registration: ``ops.py``.

Differentiable: the forward is the fused kernel, the backward runs through ATen
(``convolution_backward`` plus a recomputed conv for the BN-scale gradient; see ``ops.py``).
Backward only: calls under forward-mode AD or a ``torch.func`` transform are declined
(``ConvSpec.transform``), so ``auto`` takes the reference for them.

Runs on CUDA tensors, or on CPU tensors through the Triton interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported (slow; for tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

NAME = "triton"

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    return _HAS_TRITON and (torch.cuda.is_available() or _interpreting())


def why_unavailable() -> str:
    if not _HAS_TRITON:
        return "the triton package is not installed"
    return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU tensors)"


def unsupported_reason(spec) -> str | None:
    if spec.device_type != "cuda" and not (spec.device_type == "cpu" and _interpreting()):
        return f"tensors are on {spec.device_type}; the triton backend needs CUDA tensors"
    if spec.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {spec.dtype} is not supported (fp16, bf16, fp32 only)"
    if spec.transform:
        # The ops' autograd is backward-only: a dual tensor's tangent would be dropped (a silent
        # zero JVP) and torch.func.grad/jacrev refuse an autograd.Function without setup_context.
        return ("forward-mode AD or a torch.func transform is active and the triton ops define only a backward "
                "(no forward-mode derivative or functorch rule)")
    (h, w), (hd, wd), (oh, ow) = spec.input_size, spec.ds_input_size, spec.output_size
    kh, kw = spec.kernel_size
    return _launch.size_limit_reason(
        spec.batch * oh * ow, spec.out_channels * (spec.in_channels // spec.groups) * kh * kw,
        (("x", spec.in_channels * h * w), ("out", spec.out_channels * oh * ow),
         ("ds input", spec.ds_in_channels * hd * wd)),
    )


if _HAS_TRITON:
    from . import launch as _launch
    from . import ops as _ops  # registers torch.ops.fusedres.*_triton


#: Takes an eval BatchNorm's running statistics and folds them in the kernel epilogue.
SUPPORTS_BN_STATS = True


def conv_bn_act(x, weight, scale, shift, residual, spec, stats=None):
    mean, var, eps = stats if stats is not None else (None, None, 0.0)
    args = [x, weight, scale, shift, residual, mean, var, eps,
            list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups, spec.relu]
    if not spec.dispatch:
        # Eager inference on plain tensors with nothing watching (ConvSpec.dispatch): the op's
        # implementation without the dispatcher's host cost (tens of microseconds per call,
        # comparable to a small conv on an H100) and without re-checking what
        # fusedres.functional has checked; a weight in another dtype (autocast) is cast by
        # kernel_weight's cache.
        return _ops.conv_bn_act_unchecked(*args)
    args[1] = weight.to(x.dtype)  # the op takes one dtype (a no-op outside autocast)
    return torch.ops.fusedres.conv_bn_act_triton(*args)


def block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec, stats=None, ds_stats=None):
    mean, var, eps = stats if stats is not None else (None, None, 0.0)
    ds_mean, ds_var, ds_eps = ds_stats if ds_stats is not None else (None, None, 0.0)
    args = [y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, eps, ds_mean, ds_var, ds_eps,
            list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups,
            list(spec.ds_stride), spec.relu]
    if not spec.dispatch:
        return _ops.block_tail_unchecked(*args)
    args[1], args[5] = weight.to(y.dtype), ds_weight.to(y.dtype)  # no-ops outside autocast
    return torch.ops.fusedres.block_tail_triton(*args)


def clear_cache() -> None:
    """Drop the re-arranged weight copies (see :func:`fusedres.clear_caches`)."""
    from . import launch

    launch._weight_cache.clear()

"""What a fused module may compute, decided per call: the one home of the block patterns.

A fused block (:mod:`fusedres.modules`) runs one of three forwards:

* ``"eval"``: each conv + eval BatchNorm (+ ReLU) (+ residual / downsample) as one fused op of
  :mod:`fusedres.functional`;
* ``"train"``: batch-statistics BatchNorm, the block as one chain of :mod:`fusedres.training`;
* ``"reference"``: the original module's own forward (torchvision's or timm's), exactly the
  reference semantics.

:func:`call_reason` says why a call must take the reference forward whatever the layers
are: the call is being traced or transformed (``torch.jit.trace`` and ONNX export,
``torch.fx``, ``torch.func`` transforms, forward-mode AD) or global module hooks are
registered.  :func:`input_reason` adds what a plan (:mod:`fusedres.plan`) decides once per
input signature: a submodule carries hooks (forward/backward hooks and pre-hooks, which is
also how ``spectral_norm``, the legacy ``weight_norm`` and ``torch.nn.utils.prune`` produce
their weights), or the input's dtype or device does not match the weights or a BatchNorm's
tensors (so the error is the reference's own, raised before any state changes).  The layer predicates (:func:`fusable_conv`, :func:`foldable_bn`,
:func:`batch_stat_bn`, ...) say which layers each fused forward takes; :func:`layer_reason`
names the first layer that keeps a block on the reference forward.

Each reason for a fallback is announced once per process with a ``RuntimeWarning``
(:func:`announce`) and recorded for :class:`fusedres.backends.record` as ``"reference"``, so
``fusedres check`` and the benchmarks show it.
"""

import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.modules.module as _module_globals
from torchvision.ops.misc import FrozenBatchNorm2d

from .backends import note_used
from .functional import autocast_dtype

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- layers


def fusable_conv(conv) -> bool:
    """A plain ``nn.Conv2d`` with zero padding (a parametrized or subclassed conv is not)."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


def foldable_bn(bn) -> bool:
    """An eval-mode BN whose output is a fixed per-channel affine of its input."""
    if type(bn) is FrozenBatchNorm2d:
        return True
    if type(bn) not in _BN_TYPES:
        return False
    return (not bn.training) and bn.running_mean is not None and bn.running_var is not None


def batch_stat_bn(bn) -> bool:
    """An ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``) that normalises with the batch's own
    statistics in this call."""
    return type(bn) in _BN_TYPES and (bn.training or (bn.running_mean is None and bn.running_var is None))


def chain_conv(conv) -> bool:
    """A conv the training chain takes: :func:`fusable_conv` without a bias.

    A bias before a batch-statistics BN cancels in the output but not in autograd's
    bookkeeping; torchvision never has one, so such layers keep the reference path.
    """
    return fusable_conv(conv) and conv.bias is None


def is_relu(act) -> bool:
    return type(act) is nn.ReLU


def projection(ds):
    """``(conv, bn)`` of a 1x1 conv + BN shortcut (``nn.Sequential(conv, bn)``, as torchvision
    builds it), or ``None`` for any other module."""
    if type(ds) is not nn.Sequential or len(ds) != 2:
        return None
    conv, bn = ds[0], ds[1]
    if not (
        fusable_conv(conv) and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
        and conv.dilation == (1, 1) and conv.groups == 1
    ):
        return None
    return conv, bn


# --------------------------------------------------------------------------- per call


def _hooked(named) -> str | None:
    """The name of the first of the ``(name, module)`` pairs, or of their submodules, carrying a hook
    or not called through its class's ``forward`` (see :func:`plain_call`)."""
    for name, sub in named:
        if sub is None:
            continue
        if not plain_call(sub):
            return name
        inner = _hooked(sub._modules.items()) if sub._modules else None
        if inner is not None:
            return f"{name}.{inner}"
    return None


def plain_call(m) -> bool:
    """Whether calling the module ``m`` is exactly its class's ``forward``: no hooks of its own,
    not compiled in place (``Module.compile``), no ``forward`` set on the instance (a
    ``torch.jit.ScriptModule`` keeps its compiled forward there: that one is its own).  (Global hooks
    are :func:`call_reason`'s.)"""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or getattr(m, "_compiled_call_impl", None) is not None
                or ("forward" in m.__dict__ and not isinstance(m, torch.jit.ScriptModule)))


_fx_flag = getattr(torch.fx._symbolic_trace, "_get_is_fx_tracing", None)


def _onnx_exporting() -> bool:
    """``torch.onnx.is_in_onnx_export()``, without importing ``torch.onnx`` (an export has imported it).
    Its ``dynamo=True`` exporter traces through ``torch.export``, so a converted model's graph would hold
    the fused computation, where torchvision's model exports its own (in train mode torch's exporter
    gives BatchNorm its running statistics, the chain its batch statistics)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def call_reason(x) -> str | None:
    """Why this call must run the reference forward whatever the layers, or None: it is being
    traced or transformed, or global module hooks are registered.  Asked on every call (a
    plan cannot answer it); a handful of flag reads, no tensor op."""
    if torch.jit.is_tracing():
        return "torch.jit.trace (or torch.onnx.export with dynamo=False) records the reference computation"
    if torch.compiler.is_exporting() and _onnx_exporting():
        return "torch.onnx.export records the reference computation"
    if not isinstance(x, torch.Tensor):
        return "torch.fx symbolic tracing records the reference computation"
    if not torch.compiler.is_compiling():
        # torch.fx's flag is also set under torch.export (hence only read when not compiling);
        # the public is_fx_tracing() logs a warning on every call.  Thread-local in newer PyTorch.
        if _fx_flag() if _fx_flag is not None else torch.fx._symbolic_trace._is_fx_tracing_flag:
            return "torch.fx symbolic tracing records the reference computation"
        functorch = torch._C._functorch
        if functorch.is_functorch_wrapped_tensor(x) or functorch.peek_interpreter_stack() is not None:
            return "it runs inside a torch.func transform (vmap, grad, jvp, ...)"
        if torch.autograd.forward_ad._current_level >= 0:
            return "forward-mode AD is active (torch.autograd.forward_ad)"
    g = _module_globals
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks \
            or g._global_backward_pre_hooks:
        return "global module hooks are registered (torch.nn.modules.module.register_module_forward_hook, ...)"
    return None


def input_reason(named, x, convs=(), bns=()) -> str | None:
    """Why a fused forward over the ``(name, module)`` pairs ``named`` (a block's submodules, or
    the stem's layers) must run the reference forward for an input like ``x``, or None: a
    submodule carries hooks, the input is not a batch, its dtype or device does not match
    the weights of ``convs``, or a BatchNorm of ``bns`` holds a tensor that is neither fp32 nor
    in the compute dtype (``x``'s, or autocast's), or lives on another device (a BN moved on its
    own: torch's BatchNorm then raises or computes in its own way, and so does the reference).
    Asked when a plan is made."""
    name = _hooked(named)
    if name is not None:
        return (f"its submodule {name!r} has hooks (forward/backward hooks or pre-hooks, spectral_norm, prune, ...) "
                "or a forward of its own (set on the instance, or Module.compile)")
    if x.dim() != 4:
        return f"the input is {x.dim()}-D, not an (N, C, H, W) batch"
    amp = autocast_dtype(x) is not None
    for conv in convs:
        w = getattr(conv, "weight", None)  # a fused ConvReLU2d, an adapter: the layer checks name it, no crash here
        if not isinstance(w, torch.Tensor):
            return "a conv weight is not a tensor"
        if w.device != x.device or (w.dtype != x.dtype and not (amp and w.dtype in _AUTOCAST_DTYPES)):
            return (f"the input ({x.dtype} on {x.device}) does not match the weights ({w.dtype} on {w.device}): "
                    "the reference raises its own error")
    compute = autocast_dtype(x) or x.dtype
    for bn in bns:
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name, None)
            if isinstance(t, torch.Tensor) and (t.device != x.device or t.dtype not in (torch.float32, compute)):
                return (f"a BatchNorm's {name} ({t.dtype} on {t.device}) is neither float32 nor the compute dtype "
                        f"({compute} on {x.device}): the reference does what torch's BatchNorm does with it")
    return None


_announced: set = set()


def announce(mod: nn.Module, reason: str) -> None:
    """Record a reference-forward call, and warn once per module class and reason."""
    note_used("reference")
    key = (type(mod).__name__, reason)
    if key in _announced or torch.compiler.is_compiling():
        return
    _announced.add(key)
    warnings.warn(f"fusedres: {type(mod).__name__} runs its unfused reference forward because {reason}",
                  RuntimeWarning, stacklevel=4)

"""Functional ops: argument checks, backend selection, and the BN folding helper.

These are the single entry points the modules are built from::

    conv_bn_act(x, w, scale, shift)          = act(conv2d(x, w) * scale[c] + shift[c] (+ residual))
    block_tail(y, w, s, b, x, wd, sd, bd)    = act(conv2d(y, w) * s + b + conv2d_1x1(x, wd, ds_stride) * sd + bd)

Both also take an eval BatchNorm as it is (``running_mean=``, ``running_var=``, ``eps=``,
with ``scale``/``shift`` its weight/bias): ``(conv - mean) * scale / sqrt(var + eps) + shift``.
Backends that support it (``SUPPORTS_BN_STATS``) fold the statistics inside the kernel, so
an eval block launches nothing but its convs; for the others, and whenever autograd
needs the graph, the statistics are folded here with ordinary (differentiable) torch ops.

Shapes: ``x`` is ``(N, C_in, H, W)``, ``weight`` is ``(C_out, C_in / groups, kH, kW)``,
``scale``/``shift`` are ``(C_out,)`` in fp32 or the input's dtype, ``residual`` has the
output's shape ``(N, C_out, H_out, W_out)``.
"""

from __future__ import annotations

import numbers

import numpy
import torch

from . import backends
from .backends import ConvSpec, ShapeError, conv_out_hw

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(v) -> bool:
    """An integer (Python, NumPy or a 0-d integer tensor), not a bool or a float: ``stride=1.7``
    must not become 1 silently."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) or (
        isinstance(v, torch.Tensor) and v.dim() == 0 and not v.dtype.is_floating_point and v.dtype != torch.bool)


def _pair(name: str, v) -> tuple[int, int]:
    if _is_int(v):
        return (int(v), int(v))
    if not isinstance(v, str):
        try:
            a, b = v
        except (TypeError, ValueError):
            pass
        else:
            if _is_int(a) and _is_int(b):
                return (int(a), int(b))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _check_groups(groups) -> int:
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {groups!r}")
    return int(groups)


def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # sparse, mkldnn: every backend reads dense strided memory
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a convolution of ``x`` in, or None when autocast does not apply.

    As ``torch.nn.functional.conv2d`` under ``torch.autocast``: every fp16/bf16/fp32 operand
    is cast to the region's dtype (fp64 never is).
    """
    dev = x.device.type
    if x.dtype in _AUTOCAST_DTYPES and backends.autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_conv_args(x_name, x, w_name, w, s_name, scale, b_name, shift, groups, autocast=False):
    """Shapes, dtypes and devices of a conv's operands; ``autocast``: ``x`` has just been cast to
    the autocast dtype, and ``w`` may still be in any autocast-eligible dtype (the backend casts it)."""
    _check_tensor(x_name, x, 4)
    _check_tensor(w_name, w, 4)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{x_name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    if w.dtype != x.dtype and not (autocast and w.dtype in _AUTOCAST_DTYPES):
        raise TypeError(f"{w_name} dtype {w.dtype} does not match {x_name} dtype {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"{w_name} is on {w.device} but {x_name} is on {x.device}")
    if groups < 1 or x.shape[1] % groups or w.shape[0] % groups:
        raise ShapeError(
            f"groups={groups} must divide {x_name} channels ({x.shape[1]}) and {w_name} "
            f"out-channels ({w.shape[0]})"
        )
    if w.shape[1] * groups != x.shape[1]:
        raise ShapeError(
            f"channel mismatch: {x_name} has {x.shape[1]} channels but {w_name} expects "
            f"{w.shape[1] * groups} ({w.shape[1]} per group x {groups} groups)"
        )
    if w.shape[0] == 0 or w.shape[1] == 0:
        # torch: conv2d raises for no output channel, and gives an (N, 0, H, W) tensor (which no BN
        # after it accepts) for no input channel; a fused kernel would return relu(shift) instead
        raise ValueError(f"{w_name} {tuple(w.shape)} has no {'output' if w.shape[0] == 0 else 'input'} channel: "
                         f"a conv + BN needs at least one of each")
    if w.shape[2] == 0 or w.shape[3] == 0:
        # torch: "kernel size should be greater than zero"; a kernel would return relu(shift) on an
        # output larger than the input
        raise ValueError(f"{w_name} {tuple(w.shape)} has an empty {w.shape[2]}x{w.shape[3]} kernel")
    for n, v in ((s_name, scale), (b_name, shift)):
        _check_channel_vector(n, v, w.shape[0], x_name, x)


def _check_channel_vector(name: str, v, cout: int, x_name: str, x: torch.Tensor) -> None:
    """``v`` is a ``(cout,)`` tensor on ``x``'s device, fp32 or ``x``'s dtype (scale, shift, BN statistics)."""
    _check_tensor(name, v, 1)
    if v.shape[0] != cout:
        raise ValueError(f"{name} must have {cout} elements (one per output channel), got {v.shape[0]}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but {x_name} is on {x.device}")
    if v.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{name} must be float32 or {x_name}'s dtype {x.dtype}, got {v.dtype}")


def _check_stats(prefix: str, mean, var, eps, x_name: str, x: torch.Tensor, cout: int):
    """``(mean, var, eps)`` checked (``prefix`` names the arguments), or None when not given."""
    if mean is None and var is None:
        return None
    if (mean is None) != (var is None):
        raise ValueError(f"{prefix}running_mean and {prefix}running_var must be given together")
    for n, v in ((f"{prefix}running_mean", mean), (f"{prefix}running_var", var)):
        _check_channel_vector(n, v, cout, x_name, x)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{prefix}eps must be a non-negative number, got {eps!r}")
    return (mean, var, float(eps))


def fold_stats(scale, shift, stats, dtype: torch.dtype | None = None):
    """``(scale / sqrt(var + eps), shift - mean * scale / sqrt(var + eps))`` in ``dtype``.

    ``dtype`` defaults to fp32, or fp64 when any operand is fp64 (callers folding for an fp64
    activation pass fp64: :func:`_fold_dtype`).  The host-side equivalent of the ``BN_STATS``
    epilogue; differentiable in ``scale`` and ``shift``.
    """
    mean, var, eps = stats
    if dtype is None:
        wide = torch.float64 in (scale.dtype, shift.dtype, mean.dtype, var.dtype)
        dtype = torch.float64 if wide else torch.float32
    dt = dtype
    s = scale.to(dt) * torch.rsqrt(var.to(dt) + eps)
    return s, shift.to(dt) - mean.to(dt) * s


def _fold_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a host-side fold for activations ``x`` is made in: fp64 for an fp64 ``x`` (its
    vectors may be fp32, whose fp32 fold would limit an fp64 call to fp32 accuracy), else
    :func:`fold_stats`'s default."""
    return torch.float64 if x.dtype == torch.float64 else None


def _resolve_stats(mod, spec, stats_list):
    """Whether the backend takes the statistics as they are (else the caller folds them)."""
    return (
        all(st is not None for st in stats_list)
        and getattr(mod, "SUPPORTS_BN_STATS", False)
        and not spec.requires_grad
    )


_INT64_MAX = 2**63 - 1


def _checked_out_hw(x_name, x, kernel_size, stride, padding, dilation, stride_name="stride"):
    """``(H_out, W_out)`` of a conv of ``x``; raises naming the argument that makes it invalid or empty."""
    for name, v, lo in ((stride_name, stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if min(v) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
        if max(v) > _INT64_MAX:  # torch's convolutions take int64
            raise ValueError(f"{name} must be at most 2**63 - 1, got {v}")
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ShapeError(
            f"{x_name} spatial size {tuple(x.shape[2:])} is too small for kernel_size={tuple(kernel_size)}, "
            f"{stride_name}={stride}, padding={padding}, dilation={dilation} (output {oh}x{ow})"
        )
    return oh, ow


def _in_transform(*ts) -> bool:
    """Whether forward-mode AD (a dual tensor carries its tangent past a kernel without a
    forward-mode derivative, which would drop it: a zero JVP) or a ``torch.func`` transform
    (vmap's batched operands, jvp, grad) is active for this call."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    return (torch.autograd.forward_ad._current_level >= 0 or functorch.peek_interpreter_stack() is not None
            or any(t is not None and functorch.is_functorch_wrapped_tensor(t) for t in ts))


def _is_channels_last(x: torch.Tensor) -> bool:
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False  # vmap can't ask a batched tensor for channels_last
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _spec(x, weight, stride, padding, dilation, groups, relu, operands, **extra) -> ConvSpec:
    if not (isinstance(relu, (int, numpy.bool_)) and relu in (0, 1)):  # a bool (or 0/1), not any truthy value
        raise TypeError(f"relu must be a bool, got {relu!r}")
    transform = _in_transform(*operands)
    # the differentiable path: autograd, or a transform (which the backends without one must decline)
    requires_grad = transform or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands))
    return ConvSpec(
        device_type=x.device.type,
        dtype=x.dtype,
        in_channels=x.shape[1],
        out_channels=weight.shape[0],
        kernel_size=(weight.shape[2], weight.shape[3]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        relu=bool(relu),
        channels_last=_is_channels_last(x),
        requires_grad=requires_grad,
        transform=transform,
        batch=x.shape[0],
        input_size=(x.shape[2], x.shape[3]),
        dispatch=backends.needs_dispatch(requires_grad, operands),
        **extra,
    )


class PreparedConv:
    """A :func:`conv_bn_act` call with every decision made: checked, backend picked, spec built.

    :func:`prepare_conv_bn_act` makes one from a call's arguments; calling it with tensors
    of the same shapes, dtypes, devices and layouts (in the same grad, autocast, dispatch and oneDNN on/off
    state) computes that call without checking or deciding anything again.  The fused
    modules keep one per conv and input signature.
    """

    __slots__ = ("mod", "spec", "amp", "kernel_stats", "empty", "into")

    def __init__(self, mod, spec, amp, kernel_stats, empty):
        self.mod, self.spec, self.amp, self.kernel_stats, self.empty = mod, spec, amp, kernel_stats, empty
        # a backend that can accumulate into a residual the caller gives up (eager calls only:
        # an op seen by dispatch modes or autograd mutates nothing)
        into = getattr(mod, "conv_bn_act_into", None)
        self.into = into if spec.has_residual and not spec.dispatch and empty is None else None

    def __call__(self, x, weight, scale, shift, residual=None, stats=None, donate_residual=False):
        """``stats``: ``(running_mean, running_var, eps)`` of an eval BN whose weight/bias are
        ``scale``/``shift``, or None.  ``donate_residual``: the caller owns ``residual`` and
        gives it up, so a backend that can (``conv_bn_act_into``) writes the output into it;
        nothing else may hold or see that tensor (its values are then the output's)."""
        if backends._recorders:
            backends.note_used(self.mod.NAME)
        amp = self.amp
        if amp is not None:
            x = x.to(amp)
            if residual is not None and residual.dtype in _AUTOCAST_DTYPES:
                residual = residual.to(amp)
        if self.empty is not None:
            return x.new_empty(self.empty)
        if stats is not None and not self.kernel_stats:
            scale, shift = fold_stats(scale, shift, stats, _fold_dtype(x))
            stats = None
        if donate_residual and self.into is not None:
            return self.into(residual, x, weight, scale, shift, self.spec, stats)
        if stats is None:
            return self.mod.conv_bn_act(x, weight, scale, shift, residual, self.spec)
        return self.mod.conv_bn_act(x, weight, scale, shift, residual, self.spec, stats)


class PreparedTail:
    """A :func:`block_tail` call with every decision made (see :class:`PreparedConv`)."""

    __slots__ = ("mod", "spec", "amp", "kernel_stats", "empty")

    def __init__(self, mod, spec, amp, kernel_stats, empty):
        self.mod, self.spec, self.amp, self.kernel_stats, self.empty = mod, spec, amp, kernel_stats, empty

    def __call__(self, y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, stats=None, ds_stats=None):
        if backends._recorders:
            backends.note_used(self.mod.NAME)
        amp = self.amp
        if amp is not None:
            y = y.to(amp)
            if x.dtype in _AUTOCAST_DTYPES:
                x = x.to(amp)
        if self.empty is not None:
            return y.new_empty(self.empty)
        if stats is None and ds_stats is None:
            return self.mod.block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, self.spec)
        if self.kernel_stats:
            return self.mod.block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, self.spec, stats,
                                       ds_stats)
        if stats is not None:
            scale, shift = fold_stats(scale, shift, stats, _fold_dtype(y))
        if ds_stats is not None:
            ds_scale, ds_shift = fold_stats(ds_scale, ds_shift, ds_stats, _fold_dtype(x))
        return self.mod.block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, self.spec)


def prepare_conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    backend: str = "auto",
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> PreparedConv:
    """Check a :func:`conv_bn_act` call and decide how it runs; returns the :class:`PreparedConv`."""
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    groups = _check_groups(groups)
    _check_tensor("x", x, 4)
    amp = autocast_dtype(x)
    if amp is not None:  # as F.conv2d under autocast; the backend casts the weight (cached)
        x = x.to(amp)
        if isinstance(residual, torch.Tensor) and residual.dtype in _AUTOCAST_DTYPES:
            residual = residual.to(amp)
    _check_conv_args("x", x, "weight", weight, "scale", scale, "shift", shift, groups, autocast=amp is not None)
    oh, ow = _checked_out_hw("x", x, weight.shape[2:], stride, padding, dilation)
    cout = weight.shape[0]
    if residual is not None:
        _check_tensor("residual", residual, 4)
        if tuple(residual.shape) != (x.shape[0], cout, oh, ow):
            raise ShapeError(
                f"residual must have the output's shape {(x.shape[0], cout, oh, ow)}, got {tuple(residual.shape)}"
            )
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match x dtype {x.dtype}")
    stats = _check_stats("", running_mean, running_var, eps, "x", x, cout)
    # The statistics count for autograd too: a running_mean/var that requires grad (torch.func,
    # meta-learning) must take the host-side differentiable fold, never the in-kernel one.
    spec = _spec(x, weight, stride, padding, dilation, groups, relu,
                 (x, weight, scale, shift, residual, running_mean, running_var),
                 has_residual=residual is not None)
    mod = backends.select(backend, spec)
    # An empty batch needs no kernel, unless autograd must see the call (the reference then runs it).
    empty = (0, cout, oh, ow) if x.shape[0] == 0 and not spec.requires_grad else None
    return PreparedConv(mod, spec, amp, _resolve_stats(mod, spec, [stats]), empty)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    backend: str = "auto",
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``act(conv2d(x, weight) * scale[c] + shift[c] (+ residual))`` as one fused op.

    Args:
        x: ``(N, C_in, H, W)`` input, NCHW or channels_last.
        weight: ``(C_out, C_in // groups, kH, kW)``, same dtype and device as ``x``.
        scale, shift: ``(C_out,)`` per-output-channel affine (a folded BatchNorm), fp32 or ``x.dtype``.
        residual: optional ``(N, C_out, H_out, W_out)`` tensor added before the activation.
        relu: apply ReLU (else identity); NaN stays NaN, as with ``torch.relu``.
        backend: ``"auto" | "torch" | "cpu" | "triton" | "cuda"``; ``auto`` honours ``$FUSEDRES_BACKEND``.
        running_mean, running_var, eps: an eval BatchNorm's statistics (both tensors ``(C_out,)``
            or neither); ``scale``/``shift`` are then its weight/bias and the affine is
            ``(conv - running_mean) * scale / sqrt(running_var + eps) + shift``.

    Returns:
        ``(N, C_out, H_out, W_out)`` tensor in ``x.dtype``.

    Under ``torch.autocast`` the op follows ``F.conv2d``: ``x``, ``weight`` and ``residual``
    are cast to the autocast dtype (the weight's cast is cached by the ``cpu`` and ``triton``
    backends), ``scale``/``shift`` stay as given, and the output is in the autocast dtype.
    Each call checks its arguments and picks a backend; :func:`prepare_conv_bn_act` does that
    once for calls that repeat.
    """
    prepared = prepare_conv_bn_act(
        x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation, groups=groups,
        residual=residual, relu=relu, backend=backend, running_mean=running_mean, running_var=running_var, eps=eps,
    )
    stats = None if running_mean is None else (running_mean, running_var, float(eps))
    return prepared(x, weight, scale, shift, residual, stats)


def prepare_block_tail(
    y: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    x: torch.Tensor,
    ds_weight: torch.Tensor,
    ds_scale: torch.Tensor,
    ds_shift: torch.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    ds_stride=1,
    relu: bool = True,
    backend: str = "auto",
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
    ds_running_mean: torch.Tensor | None = None,
    ds_running_var: torch.Tensor | None = None,
    ds_eps: float = 1e-5,
) -> PreparedTail:
    """Check a :func:`block_tail` call and decide how it runs; returns the :class:`PreparedTail`."""
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    ds_stride = _pair("ds_stride", ds_stride)
    groups = _check_groups(groups)
    _check_tensor("y", y, 4)
    _check_tensor("x", x, 4)
    amp = autocast_dtype(y)
    if amp is not None:  # as F.conv2d under autocast, for both branches
        y = y.to(amp)
        if x.dtype in _AUTOCAST_DTYPES:
            x = x.to(amp)
    _check_conv_args("y", y, "weight", weight, "scale", scale, "shift", shift, groups, autocast=amp is not None)
    # x and ds_weight against the main branch first, so that a mismatch names them rather than the
    # ds_scale/ds_shift that fit the main branch
    if x.dtype != y.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match y dtype {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}")
    _check_tensor("ds_weight", ds_weight, 4)
    if ds_weight.shape[0] != weight.shape[0]:
        raise ShapeError(
            f"ds_weight has {ds_weight.shape[0]} output channels but weight has {weight.shape[0]}"
        )
    _check_conv_args("x", x, "ds_weight", ds_weight, "ds_scale", ds_scale, "ds_shift", ds_shift, 1,
                     autocast=amp is not None)
    if tuple(ds_weight.shape[2:]) != (1, 1):
        raise ValueError(f"ds_weight must be a 1x1 kernel, got shape {tuple(ds_weight.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ShapeError(f"x batch {x.shape[0]} does not match y batch {y.shape[0]}")
    oh, ow = _checked_out_hw("y", y, weight.shape[2:], stride, padding, dilation)
    dh, dw = _checked_out_hw("x", x, (1, 1), ds_stride, (0, 0), (1, 1), stride_name="ds_stride")
    if (oh, ow) != (dh, dw):
        raise ShapeError(
            f"main branch output {oh}x{ow} and downsample output {dh}x{dw} differ; check ds_stride"
        )
    cout = weight.shape[0]
    stats = _check_stats("", running_mean, running_var, eps, "y", y, cout)
    ds_stats = _check_stats("ds_", ds_running_mean, ds_running_var, ds_eps, "y", y, cout)
    spec = _spec(y, weight, stride, padding, dilation, groups, relu,
                 (y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift,
                  running_mean, running_var, ds_running_mean, ds_running_var),
                 has_residual=False, ds_in_channels=x.shape[1], ds_stride=ds_stride,
                 ds_input_size=(x.shape[2], x.shape[3]))
    mod = backends.select(backend, spec)
    empty = (0, cout, oh, ow) if y.shape[0] == 0 and not spec.requires_grad else None
    return PreparedTail(mod, spec, amp, _resolve_stats(mod, spec, [stats, ds_stats]), empty)


def block_tail(
    y: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    x: torch.Tensor,
    ds_weight: torch.Tensor,
    ds_scale: torch.Tensor,
    ds_shift: torch.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    ds_stride=1,
    relu: bool = True,
    backend: str = "auto",
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
    ds_running_mean: torch.Tensor | None = None,
    ds_running_var: torch.Tensor | None = None,
    ds_eps: float = 1e-5,
) -> torch.Tensor:
    """The residual block's last conv with the downsample branch fused in, as one op::

        act(conv2d(y, weight) * scale + shift + conv2d(x, ds_weight, stride=ds_stride) * ds_scale + ds_shift)

    ``y`` is the main branch's input ``(N, C_mid, H', W')``, ``x`` the block input
    ``(N, C_in, H, W)``; ``ds_weight`` is a 1x1 kernel ``(C_out, C_in, 1, 1)``.  Both convs
    must produce the same ``(N, C_out, H_out, W_out)``.  ``running_mean``/``running_var``/``eps``
    (and the ``ds_`` ones for the downsample branch) take an eval BatchNorm's statistics as in
    :func:`conv_bn_act`; so does autocast.  :func:`prepare_block_tail` checks and decides once
    for calls that repeat.
    """
    prepared = prepare_block_tail(
        y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, stride=stride, padding=padding,
        dilation=dilation, groups=groups, ds_stride=ds_stride, relu=relu, backend=backend,
        running_mean=running_mean, running_var=running_var, eps=eps, ds_running_mean=ds_running_mean,
        ds_running_var=ds_running_var, ds_eps=ds_eps,
    )
    stats = None if running_mean is None else (running_mean, running_var, float(eps))
    ds_stats = None if ds_running_mean is None else (ds_running_mean, ds_running_var, float(ds_eps))
    return prepared(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, stats, ds_stats)


def bn_scale_shift(bn, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm from its *live* parameters and buffers.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
    Computed on every call (a handful of tiny ops), so it can never go stale when the
    weights change or the module toggles between train and eval.  Differentiable in the
    BN's weight and bias.
    """
    rv = bn.running_var
    if rv is None or bn.running_mean is None:
        raise ValueError(f"bn has no running statistics (track_running_stats=False): an eval-mode {type(bn).__name__} "
                         "then normalises with batch statistics, which no per-channel scale and shift can express")
    w = bn.weight if bn.weight is not None else torch.ones_like(rv, dtype=dtype)
    b = bn.bias if bn.bias is not None else torch.zeros_like(rv, dtype=dtype)
    return fold_stats(w, b, (bn.running_mean, rv, bn.eps), dtype)

"""Backend registry.

A backend is a module in this package (or a sub-package) that exposes:

``NAME: str``
    The name users pass as ``backend=``.
``is_available() -> bool``
    Whether the backend can run at all here (library present, extension built, ...).
``unsupported_reason(spec: ConvSpec) -> str | None``
    ``None`` when the backend can compute ``spec``; otherwise a short human reason.
``conv_bn_act(x, weight, scale, shift, residual, spec) -> Tensor``
    ``act(conv2d(x, weight) * scale[c] + shift[c] (+ residual))``.
``block_tail(y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, spec) -> Tensor``
    ``act(conv2d(y, weight) * scale + shift + conv2d_1x1(x, ds_weight, stride=ds_stride) * ds_scale + ds_shift)``.

Backends never import one another; this registry imports them lazily by name so that a
missing optional dependency (triton, the compiled extension) only disables that backend.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
import weakref
from dataclasses import dataclass
from types import ModuleType

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import _len_torch_dispatch_stack

#: Every backend name a user may ask for, in ``auto`` preference order per device.
BACKENDS = ("torch", "cpu", "triton", "cuda")
_MODULES = {
    "torch": "fusedres.backends.torch_ref",
    "cpu": "fusedres.backends.cpu",
    "triton": "fusedres.backends.triton",
    "cuda": "fusedres.backends.cuda",
}
# What "auto" tries, best first, for a tensor on each device type.
_AUTO_ORDER = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
ENV_VAR = "FUSEDRES_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run, or cannot run this configuration."""


class ShapeError(ValueError, RuntimeError):
    """Operands whose shapes do not fit together (channels, groups, residual, spatial size, batch).

    A ``ValueError`` that is also a ``RuntimeError``: what torch's ``F.conv2d`` (so torchvision's
    modules) raises for the same mistakes, so code that catches either keeps working."""


@dataclass(frozen=True)
class ConvSpec:
    """Static description of one fused conv call; what a backend needs to decide support.

    ``stride``/``padding``/``dilation`` are 2-tuples.  ``ds_stride`` is set only for
    ``block_tail`` (the fused 1x1 downsample branch).  ``batch``, ``input_size`` (the conv
    input's ``(H, W)``) and ``ds_input_size`` (the downsample input's) size the tensors, for
    backends whose kernels index them with 32 bits; 0 where unknown.
    """

    device_type: str
    dtype: torch.dtype
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    relu: bool
    has_residual: bool
    channels_last: bool
    #: The differentiable path is needed: autograd, or ``transform``.
    requires_grad: bool
    ds_in_channels: int = 0
    ds_stride: tuple[int, int] | None = None
    batch: int = 0
    input_size: tuple[int, int] = (0, 0)
    ds_input_size: tuple[int, int] = (0, 0)
    #: Go through the registered ``torch.ops`` op rather than calling the kernel directly: set
    #: when autograd, ``torch.compile``, a dispatch or function mode, the profiler or a tensor
    #: subclass must see the op (:func:`needs_dispatch`).
    dispatch: bool = True
    #: Forward-mode AD or a ``torch.func`` transform is active: backward-only autograd (an
    #: ``autograd.Function`` without ``jvp`` or functorch rules) would drop the tangent or fail.
    transform: bool = False

    @property
    def has_downsample(self) -> bool:
        return self.ds_stride is not None

    @property
    def output_size(self) -> tuple[int, int]:
        """The conv's ``(H_out, W_out)``."""
        return conv_out_hw(*self.input_size, self.kernel_size, self.stride, self.padding, self.dilation)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for a device autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def modes_active() -> bool:
    """Whether a dispatch mode (FlopCounterMode, FakeTensorMode, ...), a function mode or the
    autograd profiler is active: then ops must go through the dispatcher to be seen."""
    return bool(
        _len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
        or torch._C._autograd._profiler_enabled()
    )


def needs_dispatch(requires_grad: bool, tensors) -> bool:
    """Whether a fused call must go through its ``torch.ops`` op (see :attr:`ConvSpec.dispatch`):
    autograd, ``torch.compile`` / export, an active mode or profiler, or a tensor subclass."""
    if requires_grad or torch.compiler.is_compiling() or modes_active():
        return True
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return True
    return False


def register_flops(conv_op: str, tail_op: str | None = None) -> None:
    """Register FLOP formulas (``torch.utils.flop_counter``) for a backend's fused ops
    (``torch.ops.fusedres.<conv_op>`` with ``conv_bn_act``'s schema, ``<tail_op>`` with
    ``block_tail``'s), so
    ``FlopCounterMode`` counts their convolutions as it counts ``aten.convolution``: the
    conv (and, for a block tail, the 1x1 downsample conv); the BN, add and ReLU count nothing."""
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    @register_flop_formula(getattr(torch.ops.fusedres, conv_op))
    def _conv(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape)

    if tail_op is not None:
        @register_flop_formula(getattr(torch.ops.fusedres, tail_op))
        def _tail(y_shape, w_shape, _s, _b, x_shape, wd_shape, *args, out_shape=None, **kwargs) -> int:
            return conv_flop_count(y_shape, w_shape, out_shape) + conv_flop_count(x_shape, wd_shape, out_shape)


def conv_out_hw(h, w, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """``(H_out, W_out)`` of a conv of an ``h x w`` input (PyTorch's formula)."""
    oh = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def odd_bf16_cpu_channels(x: torch.Tensor, groups: int) -> bool:
    """Whether ``x`` is a bf16 CPU conv input with an odd channel count per group.

    oneDNN's bf16 convolutions (torch's ``F.conv2d`` in either layout, and the ``cpu`` backend's
    channels_last calls) read such a pixel's channels in pairs, taking the next value in
    memory (another pixel's first channel, or the next channel plane) against a zero filter tap: finite
    values come out right, but a NaN or inf there puts NaN at output positions whose window
    never covers it, or NaN where the sum is +-inf (the stem of a ResNet fed one NaN pixel:
    NaN at 12 positions instead of 9).  fp32 and fp16 are exact.  With one zero channel appended
    to the input and the filter (:func:`even_channels`) the kernels give the exact positions.
    """
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and (x.shape[1] // groups) % 2 == 1


def even_channels(t: torch.Tensor) -> torch.Tensor:
    """A 4-D ``t`` with one zero channel (dim 1) appended, in ``t``'s memory format (differentiable)."""
    return torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 1))


def cudnn_conv_tf32() -> bool:
    """Whether PyTorch's cuDNN convolutions compute fp32 on TF32 tensor cores now.

    Resolved as PyTorch does: ``torch.backends.cudnn.conv.fp32_precision``, and while a level
    says ``"none"`` (``"default"`` before PyTorch 2.9) its parent
    ``torch.backends.cudnn.fp32_precision``, then ``torch.backends.fp32_precision``; TF32
    exactly when that gives ``"tf32"`` (inheriting all the way up means IEEE, which is what
    ``allow_tf32 = False`` sets).  Once the new API is used, reading the legacy
    ``torch.backends.cudnn.allow_tf32`` raises, so it is only the fallback for a PyTorch
    without ``fp32_precision``.
    """
    cudnn = torch.backends.cudnn
    for level in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        precision = getattr(level, "fp32_precision", None)
        if precision is None:  # a PyTorch without the new API
            break
        if precision not in ("none", "default"):
            return precision == "tf32"
    else:
        return False
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:
        return False


def data_key(t: torch.Tensor) -> tuple:
    """What identifies the data a tensor holds now: storage, offset, dtype, device, shape, strides, version.

    The version counter alone is not enough: ``Module._apply`` (``.half()``, ``.float()``,
    ``.to()``) swaps a parameter's data for a new tensor without bumping it, so the same
    parameter object with the same version can hold other values, even another dtype.
    An inference tensor has no counter: its version reads as ``None`` (such a tensor is never
    cached, see :func:`_cacheable`, so no stamp can match it).
    """
    version = None if t.is_inference() else t._version
    return (t.untyped_storage()._cdata, t.data_ptr(), t.dtype, t.device, t.shape, t.stride(), version)


_uncached_warned = False


def _cacheable(w: torch.Tensor) -> bool:
    """Whether every write to ``w``'s data shows in its version counter, so a derived tensor can
    be cached against :func:`data_key`.  Not so for an inference tensor (no counter), a CPU
    tensor in shared memory (another process may write it: an actor reading a learner's weights)
    or a view into a larger storage (``vector_to_parameters`` makes the parameters views of one
    flat buffer, whose own writes bump only the buffer's counter).  Those are folded again on
    every call, announced once."""
    if w.is_inference():
        return False
    storage = w.untyped_storage()
    if storage.nbytes() == w.numel() * w.element_size() and not (w.device.type == "cpu" and storage.is_shared()):
        return True
    global _uncached_warned
    if not _uncached_warned:
        _uncached_warned = True
        warnings.warn("fusedres: a conv weight is in shared memory or is a view into a larger buffer, so writes to it "
                      "may not bump its version counter; its folded and re-laid-out copy is made again on every call "
                      "(slower, never stale)", RuntimeWarning, stacklevel=3)
    return False


_caches: weakref.WeakSet = weakref.WeakSet()  # every WeightCache, for forget()


def forget(tensors) -> None:
    """Drop every backend's cached transforms of ``tensors`` (and the weak references to them).

    ``torch.utils.swap_tensors`` refuses a tensor that has a weak reference, and the caches hold
    one per weight: the fused modules call this before ``Module._apply`` and ``load_state_dict``
    (which swap parameters under ``torch.__future__.set_swap_module_params_on_conversion(True)``);
    call it (or :func:`clear_caches`) before swapping a conv weight yourself."""
    tensors = list(tensors)
    for cache in list(_caches):
        for t in tensors:
            cache.forget(t)


class WeightCache:
    """Per-weight derived tensors (folded, re-laid-out, reordered), valid while the weight's data is.

    Entries are held weakly by the weight tensor object and stamped with :func:`data_key`; a
    lookup whose stamp differs (an in-place update bumped the version, ``Module._apply``
    swapped the data, the dtype changed) misses.  Each entry also holds a weak reference to
    the weight's storage, which pins the storage object's address (its ``_cdata``) while the
    entry lives, so a new storage can never be mistaken for the cached one, not even one
    that the allocator placed at the same data pointer.  Tensors some of whose writes the version
    counter cannot see (inference tensors, shared memory, views into a larger buffer:
    :func:`_cacheable`) are never cached.
    """

    def __init__(self) -> None:
        # id(weight) -> (weak reference to the weight, data_key, storage reference, {tag: value}):
        # keyed by id, not by a WeakIdKeyDictionary, because the lookup runs for every conv of
        # every eager call; the weak reference confirms the id still names the same tensor and
        # its callback drops the entry with the weight
        self._entries: dict[int, tuple] = {}
        _caches.add(self)

    def get(self, w: torch.Tensor, tag=None):
        """The value stored for ``w`` under ``tag`` while ``w``'s data is unchanged, else ``None``.
        (Only :meth:`put` asks :func:`_cacheable`: a storage can't move to shared memory or be
        aliased by a larger buffer without a new data pointer, which changes the stamp.)"""
        if w.is_inference():
            return None
        entry = self._entries.get(id(w))
        if entry is None or entry[0]() is not w or entry[1] != data_key(w):
            return None
        return entry[3].get(tag)

    def put(self, w: torch.Tensor, value, tag=None, key=None):
        """Store ``value`` for ``w``'s data under ``tag`` (values for older data are dropped); returns it.

        ``key``: ``data_key(w)`` taken *before* ``value`` was computed from ``w`` (the default,
        taken now, is only right when nothing can write ``w`` meanwhile).  Another thread may
        write ``w`` in place while ``value`` is being made (a hot reload during inference); the
        write bumps the version after it lands, so an early key is then older than ``w``'s data and
        the next lookup misses, where a key taken after would stamp a fold of the old data as
        current, for good."""
        if not _cacheable(w):
            return value
        if key is None:
            key = data_key(w)
        entry = self._entries.get(id(w))
        if entry is None or entry[0]() is not w or entry[1] != key:
            entries, i = self._entries, id(w)

            def drop(ref):
                if entries.get(i, (None,))[0] is ref:
                    entries.pop(i, None)

            entry = self._entries[i] = (weakref.ref(w, drop), key, StorageWeakRef(w.untyped_storage()), {})
        entry[3][tag] = value
        return value

    def forget(self, w: torch.Tensor) -> None:
        """Drop ``w``'s entry, and with it the weak reference to ``w``."""
        entry = self._entries.get(id(w))
        if entry is not None and entry[0]() is w:
            del self._entries[id(w)]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


_loaded: dict[str, ModuleType | None] = {}
_available: dict[str, bool] = {}
_load_errors: dict[str, str] = {}
_warned: set[tuple] = set()
_recorders: list[set] = []


class record:
    """Context manager collecting the names of the backends :func:`select` picks inside it.

    >>> with record() as used:
    ...     model(x)
    >>> sorted(used)
    ['cpu']

    It records the whole process while it is open (every thread's calls: ``nn.DataParallel``
    runs its replicas in threads of its own), and records may nest or overlap across threads.
    """

    def __enter__(self) -> set:
        self.used: set = set()
        _recorders.append(self.used)
        return self.used

    def __exit__(self, *exc) -> None:
        # by identity: list.remove compares by value, and would drop another record (an outer or
        # another thread's one) that happens to hold the same names
        for i, used in enumerate(_recorders):
            if used is self.used:
                del _recorders[i]
                break


def note_used(name: str) -> None:
    """Add ``name`` to every active :class:`record` (backends, and the train-mode chains)."""
    for used in tuple(_recorders):  # a snapshot: another thread may open or close a record meanwhile
        used.add(name)


def _picked(mod: ModuleType) -> ModuleType:
    note_used(mod.NAME)
    return mod


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
        except Exception as exc:  # an optional dependency missing or broken
            _loaded[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
        else:
            _loaded[name] = mod
    return _loaded[name]


@torch.compiler.assume_constant_result
def _is_up(name: str) -> bool:
    """Whether loaded backend ``name`` can run here: asked once, on its first use (not at import,
    so ``import fusedres`` touches no device), then remembered for the process.  A constant to
    ``torch.compile`` (it never changes within a process), so the first answer, given inside a
    compiled call or not, installs no guard that a later one would break."""
    up = _available.get(name)
    if up is None:
        up = _available[name] = bool(_loaded[name].is_available())
    return up


def load_all() -> None:
    """Import every backend now (each failure is remembered, not raised).

    Called once when ``fusedres`` is imported, so that backend selection inside
    ``torch.compile`` only reads this registry and never has to import a module.  Whether a
    backend can run (a GPU present, its capability) is asked on first use instead: importing
    fusedres initialises no device, so a process may still fork DataLoader workers.
    """
    for name in BACKENDS:
        _load(name)


def clear_caches() -> None:
    """Drop every backend's cached weight transforms (folded, re-laid-out or reordered weights).

    Caches are keyed on the weight tensor and what identifies its data (storage, dtype, shape
    and version counter, see :func:`data_key`): every in-place op bumps the version (optimizer
    steps, ``load_state_dict``, ``with torch.no_grad(): w.mul_(2)``) and ``.half()`` /
    ``.to()`` swap the storage.  In-place writes through ``w.data`` bypass the version
    counter: call this after such edits.
    """
    for mod in _loaded.values():
        if mod is not None and hasattr(mod, "clear_cache"):
            mod.clear_cache()


def get(name: str) -> ModuleType:
    """The backend module ``name``; raises :class:`BackendUnavailableError` if it cannot run."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    mod = _load(name)
    if mod is None:
        raise BackendUnavailableError(
            f"backend {name!r} is not available: failed to import ({_load_errors[name]})"
        )
    if not _is_up(name):
        raise BackendUnavailableError(f"backend {name!r} is not available: {mod.why_unavailable()}")
    return mod


def is_available(name: str) -> bool:
    try:
        get(name)
    except BackendUnavailableError:
        return False
    return True


def available() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [n for n in BACKENDS if is_available(n)]


def requested(backend: str | None) -> str:
    """Resolve the user's ``backend`` argument, honouring ``$FUSEDRES_BACKEND`` for ``auto``."""
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
        if name != "auto" and name not in _MODULES:
            raise ValueError(
                f"${ENV_VAR} must be one of {('auto',) + BACKENDS} (or unset), got {name!r}; it picks the "
                "backend of every call made with backend='auto'"
            )
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


def _warn_once(key: tuple, msg: str) -> None:
    # warnings.warn cannot be traced by dynamo; a fallback chosen while compiling is warned
    # about the first time the same call runs eagerly.
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def select(backend: str | None, spec: ConvSpec) -> ModuleType:
    """Pick the backend module for ``spec``.

    A named backend either handles the spec or raises :class:`BackendUnavailableError`.
    ``auto`` walks the preference list for the device and falls back to the ``torch``
    reference with a one-time warning naming the reason whenever a better backend exists
    for the device but cannot take this call.
    """
    name = requested(backend)
    if name != "auto":
        mod = get(name)
        reason = mod.unsupported_reason(spec)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot compute this call: {reason}")
        return _picked(mod)

    order = _AUTO_ORDER.get(spec.device_type, ("torch",))
    if spec.device_type == "cpu" and torch.compiler.is_compiling():
        # Inductor's CPU backend performs the oneDNN conv + post-op fusion itself on the
        # reference graph, so under torch.compile the reference is the fused path.
        order = ("torch",)
    reasons = []
    for cand in order:
        mod = _load(cand)
        if mod is None:
            reasons.append(f"{cand}: import failed ({_load_errors[cand]})")
            continue
        if not _is_up(cand):
            reasons.append(f"{cand}: {mod.why_unavailable()}")
            continue
        reason = mod.unsupported_reason(spec)
        if reason is None:
            if cand != order[0] and cand == "torch":
                _warn_once(
                    # Sizes and counts left out of the key: one warning per kind of reason,
                    # not one per input size (variable-resolution serving).
                    (spec.device_type, tuple(re.sub(r"\d+", "#", r) for r in reasons)),
                    "fusedres: backend 'auto' falls back to the 'torch' reference for a "
                    f"{spec.device_type} call ({'; '.join(reasons)})",
                )
            return _picked(mod)
        reasons.append(f"{cand}: {reason}")
    raise BackendUnavailableError("no fusedres backend can compute this call: " + "; ".join(reasons))

"""Per-layer plans: everything fixed for a fused module and an input signature, decided once.

A fused module's forward (:mod:`fusedres.modules`) first asks the per-call questions that no
cache may answer (is the call being traced or transformed, are global hooks registered:
:func:`fusedres.patterns.call_reason`), then looks up the :class:`Plan` for the input's
signature (:func:`signature`: shape, dtype, device, strides, grad and autograd need,
autocast, dispatch modes, ``$FUSEDRES_BACKEND``).  A plan holds the route (fused eval ops,
the training chain, or the reference forward with its reason) and, for the eval route, the
prepared fused calls (:class:`fusedres.functional.PreparedConv`): the checks, the backend
choice, the spec and the BN argument form are done once, so a call reads the layers'
tensors live and launches.

A plan stays valid while the module's submodules are the same objects, in the same
train/eval modes, carrying the same hooks and no ``forward`` set on an instance (checked on
every call, :func:`watch`), and while each layer's tensors and geometry are the same objects
(checked by each step as it reads them; a replaced one raises :class:`Stale` and the plan is
rebuilt).  A converted model also plans its stem and stages together, as one plan keyed
``("trunk", signature)`` (:func:`fusedres.modules.run_trunk`).  Plans are dropped on ``train()`` / ``eval()``, on
``Module._apply`` (``.to()``, ``.half()``, ``.cuda()``), on :func:`fusedres.convert` /
:func:`fusedres.revert`, and by :func:`fusedres.clear_caches`.  They live outside the module
(a weak-keyed table), so copying, pickling or ``state_dict`` never sees them.  Under
``torch.compile`` nothing is cached: the plan is built inside the traced call.
"""

import os
import weakref

import torch

from .backends import ENV_VAR, autocast_enabled, modes_active

__all__ = ["Plan", "Stale", "drop", "lookup", "signature", "store", "watch"]

#: Plans per module: ``{module: {signature: Plan}}``.
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: Signatures kept per module before the oldest are dropped (variable-size inputs).
MAX_PLANS = 16


class Stale(Exception):
    """A layer's tensor or geometry was replaced since the plan was made: rebuild it."""


class Plan:
    """One module's forward for one input signature.

    ``run(module, x)`` computes it; ``watched``, ``modes`` and ``hooked`` are what :func:`watch`
    saw when the plan was made; ``route`` is ``"eval"``, ``"train"`` or ``"reference"``
    (``reason`` says why) for a block or a stem, ``"trunk"`` for a model's stem and stages
    as one run, or ``"blocks"`` (``run`` None) when they take their per-block plans.  A plan never holds its module (only the submodules), so the
    weak-keyed table can let the module go.
    """

    __slots__ = ("route", "reason", "run", "watched", "modes", "hooked")

    def __init__(self, route, run, seen, reason=None):
        self.route, self.run, self.reason = route, run, reason
        self.watched, self.modes, self.hooked = seen


def _grad_need(x: torch.Tensor, roots):
    """False when the call needs no autograd, else which of ``x`` and the ``roots``' parameters
    and buffers require grad (a tuple of flags): each fused call of a plan decides once whether
    it runs with autograd from its own operands, so a plan made with one set of trainable
    tensors must not serve another (unfreezing one conv of a block, or an input that starts
    requiring grad, would otherwise keep an inference-only kernel on it)."""
    if not torch.is_grad_enabled():
        return False
    flags = [x.requires_grad]
    for root in roots:
        for p in root.parameters():
            flags.append(p.requires_grad)
        for b in root.buffers():
            flags.append(b.requires_grad)
    return tuple(flags) if any(flags) else False


def signature(module, x: torch.Tensor, roots) -> tuple | None:
    """What a plan for ``module``, covering the modules ``roots``, depends on in the call with input
    ``x``; None under ``torch.compile``.  ``x``'s class is part of it: a tensor subclass must see
    the fused ops through dispatch, a plain tensor need not.  So is whether oneDNN is switched on
    (``torch.backends.mkldnn.enabled``): the ``cpu`` backend declines calls while it is off."""
    if torch.compiler.is_compiling():
        return None
    dev = x.device
    amp = torch.get_autocast_dtype(dev.type) if autocast_enabled(dev.type) else None
    return (x.shape, x.stride(), x.dtype, dev, _grad_need(x, roots), amp, modes_active(), os.environ.get(ENV_VAR),
            module.backend, type(x), torch._C._get_mkldnn_enabled())


def needs_grad(x: torch.Tensor, roots) -> bool:
    """Whether the call needs autograd at all (stops at the first tensor that requires grad)."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    for root in roots:
        for p in root.parameters():
            if p.requires_grad:
                return True
        for b in root.buffers():
            if b.requires_grad:
                return True
    return False


def watch(roots) -> tuple[list, list, bool]:
    """The modules ``roots`` and all their submodules, their ``training`` flags, and whether any
    carries a hook or is called through something other than its class's ``forward`` (one set on
    the instance, or ``Module.compile``), which a fused forward would skip.  A BN switched to eval on its own (freezing BN for fine-tuning) changes the
    flags without going through the fused module's ``train()``, so they are part of what a
    plan checks."""
    found, modes, hooked = [], [], False
    stack = [roots]
    while stack:
        for sub in stack.pop():
            if sub is None:
                continue
            found.append(sub)
            modes.append(sub.training)
            if (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks
                    or ("forward" in sub.__dict__ and not isinstance(sub, torch.jit.ScriptModule))
                    or getattr(sub, "_compiled_call_impl", None) is not None):
                hooked = True
            if sub._modules:
                stack.append(sub._modules.values())
    return found, modes, hooked


def lookup(module, key, roots) -> Plan | None:
    """``module``'s plan for ``key`` if it is still valid for the modules it covers (``roots`` and
    their submodules: :func:`watch`)."""
    if key is None:
        return None
    plans = _PLANS.get(module)
    plan = plans.get(key) if plans is not None else None
    if plan is None:
        return None
    watched, modes, hooked = watch(roots)
    if hooked != plan.hooked or modes != plan.modes or watched != plan.watched:
        return None
    return plan


def store(module, key, plan: Plan) -> None:
    if key is None:
        return
    plans = _PLANS.get(module)
    if plans is None:
        plans = _PLANS[module] = {}
    elif len(plans) >= MAX_PLANS:
        plans.clear()
    plans[key] = plan


def drop(module) -> None:
    """Forget ``module``'s plans (``train()``, ``_apply``, convert/revert call this)."""
    _PLANS.pop(module, None)


def clear() -> None:
    """Forget every plan."""
    _PLANS.clear()

"""Drop-in fused versions of torchvision's ``BasicBlock`` / ``Bottleneck`` and the ResNet stem.

The fused classes subclass torchvision's, add no parameters and no buffers, and keep every
attribute name, so ``isinstance`` checks, ``state_dict`` keys and checkpoints are unchanged.
:func:`convert` swaps the class of each block *in place* (the same module objects, so the
same parameters, buffers and hooks); :func:`revert` swaps it back.

Forward, decided per call (:mod:`fusedres.patterns`):

* eval BN with running stats (``nn.BatchNorm2d`` or torchvision's ``FrozenBatchNorm2d``):
  each conv+BN(+ReLU)(+residual) runs as one :func:`fusedres.conv_bn_act`, the last conv of
  a block with a 1x1-conv+BN downsample as one :func:`fusedres.block_tail`.  The BN is read
  live on every call, so results never go stale.
* BN with batch statistics (train mode, or ``track_running_stats=False``; ``nn.BatchNorm2d``
  or ``nn.SyncBatchNorm``): the block (or the stem with its max-pool) runs as one train-mode
  chain of :mod:`fusedres.training`, which keeps only pre-BN conv outputs for backward and
  updates the running stats like ``nn.BatchNorm2d``.
* anything else: torchvision's own forward, exactly the reference semantics, announced once
  per reason with a ``RuntimeWarning``.  That covers other layers (a custom norm layer or
  downsample, a parametrized conv, SyncBatchNorm beside plain BN in one block, BNs of one
  block in different modes) and calls the fused kernels must not take: hooks on a submodule
  (which is also how ``spectral_norm``, the legacy ``weight_norm`` and ``prune`` make their
  weights) or a ``forward`` set on a submodule instance (or ``Module.compile`` on one), ``torch.jit.trace`` / ONNX export, ``torch.fx`` tracing, ``torch.func``
  transforms, forward-mode AD, and an input whose dtype or device does not match the weights,
  or a BatchNorm moved on its own to another dtype or device (the reference then raises its
  own error, before any running statistic moves).
  ``torch.jit.script`` compiles the reference computation.

Under ``torch.autocast`` the fused ops cast as ``F.conv2d`` does, so a converted model's
activations have the dtype torchvision's would.
"""

import importlib
import logging
import sys
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from . import backends
from . import patterns as P
from . import plan
from .functional import bn_scale_shift, prepare_block_tail, prepare_conv_bn_act
from .plan import Plan, Stale
from .training import chain_forward, chain_reason, train_memory_format, train_recompute_limit

__all__ = ["BasicBlock", "Bottleneck", "FusedResNet", "convert", "explain", "revert"]

_log = logging.getLogger("fusedres")


def _affine_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale_shift(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype):
    scale, shift = bn_scale_shift(bn, dtype)
    if conv.bias is not None:  # conv bias folds into the shift: (acc + b) * s + t
        shift = shift + conv.bias.to(dtype) * scale
    return scale, shift


_STEP_NAMES = ("weight", "bias", "weight", "bias", "running_mean", "running_var")


def _home(module, name):
    """1 if ``module._parameters`` holds ``name``, 0 if ``module._buffers`` does, else None."""
    if name in module._parameters:
        return 1
    if name in module._buffers:
        return 0
    return None


class _Step:
    """One conv + BN of a plan: reads the layers' tensors live on every call, and checks that
    they (and the conv's geometry) are the ones the plan was made for (else :class:`Stale`).

    An affine BN after a bias-free conv (every torchvision and timm ResNet) is passed as it is
    - weight, bias and running statistics - so a backend that folds them itself (all but the
    ``torch`` reference) runs nothing else; otherwise the fold happens here, per call.
    """

    __slots__ = ("conv", "bn", "tensors", "geom", "kinds", "as_stats", "homes")

    def __init__(self, conv, bn):
        self.conv, self.bn = conv, bn
        self.tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        # whether each of those six lives in its module's ``_parameters`` (else ``_buffers``): the
        # dicts are read directly on every call (fetched from the module each time, so a dict
        # swapped in is seen), ``Module.__getattr__`` costs several times a dict lookup
        homes = tuple(_home(m, name) for m, name in zip((conv, conv, bn, bn, bn, bn), _STEP_NAMES))
        self.homes = None if None in homes or homes[0] != 1 or homes[1] != 1 else homes
        self.geom = (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
        # dtypes and device: a submodule moved on its own (block.conv1.double()) keeps its
        # parameter objects, and only the fused module's own _apply drops plans
        self.kinds = tuple(None if t is None else (t.dtype, t.device) for t in self.tensors)
        self.as_stats = conv.bias is None and bn.weight is not None and bn.bias is not None

    def args(self, dtype):
        """``(weight, scale, shift, stats)`` for the fused call (``dtype``: of a host-side fold)."""
        conv, bn = self.conv, self.bn
        t, g, k, h = self.tensors, self.geom, self.kinds, self.homes
        if h is None:
            w, cb, bw, bb, rm, rv = conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var
        else:
            cd = conv._parameters
            bd = (bn._buffers, bn._parameters)
            try:
                w, cb = cd["weight"], cd["bias"]
                bw, bb, rm, rv = bd[h[2]]["weight"], bd[h[3]]["bias"], bd[h[4]]["running_mean"], bd[h[5]]["running_var"]
            except KeyError:  # moved between parameters, buffers and plain attributes
                raise Stale from None
        if (w is not t[0] or cb is not t[1] or bw is not t[2] or bb is not t[3] or rm is not t[4]
                or rv is not t[5] or conv.stride is not g[0] or conv.padding is not g[1]
                or conv.dilation is not g[2] or conv.groups != g[3] or conv.padding_mode != g[4]
                or w.dtype is not k[0][0] or w.device != k[0][1]
                or (rv is not None and rv.dtype is not k[5][0]) or (bw is not None and bw.dtype is not k[2][0])):
            raise Stale
        if self.as_stats:
            return w, bw, bb, (rm, rv, bn.eps)
        scale, shift = _scale_shift(conv, bn, dtype)
        return w, scale, shift, None

    def prepare(self, x, weight, scale, shift, stats, relu, backend, residual=None):
        conv = self.conv
        mean, var, eps = stats if stats is not None else (None, None, 1e-5)
        return prepare_conv_bn_act(x, weight, scale, shift, stride=conv.stride, padding=conv.padding,
                                   dilation=conv.dilation, groups=conv.groups, residual=residual, relu=relu,
                                   backend=backend, running_mean=mean, running_var=var, eps=eps)


class Anatomy(NamedTuple):
    """A residual block's layers, in the order its reference forward applies them::

        y   = x;  for (conv, bn, act, after) in stages:  y = after(act(bn(conv(y))))
        z   = bn_t(conv_t(y));  z = attn(z) when attn is not None
        out = act_out(z + shortcut(x))

    ``stages``: ``(conv, bn, act, after)`` for every conv but the last, ``after`` a tuple of
    modules applied after the activation (anti-aliasing), usually empty.  ``tail``: the last
    ``(conv, bn)``.  ``attn``: a module between the last BN and the add (SE, ECA) or None.
    ``downsample``: the shortcut module as it is (None: identity); ``shortcut``: ``(pool,
    conv, bn)`` when it is a 1x1 conv + BN projection, optionally after a pooling module
    (ResNet-D), else None.  ``act``: the activation after the add.  ``inert``: ``(name,
    module)`` pairs that the fused forwards skip, so they must be identities in the call
    (drop-block and drop-path outside training).
    """

    stages: tuple
    tail: tuple
    attn: object
    downsample: object
    shortcut: object
    act: object
    inert: tuple = ()

    def convs(self) -> list:
        out = [s[0] for s in self.stages] + [self.tail[0]]
        return out + ([self.shortcut[1]] if self.shortcut is not None else [])

    def pairs(self) -> list:
        return [(s[0], s[1]) for s in self.stages] + [tuple(self.tail)]

    def bns(self) -> list:
        out = [s[1] for s in self.stages] + [self.tail[1]]
        return out + ([self.shortcut[2]] if self.shortcut is not None else [])


def shortcut_of(ds):
    """``(pool, conv, bn)`` of a projection shortcut: ``Sequential(conv1x1, bn)`` (torchvision, timm)
    or ``Sequential(pool, conv1x1, bn)`` (timm's ResNet-D average-pool downsample); else None."""
    if type(ds) is not nn.Sequential or len(ds) not in (2, 3):
        return None
    proj = P.projection(nn.Sequential(ds[-2], ds[-1])) if len(ds) == 3 else P.projection(ds)
    if proj is None:
        return None
    return (ds[0] if len(ds) == 3 else None, *proj)


def _inert_reason(inert) -> str | None:
    for name, m in inert:
        if m is None or type(m) is nn.Identity:
            continue
        # timm's DropPath / DropBlock2d are identities outside training or at probability 0.
        if type(m).__name__ in ("DropPath", "DropBlock2d") and (not m.training or not m.drop_prob):
            continue
        return f"its {name} ({type(m).__name__}) is active in this call"
    return None


def _droppers(a: Anatomy) -> list:
    """The drop-path / drop-block modules of ``a``: inactive when the plan is made, and checked to
    stay so on every call (their ``drop_prob`` may be raised by a schedule)."""
    return [m for _, m in a.inert if m is not None and type(m) is not nn.Identity]


def _layer_reason(a: Anatomy, bn_ok, what: str) -> str | None:
    """The first layer of ``a`` that the fused forwards cannot take, ``bn_ok`` judging the norms."""
    for act in [s[2] for s in a.stages] + [a.act]:
        if not P.is_relu(act):
            return f"an activation is {type(act).__name__}, not nn.ReLU"
    if a.downsample is not None and a.shortcut is None:
        return f"its downsample ({type(a.downsample).__name__}) is not a 1x1 nn.Conv2d + BatchNorm (after a pool)"
    layers = a.pairs() + ([a.shortcut[1:]] if a.shortcut is not None else [])
    for conv, bn in layers:
        if not P.fusable_conv(conv):
            return f"a conv is {type(conv).__name__}, not a plain nn.Conv2d with zero padding"
        if not bn_ok(bn):
            return f"a norm layer is {type(bn).__name__}, not {what}"
    return None


def _eval_reason(a: Anatomy) -> str | None:
    """Why the eval forward cannot take ``a`` in this call, or None."""
    return _layer_reason(a, P.foldable_bn, "an eval-mode BatchNorm with running statistics") or _inert_reason(a.inert)


class _EvalRun:
    """The eval forward of one block for one input signature: one fused op per conv, the
    shortcut and the add fused into the last one (or, after an attention module, into the
    shortcut conv).  The fused calls are prepared (checked, backend picked) on the first run
    and reused after.  ``donate``: the caller gives up the input (:func:`run_stages`),
    so an identity tail may write its output there."""

    __slots__ = ("stages", "tail", "short", "pool", "attn", "inert", "backend", "calls", "fresh")

    def __init__(self, a: Anatomy, backend: str):
        self.inert = _droppers(a)
        self.stages = [(_Step(conv, bn), after) for conv, bn, _, after in a.stages]
        self.tail = _Step(*a.tail)
        self.short = _Step(a.shortcut[1], a.shortcut[2]) if a.shortcut is not None else None
        self.pool = a.shortcut[0] if a.shortcut is not None else None
        self.attn = a.attn
        self.backend = backend
        self.calls = None
        #: The output is a tensor this run made (or the donated input), which no one else holds:
        #: true unless an attention module's output becomes it.
        self.fresh = a.attn is None

    def __call__(self, module, x: torch.Tensor, donate: bool = False) -> torch.Tensor:
        for m in self.inert:
            if m.training and m.drop_prob:
                raise Stale
        x = y = x.contiguous(memory_format=torch.channels_last)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        first = self.calls is None
        calls = [] if first else self.calls
        i = 0
        for step, after in self.stages:
            w, s, t, st = step.args(dt)
            if first:
                calls.append(step.prepare(y, w, s, t, st, True, self.backend))
            y = calls[i](y, w, s, t, None, st)
            i += 1
            for m in after:
                y = m(y)
        w, s, t, st = self.tail.args(dt)
        short, pool = self.short, self.pool
        xs = x if pool is None else pool(x)
        if self.attn is None and short is None:  # conv + BN + identity + ReLU
            if first:
                calls.append(self.tail.prepare(y, w, s, t, st, True, self.backend, residual=x))
            out = calls[i](y, w, s, t, x, st, donate_residual=donate)
        elif self.attn is None:  # the block tail: both convs, one op
            wd, sd, td, std = short.args(dt)
            if first:
                conv = self.tail.conv
                mean, var, eps = st if st is not None else (None, None, 1e-5)
                ds_mean, ds_var, ds_eps = std if std is not None else (None, None, 1e-5)
                calls.append(prepare_block_tail(
                    y, w, s, t, xs, wd, sd, td, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    groups=conv.groups, ds_stride=short.conv.stride, relu=True, backend=self.backend,
                    running_mean=mean, running_var=var, eps=eps, ds_running_mean=ds_mean, ds_running_var=ds_var,
                    ds_eps=ds_eps))
            out = calls[i](y, w, s, t, xs, wd, sd, td, st, std)
        else:  # conv + BN, the attention module, then the shortcut conv + BN + add + ReLU
            if first:
                calls.append(self.tail.prepare(y, w, s, t, st, False, self.backend))
            z = self.attn(calls[i](y, w, s, t, None, st))
            if short is None:
                out = torch.relu_(z.add_(x))
            else:
                wd, sd, td, std = short.args(dt)
                if first:
                    calls.append(short.prepare(xs, wd, sd, td, std, True, self.backend, residual=z))
                out = calls[i + 1](xs, wd, sd, td, z, std)
        if first:
            self.calls = calls
        return out


def _train_reason(a: Anatomy, x, owner) -> str | None:
    """Why the training chain cannot take ``a`` in this call, or None."""
    if any(s[3] for s in a.stages):
        return "it has modules between its convs (anti-aliasing), which the training chain does not take"
    if a.attn is not None:
        return f"its attention module ({type(a.attn).__name__}) is not part of the training chain"
    if a.shortcut is not None and a.shortcut[0] is not None:
        return "its shortcut pools before the projection, which the training chain does not take"
    why = _layer_reason(a, P.batch_stat_bn, "a BatchNorm2d using batch statistics") or _inert_reason(a.inert)
    if why is not None:
        return why
    return chain_reason(x, a.pairs(), [s[2] for s in a.stages] + [a.act],
                        None if a.shortcut is None else a.shortcut[1:], owner)


class _Planned:
    """What every fused module (block or model) shares: its plans are dropped on ``train()`` /
    ``eval()`` and ``Module._apply`` (``.to()``, ``.half()``...), and scripting is announced."""

    #: Backend for this module's fused ops; :func:`convert` sets it per instance.
    backend = "auto"
    #: Marks the fused classes (for :func:`fusedres.convert_sync_batchnorm`, without an import).
    _fusedres_fused = True

    def train(self, mode: bool = True):
        plan.drop(self)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        plan.drop(self)
        backends.forget(self.parameters())  # swap_tensors refuses a weight the caches reference weakly
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        backends.forget(self.parameters())  # runs before the children's: their parameters may be swapped
        return super()._load_from_state_dict(*args, **kwargs)

    def __prepare_scriptable__(self):
        P.announce(self, "torch.jit.script compiles the reference computation")
        return self


def _kinds(pairs) -> tuple:
    """``(dtype, device)`` of every conv weight and BN tensor of ``(conv, bn)`` pairs (None for an
    absent one): a layer moved on its own (``block.bn1.half()``) keeps its module and parameter
    objects and does not drop the fused module's plans, so the train runs compare these on every
    call; the new plan then sends a mismatch to the reference (:func:`fusedres.patterns.input_reason`),
    whose BatchNorm raises, where the chain would have cast the tensors and computed."""
    out = []
    for conv, bn in pairs:
        for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            out.append((t.dtype, t.device) if isinstance(t, torch.Tensor) else None)
    return tuple(out)


class _TrainRun:
    """The training forward of one block: one chain (:mod:`fusedres.training`), in the memory
    format chosen for the planned input shape (:func:`fusedres.training.train_memory_format`)."""

    __slots__ = ("pairs", "proj", "inert", "layout", "recompute", "kinds")

    def __init__(self, a: Anatomy, x: torch.Tensor):
        self.pairs = a.pairs()
        self.proj = None if a.shortcut is None else a.shortcut[1:]
        self.inert = _droppers(a)
        self.layout = train_memory_format(x, [conv for conv, _ in self.pairs])
        self.recompute = train_recompute_limit(x, self.layout)
        self.kinds = _kinds(self.pairs + ([self.proj] if self.proj is not None else []))

    def __call__(self, module, x, donate=False):
        for m in self.inert:  # a drop probability raised since the plan was made (a schedule)
            if m.training and m.drop_prob:
                raise Stale
        if _kinds(self.pairs + ([self.proj] if self.proj is not None else [])) != self.kinds:
            raise Stale
        return chain_forward(module, x.contiguous(memory_format=self.layout), self.pairs, downsample=self.proj,
                             identity=self.proj is None, recompute_max_reduction=self.recompute)


class _ReferenceRun:
    """The library class's own forward (the next class after the fused mixin), announced."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why

    def __call__(self, module, x, donate=False):
        P.announce(module, self.why)
        return super(_FusedBlockMixin, module).forward(x)


class _FusedBlockMixin(_Planned):
    """The forward shared by the fused blocks; each class describes its layers in :meth:`_anatomy`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._reference_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, False)[0]

    @torch.jit.unused
    def _run(self, x: torch.Tensor, donate: bool):
        """``(output, fresh)``: the plan for this call's input signature (:mod:`fusedres.plan`),
        made on first use: eval BN: each conv one fused op, the last one with the shortcut fused
        in; batch-statistics BN: one train chain; anything else: the reference forward.
        ``donate``: the caller gives up ``x`` (the eval route may write its output there);
        ``fresh``: no one but the caller holds the output (the eval route made it)."""
        why = P.call_reason(x)
        if why is not None:
            P.announce(self, why)
            return super().forward(x), False
        key = plan.signature(self, x, self._modules.values())
        p = plan.lookup(self, key, self._modules.values())
        if p is not None:
            try:
                return p.run(self, x, donate), p.route == "eval" and p.run.fresh
            except Stale:
                pass
        p = self._make_plan(x)
        plan.store(self, key, p)
        return p.run(self, x, donate), p.route == "eval" and p.run.fresh

    def _make_plan(self, x: torch.Tensor) -> Plan:
        seen = plan.watch(self._modules.values())
        a = self._anatomy()
        why = P.input_reason(self._modules.items(), x, a.convs(), a.bns())
        if why is None:
            why = _eval_reason(a)
            if why is None:
                return Plan("eval", _EvalRun(a, self.backend), seen)
            train_why = _train_reason(a, x, self)
            if train_why is None:
                return Plan("train", _TrainRun(a, x), seen)
            if any(P.batch_stat_bn(b) for _, b in a.pairs()):
                why = train_why
        return Plan("reference", _ReferenceRun(why), seen, why)

    def fusion_report(self) -> str | None:
        """Why this block runs (partly) unfused whatever the call, or None: its layer types."""
        a = self._anatomy()
        why = _layer_reason(a, lambda bn: type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d),
                            "a BatchNorm")
        if why is not None:
            return "reference forward: " + why
        parts = [f"{type(m).__name__} after a conv" for s in a.stages for m in s[3]]
        if a.attn is not None:
            parts.append(f"the attention {type(a.attn).__name__}")
        if a.shortcut is not None and a.shortcut[0] is not None:
            parts.append(f"the shortcut's {type(a.shortcut[0]).__name__}")
        if parts:
            return ("convs fused in eval, " + " and ".join(parts) + " run as modules in between; "
                    "training runs the reference forward")
        return None


class BasicBlock(_FusedBlockMixin, tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` (same constructor, attributes and ``state_dict``), fused.

    Eval: ``relu(bn1(conv1(x)))`` is one fused op and ``relu(bn2(conv2(.)) + identity)``
    (with the downsample conv+BN) another: 2 kernels per block.
    Input ``(N, inplanes, H, W)``, output ``(N, planes, H/stride, W/stride)``.
    """

    def _anatomy(self) -> Anatomy:
        ds = self.downsample
        return Anatomy(((self.conv1, self.bn1, self.relu, ()),), (self.conv2, self.bn2), None, ds,
                       shortcut_of(ds), self.relu)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ``BasicBlock.forward``, written out for TorchScript (which has no ``super()``)."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(_FusedBlockMixin, tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` (same constructor, attributes and ``state_dict``), fused.

    Eval: conv1x1+BN+ReLU, conv3x3+BN+ReLU, and conv1x1+BN + residual (+ downsample
    conv+BN) + ReLU: 3 kernels per block.
    Input ``(N, inplanes, H, W)``, output ``(N, planes * 4, H/stride, W/stride)``.
    """

    def _anatomy(self) -> Anatomy:
        ds = self.downsample
        stages = ((self.conv1, self.bn1, self.relu, ()), (self.conv2, self.bn2, self.relu, ()))
        return Anatomy(stages, (self.conv3, self.bn3), None, ds,
                       shortcut_of(ds), self.relu)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ``Bottleneck.forward``, written out for TorchScript (which has no ``super()``)."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _StemEvalRun:
    """The eval stem: one fused op per conv + BN + ReLU, then the pool module.

    When the last conv's backend applies ReLU as a separate pass over its output
    (``SEPARATE_RELU``: cpu, torch) and the pool is a plain ``nn.MaxPool2d``, the ReLU runs
    after the pool instead, on a quarter of the elements: ``relu(max(w)) == max(relu(w))`` for
    every window (ReLU is monotone, and max-pool and ReLU both keep NaN), so the values are
    the same (up to the sign of a zero).  The pool has no hooks here (the plan watches it)."""

    __slots__ = ("steps", "pool", "backend", "calls", "relu_after_pool")

    def __init__(self, stages, pool, backend):
        self.steps = [_Step(conv, bn) for conv, bn, _ in stages]
        self.pool, self.backend, self.calls = pool, backend, None
        self.relu_after_pool = False

    def __call__(self, owner, x):
        x = x.contiguous(memory_format=torch.channels_last)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        first = self.calls is None
        calls = [] if first else self.calls
        last = len(self.steps) - 1
        for i, step in enumerate(self.steps):
            w, s, t, st = step.args(dt)
            if first:
                call = step.prepare(x, w, s, t, st, True, self.backend)
                if i == last and _relu_commutes(call, self.pool):
                    call = step.prepare(x, w, s, t, st, False, self.backend)
                    self.relu_after_pool = True
                calls.append(call)
            x = calls[i](x, w, s, t, None, st)
        self.calls = calls
        out = self.pool(x)
        if not self.relu_after_pool:
            return out
        return torch.relu(out) if out.requires_grad else out.relu_()


def _relu_commutes(call, pool) -> bool:
    """Whether the stem's ReLU may run after ``pool`` instead of in ``call`` (see
    :class:`_StemEvalRun`): the backend's ReLU is a separate pass, and the pool a plain max-pool."""
    return (getattr(call.mod, "SEPARATE_RELU", False) and call.empty is None and type(pool) is nn.MaxPool2d
            and not pool.return_indices)


class _StemTrainRun:
    """The training stem: one chain, with the pool when it is a plain ``nn.MaxPool2d`` (its input
    and indices are then recomputed in backward instead of stored)."""

    __slots__ = ("pairs", "pool", "plain_pool", "layout", "recompute", "kinds")

    def __init__(self, stages, pool, x):
        self.pairs = [(conv, bn) for conv, bn, _ in stages]
        self.kinds = _kinds(self.pairs)
        self.pool = pool
        self.plain_pool = type(pool) is nn.MaxPool2d and not pool.return_indices
        # channels_last (at the stem's sizes: the fast layout of the Triton kernels, of oneDNN's
        # convolutions and of ATen's CPU max-pool, 15x faster than on NCHW) unless the input is
        # so small that the CPU's NCHW convolutions win (train_memory_format).
        self.layout = train_memory_format(x, [conv for conv, _ in self.pairs])
        self.recompute = train_recompute_limit(x, self.layout)

    def __call__(self, owner, x):
        if _kinds(self.pairs) != self.kinds:  # a layer moved on its own (see _kinds)
            raise Stale
        x = chain_forward(owner, x.contiguous(memory_format=self.layout), self.pairs,
                          pool=self.pool if self.plain_pool else None, recompute_max_reduction=self.recompute)
        return x if self.plain_pool else self.pool(x)


class _StemReferenceRun:
    """The stem's own modules called in order (``conv1``, ``bn1``, the activation, the pool), so a
    hook on any of them, a deep stem's ``Sequential`` included, fires as in the reference."""

    __slots__ = ("named", "why")

    def __init__(self, named, why):
        self.named, self.why = named, why

    def __call__(self, owner, x):
        P.announce(owner, self.why)
        for _, mod in self.named:
            x = mod(x)
        return x


def fused_stem(owner, named, stages, pool, x: torch.Tensor) -> torch.Tensor:
    """``pool(act(bn(conv(...))))`` over the stem ``stages`` ``((conv, bn, act), ...)``: one fused op
    per conv and the pool in eval, one train chain with batch statistics, else the layers
    themselves; planned per input signature like a block (:mod:`fusedres.plan`).  ``named``:
    the stem's ``(name, module)`` pairs; ``owner``: the model (its ``backend``, its sync-BN
    mark, and the key of the stem's plans)."""
    why = P.call_reason(x)
    if why is not None:
        return _StemReferenceRun(named, why)(owner, x)
    roots = [m for _, m in named]
    key = plan.signature(owner, x, roots)
    p = plan.lookup(owner, key, roots)
    if p is not None:
        try:
            return p.run(owner, x)
        except Stale:
            pass
    p = _stem_plan(owner, named, roots, stages, pool, x)
    plan.store(owner, key, p)
    return p.run(owner, x)


def _stem_plan(owner, named, roots, stages, pool, x) -> Plan:
    seen = plan.watch(roots)
    why = P.input_reason(named, x, [s[0] for s in stages], [s[1] for s in stages])
    if why is None:
        a = Anatomy(tuple((c, b, act, ()) for c, b, act in stages[:-1]), stages[-1][:2], None, None, None,
                    stages[-1][2])
        why = _layer_reason(a, P.foldable_bn, "an eval-mode BatchNorm with running statistics")
        if why is None:
            return Plan("eval", _StemEvalRun(stages, pool, owner.backend), seen)
        pairs = a.pairs()
        train_why = chain_reason(x, pairs, [s[2] for s in stages], None, owner)
        if train_why is None:
            return Plan("train", _StemTrainRun(stages, pool, x), seen)
        if any(P.batch_stat_bn(b) for _, b in pairs):
            why = train_why
    return Plan("reference", _StemReferenceRun(named, why), seen, why)


def run_stages(stages, x: torch.Tensor) -> torch.Tensor:
    """A model's stages (``layer1`` to ``layer4``) applied in order, as ``stage(x)`` each.

    In plain eager calls, a stage that is a plain ``nn.Sequential`` of fused blocks runs its
    blocks here, handing each block's output to the next one as donated
    (:meth:`_FusedBlockMixin._run`) when a fused block made it and no hook can see it: the CPU
    backend then adds an identity block's residual in place
    (:func:`fusedres.backends.cpu.conv_bn_act_into`).  Every other module is called as usual,
    and a call anything watches (tracing, ``torch.compile``, global hooks) takes the plain
    ``stage(x)`` calls."""
    if torch.compiler.is_compiling() or P.call_reason(x) is not None:
        for stage in stages:
            x = stage(x)
        return x
    fresh = False
    for stage in stages:
        if type(stage) is not nn.Sequential or not P.plain_call(stage):
            x, fresh = stage(x), False
            continue
        for block in stage._modules.values():
            if isinstance(block, _FusedBlockMixin) and type(block).forward is _FusedBlockMixin.forward \
                    and type(block)._fused_forward is _FusedBlockMixin._fused_forward and P.plain_call(block):
                x, fresh = block._run(x, fresh)
            else:
                x, fresh = block(x), False
    return x


def _plain_trunk(layers) -> list | None:
    """``[(module, class), ...]`` of the stages and their blocks when every stage is a plain
    ``nn.Sequential`` of fused blocks running their own class's forward (what :func:`run_stages`
    hands on as donated), else None."""
    kinds = []
    for stage in layers:
        if type(stage) is not nn.Sequential or not P.plain_call(stage):
            return None
        kinds.append((stage, nn.Sequential))
        for block in stage._modules.values():
            if not (isinstance(block, _FusedBlockMixin) and type(block).forward is _FusedBlockMixin.forward
                    and type(block)._fused_forward is _FusedBlockMixin._fused_forward and P.plain_call(block)):
                return None
            kinds.append((block, type(block)))
    return kinds


class _TrunkRun:
    """A model's stem and stages in eval for one input signature: the stem's and every block's
    eval run (what their own plans would hold) called in turn, so the per-call questions
    (:func:`fusedres.patterns.call_reason`, the signature, the module watch) are asked once for
    the model instead of once per block.  On a 2-core CPU, a ResNet-50 forward at batch 1 spent
    2.8 ms instead of 5.4 ms outside its convolutions this way (with the leaner per-conv reads).

    What a block's own plan would notice and the model-level watch (:func:`fusedres.plan.watch`:
    modules, modes, hooks, forwards set on instances) does not is checked here on every call: a
    stage or block whose class was reverted or whose class's ``forward`` was replaced (the whole
    call raises :class:`Stale` before anything runs), and a block whose ``backend`` changed, whose
    input shape differs from the planned one (the stem's pool changed) or whose own run raised
    :class:`Stale`: that block is planned again and run from the same input, as its own plan
    would be, and the blocks before it do not run twice.  ``valid`` turns False when such a
    block leaves the eval route; the caller then drops this plan."""

    __slots__ = ("stem", "blocks", "shapes", "kinds", "classes", "valid")

    def __init__(self, stem, blocks, shapes, kinds):
        self.stem, self.blocks, self.shapes, self.kinds = stem, blocks, shapes, kinds
        self.classes = tuple({type(b) for b, _ in blocks})
        self.valid = True

    def __call__(self, owner, x):
        for mod, kind in self.kinds:
            if type(mod) is not kind:
                raise Stale
        for cls in self.classes:
            if cls.forward is not _FusedBlockMixin.forward or cls._fused_forward is not _FusedBlockMixin._fused_forward:
                raise Stale
        x = self.stem(owner, x)
        fresh = False
        blocks, shapes = self.blocks, self.shapes
        for i in range(len(blocks)):
            block, run = blocks[i]
            if block.backend == run.backend and x.shape == shapes[i]:
                try:
                    x = run(block, x, fresh)
                    fresh = run.fresh
                    continue
                except Stale:
                    pass
            bp = block._make_plan(x)
            if bp.route == "eval":
                blocks[i], shapes[i] = (block, bp.run), x.shape
            else:
                self.valid = False
            x = bp.run(block, x, fresh)
            fresh = bp.route == "eval" and bp.run.fresh
        return x


def _trunk_build(owner, named, stem_stages, pool, layers, x):
    """One forward of the stem and stages with every part planned afresh (as :func:`fused_stem`
    and :func:`run_stages` would); returns ``(output, _TrunkRun or None)``: None unless the stem
    and every block took the eval route."""
    kinds = _plain_trunk(layers)
    sp = _stem_plan(owner, named, [m for _, m in named], stem_stages, pool, x)
    if kinds is None or sp.route != "eval":
        return run_stages(layers, sp.run(owner, x)), None
    x = sp.run(owner, x)
    runs, shapes, fresh, flat = [], [], False, True
    for stage in layers:
        for block in stage._modules.values():
            bp = block._make_plan(x)
            runs.append((block, bp.run))
            shapes.append(x.shape)
            x = bp.run(block, x, fresh)
            fresh = bp.route == "eval" and bp.run.fresh
            flat = flat and bp.route == "eval"
    return x, (_TrunkRun(sp.run, runs, shapes, kinds) if flat else None)


def run_trunk(owner, named, stem_stages, pool, layers, x: torch.Tensor) -> torch.Tensor:
    """A model's stem then its stages: ``run_stages(layers, fused_stem(owner, named, ...))``, as
    one plan of the model (:class:`_TrunkRun`) when no autograd is needed and the stem and every
    block run their eval route (the common inference call).  Any other call (autograd, a hook
    on a submodule, a stage or block that is not plain, BN with batch statistics) takes the
    per-block plans: each block decides its own route, as without this."""
    if torch.compiler.is_compiling() or P.call_reason(x) is not None:
        return run_stages(layers, fused_stem(owner, named, stem_stages, pool, x))
    roots = [m for _, m in named]
    roots.extend(layers)
    if plan.needs_grad(x, roots):  # each block's own plan knows which of its layers need autograd
        return run_stages(layers, fused_stem(owner, named, stem_stages, pool, x))
    sig = plan.signature(owner, x, roots)
    if sig is None:  # this frame runs eagerly while a callee's is compiled (a graph break): no plan
        return run_stages(layers, fused_stem(owner, named, stem_stages, pool, x))
    key = ("trunk",) + sig
    p = plan.lookup(owner, key, roots)
    if p is not None:
        if p.run is None:
            return run_stages(layers, fused_stem(owner, named, stem_stages, pool, x))
        try:
            out = p.run(owner, x)
        except Stale:  # raised before any block ran: plan again from the input
            pass
        else:
            if not p.run.valid:
                plan.store(owner, key, Plan("blocks", None, (p.watched, p.modes, p.hooked)))
            return out
    seen = plan.watch(roots)
    out, run = _trunk_build(owner, named, stem_stages, pool, layers, x)
    plan.store(owner, key, Plan("trunk" if run is not None else "blocks", run, seen))
    return out


class FusedResNet(_Planned, tv_resnet.ResNet):
    """torchvision ``ResNet`` whose stem ``relu(bn1(conv1(x)))`` runs as one fused op.

    :func:`convert` gives an exact ``torchvision.models.ResNet`` this class in place; every
    attribute and ``state_dict`` key is unchanged.  When the fused path is active the input is
    converted to channels_last once by the stem, explicitly: every fused backend's fast layout
    (CPU training at small spatial sizes runs NCHW instead, see
    :func:`fusedres.training.train_memory_format`).  Between the blocks of a stage, an output
    no hook or caller can see is handed on as donated (:func:`run_stages`).
    """

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        else:
            x = self._trunk(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def fusion_report(self) -> str | None:
        if not (P.fusable_conv(self.conv1) and P.is_relu(self.relu)
                and type(self.bn1) in (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)):
            return "reference stem: its layers are not a plain conv + BatchNorm + ReLU"
        return None

    @torch.jit.unused
    def _stem_parts(self):
        """The stem's ``(name, module)`` pairs and its ``((conv, bn, act),)``."""
        named = (("conv1", self.conv1), ("bn1", self.bn1), ("relu", self.relu), ("maxpool", self.maxpool))
        return named, ((self.conv1, self.bn1, self.relu),)

    @torch.jit.unused
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        named, stages = self._stem_parts()
        return fused_stem(self, named, stages, self.maxpool, x)

    @torch.jit.unused
    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        named, stages = self._stem_parts()
        return run_trunk(self, named, stages, self.maxpool, (self.layer1, self.layer2, self.layer3, self.layer4), x)


_FUSED = {
    tv_resnet.BasicBlock: BasicBlock,
    tv_resnet.Bottleneck: Bottleneck,
    tv_resnet.ResNet: FusedResNet,
}
_REFERENCE = {v: k for k, v in _FUSED.items()}


def register(reference: type, fused: type) -> None:
    """Let :func:`convert` swap ``reference`` modules for ``fused`` (a subclass adding no state)."""
    _FUSED[reference] = fused
    _REFERENCE[fused] = reference


def _validate(backend: str) -> str:
    from .backends import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def _load_optional_families() -> None:
    """Register the fused classes of the model libraries the process has loaded (timm)."""
    if "timm" in sys.modules and "fusedres.timm_models" not in sys.modules:
        try:
            importlib.import_module("fusedres.timm_models")
        except Exception as exc:  # a timm without the classes we subclass: convert what we can
            warnings.warn(f"fusedres: timm's ResNet blocks are not converted ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=3)


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Fuse every torchvision (and timm) ``BasicBlock``/``Bottleneck`` and ``ResNet`` stem in place.

    Works on any module tree: resnet18-152, resnext*, wide_resnet*, dilated variants, a
    detection or segmentation backbone, timm's ResNet family (ResNet-D, SE/ECA, anti-aliased,
    drop-path), or a model that merely contains such blocks.  Only exact library classes are
    converted (a user subclass may override ``forward``).  Parameters, buffers, hooks and
    ``state_dict`` keys are untouched; a block whose submodules carry hooks runs the
    reference forward, so the hooks fire.  What was converted, and which blocks run (partly)
    unfused and why, is logged at INFO level on the ``fusedres`` logger (:func:`explain`
    returns the same text); a model with nothing to convert gets a warning.  Returns ``model``.

    Args:
        backend: ``"auto" | "torch" | "cpu" | "triton" | "cuda"``, stored on each fused module;
            ``"auto"`` is resolved per call (and honours ``$FUSEDRES_BACKEND``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend != "auto":
        _validate(backend)
    _load_optional_families()
    for mod in model.modules():
        fused = _FUSED.get(type(mod))
        if fused is not None:
            mod.__class__ = fused
        if type(mod) in _REFERENCE:  # converting again only changes the backend
            mod.backend = backend
            plan.drop(mod)
    if not any(type(m) in _REFERENCE for m in model.modules()):
        warnings.warn(
            f"fusedres.convert: {type(model).__name__} contains no torchvision or timm ResNet block or stem; "
            "nothing was converted", UserWarning, stacklevel=2,
        )
    elif _log.isEnabledFor(logging.INFO):
        _log.info("%s", explain(model))
    return model


def explain(model: nn.Module) -> str:
    """What :func:`convert` made of ``model``: fused modules per class, and each one that runs
    (partly) unfused whatever the input, with the reason.  Per-call fallbacks (hooks, tracing,
    ``torch.func``...) are announced when they happen instead."""
    counts: dict = {}
    notes: dict = {}  # note -> names of the modules it applies to
    for name, mod in model.named_modules():
        if type(mod) not in _REFERENCE:
            continue
        counts[type(mod).__name__] = counts.get(type(mod).__name__, 0) + 1
        note = mod.fusion_report() if hasattr(mod, "fusion_report") else None
        if note is not None:
            notes.setdefault(note, []).append(name or type(mod).__name__)
        # The stages of a converted ResNet: blocks of a class fusedres does not know stay as they are.
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(mod, stage, None)
            for i, block in enumerate(layer if isinstance(layer, nn.Sequential) else ()):
                if type(block) not in _REFERENCE:
                    note = f"not converted: {type(block).__name__} is not a block class fusedres knows; it runs as it is"
                    notes.setdefault(note, []).append(f"{name + '.' if name else ''}{stage}.{i}")
    if not counts:
        return f"fusedres: nothing converted in {type(model).__name__}"
    head = ", ".join(f"{n} {cls}" for cls, n in counts.items())
    lines = [f"fusedres: {type(model).__name__}: fused {head}"]
    for note, names in notes.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"  {len(names)} {'module' if len(names) == 1 else 'modules'} ({shown}): {note}")
    return "\n".join(lines)


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: the fused modules become torchvision's classes again."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for mod in model.modules():
        ref = _REFERENCE.get(type(mod))
        if ref is not None:
            mod.__class__ = ref
            mod.__dict__.pop("backend", None)
            plan.drop(mod)
    return model

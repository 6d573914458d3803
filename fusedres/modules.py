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
  weights), ``torch.jit.trace`` / ONNX export, ``torch.fx`` tracing, ``torch.func``
  transforms, forward-mode AD, and an input whose dtype or device does not match the weights
  (the reference then raises its own error, before any running statistic moves).
  ``torch.jit.script`` compiles the reference computation.

Under ``torch.autocast`` the fused ops cast as ``F.conv2d`` does, so a converted model's
activations have the dtype torchvision's would.
"""

import torch
import torch.nn as nn
from torchvision.models import resnet as tv_resnet

from . import patterns as P
from .functional import block_tail, bn_scale_shift, conv_bn_act
from .training import chain_forward, chain_reason

__all__ = ["BasicBlock", "Bottleneck", "FusedResNet", "convert", "revert"]


def _affine_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale_shift(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype):
    scale, shift = bn_scale_shift(bn, dtype)
    if conv.bias is not None:  # conv bias folds into the shift: (acc + b) * s + t
        shift = shift + conv.bias.to(dtype) * scale
    return scale, shift


def _bn_args(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> dict:
    """The affine arguments of the fused ops for ``bn(conv(x))``.

    An affine BN after a bias-free conv (every torchvision ResNet) is passed as it is -
    weight, bias and running statistics - so a backend that folds them in its kernel
    launches nothing else; otherwise the fold happens here.
    """
    if conv.bias is None and bn.weight is not None and bn.bias is not None:
        return dict(scale=bn.weight, shift=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
                    eps=bn.eps)
    scale, shift = _scale_shift(conv, bn, dtype)
    return dict(scale=scale, shift=shift)


def _conv_bn(conv, bn, x, *, relu, residual=None, backend="auto"):
    return conv_bn_act(
        x, conv.weight, **_bn_args(conv, bn, _affine_dtype(x)),
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        residual=residual, relu=relu, backend=backend,
    )


def _tail(conv, bn, y, x, projection, backend):
    """Last conv + BN + residual (+ fused 1x1 conv + BN projection) + ReLU of a block, as one op."""
    if projection is None:
        return _conv_bn(conv, bn, y, relu=True, residual=x, backend=backend)
    ds_conv, ds_bn = projection
    dt = _affine_dtype(y)
    main = _bn_args(conv, bn, dt)
    skip = {f"ds_{k}": v for k, v in _bn_args(ds_conv, ds_bn, dt).items()}
    return block_tail(
        y, conv.weight, main.pop("scale"), main.pop("shift"), x, ds_conv.weight,
        skip.pop("ds_scale"), skip.pop("ds_shift"), **main, **skip,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        ds_stride=ds_conv.stride, relu=True, backend=backend,
    )


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last, the fast layout of every fused kernel (a no-op when it already is).

    Blocks convert their input once, so a model fed NCHW pays one copy at its first fused
    block instead of one per fused op, and hands channels_last on (the same values).
    """
    return x.contiguous(memory_format=torch.channels_last)


def _eval_reason(pairs, relu, downsample, projection) -> str | None:
    """Why the eval forward cannot take these layers, or None."""
    if not P.is_relu(relu):
        return f"its activation is {type(relu).__name__}, not nn.ReLU"
    if downsample is not None and projection is None:
        return f"its downsample ({type(downsample).__name__}) is not a 1x1 nn.Conv2d + BatchNorm nn.Sequential"
    layers = list(pairs) + ([projection] if projection is not None else [])
    for conv, bn in layers:
        if not P.fusable_conv(conv):
            return f"a conv is {type(conv).__name__}, not a plain nn.Conv2d with zero padding"
        if not P.foldable_bn(bn):
            return f"a norm layer is {type(bn).__name__}, not an eval-mode BatchNorm with running statistics"
    return None


class _FusedBlockMixin:
    """The forward shared by the fused blocks; each class names its ``(conv, bn)`` pairs."""

    #: Backend for this block's fused ops; :func:`convert` sets it per instance.
    backend = "auto"
    #: Marks the fused classes (for :func:`fusedres.convert_sync_batchnorm`, without an import).
    _fusedres_fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._reference_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval BN: each ``(conv, bn)`` one fused op, the last one with the residual (and the
        downsample) fused in; batch-statistics BN: one train chain; else torchvision's forward."""
        pairs = self._pairs()
        ds = self.downsample
        proj = P.projection(ds) if ds is not None else None
        convs = [c for c, _ in pairs] + ([proj[0]] if proj is not None else [])
        why = P.reference_reason(self._modules.items(), x, convs)
        if why is None:
            why = _eval_reason(pairs, self.relu, ds, proj)
            if why is None:
                x = y = _channels_last(x)
                for conv, bn in pairs[:-1]:
                    y = _conv_bn(conv, bn, y, relu=True, backend=self.backend)
                return _tail(*pairs[-1], y, x, proj, self.backend)
            if ds is None or proj is not None:
                train_why = chain_reason(x, pairs, self.relu, proj, self)
                if train_why is None:
                    return chain_forward(self, _channels_last(x), pairs, downsample=proj, identity=ds is None)
                if any(P.batch_stat_bn(b) for _, b in pairs):
                    why = train_why
        P.announce(self, why)
        return super().forward(x)

    def __prepare_scriptable__(self):
        P.announce(self, "torch.jit.script compiles the reference computation")
        return self


class BasicBlock(_FusedBlockMixin, tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` (same constructor, attributes and ``state_dict``), fused.

    Eval: ``relu(bn1(conv1(x)))`` is one fused op and ``relu(bn2(conv2(.)) + identity)``
    (with the downsample conv+BN) another: 2 kernels per block.
    Input ``(N, inplanes, H, W)``, output ``(N, planes, H/stride, W/stride)``.
    """

    def _pairs(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2)

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

    def _pairs(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)

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


class FusedResNet(tv_resnet.ResNet):
    """torchvision ``ResNet`` whose stem ``relu(bn1(conv1(x)))`` runs as one fused op.

    :func:`convert` gives an exact ``torchvision.models.ResNet`` this class in place; every
    attribute and ``state_dict`` key is unchanged.  When the fused path is active (eval or
    train) the input is converted to channels_last once here, explicitly: every fused
    backend's fast layout.
    """

    backend = "auto"
    _fusedres_fused = True

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        else:
            x = self._stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    @torch.jit.unused
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """``maxpool(relu(bn1(conv1(x))))``: one fused op and the pool in eval, one train chain
        (with the pool) with batch statistics, else torchvision's layers."""
        stem = (("conv1", self.conv1), ("bn1", self.bn1), ("relu", self.relu), ("maxpool", self.maxpool))
        why = P.reference_reason(stem, x, (self.conv1,))
        if why is None:
            pair = ((self.conv1, self.bn1),)
            why = _eval_reason(pair, self.relu, None, None)
            if why is None:
                x = _conv_bn(self.conv1, self.bn1, _channels_last(x), relu=True, backend=self.backend)
                return self.maxpool(x)
            train_why = chain_reason(x, pair, self.relu, None, self)
            if train_why is None:
                # channels_last from here on, as in eval: the fast layout of the Triton kernels, of
                # oneDNN's convolutions and of ATen's CPU max-pool (15x faster than on NCHW).
                x = _channels_last(x)
                # The max-pool joins the chain when it is a plain MaxPool2d: its input and
                # indices are then recomputed in backward instead of stored.
                plain_pool = type(self.maxpool) is nn.MaxPool2d and not self.maxpool.return_indices
                x = chain_forward(self, x, pair, pool=self.maxpool if plain_pool else None)
                return x if plain_pool else self.maxpool(x)
            if P.batch_stat_bn(self.bn1):
                why = train_why
        P.announce(self, why)
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def __prepare_scriptable__(self):
        P.announce(self, "torch.jit.script compiles the reference computation")
        return self


_FUSED = {
    tv_resnet.BasicBlock: BasicBlock,
    tv_resnet.Bottleneck: Bottleneck,
    tv_resnet.ResNet: FusedResNet,
}
_REFERENCE = {v: k for k, v in _FUSED.items()}


def _validate(backend: str) -> str:
    from .backends import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Fuse every torchvision ``BasicBlock``/``Bottleneck`` (and a ``ResNet``'s stem) in place.

    Works on any module tree: resnet18-152, resnext*, wide_resnet*, dilated variants, or a
    model that merely contains such blocks.  Only exact torchvision classes are converted
    (a user subclass may override ``forward``).  Parameters, buffers, hooks and
    ``state_dict`` keys are untouched; a block whose submodules carry hooks runs
    torchvision's forward, so the hooks fire.  Returns ``model``.

    Args:
        backend: ``"auto" | "torch" | "cpu" | "triton" | "cuda"``, stored on each fused module;
            ``"auto"`` is resolved per call (and honours ``$FUSEDRES_BACKEND``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend != "auto":
        _validate(backend)
    for mod in model.modules():
        fused = _FUSED.get(type(mod))
        if fused is not None:
            mod.__class__ = fused
        if type(mod) in _REFERENCE:  # converting again only changes the backend
            mod.backend = backend
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: the fused modules become torchvision's classes again."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for mod in model.modules():
        ref = _REFERENCE.get(type(mod))
        if ref is not None:
            mod.__class__ = ref
            mod.__dict__.pop("backend", None)
    return model

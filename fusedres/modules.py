"""Drop-in fused versions of torchvision's ``BasicBlock`` / ``Bottleneck`` and the ResNet stem.

The fused classes subclass torchvision's, add no parameters and no buffers, and keep every
attribute name, so ``isinstance`` checks, ``state_dict`` keys and checkpoints are unchanged.
:func:`convert` swaps the class of each block *in place* (the same module objects, so the
same parameters and buffers); :func:`revert` swaps it back.

Forward, per BatchNorm state:

* eval BN with running stats (``nn.BatchNorm2d`` or torchvision's ``FrozenBatchNorm2d``):
  each conv+BN(+ReLU)(+residual) runs as one :func:`fusedres.conv_bn_act`, the last conv of
  a block with a 1x1-conv+BN downsample as one :func:`fusedres.block_tail`.  ``scale``/``shift``
  are recomputed from the live BN parameters and buffers on every call, so they never go stale.
* BN with batch statistics (train mode, or ``track_running_stats=False``; ``nn.BatchNorm2d``
  or ``nn.SyncBatchNorm``): the block (or the stem with its max-pool) runs as one train-mode
  chain of :mod:`fusedres.training`, which keeps only pre-BN conv outputs for backward and
  updates the running stats like ``nn.BatchNorm2d``.
* anything else (a custom norm layer or downsample, ``SyncBatchNorm`` beside plain BN in one
  block, BNs of one block in different modes): torchvision's own forward, i.e. exactly the
  reference semantics.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from .functional import block_tail, bn_scale_shift, conv_bn_act
from .training import chain_forward, chain_ready

__all__ = ["BasicBlock", "Bottleneck", "FusedResNet", "convert", "revert"]


def _foldable_bn(bn: nn.Module) -> bool:
    """An eval-mode BN whose output is a fixed per-channel affine of its input."""
    if isinstance(bn, FrozenBatchNorm2d):
        return True
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return False
    return (not bn.training) and bn.running_mean is not None and bn.running_var is not None


def _fusable_conv(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


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


def _fusable_downsample(ds) -> bool:
    if ds is None:
        return True
    return (
        type(ds) is nn.Sequential
        and len(ds) == 2
        and _fusable_conv(ds[0])
        and ds[0].kernel_size == (1, 1)
        and ds[0].padding == (0, 0)
        and ds[0].dilation == (1, 1)
        and ds[0].groups == 1
        and _foldable_bn(ds[1])
    )


def _tail(conv, bn, y, x, downsample, backend):
    """Last conv + BN + residual (+ fused downsample) + ReLU of a block, as one op."""
    if downsample is None:
        return _conv_bn(conv, bn, y, relu=True, residual=x, backend=backend)
    ds_conv, ds_bn = downsample[0], downsample[1]
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
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class _FusedBlockMixin:
    #: Backend for this block's fused ops; :func:`convert` sets it per instance.
    backend: str = "auto"

    def _fused_eval_ready(self, pairs) -> bool:
        return (
            all(_fusable_conv(c) and _foldable_bn(b) for c, b in pairs)
            and type(self.relu) is nn.ReLU
            and _fusable_downsample(self.downsample)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval BN: each ``(conv, bn)`` of :meth:`_pairs` one fused op, the last one with the
        residual (and the downsample) fused in; batch-statistics BN: one train chain; anything
        else: torchvision's forward."""
        pairs = self._pairs()
        if not self._fused_eval_ready(pairs):
            if chain_ready(x, pairs, self.relu, self.downsample, self):
                return chain_forward(self, _channels_last(x), pairs, downsample=self.downsample,
                                     identity=self.downsample is None)
            return super().forward(x)
        x = y = _channels_last(x)
        for conv, bn in pairs[:-1]:
            y = _conv_bn(conv, bn, y, relu=True, backend=self.backend)
        return _tail(*pairs[-1], y, x, self.downsample, self.backend)


class BasicBlock(_FusedBlockMixin, tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` (same constructor, attributes and ``state_dict``), fused.

    Eval: ``relu(bn1(conv1(x)))`` is one fused op and ``relu(bn2(conv2(.)) + identity)``
    (with the downsample conv+BN) another: 2 kernels per block.
    Input ``(N, inplanes, H, W)``, output ``(N, planes, H/stride, W/stride)``.
    """

    def _pairs(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2)


class Bottleneck(_FusedBlockMixin, tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` (same constructor, attributes and ``state_dict``), fused.

    Eval: conv1x1+BN+ReLU, conv3x3+BN+ReLU, and conv1x1+BN + residual (+ downsample
    conv+BN) + ReLU: 3 kernels per block.
    Input ``(N, inplanes, H, W)``, output ``(N, planes * 4, H/stride, W/stride)``.
    """

    def _pairs(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)


class FusedResNet(tv_resnet.ResNet):
    """torchvision ``ResNet`` whose stem ``relu(bn1(conv1(x)))`` runs as one fused op.

    :func:`convert` gives an exact ``torchvision.models.ResNet`` this class in place; every
    attribute and ``state_dict`` key is unchanged.  When the fused path is active (eval or
    train) the input is converted to channels_last once here, explicitly: every fused
    backend's fast layout.
    """

    backend: str = "auto"

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if _fusable_conv(self.conv1) and _foldable_bn(self.bn1) and type(self.relu) is nn.ReLU:
            x = _conv_bn(self.conv1, self.bn1, _channels_last(x), relu=True, backend=self.backend)
            x = self.maxpool(x)
        elif chain_ready(x, ((self.conv1, self.bn1),), self.relu, None, self):
            # channels_last from here on, as in eval: the fast layout of the Triton kernels, of
            # oneDNN's convolutions and of ATen's CPU max-pool (15x faster than on NCHW).
            x = _channels_last(x)
            # The max-pool joins the chain when it is a plain MaxPool2d: its input and
            # indices are then recomputed in backward instead of stored.
            plain_pool = type(self.maxpool) is nn.MaxPool2d and not self.maxpool.return_indices
            x = chain_forward(self, x, ((self.conv1, self.bn1),), pool=self.maxpool if plain_pool else None)
            if not plain_pool:
                x = self.maxpool(x)
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


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
    ``state_dict`` keys are untouched.  Returns ``model``.

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

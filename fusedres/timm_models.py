"""Fused versions of timm's ResNet family: ``BasicBlock``, ``Bottleneck`` and the ``ResNet`` stem.

Imported by :func:`fusedres.convert` when timm is loaded, which registers these classes the way
torchvision's are: same constructor, attributes and ``state_dict`` keys, class swapped in place.
Covers what timm builds from ``timm.models.resnet``: resnet*, resnext*, wide_resnet*, the
ResNet-D variants (deep stem, average-pool downsample), SE/ECA attention (seresnet*,
ecaresnet*), anti-aliased (resnetblur*) and drop-path / drop-block models.

What fuses (eval, BN with running statistics; :class:`fusedres.modules.Anatomy`):

* every conv + BN + ReLU as one fused op; anti-aliasing layers run as their own modules between
  the convs; drop-block and drop-path are identities outside training and are skipped;
* the last conv + BN with the residual add and ReLU, and the projection shortcut's conv + BN
  fused in (one op); a ResNet-D shortcut pools first (timm's ``AvgPool2d``), then the same;
* with an attention module: the last conv + BN as one op, the attention module, then the
  shortcut conv + BN + add + ReLU as one op (the attention output is its residual);
* the stem, plain (7x7 conv) or deep (three 3x3 convs), each conv + BN + ReLU one op, then the
  stem pool as its own module.

Training (batch-statistics BN) runs one chain per block (:mod:`fusedres.training`) when the block
has nothing but convs, BNs, ReLUs and a plain projection; blocks with attention, anti-aliasing, a
pooled shortcut or active drop-path/drop-block keep timm's forward.  Anything else also keeps
timm's forward, announced once per reason (:mod:`fusedres.patterns`).
"""

import torch
import torch.nn as nn
from torch._prims_common import suggest_memory_format
from timm.models import resnet as timm_resnet

from .functional import autocast_dtype
from .patterns import call_reason
from .modules import Anatomy, _FusedBlockMixin, _Planned, fused_stem, register, run_trunk, shortcut_of

__all__ = ["TimmBasicBlock", "TimmBottleneck", "TimmResNet"]


def _reference_layout(x: torch.Tensor, model: nn.Module) -> torch.memory_format:
    """The memory format of the feature map timm's own trunk gives for input ``x``.

    The map has the layout of the last main-path conv's output (BN, activations, attention and
    the in-place ``x += shortcut`` keep it), so this follows the main path's convs (the stem's,
    then each block's ``conv1``, ``conv2``, ``conv3``; shortcut convs do not decide it) from
    ``x``'s format, each as PyTorch decides it for its backend (``torch._C._select_conv_backend``
    and ``_conv_determine_backend_memory_format``, asked with small stand-ins of the operands'
    dtype, device and strides: channels_last when the input or the weight is, on most backends,
    but never for cuDNN in float64).  Without those functions: channels_last when ``x`` or a
    main-path weight is."""
    convs = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            convs += [c for c in (getattr(block, n, None) for n in ("conv1", "conv2", "conv3")) if isinstance(c, nn.Conv2d)]
    cl = torch.channels_last
    fmt = suggest_memory_format(x) if x.dim() == 4 else torch.contiguous_format
    dtype = autocast_dtype(x) or x.dtype
    select = getattr(torch._C, "_select_conv_backend", None)
    decide = getattr(torch._C, "_conv_determine_backend_memory_format", None)
    for conv in convs:
        w = conv.weight
        if select is None or decide is None or isinstance(conv.padding, str) or w.dim() != 4:
            fmt = cl if fmt == cl or suggest_memory_format(w) == cl else torch.contiguous_format
            continue
        stand_in = torch.empty((x.shape[0], w.shape[1] * conv.groups, 16, 16), dtype=dtype, device=x.device,
                               memory_format=fmt)
        weight = torch.empty_strided(w.shape, w.stride(), dtype=dtype, device=w.device)
        backend = select(stand_in, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation), False,
                         [0, 0], conv.groups, None)
        fmt = decide(stand_in, weight, backend)
    return fmt


def _after(aa) -> tuple:
    return () if aa is None or type(aa) is nn.Identity else (aa,)


def _shortcut(ds):
    sc = shortcut_of(ds) if ds is not None else None
    if sc is not None and type(sc[0]) is nn.Identity:  # ResNet-D at stride 1: no pooling
        sc = (None, sc[1], sc[2])
    return sc


class TimmBasicBlock(_FusedBlockMixin, timm_resnet.BasicBlock):
    """timm ``BasicBlock``, fused: ``act1(bn1(conv1(x)))`` (then ``aa``) and
    ``act2(se(bn2(conv2(.))) + shortcut(x))``."""

    def _anatomy(self) -> Anatomy:
        return Anatomy(
            ((self.conv1, self.bn1, self.act1, _after(self.aa)),), (self.conv2, self.bn2), self.se,
            self.downsample, _shortcut(self.downsample), self.act2,
            (("drop_block", self.drop_block), ("drop_path", self.drop_path)),
        )

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``BasicBlock.forward``, written out for TorchScript (which has no ``super()``)."""
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        if self.aa is not None:
            x = self.aa(x)
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmBottleneck(_FusedBlockMixin, timm_resnet.Bottleneck):
    """timm ``Bottleneck``, fused: conv1x1+BN+ReLU, conv3x3+BN+ReLU (then ``aa``), and
    ``act3(se(bn3(conv3(.))) + shortcut(x))``."""

    def _anatomy(self) -> Anatomy:
        stages = ((self.conv1, self.bn1, self.act1, ()), (self.conv2, self.bn2, self.act2, _after(self.aa)))
        return Anatomy(
            stages, (self.conv3, self.bn3), self.se, self.downsample, _shortcut(self.downsample), self.act3,
            (("drop_block", self.drop_block), ("drop_path", self.drop_path)),
        )

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``Bottleneck.forward``, written out for TorchScript (which has no ``super()``)."""
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        if self.aa is not None:
            x = self.aa(x)
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class TimmResNet(_Planned, timm_resnet.ResNet):
    """timm ``ResNet`` whose stem (plain or deep) runs as fused conv + BN + ReLU ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.forward_head(self.forward_features(x))
        # Traced (torch.fx), transformed or globally hooked: timm's forward.  Compiled too: a compiled
        # dropout draws its own mask, not eager's, whatever the layout.
        if torch.compiler.is_compiling() or call_reason(x) is not None:
            return super().forward(x)
        return self.forward_head(self._head_input(x))

    @torch.jit.unused
    def _head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map for ``forward_head``, in the layout timm's trunk would give it when the head
        drops out on the map itself (training, a ``drop_rate``, ``global_pool=''``): ``F.dropout``
        draws its mask in memory order, so the fused trunk's channels_last map would lose other
        elements than timm's NCHW one with the same seed.  Pooled heads take the map as it is."""
        feats = self.forward_features(x)
        pool = self.global_pool
        keeps_map = type(pool) is nn.Identity or (callable(getattr(pool, "is_identity", None)) and pool.is_identity())
        if self.drop_rate and self.training and keeps_map and feats.dim() == 4:
            fmt = _reference_layout(x, self)
            if not feats.is_contiguous(memory_format=fmt):
                feats = feats.contiguous(memory_format=fmt)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            return self.layer4(x)
        return self._fused_features(x)

    @torch.jit.unused
    def _fused_features(self, x: torch.Tensor) -> torch.Tensor:
        stages = self._stem_stages()
        if stages is None:
            return super().forward_features(x)
        named = (("conv1", self.conv1), ("bn1", self.bn1), ("act1", self.act1), ("maxpool", self.maxpool))
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing:
            return timm_resnet.checkpoint_seq(layers, fused_stem(self, named, stages, self.maxpool, x), flatten=True)
        return run_trunk(self, named, stages, self.maxpool, layers, x)

    def _stem_stages(self):
        """``((conv, bn, act), ...)`` of the stem: ``conv1`` alone, or a deep stem's
        ``Sequential(conv, bn, act, conv, bn, act, conv)``, then ``bn1``, ``act1``; None for any other."""
        layers = list(self.conv1) if type(self.conv1) is nn.Sequential else [self.conv1]
        layers += [self.bn1, self.act1]
        if len(layers) % 3:
            return None
        return tuple(tuple(layers[i:i + 3]) for i in range(0, len(layers), 3))

    def fusion_report(self) -> str | None:
        if self._stem_stages() is None:
            return "reference stem: conv1 is neither one conv nor a deep stem of conv-norm-act triples"
        return None


register(timm_resnet.BasicBlock, TimmBasicBlock)
register(timm_resnet.Bottleneck, TimmBottleneck)
register(timm_resnet.ResNet, TimmResNet)

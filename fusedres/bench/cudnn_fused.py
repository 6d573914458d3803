"""The ``cudnn-fused`` contender: what PyTorch itself offers for a fused eval block without compiling.

Each conv + eval BatchNorm is folded into one conv with a bias (weights and bias computed once,
in fp32, rounded once to the model's dtype), then run by cuDNN's fused ops, the ones TorchScript
freezing emits:

* conv + BN + ReLU  ->  ``torch.cudnn_convolution_relu``
* conv + BN + residual add + ReLU  ->  ``torch.cudnn_convolution_add_relu`` (``z`` = the shortcut)
* the downsample's 1x1 conv + BN  ->  ``F.conv2d`` with the folded bias

torchvision's ``BasicBlock``/``Bottleneck`` and the ResNet stem are replaced (in a copy) by
:class:`FoldedBlock` / :class:`FoldedConv` modules; everything else is kept.  Eval only (the BN
statistics are frozen into the weights).  On a CPU the same folded modules run ``F.conv2d`` +
add + ReLU instead, so the folding is testable without a GPU; the bench offers the contender on
CUDA only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet


class FoldedConv(nn.Module):
    """``act(conv(x) * bn_scale + bn_shift (+ z))`` as one conv with a folded bias."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, relu: bool):
        super().__init__()
        with torch.no_grad():
            scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
            shift = bn.bias.float() - bn.running_mean.float() * scale
            if conv.bias is not None:
                shift = shift + conv.bias.float() * scale
            w = conv.weight.float() * scale.view(-1, 1, 1, 1)
        dtype = conv.weight.dtype
        self.register_buffer("weight", w.to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", shift.to(dtype))
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.relu = relu

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda:
            if z is not None:
                return torch.cudnn_convolution_add_relu(x, self.weight, z, 1.0, self.bias, self.stride, self.padding,
                                                        self.dilation, self.groups)
            if self.relu:
                return torch.cudnn_convolution_relu(x, self.weight, self.bias, self.stride, self.padding,
                                                    self.dilation, self.groups)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if z is not None:
            out = out + z
        return torch.relu(out) if self.relu or z is not None else out


class FoldedBlock(nn.Module):
    """A torchvision ``BasicBlock``/``Bottleneck`` as folded convs: every conv but the last with
    ReLU, the last with the shortcut added and ReLU (cuDNN's add-relu fusion)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if isinstance(block, tv_resnet.Bottleneck):
            pairs.append((block.conv3, block.bn3))
        self.convs = nn.ModuleList(FoldedConv(c, b, relu=True) for c, b in pairs[:-1])
        self.last = FoldedConv(*pairs[-1], relu=True)
        ds = block.downsample
        self.shortcut = FoldedConv(ds[0], ds[1], relu=False) if ds is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv in self.convs:
            y = conv(y)
        z = x if self.shortcut is None else self.shortcut(x)
        return self.last(y, z)


def _is_plain_block(m: nn.Module) -> bool:
    if type(m) not in (tv_resnet.BasicBlock, tv_resnet.Bottleneck):
        return False
    ds = m.downsample
    return ds is None or (type(ds) is nn.Sequential and len(ds) == 2 and isinstance(ds[1], nn.BatchNorm2d))


def cudnn_fused(model: nn.Module) -> nn.Module:
    """A copy of eval-mode ``model`` with every torchvision block (and a ResNet's stem) folded into
    cuDNN's fused conv ops."""
    model = copy.deepcopy(model).eval()
    if isinstance(model, tv_resnet.ResNet):
        model.conv1 = FoldedConv(model.conv1, model.bn1, relu=True)
        model.bn1, model.relu = nn.Identity(), nn.Identity()
    if _is_plain_block(model):
        return FoldedBlock(model)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if _is_plain_block(child):
                setattr(mod, child_name, FoldedBlock(child))
    return model

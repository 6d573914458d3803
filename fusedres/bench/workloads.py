"""What the benchmark runs: torchvision models and every distinct residual-block shape in them.

Block shapes are read off the models themselves (built on the ``meta`` device with random
init, so nothing is allocated or downloaded): a forward pass with hooks records each block's
input height/width at the chosen image size, and the block's convolutions give its type,
``inplanes``, ``planes``, ``stride``, ``groups``, ``base_width``, ``dilation`` and whether it
has a downsample branch.  Two blocks with the same :class:`BlockShape` cost exactly the same,
so each distinct shape is benchmarked once and :func:`distinct_blocks` records how often each
model uses it.

The multiply-accumulate counter (:func:`count_macs`) is the one the report's ``gmacs_per_image``
comes from; ``tests/test_bench.py`` checks it against the ``_ops`` figure torchvision publishes
in each model's weights metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torchvision
from torchvision.models import resnet as tv_resnet

#: The models the suite knows, with the torchvision weights enum whose metadata publishes
#: their cost (``meta["_ops"]``: GMACs per 224x224 image, despite the "GFLOPS" label).
MODELS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
}


def check_model_name(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return name


def published_gmacs(name: str) -> float:
    """torchvision's published cost of ``name`` at 224x224 (metadata only, nothing downloaded)."""
    weights = getattr(torchvision.models, MODELS[check_model_name(name)])
    return float(weights.DEFAULT.meta["_ops"])


def meta_model(name: str) -> nn.Module:
    """The torchvision model on the ``meta`` device in eval mode: structure and shapes, no storage."""
    with torch.device("meta"):
        return torchvision.models.get_model(check_model_name(name), weights=None).eval()


@dataclass(frozen=True, order=True)
class BlockShape:
    """One residual block configuration, enough to rebuild it and to cost it.

    The block maps ``(N, inplanes, height, width)`` to
    ``(N, planes * expansion, height / stride, width / stride)``.
    """

    kind: str  # "basic" | "bottleneck"
    inplanes: int
    planes: int
    stride: int
    groups: int
    base_width: int
    dilation: int
    downsample: bool
    height: int
    width: int

    @property
    def expansion(self) -> int:
        return 1 if self.kind == "basic" else 4

    @property
    def out_channels(self) -> int:
        return self.planes * self.expansion

    @property
    def width_channels(self) -> int:
        """Channels of a bottleneck's 3x3 conv (``planes`` for a basic block)."""
        if self.kind == "basic":
            return self.planes
        return int(self.planes * (self.base_width / 64.0)) * self.groups

    @property
    def out_hw(self) -> tuple[int, int]:
        # Every conv in these blocks pads so that only the stride changes the size.
        return (self.height - 1) // self.stride + 1, (self.width - 1) // self.stride + 1

    @property
    def name(self) -> str:
        """A short unique label, e.g. ``bottleneck_256-128-s2-ds_56x56`` or ``..._g32w4``."""
        parts = [f"{self.kind}_{self.inplanes}-{self.planes}-s{self.stride}"]
        if self.downsample:
            parts.append("-ds")
        if self.groups != 1 or self.base_width != 64:
            parts.append(f"-g{self.groups}w{self.base_width}")
        if self.dilation != 1:
            parts.append(f"-d{self.dilation}")
        parts.append(f"_{self.height}x{self.width}")
        return "".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)

    def build(self) -> nn.Module:
        """A torchvision block of this shape with default (random) init, on the CPU."""
        cls = tv_resnet.BasicBlock if self.kind == "basic" else tv_resnet.Bottleneck
        ds = None
        if self.downsample:
            ds = nn.Sequential(
                tv_resnet.conv1x1(self.inplanes, self.out_channels, self.stride),
                nn.BatchNorm2d(self.out_channels),
            )
        return cls(self.inplanes, self.planes, self.stride, ds, self.groups, self.base_width, self.dilation)


def _shape_of(block: nn.Module, height: int, width: int, base_width: int) -> BlockShape:
    if isinstance(block, tv_resnet.Bottleneck):
        kind, planes, mid = "bottleneck", block.conv3.out_channels // 4, block.conv2
    else:
        kind, planes, mid = "basic", block.conv1.out_channels, block.conv1
    return BlockShape(
        kind=kind,
        inplanes=block.conv1.in_channels,
        planes=planes,
        stride=mid.stride[0],
        groups=block.conv2.groups,
        base_width=base_width,
        dilation=block.conv2.dilation[0],
        downsample=block.downsample is not None,
        height=height,
        width=width,
    )


def model_blocks(name: str, size: int = 224) -> list[BlockShape]:
    """The shape of every residual block of ``name`` at a ``size`` x ``size`` input, in order."""
    model = meta_model(name)
    found: list[BlockShape] = []

    def hook(mod, args):
        h, w = args[0].shape[-2:]
        found.append(_shape_of(mod, int(h), int(w), model.base_width))

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck))
    ]
    try:
        model(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return found


def distinct_blocks(names, size: int = 224) -> dict[BlockShape, dict[str, int]]:
    """Each distinct block shape of the models ``names`` -> ``{model: times it occurs}``.

    Ordered by first appearance (model order, then depth).
    """
    out: dict[BlockShape, dict[str, int]] = {}
    for name in names:
        for shape in model_blocks(name, size):
            uses = out.setdefault(shape, {})
            uses[name] = uses.get(name, 0) + 1
    return out


@dataclass(frozen=True)
class LayerCall:
    """One conv or linear layer as called in a forward pass (per-batch shapes)."""

    name: str
    kind: str  # "conv" | "linear"
    macs: int  # multiply-accumulates for the whole batch
    in_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def count_macs(model: nn.Module, input_shape) -> list[LayerCall]:
    """Every ``Conv2d``/``Linear`` call of one forward pass of ``model`` on ``input_shape``.

    A conv costs ``N * C_out * H_out * W_out * (C_in / groups) * kH * kW`` MACs, a linear
    ``batch * in_features * out_features``; bias adds, BN, ReLU, pooling and residual adds
    are not counted (the convention torchvision's published ``_ops`` follows).  Runs on the
    ``meta`` device when the model is there, so it is free for any size.
    """
    device = next(model.parameters()).device
    calls: list[LayerCall] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, args, out):
        x = args[0]
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            per_out = mod.in_channels // mod.groups * kh * kw
            macs = out.numel() * per_out
            kind = "conv"
        else:
            macs = out.numel() // mod.out_features * mod.in_features * mod.out_features
            kind = "linear"
        calls.append(LayerCall(names[mod], kind, macs, tuple(x.shape), tuple(mod.weight.shape), tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.empty(*input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return calls


def model_gmacs_per_image(name: str, size: int = 224) -> float:
    """Billions of MACs per image of all convs and the classifier of ``name``."""
    return sum(c.macs for c in count_macs(meta_model(name), (1, 3, size, size))) / 1e9

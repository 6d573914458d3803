"""Fused training path: batch-statistics BatchNorm inside one autograd node per block (or stem).

Used by :mod:`fusedres.modules` whenever a block's BatchNorms use batch statistics (train mode,
or ``track_running_stats=False``).  Each block runs as one :class:`~fusedres.training.chain.ChainTrain`
node that stores only pre-BN conv outputs and recomputes BN-apply + ReLU in backward; the
running statistics are then updated here exactly as ``nn.BatchNorm2d`` does.

:func:`convert_sync_batchnorm` makes the fused blocks synchronise their statistics over a
process group (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..backends import autocast_enabled, note_used
from ..patterns import batch_stat_bn, chain_conv, is_relu
from .chain import ChainTrain, update_running_stats
from .ops import use_triton

__all__ = ["ChainTrain", "chain_forward", "chain_reason", "convert_sync_batchnorm", "train_memory_format",
           "train_recompute_limit"]

_ATTR = "_fusedres_sync"  # instance attribute set by convert_sync_batchnorm: a 1-tuple (group,)

#: A chain's last conv output is recomputed in backward instead of saved (on CUDA; CPU chains:
#: :data:`CPU_RECOMPUTE_MAX_REDUCTION`) when its reduction length ``C_in/groups * kH * kW`` is at most this: the extra cost per saved activation element
#: is that many multiply-adds.  Covers a Bottleneck's 1x1 ``conv3`` (64-512) and the ResNet stem
#: (3*7*7 = 147), not a BasicBlock's 3x3 ``conv2`` (>= 576), whose recompute would cost about
#: as much as its forward.
RECOMPUTE_MAX_REDUCTION = 512

#: On CPU a chain whose output has fewer positions per image (``H*W``) than this runs in NCHW,
#: larger ones in channels_last.  oneDNN's channels_last training convolutions reorder the
#: weights on every call, which dominates at small spatial sizes: on 2 cores (fp32, batch 8,
#: 2026-11-30) a 1x1 2048->512 conv took 2.78 ms forward in channels_last against 0.57 in NCHW
#: at 2x2, while at 56x56 channels_last is 1.4x (forward) to 4x (backward of a 1x1 256->64)
#: faster.  At 7x7 (ResNet-50's layer4 at 224x224) the single conv was faster in NCHW (4.24
#: against 5.52 ms), but the whole step is not: the layout changes at the boundary (the layer's
#: input, its gradient, NCHW-strided weight copies) cost more.  ResNet-50 train step, batch 8,
#: 2 cores (AMD EPYC, interleaved medians of 7, 2026-12-02) with 64 / 16 positions: 898 / 815
#: ms fp32, 500 / 480 ms under bf16 autocast.  CUDA always runs channels_last (the Triton kernels').
CPU_CHANNELS_LAST_MIN_HW = 16

#: The :data:`RECOMPUTE_MAX_REDUCTION` of channels_last CPU chains: 0, CPU chains save their
#: last conv's output.  A CPU convolution is compute-bound, so a recompute costs its full
#: arithmetic, while on a GPU the 1x1 conv it repeats is bandwidth-bound and cheap.  ResNet-50,
#: batch 8, 224x224, 2 cores (interleaved medians of 9 steps, 2026-11-30): 1331 / 1314 / 1264 ms
#: per fp32 step with 512 / 128 / 0, and 808 / 794 / 762 ms under bf16 autocast (eager: 1462
#: and 849).  The price is memory: saved activations at batch 2, 224x224
#: (``benchmarks/train_memory.py --cpu-recompute N``) are 0.52x / 0.61x / 0.80x eager's for
#: ResNet-50 and 0.51x / 0.66x / 0.66x for ResNet-18.  Set 512 (CUDA's policy) where memory
#: matters more than time.  Small NCHW chains never recompute: at such sizes a CPU convolution
#: costs its weight reorder more than its arithmetic (a Bottleneck at 4x4, 1024 channels, batch
#: 8, spent 31 ms in 40 forward convolutions against eager's 16 ms in 30).
CPU_RECOMPUTE_MAX_REDUCTION = 0


def train_memory_format(x: torch.Tensor, convs) -> torch.memory_format:
    """The memory format a chain over ``convs`` (the main path's ``nn.Conv2d`` in order) runs in
    for input ``x``: decided once per plan (input signature), see :data:`CPU_CHANNELS_LAST_MIN_HW`.

    With symbolic sizes (``torch.export``, or ``torch.compile`` with dynamic shapes) the choice
    adds no guard: NCHW only where the sizes are known to be that small over their whole range,
    channels_last otherwise.  A guard would narrow the range of sizes the program accepts
    (torchvision's accepts the whole declared range); the layout only moves where the speed
    crosses over, not what is computed."""
    if x.device.type != "cpu":
        return torch.channels_last
    h, w = x.shape[-2:]
    for conv in convs:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    small = h * w < CPU_CHANNELS_LAST_MIN_HW
    if isinstance(small, torch.SymBool):
        small = statically_known_true(small)
    return torch.contiguous_format if small else torch.channels_last


def train_recompute_limit(x: torch.Tensor, layout: torch.memory_format) -> int:
    """The ``recompute_max_reduction`` of a chain run in ``layout`` for input ``x``: its last conv's
    output is recomputed in backward when that conv's reduction length is at most this (0: never).
    Decided once per plan: :data:`RECOMPUTE_MAX_REDUCTION` off the CPU,
    :data:`CPU_RECOMPUTE_MAX_REDUCTION` for channels_last CPU chains, 0 for NCHW ones."""
    if x.device.type != "cpu":
        return RECOMPUTE_MAX_REDUCTION
    return CPU_RECOMPUTE_MAX_REDUCTION if layout == torch.channels_last else 0


def chain_reason(x, pairs, acts, downsample, owner=None) -> str | None:
    """Why ``(conv, bn)`` pairs, their activation modules ``acts`` and a ``(conv, bn)`` projection
    ``downsample`` (or None) cannot run as one :class:`ChainTrain`, or None when they can
    (``owner``: the module :func:`convert_sync_batchnorm` may have marked)."""
    if not x.is_floating_point():
        return f"the input is {x.dtype}, not floating point"
    if x.device.type == "meta":  # shapes only: nothing to fuse, and autocast does not know the device
        return "the input is on the meta device"
    for act in acts:
        if not is_relu(act):
            return f"an activation is {type(act).__name__}, not nn.ReLU"
    for name, layer, ok, what in _layers(pairs, downsample):
        if not ok(layer):
            return f"{name} is {type(layer).__name__}{what}"
    bns = [b for _, b in pairs] + ([downsample[1]] if downsample is not None else [])
    syncs = [b for b in bns if type(b) is nn.SyncBatchNorm]
    # One chain synchronises all of its BNs over one group, or none: nn.SyncBatchNorm layers
    # mixed with plain ones, with different groups or in different modes (torch would sync
    # only the training ones) keep torchvision's forward.
    if syncs and (len(syncs) != len(bns) or any(b.process_group is not syncs[0].process_group for b in syncs)
                  or len({b.training for b in syncs}) > 1):
        return "its SyncBatchNorm layers are mixed with other BatchNorms, groups or modes"
    # An empty local batch keeps torchvision's forward (BatchNorm's own empty-input semantics),
    # unless the statistics are synchronised: the other ranks' chains then wait for this
    # rank's (empty) share, which the chain contributes with count 0.
    if x.numel() == 0 and _sync_group(owner, bns) is None:
        return "the batch is empty (BatchNorm's own empty-input semantics)"
    # A BN that would see one value per channel: torchvision raises, after the BNs before it in
    # the block have updated their running statistics (and the failing one its count); its own
    # forward leaves the model exactly as torchvision's does, where the chain would raise first.
    if _sync_group(owner, bns) is None and _one_value_per_channel(x, [c for c, _ in pairs], downsample):
        return "a BatchNorm would see one value per channel (torchvision's forward raises)"
    return None


def _one_value_per_channel(x, convs, downsample) -> bool:
    """Whether a conv of the chain (``convs`` in order, then the ``downsample`` conv on ``x``)
    outputs one position per channel over the batch; decided without guards on symbolic sizes."""
    def positions(h, w, conv):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    n, (h0, w0) = x.shape[0], x.shape[-2:]
    sizes, (h, w) = [], (h0, w0)
    for conv in convs:
        h, w = positions(h, w, conv)
        sizes.append(n * h * w)
    if downsample is not None:
        h, w = positions(h0, w0, downsample[0])
        sizes.append(n * h * w)
    for size in sizes:
        one = size == 1
        if isinstance(one, torch.SymBool):
            one = statically_known_true(one)
        if one:
            return True
    return False


def _layers(pairs, downsample):
    """``(name, layer, predicate, what-else-it-should-be)`` for each layer a chain needs."""
    conv_what = ", not a bias-free nn.Conv2d with zero padding"
    bn_what = ", not a BatchNorm2d using batch statistics (BatchNorms of one block in different modes?)"
    for i, (conv, bn) in enumerate(pairs, 1):
        yield f"conv{i}", conv, chain_conv, conv_what
        yield f"bn{i}", bn, batch_stat_bn, bn_what
    if downsample is not None:
        conv, bn = downsample
        yield "downsample[0]", conv, chain_conv, conv_what
        yield "downsample[1]", bn, batch_stat_bn, bn_what


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32) and autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _sync_group(owner: nn.Module, bns):
    """The process group to synchronise ``bns`` (one chain's BNs) over, or ``None``.

    As ``nn.SyncBatchNorm`` decides: only in training mode (evaluating with batch statistics,
    ``track_running_stats=False``, stays per rank, so one rank may evaluate alone), over the
    group of the ``nn.SyncBatchNorm`` layers or of :func:`convert_sync_batchnorm`'s mark, when
    ``torch.distributed`` is initialised and the group has more than one rank.
    """
    if type(bns[0]) is nn.SyncBatchNorm:
        mark = (bns[0].process_group,)
    else:
        mark = getattr(owner, _ATTR, None)
    if mark is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group = mark[0] if mark[0] is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    training = {bn.training for bn in bns}
    if training == {False}:
        return None
    if training != {True}:  # a convert_sync_batchnorm block (SyncBatchNorm ones never get here)
        raise ValueError(
            "fusedres: a synchronised block has BatchNorms in both train and eval mode; nn.SyncBatchNorm "
            "would synchronise only the training ones, which one fused chain cannot do"
        )
    return group


def _geom(conv: nn.Conv2d):
    return (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def chain_forward(owner, x, pairs, *, downsample=None, identity=False, pool=None,
                  recompute_max_reduction=RECOMPUTE_MAX_REDUCTION):
    """Run ``pairs = ((conv, bn), ...)`` as one fused train-mode chain and update running stats.

    ``y = relu(bn_K(conv_K(... relu(bn_1(conv_1(x))) ...)) [+ x | + bn_d(conv_d(x))])``, then
    ``pool(y)`` when ``pool`` (an ``nn.MaxPool2d``) is given; ``downsample`` is ``(conv_d, bn_d)``.
    ``owner`` is the module that :func:`convert_sync_batchnorm` may have marked.  Input
    ``(N, C_in, H, W)``.  The last conv's output is recomputed in backward instead of saved when
    that conv's reduction length is at most ``recompute_max_reduction`` (0: never; see
    :func:`train_recompute_limit`).
    """
    dtype = _compute_dtype(x)
    pairs = list(pairs)
    residual = "identity" if identity else "none"
    if downsample is not None:
        pairs.append(tuple(downsample))
        residual = "downsample"
    params = []
    for conv, bn in pairs:
        params += [conv.weight, bn.weight, bn.bias]  # cast to x's dtype in the chain (chain._compute_weight)
    pool_cfg = None
    if pool is not None:
        pool_cfg = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    last = pairs[len(pairs) - 1 - (downsample is not None)][0]
    reduction = last.in_channels // last.groups * last.kernel_size[0] * last.kernel_size[1]
    cfg = (
        tuple(_geom(c) for c, _ in pairs),
        tuple(float(b.eps) for _, b in pairs),
        residual,
        pool_cfg,
        reduction <= recompute_max_reduction,
    )
    x = x.to(dtype)
    # What ran, for fusedres.backends.record (the bench's "backends used" column): the train
    # chain's kernels do not depend on the module's eval backend.
    note_used("train:triton" if use_triton(x) else "train:torch")
    bns = tuple(bn for _, bn in pairs)
    out, *stats = ChainTrain.apply(cfg + (bns,), _sync_group(owner, list(bns)), x, *params)
    if torch.compiler.is_compiling():  # eager: ChainTrain.forward has updated them (see update_running_stats)
        update_running_stats(bns, stats)
    return out


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Make every fused block (and fused stem) of ``model`` synchronise its BN statistics.

    The fusedres counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm``: in train mode the
    per-channel ``(count, mean, var)`` of each BN are gathered over ``process_group`` (default:
    the world) with ``torch.distributed`` and combined, and the backward sums are all-reduced,
    so every rank normalises with the statistics of the global batch.  Works with gloo (CPU)
    and nccl (GPU).  BN modules are *not* replaced: parameters, buffers and ``state_dict`` are
    unchanged.  Only fused modules are marked (call :func:`fusedres.convert` first); other
    BatchNorm layers in ``model`` are left alone.  Without an initialised process group, or
    with one rank, the blocks behave as unsynchronised.  Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
        )
    marked = 0
    for mod in model.modules():
        if getattr(type(mod), "_fusedres_fused", False):
            setattr(mod, _ATTR, (process_group,))
            marked += 1
    if not marked:
        raise ValueError("model contains no fusedres blocks; call fusedres.convert(model) first")
    return model

"""fusedres: fused conv + BatchNorm + ReLU + residual-add kernels for torchvision ResNets.

Public API::

    fusedres.convert(model, backend="auto")   # fuse torchvision (and timm) blocks in place
    fusedres.explain(model)                   # what was fused, and what runs unfused and why
    fusedres.revert(model)
    fusedres.BasicBlock, fusedres.Bottleneck  # drop-in torchvision block classes
    fusedres.conv_bn_act(...), fusedres.block_tail(...)  # the fused functional ops
    fusedres.convert_sync_batchnorm(model, process_group=None)  # sync train-mode BN stats
    fusedres.cuda_graphs(model)               # replay a converted model as CUDA graphs (small batches)
"""

from .backends import BACKENDS, BackendUnavailableError, ShapeError, available as available_backends
from .functional import block_tail, bn_scale_shift, conv_bn_act, prepare_block_tail, prepare_conv_bn_act
from .graphs import CUDAGraphs, cuda_graphs
from .modules import BasicBlock, Bottleneck, FusedResNet, convert, explain, revert
from .training import convert_sync_batchnorm

__version__ = "0.1.0"

from . import backends as _backends  # noqa: E402
from . import plan as _plan  # noqa: E402

_backends.load_all()


def clear_caches() -> None:
    """Drop every cached weight transform (folded, re-laid-out or reordered weights) and every
    per-layer plan.  Caches follow in-place updates and ``.to()`` / ``.half()`` by themselves;
    call this after in-place writes through ``w.data``, which no version counter sees."""
    _backends.clear_caches()
    _plan.clear()

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ShapeError",
    "BasicBlock",
    "CUDAGraphs",
    "Bottleneck",
    "FusedResNet",
    "available_backends",
    "block_tail",
    "bn_scale_shift",
    "clear_caches",
    "conv_bn_act",
    "convert",
    "convert_sync_batchnorm",
    "cuda_graphs",
    "explain",
    "prepare_block_tail",
    "prepare_conv_bn_act",
    "revert",
]

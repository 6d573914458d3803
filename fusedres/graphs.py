"""Graph-captured inference: a converted model replayed as CUDA graphs, one per input signature.

Small batches are bound by host time: each fused op costs Python and a launch, while the GPU
work per op is tiny.  A CUDA graph records every kernel of a forward once and replays them with
one launch.  :func:`cuda_graphs` wraps a model so that each new input signature (shape, dtype,
strides, device) is warmed up (Triton autotuning, weight caches and plans are made outside the
capture), captured into a graph with a static input buffer, and replayed from then on::

    model = fusedres.convert(torchvision.models.resnet50().eval().cuda().half())
    run = fusedres.cuda_graphs(model)
    with torch.inference_mode():
        logits = run(images)          # first call per shape: warm-up + capture; then replays

What it guarantees:

* It computes what ``model(x)`` computes: a replay reads the weights and BN buffers where they
  live, and an in-place update of any parameter or buffer (optimizer step, ``load_state_dict``,
  ``copy_``) is noticed by its version counter, which drops every graph: the next call
  captures again (the fused backends cache transformed weights, which a replay would otherwise
  keep using).  Replacing parameters or submodules, moving the model (``.to()``), switching a
  submodule between train and eval, or adding a hook is noticed the same way, at the cost of
  walking the model's parameters and modules on every call (tens of microseconds for a
  ResNet-50).  Weights that are inference tensors (a model built inside ``inference_mode``)
  have no version counter: in-place writes to them are not seen (call :meth:`reset`).
* Autocast is part of a graph's signature, like the input's shape and dtype.
* Calls it cannot serve run the model eagerly, with a one-time warning: gradients enabled, the
  model in training mode, non-CUDA inputs, or more than ``max_graphs`` signatures (variable
  input sizes: pad or bucket them).
* The output is a fresh tensor (``copy_output=True``, a device copy): the graph's own output
  buffer is overwritten by the next replay.  ``copy_output=False`` returns that buffer.

``torch.compile(model, mode="reduce-overhead")`` is the other way to capture a converted model:
its fused ops are custom ops with fake implementations, traced without graph breaks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from . import plan

__all__ = ["CUDAGraphs", "cuda_graphs"]


class CUDAGraphs:
    """``model`` replayed as one CUDA graph per input signature; see :func:`cuda_graphs`."""

    def __init__(self, model: nn.Module, *, max_graphs: int = 8, warmup: int = 2, copy_output: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup must be >= 1, got {max_graphs} and {warmup}")
        self.model, self.max_graphs, self.warmup, self.copy_output = model, max_graphs, warmup, copy_output
        self._graphs: dict = {}  # signature -> (graph, static input, static output)
        self._pool = None
        self._state = None  # (tensor objects, versions) of the model's parameters and buffers at capture
        self._warned: set = set()

    def reset(self) -> None:
        """Drop every captured graph (the next call of each signature captures again)."""
        self._graphs.clear()
        self._state = None

    def _eager(self, x, why: str):
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"fusedres.cuda_graphs: running the model eagerly: {why}", RuntimeWarning, stacklevel=3)
        return self.model(x)

    def _snapshot(self):
        """What a replay depends on besides the input: every parameter and buffer (object and
        version: an in-place update bumps it; inference tensors have none, their data pointer
        stands in), and every submodule with its train/eval mode and hooks (plan.watch)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        versions = [t.data_ptr() if t.is_inference() else t._version for t in tensors]
        return tensors, versions, plan.watch([self.model])

    def _unchanged(self) -> bool:
        tensors, versions, seen = self._state
        now, now_versions, now_seen = self._snapshot()
        return (len(now) == len(tensors) and all(a is b for a, b in zip(now, tensors))
                and now_versions == versions and now_seen == seen)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            return self._eager(x, "the input is not a CUDA tensor")
        if torch.is_grad_enabled():
            return self._eager(x, "gradients are enabled (graphs serve inference: use torch.inference_mode())")
        if self.model.training:
            return self._eager(x, "the model is in training mode")
        if self._graphs and not self._unchanged():
            self.reset()
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (x.shape, x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled(), amp)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self._eager(x, f"more than max_graphs={self.max_graphs} input signatures")
            entry = self._capture(x)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone() if self.copy_output else static_out

    def _capture(self, x: torch.Tensor):
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # autotuning, weight caches and plans, outside the capture
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.model(static_in)
        self._state = self._snapshot()
        return graph, static_in, static_out


def cuda_graphs(model: nn.Module, *, max_graphs: int = 8, warmup: int = 2, copy_output: bool = True) -> CUDAGraphs:
    """Run ``model`` (usually a converted one) as CUDA graphs, one captured per input signature.

    Args:
        model: an eval-mode module on a CUDA device.
        max_graphs: signatures captured at most; beyond, calls run eagerly (with a warning).
        warmup: eager runs of a new signature before its capture (the first autotunes).
        copy_output: return a copy of the graph's output buffer (else the buffer itself, which
            the next replay overwrites).

    See the module docstring for what is guaranteed.
    """
    return CUDAGraphs(model, max_graphs=max_graphs, warmup=warmup, copy_output=copy_output)

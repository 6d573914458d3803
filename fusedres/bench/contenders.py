"""The implementations a run compares, side by side on the same workload.

==================  =====================================================================
``eager``           the torchvision module as is (the reference every row is checked against)
``compile``         ``torch.compile(module)`` (default mode)
``compile-max``     ``torch.compile(module, mode="max-autotune")`` (CUDA graphs included)
``cudnn-fused``     each conv + eval BN folded, run by cuDNN's fused conv(+add)+ReLU ops, as
                    TorchScript freezing emits them (:mod:`fusedres.bench.cudnn_fused`);
                    eval, CUDA only
``fusedres-<b>``    ``fusedres.convert(copy.deepcopy(module), backend=b)`` for each backend
                    ``b`` in :data:`fusedres.BACKENDS` that this machine can run
``tensorrt``        Torch-TensorRT (dynamo IR), when ``torch_tensorrt`` is installed
``ort-cpu``         ONNX Runtime on the CPU (all graph optimisations, one session thread per
                    torch thread) running the unconverted model exported with
                    ``torch.onnx.export``, when ``onnxruntime`` and ``onnx`` are installed
                    (``pip install fusedres[ort]``); fp32 inference
==================  =====================================================================

A contender that cannot run here (a backend that is not built, TensorRT missing, a CPU-only
backend on a GPU run), or a compile contender on a workload ``--compile-on`` does not pick, is
*skipped* with the reason, never silently dropped; one that fails while building or running is
recorded as an *error* row and the run goes on.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import backends
from ..modules import convert

# Device types each fused backend computes on (the registry decides availability).
_BACKEND_DEVICES = {"torch": ("cpu", "cuda"), "cpu": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",)}

#: Every contender name, in the order rows are printed.
NAMES = (
    ("eager", "cudnn-fused", "compile", "compile-max")
    + tuple(f"fusedres-{b}" for b in backends.BACKENDS)
    + ("tensorrt", "ort-cpu")
)
COMPILE_NAMES = ("compile", "compile-max")
#: The note of a compile contender's row on a workload that ``--compile-on`` leaves out.
NOT_IN_COMPILE_ON = "not in --compile-on"


@dataclass(frozen=True)
class Contender:
    """How to build one implementation from the reference module."""

    name: str

    @property
    def backend(self) -> str | None:
        return self.name.removeprefix("fusedres-") if self.name.startswith("fusedres-") else None

    def skip_reason(self, device: torch.device, mode: str) -> str | None:
        """``None`` when this contender can run on ``device`` in ``mode``; else why not."""
        if self.backend is not None:
            if device.type not in _BACKEND_DEVICES[self.backend]:
                return f"backend {self.backend!r} does not run on {device.type} tensors"
            try:
                backends.get(self.backend)
            except backends.BackendUnavailableError as exc:
                return str(exc)
            return None
        if self.name == "cudnn-fused":
            if device.type != "cuda":
                return "cuDNN's fused conv ops run on CUDA"
            if mode != "infer":
                return "the BN statistics are folded into the weights: eval only"
        if self.name == "ort-cpu":
            for pkg in ("onnxruntime", "onnx"):
                if importlib.util.find_spec(pkg) is None:
                    return f"{pkg} is not installed (pip install fusedres[ort])"
            if device.type != "cpu":
                return "the ort-cpu contender runs ONNX Runtime's CPU provider on CPU tensors"
            if mode != "infer":
                return "ONNX Runtime runs inference only"
        if self.name == "tensorrt":
            if importlib.util.find_spec("torch_tensorrt") is None:
                return "torch_tensorrt is not installed"
            if device.type != "cuda":
                return "Torch-TensorRT needs a CUDA device"
            if mode != "infer":
                return "Torch-TensorRT builds inference engines only"
        return None

    def build(self, ref: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> nn.Module:
        """A fresh module (never ``ref`` itself) computing what ``ref`` computes."""
        model = copy.deepcopy(ref)
        if self.name == "eager":
            return model
        if self.name == "cudnn-fused":
            from .cudnn_fused import cudnn_fused

            return cudnn_fused(model)
        if self.name == "compile":
            return torch.compile(model)
        if self.name == "compile-max":
            return torch.compile(model, mode="max-autotune")
        if self.backend is not None:
            return convert(model, backend=self.backend)
        if self.name == "tensorrt":
            import torch_tensorrt

            return torch_tensorrt.compile(model, ir="dynamo", inputs=[example], enabled_precisions={dtype})
        if self.name == "ort-cpu":
            return OrtModule(model, example)
        raise AssertionError(f"unhandled contender {self.name!r}")


def parse(spec: str, device: torch.device) -> list[Contender]:
    """Contenders named by a comma list; ``fusedres`` = every fused backend for ``device``,
    ``all`` = every contender (those that cannot run here become skipped rows)."""
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok == "all":
            names = list(NAMES)
        elif tok == "fusedres":
            names = [f"fusedres-{b}" for b in backends.BACKENDS if device.type in _BACKEND_DEVICES[b]]
        elif tok in NAMES:
            names = [tok]
        else:
            raise ValueError(f"--contenders: unknown contender {tok!r}; choose from {', '.join(NAMES)}, fusedres, all")
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("--contenders must name at least one contender")
    return [Contender(n) for n in sorted(out, key=NAMES.index)]


class OrtModule(nn.Module):
    """A module run by an ONNX Runtime CPU session: ``model`` exported once for ``example``'s
    shape, every graph optimisation on, as many intra-op threads as torch uses."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        import io
        import warnings

        import onnxruntime as ort

        if example.dtype != torch.float32:
            raise ValueError(f"ort-cpu runs fp32 models, got {example.dtype}")
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (example,), buf, input_names=["x"], output_names=["y"], dynamo=False)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = self.session.run(None, {"x": x.detach().contiguous().numpy()})
        return torch.from_numpy(y)

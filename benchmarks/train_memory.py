"""Activation memory of a ResNet training step: fused train path vs eager torchvision.

Two measures, both of the *activations autograd keeps for backward* (parameters excluded):

* ``saved``: bytes of the distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks``
  during the forward (any device; the only measure on CPU), without the AMP copies of the
  weights, which both keep alike and which are reported apart;
* ``peak`` (CUDA only): ``torch.cuda.max_memory_allocated`` over forward + backward minus the
  memory allocated before the forward (parameters, gradients, the input).

Usage::

    python benchmarks/train_memory.py                       # CPU, resnet18+resnet50, batch 2, 224x224
    python benchmarks/train_memory.py --cpu-recompute 512   # CPU with CUDA's recompute policy
    python benchmarks/train_memory.py --device cuda --batch 64 --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fusedres  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _param_copy(t: torch.Tensor, param_ids: set) -> bool:
    """``t`` is a dtype copy of a parameter (an AMP weight cast), not an activation."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
        return False
    src = fn.next_functions[0][0]
    return src is not None and id(getattr(src, "variable", None)) in param_ids


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, autocast_dtype) -> tuple[int, int]:
    """``(activation bytes, parameter-copy bytes)`` of the distinct storages saved for backward.

    Parameters and buffers are not counted; under AMP their low-precision copies (which
    eager and fused keep alike, one per weight) are counted apart from the activations.
    """
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    param_ids = {id(p) for p in model.parameters()}
    acts: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            (copies if _param_copy(t, param_ids) else acts)[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(x, autocast_dtype):
        model(x)
    return sum(acts.values()), sum(copies.values())


def _autocast(x, dtype):
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


def cuda_peak_bytes(model: torch.nn.Module, x: torch.Tensor, autocast_dtype) -> int:
    model.zero_grad(set_to_none=False)  # gradients allocated up front: not activation memory
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with _autocast(x, autocast_dtype):
        out = model(x)
    out.float().sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32, or the autocast dtype (AMP)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cpu-recompute", type=int, default=fusedres.training.CPU_RECOMPUTE_MAX_REDUCTION,
                   help="fusedres.training.CPU_RECOMPUTE_MAX_REDUCTION (default: the library's; 512 is "
                        "CUDA's policy, 0 saves every last conv output)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    fusedres.training.CPU_RECOMPUTE_MAX_REDUCTION = args.cpu_recompute
    dev = torch.device(args.device)
    amp = None if args.dtype == "fp32" else _DTYPES[args.dtype]
    results = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        eager = getattr(torchvision.models, name)().train().to(dev)
        fused = fusedres.convert(copy.deepcopy(eager))
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
        if args.channels_last:
            eager, fused = (m.to(memory_format=torch.channels_last) for m in (eager, fused))
            x = x.contiguous(memory_format=torch.channels_last)
        row = {"model": name}
        row["saved_eager"], row["weight_copies_eager"] = saved_bytes(eager, x, amp)
        row["saved_fused"], row["weight_copies_fused"] = saved_bytes(fused, x, amp)
        row["saved_ratio"] = row["saved_fused"] / row["saved_eager"]
        if dev.type == "cuda":
            row["peak_eager"], row["peak_fused"] = cuda_peak_bytes(eager, x, amp), cuda_peak_bytes(fused, x, amp)
            row["peak_ratio"] = row["peak_fused"] / row["peak_eager"]
        results.append(row)
        msg = (f"{name:9s} saved activations: eager {row['saved_eager'] / 2**20:8.1f} MiB  fused "
               f"{row['saved_fused'] / 2**20:8.1f} MiB  ratio {row['saved_ratio']:.3f} (weight copies: eager "
               f"{row['weight_copies_eager'] / 2**20:.1f} MiB, fused {row['weight_copies_fused'] / 2**20:.1f} MiB)")
        if "peak_ratio" in row:
            msg += f" | peak: eager {row['peak_eager'] / 2**20:8.1f} MiB  fused {row['peak_fused'] / 2**20:8.1f} MiB  ratio {row['peak_ratio']:.3f}"
        print(msg, flush=True)
    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "config": vars(args),
        }
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

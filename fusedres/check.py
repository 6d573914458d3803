"""``fusedres check``: convert a torchvision model, check it against the reference, time both.

Numerics: the fused model and torchvision's model run the same input in the same dtype; a
float64 copy of the reference gives the ground truth.  The fused model passes when its
relative error against float64 is at most ``2 * (eager's own error) + atol[dtype]`` -- the
error budget PyTorch itself spends at that dtype (flash-attention's criterion), plus a small
floor for dtypes where eager happens to be very close.

Speed: reference and fused are timed interleaved (round-robin, order rotated each round) after
warm-up by :func:`fusedres.bench.timing.time_interleaved` (CUDA events on a GPU), and the
median is reported.
"""

from __future__ import annotations

import copy
import json
import platform
import sys

import torch
import torchvision

from . import backends
from .bench.timing import time_interleaved
from .modules import convert

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Floor of the relative-error budget per dtype (relative L2 norm vs the float64 reference).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def add_arguments(p) -> None:
    p.add_argument("--model", default="resnet50", help="torchvision model name (default: resnet50)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS)
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each (default: 10 cpu, 50 cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")


def randomize_bn(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters.

    A freshly built model has mean 0, var 1, weight 1, bias 0: folding those is the identity,
    which would let a wrong fold pass.  Real checkpoints look like this instead.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=generator) * 0.8 + 0.6)
                m.bias.copy_(torch.rand(c, generator=generator) * 0.2 - 0.1)


def build_reference(name: str, seed: int = 0) -> torch.nn.Module:
    """A torchvision model with random weights and randomized BN statistics (nothing downloaded)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN or inf anywhere counts as infinite error."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_check(
    model: str = "resnet50",
    batch: int = 8,
    size: int = 224,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    repeats: int | None = None,
    seed: int = 0,
    progress=None,
) -> dict:
    """Run the check and return the results as a dict (what ``--json`` writes)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    repeats = repeats or (50 if dev.type == "cuda" else 10)

    ref = build_reference(model, seed)
    ref64 = copy.deepcopy(ref).double().to(dev)
    ref = ref.to(device=dev, dtype=dt)
    fused = convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1)).to(dev)

    with torch.inference_mode():
        truth = ref64(x.double())
        out_ref = ref(x.to(dt))
        with backends.record() as used:
            out_fused = fused(x.to(dt))
        stats, errors = time_interleaved(
            {"reference": ref, "fused": fused}, [x.to(dt)], dev, repeats, warmup=2, on_round=progress
        )
    if errors:
        raise RuntimeError(f"fusedres check: timing failed: {errors}")
    times = {name: st.median for name, st in stats.items()}
    err_ref = rel_err(out_ref, truth)
    err_fused = rel_err(out_fused, truth)
    budget = 2 * err_ref + ATOL[dt]
    diff = (out_fused.double() - out_ref.double()).abs()
    return {
        "model": model,
        "batch": batch,
        "size": size,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dt).replace("torch.", ""),
        "backend": backend,
        "backends_available": backends.available(),
        "backends_used": sorted(used),
        "max_abs_err_vs_reference": diff.max().item(),
        "max_rel_err_vs_reference": (diff.max() / out_ref.double().abs().max().clamp_min(1e-30)).item(),
        "rel_err_reference_vs_fp64": err_ref,
        "rel_err_fused_vs_fp64": err_fused,
        "rel_err_budget": budget,
        "numerics_ok": bool(err_fused <= budget),
        "time_reference_ms": times["reference"] * 1e3,
        "time_fused_ms": times["fused"] * 1e3,
        "speedup": times["reference"] / times["fused"],
        "repeats": repeats,
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
    }


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fusedres check: {res['model']} batch {res['batch']} {res['size']}x{res['size']} "
                    f"{res['dtype']} on {res['device']} ({res['device_name']})")
    for col in ("what", "value"):
        t.add_column(col)
    t.add_row("backend asked / used", f"{res['backend']} / {', '.join(res['backends_used']) or '-'}")
    t.add_row("max abs err vs torchvision", f"{res['max_abs_err_vs_reference']:.3e}")
    t.add_row("max rel err vs torchvision", f"{res['max_rel_err_vs_reference']:.3e}")
    t.add_row("rel err vs fp64: torchvision / fused (budget)",
              f"{res['rel_err_reference_vs_fp64']:.2e} / {res['rel_err_fused_vs_fp64']:.2e} ({res['rel_err_budget']:.2e})")
    t.add_row("numerics", "[green]OK[/green]" if res["numerics_ok"] else "[red]FAIL[/red]")
    t.add_row("time per batch: torchvision", f"{res['time_reference_ms']:.2f} ms")
    t.add_row("time per batch: fused", f"{res['time_fused_ms']:.2f} ms")
    t.add_row("speedup", f"{res['speedup']:.2f}x (median of {res['repeats']})")
    Console().print(t)


def run(args) -> int:
    from rich.progress import Progress

    kwargs = dict(model=args.model, batch=args.batch, size=args.size, device=args.device, dtype=args.dtype,
                  backend=args.backend, repeats=args.repeats, seed=args.seed)
    with Progress(transient=True) as bar:
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        task = bar.add_task("timing", total=args.repeats or (50 if dev.startswith("cuda") else 10))
        res = run_check(**kwargs, progress=lambda: bar.advance(task))
    _print_table(res)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(res, f, indent=2)
    if not res["numerics_ok"]:
        print("fusedres check: numerics FAILED", file=sys.stderr)
        return 1
    return 0

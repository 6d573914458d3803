"""ResNet training-step throughput and peak memory on CUDA: fused vs eager vs torch.compile.

One step = forward under AMP autocast + backward + SGD(momentum) update, channels_last, random
data (the kernels do not care about values).  Per (model, batch, mode) it reports images/s
over ``--iters`` timed steps (after ``--warmup``; wall clock around a device synchronize) and the peak of
``torch.cuda.max_memory_allocated`` over those steps, both in total and minus the memory held
before the step (parameters, gradients, optimizer state): the activation peak.  Modes:

* ``eager``:   torchvision as is;
* ``fused``:   ``fusedres.convert`` of it (train-mode chains: Triton BN kernels + cuDNN convs);
* ``compile``: ``torch.compile`` (default mode) of the torchvision model; compiling takes ~1 min,
  so by default only the configs in ``--compile-configs`` get it.

The ratios fused/eager (and fused/compile) are computed within this one run, on one GPU.

    python benchmarks/train_step.py                     # ~2.5 min on an H100
    python benchmarks/train_step.py --models resnet50 --batches 64 --iters 5 --modes eager,fused
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fusedres  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _versions() -> dict:
    v = {"torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_one(name, batch, mode, dtype, iters, warmup, size, dev: torch.device) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().to(dev).to(memory_format=torch.channels_last).train()
    if mode == "fused":
        model = fusedres.convert(model)
    step_model = torch.compile(model) if mode == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype):
            loss = loss_fn(step_model(x), target)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(dev)
    warm_s = time.perf_counter() - t0
    cuda = dev.type == "cuda"
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(dev)
    ms = (time.perf_counter() - t0) / iters * 1e3
    peak = torch.cuda.max_memory_allocated() if cuda else 0  # no allocator statistics on CPU
    row = {
        "model": name, "batch": batch, "mode": mode, "ms_per_step": ms, "img_per_s": batch / ms * 1e3,
        "peak_bytes": peak, "activation_peak_bytes": peak - base, "warmup_s": warm_s,
    }
    del model, step_model, opt, x
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,resnet18")
    p.add_argument("--batches", default="128,256")
    p.add_argument("--modes", default="eager,fused,compile")
    p.add_argument("--compile-configs", default="resnet18:128",
                   help="model:batch pairs that get the compile mode ('all' for every one)")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a quick smoke run (no memory stats)")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/train_step-<gpu>.json)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("train_step.py: no CUDA GPU (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    modes = args.modes.split(",")
    compile_set = None if args.compile_configs == "all" else set(args.compile_configs.split(","))
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for mode in modes:
                if mode == "compile" and compile_set is not None and f"{name}:{batch}" not in compile_set:
                    continue
                try:
                    row = run_one(name, batch, mode, _DTYPES[args.dtype], args.iters, args.warmup, args.size, dev)
                except torch.OutOfMemoryError:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    row = {"model": name, "batch": batch, "mode": mode, "error": "out of memory"}
                rows.append(row)
                if "error" in row:
                    print(f"{name:9s} b{batch:<4d} {mode:8s} {row['error']}", flush=True)
                else:
                    print(
                        f"{name:9s} b{batch:<4d} {mode:8s} {row['img_per_s']:8.0f} img/s  "
                        f"peak {row['peak_bytes'] / 2**30:6.2f} GiB  activations {row['activation_peak_bytes'] / 2**30:6.2f} GiB",
                        flush=True,
                    )
    ratios = []
    by = {(r["model"], r["batch"], r["mode"]): r for r in rows if "error" not in r}
    for (name, batch, mode), r in by.items():
        if mode != "fused":
            continue
        for other in ("eager", "compile"):
            o = by.get((name, batch, other))
            if o:
                ratios.append({
                    "model": name, "batch": batch, "vs": other,
                    "speedup": r["img_per_s"] / o["img_per_s"],
                    "peak_ratio": r["peak_bytes"] / max(o["peak_bytes"], 1),
                    "activation_peak_ratio": r["activation_peak_bytes"] / max(o["activation_peak_bytes"], 1),
                })
                print(f"{name:9s} b{batch:<4d} fused/{other:7s} speedup {ratios[-1]['speedup']:.3f}  "
                      f"activation-peak ratio {ratios[-1]['activation_peak_ratio']:.3f}", flush=True)
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out = Path(args.json) if args.json else (
        Path(__file__).resolve().parent / "results" / f"train_step-{gpu.replace(' ', '_')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "device": gpu, **_versions(), "config": vars(args),
        "results": rows, "ratios": ratios,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

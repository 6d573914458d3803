"""Time every distinct ResNet-18/50 block: fused Triton vs torchvision eager (cuDNN) vs torch.compile.

    python benchmarks/triton_blocks.py --out benchmarks/results/triton_blocks.json
    python benchmarks/triton_blocks.py --batches 64 --compile-blocks none      # quickest
    python benchmarks/triton_blocks.py --compile-blocks all                     # slow: every block

Each distinct block (by class, channels, stride, downsample) of torchvision's resnet18
and resnet50 at 224x224 runs in eval mode, bf16, channels_last, at each batch size:

* ``eager``   torchvision's block (cuDNN convs, separate BN/ReLU/add kernels);
* ``triton``  the same block after ``fusedres.convert(backend="triton")`` (2 launches per
  BasicBlock, 3 per Bottleneck; autotuned on the first call, outside the timing);
* ``*_graph`` the eager and the fused block captured in a CUDA graph and replayed: the
  GPU time without Python/launch overhead (one fixed input; do_bench still flushes L2);
* ``compile`` ``torch.compile(mode=--compile-mode)`` of torchvision's block, only for the
  blocks named by ``--compile-blocks`` (max-autotune compiles take about a minute each).

Timing: ``triton.testing.do_bench`` median (it flushes L2 before every run), rotating
over enough distinct input tensors to exceed twice the L2 size.  Speedups are ratios
within this one run.  Every fused output is checked against eager (relative error
printed).  Writes a JSON report (device, versions, git commit, date, rows) to ``--out``.

``--smoke`` runs the whole script on the CPU through the Triton interpreter at a tiny
image size and batch with wall-clock timing (no CUDA graphs, no compile): a check that
the script works, not a benchmark.

Budget on an H100 with a cold Triton cache: about 2-3 minutes with the defaults
(two max-autotune compiles at the largest batch).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # must precede the first (indirect) triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torchvision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fusedres  # noqa: E402

DEFAULT_COMPILE = "resnet18:layer2.1,resnet50:layer3.1"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so the folded scale/shift are not identity."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def distinct_blocks(model_name: str, image_size: int = 224):
    """``[(name, block, (C, H, W) input)]`` for the first block of each distinct configuration."""
    model = getattr(torchvision.models, model_name)()
    _randomize_bn(model)
    model.eval()
    shapes = {}
    hooks = []
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model, lname)):
            name = f"{lname}.{i}"
            hooks.append(blk.register_forward_pre_hook(
                lambda m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:]))))
    with torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    seen, out = set(), []
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model, lname)):
            name = f"{lname}.{i}"
            conv_out = blk.conv3 if hasattr(blk, "conv3") else blk.conv2
            key = (type(blk).__name__, shapes[name], conv_out.out_channels, blk.downsample is not None)
            if key not in seen:
                seen.add(key)
                out.append((name, blk, shapes[name]))
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rotating(fn, inputs):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(inputs)
        return fn(inputs[state["i"]])

    return call


def _bench(fn, inputs, rep_ms: int, smoke: bool = False) -> float:
    if smoke:  # interpreter: one wall-clock call, only to exercise the script
        t0 = time.perf_counter()
        fn(inputs[0])
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(_rotating(fn, inputs), warmup=25, rep=rep_ms, return_mode="median"))


def _graph_ms(module, x, rep_ms: int) -> float:
    """Median replay time of ``module(x)`` captured in a CUDA graph (no host overhead)."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            module(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(x)
    return float(do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median"))


def _wanted(spec: str, model_name: str, block_name: str) -> bool:
    if spec == "all":
        return True
    if spec in ("", "none"):
        return False
    return f"{model_name}:{block_name}" in spec.split(",")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "triton_blocks.json"))
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    p.add_argument("--compile-blocks", default=DEFAULT_COMPILE,
                   help="'model:block,...', 'all' or 'none' (default: %(default)s)")
    p.add_argument("--compile-batches", nargs="+", type=int, default=None,
                   help="batches for the torch.compile rows (default: the largest of --batches)")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep time per measurement, ms")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter script check (not a benchmark)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph columns")
    p.add_argument("--no-autotune", action="store_true", help="untuned default tile (FUSEDRES_TRITON_AUTOTUNE=0)")
    args = p.parse_args(argv)
    if args.smoke:
        args.no_graphs, args.compile_blocks = True, "none"
    elif not torch.cuda.is_available():
        raise SystemExit("triton_blocks: needs a CUDA GPU (or --smoke)")
    if args.no_autotune:
        os.environ["FUSEDRES_TRITON_AUTOTUNE"] = "0"
    compile_batches = set(args.compile_batches or [max(args.batches)])
    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16
    l2 = 0 if args.smoke else getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    t_start = time.time()
    rows = []
    for model_name in args.models:
        for block_name, block, (c, h, w) in distinct_blocks(model_name, args.image_size):
            ref = block.to(dev, dtype).eval()
            fused = fusedres.convert(copy.deepcopy(ref), backend="triton")
            for batch in args.batches:
                nbytes = batch * c * h * w * 2
                n_inputs = max(2, min(8, -(-2 * l2 // nbytes)))
                inputs = [torch.randn(batch, c, h, w, device=dev, dtype=dtype)
                          .contiguous(memory_format=torch.channels_last) for _ in range(n_inputs)]
                row = dict(model=model_name, block=block_name, type=type(ref).__name__, batch=batch,
                           input=[batch, c, h, w], downsample=ref.downsample is not None)
                with torch.no_grad():
                    t0 = time.time()
                    expected = ref(inputs[0]).float()
                    got = fused(inputs[0]).float()  # autotunes this block's shapes
                    row["rel_err_vs_eager"] = ((got - expected).norm() / expected.norm()).item()
                    row["first_call_s"] = round(time.time() - t0, 2)
                    row["eager_ms"] = _bench(ref, inputs, args.rep, args.smoke)
                    row["triton_ms"] = _bench(fused, inputs, args.rep, args.smoke)
                    row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
                    if not args.no_graphs:
                        row["eager_graph_ms"] = _graph_ms(ref, inputs[0], args.rep)
                        row["triton_graph_ms"] = _graph_ms(fused, inputs[0], args.rep)
                        row["graph_speedup"] = row["eager_graph_ms"] / row["triton_graph_ms"]
                    if batch in compile_batches and _wanted(args.compile_blocks, model_name, block_name):
                        torch._dynamo.reset()
                        t0 = time.time()
                        compiled = torch.compile(copy.deepcopy(ref), mode=args.compile_mode)
                        compiled(inputs[0])
                        row["compile_s"] = round(time.time() - t0, 1)
                        row["compile_ms"] = _bench(compiled, inputs, args.rep)
                        row["speedup_vs_compile"] = row["compile_ms"] / row["triton_ms"]
                rows.append(row)
                _log(f"{model_name} {block_name} b{batch}: eager {row['eager_ms']:.3f} ms, triton "
                     f"{row['triton_ms']:.3f} ms ({row['speedup_vs_eager']:.2f}x)"
                     + (f", compile {row['compile_ms']:.3f} ms" if "compile_ms" in row else "")
                     + f", rel err {row['rel_err_vs_eager']:.2e}")
                del inputs

    hdr = f"{'model':<9} {'block':<9} {'batch':>5} {'input':<14} {'eager':>8} {'triton':>8} {'x eager':>7} " \
          f"{'eager-g':>8} {'triton-g':>8} {'x graph':>7} {'compile':>8} {'x comp':>6} {'relerr':>8}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        comp = f"{r['compile_ms']:8.3f} {r['speedup_vs_compile']:6.2f}" if "compile_ms" in r else f"{'-':>8} {'-':>6}"
        graph = (f"{r['eager_graph_ms']:8.3f} {r['triton_graph_ms']:8.3f} {r['graph_speedup']:7.2f}"
                 if "graph_speedup" in r else f"{'-':>8} {'-':>8} {'-':>7}")
        print(f"{r['model']:<9} {r['block']:<9} {r['batch']:>5} {'x'.join(map(str, r['input'][1:])):<14} "
              f"{r['eager_ms']:8.3f} {r['triton_ms']:8.3f} {r['speedup_vs_eager']:7.2f} {graph} {comp} "
              f"{r['rel_err_vs_eager']:8.1e}")
    print("(ms, do_bench median; 'x eager' / 'x graph' / 'x comp' = speedup of the fused Triton block over "
          "eager, over eager in a CUDA graph (both graphed), and over torch.compile)")

    import triton

    report = dict(
        device="cpu (Triton interpreter smoke run)" if args.smoke else torch.cuda.get_device_name(dev),
        image_size=args.image_size,
        torch=torch.__version__,
        triton=triton.__version__,
        torchvision=torchvision.__version__,
        git_commit=_git_commit(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        dtype="bfloat16",
        memory_format="channels_last",
        autotune=not args.no_autotune,
        compile_mode=args.compile_mode,
        wall_s=round(time.time() - t_start, 1),
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    _log(f"wrote {out} ({len(rows)} rows, {report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

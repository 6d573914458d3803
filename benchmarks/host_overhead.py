"""Where a converted ResNet's forward spends its time: host (Python + launches) vs GPU.

    python benchmarks/host_overhead.py --batches 64 256 --json out.json [--profile]

For each backend (torchvision eager, fusedres ``triton``, fusedres ``cuda``) and batch, on
ResNet-50 bf16 channels_last eval, this measures

* ``host_ms``   host time to enqueue one forward (``perf_counter`` around the call, the GPU
  kept busy beforehand so launches never wait for it; median of several);
* ``wall_ms``   steady-state time per forward, ``N`` forwards back to back between two
  synchronisations (what a serving loop sees: ``max(host, gpu)`` per forward, roughly);
* ``graph_ms``  the same forward captured in one CUDA graph and replayed: GPU time alone,
  without Python or launch overhead;
* ``launches``  kernels per forward (``torch.profiler`` CUDA kernel events).

``--profile`` adds a ``cProfile`` of a few forwards per fused backend (top functions by
own time), to find the host hot spots; ``--launch-micro`` times single Triton launches
through ``launch()`` (tile cache) and with a fixed tile.  A development
tool, not part of the bench suite: the suite's numbers are ``fusedres bench``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fusedres  # noqa: E402


def _model(backend: str, batch: int):
    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval()
    m = m.to(device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    if backend != "eager":
        fusedres.convert(m, backend=backend)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    return m, x.contiguous(memory_format=torch.channels_last)


def _busy(ms: float = 20.0) -> None:
    """Queue about ``ms`` of GPU work so the next host calls never wait for the GPU."""
    torch.cuda._sleep(int(ms * 1.5e6))


def _host_ms(fn, reps: int = 7) -> float:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        _busy(60)
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(out)


def _wall_ms(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


def _graph_ms(fn, n: int = 20) -> float | None:
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / n
    except Exception as exc:  # report, keep going
        print(f"  graph capture failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def _launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _cprofile(fn, reps: int = 5, top: int = 25) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _launch_micro() -> dict:
    """Host microseconds per launch of one small conv, by entry point."""
    from fusedres.backends.triton import launch as L

    x = torch.randn(8, 64, 14, 14, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16)
    s = torch.ones(64, device="cuda")
    b = torch.zeros(64, device="cuda")
    out = torch.empty_like(x)
    wt = L.kernel_weight(w)
    res = {}

    def per_call(fn, n=300):
        fn()
        torch.cuda.synchronize()
        _busy(80)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) * 1e6 / n
        torch.cuda.synchronize()
        return dt

    # Through launch()'s tile cache (the autotuner ran on the first call only).
    res["launch_cached_tile_us"] = per_call(lambda: L.launch(x, wt, s, b, None, out, (1, 1), (1, 1), (1, 1), 1, True))
    cfg = L.TileConfig(128, 64, 64, 4, 4)
    res["launch_fixed_config_us"] = per_call(
        lambda: L.launch(x, wt, s, b, None, out, (1, 1), (1, 1), (1, 1), 1, True, config=cfg))
    res["empty_like_us"] = per_call(lambda: torch.empty_like(x))
    res["add_scalar_us"] = per_call(lambda: s.add(1.0))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    p.add_argument("--backends", nargs="+", default=["eager", "triton", "cuda"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--launch-micro", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    profiles = {}
    print(f"{'backend':8} {'batch':>5} {'host ms':>8} {'wall ms':>8} {'graph ms':>8} {'launches':>8}", flush=True)
    for batch in args.batches:
        for backend in args.backends:
            if backend not in ("eager",) and not fusedres.backends.is_available(backend):
                print(f"{backend:8} {batch:5d} unavailable", flush=True)
                continue
            try:
                m, x = _model(backend, batch)
                with torch.no_grad():
                    fn = functools.partial(m, x)
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                    row = dict(backend=backend, batch=batch, host_ms=_host_ms(fn), wall_ms=_wall_ms(fn),
                               launches=_launches(fn), graph_ms=_graph_ms(fn))
                    if args.profile and backend != "eager" and batch == args.batches[0]:
                        profiles[f"{backend}_b{batch}"] = _cprofile(fn)
                del m, x, fn
                torch.cuda.empty_cache()
            except Exception as exc:
                print(f"{backend:8} {batch:5d} FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            rows.append(row)
            g = f"{row['graph_ms']:8.2f}" if row["graph_ms"] is not None else "       -"
            print(f"{backend:8} {batch:5d} {row['host_ms']:8.2f} {row['wall_ms']:8.2f} {g} {row['launches']:8d}",
                  flush=True)
    micro = None
    if args.launch_micro and fusedres.backends.is_available("triton"):
        micro = _launch_micro()
        print("launch micro (host us/call):", json.dumps({k: round(v, 1) for k, v in micro.items()}), flush=True)
    for k, v in profiles.items():
        print(f"\n===== cProfile {k} (5 forwards) =====\n{v}", flush=True)
    if args.json:
        import triton

        Path(args.json).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            commit=os.environ.get("FUSEDRES_GIT_COMMIT"), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            rows=rows, launch_micro=micro, profiles=profiles), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

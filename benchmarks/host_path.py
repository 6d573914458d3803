"""The eval hot path's host cost on the CPU: Python calls per conv, tiny-input latency, FLOP counts.

    python benchmarks/host_path.py [--json out.json] [--rounds 15]

On a converted torchvision ResNet-18 (``auto`` backend: ``cpu`` on this machine), eval,
``torch.inference_mode()``, after warm-up:

* ``calls_per_conv``: Python function calls into ``fusedres`` per conv in one forward
  (``sys.setprofile``; every call whose code lives in the package counts, including lambdas
  and generator resumptions), divided by the model's 20 convs;
* ``tiny_ratio``: time per forward at 1x3x8x8 on one thread, fused / torchvision (interleaved
  rounds, median of per-round means), where the host path is nearly all of the time;
* ``flops``: ``torch.utils.flop_counter.FlopCounterMode`` totals of one forward, fused and
  torchvision (equal when the fused ops are visible to dispatch modes and count their convs).

Targets (issue "Thin eval hot path"): at most 12 calls per conv, ``tiny_ratio`` at most 0.75,
equal FLOP totals.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fusedres  # noqa: E402

PKG = os.path.dirname(os.path.abspath(fusedres.__file__))


def calls_per_conv(model, x) -> float:
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        if event == "call" and frame.f_code.co_filename.startswith(PKG):
            count += 1

    with torch.inference_mode():
        model(x)
        model(x)
        sys.setprofile(prof)
        try:
            model(x)
        finally:
            sys.setprofile(None)
    return count / n_convs


def tiny_ratio(ref, fused, rounds: int, reps: int = 50) -> dict:
    x = torch.randn(1, 3, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {"torchvision": [], "fused": []}
        with torch.inference_mode():
            for m in (ref, fused):
                for _ in range(10):
                    m(x)
            for r in range(rounds):
                order = [("torchvision", ref), ("fused", fused)][:: 1 if r % 2 else -1]
                for name, m in order:
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        m(x)
                    times[name].append((time.perf_counter() - t0) / reps)
    finally:
        torch.set_num_threads(threads)
    tv, fu = statistics.median(times["torchvision"]), statistics.median(times["fused"])
    return {"torchvision_us": tv * 1e6, "fused_us": fu * 1e6, "ratio": fu / tv}


def flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def _commit() -> str:
    env = os.environ.get("FUSEDRES_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 64, 64)
    res = {
        "calls_per_conv": calls_per_conv(fused, x),
        "tiny": tiny_ratio(ref, fused, args.rounds),
        "flops": {"torchvision": flops(ref, x), "fused": flops(fused, x)},
        "torch": torch.__version__,
        "fusedres": fusedres.__version__,
        "commit": _commit(),
        "host": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/host_path.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

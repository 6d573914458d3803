"""``fusedres bench``: blocks and whole ResNets, fused vs eager vs torch.compile, one run.

Examples::

    # the foundation number: convert(resnet50).eval() vs eager vs torch.compile, CPU fp32
    fusedres bench --model resnet50 --batch 8 --size 224 --device cpu --dtype float32 \\
        --contenders eager,compile,fusedres-cpu
    # every distinct block of ResNet-18 and -50 plus the whole ResNet-50 (presets below)
    fusedres bench --suite cpu-quick --json out.json --plot out.png
    fusedres bench --suite gpu-quick --json out.json --csv out.csv --plot out.png
    fusedres bench --list --blocks all        # the distinct block shapes and who uses them

Explicit flags override a suite's settings.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
from pathlib import Path

import torch

from . import contenders as contenders_mod
from . import report, runner, workloads
from . import timing as timing_mod

#: Presets.  Values are what the command line would give; explicit flags win.
SUITES = {
    # The committed CPU run: every distinct ResNet-18/-50 block, batch 8, fp32, and the whole
    # ResNet-50 with torch.compile beside it (compile only on the model, to keep it short).
    "cpu-quick": dict(
        blocks="resnet18,resnet50", model="resnet50", batch="8", dtype="float32", mode="infer",
        channels_last=False, contenders="eager,compile,fusedres-cpu,fusedres-torch", compile_on="resnet50",
        repeats=15, warmup=2,
    ),
    # About 3 minutes on one H100: the whole ResNet-50 and every distinct ResNet-18/-50 block
    # at batch 64 and 256, bf16 channels_last inference; max-autotune only on two
    # representative shapes at batch 256 (its compile dominates the run time).  No workload
    # starts after 150 s.
    "gpu-quick": dict(
        blocks="resnet18,resnet50", model="resnet50", batch="256,64", dtype="bfloat16", mode="infer",
        channels_last=True, contenders="eager,fusedres-triton,fusedres-cuda,compile-max",
        compile_on="bottleneck_1024-256-s1_14x14/b256,basic_128-128-s1_28x28/b256",
        repeats=50, warmup=10, time_budget=150.0,
    ),
    # The device check's inference suites (scripts/device_check.sh), bf16 channels_last, in its
    # priority order.  Every distinct ResNet-18/-50 block at batch 256 and 64 (30 rows) against
    # eager and cuDNN's fused ops, then the whole models at batch 256, 64 and 1, then
    # torch.compile (default mode) on the same workloads, then max-autotune on three blocks.
    "gpu-blocks": dict(
        blocks="resnet18,resnet50", model="none", batch="256,64", dtype="bfloat16", mode="infer",
        channels_last=True, contenders="eager,cudnn-fused,fusedres-cuda,fusedres-triton",
        repeats=30, warmup=5, time_budget=140.0,
    ),
    "gpu-models": dict(
        blocks="none", model="resnet50,resnet18", batch="256,64,1", dtype="bfloat16", mode="infer",
        channels_last=True, contenders="eager,cudnn-fused,fusedres-cuda,fusedres-triton",
        repeats=30, warmup=5, time_budget=50.0,
    ),
    "gpu-compile": dict(
        blocks="resnet18,resnet50", model="resnet50", batch="256,64", dtype="bfloat16", mode="infer",
        channels_last=True, contenders="eager,compile", repeats=20, warmup=3, time_budget=60.0,
    ),
    "gpu-max": dict(
        blocks="resnet18,resnet50", model="none", batch="256", dtype="bfloat16", mode="infer",
        channels_last=True, contenders="eager,compile-max",
        only="basic_64-64-s1_*,bottleneck_256-64-s1_*,bottleneck_1024-256-s1_*",
        repeats=20, warmup=3, time_budget=60.0,
    ),
    # Training step (forward + backward, bf16 autocast, channels_last) of ResNet-50 and -18:
    # img/s and peak memory, fused vs eager vs torch.compile (default mode, on ResNet-50 at
    # batch 256 only: each train-mode compile costs about a minute).
    # Train mode runs fusedres.training's chains whatever the backend name, so one fused
    # contender (on CUDA the chains use the Triton kernels).
    "gpu-train": dict(
        model="resnet50,resnet18", blocks="none", batch="256,128", dtype="bfloat16", mode="train",
        channels_last=True, contenders="eager,compile,fusedres-triton", compile_on="resnet50/b256",
        repeats=20, warmup=5, time_budget=150.0,
    ),
    # CPU inference against ONNX Runtime (the unconverted model exported, all graph optimisations):
    # ResNet-50 and -18 at batch 1 (single-image serving) and 8, fp32, NCHW input; torch.compile
    # on ResNet-50 only.  About 6 minutes on 2 cores.  Needs fusedres[ort].
    "cpu-ort": dict(
        model="resnet50,resnet18", blocks="none", batch="1,8", dtype="float32", mode="infer",
        channels_last=False, contenders="eager,compile,fusedres-cpu,ort-cpu", compile_on="resnet50",
        repeats=15, warmup=3,
    ),
    # The committed CPU training run: ResNet-50 and -18 training steps at batch 8, fp32 and
    # bf16 autocast, NCHW model and input, fused vs eager vs torch.compile (about 8 minutes
    # on 2 cores).
    "cpu-train": dict(
        model="resnet50,resnet18", blocks="none", batch="8", dtype="float32,bfloat16", mode="train",
        channels_last=False, contenders="eager,compile,fusedres-torch", repeats=9, warmup=2,
    ),
}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("what to run")
    g.add_argument("--suite", choices=sorted(SUITES), help="a preset (see the module docstring)")
    g.add_argument("--blocks", help="comma list of models whose distinct block shapes to run, 'all' or 'none' "
                                    f"(models: {', '.join(workloads.MODELS)})")
    g.add_argument("--model", help="comma list of whole models to run, 'all' or 'none'")
    g.add_argument("--only", help="comma list of globs: keep workloads whose name matches one")
    g.add_argument("--batch", help="comma list of batch sizes (default: 8 on cpu, 64 on cuda)")
    g.add_argument("--size", type=int, help="input image side; block shapes follow from it (default: 224)")
    g.add_argument("--dtype", help="comma list of float32, bfloat16, float16 (default: float32 cpu, bfloat16 cuda)")
    g.add_argument("--mode", choices=("infer", "train"), help="infer (inference_mode, eval BN) or train "
                   "(forward + backward of out.float().sum(), autocast for bf16/fp16) (default: infer)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and inputs (default: off, i.e. NCHW)")
    g = p.add_argument_group("contenders")
    g.add_argument("--contenders", help="comma list of " + ", ".join(contenders_mod.NAMES)
                   + "; 'fusedres' = every fused backend for the device, 'all' = everything "
                   "(default: eager,compile,fusedres; plus compile-max,tensorrt on cuda)")
    g.add_argument("--no-compile", action="store_true", help="drop the torch.compile contenders")
    g.add_argument("--compile-on", help="comma list of globs over workload names (or NAME/bBATCH): run the "
                                        "compile contenders only there (default: everywhere)")
    g = p.add_argument_group("timing")
    g.add_argument("--repeats", type=int, help="timed rounds per workload (default: 20 cpu, 100 cuda)")
    g.add_argument("--warmup", type=int, help="untimed rounds after the first call (default: 3 cpu, 10 cuda)")
    g.add_argument("--time-budget", type=float, help="seconds; workloads not started by then are skipped rows")
    g.add_argument("--timing", choices=timing_mod.TIMING_MODES, default="pipelined",
                   help="GPU: 'pipelined' times calls back to back per contender turn (do_bench's semantics: "
                        "steady-state cost per call); 'isolated' synchronises before every call (latency of "
                        "one call on an idle GPU, including the host time to its first launch)")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN pick the fastest conv algorithms for every contender (default: on)")
    g.add_argument("--threads", type=int, help="CPU threads for torch during the run (default: torch's own)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    g.add_argument("--csv", dest="csv_path", metavar="PATH", help="write the rows as CSV")
    g.add_argument("--plot", dest="plot_path", metavar="PNG", help="speedup and %% of roofline per workload "
                                                                   "(needs matplotlib)")
    g.add_argument("--summary", dest="summary_path", metavar="PATH",
                   help="write a short plain-text summary (one line per workload)")
    g.add_argument("--results-dir", metavar="DIR", help="also write <device-slug>_<date>_<suite or mode>.json "
                   "and .png there (e.g. benchmarks/results; scripts/render_results.py reads them)")
    g.add_argument("--notes", default="", help="free text stored with the results (conditions of the run)")
    g.add_argument("--list", action="store_true", help="list the workloads and exit")


def _models(spec: str | None) -> list[str]:
    if spec is None or spec == "none":
        return []
    if spec == "all":
        return list(workloads.MODELS)
    return [workloads.check_model_name(m) for m in _csv(spec)]


def _ints(name: str, spec: str) -> list[int]:
    try:
        vals = [int(v) for v in _csv(spec)]
    except ValueError:
        raise ValueError(f"{name} must be a comma list of integers, got {spec!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{name} must list positive integers, got {spec!r}")
    return vals


def _dtypes(spec: str) -> list[torch.dtype]:
    names = _csv(spec)
    bad = [n for n in names if n not in runner.DTYPES]
    if bad or not names:
        raise ValueError(f"--dtype must list {', '.join(runner.DTYPES)}, got {spec!r}")
    return [runner.DTYPES[n] for n in names]


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from ``--suite`` and then from the per-device defaults."""
    a = argparse.Namespace(**vars(args))
    for k, v in SUITES.get(args.suite or "", {}).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    try:
        a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device {a.device!r}: {exc}") from None
    if a.device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {str(a.device)!r}")
    if a.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device} asked for, but torch sees no CUDA device")
    cuda = a.device.type == "cuda"
    if a.blocks is None and a.model is None:
        a.blocks = a.model = "resnet50"
    # Unset flags take the defaults; a flag given empty or out of range is an error, never a default.
    for flag, value in (("batch", a.batch), ("dtype", a.dtype), ("contenders", a.contenders)):
        if value is not None and not value.strip():
            raise ValueError(f"--{flag} is empty")
    a.batch = a.batch if a.batch is not None else ("64" if cuda else "8")
    a.size = a.size if a.size is not None else 224
    a.dtype = a.dtype if a.dtype is not None else ("bfloat16" if cuda else "float32")
    a.mode = a.mode or "infer"
    a.channels_last = bool(a.channels_last)
    if a.contenders is None:
        a.contenders = "eager,compile,fusedres" + (",compile-max,tensorrt" if cuda else "")
    a.repeats = a.repeats if a.repeats is not None else (100 if cuda else 20)
    a.warmup = a.warmup if a.warmup is not None else (10 if cuda else 3)
    if a.size < 32:
        raise ValueError(f"--size must be at least 32 (five stride-2 stages), got {a.size}")
    if a.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {a.repeats}")
    if a.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
    if a.time_budget is not None and not a.time_budget > 0:
        raise ValueError(f"--time-budget must be a positive number of seconds, got {a.time_budget}")
    for flag in ("json_path", "csv_path", "plot_path", "summary_path"):
        path = getattr(a, flag, None)
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"--{flag.removesuffix('_path')} {path}: its directory does not exist")
    return a


def build_workloads(a: argparse.Namespace) -> list[runner.Workload]:
    import fnmatch

    batches = _ints("--batch", a.batch)
    # Whole models first: under --time-budget the headline rows are the last to be cut.
    out = [runner.Workload("model", m, b, a.size) for m in _models(a.model) for b in batches]
    for shape, used_by in workloads.distinct_blocks(_models(a.blocks), a.size).items():
        out += [runner.Workload("block", shape.name, b, a.size, shape, used_by) for b in batches]
    if a.compile_on:
        # Then the workloads --compile-on picks (their compile rows are what it asks for), then
        # the rest: a stable sort, so a time budget cannot cut them (the 2026-11-27 H100 run lost
        # its one max-autotune row that way, behind the ResNet-18 blocks).
        pats = _csv(a.compile_on)
        out.sort(key=lambda w: w.kind != "model" and not runner.compile_selected(w, pats))
    if a.only:
        pats = _csv(a.only)
        out = [w for w in out if any(fnmatch.fnmatchcase(w.name, p) for p in pats)]
    return out


def canonical_command(a: argparse.Namespace) -> str:
    """The fully resolved command line that reproduces this run (suite expanded)."""
    parts = ["fusedres", "bench", "--device", str(a.device), "--mode", a.mode, "--dtype", a.dtype,
             "--batch", a.batch, "--size", str(a.size), "--blocks", a.blocks or "none", "--model", a.model or "none",
             "--contenders", a.contenders, "--repeats", str(a.repeats), "--warmup", str(a.warmup),
             "--channels-last" if a.channels_last else "--no-channels-last", "--seed", str(a.seed)]
    if a.device.type == "cuda":
        parts += ["--timing", a.timing]
    for flag, val in (("--only", a.only), ("--compile-on", a.compile_on), ("--time-budget", a.time_budget),
                      ("--threads", a.threads)):
        if val is not None:
            parts += [flag, str(val)]
    if a.no_compile:
        parts.append("--no-compile")
    if a.device.type == "cuda":
        parts.append("--cudnn-benchmark" if a.cudnn_benchmark else "--no-cudnn-benchmark")
    return shlex.join(parts)


class _Progress:
    """Adapter from the runner's progress protocol to a rich progress bar."""

    def __init__(self, bar):
        self.bar = bar
        self.task = bar.add_task("starting", total=None)

    def total(self, n: int) -> None:
        self.bar.update(self.task, total=n)

    def status(self, text: str) -> None:
        self.bar.update(self.task, description=text)

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    err = Console(stderr=True)
    try:
        a = resolve(args)
        wls = build_workloads(a)
        dtypes = _dtypes(a.dtype)
        cons = contenders_mod.parse(a.contenders, a.device)
    except ValueError as exc:
        err.print(f"[red]fusedres bench: {exc}[/red]")
        return 2
    if a.no_compile:
        cons = [c for c in cons if c.name not in contenders_mod.COMPILE_NAMES]
    if a.list:
        for w in wls:
            uses = ", ".join(f"{m} x{n}" for m, n in (w.used_by or {}).items())
            console.print(f"{w.kind:5} {w.name:40} batch {w.batch:4}  input {w.input_shape}  {uses}")
        return 0
    if not wls:
        err.print("[red]fusedres bench: no workloads selected (check --blocks/--model/--only)[/red]")
        return 2
    if a.plot_path or a.results_dir:
        try:
            import matplotlib  # noqa: F401  (fail before the run, not after it)
        except ImportError:
            err.print("[red]fusedres bench: --plot needs matplotlib: pip install 'fusedres[plot]'[/red]")
            return 2
    if a.device.type == "cuda":
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    if a.threads is not None:
        if a.threads < 1:
            err.print(f"[red]fusedres bench: --threads must be >= 1, got {a.threads}[/red]")
            return 2
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(a.threads)
    try:
        return _run(a, cons, dtypes, wls, console)
    finally:
        if a.threads is not None:
            torch.set_num_threads(prev_threads)


def _run(a, cons, dtypes, wls, console) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    cfg = runner.Config(
        device=a.device, dtypes=dtypes, mode=a.mode, contenders=cons, channels_last=a.channels_last,
        compile_on=_csv(a.compile_on) if a.compile_on else None, repeats=a.repeats, warmup=a.warmup,
        seed=a.seed, time_budget_s=a.time_budget, timing=a.timing,
    )
    result = report.environment(a.device)
    result["config"] = {
        "command": canonical_command(a), "suite": a.suite, "mode": a.mode, "dtypes": _csv(a.dtype),
        "batches": _ints("--batch", a.batch), "image_size": a.size, "channels_last": a.channels_last,
        "contenders": [c.name for c in cons], "compile_on": cfg.compile_on, "repeats": a.repeats,
        "warmup": a.warmup, "seed": a.seed, "time_budget_s": a.time_budget,
        "cudnn_benchmark": bool(a.cudnn_benchmark) if a.device.type == "cuda" else None,
        "timing": a.timing if a.device.type == "cuda" else "perf_counter",
    }
    result["memory_method"] = (
        "torch.cuda.max_memory_allocated during one call minus memory allocated before it (MiB)"
        if a.device.type == "cuda" else "n/a on CPU (no allocator statistics; RSS is too coarse per call)"
    )
    result["notes"] = a.notes
    result["peaks"] = {}
    result["rows"] = []
    # "interrupted" stays true in the JSON files rewritten after every workload until the run
    # completes, so a run killed from outside (a step timeout) still leaves its rows behind.
    result["interrupted"] = True
    json_paths = [a.json_path] if a.json_path else []
    if a.results_dir:
        stem = Path(a.results_dir) / report.result_stem(result)
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_paths.append(stem.with_suffix(".json"))
    status = 0
    prev_sigterm = signal.signal(signal.SIGTERM, _sigterm)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            prog = _Progress(bar)
            try:
                peaks = runner.measure_peaks(cfg, prog)
            except Exception as exc:  # no roofline, so no rows: the file records why
                result["error"] = f"measuring the roofline peaks: {type(exc).__name__}: {exc}"[:2000]
                status = 1
            else:
                result["peaks"] = {k: v.as_dict() for k, v in peaks.items()}
                for rows in runner.iter_rows(wls, cfg, peaks, prog):
                    result["rows"] += rows
                    for path in json_paths:
                        report.write_json(result, path)
        result["interrupted"] = False
    except KeyboardInterrupt:
        status = 130
    finally:
        signal.signal(signal.SIGTERM, prev_sigterm)
        # Whatever happened, show and save what was measured.
        result["host"]["loadavg_end"] = report.loadavg()
        if result.get("error"):
            Console(stderr=True).print(f"[red]fusedres bench: {result['error']}[/red]", soft_wrap=True)
        if result["peaks"] or result.get("error"):
            for path in json_paths:
                report.write_json(result, path)
        if result["peaks"]:
            report.print_table(result, console)
            if a.csv_path:
                report.write_csv(result, a.csv_path)
            if a.plot_path:
                report.plot(result, a.plot_path)
            if a.summary_path:
                with open(a.summary_path, "w") as f:
                    f.write("\n".join(report.summary_lines(result)) + "\n")
            if a.results_dir:
                report.plot(result, stem.with_suffix(".png"))
                console.print(f"results written to {stem}.json and .png")
    return status


def _sigterm(signum, frame):
    """SIGTERM (e.g. from ``timeout``) ends the run like Ctrl-C: the table and files are still written."""
    raise KeyboardInterrupt

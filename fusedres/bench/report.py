"""Reports: the environment a run is keyed by, the terminal table, JSON/CSV files, the plot,
and the Markdown section ``scripts/render_results.py`` writes into the README."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from collections import Counter
from pathlib import Path

import torch
import torchvision

import fusedres

from .contenders import NOT_IN_COMPILE_ON

SCHEMA_ID = "fusedres-bench/1"
SCHEMA_PATH = Path(__file__).with_name("schema.json")
MARK_BEGIN = "<!-- results:begin -->"
MARK_END = "<!-- results:end -->"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_info(device: torch.device) -> dict:
    """Name and file-name slug of the benchmarked device (CPU: model and logical core count)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "slug": _slug(props.name),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    cores = os.cpu_count() or 0
    name = cpu_model()
    return {"type": device.type, "name": name, "slug": f"{_slug(name)}-{cores}c", "capability": None,
            "memory_gib": None}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict:
    """``{"commit", "dirty"}`` of the checkout fusedres is imported from.

    ``$FUSEDRES_GIT_COMMIT`` (a hash, 7 to 40 hex digits) wins when set: a tree copied to a
    test machine may carry a stale ``.git`` (the GPU runs of 2026-11-27 reported the
    session's starting commit, "dirty", for newer code).  Outside a git checkout and
    without it the commit is ``"unknown"``.
    """
    root = Path(fusedres.__file__).resolve().parent.parent
    given = os.environ.get("FUSEDRES_GIT_COMMIT", "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{7,40}", given):
        return {"commit": given, "dirty": None}
    unknown = {"commit": "unknown", "dirty": None}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return unknown
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return unknown


def environment(device: torch.device) -> dict:
    """Everything a result file is keyed by: device, versions, git commit, date, host."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "schema": SCHEMA_ID,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            # Read from the installed metadata: importing triton here could fix its mode
            # (TRITON_INTERPRET) before the backends get to it.
            "triton": _version("triton"),
            "torch_tensorrt": _version("torch_tensorrt") or _version("torch-tensorrt"),
            # The ort-cpu contender's runtime and exporter, and timm (timm/<name> models).
            "onnxruntime": _version("onnxruntime"),
            "onnx": _version("onnx"),
            "timm": _version("timm"),
            "fusedres": fusedres.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
            "cudnn": cudnn,
        },
        "git": git_state(),
        "host": {
            "cpu": cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            # Other processes competing for the CPU make CPU timings (and GPU launch overhead) noisy.
            "loadavg_start": loadavg(),
            "loadavg_end": None,
        },
    }


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- files


def run_label(result: dict) -> str:
    """What kind of run this is: its suite, else its mode (one results table per label)."""
    return result["config"].get("suite") or result["config"]["mode"]


def result_stem(result: dict) -> str:
    """``<device-slug>_<YYYY-MM-DD>_<label>``: the file name of a committed result."""
    return f"{result['device']['slug']}_{result['date'][:10]}_{_slug(run_label(result))}"


def write_json(result: dict, path) -> None:
    """Write ``result`` atomically: a reader (or a kill mid-write) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def tool_result(schema: str, config: dict, device: torch.device | None = None) -> dict:
    """The header of a development tool's JSON (``benchmarks/*.py``): :func:`environment` (CPU by
    default), the tool's own ``schema`` (not :data:`SCHEMA_ID`, so ``scripts/render_results.py``
    skips the file) and ``config`` with the command line."""
    import sys

    result = environment(device or torch.device("cpu"))
    result["schema"] = schema
    result["config"] = {"command": " ".join(sys.argv), **config}
    return result


def finish_tool_result(result: dict, path=None) -> None:
    """Record the load at the end of a tool's run and write its JSON to ``path`` (if given)."""
    result["host"]["loadavg_end"] = loadavg()
    if path:
        write_json(result, path)


def validate(result: dict) -> None:
    """Raise ``jsonschema.ValidationError`` if ``result`` does not follow ``schema.json``."""
    import jsonschema

    with open(SCHEMA_PATH) as f:
        jsonschema.validate(result, json.load(f))


#: The run's keys every CSV line carries, as ``<key>_<field>`` columns.
_CSV_RUN_FIELDS = {
    "device": ("type", "name", "slug", "capability", "memory_gib"),
    "versions": ("torch", "torchvision", "triton", "torch_tensorrt", "onnxruntime", "onnx", "timm", "fusedres", "python",
                 "cuda", "cudnn"),
    "git": ("commit", "dirty"),
    "host": ("cpu", "logical_cores", "torch_threads", "platform", "loadavg_start", "loadavg_end"),
}


def csv_columns() -> list[str]:
    """The CSV header, the same for every run: the run's keys, then every row field of schema.json
    (``block`` spread over ``block_<field>`` columns, empty on model rows)."""
    with open(SCHEMA_PATH) as f:
        row = json.load(f)["properties"]["rows"]["items"]["properties"]
    block = row["block"]["oneOf"][1]["properties"]
    cols = ["date"] + [f"{k}_{f}" for k, fields in _CSV_RUN_FIELDS.items() for f in fields]
    for k in row:
        cols += [f"block_{f}" for f in block] if k == "block" else [k]
    return cols


def _csv_cell(v):
    """Lists of ints as ``AxBxC`` (shapes); other lists and dicts (``used_by``) as JSON strings."""
    if isinstance(v, list) and all(isinstance(x, int) for x in v):
        return "x".join(map(str, v))
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def write_csv(result: dict, path) -> None:
    """One line per row; every line also carries the run's keys (device, versions, commit, date, host)."""
    keys = {"date": result["date"]}
    keys.update({f"{k}_{f}": _csv_cell(result[k].get(f)) for k, fields in _CSV_RUN_FIELDS.items() for f in fields})
    lines = []
    for row in result["rows"]:
        line = dict(keys)
        for k, v in row.items():
            if k == "block":
                line.update({f"block_{f}": x for f, x in (v or {}).items()})
            else:
                line[k] = _csv_cell(v)
        lines.append(line)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_columns())  # a field not in the schema raises
        w.writeheader()
        w.writerows(lines)


# --------------------------------------------------------------------------- table


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _time_cell(r: dict) -> str:
    if r["time_ms"] is None:
        return "-"
    return f"{r['time_ms']:.3g} ({r['time_ms_p20']:.3g}-{r['time_ms_p80']:.3g})"


def _status_cell(r: dict) -> str:
    if r["status"] == "ok":
        return r["note"] or ""
    text = r["error"] if r["status"] == "error" else r["note"]
    return f"{r['status']}: {text}"


COLUMNS = (
    ("workload", lambda r: r["workload"]),
    ("batch", lambda r: str(r["batch"])),
    ("dtype", lambda r: r["dtype"] + (" CL" if r["channels_last"] else "")),
    ("contender", lambda r: r["contender"]),
    ("ms median (p20-p80)", _time_cell),
    ("graph ms", lambda r: _fmt(r.get("graph_ms"), ".3g")),
    ("img/s", lambda r: _fmt(r["img_per_s"], ".4g")),
    ("TFLOP/s", lambda r: _fmt(r["tflops"], ".3g")),
    ("GB/s", lambda r: _fmt(r["gbps"], ".3g")),
    ("% roof", lambda r: _fmt(r["roofline_pct"], ".1f")),
    ("peak MiB", lambda r: _fmt(r["peak_mem_mb"], ".0f", "n/a")),
    ("max err", lambda r: _fmt(r["max_abs_err"], ".1e")),
    ("x eager", lambda r: _fmt(r["speedup_vs_eager"], ".2f")),
    ("x compile", lambda r: _fmt(r["speedup_vs_compile"], ".2f")),
    ("x compile-max", lambda r: _fmt(r["speedup_vs_compile_max"], ".2f")),
    ("status", _status_cell),
)


def print_table(result: dict, console=None) -> None:
    """The summary table (rich), one section per workload, and the run's key facts."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console.width = max(console.width, 220)
    dev = result["device"]
    cfg = result["config"]
    title = (f"fusedres bench: {dev['name']} ({dev['type']}), mode {cfg['mode']}, "
             f"{result['date']}, commit {result['git']['commit'][:10]}")
    table = Table(title=title, show_lines=False)
    for name, _ in COLUMNS:
        table.add_column(name, overflow="fold", no_wrap=name in ("workload", "contender"))
    last = None
    for r in result["rows"]:
        key = (r["workload"], r["batch"], r["dtype"])
        if last is not None and key != last:
            table.add_section()
        last = key
        style = None if r["status"] == "ok" else ("red" if r["status"] == "error" else "dim")
        table.add_row(*(fn(r) for _, fn in COLUMNS), style=style)
    console.print(table)
    for dt, p in result["peaks"].items():
        console.print(f"roofline peaks ({dt}): matmul {p['matmul_tflops']:.3g} TFLOP/s (n={p['matmul_n']}), "
                      f"copy {p['copy_gbps']:.3g} GB/s; {p['note']}")
    console.print(f"peak memory: {result['memory_method']}")
    host = result["host"]
    console.print(f"host load average (1/5/15 min): {host['loadavg_start']} at start, {host['loadavg_end']} at end "
                  f"({host['logical_cores']} logical cores, torch threads {host['torch_threads']})")
    costs = {(r["workload"], r["image_size"]): (r["gmacs_per_image"], r.get("published_gmacs_per_image"))
             for r in result["rows"] if r["kind"] == "model"}
    for (name, size), (gmacs, published) in costs.items():
        console.print(f"{name}: {gmacs:.3f} GMACs per {size}x{size} image (convs + classifier)"
                      + (f"; torchvision publishes {published:.3f}" if published is not None else ""))


def summary_lines(result: dict) -> list[str]:
    """One line per workload: the eager time, every other contender's speedup, failures."""
    label = f"bench {run_label(result)} on {result['device']['name']}"
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["workload"], r["batch"], r["dtype"]), []).append(r)
    counts = Counter(r["status"] for r in result["rows"])
    lines = [f"{label}: {len(groups)} workloads, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    n_compile = sum(_unrun(r) == "compile" for r in result["rows"])
    if n_compile:  # one mention here instead of one per workload line
        lines[0] += f" ({n_compile} compile rows {NOT_IN_COMPILE_ON})"
    for (name, batch, dtype), rows in groups.items():
        parts = []
        for r in rows:
            if _unrun(r) == "compile":
                continue
            if r["status"] != "ok":
                parts.append(f"{r['contender']} {r['status'].upper()}")
            elif r["contender"] == "eager":
                parts.append(f"eager {r['time_ms']:.3g} ms")
            elif r["speedup_vs_eager"] is not None:
                parts.append(f"{r['contender']} {r['speedup_vs_eager']:.2f}x")
            else:
                parts.append(f"{r['contender']} {r['time_ms']:.3g} ms")
        lines.append(f"  {name} b{batch} {dtype}: " + " | ".join(parts))
    return lines


# --------------------------------------------------------------------------- plot


def plot(result: dict, path) -> None:
    """Speedup over eager and percent of roofline per workload, one bar per contender."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fusedres[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in result["rows"] if r["status"] == "ok"]
    labels: list[str] = []
    for r in ok:
        lab = f"{r['workload']} b{r['batch']} {r['dtype']}"
        if lab not in labels:
            labels.append(lab)
    names = [n for n in dict.fromkeys(r["contender"] for r in ok)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.6 * len(labels) * max(1, len(names)) / 2 + 3), 9),
                             sharex=True)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(names))
    for ax, key, ylabel in ((axes[0], "speedup_vs_eager", "speedup over eager (x)"),
                            (axes[1], "roofline_pct", "% of roofline floor")):
        for i, name in enumerate(names):
            if key == "speedup_vs_eager" and name == "eager":
                continue  # 1.0 by definition: the line at 1 stands for it
            vals = [np.nan] * len(labels)
            for r in ok:
                if r["contender"] == name and r[key] is not None:
                    vals[labels.index(f"{r['workload']} b{r['batch']} {r['dtype']}")] = r[key]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name, color=f"C{i % 10}")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[1].legend(fontsize=8, ncol=min(4, max(1, len(names))))
    axes[1].set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    dev = result["device"]
    fig.suptitle(f"fusedres bench, {dev['name']}, {result['config']['mode']}, {result['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- README section


def _unrun(r: dict) -> str | None:
    """``"compile"``, ``"budget"`` or ``None``: why a skipped row was never started by the run's own choice."""
    if r["status"] != "skipped":
        return None
    if r["note"] == NOT_IN_COMPILE_ON:
        return "compile"
    return "budget" if "time budget" in (r["note"] or "") else None


def _md_row(r: dict) -> str:
    cells = [fn(r).replace("|", "/").replace("\n", " ") for _, fn in COLUMNS]
    cells[-1] = cells[-1][:160]
    return "| " + " | ".join(cells) + " |"


# GPU runs made before ``config.timing`` was recorded (6f248e0) timed each call after a
# synchronisation (what is now ``--timing isolated``) from e78796e on, committed at this time;
# earlier runs did not synchronise per call (the H100 gpu-quick run at 03:39 UTC, in git history).
_SYNC_PER_CALL_SINCE = datetime.datetime(2026, 11, 27, 4, 36, 45, tzinfo=datetime.timezone.utc)


def render_markdown(results: list[tuple[dict, str | None]]) -> str:
    """The README section: per device, its latest run's table and plot.

    ``results``: ``(result dict, plot path relative to the README or None)`` per device, in
    the order to show them.
    """
    out = [
        "_Generated by `scripts/render_results.py` from `benchmarks/results/`; do not edit by hand._",
        "",
    ]
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    for res, png in results:
        dev, v, cfg = res["device"], res["versions"], res["config"]
        out += [
            f"### {dev['name']} ({dev['type']}): {run_label(res)}, {res['date'][:10]}",
            "",
            f"Mode `{cfg['mode']}`; torch {v['torch']}, torchvision {v['torchvision']}, triton {v['triton']}, "
            f"fusedres {v['fusedres']}, Python {v['python']}; commit `{res['git']['commit'][:10]}`"
            + (" (uncommitted changes)" if res["git"].get("dirty") else "")
            + f"; host {res['host']['cpu']} ({res['host']['logical_cores']} logical cores, "
            f"load average {res['host'].get('loadavg_start')} at start, {res['host'].get('loadavg_end')} at end).",
            "",
            f"Command: `{cfg['command']}`",
            "",
        ]
        if res.get("notes"):
            out += [f"Notes: {res['notes']}", ""]
        if res.get("error"):
            out += [f"Run failed: {res['error']}", ""]
        peaks = "; ".join(f"{dt}: matmul {p['matmul_tflops']:.3g} TFLOP/s, copy {p['copy_gbps']:.3g} GB/s"
                          for dt, p in res["peaks"].items())
        timing = {
            "pipelined": " GPU timing: pipelined (calls back to back per contender turn, do_bench's semantics).",
            "isolated": " GPU timing: isolated (a synchronisation before every call: one-call latency).",
        }.get(cfg.get("timing"), "")
        if "timing" not in cfg and dev["type"] == "cuda":
            timing = (" GPU timing: isolated (each call synchronised; recorded before --timing existed). "
                      "To repeat it, add `--timing isolated` to the command (the default is now pipelined)."
                      if datetime.datetime.fromisoformat(res["date"]) >= _SYNC_PER_CALL_SINCE
                      else " GPU timing: timing mode not recorded.")
        out += [f"Roofline peaks measured in the run: {peaks}. Peak memory: {res['memory_method']}.{timing}", ""]
        # Rows a time budget never reached, and compile rows --compile-on left out, carry no
        # measurement: counted, not listed.
        unrun = Counter(_unrun(r) for r in res["rows"])
        out += [header, "|" + "---|" * len(COLUMNS)] + [_md_row(r) for r in res["rows"] if not _unrun(r)] + [""]
        if unrun["budget"]:
            out += [f"{unrun['budget']} more rows were not reached within the run's time budget "
                    "(listed in the JSON).", ""]
        if unrun["compile"]:
            out += [f"{unrun['compile']} torch.compile rows were not run: their workloads are {NOT_IN_COMPILE_ON} "
                    "(listed in the JSON).", ""]
        if png:
            out += [f"![{dev['name']} speedup and roofline]({png})", ""]
    return "\n".join(out)


def latest_results(results_dir, skipped: list | None = None) -> list[tuple[dict, Path]]:
    """The newest ``fusedres bench`` result per device and run label in ``results_dir``, GPUs first.

    JSON files of other tools (without ``"schema": "fusedres-bench/1"``) are left out and, when
    ``skipped`` is given, appended to it.  Raises ``ValueError`` naming a file that is not JSON.
    """
    latest: dict[tuple[str, str], tuple[dict, Path]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        with open(path) as f:
            try:
                res = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(res, dict) or res.get("schema") != SCHEMA_ID:
            if skipped is not None:
                skipped.append(path)
            continue
        key = (res["device"]["slug"], run_label(res))
        if key not in latest or (res["date"], path.name) > (latest[key][0]["date"], latest[key][1].name):
            latest[key] = (res, path)
    return sorted(latest.values(), key=lambda rp: (rp[0]["device"]["type"] != "cuda", rp[0]["device"]["name"],
                                                    run_label(rp[0])))


def replace_section(text: str, section: str) -> str:
    """``text`` with everything between the results markers replaced by ``section``."""
    b, e = text.find(MARK_BEGIN), text.find(MARK_END)
    if b < 0 or e < 0 or e < b:
        raise ValueError(f"README has no results section: add the lines {MARK_BEGIN!r} and {MARK_END!r} "
                         "(in that order) where the results should go")
    return text[: b + len(MARK_BEGIN)] + "\n" + section.rstrip("\n") + "\n" + text[e:]

"""The benchmark suite: its cost accounting, its timing loop, and one tiny run end to end.

No timing is asserted here (numbers come from benchmark runs); these tests check that the
suite measures what it says and reports it in the documented format.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet as tv_resnet

import fusedres
from fusedres.bench import cli as bench_cli
from fusedres.bench import contenders, report, roofline, runner, timing, workloads

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("name", list(workloads.MODELS))
def test_gmacs_match_torchvision_published(name):
    """Our MAC counter agrees with torchvision's published ``_ops`` (3 decimals, GMACs at 224)."""
    ours = workloads.model_gmacs_per_image(name, 224)
    published = workloads.published_gmacs(name)
    assert abs(ours - published) <= 0.0005 + 1e-9, (name, ours, published)


@pytest.mark.parametrize("name", list(workloads.MODELS))
def test_block_accounting_adds_up_to_the_model(name):
    """Stem + the extracted block shapes + classifier (the roofline's structural model) give
    exactly the MACs the hook counter sees in the real module tree, at a non-square-friendly size."""
    size = 160
    counted = sum(c.macs for c in workloads.count_macs(workloads.meta_model(name), (2, 3, size, size)))
    structural = sum(op.flops for op in roofline.model_ops(name, 2, size, torch.float32)) // 2
    assert structural == counted


def test_distinct_blocks_and_usage():
    d = workloads.distinct_blocks(["resnet18", "resnet34", "resnet50"])
    r18 = {s: u["resnet18"] for s, u in d.items() if "resnet18" in u}
    r34 = {s: u["resnet34"] for s, u in d.items() if "resnet34" in u}
    r50 = {s: u["resnet50"] for s, u in d.items() if "resnet50" in u}
    assert (len(r18), sum(r18.values())) == (7, 8)
    assert set(r34) == set(r18) and sum(r34.values()) == 16  # same shapes, [3, 4, 6, 3] blocks
    assert (len(r50), sum(r50.values())) == (8, 16)
    first = next(iter(r50))
    assert (first.kind, first.inplanes, first.planes, first.stride, first.downsample) == ("bottleneck", 64, 64, 1, True)
    assert (first.height, first.width) == (56, 56)
    layer4 = [s for s in r50 if s.stride == 2 and s.inplanes == 1024]
    assert len(layer4) == 1 and layer4[0].height == 14 and layer4[0].out_hw == (7, 7)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "wide_resnet50_2"])
def test_block_shape_rebuilds_the_models_blocks(name):
    """``BlockShape.build()`` gives a block with the same parameter shapes as the model's."""
    model = workloads.meta_model(name)
    blocks = [m for m in model.modules() if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck))]
    shapes = workloads.model_blocks(name)
    assert len(blocks) == len(shapes)
    for blk, shape in zip(blocks, shapes):
        with torch.device("meta"):
            rebuilt = shape.build()
        assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in blk.named_parameters()]


def test_model_rows_carry_torchvision_published_gmacs_at_224():
    """``published_gmacs_per_image``: torchvision's ``_ops`` on model rows at 224x224, null otherwise; schema-valid."""
    cfg = runner.Config(device=torch.device("cpu"), dtypes=[torch.float32], mode="infer",
                        contenders=[contenders.Contender("eager")])
    shape = workloads.BlockShape("basic", 64, 64, 1, 1, 64, 1, False, 56, 56)
    wls = [runner.Workload("model", "resnet50", 1, 224), runner.Workload("model", "resnet50", 1, 160),
           runner.Workload("block", shape.name, 1, 224, shape, {"resnet18": 4})]
    rows = [runner._base_row(w, torch.float32, cfg, cfg.contenders[0], w.ops(torch.float32, False)) for w in wls]
    assert [r["published_gmacs_per_image"] for r in rows] == [workloads.published_gmacs("resnet50"), None, None]
    assert rows[0]["published_gmacs_per_image"] == pytest.approx(rows[0]["gmacs_per_image"], abs=5e-4)
    res = json.loads((ROOT / "benchmarks" / "results" / "amd-epyc-2c_2026-11-27_cpu-quick.json").read_text())
    res["rows"] = [dict(r, status="skipped", note="test") for r in rows]
    report.validate(res)
    res["rows"][2]["published_gmacs_per_image"] = 1.0  # a block row has no published figure
    with pytest.raises(__import__("jsonschema").ValidationError, match="is not of type 'null'"):
        report.validate(res)


def test_block_ops_by_hand():
    """A basic block 64->64 at 56x56 and a bottleneck with downsample, counted by hand."""
    basic = workloads.BlockShape("basic", 64, 64, 1, 1, 64, 1, False, 56, 56)
    ops = roofline.block_ops(basic, 2, torch.float16)
    act = 2 * 64 * 56 * 56
    w = 64 * 64 * 9
    assert [op.flops for op in ops] == [2 * act * 64 * 9] * 2
    assert ops[0].bytes == (act + w + act) * 2 + 64 * 8
    assert ops[1].bytes == (act + w + act + act) * 2 + 64 * 8  # + residual read

    bott = workloads.BlockShape("bottleneck", 256, 128, 2, 1, 64, 1, True, 56, 56)
    ops = roofline.block_ops(bott, 1, torch.float32)
    x, y1, y2, out = 256 * 56 * 56, 128 * 56 * 56, 128 * 28 * 28, 512 * 28 * 28
    assert [op.flops // 2 for op in ops] == [y1 * 256, y2 * 128 * 9, out * 128 + out * 256]
    # tail: reads y2, w3, the block input for the downsample and its weight; writes out.
    assert ops[2].bytes == (y2 + 512 * 128 + out + x + 512 * 256) * 4 + 2 * 512 * 8

    train = roofline.block_ops(bott, 1, torch.float32, train=True)
    assert sum(op.flops for op in train) == 3 * sum(op.flops for op in ops)


def test_matmul_as_conv_is_the_matmul():
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    x, w = roofline.matmul_as_conv_operands(a, b)
    out = torch.nn.functional.conv2d(x, w)
    torch.testing.assert_close(out[0, :, :, 0].t(), a @ b)


def test_peaks_floor():
    p = roofline.Peaks(flops_per_s=1e12, bytes_per_s=1e11, matmul_n=1, copy_bytes=1, note="")
    ops = [roofline.Op("a", 2e12, 1e9), roofline.Op("b", 1e9, 1e11)]
    assert p.floor_s(ops) == pytest.approx(2.0 + 1.0)


# --------------------------------------------------------------------------- timing


def test_time_interleaved_round_robin_rotates_and_survives_errors():
    calls = []

    def make(name, fail_at=None):
        def fn(x):
            calls.append((name, x))
            if fail_at is not None and sum(1 for c in calls if c[0] == name) == fail_at:
                raise RuntimeError("boom")
        return fn

    fns = {"a": make("a"), "b": make("b"), "c": make("c", fail_at=3)}
    stats, errors = timing.time_interleaved(fns, ["x0", "x1"], torch.device("cpu"), repeats=4, warmup=1)
    assert set(stats) == {"a", "b"} and errors == {"c": "RuntimeError: boom"}
    assert all(s.n == 4 and 0 <= s.p20 <= s.median <= s.p80 for s in stats.values())
    timed = calls[3:]  # after one warm-up round of three
    # round 0: a b c(2nd call); round 1: b c(3rd call: fails) a; then a, b only, rotated
    assert timed[:3] == [("a", "x0"), ("b", "x0"), ("c", "x0")]
    assert timed[3:6] == [("b", "x1"), ("c", "x1"), ("a", "x1")]
    assert [c[1] for c in timed[6:]] == ["x0", "x0", "x1", "x1"]
    assert [c[0] for c in timed[6:]] == ["a", "b", "b", "a"]


def test_cpu_calls_start_only_when_no_thread_still_spins():
    """A contender whose thread pool keeps spinning after it returns (ONNX Runtime's, OpenMP's)
    must not run during the next contender's timed call."""
    import threading

    spinning = []

    def leaves_a_spinner(x):
        done = time.perf_counter() + 0.15

        def spin():  # busy, like a pool's worker waiting for work, then asleep
            while time.perf_counter() < done:
                pass
        t = threading.Thread(target=spin)
        t.start()
        spinning.append(t)

    starts_while_spinning = []

    def next_one(x):
        starts_while_spinning.append(any(t.is_alive() for t in spinning))

    stats, errors = timing.time_interleaved({"spins": leaves_a_spinner, "next": next_one}, [None],
                                            torch.device("cpu"), repeats=2, warmup=0)
    assert not errors and len(starts_while_spinning) == 2
    assert not any(starts_while_spinning)
    for t in spinning:
        t.join()
    assert 0 < timing.wait_until_idle() < 0.1  # nothing spins now: one quiet window


class _FakeEvent:
    """A CUDA event stand-in: ``record`` logs itself; elapsed time is the gap in record order (ms)."""

    def __init__(self, log):
        self.log = log

    def record(self):
        self.log.append("rec")
        self.t = len(self.log)

    def elapsed_time(self, end):
        return float(end.t - self.t)


@pytest.mark.parametrize("mode", timing.TIMING_MODES)
def test_gpu_rounds_order_of_operations(mode):
    """Each contender turn starts with a sync; pipelined turns are BURST calls with no sync between them,
    isolated turns sync after every flush; inputs rotate per call; a contender that raises is dropped."""
    log, calls, dead = [], [], set()

    def call(name, x):
        calls.append((name, x))
        log.append(f"call {name} {x}")
        if name == "c" and sum(1 for n, _ in calls if n == "c") == 2:
            dead.add("c")

    repeats = 7
    samples = timing._gpu_rounds(
        ["a", "b", "c"], ["x0", "x1", "x2"], repeats, mode, call, alive=lambda n: n not in dead,
        sync=lambda: log.append("sync"), flush=lambda: log.append("flush"), event=lambda: _FakeEvent(log),
    )
    assert set(samples) == {"a", "b"} and all(len(v) == repeats for v in samples.values())
    assert all(v == 2e-3 for vs in samples.values() for v in vs)  # rec, call, rec: 2 "ms" apart
    burst = timing.BURST if mode == "pipelined" else 1
    # The first turn: a's first `burst` calls, on inputs x0, x1, ... in order.
    first = log[: log.index("call b x0")]
    per_call = ["flush"] + (["sync"] if mode == "isolated" else []) + ["rec", "call", "rec"]
    expected = ["sync"] + [e if e != "call" else f"call a x{i % 3}" for i in range(burst) for e in per_call]
    assert first[: len(expected)] == expected
    assert [n for n, _ in calls].count("a") == repeats and [n for n, _ in calls].count("c") == 2
    assert log[-1] == "sync"
    with pytest.raises(ValueError, match="timing mode"):
        timing._gpu_rounds(["a"], ["x"], 1, "bogus", call, alive=lambda n: True, sync=lambda: None,
                           flush=lambda: None, event=lambda: _FakeEvent(log))


def test_stats_percentiles():
    s = timing.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.n, s.min) == (3.0, 5, 1.0) and s.p20 == pytest.approx(1.8) and s.p80 == pytest.approx(4.2)
    with pytest.raises(ValueError, match="samples"):
        timing.Stats.of([])


def test_contender_parsing():
    cpu = torch.device("cpu")
    names = [c.name for c in contenders.parse("fusedres,eager", cpu)]
    assert names == ["eager", "fusedres-torch", "fusedres-cpu"]  # printed order, fused: the CPU ones
    with pytest.raises(ValueError, match="--contenders: unknown contender 'eagr'"):
        contenders.parse("eagr", cpu)
    assert contenders.Contender("fusedres-triton").skip_reason(cpu, "infer") == \
        "backend 'triton' does not run on cpu tensors"
    assert contenders.Contender("tensorrt").skip_reason(cpu, "infer") is not None


class _Broken:
    """A contender that builds but whose forward raises: must become an error row only."""

    name = "broken"

    def skip_reason(self, device, mode):
        return None

    class _Module(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("kernel exploded")

    def build(self, ref, example, dtype):
        return self._Module()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_failing_contender_is_an_error_row(mode):
    shape = workloads.BlockShape("basic", 8, 16, 2, 1, 64, 1, True, 8, 8)
    w = runner.Workload("block", shape.name, 2, 32, shape, {"x": 1})
    cfg = runner.Config(device=torch.device("cpu"), dtypes=[torch.float32], mode=mode,
                        contenders=[contenders.Contender("eager"), _Broken(), contenders.Contender("fusedres-torch")],
                        repeats=2, warmup=0)
    peaks = roofline.Peaks(1e11, 1e10, 1, 1, "test")
    rows = {r["contender"]: r for r in runner.run_workload(w, torch.float32, cfg, peaks)}
    assert rows["broken"]["status"] == "error" and "kernel exploded" in rows["broken"]["error"]
    for name in ("eager", "fusedres-torch"):
        assert rows[name]["status"] == "ok" and rows[name]["time_ms"] > 0, rows[name]
    assert rows["eager"]["speedup_vs_eager"] == 1.0 and rows["eager"]["max_abs_err"] == 0.0
    assert rows["fusedres-torch"]["max_rel_err"] < 1e-4
    used = rows["fusedres-torch"]["backends_used"]
    if mode == "infer":
        assert used == ["torch"]
    else:  # train-mode BN: the block runs as a fusedres.training chain, whatever the backend
        assert used == ["train:torch"] and "chains ran" in rows["fusedres-torch"]["note"]


class _Off:
    """A contender whose output is the model's plus ``delta``: wrong, and fast."""

    def __init__(self, name, delta):
        self.name, self.delta = name, delta

    def skip_reason(self, device, mode):
        return None

    def build(self, ref, example, dtype):
        delta = self.delta

        class Off(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = ref

            def forward(self, x):
                return self.m(x) + delta

        return Off()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_wrong_contender_is_an_error_row_without_a_speedup(mode):
    """Outputs off by more than the dtype's gate (``runner.MAX_REL_ERR``) make an error row, not a
    timed one: a fast wrong contender reported "ok" with its speedup before."""
    shape = workloads.BlockShape("basic", 8, 16, 2, 1, 64, 1, True, 8, 8)
    w = runner.Workload("block", shape.name, 2, 32, shape, {"x": 1})
    cons = [contenders.Contender("eager"), _Off("off", 1.0), _Off("rounding", 1e-7)]
    cfg = runner.Config(device=torch.device("cpu"), dtypes=[torch.float32], mode=mode, contenders=cons,
                        repeats=2, warmup=0)
    rows = {r["contender"]: r for r in runner.run_workload(w, torch.float32, cfg, roofline.Peaks(1e11, 1e10, 1, 1, "test"))}
    off = rows["off"]
    assert off["status"] == "error" and off["error"].startswith("numerics:"), off
    assert off["max_rel_err"] > runner.MAX_REL_ERR[(mode, torch.float32)]
    assert off["time_ms"] is None and off["speedup_vs_eager"] is None
    assert rows["rounding"]["status"] == "ok" and rows["rounding"]["speedup_vs_eager"] > 0


def test_ort_contender_runs_the_exported_model():
    """ONNX Runtime's CPU session on the exported unconverted block: a row like any other."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    shape = workloads.BlockShape("basic", 8, 16, 2, 1, 64, 1, True, 8, 8)
    w = runner.Workload("block", shape.name, 2, 32, shape, {"x": 1})
    cfg = runner.Config(device=torch.device("cpu"), dtypes=[torch.float32], mode="infer",
                        contenders=[contenders.Contender("eager"), contenders.Contender("ort-cpu")],
                        repeats=2, warmup=0)
    peaks = roofline.Peaks(1e11, 1e10, 1, 1, "test")
    rows = {r["contender"]: r for r in runner.run_workload(w, torch.float32, cfg, peaks)}
    assert rows["ort-cpu"]["status"] == "ok" and rows["ort-cpu"]["max_rel_err"] < 1e-4, rows["ort-cpu"]
    assert contenders.Contender("ort-cpu").skip_reason(torch.device("cpu"), "train") == \
        "ONNX Runtime runs inference only"


def test_progress_reaches_its_total_when_a_workload_fails(monkeypatch):
    """A workload that fails before timing still advances the bar by its share."""
    shape = workloads.BlockShape("basic", 8, 16, 2, 1, 64, 1, True, 8, 8)
    wls = [runner.Workload("block", shape.name, b, 32, shape, {"x": 1}) for b in (1, 2)]
    cfg = runner.Config(device=torch.device("cpu"), dtypes=[torch.float32], mode="infer",
                        contenders=[contenders.Contender("eager")], repeats=3, warmup=0)
    peaks = {"float32": roofline.Peaks(1e11, 1e10, 1, 1, "test")}

    class Progress:
        total_n, done = None, 0

        def total(self, n):
            self.total_n = n

        def advance(self, n=1):
            self.done += n

        def status(self, text):
            pass

    real = runner.run_workload

    def flaky(w, *args, **kw):
        if w.batch == 1:
            raise RuntimeError("out of memory")
        return real(w, *args, **kw)

    monkeypatch.setattr(runner, "run_workload", flaky)
    prog = Progress()
    rows = [r for rs in runner.iter_rows(wls, cfg, peaks, prog) for r in rs]
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert prog.total_n == prog.done == 2 * 3


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real CPU run: resnet18's blocks and the whole model, batch 1, 32x32, 3 repeats."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--blocks", "resnet18", "--model", "resnet18", "--batch", "1", "--size", "32",
            "--device", "cpu", "--dtype", "float32", "--contenders", "eager,fusedres", "--repeats", "3",
            "--warmup", "1", "--threads", "1", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
            "--plot", str(out / "r.png"), "--summary", str(out / "r.txt"), "--results-dir", str(out / "results"), "--notes", "test run"]
    from fusedres.cli import main

    assert main(argv) == 0
    return out


def test_tiny_run_json_follows_schema(tiny_run):
    res = json.loads((tiny_run / "r.json").read_text())
    report.validate(res)
    assert res["device"]["type"] == "cpu" and res["notes"] == "test run" and not res["interrupted"]
    assert res["config"]["command"].startswith("fusedres bench --device cpu --mode infer")
    rows = res["rows"]
    names = {r["contender"] for r in rows}
    assert {"eager", "fusedres-torch"} <= names
    assert len({r["workload"] for r in rows}) == 8  # 7 distinct resnet18 blocks + the model
    expected_ok = {"eager", "fusedres-torch"} | ({"fusedres-cpu"} if "cpu" in fusedres.available_backends() else set())
    for r in rows:
        if r["contender"] in expected_ok:
            assert r["status"] == "ok", r
            assert r["max_rel_err"] < 1e-4
            assert r["img_per_s"] == pytest.approx(1e3 / r["time_ms"])
    model = [r for r in rows if r["kind"] == "model" and r["contender"] == "eager"][0]
    assert model["gmacs_per_image"] == pytest.approx(workloads.model_gmacs_per_image("resnet18", 32))
    assert model["flops"] == pytest.approx(2e9 * model["gmacs_per_image"])
    assert model["published_gmacs_per_image"] is None  # torchvision publishes 224x224 figures only


def test_tiny_run_csv_and_plot(tiny_run):
    lines = (tiny_run / "r.csv").read_text().splitlines()
    res = json.loads((tiny_run / "r.json").read_text())
    assert len(lines) == 1 + len(res["rows"])
    header = lines[0].split(",")
    for key in ("device_name", "versions_torch", "versions_fusedres", "git_commit", "date", "host_cpu",
                "workload", "contender", "time_ms", "roofline_pct"):
        assert key in header
    for png in (tiny_run / "r.png", *(tiny_run / "results").glob("*.png")):
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_csv_header_is_the_same_for_every_run(tmp_path):
    """Model-only and block runs, used by different models, give one header; used_by is one JSON column."""
    import csv

    results = ROOT / "benchmarks" / "results"
    tables = {}
    for name in ("amd-epyc-2c_2026-11-27_cpu-train", "amd-epyc-2c_2026-11-27_cpu-quick"):
        report.write_csv(json.loads((results / f"{name}.json").read_text()), tmp_path / f"{name}.csv")
        with open(tmp_path / f"{name}.csv", newline="") as f:
            tables[name] = list(csv.DictReader(f))
    train, quick = tables.values()
    assert list(train[0]) == list(quick[0]) == report.csv_columns()
    assert not [c for c in report.csv_columns() if c.startswith("used_by_")]
    block = next(r for r in quick if r["kind"] == "block")
    assert set(json.loads(block["used_by"])) <= {"resnet18", "resnet50"} and block["block_kind"] in ("basic", "bottleneck")
    assert train[0]["kind"] == "model" and train[0]["block_kind"] == "" and train[0]["used_by"] == ""


def test_tiny_run_summary(tiny_run):
    lines = (tiny_run / "r.txt").read_text().splitlines()
    assert lines[0].startswith("bench infer on ") and "8 workloads" in lines[0]
    assert len(lines) == 1 + 8
    assert lines[1].startswith("  resnet18 b1 float32: eager ") and "fusedres-torch " in lines[1]


def test_results_dir_naming(tiny_run):
    files = sorted(p.name for p in (tiny_run / "results").iterdir())
    res = json.loads((tiny_run / "r.json").read_text())
    stem = f"{res['device']['slug']}_{res['date'][:10]}_infer"
    assert files == [stem + ".json", stem + ".png"]


def _render_script():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _render(tmp_path, readme_text, results, capsys):
    script = _render_script()
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    rc = script.main(["--readme", str(readme), "--results", str(results)])
    return rc, capsys.readouterr().err, readme


def test_render_results_replaces_only_the_marked_section(tiny_run, tmp_path, capsys):
    text = f"# Title\n\nintro\n\n{report.MARK_BEGIN}\nstale\n{report.MARK_END}\n\nfooter\n"
    rc, err, readme = _render(tmp_path, text, tiny_run / "results", capsys)
    assert rc == 0, err
    new = readme.read_text()
    assert new.startswith("# Title\n\nintro\n\n" + report.MARK_BEGIN) and new.endswith(report.MARK_END + "\n\nfooter\n")
    assert "stale" not in new and "| workload | batch |" in new and "basic_64-64-s1_8x8" in new
    png = next((tiny_run / "results").glob("*.png"))
    assert f"]({Path(os.path.relpath(png, tmp_path)).as_posix()})" in new


def test_committed_results_follow_the_schema_and_readme_is_fresh(capsys):
    """Every committed `fusedres bench` JSON (partial runs included) validates against schema.json,
    and README.md's results section is what scripts/render_results.py makes of them (`--check`)."""
    checked = []
    results = ROOT / "benchmarks" / "results"
    for path in sorted(results.glob("*.json")) + sorted(results.glob("partial/*.json")):
        res = json.loads(path.read_text())
        if isinstance(res, dict) and res.get("schema") == report.SCHEMA_ID:
            report.validate(res)
            checked.append(path.name)
    assert len(checked) >= 3, checked
    assert _render_script().main(["--check"]) == 0, capsys.readouterr().err


H100_JSON = ROOT / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3_2026-11-27_gpu-quick.json"


def test_render_markdown_timing_of_runs_before_the_timing_key():
    """The committed H100 run predates ``config.timing``; its logs say it synchronised before every call."""
    res = json.loads(H100_JSON.read_text())
    assert "timing" not in res["config"] and "--timing" not in res["config"]["command"]
    isolated = "GPU timing: isolated (each call synchronised; recorded before --timing existed)."
    assert isolated in report.render_markdown([(res, None)])
    res["date"] = "2026-11-27T03:39:49+00:00"  # the first session's run: no per-call synchronisation yet
    md = report.render_markdown([(res, None)])
    assert "GPU timing: timing mode not recorded." in md and isolated not in md
    res["config"]["timing"] = "pipelined"
    assert "GPU timing: pipelined" in report.render_markdown([(res, None)])
    # A CPU run never gets a GPU timing sentence, with or without the key.
    cpu = json.loads((H100_JSON.parent / "amd-epyc-2c_2026-11-27_cpu-quick.json").read_text())
    assert "GPU timing" not in report.render_markdown([(cpu, None)])
    cpu["config"].pop("timing", None)
    assert "GPU timing" not in report.render_markdown([(cpu, None)])


def test_render_results_fails_without_markers(tiny_run, tmp_path, capsys):
    rc, err, readme = _render(tmp_path, "# Title\nno markers\n", tiny_run / "results", capsys)
    assert rc == 2
    assert "<!-- results:begin -->" in err and readme.read_text() == "# Title\nno markers\n"


@pytest.mark.parametrize("argv, msg", [
    (["--contenders", "bogus"], "unknown contender 'bogus'"),
    (["--blocks", "resnet9"], "model must be one of"),
    (["--dtype", "int8"], "--dtype must list"),
    (["--batch", "0"], "--batch must list positive integers"),
    (["--size", "16"], "--size must be at least 32"),
    (["--size", "0"], "--size must be at least 32"),  # 0 ran at the default 224
    (["--repeats", "0"], "--repeats must be >= 1"),  # ran with 20
    (["--repeats", "-1"], "--repeats must be >= 1"),  # every row an error, exit 0
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--time-budget", "-1"], "--time-budget must be a positive"),  # every row skipped, exit 0
    (["--batch", ""], "--batch is empty"),
    (["--contenders", " "], "--contenders is empty"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "meta"], "--device must be cpu, cuda or cuda:N"),
    (["--json", "/no/such/dir/out.json"], "its directory does not exist"),  # raised after the whole run
])
def test_cli_rejects_bad_arguments(argv, msg, capsys):
    from fusedres.cli import main

    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_cli_suites_resolve():
    p = __import__("argparse").ArgumentParser()
    bench_cli.add_arguments(p)
    a = bench_cli.resolve(p.parse_args(["--suite", "cpu-quick", "--device", "cpu", "--batch", "4"]))
    assert (a.batch, a.blocks, a.model, a.compile_on) == ("4", "resnet18,resnet50", "resnet50", "resnet50")
    wls = bench_cli.build_workloads(a)
    assert len(wls) == 7 + 8 + 1
    cfg = runner.Config(device=a.device, dtypes=[torch.float32], mode="infer",
                        contenders=contenders.parse(a.contenders, a.device), compile_on=[a.compile_on])
    assert wls[0].kind == "model" and all(w.kind == "block" for w in wls[1:])  # models first
    compile_ = contenders.Contender("compile")
    assert cfg.skip_note(compile_, wls[0]) is None
    assert cfg.skip_note(compile_, wls[1]) == "not in --compile-on"
    assert cfg.skip_note(contenders.Contender("eager"), wls[1]) is None
    # NAME/bBATCH globs pick one batch size
    cfg.compile_on = ["resnet50/b8"]
    assert cfg.skip_note(compile_, wls[0]) == "not in --compile-on"
    cfg.compile_on = ["resnet50/b4"]
    assert cfg.skip_note(compile_, wls[0]) is None


def test_compile_contenders_outside_compile_on_are_skipped_rows():
    """--compile-on leaves a compile contender out as a skipped row (never dropped), also when a time
    budget skips the workload; the README table and the summary count such rows instead of listing them."""
    shape = workloads.BlockShape("basic", 8, 8, 1, 1, 64, 1, False, 8, 8)
    w = runner.Workload("block", shape.name, 1, 32, shape, {"resnet18": 1})
    cfg = runner.Config(device=torch.device("cpu"), dtypes=[torch.float32], mode="infer",
                        contenders=[contenders.Contender("eager"), contenders.Contender("compile")],
                        compile_on=["resnet*"], repeats=2, warmup=0)
    peaks = roofline.Peaks(1e11, 1e10, 1, 1, "test")
    ran = runner.run_workload(w, torch.float32, cfg, peaks)
    cfg.time_budget_s = -1.0
    (budget,) = runner.iter_rows([w], cfg, {"float32": peaks})
    assert [(r["contender"], r["status"]) for r in ran + budget] == [("eager", "ok"), ("compile", "skipped")] + \
        [("eager", "skipped"), ("compile", "skipped")]
    assert ran[1]["note"] == budget[1]["note"] == "not in --compile-on" and "time budget" in budget[0]["note"]
    res = json.loads((ROOT / "benchmarks" / "results" / "amd-epyc-2c_2026-11-27_cpu-quick.json").read_text())
    res["rows"] = ran + budget
    report.validate(res)
    md = report.render_markdown([(res, None)])
    assert md.count(f"| {shape.name} |") == 1 and "| eager |" in md
    assert "1 more rows were not reached within the run's time budget" in md
    assert "2 torch.compile rows were not run: their workloads are not in --compile-on" in md
    lines = report.summary_lines(res)
    assert "(2 compile rows not in --compile-on)" in lines[0] and "compile" not in "".join(lines[1:])


def test_compile_on_workloads_run_right_after_the_models():
    """What --compile-on picks runs before the other blocks (a time budget cannot cut it); the rest keeps its order."""
    p = __import__("argparse").ArgumentParser()
    bench_cli.add_arguments(p)

    def names(*argv):
        a = bench_cli.resolve(p.parse_args(["--suite", "gpu-quick", "--device", "cpu", *argv]))
        return [f"{w.name}/b{w.batch}" for w in bench_cli.build_workloads(a)]

    plain = names("--compile-on", "nothing-matches")
    assert plain[:2] == ["resnet50/b256", "resnet50/b64"] and plain[2].startswith("basic_64-64")
    picked = "bottleneck_1024-256-s1_14x14/b256"
    got = names("--compile-on", picked)
    assert got[:3] == plain[:2] + [picked] and got[3:] == [n for n in plain[2:] if n != picked]
    suite = names()  # the suite's own --compile-on: two shapes at batch 256, in block order
    assert suite[2:4] == ["basic_128-128-s1_28x28/b256", picked] and sorted(suite) == sorted(plain)
    assert names("--compile-on", "resnet50")[:3] == plain[:3]  # only the models match: order unchanged


def test_pytest_benchmark_cases_run(tmp_path):
    """benchmarks/ (pytest-benchmark) on a tiny CPU config, timing disabled: cases collect, build and check out."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "--bench-device", "cpu",
           "--bench-size", "32", "--bench-batch", "1", "--bench-blocks", "resnet18", "--bench-models", "resnet18",
           "-k", "basic_512 or resnet18-fusedres-torch", "-q", "-p", "no:cacheprovider",
           f"--benchmark-storage=file://{tmp_path}"]  # not a .benchmarks/ in the checkout
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_block = 1 + len([b for b in ("cpu", "torch") if b in fusedres.available_backends()])
    assert f"{n_block + 1} passed" in proc.stdout, proc.stdout  # + the whole resnet18 on fusedres-torch


def test_git_state_outside_a_checkout(monkeypatch, tmp_path):
    """No git (a copied tree): the commit is $FUSEDRES_GIT_COMMIT when it is a hash, else "unknown"."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    monkeypatch.delenv("FUSEDRES_GIT_COMMIT", raising=False)
    assert report.git_state() == {"commit": "unknown", "dirty": None}
    monkeypatch.setenv("FUSEDRES_GIT_COMMIT", "a" * 40)
    assert report.git_state() == {"commit": "a" * 40, "dirty": None}
    monkeypatch.setenv("FUSEDRES_GIT_COMMIT", "not-a-hash")
    assert report.git_state()["commit"] == "unknown"


def test_git_state_prefers_the_given_commit(monkeypatch):
    """A copied tree may carry a stale .git: $FUSEDRES_GIT_COMMIT wins even inside a checkout."""
    monkeypatch.setenv("FUSEDRES_GIT_COMMIT", "ffc1a10c6d")
    assert report.git_state() == {"commit": "ffc1a10c6d", "dirty": None}


def test_render_results_leaves_out_other_tools_json(tiny_run, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    for f in (tiny_run / "results").iterdir():
        (results / f.name).write_bytes(f.read_bytes())
    (results / "triton_blocks.json").write_text('{"rows": []}')
    text = f"{report.MARK_BEGIN}\n{report.MARK_END}\n"
    rc, err, readme = _render(tmp_path, text, results, capsys)
    assert rc == 0 and "triton_blocks.json is not a `fusedres bench` result" in err
    assert "basic_64-64-s1_8x8" in readme.read_text()


def test_failed_peak_measurement_still_writes_the_json(tmp_path, monkeypatch, capsys):
    """measure_peaks raising (not an interrupt) fails the run loudly, with the error recorded in its JSON."""
    from fusedres.cli import main

    def boom(cfg, progress=None):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(runner, "measure_peaks", boom)
    out = tmp_path / "r.json"
    argv = ["bench", "--blocks", "none", "--model", "resnet18", "--batch", "1", "--size", "32", "--device", "cpu",
            "--contenders", "eager", "--json", str(out), "--csv", str(tmp_path / "r.csv")]
    assert main(argv) == 1
    assert "measuring the roofline peaks: RuntimeError: CUDA out of memory (simulated)" in capsys.readouterr().err
    res = json.loads(out.read_text())
    report.validate(res)
    assert res["error"].startswith("measuring the roofline peaks: RuntimeError") and res["rows"] == []
    assert res["interrupted"] is False and not (tmp_path / "r.csv").exists()
    assert "Run failed: measuring the roofline peaks" in report.render_markdown([(res, None)])


def test_sigterm_still_writes_the_results(tmp_path):
    """A run stopped by SIGTERM (a step timeout) prints and saves what it measured, marked interrupted."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "fusedres", "bench", "--blocks", "resnet50", "--model", "none", "--batch", "1",
           "--size", "32", "--device", "cpu", "--contenders", "eager", "--repeats", "2", "--warmup", "0",
           "--threads", "1", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the file appears after the first workload
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    res = json.loads(out.read_text())
    report.validate(res)
    if proc.returncode == 0:  # it finished before the signal arrived: nothing to check but the file
        assert res["interrupted"] is False
    else:
        assert proc.returncode == 130 and res["interrupted"] is True, stdout
        assert 1 <= len(res["rows"]) < 8 and "fusedres bench" in stdout


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cudnn_fused_folding_matches_the_model(name):
    """The cudnn-fused contender's folded modules compute the model (CPU fallback of the same
    folding; the cuDNN ops themselves run on a GPU only)."""
    import torchvision

    from fusedres.bench.cudnn_fused import FoldedBlock, cudnn_fused
    from helpers import randomize

    torch.manual_seed(0)
    ref = randomize(torchvision.models.get_model(name, weights=None)).eval()
    folded = cudnn_fused(ref)
    assert sum(isinstance(m, FoldedBlock) for m in folded.modules()) in (8, 16)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref(x), rtol=1e-4, atol=1e-4)
    assert contenders.Contender("cudnn-fused").skip_reason(torch.device("cpu"), "infer") is not None


def test_graph_replay_timing_needs_cuda():
    with pytest.raises(ValueError, match="CUDA device"):
        timing.time_graph_replay(lambda x: x, torch.zeros(1), torch.device("cpu"))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cpu_vs_ort_matches_every_conv(name, tmp_path):
    """benchmarks/cpu_vs_ort.py maps every ONNX Runtime Conv node back to its torchvision conv and
    times every oneDNN call of the converted model (toy size, one round: the mapping and the
    bookkeeping, not the numbers)."""
    pytest.importorskip("onnxruntime")
    import torchvision

    spec = importlib.util.spec_from_file_location("cpu_vs_ort", ROOT / "benchmarks" / "cpu_vs_ort.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.measure(name, 1, rounds=1, warmup=1, tmp=str(tmp_path / "ort"), size=32)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in getattr(torchvision.models, name)().modules())
    assert sum(g["convs"] for g in r["per_shape"]) == n_convs
    assert all(g["fusedres_ms"] > 0 and g["ort_ms"] > 0 for g in r["per_shape"])
    assert r["fusedres"]["forward_ms"] > 0 and r["ort"]["run_ms"] > 0 and r["fusedres"]["not_conv_ms"] > 0


def test_tool_result_is_provenanced_and_skipped_by_the_renderer(tmp_path):
    """A development tool's JSON (benchmarks/cpu_vs_ort.py, onednn_direct.py) carries the run's
    device, versions, commit and load, and its own schema, so render_results leaves it out."""
    result = report.tool_result("fusedres-test-tool/1", {"rounds": 3})
    assert result["schema"] == "fusedres-test-tool/1" and result["config"]["rounds"] == 3
    assert "command" in result["config"] and result["versions"]["torch"] == torch.__version__
    assert result["git"] is not None and result["host"]["loadavg_end"] is None
    result["rows"] = [1]
    path = tmp_path / "tool.json"
    report.finish_tool_result(result, path)
    back = json.loads(path.read_text())
    assert back["rows"] == [1] and back["host"]["loadavg_end"] is not None  # Linux has a load average
    skipped = []
    assert report.latest_results(tmp_path, skipped) == [] and skipped == [path]

"""The GPU run's script, dry: every step of scripts/device_check.sh on the CPU at toy sizes.

The script only ever runs for real on a lent GPU machine, a few times a month; this keeps its
commands, flags, suites and file names working in between (a step that fails here would have
failed there, minutes into a scarce GPU budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fusedres.bench import report

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("build", "smoke-triton", "smoke-cuda", "smoke-sm90a", "smoke-tma", "smoke-hoisted", "smoke-splitk",
         "bench-blocks", "bench-models", "bench-train", "bench-compile", "bench-max", "bench-tma", "bench-hoisted",
         "bench-splitk", "bench-sm90a", "bench-persistent", "check",
         "check-train", "tests-full", "train-memory")


def test_device_check_dry_run(tmp_path):
    # The limits are the GPU's; here the steps run Triton's interpreter on 2 busy cores (smoke-splitk
    # took 42 of its 45 s in a CI run next to other work), so the dry run doubles them: it checks
    # that every step runs, not how fast.
    env = {"DEVICE_CHECK_SCALE": "2", **os.environ, "DEVICE_CHECK_DRY_RUN": "1", "PYTHON": sys.executable,
           "TRITON_INTERPRET": "1"}
    env.pop("DEVICE_CHECK_STEPS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    status = {line.split()[0]: line.split()[1] for line in summary if line.strip()}
    assert tuple(status) == STEPS, summary
    assert all(s == "ok" for s in status.values()), "\n".join(summary)
    results = tmp_path / "results"
    for suite in ("gpu-blocks", "gpu-models", "gpu-train", "gpu-compile", "gpu-max"):
        (path,) = results.glob(f"*_{suite}.json")
        res = json.loads(path.read_text())
        report.validate(res)
        assert any(r["status"] == "ok" for r in res["rows"]), suite
    for name in ("check.json", "check_train.json", "train_memory.json", "gpu-blocks-tma.json",
                 "gpu-blocks-persistent.json", "gpu-blocks-hoisted.json", "gpu-models-splitk.json",
                 "gpu-blocks-sm90a.json"):
        assert json.loads((results / name).read_text())
    assert "DRY RUN" in (tmp_path / "env.txt").read_text()

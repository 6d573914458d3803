"""Ahead-of-time compilation of every Triton kernel variant for sm_80 and sm_90 (no GPU needed).

Runs ``python -m fusedres.backends.triton.aot`` in a subprocess without TRITON_INTERPRET
(in an interpreting process the JIT hands out interpreted functions).  The tool fails on
compile errors, register spills (``ptxas -v``) or shared memory above the per-block limit,
and prints a registers/spills/shared-memory report, echoed here (see it with ``-s`` or
``-rP``).  About 150 kernels (28 of them the train-mode statistics/prologue variants, 44 the
eval BN-statistics epilogue); two to three minutes on 2 cores with a cold Triton cache.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.aot
def test_aot_compile_sm80_sm90_no_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    report = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fusedres.backends.triton.aot", "--arch", "80", "--arch", "90",
         "--json", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0, f"aot compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert report.exists()
    import json

    rows = json.loads(report.read_text())
    assert {r["arch"] for r in rows} == {80, 90}
    assert all(r["ok"] and r["regs"] > 0 for r in rows)

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
    # The main loop of every tensor-core kernel is found in its SASS (issue pressure per MMA).
    tc = [r for r in rows if "ieee" not in r["variant"] and "splitk-epilogue" not in r["variant"]]
    assert all(r["mainloop_mma"] and r["mainloop_instrs"] > r["mainloop_mma"] for r in tc), \
        [r["variant"] for r in tc if not r["mainloop_mma"]]
    assert "main-loop instructions per MMA" in proc.stdout
    # The opt-in split-K pair (launch.SPLIT_K_ENABLED, sm_90+) is compiled: partials and epilogue.
    names = {r["variant"] for r in rows if r["arch"] == 90}
    assert {"bf16-k3@splitk", "bf16-k3@hoist@splitk", "fp32-ieee-k3@splitk",
            "bf16-splitk-epilogue+res+relu+bn", "fp32-splitk-epilogue+affine", "bf16-splitk-epilogue+res+relu+bn@1px",
            "bf16-k3+ds@splitk", "bf16-splitk-epilogue+ds+relu+bn"} <= names
    # So are the opt-in TMA 1x1 kernel (launch.TMA_ENABLED) and its persistent form.
    assert {"bf16-tma1x1+res+relu+bn", "bf16-tma1x1+res+relu+bn@persist", "bf16-tma1x1+affine@persist"} <= names


def test_mainloop_finds_the_innermost_mma_loop():
    from fusedres.backends.triton.aot import mainloop

    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   IMAD R2, R3, R4, R5 ;",               # outer loop head
        "        /*0020*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR4][R8.64] ;",  # main loop head
        "        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;",
        "        /*0040*/                   IADD3 R6, R6, 0x80, RZ ;",
        "        /*0050*/               @P0 BRA 0x20 ;",
        "        /*0060*/               @P1 BRA 0x10 ;",
        "        /*0070*/                   EXIT ;",
    ])
    assert mainloop(sass) == (4, 1)
    assert mainloop("        /*0000*/                   EXIT ;") is None

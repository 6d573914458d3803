"""torch.compile of converted models, and the ``fusedres check`` command line."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from torchvision.models import resnet as tv

import fusedres
from helpers import randomize


def test_compile_fullgraph_eval_block():
    ds = torch.nn.Sequential(tv.conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16))
    ref = randomize(tv.BasicBlock(8, 16, 2, ds)).eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_compile_of_a_named_cpu_backend_model_says_why():
    """A model converted with ``backend="cpu"`` under torch.compile: the named backend declines
    compiled calls, so it raises its own error; Dynamo runs the trunk's frame eagerly after that
    and its callees compiled, which once made the trunk's plan key ``None`` and a ``TypeError``."""
    model = randomize(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    fused = fusedres.convert(model, backend="cpu")
    compiled = torch.compile(fused, backend="aot_eager")
    with torch.no_grad(), pytest.raises(fusedres.BackendUnavailableError, match="torch.compile"):
        compiled(torch.randn(2, 3, 32, 32))


def test_check_cli_json(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fusedres", "check", "--model", "resnet18", "--batch", "1", "--size", "64",
         "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["numerics_ok"] is True and res["backends_used"] == ["cpu"]
    assert res["rel_err_fused_vs_fp64"] <= res["rel_err_budget"]
    assert res["time_fused_ms"] > 0 and res["time_reference_ms"] > 0
    assert "speedup" in proc.stdout


def test_check_cli_fails_on_bad_numerics(monkeypatch):
    """A wrong kernel must make `check` fail: corrupt the cpu backend's output and expect rc 1."""
    from fusedres.backends import cpu
    from fusedres.cli import main

    real = cpu.conv_bn_act
    monkeypatch.setattr(cpu, "conv_bn_act", lambda *a: real(*a) * 1.01)
    rc = main(["check", "--model", "resnet18", "--batch", "1", "--size", "32", "--repeats", "1"])
    assert rc == 1


def test_check_fails_when_it_cannot_judge(capsys, monkeypatch, tmp_path):
    """``check`` passes only what it verified: a model with nothing to fuse is refused, one whose
    converted blocks all fall back to torchvision's forward fails (it compared torchvision with
    itself and said "numerics OK"), and a reference whose own output is not finite (its error
    budget was infinite, so anything passed) fails with the reason; bad arguments get one line."""
    from fusedres import check
    from fusedres.check import rel_err, run_check
    from fusedres.cli import main

    with pytest.raises(ValueError, match="no torchvision or timm ResNet block"):
        run_check(model="squeezenet1_0", batch=1, size=32, device="cpu", repeats=1)

    def group_norm_resnet(name, seed=0):  # converted, but every block and the stem fall back
        torch.manual_seed(seed)
        return torchvision.models.resnet18(norm_layer=lambda c: torch.nn.GroupNorm(2, c)).eval()

    with monkeypatch.context() as m:
        m.setattr(check, "build_reference", group_norm_resnet)
        with pytest.warns(RuntimeWarning, match="GroupNorm"):
            res = run_check(model="resnet18", batch=1, size=32, device="cpu", repeats=1)
    assert res["backends_used"] == ["reference"]
    assert not res["numerics_ok"] and "no fused op ran" in res["verdict"]
    ref = torch.tensor([1.0, float("inf"), float("nan"), 2.0])
    assert rel_err(ref.clone(), ref) == 0.0
    for wrong in ([1.0, 5.0, float("nan"), 2.0], [1.0, float("inf"), 0.0, 2.0], [1.0, -float("inf"), float("nan"), 2.0]):
        assert rel_err(torch.tensor(wrong), ref) == float("inf")
    assert rel_err(torch.tensor([1.0, float("inf"), float("nan"), 2.2]), ref) == pytest.approx(0.2 / 5 ** 0.5)
    base = ["check", "--size", "32", "--batch", "1", "--repeats", "1"]
    for argv in (["--batch", "0"], ["--repeats", "0"]):  # argparse's own exit
        with pytest.raises(SystemExit) as exit_:
            main(base + argv)
        assert exit_.value.code == 2
    bad = [["--model", "nosuchmodel"], ["--model", "squeezenet1_0"], ["--device", "tpu"], ["--device", "cuda:abc"],
           ["--device", "meta"], ["--json", str(tmp_path / "no" / "such" / "dir.json")]]
    if importlib.util.find_spec("timm") is not None:
        bad.append(["--model", "timm/nosuchmodel"])
    for argv in bad + ([] if torch.cuda.is_available() else [["--device", "cuda"]]):
        assert main(base + argv) == 2, argv
    assert "Traceback" not in capsys.readouterr().err

def test_check_cli_train_json(tmp_path):
    """``fusedres check --mode train``: one training step, gradients and running statistics too."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fusedres", "check", "--mode", "train", "--model", "resnet18", "--batch", "2",
         "--size", "64", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["mode"] == "train" and res["numerics_ok"] is True and res["backends_used"] == ["train:torch"]
    assert res["fp64_rel_err"] <= 1e-9
    assert res["date"] and res["git"]["commit"] and res["versions"]["fusedres"] and res["host"]["logical_cores"]
    for key in ("grads", "buffers"):
        assert res[key]["rel_err_fused"] <= res[key]["budget"], res[key]


def test_check_train_fails_on_a_wrong_backward(monkeypatch):
    """A wrong BN backward must fail the training check (its float64 part catches any error)."""
    from fusedres.cli import main
    from fusedres.training import ops

    real = ops.bn_backward

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        return out if out is None else (out[0] * 1.001, *out[1:])

    monkeypatch.setattr(ops, "bn_backward", wrong)
    rc = main(["check", "--mode", "train", "--model", "resnet18", "--batch", "2", "--size", "32", "--repeats", "1"])
    assert rc == 1

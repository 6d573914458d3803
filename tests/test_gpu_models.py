"""Converted models on a CUDA GPU: every fused backend against torchvision (needs a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fusedres
from helpers import assert_within_budget, randomize

pytestmark = pytest.mark.cuda

GPU_BACKENDS = [b for b in ("triton", "cuda") if fusedres.backends.is_available(b)]


def _model(name):
    torch.manual_seed(0)
    return randomize(torchvision.models.get_model(name, weights=None)).eval().cuda()


@pytest.mark.parametrize("backend", GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no GPU backend"))])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_model_matches_torchvision(backend, name, dtype):
    if backend == "cuda" and name.startswith("resnext"):
        pytest.skip("cuda backend: grouped convolution (groups > 1) is not implemented")
    ref = _model(name)
    truth_model = copy.deepcopy(ref).double()
    ref = ref.to(dtype)
    fused = fusedres.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(4, 3, 96, 96, device="cuda")
    with torch.inference_mode(), fusedres.backends.record() as used:
        out = fused(x.to(dtype).contiguous(memory_format=torch.channels_last))
    with torch.inference_mode():
        truth = truth_model(x.double())
        eager = ref(x.to(dtype))
    assert used == {backend}
    assert_within_budget(out, eager, truth, dtype, what=f"{name}/{backend}")


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_auto(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    ref = _model("resnet18")
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        truth = copy.deepcopy(ref).double()(x.double())
        assert_within_budget(fused(x), ref(x), truth, torch.float32)


def test_compile_fullgraph_converted_resnet18():
    ref = _model("resnet18").to(torch.bfloat16)
    fused = fusedres.convert(copy.deepcopy(ref))
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        truth = copy.deepcopy(ref).double()(x.double())
        assert_within_budget(compiled(x), ref(x), truth, torch.bfloat16)


def test_cuda_graph_capture_converted_resnet18():
    ref = _model("resnet18").to(torch.bfloat16)
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (autotuning, weight caches) outside the capture
                fused(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused(x)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, fused(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no GPU backend"))])
def test_nan_pixel_gives_nan_logits(backend):
    """A NaN input pixel reaches the logits, as in torchvision (the CUTLASS epilogue's ReLU is
    max.NaN; the Triton epilogue propagates NaN explicitly)."""
    ref = _model("resnet18").to(torch.bfloat16)
    fused = fusedres.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    x[0, 1, 20, 20] = float("nan")
    with torch.inference_mode():
        want, got = ref(x), fused(x.contiguous(memory_format=torch.channels_last))
    assert want[0].isnan().all() and not want[1].isnan().any()
    assert got[0].isnan().all() and not got[1].isnan().any()


@pytest.mark.parametrize("backend", GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no GPU backend"))])
def test_autocast_fp32_model(backend):
    """An fp32 model under bf16 autocast runs the bf16 kernels of the named backend, as
    torchvision's convs run bf16 under autocast, and the cast weights are cached."""
    ref = _model("resnet18")
    fused = fusedres.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        truth = copy.deepcopy(ref).double()(x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16), fusedres.backends.record() as used:
            eager, out = ref(x), fused(x)
            out = fused(x)
    assert used == {backend} and out.dtype == eager.dtype == torch.bfloat16
    assert_within_budget(out, eager, truth, torch.bfloat16)


@pytest.mark.parametrize("backend", GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no GPU backend"))])
def test_cuda_graphs_replay_recapture_and_weight_updates(backend):
    ref = _model("resnet18").to(torch.bfloat16)
    fused = fusedres.convert(copy.deepcopy(ref), backend=backend)
    run = fusedres.cuda_graphs(fused)
    with torch.inference_mode():
        for shape in ((4, 3, 64, 64), (2, 3, 96, 96), (4, 3, 64, 64)):
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(run(x), fused(x), rtol=0, atol=0)
        assert len(run._graphs) == 2
        with torch.no_grad():
            for m in (ref, fused):
                m.layer2[0].conv1.weight.mul_(-1)  # in place: the graphs must not keep the old weights
        truth = copy.deepcopy(ref).double()(x.double())
        out = run(x)
        assert_within_budget(out, ref(x), truth, torch.bfloat16)


def test_compile_reduce_overhead_no_recompiles():
    import torch._dynamo.utils as dyn

    ref = _model("resnet18").to(torch.bfloat16)
    fused = fusedres.convert(copy.deepcopy(ref))
    torch._dynamo.reset()
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        outs = [compiled(x).clone() for _ in range(4)]
        truth = copy.deepcopy(ref).double()(x.double())
        assert_within_budget(outs[-1], ref(x), truth, torch.bfloat16)
    assert dyn.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no GPU backend"))])
@pytest.mark.parametrize("case", ["fp16-model-fp32-bn", "fp16-model", "bf16-autocast"])
def test_plan_bn_dtype_checks_keep_common_setups_fused(backend, case):
    """The plan's BatchNorm dtype/device check (patterns.input_reason) sends nothing of the usual
    GPU setups to the reference: a .half() model with fp32 BNs, a plain .half() model, an fp32
    model under bf16 autocast all run the fused backend."""
    ref = _model("resnet18")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    if case != "bf16-autocast":
        ref = ref.half()
        x = x.half()
        if case == "fp16-model-fp32-bn":
            for m in ref.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.float()
    fused = fusedres.convert(copy.deepcopy(ref), backend=backend)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=case == "bf16-autocast")
    with torch.inference_mode(), amp, fusedres.backends.record() as used:
        out = fused(x)
    with torch.inference_mode(), amp:
        want = ref(x)
    assert used == {backend}
    torch.testing.assert_close(out.float(), want.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bn_left_on_cpu_raises_like_torchvision(train):
    """A BatchNorm left on the CPU under a CUDA model: torch raises, and so does the converted
    model, the same error (also after plans were made)."""
    ref = _model("resnet18").train(train)
    fused = fusedres.convert(copy.deepcopy(ref)).train(train)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        ref(x), fused(x)
    errors = []
    for m in (ref, fused):
        m.layer1[0].bn2.cpu()
        with pytest.raises(RuntimeError) as info, torch.no_grad():
            m(x)
        errors.append(str(info.value))
    assert errors[0] == errors[1]

"""CPU-side checks of the opt-in sm_90a kernels (csrc/cuda/fprop_sm90.cuh): compiled here as setup.py
compiles them for FUSEDRES_CUDA_ARCHS=90a, their SASS read with cuobjdump and their host-side checks
run, so no GPU (and no built fusedres._C) is needed.  Their numerics need a GPU: the cuda-marked tests
of test_cuda_ext.py with FUSEDRES_CUDA_SM90A=require (scripts/device_check.sh, smoke-sm90a)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess

import pytest
import torch

from fusedres.backends.cuda import ALIGNMENT


def _nvcc_and_cutlass():
    """(nvcc, CUTLASS include dir, tools/util include dir, cuobjdump), or a pytest skip."""
    import shutil

    import triton

    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc")
    spec = importlib.util.find_spec("cutlass_library")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if nvcc is None or spec is None or not os.path.exists(cuobjdump):
        pytest.skip("needs nvcc, the nvidia-cutlass headers and Triton's cuobjdump")
    source = os.path.join(os.path.dirname(spec.origin), "source")
    return nvcc, os.path.join(source, "include"), os.path.join(source, "tools", "util", "include"), cuobjdump


@pytest.fixture(scope="module")
def sm90a_objects(tmp_path_factory):
    """The sm_90a kernels (csrc/cuda/fprop_sm90_{bf16,fp16}.cu, opt-in) compiled as setup.py
    compiles them for FUSEDRES_CUDA_ARCHS=90a, both at once (about a minute and 3.5 GB each on
    2 cores): ``(dir, {dtype: ptxas log}, nvcc, cuobjdump)``."""
    nvcc, cutlass, util, cuobjdump = _nvcc_and_cutlass()
    out = tmp_path_factory.mktemp("sm90a")
    jobs = {}
    for dtype in ("bf16", "fp16"):
        cmd = [nvcc, "-std=c++20", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xptxas=-v",
               "-gencode=arch=compute_90a,code=sm_90a", "-I", _CSRC, "-I", cutlass, "-I", util, "-c",
               os.path.join(_CSRC, f"fprop_sm90_{dtype}.cu"), "-o", str(out / f"{dtype}.o")]
        jobs[dtype] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {}
    for dtype, job in jobs.items():
        logs[dtype] = job.communicate(timeout=900)[0]
        assert job.returncode == 0, logs[dtype][-3000:]
    return out, logs, nvcc, cuobjdump


_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc", "cuda")


def test_sm90a_kernels_are_wgmma_and_tma_with_no_spills(sm90a_objects):
    """Every sm_90a kernel's SASS multiplies with wgmma (HGMMA), loads its operands with TMA
    im2col (UTMALDG...IM2COL) and stores with TMA, has none of the sm_80 design (HMMA, LDGSTS),
    keeps NaN in the ReLU, and ptxas reports no spills."""
    out, logs, _, cuobjdump = sm90a_objects
    for dtype, log in logs.items():
        reports = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert len(reports) == 2, log[-3000:]  # the ReLU and the identity epilogue
        assert all(a == "0" and b == "0" for a, b in reports), reports
        sass = subprocess.run([cuobjdump, "-sass", str(out / f"{dtype}.o")], capture_output=True, text=True,
                              timeout=300).stdout
        kernels = re.split(r"\n\s*Function : ", sass)[1:]
        assert len(kernels) == 2, f"{dtype}: {len(kernels)} kernels in the SASS"
        for body in kernels:
            name = body.split("\n", 1)[0]
            assert "HGMMA" in body, f"{dtype} {name[:80]}: no wgmma"
            assert re.search(r"UTMALDG\.\w+\.IM2COL", body), f"{dtype} {name[:80]}: no TMA im2col load"
            assert "UTMASTG" in body, f"{dtype} {name[:80]}: no TMA store"
            assert not re.search(r"\bHMMA\b|\bLDGSTS\b", body), f"{dtype} {name[:80]}: sm_80 instructions"
            # The ReLU (CUTLASS's ReLu: max.NaN.f32) is compiled into the fp32 -> 16-bit
            # conversion, F2FP.RELU (PTX cvt .relu: negative -> 0, NaN stays NaN), or kept as a
            # NaN-propagating FMNMX.NAN; a plain max would turn NaN into 0.
            relu = "ReLu" in name
            mnmx = re.findall(r"\bFMNMX(?:\.[A-Z0-9]+)*", body)
            assert all(".NAN" in op for op in mnmx), (name[:80], sorted(set(mnmx)))
            fused = re.findall(r"\bF2FP(?:\.[A-Z0-9_]+)*\.RELU\b|\bF2FP\.RELU(?:\.[A-Z0-9_]+)*", body)
            assert bool(mnmx or fused) == relu, f"{dtype} {name[:80]}: ReLU {'missing' if relu else 'unexpected'}"


def _resnet_convs(batch):
    """Every distinct ungrouped conv of torchvision's ResNet-18/34/50/101 and Wide-ResNet-50 at
    224x224 as the ``cuda`` backend runs it (input channels padded to the alignment), as
    ``N H W C K R S pad_h pad_w stride_h stride_w dil_h dil_w P Q`` lines."""
    import torchvision

    shapes = set()
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2"):
        model = getattr(torchvision.models, name)().eval()
        hooks = []

        def record(conv, args, out):
            if conv.groups == 1:
                c = -(-conv.in_channels // ALIGNMENT) * ALIGNMENT
                shapes.add((batch, *args[0].shape[2:], c, conv.out_channels, *conv.kernel_size, *conv.padding,
                            *conv.stride, *conv.dilation, *out.shape[2:]))

        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                hooks.append(m.register_forward_hook(record))
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
    return sorted(shapes)


def test_sm90a_kernels_take_every_resnet_conv(sm90a_objects, tmp_path):
    """CUTLASS's host-side can_implement (TMA alignment and extents) accepts every ResNet conv
    shape for all four sm_90a kernels, at batch 1 and 256: on an H100/H200 with the kernels
    opted in, none of them falls back to the CUTLASS 2.x kernel.  Runs without a GPU (the checks
    make no CUDA call); the driver is tests/cuda/sm90_can_implement.cu.  A problem the kernels
    cannot take (3 input channels, unpadded) is refused."""
    out, _, nvcc, _ = sm90a_objects
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "sm90_can_implement.cu")
    exe = tmp_path / "can_implement"
    build = subprocess.run([nvcc, "-std=c++20", "-O2", "-I", _CSRC, driver, str(out / "bf16.o"), str(out / "fp16.o"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    shapes = _resnet_convs(1) + _resnet_convs(256)
    refused = (1, 56, 56, 3, 64, 1, 1, 0, 0, 1, 1, 1, 1, 56, 56)
    lines = "\n".join(" ".join(map(str, s)) for s in [*shapes, refused]) + "\n"
    run = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    verdicts = run.stdout.strip().split("\n")
    assert len(verdicts) == len(shapes) + 1
    bad = [(s, v) for s, v in zip(shapes, verdicts) if v != "ok | ok | ok | ok"]
    assert not bad, bad[:5]
    assert verdicts[-1].startswith("can_implement:"), verdicts[-1]
    assert len(shapes) > 40  # the walk found the models' convs

"""pytest-benchmark cases for fusedres: run on demand, never in CI's ``pytest tests``.

Options (after ``pytest benchmarks``): ``--bench-device``, ``--bench-dtype``, ``--bench-batch``,
``--bench-size``, ``--bench-blocks`` (models whose distinct block shapes to run),
``--bench-models`` (whole models), ``--bench-channels-last``.  See benchmarks/README.md.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fusedres
from fusedres.bench import runner, workloads
from fusedres.bench.contenders import Contender

# Fused backends that compute on each device type.
_FUSED_FOR = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


def pytest_addoption(parser):
    g = parser.getgroup("fusedres benchmarks")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    g.addoption("--bench-dtype", default=None, choices=sorted(runner.DTYPES),
                help="default: float32 on cpu, bfloat16 on cuda")
    g.addoption("--bench-batch", type=int, default=None, help="default: 8 on cpu, 64 on cuda")
    g.addoption("--bench-size", type=int, default=224, help="image side (block shapes follow)")
    g.addoption("--bench-blocks", default="resnet18,resnet50", help="models whose distinct block shapes to run")
    g.addoption("--bench-models", default="resnet50", help="whole models to run ('none' for none)")
    g.addoption("--bench-channels-last", action="store_true", help="channels_last model and inputs")


class Setup:
    """The resolved options of this benchmark session."""

    def __init__(self, config):
        self.device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        self.dtype = runner.DTYPES[config.getoption("--bench-dtype") or ("bfloat16" if cuda else "float32")]
        self.batch = config.getoption("--bench-batch") or (64 if cuda else 8)
        self.size = config.getoption("--bench-size")
        self.channels_last = config.getoption("--bench-channels-last")
        self.blocks = [m for m in config.getoption("--bench-blocks").split(",") if m and m != "none"]
        self.models = [m for m in config.getoption("--bench-models").split(",") if m and m != "none"]
        avail = fusedres.available_backends()
        self.contenders = ["eager"] + [f"fusedres-{b}" for b in _FUSED_FOR[self.device.type] if b in avail]

    def workloads(self, kind: str) -> list[runner.Workload]:
        if kind == "block":
            return [runner.Workload("block", s.name, self.batch, self.size, s, u)
                    for s, u in workloads.distinct_blocks(self.blocks, self.size).items()]
        return [runner.Workload("model", m, self.batch, self.size) for m in self.models]


def pytest_generate_tests(metafunc):
    if "workload" in metafunc.fixturenames:
        setup = Setup(metafunc.config)
        kind = "model" if "models" in metafunc.module.__name__ else "block"
        cases = list(itertools.product(setup.workloads(kind), setup.contenders))
        metafunc.parametrize("workload,contender", cases, ids=[f"{w.name}-{c}" for w, c in cases])


@pytest.fixture(scope="session")
def setup(request):
    return Setup(request.config)


@pytest.fixture
def run_case(benchmark, setup):
    """``run_case(workload, contender)``: benchmark one contender on one workload."""
    return lambda workload, contender: _run_case(benchmark, setup, workload, contender)


def _run_case(benchmark, setup: Setup, workload: runner.Workload, contender: str) -> None:
    """Check the contender's output against eager once, then let pytest-benchmark time it."""
    dev, dt = setup.device, setup.dtype
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    ref = workload.build_reference(seed=0).to(device=dev, dtype=dt, memory_format=fmt).eval()
    model = Contender(contender).build(ref, None, dt)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(workload.input_shape, generator=g).to(device=dev, dtype=dt, memory_format=fmt)
              for _ in range(4)]
    with torch.inference_mode():
        expected, got = ref(inputs[0]), model(inputs[0])
        tol = 1e-4 if dt == torch.float32 else 3e-2
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=tol * scale)
        ops = workload.ops(dt, train=False)
        benchmark.group = f"{workload.name} b{workload.batch} {str(dt).removeprefix('torch.')}"
        benchmark.extra_info.update(
            workload=workload.name, kind=workload.kind, contender=contender, batch=workload.batch,
            dtype=str(dt), device=str(dev), channels_last=setup.channels_last,
            flops=sum(o.flops for o in ops), min_bytes=sum(o.bytes for o in ops),
        )
        it = itertools.cycle(inputs)  # rotate inputs so a cached one does not flatter

        def call():
            model(next(it))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        benchmark(call)

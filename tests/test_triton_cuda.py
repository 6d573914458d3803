"""GPU checks of the ``triton`` backend (marker ``cuda``; skipped without a GPU).

Real ResNet-18/50 block shapes in every dtype and both memory formats against the
float64 torch reference, every candidate tile, TF32, an over-2**31-element tensor,
opcheck on CUDA, ``torch.compile(fullgraph=True)`` of a converted resnet18 and CUDA-graph
capture/replay of a converted block.  Shapes use small batches: correctness, not speed
(that is benchmarks/triton_blocks.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

import fusedres
from fusedres import backends

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytest.importorskip("triton")
from fusedres.backends.triton import launch as tl_launch  # noqa: E402

DEV = "cuda"
REL_BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}


@pytest.fixture(autouse=True)
def _ieee_fp32_untuned(monkeypatch):
    """IEEE fp32 unless a test opts into TF32; the untuned default tile keeps the run short
    (the tile sweep and the autotuner have their own tests)."""
    monkeypatch.setenv("FUSEDRES_TRITON_AUTOTUNE", "0")
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _rand(*shape, dtype, cl=True, scale=1.0):
    t = (torch.randn(*shape, device=DEV) * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _affine(k):
    return torch.rand(k, device=DEV) + 0.5, torch.randn(k, device=DEV)


def _check(out, ref64, same, dtype, rel_bound=None):
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    diff = out.double() - ref64
    rel = (diff.norm() / ref64.norm()).item()
    bound = rel_bound if rel_bound is not None else REL_BOUND[dtype]
    assert rel <= bound, f"relative error {rel:.3g} > {bound:.3g}"
    if same is not None:
        ours = diff.abs().max().item()
        theirs = (same.double() - ref64).abs().max().item()
        assert ours <= 2 * theirs + ATOL[dtype] * ref64.abs().max().item(), (ours, theirs)


def _poisoned(shape, dtype, cl):
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    return out.contiguous(memory_format=torch.channels_last) if cl else out


# ResNet-18/50 conv shapes at 224x224 input: (C, K, H, kernel, stride, padding, residual)
RESNET_CONVS = {
    "stem": (3, 64, 224, 7, 2, 3, False),
    "r18-l1-3x3+res": (64, 64, 56, 3, 1, 1, True),
    "r18-l2-3x3-s2": (64, 128, 56, 3, 2, 1, False),
    "r18-l3-3x3+res": (256, 256, 14, 3, 1, 1, True),
    "r18-l4-3x3+res": (512, 512, 7, 3, 1, 1, True),
    "r50-l1-1x1": (256, 64, 56, 1, 1, 0, False),
    "r50-l2-3x3-s2": (128, 128, 56, 3, 2, 1, False),
    "r50-l3-1x1+res": (256, 1024, 14, 1, 1, 0, True),
    "r50-l4-1x1": (2048, 512, 7, 1, 1, 0, False),
}


def _run_conv(case, dtype, cl, n=4, config=None):
    c, k, h, ks, s, p, has_res = RESNET_CONVS[case]
    x = _rand(n, c, h, h, dtype=dtype, cl=cl)
    w = _rand(k, c, ks, ks, dtype=dtype, scale=1 / math.sqrt(c * ks * ks))
    scale, shift = _affine(k)
    oh = (h + 2 * p - ks) // s + 1
    res = _rand(n, k, oh, oh, dtype=dtype, cl=cl) if has_res else None
    kw = dict(stride=s, padding=p)
    ref64 = fusedres.conv_bn_act(x.double(), w.double(), scale.double(), shift.double(),
                                 residual=None if res is None else res.double(), backend="torch", **kw)
    same = fusedres.conv_bn_act(x, w, scale, shift, residual=res, backend="torch", **kw)
    out = _poisoned((n, k, oh, oh), dtype, cl)
    tl_launch.launch(x, tl_launch.kernel_weight(w), scale, shift, res, out, (s, s), (p, p), (1, 1), 1, True,
                     config=config)
    return out, ref64, same


@pytest.mark.parametrize("cl", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(RESNET_CONVS))
def test_resnet_conv_shapes(case, dtype, cl):
    out, ref64, same = _run_conv(case, dtype, cl)
    _check(out, ref64, same, dtype)


def _split_k_on(monkeypatch):
    """Turn the opt-in split-K path on (sm_90+, else skip); returns the list that records the split
    count of every split launch."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("split-K is taken on sm_90+ only")
    monkeypatch.setattr(tl_launch, "SPLIT_K_ENABLED", True)
    splits = []
    real = tl_launch._launch_split_k
    monkeypatch.setattr(tl_launch, "_launch_split_k", lambda *a: (splits.append(a[3]), real(*a)))
    return splits


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["r18-l3-3x3+res", "r18-l4-3x3+res", "r50-l3-1x1+res", "r50-l4-1x1"])
def test_split_k_small_layers(case, dtype, n, monkeypatch):
    """The opt-in split-K path (FUSEDRES_TRITON_SPLITK=1) on the layers it is for: 14x14 and 7x7 at
    batch 1 and 2 leave most SMs idle, so the launcher's own heuristic splits them (all but the
    256-channel 1x1 in bf16, whose 4 reduction steps of 64 channels are too few to split; IEEE fp32
    tiles are 16 channels deep); numerics as the one-pass kernel's (the untuned default tile, as the
    other tests here)."""
    splits = _split_k_on(monkeypatch)
    out, ref64, same = _run_conv(case, dtype, True, n=n)
    _check(out, ref64, same, dtype)
    if case == "r50-l3-1x1+res" and dtype == torch.bfloat16:
        assert splits == []
    else:
        assert len(splits) == 1 and splits[0] > 1, splits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_split_k_block_tail(dtype, monkeypatch):
    """ResNet-50's layer4 block tail at batch 1 (1x1 512 -> 2048 with the strided 1024 -> 2048
    downsample, 7x7): 16 tiles for the SMs, so the heuristic splits both GEMMs."""
    splits = _split_k_on(monkeypatch)
    y, x = _rand(1, 512, 7, 7, dtype=dtype), _rand(1, 1024, 14, 14, dtype=dtype)
    w = _rand(2048, 512, 1, 1, dtype=dtype, scale=1 / math.sqrt(512))
    wd = _rand(2048, 1024, 1, 1, dtype=dtype, scale=1 / math.sqrt(1024))
    (s, b), (sd, bd) = _affine(2048), _affine(2048)
    ref64 = fusedres.block_tail(*(t.double() for t in (y, w, s, b, x, wd, sd, bd)), backend="torch", ds_stride=2)
    same = fusedres.block_tail(y, w, s, b, x, wd, sd, bd, backend="torch", ds_stride=2)
    out = _poisoned((1, 2048, 7, 7), dtype, True)
    tl_launch.launch(y, tl_launch.kernel_weight(w), s, b, None, out, (1, 1), (0, 0), (1, 1), 1, True,
                     ds=(x, tl_launch.kernel_weight(wd), sd, bd, (2, 2)))
    _check(out, ref64, same, dtype)
    assert len(splits) == 1 and splits[0] > 1, splits


def test_split_k_first_autotuned_call_equals_later_calls(monkeypatch):
    """With autotuning on, a problem's first call tunes the one-pass kernel, then still runs the
    split pair: every call, the first included, gives the same (split) result bit for bit."""
    splits = _split_k_on(monkeypatch)
    monkeypatch.setenv("FUSEDRES_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(tl_launch, "_tile_cache", {})
    monkeypatch.setattr(tl_launch, "shipped_tile", lambda *args: None)  # tune, whatever tiles.json holds
    torch.manual_seed(0)
    first, ref64, same = _run_conv("r18-l4-3x3+res", torch.bfloat16, True, n=1)
    torch.manual_seed(0)
    later, _, _ = _run_conv("r18-l4-3x3+res", torch.bfloat16, True, n=1)
    _check(first, ref64, same, torch.bfloat16)
    assert len(splits) == 2 and splits[0] == splits[1] > 1, splits
    assert torch.equal(first, later)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["r18-l2", "r50-l2", "r50-l1-s1"])
def test_resnet_block_tails(case, dtype):
    # (C_mid, C_in, K, H_in, kernel, ds_stride): BasicBlock and Bottleneck downsample tails
    cm, cin, k, h, ks, ds = {"r18-l2": (128, 64, 128, 56, 3, 2), "r50-l2": (128, 256, 512, 56, 1, 2),
                             "r50-l1-s1": (64, 64, 256, 56, 1, 1)}[case]
    n, oh = 4, (h - 1) // ds + 1
    y = _rand(n, cm, oh, oh, dtype=dtype)
    x = _rand(n, cin, h, h, dtype=dtype)
    w = _rand(k, cm, ks, ks, dtype=dtype, scale=1 / math.sqrt(cm * ks * ks))
    wd = _rand(k, cin, 1, 1, dtype=dtype, scale=1 / math.sqrt(cin))
    (s, b), (sd, bd) = _affine(k), _affine(k)
    p = ks // 2
    kw = dict(padding=p, ds_stride=ds)
    ref64 = fusedres.block_tail(*(t.double() for t in (y, w, s, b, x, wd, sd, bd)), backend="torch", **kw)
    same = fusedres.block_tail(y, w, s, b, x, wd, sd, bd, backend="torch", **kw)
    out = _poisoned((n, k, oh, oh), dtype, True)
    tl_launch.launch(y, tl_launch.kernel_weight(w), s, b, None, out, (1, 1), (p, p), (1, 1), 1, True,
                     ds=(x, tl_launch.kernel_weight(wd), sd, bd, (ds, ds)))
    _check(out, ref64, same, dtype)


def test_resnext_grouped_conv():
    # resnext50_32x4d layer2: 256 channels in 32 groups of 8, 3x3 stride 2
    dtype, n, c, h = torch.bfloat16, 4, 256, 56
    x = _rand(n, c, h, h, dtype=dtype)
    w = _rand(c, c // 32, 3, 3, dtype=dtype, scale=1 / math.sqrt(72))
    s, b = _affine(c)
    kw = dict(stride=2, padding=1, groups=32)
    ref64 = fusedres.conv_bn_act(x.double(), w.double(), s.double(), b.double(), backend="torch", **kw)
    same = fusedres.conv_bn_act(x, w, s, b, backend="torch", **kw)
    _check(fusedres.conv_bn_act(x, w, s, b, backend="triton", **kw), ref64, same, dtype)


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_every_tile_config(precision):
    """Each candidate tile compiles, runs and is correct (the autotuner may pick any)."""
    dtype = torch.bfloat16 if precision == "tf32" else torch.float32
    for cfg in tl_launch.base_configs(precision):
        out, ref64, same = _run_conv("r18-l2-3x3-s2", dtype, True, n=2, config=cfg)
        _check(out, ref64, same, dtype)


def test_tf32_when_allowed():
    torch.backends.cudnn.allow_tf32 = True
    out, ref64, same = _run_conv("r50-l3-1x1+res", torch.float32, True)
    _check(out, ref64, None, torch.float32, rel_bound=5e-3)


def test_autotuned_path(monkeypatch):
    monkeypatch.setenv("FUSEDRES_TRITON_AUTOTUNE", "1")
    out, ref64, same = _run_conv("r18-l1-3x3+res", torch.bfloat16, True)
    _check(out, ref64, same, torch.bfloat16)


def test_int64_offsets_beyond_2_31_elements():
    """x and out with > 2**31 elements: the last images must still be addressed correctly."""
    free, _ = torch.cuda.mem_get_info()
    n, c, h = 10700, 64, 56  # 10700 * 64 * 56 * 56 = 2.15e9 > 2**31 elements
    if free < 3 * n * c * h * h * 2:
        pytest.skip("not enough GPU memory for a > 2**31-element tensor")
    x = torch.randn(n, c, h, h, device=DEV, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    w = _rand(c, c, 1, 1, dtype=torch.bfloat16, scale=0.125)
    s, b = _affine(c)
    out = fusedres.conv_bn_act(x, w, s, b, backend="triton")
    tail = slice(n - 3, n)
    ref64 = fusedres.conv_bn_act(x[tail].double(), w.double(), s.double(), b.double(), backend="torch")
    _check(out[tail], ref64, None, torch.bfloat16)


def test_opcheck_cuda():
    x = _rand(2, 16, 9, 9, dtype=torch.bfloat16).requires_grad_()
    w = _rand(32, 16, 3, 3, dtype=torch.bfloat16, scale=0.1).requires_grad_()
    s, b = _affine(32)
    r = _rand(2, 32, 5, 5, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fusedres.conv_bn_act_triton.default,
                          (x, w, s, b, r, None, None, 0.0, [2, 2], [1, 1], [1, 1], 1, True))
    with torch.no_grad():
        torch.library.opcheck(torch.ops.fusedres.conv_bn_act_triton.default,
                              (x.detach(), w.detach(), s, b, r, b, s, 1e-5, [2, 2], [1, 1], [1, 1], 1, True))
    xd = _rand(2, 8, 10, 10, dtype=torch.bfloat16)
    wd = _rand(32, 8, 1, 1, dtype=torch.bfloat16, scale=0.3)
    y = _rand(2, 16, 5, 5, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fusedres.block_tail_triton.default,
                          (y, w, s, b, xd, wd, s, b, None, None, 0.0, None, None, 0.0,
                           [1, 1], [1, 1], [1, 1], 1, [2, 2], True))


def _resnet18_bf16():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.to(DEV, torch.bfloat16).eval()


def test_torch_compile_fullgraph_resnet18():
    model = _resnet18_bf16()
    x = _rand(2, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x).float()
        fusedres.convert(model, backend="triton")
        eager = model(x).float()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x).float()
    # Fused eager vs torchvision: bf16 end to end, so a loose network-level bound.
    assert ((eager - ref).norm() / ref.norm()).item() < 3e-2
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)


def test_cuda_graph_capture_replay():
    model = _resnet18_bf16()
    block = fusedres.convert(model.layer2, backend="triton")  # layer2.0 has the downsample tail
    static_x = _rand(4, 64, 28, 28, dtype=torch.bfloat16)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up: compile, autotune and cache the weight layouts
            for _ in range(2):
                block(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = block(static_x)
        new_x = _rand(4, 64, 28, 28, dtype=torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = block(new_x)
    torch.testing.assert_close(static_out, expected, rtol=0, atol=0)


def test_auto_picks_triton_on_cuda_when_cuda_backend_absent():
    if backends.is_available("cuda"):
        pytest.skip("the C++/CUDA backend is built and comes first in auto order")
    x = _rand(2, 16, 8, 8, dtype=torch.bfloat16)
    w = _rand(16, 16, 3, 3, dtype=torch.bfloat16, scale=0.1)
    s, b = _affine(16)
    spec = backends.ConvSpec("cuda", torch.bfloat16, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True,
                             False, True, False, batch=2, input_size=(8, 8))
    assert backends.select("auto", spec).NAME == "triton"
    torch.testing.assert_close(fusedres.conv_bn_act(x, w, s, b, padding=1),
                               fusedres.conv_bn_act(x, w, s, b, padding=1, backend="triton"))

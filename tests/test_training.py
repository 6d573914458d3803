"""Fused train-mode path (fusedres.training) vs torchvision with batch-statistics BatchNorm.

Every comparison also runs the torchvision module in float64 as the truth, and a fused result
passes when its error is within twice eager PyTorch's own error in the same dtype (plus a
floor): BN gradients on tiny batches are ill-conditioned, so a fixed atol would be either
meaningless or flaky.  Each test also checks that the fused chain really ran (the autograd
graph contains ``ChainTrainBackward`` nodes), so a silent fallback to torchvision cannot pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.autograd import gradcheck, gradgradcheck
from torchvision.models import resnet as tv

import fusedres
from fusedres.training import ChainTrain
from helpers import assert_within_budget, chain_nodes, randomize, rel_err
from test_blocks import CONFIGS, make_block


def _inputs(shape, channels_last, dtype=torch.float32, seed=1):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _run(module, x):
    """Forward + backward of a fixed pseudo-random cotangent; returns the output and all grads."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(g.to(device=out.device, dtype=out.dtype))
    grads = {"x": x.grad, **{n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()}}
    return out, grads


def _pooled(runs):
    """One input's ``(out, grads)``, or several inputs' pooled: every tensor flattened and concatenated."""
    if len(runs) == 1:
        return runs[0]
    cat = lambda ts: None if ts[0] is None else torch.cat([t.flatten() for t in ts])  # noqa: E731
    return cat([o for o, _ in runs]), {k: cat([g[k] for _, g in runs]) for k in runs[0][1]}


def _compare(ref, fused, x, dtype, *, expect_chains):
    """Fused (in ``dtype``) vs torchvision (``dtype``) vs torchvision (fp64): output, grads, buffers.

    ``x``: one input, or a list of inputs whose errors are pooled (all their values together):
    bf16 gradients through a ReLU are heavy-tailed (an output that rounds to 0 instead of a small
    positive value drops its whole gradient), so one small input's error says little.
    """
    xs = x if isinstance(x, list) else [x]
    truth = copy.deepcopy(ref).double()
    ref, fused = ref.to(dtype), fused.to(dtype)
    runs_f = []
    for xi in xs:
        runs_f.append(_run(fused, xi.to(dtype)))
        assert chain_nodes(runs_f[-1][0]) == expect_chains
    out_f, gr_f = _pooled(runs_f)
    out_r, gr_r = _pooled([_run(ref, xi.to(dtype)) for xi in xs])
    out_t, gr_t = _pooled([_run(truth, xi.double()) for xi in xs])
    assert out_f.dtype == dtype and out_f.shape == out_r.shape
    assert_within_budget(out_f, out_r, out_t, dtype)
    for name, gt in gr_t.items():
        if gt is None:
            assert gr_f[name] is None and gr_r[name] is None, name
            continue
        assert_within_budget(gr_f[name], gr_r[name], gt, dtype, what=f"grad of {name}")
    for (name, bf), br, bt in zip(fused.named_buffers(), ref.buffers(), truth.buffers()):
        if name.endswith("num_batches_tracked"):
            assert bf.item() == br.item() == bt.item(), name
        else:
            assert_within_budget(bf, br, bt, dtype, what=f"buffer {name}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 8, 7), (1, 5, 7)], ids=["n2", "n1-odd"])
def test_block_train_matches_torchvision(name, channels_last, shape):
    ref, cin = make_block(name)
    ref.train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs((shape[0], cin, shape[1], shape[2]), channels_last)
    _compare(ref, fused, x, torch.float32, expect_chains=1)


def test_train_memory_format_policy():
    """CPU chains run channels_last from CPU_CHANNELS_LAST_MIN_HW output positions up, NCHW
    below (strides and padding counted); other devices always channels_last."""
    from fusedres.training import CPU_CHANNELS_LAST_MIN_HW, train_memory_format

    assert CPU_CHANNELS_LAST_MIN_HW == 16
    c1, c3 = torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.Conv2d(4, 4, 3, 2, 1, bias=False)
    cpu = lambda h, w: torch.empty(1, 4, h, w)  # noqa: E731
    assert train_memory_format(cpu(4, 4), [c1, c1]) is torch.channels_last  # 16 positions
    assert train_memory_format(cpu(4, 3), [c1, c1]) is torch.contiguous_format  # 12
    assert train_memory_format(cpu(8, 8), [c1, c3, c1]) is torch.channels_last  # 4x4 out
    assert train_memory_format(cpu(5, 8), [c1, c3, c1]) is torch.contiguous_format  # 3x4 out
    assert train_memory_format(cpu(14, 14), [c1, c3, c1]) is torch.channels_last  # 7x7 out
    assert train_memory_format(cpu(4, 4), [c1, c3, c1]) is torch.contiguous_format  # 2x2 out
    assert train_memory_format(torch.empty(1, 4, 2, 2, device="meta"), [c1]) is torch.channels_last


def test_train_recompute_policy(monkeypatch):
    """Chains on CUDA (any non-CPU device) recompute a last conv of reduction length up to
    RECOMPUTE_MAX_REDUCTION; CPU chains up to CPU_RECOMPUTE_MAX_REDUCTION (0 by default: they save
    it), and NCHW ones never."""
    import fusedres.training as training
    from fusedres.training import RECOMPUTE_MAX_REDUCTION, train_recompute_limit

    cl, nchw = torch.channels_last, torch.contiguous_format
    meta, cpu = torch.empty(1, 4, 2, 2, device="meta"), torch.empty(1, 4, 2, 2)
    assert RECOMPUTE_MAX_REDUCTION == 512 and training.CPU_RECOMPUTE_MAX_REDUCTION == 0
    assert train_recompute_limit(meta, cl) == 512 and train_recompute_limit(cpu, cl) == 0
    monkeypatch.setattr(training, "CPU_RECOMPUTE_MAX_REDUCTION", 128)
    assert train_recompute_limit(meta, cl) == 512 and train_recompute_limit(cpu, cl) == 128
    assert train_recompute_limit(cpu, nchw) == 0


@pytest.mark.parametrize("name", ["bottleneck", "bottleneck-down", "basic"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("hw", [(12, 11), (4, 3)], ids=["big", "small"])
@pytest.mark.parametrize("cpu_recompute", [False, True], ids=["save", "recompute"])
def test_block_train_layout(name, channels_last, hw, cpu_recompute, monkeypatch):
    """Both CPU layouts of the chain, with the last conv's output saved or (a nonzero
    CPU_RECOMPUTE_MAX_REDUCTION, channels_last chains only) recomputed, match torchvision,
    whatever layout the input comes in; the output has the chain's layout."""
    import fusedres.training as training
    from fusedres.training import RECOMPUTE_MAX_REDUCTION, chain as chain_mod, train_memory_format

    monkeypatch.setattr(training, "CPU_RECOMPUTE_MAX_REDUCTION", RECOMPUTE_MAX_REDUCTION if cpu_recompute else 0)
    cfgs = []
    apply = chain_mod.ChainTrain.apply
    monkeypatch.setattr(chain_mod.ChainTrain, "apply", lambda cfg, *a: cfgs.append(cfg) or apply(cfg, *a))
    ref, cin = make_block(name)
    ref.train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs((2, cin, *hw), channels_last)
    layout = train_memory_format(x, [m for m in (ref.conv1, ref.conv2, getattr(ref, "conv3", None)) if m])
    assert (layout is torch.channels_last) == (hw == (12, 11))
    _compare(ref, fused, x, torch.float32, expect_chains=1)
    out = fused(x)
    assert out.is_contiguous(memory_format=layout)
    last = getattr(ref, "conv3", ref.conv2)
    cheap = last.in_channels // last.groups * last.kernel_size[0] * last.kernel_size[1] <= RECOMPUTE_MAX_REDUCTION
    assert cheap  # these toy blocks' last convs are all cheap enough to recompute
    assert cfgs[-1][4] == (cpu_recompute and layout is torch.channels_last)


@pytest.mark.parametrize("name", ["basic-down", "resnext"])
def test_block_train_bf16(name):
    ref, cin = make_block(name)
    ref.train()
    fused = fusedres.convert(copy.deepcopy(ref))
    xs = [_inputs((4, cin, 8, 8), True, seed=seed) for seed in (1, 2, 3, 4)]
    _compare(ref, fused, xs, torch.bfloat16, expect_chains=1)


def _tiny_resnet(block=tv.BasicBlock, layers=(1, 1, 1, 1)):
    torch.manual_seed(0)
    return randomize(tv.ResNet(block, list(layers), num_classes=10))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["basic-down", "bottleneck", "resnext", "dilated"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_block_train_cuda_fp32(name, channels_last, monkeypatch):
    """On CUDA every conv is the Triton conv with fused statistics (and BN prologue), and the
    BN-apply and BN-backward passes are the Triton kernels.  IEEE fp32: with TF32 on, the
    Triton and cuDNN convs would round differently and the fp32 error budget would not apply."""
    from fusedres.backends.triton import launch as conv_launch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    calls = []
    real = conv_launch.conv_train_fwd
    monkeypatch.setattr(conv_launch, "conv_train_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, cin = make_block(name)
    ref.train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs((4, cin, 12, 11), channels_last).cuda()
    _compare(ref.cuda(), fused.cuda(), x, torch.float32, expect_chains=1)
    assert len(calls) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_model_autocast_cuda(dtype):
    ref = _tiny_resnet(tv.Bottleneck).train().cuda().to(memory_format=torch.channels_last)
    fused = fusedres.convert(copy.deepcopy(ref))
    truth = copy.deepcopy(ref).double()
    x = _inputs((8, 3, 64, 64), True).cuda()
    with torch.autocast("cuda", dtype=dtype):
        out_f, gr_f = _run(fused, x)
        out_r, gr_r = _run(ref, x)
    out_t, gr_t = _run(truth, x.double())
    assert out_f.dtype == dtype and chain_nodes(out_f) == 5
    assert_within_budget(out_f, out_r, out_t, dtype)
    for name, gt in gr_t.items():
        assert_within_budget(gr_f[name], gr_r[name], gt, dtype, what=f"grad of {name}")
    for (n, bf), br in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(bf, br, rtol=2e-2, atol=2e-2, msg=lambda m: f"buffer {n}: {m}")


@pytest.mark.parametrize("block", [tv.BasicBlock, tv.Bottleneck], ids=["basic", "bottleneck"])
def test_model_train_step_matches_torchvision(block):
    ref = _tiny_resnet(block, (1, 2, 1, 1)).train()
    fused = fusedres.convert(copy.deepcopy(ref))
    # 5 blocks + the stem (its max-pool inside the chain).
    _compare(ref, fused, _inputs((3, 3, 35, 33), False), torch.float32, expect_chains=6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_fp64_exact(momentum):
    """In fp64 the running statistics follow nn.BatchNorm2d to rounding (cumulative average too)."""
    ref = _tiny_resnet().double().train()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    fused = fusedres.convert(copy.deepcopy(ref))
    for step in range(3):
        x = _inputs((2, 3, 20, 20), False, seed=step).double()
        ref(x)
        fused(x)
    for (n, a), b in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"buffer {n}: {m}")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_over_steps(momentum):
    ref = _tiny_resnet().train()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    fused = fusedres.convert(copy.deepcopy(ref))
    for step in range(3):
        x = _inputs((2, 3, 20, 20), False, seed=step)
        ref(x)
        fused(x)
    for (n, a), b in zip(fused.named_buffers(), ref.buffers()):
        # layer4 normalises 2 values per channel (batch 2, 1x1): fp32 rounding shows at ~1e-6.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"buffer {n}: {m}")
    assert fused.layer1[0].bn1.num_batches_tracked.item() == 3


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_running_stats_and_no_affine(train):
    """``track_running_stats=False`` (batch stats in eval too) and ``affine=False``."""
    ref, cin = make_block("bottleneck-down")
    for i, m in enumerate(ref.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
            if i % 2:
                m.weight = m.bias = None
                m.affine = False
    ref.train(train)
    fused = fusedres.convert(copy.deepcopy(ref))
    _compare(ref, fused, _inputs((2, cin, 6, 6), False), torch.float32, expect_chains=1)


def _param(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()


_G1 = ((1, 1), (1, 1), (1, 1), 1)
_CHAINS = {
    # residual kind, geoms, pool, (C_in, C_mid, C_out), recompute_last
    "identity": ("identity", (_G1, _G1), None, (4, 3, 4), False),
    "identity-recompute": ("identity", (_G1, _G1), None, (4, 3, 4), True),
    "downsample": ("downsample", (((2, 2), (1, 1), (1, 1), 1), _G1, ((2, 2), (0, 0), (1, 1), 1)), None, (2, 4, 4), False),
    "stem-pool": ("none", (((2, 2), (1, 1), (1, 1), 1),), ((3, 3), (2, 2), (1, 1), (1, 1), False), (2, 3, 3), True),
    # A strided Bottleneck-like chain: three convs, the downsample, the last conv recomputed.
    "bottleneck-down": ("downsample", (_G1, ((2, 2), (1, 1), (1, 1), 1), _G1, ((2, 2), (0, 0), (1, 1), 1)), None,
                        (2, 3, 4), True),
}


def _chain_args(kind, affine=True):
    residual, geoms, pool, (cin, cmid, cout), recompute = _CHAINS[kind]
    nmain = len(geoms) - (residual == "downsample")
    chans = [cin] + [cmid] * (nmain - 1) + [cout]
    params, s = [], 10

    def bn(c, seed):  # gamma, beta (None for an affine=False BatchNorm)
        return [_param(c, seed=seed), _param(c, seed=seed + 1)] if affine else [None, None]

    for i in range(nmain):
        params += [_param(chans[i + 1], chans[i], 3, 3, seed=s), *bn(chans[i + 1], s + 1)]
        s += 3
    if residual == "downsample":
        params += [_param(cout, cin, 1, 1, seed=s), *bn(cout, s + 1)]
    cfg = (geoms, (1e-5,) * len(geoms), residual, pool, recompute)
    return cfg, _param(2, cin, 5, 5, seed=1), params


@pytest.mark.parametrize("kind", sorted(_CHAINS))
def test_gradcheck_float64(kind):
    cfg, x, params = _chain_args(kind)

    def fn(x, *p):
        return ChainTrain.apply(cfg, None, x, *p)[0]

    assert gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_float64_no_affine_and_synchronised(tmp_path):
    """``gamma``/``beta`` ``None`` (``affine=False``), and the synchronised-statistics code path
    (all-gather of the statistics, all-reduce of the backward sums) over a 1-rank gloo group."""
    cfg, x, params = _chain_args("bottleneck-down", affine=False)
    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for group in (None, dist.group.WORLD):
            def fn(x, *w):
                return ChainTrain.apply(cfg, group, x, *w)[0]

            assert gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4), group
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind, affine", [(k, True) for k in sorted(_CHAINS)] + [("downsample", False),
                                                                              ("stem-pool", False)])
def test_gradgradcheck_float64(kind, affine):
    """Double backward (``create_graph=True``): second derivatives through the chain, including
    through ``gout``, checked against finite differences (``affine=False``: no gamma/beta)."""
    cfg, x, params = _chain_args(kind, affine)

    def fn(x, *p):
        return ChainTrain.apply(cfg, None, x, *p)[0]

    assert gradgradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradient_penalty_matches_torchvision():
    """A gradient penalty (WGAN-GP, R1) on a converted model: ``create_graph=True``, then a backward
    through the input gradient; every parameter gradient agrees with torchvision's in float64."""
    torch.manual_seed(0)
    ref = randomize(torchvision.models.resnet18(num_classes=1)).double().train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    got = []
    for model in (ref, fused):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        ((g.flatten(1).norm(dim=1) - 1) ** 2).mean().backward()
        got.append((g.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert chain_nodes(fused(x)) == 9
    assert rel_err(got[1][0], got[0][0]) < 1e-10
    for name, want in got[0][1].items():
        have = got[1][1][name]
        assert (have is None) == (want is None), name
        if want is not None:
            assert rel_err(have, want) < 1e-9, name


@pytest.mark.cuda
def test_gradient_penalty_cuda_fp32(monkeypatch):
    """The gradient penalty on CUDA (Triton chains forward; the double backward reruns the block
    with torch's ops): input gradient and every parameter gradient within the fp32 budget of
    torchvision's own error against float64 (channels_last, the chains' layout: this random-BN
    model's fp32 gradients differ between layouts far above fp32's epsilon)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    ref = randomize(_tiny_resnet(tv.BasicBlock)).train().cuda().to(memory_format=torch.channels_last)
    fused = fusedres.convert(copy.deepcopy(ref))
    truth = copy.deepcopy(ref).double()
    x = torch.randn(4, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    got = []
    for model, xi in ((ref, x), (fused, x), (truth, x.double())):
        xi = xi.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        ((g.flatten(1).norm(dim=1) - 1) ** 2).mean().backward()
        got.append((g.detach(), [p.grad for p in model.parameters()]))
    assert chain_nodes(fused(x)) == 5
    assert_within_budget(got[1][0], got[0][0], got[2][0].float(), torch.float32, "input gradient")
    for i, (f, r, t) in enumerate(zip(got[1][1], got[0][1], got[2][1])):
        assert (f is None) == (t is None), i
        if t is not None:
            assert_within_budget(f, r, t.float(), torch.float32, f"parameter {i} gradient")


def test_double_backward_with_synchronised_statistics_raises_clear_error(tmp_path):
    import torch.distributed as dist

    cfg, x, params = _chain_args("identity")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        out = ChainTrain.apply(cfg, dist.group.WORLD, x, *params)[0]
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpointed_blocks_update_running_stats_like_torchvision(momentum):
    """Non-reentrant ``torch.utils.checkpoint`` recomputes the segment in backward and stops as soon
    as its last op has saved its tensors; BatchNorm updates its statistics inside the op, so
    torchvision updates every BN twice.  The chain used to update after its op, and the last
    block of each segment missed the second update."""
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    seq = torch.nn.Sequential(tv.BasicBlock(16, 16), tv.BasicBlock(16, 16)).train()
    for m in seq.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    ref, fused = seq, fusedres.convert(copy.deepcopy(seq))
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    for model in (ref, fused):
        cp.checkpoint(model, x, use_reentrant=False).sum().backward()
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert all(int(b.num_batches_tracked) == 2 for b in fused.modules() if isinstance(b, torch.nn.BatchNorm2d))


def test_batched_backward_matches_torchvision():
    """``autograd.grad(..., is_grads_batched=True)`` and ``jacobian(vectorize=True)`` vmap the
    backward: the chain's layout step asked a batched gradient for channels_last (an NYI error)."""
    ref, cin = make_block("basic")
    ref = ref.double().train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)  # 6x6: the CPU chain runs channels_last
    got = []
    for model in (ref, fused):
        xx = x.clone().requires_grad_()
        out = model(xx)
        gouts = torch.randn(3, *out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        (g,) = torch.autograd.grad(out, xx, gouts, is_grads_batched=True)
        got.append((g, torch.autograd.functional.jacobian(model, x, vectorize=True)))
    for a, b in zip(got[0], got[1]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_cpu(dtype):
    ref = _tiny_resnet(tv.Bottleneck).train()
    fused = fusedres.convert(copy.deepcopy(ref))
    truth = copy.deepcopy(ref).double()
    x = _inputs((2, 3, 32, 32), True)
    with torch.autocast("cpu", dtype=dtype):
        out_f = fused(x)
        out_r = ref(x)
    assert out_f.dtype == out_r.dtype == dtype
    assert chain_nodes(out_f) == 5
    out_t = truth(x.double())
    assert_within_budget(out_f, out_r, out_t, dtype)
    out_f.float().sum().backward()
    out_r.float().sum().backward()
    out_t.sum().backward()
    for (n, pf), pr, pt in zip(fused.named_parameters(), ref.parameters(), truth.parameters()):
        assert pf.grad.dtype == pf.dtype
        assert_within_budget(pf.grad, pr.grad, pt.grad, dtype, what=f"grad of {n}")
    for (n, bf), br in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(bf, br, rtol=2e-2, atol=2e-2, msg=lambda m: f"buffer {n}: {m}")


@pytest.mark.slow
def test_compile_fullgraph_train_step():
    ref = _tiny_resnet().train()
    fused = fusedres.convert(copy.deepcopy(ref))
    truth = copy.deepcopy(ref).double()
    compiled = torch.compile(fused, fullgraph=True)
    x = _inputs((4, 3, 40, 40), False)
    with fusedres.backends.record() as used:  # noted while tracing: the chains are in the graph
        out_c, gr_c = _run(compiled, x)
    assert used == {"train:torch"}
    out_r, gr_r = _run(ref, x)
    out_t, gr_t = _run(truth, x.double())
    assert_within_budget(out_c, out_r, out_t, torch.float32)
    for name, gt in gr_t.items():
        assert_within_budget(gr_c[name], gr_r[name], gt, torch.float32, what=f"grad of {name}")
    for (n, bc), br in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(bc, br, rtol=1e-4, atol=1e-5, msg=lambda m: f"buffer {n}: {m}")


def _saved_bytes(model, x):
    """Bytes of the distinct activation storages autograd keeps for backward (parameters excluded)."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("policy", ["cuda", "cpu"])
def test_saves_fewer_activation_bytes_than_eager(arch, policy, monkeypatch):
    """Design property: pre-BN outputs only (no BN/ReLU outputs, masks or pool indices), and with
    CUDA's recompute policy (forced here on CPU) not even a Bottleneck's or the stem's last conv
    output.  CPU chains save that output by default (CPU_RECOMPUTE_MAX_REDUCTION)."""
    import fusedres.training as training

    if policy == "cuda":
        monkeypatch.setattr(training, "CPU_RECOMPUTE_MAX_REDUCTION", training.RECOMPUTE_MAX_REDUCTION)
    ref = getattr(torchvision.models, arch)(num_classes=10).train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 64, 64)
    ratio = _saved_bytes(fused, x) / _saved_bytes(ref, x)
    # Measured at this size: 0.51 for both with CUDA's policy (the target is 0.7); CPU's
    # default 0.66 (ResNet-18) and 0.80 (ResNet-50).
    assert ratio <= (0.6 if policy == "cuda" else 0.85), ratio


def test_convert_sync_batchnorm_marks_blocks_only():
    model = fusedres.convert(_tiny_resnet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fusedres.convert_sync_batchnorm(model) is model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is torch.nn.BatchNorm2d for m in model.modules() if "BatchNorm" in type(m).__name__)
    with pytest.raises(ValueError, match="fusedres.convert"):
        fusedres.convert_sync_batchnorm(_tiny_resnet())
    with pytest.raises(TypeError, match="process_group"):
        fusedres.convert_sync_batchnorm(model, process_group="world")
    # Without an initialised process group the marked model is an ordinary (fused) model.
    x = _inputs((2, 3, 20, 20), False)
    ref = _tiny_resnet().train()
    truth = copy.deepcopy(ref).double()
    assert_within_budget(model.train()(x), ref(x), truth(x.double()), torch.float32)


def test_torch_syncbatchnorm_on_converted_model_runs_fused():
    """``nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.convert(m))``: the blocks stay fused
    (synchronised over the SyncBatchNorm's group; see test_distributed.py); a block mixing
    SyncBatchNorm with plain BatchNorm keeps torchvision's forward."""
    ref = _tiny_resnet().train()
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.convert(copy.deepcopy(ref)))
    x = _inputs((2, 3, 20, 20), False)
    out = model(x)  # one process, no group: SyncBatchNorm acts as BatchNorm, on CPU too
    assert chain_nodes(out) == 5
    assert_within_budget(out, ref(x), copy.deepcopy(ref).double()(x.double()), torch.float32)
    model.layer1[0].bn2.eval()  # SyncBatchNorms of one block in different modes: torchvision's forward
    assert chain_nodes(model(x)) == 4
    model.layer1[0].bn2 = copy.deepcopy(ref.layer1[0].bn2).train()  # plain BatchNorm2d beside SyncBatchNorm
    assert chain_nodes(model(x)) == 4


def test_batch_of_one_value_per_channel_raises_like_batchnorm():
    fused = fusedres.convert(make_block("basic")[0].train())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fused(torch.randn(1, 16, 1, 1))
    assert fused(torch.randn(0, 16, 4, 4)).shape == (0, 16, 4, 4)  # empty batch: BatchNorm's semantics


def test_one_value_per_channel_leaves_torchvisions_state():
    """torchvision raises at the BN that sees one value per channel, after the BNs before it in
    the block have updated their running statistics (and the failing one its count): the
    converted block takes torchvision's forward there and leaves the same buffers behind."""
    torch.manual_seed(0)
    ref = tv.Bottleneck(8, 4, stride=2, downsample=torch.nn.Sequential(tv.conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16)))
    ref = ref.double().train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(1, 8, 2, 2, dtype=torch.float64)  # bn1 sees 4 values per channel, bn2 (stride 2) one
    for model in (ref, fused):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model(x)
    assert ref.bn1.num_batches_tracked == 1  # what torchvision leaves: bn1 updated, bn2 counted
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        assert torch.equal(a, b), name
    assert chain_nodes(fused(torch.randn(2, 8, 4, 4, dtype=torch.float64))) == 1  # larger inputs still fuse


@pytest.mark.cuda
def test_cuda_activation_peak_resnet50_bf16():
    """Peak activation memory of a ResNet-50 AMP train step (forward + backward): fused <= 0.7x eager."""

    def peak(model, x):
        for p in model.parameters():  # gradients allocated up front: not activation memory
            p.grad = torch.zeros_like(p)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eager = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last).train()
    fused = fusedres.convert(copy.deepcopy(eager))
    x = torch.randn(32, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    peak(fused, x)  # first calls: Triton JIT, cuDNN/cuBLAS workspaces out of the way
    peak(eager, x)
    ratio = peak(fused, x) / peak(eager, x)
    assert ratio <= 0.7, ratio


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["basic-down", "bottleneck", "resnet"])
def test_train_path_through_triton_kernels_interpreted(name, monkeypatch):
    """The whole chain with every per-channel pass on the Triton kernels (interpreter on CPU):
    the integration the CUDA path uses, checked without a GPU."""
    from fusedres.training import ops

    tk = pytest.importorskip("fusedres.training.triton_kernels")
    from fusedres.backends.triton import launch as conv_launch

    monkeypatch.setattr(ops, "use_triton", lambda t: t.dtype != torch.float64)
    calls = {"channel_stats": 0, "prologue": 0}
    for mod, fn in ((tk, "channel_stats"), (tk, "bn_act"), (tk, "bn_bwd_reduce"), (tk, "bn_bwd_apply"),
                    (conv_launch, "conv_train_fwd")):
        def counted(*a, _f=getattr(mod, fn), _n=fn, **k):
            calls[_n] = calls.get(_n, 0) + 1
            if _n == "conv_train_fwd" and (a[7] if len(a) > 7 else k.get("in_scale")) is not None:
                calls["prologue"] += 1
            return _f(*a, **k)
        monkeypatch.setattr(mod, fn, counted)
    if name == "resnet":  # the stem chain with its max-pool, and 4 blocks
        ref, x, chains = _tiny_resnet().train(), _inputs((3, 3, 35, 33), True), 5
    else:
        ref, cin = make_block(name)
        ref, x, chains = ref.train(), _inputs((2, cin, 6, 5), True), 1
    fused = fusedres.convert(copy.deepcopy(ref))
    _compare(ref, fused, x, torch.float32, expect_chains=chains)
    nbn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())  # one pass of each per BN
    # Every conv is one launch emitting its statistics: no separate statistics pass.
    assert calls["conv_train_fwd"] == calls["bn_bwd_reduce"] == calls["bn_bwd_apply"] == nbn, calls
    assert calls["channel_stats"] == 0, calls
    # Each conv that follows a BN inside a chain applies it in its operand load: every conv
    # but a chain's first and its downsample.
    n_ds = sum(getattr(m, "downsample", None) is not None for m in ref.modules())
    assert calls["prologue"] == nbn - chains - n_ds, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bn_backward_takes_a_gradient_in_another_layout(dtype):
    """A gradient arriving NCHW at a channels_last chain (ResNet-50's NCHW layer4 above its
    channels_last layer3 on CPU) gives the same result as one in the chain's own layout."""
    from fusedres.training import ops

    gen = torch.Generator().manual_seed(0)
    shape = (2, 16, 6, 5)
    z = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.relu(torch.randn(shape, generator=gen)).to(dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen).to(dtype)
    mean, invstd, gamma = torch.randn(16, generator=gen), torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    want = ops.bn_backward(g.contiguous(memory_format=torch.channels_last), y, z, mean, invstd, gamma, write_gp=True)
    got = ops.bn_backward(g, y, z, mean, invstd, gamma, write_gp=True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("params_cl", [False, True], ids=["nchw-params", "cl-params"])
def test_weight_grads_come_in_the_weights_layout(autocast, params_cl):
    """The chain hands back each weight's gradient in the weight's own memory format, so
    ``AccumulateGrad`` stores it as is.  The CPU chains run channels_last, where the conv backward
    gives channels_last weight gradients; an NCHW model's 3x3 weights would otherwise be re-laid
    out by ``AccumulateGrad`` in fp32 on every step.  Values are checked by the tests above."""
    ref, cin = make_block("bottleneck-down")
    fused = fusedres.convert(copy.deepcopy(ref)).train()
    if params_cl:
        fused = fused.to(memory_format=torch.channels_last)
    seen = {}
    for n, p in fused.named_parameters():
        if p.dim() == 4:
            p.register_hook(lambda g, n=n: seen.__setitem__(n, _layout(g)))
    x = _inputs((2, cin, 12, 11), True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fused(x)
    assert chain_nodes(out) == 1
    out.float().sum().backward()
    convs = {n: p for n, p in fused.named_parameters() if p.dim() == 4}
    assert set(seen) == set(convs)
    assert any(p.shape[-1] > 1 for p in convs.values())  # a 3x3 weight, whose two layouts differ
    for n, p in convs.items():
        assert seen[n] == _layout(p) == _layout(p.grad), n


def _layout(t):
    """The strides that matter (AccumulateGrad's layout contract ignores those of size-1 dims)."""
    return tuple(s for s, d in zip(t.stride(), t.shape) if d != 1)


def test_cpu_autocast_step_copies_each_weight_at_most_three_times():
    """Under autocast a CPU chain casts each conv weight once, into the compute dtype and the chain's
    layout, and uses that copy in forward and backward; the weight gradient goes back to the weight's
    dtype and layout in one copy (the third copy is ATen's, of the gradient into the activations'
    layout).  Autocast's cast, ATen's re-layouts in forward and backward and a layout and a dtype copy
    of each gradient made up to six weight-sized copies per conv and step (63 here, against 36).  In
    fp32 the count is unchanged (four per 3x3 conv: a same-dtype re-layout is made again in backward
    rather than kept).  Values: ``test_autocast_cpu`` and the layout test above (ResNet-50's
    gradients were bit-identical to the six-copy form)."""
    from torch.profiler import ProfilerActivity, profile

    fused = fusedres.convert(_tiny_resnet()).train()
    x = _inputs((2, 3, 128, 128), False)  # every chain's output has 16 positions or more: channels_last
    shapes = {tuple(m.weight.shape) for m in fused.modules() if isinstance(m, torch.nn.Conv2d)}
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            out = fused(x)
        out.float().sum().backward()
        fused.zero_grad(set_to_none=True)

    step()  # plans made
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    copies = [e for e in prof.events()
              if e.name == "aten::copy_" and e.input_shapes and tuple(e.input_shapes[0]) in shapes]
    assert len(copies) <= 3 * convs, (len(copies), convs)


def _shared_grads(model, x, autocast, wrap=None):
    """``(first-order, create_graph)`` gradients of ``model[0].conv1.weight`` (and ``model[0].conv2.weight``)
    of a squared loss, whose second term makes the double backward's own graph matter."""
    from contextlib import nullcontext

    with torch.autocast("cpu", torch.bfloat16, enabled=autocast), (wrap or nullcontext)():
        out = model(x)
    loss = out.float().sum() ** 2 / 100
    ws = [model[0].conv1.weight, model[0].conv2.weight]
    first = torch.autograd.grad(loss, ws, retain_graph=True)
    second = torch.autograd.grad(loss, ws, create_graph=True)
    return chain_nodes(out), first, second


@pytest.mark.parametrize("case", ["within", "within-bf16-autocast", "within-saved-tensor-hooks", "across-blocks"])
def test_double_backward_with_shared_weights(case):
    """A weight (and, within a block, a BN) used twice: ``create_graph=True`` differentiated the saved
    tensors themselves, so a tensor in two slots got its whole gradient in each (exactly 2x
    torchvision's; under saved-tensor hooks the two slots unpack as two objects), and a weight shared
    with an earlier block also that block's share, reached through ``x``'s history (1.9x)."""
    torch.manual_seed(0)
    a, b = tv.BasicBlock(4, 4), tv.BasicBlock(4, 4)
    if case == "across-blocks":
        b.conv1 = a.conv1
    else:
        a.conv2, a.bn2 = a.conv1, a.bn1
    net = torch.nn.Sequential(a, b).train()
    x = _inputs((2, 4, 6, 6), False)
    autocast = case == "within-bf16-autocast"
    wrap = (lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t * 1, lambda t: t)) \
        if case == "within-saved-tensor-hooks" else None
    (_, r1, r2), (n, f1, f2) = (_shared_grads(m, x, autocast, wrap)
                                for m in (copy.deepcopy(net), fusedres.convert(copy.deepcopy(net))))
    assert n == 2
    for fa, ra, fb, rb in zip(f1, r1, f2, r2):
        # as close to torchvision's as the first-order gradient is (the double counts were off by 0.9-1.0)
        assert rel_err(fb, rb) <= 2 * rel_err(fa, ra) + 1e-5, (rel_err(fa, ra), rel_err(fb, rb))
        assert rel_err(fa, ra) < (0.2 if autocast else 1e-5)


def test_nchw_chain_keeps_the_weights_layout():
    """A small map runs its chain NCHW on CPU; a channels_last model's weights stay channels_last there
    (ATen's convolution then runs channels_last, as before the chain cast its own weights): re-laying
    them NCHW took 20 instead of 12 weight-sized copies per step on a tiny ResNet, and more time.  A
    channels_last chain lays NCHW weights out channels_last, once."""
    from fusedres.training.chain import _compute_weight

    w = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    nchw = torch.randn(2, 8, 3, 3)
    assert _compute_weight(w, nchw) is w
    assert _compute_weight(w, nchw.bfloat16()).is_contiguous(memory_format=torch.channels_last)
    cl = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert _compute_weight(w, cl) is w
    w2 = w.contiguous()
    assert _compute_weight(w2, cl).is_contiguous(memory_format=torch.channels_last)
    assert _compute_weight(w2, nchw) is w2


def test_batched_backward_with_channels_last_weights():
    """``is_grads_batched`` on a model moved to channels_last: handing the weight gradients back in
    the weights' layout asked a vmapped tensor for its layout (an NYI error)."""
    ref, cin = make_block("basic")
    ref = ref.double().train().to(memory_format=torch.channels_last)
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)
    got = []
    for model in (ref, fused):
        out = model(x)
        gouts = torch.randn(3, *out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        got.append(torch.autograd.grad(out, list(model.parameters()), gouts, is_grads_batched=True))
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_weight_gradient_gets_the_weights_strides_on_size_one_dims():
    """A 1x1 filter's gradient from a channels_last conv has channels_last strides on its size-1
    dims; DistributedDataParallel's ``gradient_as_bucket_view`` compares strides exactly (and copied
    the gradient every step with a warning), so the chain sets the weight's own, without a copy."""
    from fusedres.training.chain import _like

    for p in (torch.randn(16, 8, 1, 1), torch.randn(16, 8, 1, 1).contiguous(memory_format=torch.channels_last)):
        g = torch.randn(16, 8, 1, 1).contiguous(memory_format=torch.channels_last)
        g = torch.empty_strided(g.shape, (8, 1, 8, 8)).copy_(g)
        for src in (g, g.bfloat16()):
            out = _like(src, p)
            assert out.stride() == p.stride() and out.dtype == p.dtype
            assert torch.equal(out, src.to(p.dtype))
        assert _like(g, p).data_ptr() == g.data_ptr()  # no copy for the same dtype

"""Fused blocks vs torchvision's, on the CPU backends: forward, gradients, running stats."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models import resnet as tv

import fusedres
from helpers import assert_within_budget, randomize

# (block class, inplanes, planes, stride, groups, base_width, dilation)
CONFIGS = {
    "basic": (tv.BasicBlock, 16, 16, 1, 1, 64, 1),
    "basic-down": (tv.BasicBlock, 8, 16, 2, 1, 64, 1),
    "bottleneck": (tv.Bottleneck, 32, 8, 1, 1, 64, 1),
    "bottleneck-down": (tv.Bottleneck, 16, 8, 2, 1, 64, 1),
    "resnext": (tv.Bottleneck, 16, 8, 2, 4, 8, 1),
    "wide": (tv.Bottleneck, 32, 8, 1, 1, 128, 1),
    "dilated": (tv.Bottleneck, 32, 8, 1, 1, 64, 2),
}


def make_block(name: str, seed: int = 0):
    cls, inplanes, planes, stride, groups, width, dilation = CONFIGS[name]
    torch.manual_seed(seed)
    downsample = None
    if stride != 1 or inplanes != planes * cls.expansion:
        downsample = torch.nn.Sequential(
            tv.conv1x1(inplanes, planes * cls.expansion, stride),
            torch.nn.BatchNorm2d(planes * cls.expansion),
        )
    block = cls(inplanes, planes, stride, downsample, groups, width, dilation)
    return randomize(block, seed), inplanes


def _inputs(n, c, h, w, channels_last, dtype=torch.float32, seed=1):
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 10, 10), (1, 7, 9)], ids=["n2", "n1-odd"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_eval_forward(name, channels_last, shape, backend):
    ref, cin = make_block(name)
    ref.eval()
    fused = fusedres.convert(copy.deepcopy(ref), backend=backend)
    assert isinstance(fused, type(ref)) and type(fused).__module__ == "fusedres.modules"
    x = _inputs(shape[0], cin, shape[1], shape[2], channels_last)
    with torch.no_grad(), fusedres.backends.record() as used:
        out = fused(x)
    with torch.no_grad():
        expected = ref(x)
        truth = copy.deepcopy(ref).double()(x.double())
    assert used == ({"cpu"} if backend == "auto" else {"torch"})
    assert out.shape == expected.shape
    assert_within_budget(out, expected, truth, torch.float32)


@pytest.mark.parametrize("name", ["basic-down", "bottleneck-down", "resnext"])
def test_eval_forward_bf16(name):
    ref, cin = make_block(name)
    ref.eval()
    truth_model = copy.deepcopy(ref).double()
    ref = ref.to(torch.bfloat16)
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs(2, cin, 9, 9, True, torch.bfloat16)
    with torch.no_grad():
        out = fused(x)
        expected = ref(x)
        truth = truth_model(x.double())
    assert out.dtype == torch.bfloat16
    assert_within_budget(out, expected, truth, torch.bfloat16)


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gradients_and_running_stats(name, train, channels_last):
    ref, cin = make_block(name)
    ref.train(train)
    fused = fusedres.convert(copy.deepcopy(ref))
    xr = _inputs(2, cin, 8, 7, channels_last).requires_grad_()
    xf = xr.detach().clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    for (n, a), b in zip([("x", xf.grad)] + list(fused.named_parameters()), _grads(ref, xr)):
        grad = a if n == "x" else a.grad
        torch.testing.assert_close(grad, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {n}: {m}")
    for (n, a), b in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"buffer {n}: {m}")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_running_stats_and_num_batches(momentum):
    ref, cin = make_block("bottleneck-down")
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    ref.train()
    fused = fusedres.convert(copy.deepcopy(ref))
    for step in range(3):
        x = _inputs(3, cin, 6, 6, False, seed=10 + step)
        ref(x)
        fused(x)
    for (n, a), b in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"buffer {n}: {m}")
    assert fused.bn1.num_batches_tracked.item() == 3


def test_track_running_stats_false_eval_uses_batch_stats():
    ref, cin = make_block("basic-down")
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    ref.eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs(4, cin, 8, 8, False)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_direct_construction():
    ref, _ = make_block("bottleneck-down")
    sd = ref.state_dict()
    fused = fusedres.Bottleneck(16, 8, 2, copy.deepcopy(ref.downsample))
    assert isinstance(fused, tv.Bottleneck)
    fused.load_state_dict(sd)
    assert list(fused.state_dict()) == list(sd)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, sd[k]), k
    back = tv.Bottleneck(16, 8, 2, copy.deepcopy(ref.downsample))
    back.load_state_dict(fused.state_dict())
    basic = fusedres.BasicBlock(8, 8)
    assert list(basic.state_dict()) == list(tv.BasicBlock(8, 8).state_dict())


def test_results_follow_live_parameters():
    """Eval outputs never go stale: weights edited in place, new checkpoints, train/eval toggles."""
    ref, cin = make_block("basic-down")
    ref.eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs(2, cin, 8, 8, False)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        for m in (ref, fused):
            m.conv1.weight.mul_(1.5)
            m.bn2.running_var.add_(0.3)
            m.downsample[1].bias.add_(0.2)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        other, _ = make_block("basic-down", seed=5)
        ref.load_state_dict(other.state_dict())
        fused.load_state_dict(other.state_dict())
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    for m in (ref, fused):  # a training step moves the running stats; eval must see them
        m.train()
        m(x * 2 + 1)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_revert_restores_torchvision_classes():
    ref, _ = make_block("bottleneck-down")
    m = fusedres.convert(copy.deepcopy(ref))
    assert type(m) is fusedres.Bottleneck
    fusedres.revert(m)
    assert type(m) is tv.Bottleneck and "backend" not in m.__dict__


def test_custom_downsample_and_norm_fall_back_to_reference():
    """A downsample that is not conv1x1+BN is called as is; the rest still fuses."""
    ds = torch.nn.Sequential(torch.nn.AvgPool2d(2), tv.conv1x1(8, 16), torch.nn.BatchNorm2d(16))
    ref = randomize(tv.BasicBlock(8, 16, 2, ds)).eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    gn = tv.BasicBlock(8, 8, norm_layer=lambda c: torch.nn.GroupNorm(2, c)).eval()
    fused_gn = fusedres.convert(copy.deepcopy(gn))
    with torch.no_grad():
        torch.testing.assert_close(fused_gn(x), gn(x))


def test_results_follow_replaced_tensors_and_eps():
    """The folded scale/shift are reused only for the very same tensors at the same version."""
    ref, cin = make_block("bottleneck-down")
    ref.eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs(2, cin, 8, 8, False)
    with torch.no_grad():
        fused(x)  # fills the cache
        for m in (ref, fused):
            m.bn1.running_var = m.bn1.running_var * 1.7 + 0.1  # a new buffer object
            m.bn2.weight.data = m.bn2.weight.data * -0.5  # new storage behind the same Parameter
            m.downsample[1].eps = 0.3
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_eval_gradients_flow_to_bn_affine():
    """In eval mode with grad enabled the fold is recomputed, so BN weight/bias get gradients."""
    ref, cin = make_block("basic-down")
    ref.eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = _inputs(2, cin, 8, 8, False)
    with torch.no_grad():
        fused(x)  # a cached fold must not leak into the next, differentiable call
    fused(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(fused.bn1.weight.grad, ref.bn1.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.downsample[1].bias.grad, ref.downsample[1].bias.grad, rtol=1e-4, atol=1e-4)

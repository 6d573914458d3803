"""Whole torchvision models after ``convert()``: same state_dict, same outputs, revertible."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models import resnet as tv
from torchvision.ops.misc import FrozenBatchNorm2d

import fusedres
from helpers import assert_converts_and_matches, assert_within_budget, count_modules, randomize

MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2"]


def build(name, **kw):
    torch.manual_seed(0)
    return randomize(torchvision.models.get_model(name, weights=None, **kw)).eval()


@pytest.mark.parametrize("name", MODELS)
def test_convert_eval_matches(name):
    assert_converts_and_matches(build(name), (tv.BasicBlock, tv.Bottleneck),
                                (fusedres.BasicBlock, fusedres.Bottleneck), fusedres.FusedResNet,
                                torch.randn(2, 3, 48, 40), what=name)


def test_dilated_variant_and_revert():
    ref = build("resnet50", replace_stride_with_dilation=[False, True, True])
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        truth = copy.deepcopy(ref).double()(x.double())
        assert_within_budget(fused(x), ref(x), truth, torch.float32)
    fusedres.revert(fused)
    assert type(fused) is tv.ResNet
    assert count_modules(fused, (fusedres.Bottleneck,)) == 0 and count_modules(fused, (tv.Bottleneck,)) == 16


def test_train_step_matches_torchvision():
    ref = build("resnet18").train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 32, 32)
    out_r, out_f = ref(x), fused(x)
    out_r.square().mean().backward()
    out_f.square().mean().backward()
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")
    for (n, a), b in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{n}: {m}")


def test_checkpoints_load_both_ways():
    ref = build("resnet18")
    fused = fusedres.convert(build("resnet18"))
    other = randomize(torchvision.models.resnet18(), seed=3)
    fused.load_state_dict(other.state_dict())
    ref.load_state_dict(fused.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_frozen_batchnorm_model():
    """Detection backbones use torchvision's FrozenBatchNorm2d: it folds too."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).eval()
    for m in ref.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.2, 0.2)
            m.weight.uniform_(0.6, 1.4)
            m.bias.uniform_(-0.1, 0.1)
            assert c > 0
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad(), fusedres.backends.record() as used:
        out = fused(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
    assert used == {"cpu"}


def test_convert_inside_other_modules():
    """Blocks nested in an arbitrary container are converted; the container is left alone."""
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), tv.BasicBlock(8, 8), tv.BasicBlock(8, 8))
    fusedres.convert(body, backend="torch")
    assert type(body[1]) is fusedres.BasicBlock and body[1].backend == "torch"
    assert type(body) is torch.nn.Sequential
    fusedres.convert(body, backend="cpu")  # converting again changes the backend only
    assert type(body[1]) is fusedres.BasicBlock and body[1].backend == "cpu"


def test_convert_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fusedres.convert("resnet18")
    with pytest.raises(ValueError, match="backend"):
        fusedres.convert(torchvision.models.resnet18(), backend="tensorrt")

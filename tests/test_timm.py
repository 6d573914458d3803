"""timm's ResNet family after ``fusedres.convert``: same state_dict, same outputs, same training step."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fusedres
from fusedres import backends
from helpers import assert_converts_and_matches, assert_within_budget, count_modules, randomize, rel_err

timm = pytest.importorskip("timm")
from timm.models import resnet as timm_resnet  # noqa: E402

import fusedres.timm_models  # noqa: E402  (convert imports it; tests name its classes before any convert)

# plain, ResNet-D (deep stem, average-pool shortcut), deep-tiered stem, grouped, wide, SE, ECA, anti-aliased
MODELS = ["resnet18", "resnet50", "resnet50d", "resnet26t", "resnext50_32x4d", "wide_resnet50_2", "seresnet50",
          "ecaresnet50d", "resnetblur50"]
HAS_TRITON = backends.is_available("triton")


def build(name, **kw):
    torch.manual_seed(0)
    return randomize(timm.create_model(name, pretrained=False, **kw)).eval()


@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_timm(name):
    ref_classes = (timm_resnet.BasicBlock, timm_resnet.Bottleneck)
    fused, n = assert_converts_and_matches(
        build(name), ref_classes, (fusedres.timm_models.TimmBasicBlock, fusedres.timm_models.TimmBottleneck),
        fusedres.timm_models.TimmResNet, torch.randn(2, 3, 64, 64), what=name)
    fusedres.revert(fused)
    assert type(fused) is timm_resnet.ResNet and count_modules(fused, ref_classes) == n


@pytest.mark.parametrize("name, donated", [("resnet50", 12), ("resnet50d", 12), ("seresnet50", 0)])
def test_identity_residual_added_in_place_between_blocks(monkeypatch, name, donated):
    """TimmResNet hands block outputs on as donated like FusedResNet (tests/test_fidelity.py): the
    CPU backend adds each identity residual in place, bit-identical to blocks called one by one.
    SE blocks add the residual after the attention module, in place already, and donate nothing."""
    from fusedres.backends import cpu

    seen = []
    into = cpu.conv_bn_act_into
    monkeypatch.setattr(cpu, "conv_bn_act_into", lambda acc, *a, **k: seen.append(1) or into(acc, *a, **k))
    fused = fusedres.convert(build(name))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = fused.forward_features(x)
        assert len(seen) == donated
        stem = []
        hook = fused.layer1.register_forward_pre_hook(lambda m, a: stem.append(a[0]))
        assert torch.equal(fused.forward_features(x), out)  # layer1 then runs as a module
        hook.remove()
        y = stem[0]
        for layer in (fused.layer1, fused.layer2, fused.layer3, fused.layer4):
            for block in layer:
                y = block(y)
    assert torch.equal(out, y)


@pytest.mark.parametrize("name", ["resnet18", "resnet26d", "seresnet18"])
def test_train_step_matches_timm_in_float64(name):
    """One training step in float64: output, every gradient and every running statistic agree
    to 1e-9 (the fused chains where the block allows, timm's forward elsewhere)."""
    ref = build(name).train().double()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    cot = torch.randn(4, 1000, dtype=torch.float64)
    outs = []
    for model in (ref, fused):
        out = model(x)
        (out * cot).sum().backward()
        outs.append(out)
    assert rel_err(outs[1], outs[0]) < 1e-9
    for (name_, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert rel_err(b.grad, a.grad) < 1e-9, name_
    for (name_, a), b in zip(ref.named_buffers(), fused.buffers()):
        assert rel_err(b.double(), a.double()) < 1e-9, name_


def test_train_step_uses_the_chains():
    from helpers import chain_nodes

    fused = fusedres.convert(build("resnet18")).train()
    out = fused(torch.randn(4, 3, 32, 32))
    assert chain_nodes(out) == 9  # the stem and 8 blocks


@pytest.mark.parametrize("layout", ["nchw", "input_cl", "weights_cl", "shortcut_cl"])
def test_head_dropout_on_the_spatial_map_draws_timms_mask(layout):
    """A head that keeps the map (``global_pool=''``) with a drop rate: with the same seed the
    fused model drops the same elements as timm, whose mask follows its trunk's memory format
    (NCHW, or channels_last for a channels_last input or model; a channels_last shortcut conv
    alone leaves it NCHW, since ``x += shortcut`` keeps the main path's)."""
    ref = build("resnet18", global_pool="", num_classes=0, drop_rate=0.5, down_kernel_size=3).train().double()
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)  # layer4 4x4: the fused trunk's map is channels_last
    if layout == "input_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "weights_cl":
        ref.to(memory_format=torch.channels_last)
    elif layout == "shortcut_cl":
        w = ref.layer4[0].downsample[0].weight
        w.data = w.data.contiguous(memory_format=torch.channels_last)
    fused = fusedres.convert(copy.deepcopy(ref))
    outs = []
    for model in (ref, fused):
        torch.manual_seed(7)
        outs.append(model(x))
    assert outs[0].dim() == 4 and (outs[0] == 0).float().mean() > 0.4  # the dropout acted on the map
    assert torch.equal(outs[1] == 0, outs[0] == 0)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "input_cl"])
def test_head_dropout_on_the_spatial_map_draws_timms_mask_cuda(layout):
    """The same on CUDA, fp32: the fused trunk's map reaches timm's head dropout in the layout
    timm's cuDNN trunk gives, so one seed drops the same elements.  fp32 rounding may flip a
    ReLU zero here and there; a mask drawn over another layout would differ at about half of
    the elements."""
    ref = build("resnet18", global_pool="", num_classes=0, drop_rate=0.5).train().cuda()
    x = torch.randn(4, 3, 128, 128, device="cuda")
    if layout == "input_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    fused = fusedres.convert(copy.deepcopy(ref))
    outs = []
    with fusedres.backends.record() as used:
        for model in (ref, fused):
            torch.manual_seed(7)
            outs.append(model(x))
    assert used and "reference" not in used  # the fused trunk ran, not timm's forward
    assert (outs[0] == 0).float().mean() > 0.4
    assert ((outs[1] == 0) != (outs[0] == 0)).float().mean() < 1e-3
    assert rel_err(outs[1], outs[0]) < 1e-2


def test_head_dropout_model_still_traces():
    """torch.fx (and create_feature_extractor, which traces in train mode) through such a model."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = fusedres.convert(build("resnet18", global_pool="", num_classes=0, drop_rate=0.5).double())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="torch.fx"):
        traced = torch.fx.symbolic_trace(model.train())
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(traced(x), want, rtol=1e-9, atol=1e-9)
    feats = create_feature_extractor(model.eval(), ["layer3"])(x)
    assert feats["layer3"].shape == (2, 256, 4, 4)


def test_active_drop_path_keeps_timms_forward():
    ref = build("resnet18", drop_path_rate=0.2).train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    want = ref(x)
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="drop_path"):
        got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # In eval drop-path is an identity: the block fuses again.
    with torch.no_grad(), backends.record() as used:
        fused.eval()(x)
    assert used == {"cpu"}


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
def test_se_block_on_triton():
    """SE, the stem and the fused shortcut through the Triton kernels (the interpreter on CPU)."""
    block_model = build("seresnet18")
    block = block_model.layer2[0]  # stride 2, projection shortcut, SE
    fused = fusedres.convert(copy.deepcopy(block), backend="triton")
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad(), backends.record() as used:
        out = fused(x)
        truth = copy.deepcopy(block).double()(x.double())
        assert_within_budget(out, block(x), truth, torch.float32)
    assert used == {"triton"}


def test_convert_reports_what_it_did(caplog):
    with caplog.at_level(logging.INFO, logger="fusedres"):
        model = fusedres.convert(build("seresnet50"))
    assert "fused 1 TimmResNet, 16 TimmBottleneck" in caplog.text
    assert "the attention SEModule" in fusedres.explain(model)
    with pytest.warns(UserWarning, match="nothing was converted"):
        fusedres.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
    # Blocks of a class fusedres does not know are named, not left unmentioned.
    report = fusedres.explain(fusedres.convert(build("skresnet18")))
    assert "8 modules (layer1.0, layer1.1, layer2.0, layer2.1 and 4 more): not converted: SelectiveKernelBasic" in report
    assert "not converted" not in fusedres.explain(model)


def test_jit_script_timm():
    ref = build("resnet26d")
    fused = fusedres.convert(copy.deepcopy(ref))
    scripted = torch.jit.script(fused)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref(x), rtol=1e-4, atol=1e-4)


def test_drop_path_raised_after_a_training_call():
    """A stochastic-depth schedule raises drop_prob after the first step: the training chain made
    while it was 0 must give way to timm's forward."""
    from timm.layers import DropPath

    torch.manual_seed(0)
    ref = randomize(timm_resnet.BasicBlock(8, 8, drop_path=DropPath(0.0))).train()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(4, 8, 9, 9)
    fused(x)
    for m in (ref, fused):
        m.drop_path.drop_prob = 1.0  # the residual branch is dropped for every sample: deterministic
    with pytest.warns(RuntimeWarning, match="drop_path"):
        got = fused(x)
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-5)


def test_hook_on_a_deep_stem_fires():
    ref, fused = build("resnet26d"), fusedres.convert(build("resnet26d"))
    calls = []
    for m in (ref, fused):
        m.conv1.register_forward_hook(lambda mod, inp, out: calls.append(1) or out * 0.5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
        with pytest.warns(RuntimeWarning, match="has hooks"):
            got = fused(x)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

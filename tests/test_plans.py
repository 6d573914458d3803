"""Per-layer plans (fusedres/plan.py): decided once per input signature, never stale.

Every case makes a plan (a first call), changes something a plan depends on, and checks the
next call against torchvision's block computing the same thing.
"""

from __future__ import annotations

import collections
import copy
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as tv

import fusedres
from fusedres import backends, plan
from helpers import randomize


def _pair(kind="down", seed=0):
    """A torchvision block and its converted deep copy."""
    torch.manual_seed(seed)
    if kind == "down":
        ref = tv.BasicBlock(8, 16, 2, nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    else:
        ref = tv.Bottleneck(16, 4)
    ref = randomize(ref, seed).eval()
    return ref, fusedres.convert(copy.deepcopy(ref))


def _x(c=8, seed=1):
    return torch.randn(2, c, 9, 10, generator=torch.Generator().manual_seed(seed))


def _same(fused, ref, x, **kw):
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4, **kw)


def _plan_of(module):
    plans = plan._PLANS.get(module)
    return next(iter(plans.values())) if plans else None


def test_plan_is_made_once_and_reused():
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    first = _plan_of(fused)
    assert first is not None and first.route == "eval"
    _same(fused, ref, x)
    assert _plan_of(fused) is first
    _same(fused, ref, _x(seed=2))  # new values, same signature: same plan
    assert _plan_of(fused) is first


def test_new_shape_new_plan():
    ref, fused = _pair()
    _same(fused, ref, _x())
    _same(fused, ref, torch.randn(3, 8, 12, 7))
    assert len(plan._PLANS[fused]) == 2


def test_replaced_parameter_rebuilds():
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    for m in (ref, fused):
        torch.manual_seed(3)
        m.conv2.weight = nn.Parameter(torch.randn_like(m.conv2.weight))
        m.bn1.running_var = torch.rand_like(m.bn1.running_var) + 0.5
    _same(fused, ref, x)


def test_replaced_submodule_inside_the_downsample_rebuilds():
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    for m in (ref, fused):
        torch.manual_seed(4)
        m.downsample[1] = randomize(nn.BatchNorm2d(16), 4).eval()
    _same(fused, ref, x)


def test_changed_geometry_rebuilds():
    ref, fused = _pair("bottleneck")
    x = _x(16)
    _same(fused, ref, x)
    for m in (ref, fused):
        m.conv2.dilation, m.conv2.padding = (2, 2), (2, 2)
    _same(fused, ref, x)


def test_bn_frozen_on_its_own_switches_route():
    """model.train(), then each BN put in eval by hand (freezing BN to fine-tune): the block must
    normalise with the running statistics from then on, though its own train() never ran."""
    ref, fused = _pair()
    x = _x()
    ref.train(), fused.train()
    with torch.no_grad():
        fused(x), ref(x)
    assert _plan_of(fused).route == "train"
    for m in (ref, fused):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    _same(fused, ref, x)
    assert any(p.route == "eval" for p in plan._PLANS[fused].values())


def test_hooks_added_then_removed():
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    seen = []
    handle = fused.conv1.register_forward_hook(lambda *a: seen.append(1))
    with pytest.warns(RuntimeWarning, match="has hooks"):
        _same(fused, ref, x)
    assert seen == [1]
    handle.remove()
    with backends.record() as used:
        _same(fused, ref, x)
    assert used == {"cpu"} and seen == [1]


def test_forward_set_on_a_submodule_runs_the_reference():
    """A fused forward would skip a forward set on a conv instance; the block takes the reference."""
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    calls = []
    conv = fused.conv2
    conv.forward = lambda t: calls.append(1) or nn.Conv2d.forward(conv, t)
    with pytest.warns(RuntimeWarning, match="a forward of its own"):
        _same(fused, ref, x)
    assert calls == [1]


def test_to_dtype_drops_plans():
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    ref.double(), fused.double()
    assert fused not in plan._PLANS
    _same(fused, ref, x.double())


def test_requires_grad_toggled_in_eval():
    """A plan made without autograd must not serve a call that needs it (gradients would vanish)."""
    ref, fused = _pair()
    x = _x()
    for m in (ref, fused):
        m.requires_grad_(False)
    with torch.enable_grad():
        fused(x)
        for m in (ref, fused):
            m.requires_grad_(True)
            m(x).square().sum().backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_plan_follows_which_tensors_need_grad():
    """Each fused call decides once whether it needs autograd, from its own operands: a plan made
    while one conv was trainable must not serve a call where the input, or another conv, is."""
    ref, fused = _pair()
    x = _x()
    for m in (ref, fused):
        m.requires_grad_(False)
        m.conv2.weight.requires_grad_(True)
    with torch.enable_grad():
        fused(x).sum().backward()  # plans: conv1 inference-only, conv2 with autograd
        ins = []
        for m in (ref, fused):
            xi = x.clone().requires_grad_()
            m(xi).square().sum().backward()
            ins.append(xi.grad)
        torch.testing.assert_close(ins[1], ins[0], rtol=1e-4, atol=1e-4)
        for m in (ref, fused):
            m.zero_grad()
            m.conv2.weight.requires_grad_(False)
            m.conv1.weight.requires_grad_(True)
            out = m(x)
            assert out.requires_grad
            out.square().sum().backward()
        torch.testing.assert_close(fused.conv1.weight.grad, ref.conv1.weight.grad, rtol=1e-4, atol=1e-4)


def test_backend_and_environment_follow():
    ref, fused = _pair()
    x = _x()
    with backends.record() as used:
        _same(fused, ref, x)
        fused.backend = "torch"
        _same(fused, ref, x)
    assert used == {"cpu", "torch"}
    fused.backend = "auto"
    os.environ["FUSEDRES_BACKEND"] = "torch"
    try:
        with backends.record() as used:
            _same(fused, ref, x)
    finally:
        del os.environ["FUSEDRES_BACKEND"]
    assert used == {"torch"}


def test_onednn_switched_off_is_honoured():
    """``torch.backends.mkldnn.enabled = False`` keeps torchvision's convs off oneDNN; a converted
    model then takes the reference, even with a plan made while oneDNN was on, and takes the
    ``cpu`` backend again once it is back on.  Naming ``cpu`` while it is off raises."""
    from torch.profiler import ProfilerActivity, profile
    from torchvision.models import resnet18

    torch.manual_seed(0)
    ref = randomize(resnet18(num_classes=10), 0).eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with backends.record() as used:
        _same(fused, ref, x)
    assert used == {"cpu"}
    with torch.backends.mkldnn.flags(enabled=False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with backends.record() as used, profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            out = fused(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(fusedres.BackendUnavailableError, match="mkldnn.enabled"), torch.no_grad():
            fusedres.conv_bn_act(x, ref.conv1.weight, torch.ones(64), torch.zeros(64), stride=2, padding=3,
                                 backend="cpu")
    assert used == {"torch"}
    onednn = sorted({e.name for e in prof.events() if "mkldnn" in e.name})
    assert not onednn, onednn
    assert any("switched off" in str(w.message) for w in caught), [str(w.message) for w in caught]
    with backends.record() as used:
        _same(fused, ref, x)
    assert used == {"cpu"}


def test_copies_never_share_plans():
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        with torch.no_grad():
            clone.conv1.weight.mul_(2)
            ref2 = copy.deepcopy(ref)
            ref2.conv1.weight.mul_(2)
        _same(clone, ref2, x)
        _same(fused, ref, x)


def test_clear_caches_drops_plans():
    ref, fused = _pair()
    _same(fused, ref, _x())
    fusedres.clear_caches()
    assert fused not in plan._PLANS


def test_stem_plan_follows_mode_and_weights():
    import torchvision

    torch.manual_seed(0)
    ref = randomize(torchvision.models.resnet18(num_classes=10)).eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 32)
    _same(fused, ref, x)
    with torch.no_grad():
        for m in (ref, fused):
            m.bn1.running_mean.add_(0.5)  # in place: the plan stays, the values are read live
    _same(fused, ref, x)
    for m in (ref, fused):
        m.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        m.conv1.weight = nn.Parameter(torch.ones_like(m.conv1.weight) * 0.01)
    _same(fused, ref, x)


# --------------------------------------------------------------------------- whole-model (trunk) plans


def _models(seed=0):
    """A small torchvision ResNet-18 and its converted deep copy."""
    import torchvision

    torch.manual_seed(seed)
    ref = randomize(torchvision.models.resnet18(num_classes=10), seed).eval()
    return ref, fusedres.convert(copy.deepcopy(ref))


def _trunk_routes(model):
    return sorted(p.route for k, p in plan._PLANS.get(model, {}).items() if k[0] == "trunk")


def test_model_runs_one_trunk_plan():
    """An inference call plans the stem and stages once, as one run of the model: the blocks keep
    no plans of their own, and the next call reuses it."""
    ref, fused = _models()
    x = torch.randn(2, 3, 32, 32)
    _same(fused, ref, x)
    assert _trunk_routes(fused) == ["trunk"]
    first = next(p for k, p in plan._PLANS[fused].items() if k[0] == "trunk")
    assert all(_plan_of(b) is None for b in fused.modules() if isinstance(b, tv.BasicBlock))
    _same(fused, ref, torch.randn(2, 3, 32, 32))
    assert next(p for k, p in plan._PLANS[fused].items() if k[0] == "trunk") is first


def _revert_block(ref, fused, monkeypatch):
    block = fusedres.revert(fused.layer2[0])
    calls = []
    forward = tv.BasicBlock.forward  # now the reverted block's own
    monkeypatch.setattr(tv.BasicBlock, "forward", lambda self, x: calls.append(self is block) or forward(self, x))
    return lambda used: calls.count(True) == 1


def _forward_on_a_conv(ref, fused, monkeypatch):
    calls = []
    conv = fused.layer4[0].conv1
    conv.forward = lambda x: calls.append(1) or nn.Conv2d.forward(conv, x)
    return lambda used: calls == [1] and "reference" in used


def _forward_on_instance(ref, fused, monkeypatch):
    calls = []
    block = fused.layer1[1]
    block.forward = lambda x: calls.append(1) or type(block).forward(block, x)
    return lambda used: calls == [1]


def _block_backend(ref, fused, monkeypatch):
    fused.layer3[1].backend = "torch"
    return lambda used: used == {"cpu", "torch"}


def _hook_on_a_conv(ref, fused, monkeypatch):
    calls = []
    fused.layer4[1].conv2.register_forward_hook(lambda *a: calls.append(1))
    return lambda used: calls == [1] and "reference" in used


def _block_in_train_mode(ref, fused, monkeypatch):
    for m in (ref, fused):
        m.layer1[1].train()  # batch statistics (and running-stat updates) in that block only
    return lambda used: used == {"cpu", "train:torch"}


def _replaced_weight(ref, fused, monkeypatch):
    for m in (ref, fused):
        torch.manual_seed(5)
        m.layer2[1].conv1.weight = nn.Parameter(torch.randn_like(m.layer2[1].conv1.weight) * 0.05)
    return lambda used: used == {"cpu"}


def _replaced_activation(ref, fused, monkeypatch):
    for m in (ref, fused):
        m.layer3[0].relu = nn.ReLU6()  # same class of block, another layer: the reference runs
    return lambda used: "reference" in used


def _parameter_dict_swapped(ref, fused, monkeypatch):
    for m in (ref, fused):
        conv = m.layer1[1].conv1
        params = collections.OrderedDict(conv._parameters)
        torch.manual_seed(6)
        params["weight"] = nn.Parameter(torch.randn_like(conv.weight) * 0.05)
        conv._parameters = params
    return lambda used: used == {"cpu"}


def _block_class_forward_patched(ref, fused, monkeypatch):
    calls = []
    forward = fusedres.modules.BasicBlock.forward
    monkeypatch.setattr(fusedres.modules.BasicBlock, "forward", lambda self, x: calls.append(1) or forward(self, x))
    return lambda used: len(calls) == 8


def _stem_pool_changed(ref, fused, monkeypatch):
    for m in (ref, fused):
        m.maxpool.stride = 1  # every block's input grows
    return lambda used: used == {"cpu"}


@pytest.mark.parametrize("change", [_revert_block, _forward_on_instance, _forward_on_a_conv, _block_backend,
                                    _hook_on_a_conv, _block_in_train_mode, _replaced_weight, _replaced_activation,
                                    _parameter_dict_swapped, _block_class_forward_patched, _stem_pool_changed])
def test_trunk_plan_follows_changes_to_its_parts(change, monkeypatch):
    """What a block's own plan would notice, the model's one plan notices too: every change made
    after it was built takes effect on the next call, which matches torchvision."""
    ref, fused = _models()
    x = torch.randn(2, 3, 32, 32)
    _same(fused, ref, x)
    check = change(ref, fused, monkeypatch)
    with backends.record() as used, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _same(fused, ref, x)
    assert check(used), used
    # and it keeps following: a second call after the change computes the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _same(fused, ref, x)


def test_trunk_replans_only_the_block_that_changed(monkeypatch):
    """A parameter replaced in the last block re-plans that block from its own input: the stem and
    the blocks before it run once, as with per-block plans."""
    ref, fused = _models()
    x = torch.randn(2, 3, 32, 32)
    _same(fused, ref, x)
    pools = []
    pool_forward = nn.MaxPool2d.forward
    monkeypatch.setattr(nn.MaxPool2d, "forward", lambda self, t: pools.append(self is fused.maxpool) or pool_forward(self, t))
    for m in (ref, fused):
        torch.manual_seed(7)
        m.layer4[1].conv2.weight = nn.Parameter(torch.randn_like(m.layer4[1].conv2.weight) * 0.05)
    _same(fused, ref, x)
    assert pools.count(True) == 1
    assert _trunk_routes(fused) == ["trunk"]


def test_trunk_stays_valid_at_batch_zero_after_the_pool_changes():
    """An empty batch computes nothing, only shapes: those follow a changed stem pool too."""
    ref, fused = _models()
    x = torch.randn(0, 3, 32, 32)

    def features(m):  # what the trunk computes: the model's forward up to the average pool
        with torch.no_grad():
            return m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))

    with torch.no_grad():
        assert fused._trunk(x).shape == features(ref).shape == (0, 512, 1, 1)
        for m in (ref, fused):
            m.maxpool.stride = 1
        assert fused._trunk(x).shape == features(ref).shape == (0, 512, 2, 2)


class _Sub(torch.Tensor):
    """A tensor subclass that records the ops it sees."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(getattr(func, "__name__", func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_plan_made_for_a_plain_tensor_is_not_reused_for_a_subclass():
    """A subclass input must see the fused ops (and no in-place write into its tensors): the
    plan signature includes the input's class."""
    ref, fused = _pair("bottleneck")
    x = _x(16)
    _same(fused, ref, x)  # a plan for a plain tensor: direct kernel calls, donation allowed
    _Sub.seen = []
    with torch.no_grad():
        out = fused(x.as_subclass(_Sub))
    torch.testing.assert_close(out.as_subclass(torch.Tensor), ref(x), rtol=1e-4, atol=1e-4)
    assert any("conv_bn_act_cpu" in name for name in _Sub.seen), _Sub.seen[:20]


def test_scripted_submodules_are_plain_calls():
    """torch.jit.script keeps the compiled forward in the instance dict: that is not a user override."""
    from fusedres import patterns

    assert patterns.plain_call(torch.jit.script(nn.ReLU()))
    relu = nn.ReLU()
    relu.forward = lambda t: t
    assert not patterns.plain_call(relu)


def test_trunk_is_not_used_when_some_layers_need_gradients():
    """layer1 frozen, the rest trainable, grad mode on: each block decides for itself (the frozen
    ones may run inference-only kernels), and every gradient matches torchvision's."""
    ref, fused = _models()
    x = torch.randn(2, 3, 32, 32)
    for m in (ref, fused):
        m.requires_grad_(False)
    with torch.no_grad():
        fused(x)  # a trunk plan made without autograd
    for m in (ref, fused):
        m.layer3.requires_grad_(True)
        m.fc.requires_grad_(True)
        m(x).square().sum().backward()
    assert _trunk_routes(fused) == ["trunk"]
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)


# --------------------------------------------------------------------------- dispatch modes


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_fused_ops():
    ref, fused = _pair()
    x = _x()
    with torch.no_grad():
        fused(x)  # a plan made without the mode
        with _Log() as log:
            out = fused(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
    assert "fusedres.conv_bn_act_cpu.default" in log.ops
    assert "fusedres.block_tail_cpu.default" in log.ops
    assert not any("mkldnn" in op for op in log.ops)  # the op is opaque to the mode


def test_flop_formulas_count_the_convs():
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, 9, 10, generator=g), torch.randn(16, 8, 3, 3, generator=g)
    xd, wd = torch.randn(2, 4, 9, 10, generator=g), torch.randn(16, 4, 1, 1, generator=g)
    s, b = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fused_count:
            fusedres.conv_bn_act(x, w, s, b, padding=1, backend="cpu")
            fusedres.block_tail(x, w, s, b, xd, wd, s, b, padding=1, backend="cpu")
        with FlopCounterMode(display=False) as ref_count:
            torch.nn.functional.conv2d(x, w, padding=1)
            torch.nn.functional.conv2d(x, w, padding=1)
            torch.nn.functional.conv2d(xd, wd)
    assert fused_count.get_total_flops() == ref_count.get_total_flops() > 0


def test_flop_counter_totals_equal_torchvision():
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    ref = torchvision.models.resnet18().eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    x = torch.randn(1, 3, 64, 64)
    totals = []
    for m in (ref, fused):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x)
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1] > 0


def test_profiler_sees_the_fused_ops():
    ref, fused = _pair()
    x = _x()
    with torch.no_grad():
        fused(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fused(x)
    names = {e.key for e in prof.key_averages()}
    assert "fusedres::conv_bn_act_cpu" in names and "fusedres::block_tail_cpu" in names


# --------------------------------------------------------------------------- import


def test_import_touches_no_device():
    """``import fusedres`` (and converting a model) must not initialise CUDA: a process may fork
    DataLoader workers afterwards.  Availability is asked on first use."""
    code = textwrap.dedent("""
        import torch, torchvision
        def boom(*a, **k):
            raise AssertionError("a device was touched at import")
        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_capability = boom
        torch.cuda.get_device_properties = boom
        torch.cuda.init = boom
        torch.cuda._lazy_init = boom
        import fusedres
        fusedres.convert(torchvision.models.resnet18())
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --------------------------------------------------------------------------- op checks


def _cpu_op_args(c_in=8, k=16, w_c=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 9, 10, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, w_c, 3, 3, generator=g)
    s, b = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    return (x, w, s, b, None, None, None, 0.0, [1, 1], [1, 1], [1, 1], 1, True)


def test_cpu_ops_pass_opcheck():
    torch.library.opcheck(torch.ops.fusedres.conv_bn_act_cpu, _cpu_op_args())
    x, w, s, b = _cpu_op_args()[:4]
    xd, wd = torch.randn(2, 4, 9, 10), torch.randn(16, 4, 1, 1)
    torch.library.opcheck(torch.ops.fusedres.block_tail_cpu,
                          (x, w, s, b, xd, wd, s, b, None, None, 0.0, s.abs(), s.abs() + 1, 1e-5,
                           [1, 1], [1, 1], [1, 1], 1, [1, 1], True))


def test_op_and_its_fake_report_the_same_error():
    """One set of checks for the eager op and its fake: torch.compile reports eager's error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    bad = _cpu_op_args(c_in=8, w_c=4)  # weight expects 4 input channels, x has 8
    with pytest.raises(ValueError) as eager:
        torch.ops.fusedres.conv_bn_act_cpu(*bad)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bad]
        with pytest.raises(RuntimeError) as traced:
            torch.ops.fusedres.conv_bn_act_cpu(*fake)
    assert "does not fit x's 8 channels" in str(eager.value)
    assert str(eager.value).split(": ", 1)[1] in str(traced.value)


# --------------------------------------------------------------------------- review follow-ups


def test_bn_writes_through_data_are_seen():
    """The cpu backend's fold cache compares the BN vectors' values, so a write through ``.data``
    (no version bump) is seen too."""
    ref, fused = _pair()
    x = _x()
    _same(fused, ref, x)
    for m in (ref, fused):
        m.bn1.running_var.data.mul_(4)
        m.bn2.weight.data.fill_(2.0)
    _same(fused, ref, x)


def test_padding_mode_and_submodule_dtype_changes():
    ref, fused = _pair("bottleneck")
    x = _x(16)
    _same(fused, ref, x)
    for m in (ref, fused):
        m.conv2.padding_mode = "reflect"  # not fusable: the plan must not keep zero padding
    with pytest.warns(RuntimeWarning):
        _same(fused, ref, x)
    for m in (ref, fused):
        m.conv2.padding_mode = "zeros"
        m.conv1.double()  # one submodule moved on its own: torchvision raises, so must the fused block
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        fused(x)
    assert str(got.value) == str(want.value)


def test_cpu_op_fp32_residual_under_profiler_is_bit_identical():
    """fp32: the dispatched op (what a profiler sees) adds the identity residual in a separate
    pass, the eager call accumulates into the donated input; the same output bit for bit, NaN
    and inf included, and both match torchvision."""
    ref, fused = _pair("bottleneck")
    fused = fusedres.convert(fused, backend="cpu")
    x = _x(16)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 4, 5] = float("inf")
    x[1, 3, 0, 0] = -float("inf")
    with torch.no_grad():
        want = ref(x)
        eager = fused(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            got = fused(x)
    assert "fusedres::conv_bn_act_cpu" in {e.name for e in p.events()}  # the dispatched op ran
    assert want.isnan().any() and got.dtype == torch.float32
    assert torch.equal(got.isnan(), eager.isnan()) and torch.equal(got.nan_to_num(), eager.nan_to_num())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_cpu_op_under_autocast_and_profiler():
    """Under autocast the registered op (what a profiler sees) takes the fp32 weight and folds it
    once, as the eager call does: the same bf16 output bit for bit, and no fold per call (before,
    the weight was cast to bf16 ahead of the op, so the fold rounded twice and missed its cache)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU")
    from fusedres.backends import cpu

    ref, fused = _pair("bottleneck")
    fused = fusedres.convert(fused, backend="cpu")
    x = _x(16)
    prof = lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])  # noqa: E731
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x)
        eager = fused(x)
        tag = (torch.bfloat16, fused.bn1.eps)
        entry = cpu._cache.get(fused.conv1.weight, tag)
        with prof() as p:
            got = fused(x)
        with prof():
            again = fused(x)
    names = {e.name for e in p.events()}
    assert "fusedres::conv_bn_act_cpu" in names  # the dispatched op ran, not the inlined call
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, eager) and torch.equal(again, eager)
    assert entry is not None and cpu._cache.get(fused.conv1.weight, tag) is entry
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)

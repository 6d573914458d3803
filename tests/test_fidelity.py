"""Drop-in fidelity: a converted model computes what torchvision computes, in every way a user runs it.

NaN/Inf propagation, hooks and weight transforms, caches across dtype and storage changes,
forward-mode AD, tracing / scripting / export / vmap, state left alone by a failing call,
autocast.  Each case runs on the backends whose code path it reaches: ``cpu`` (oneDNN),
``triton`` through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a
GPU), and ``torch``.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import resnet as tv

import fusedres
from fusedres import backends
from helpers import assert_within_budget, randomize

HAS_TRITON = backends.is_available("triton")
BACKENDS = ["cpu", "torch"] + (["triton"] if HAS_TRITON else [])


def _resnet18(num_classes=10):
    torch.manual_seed(0)
    return randomize(torchvision.models.resnet18(num_classes=num_classes)).eval()


def _block(kind="basic-down", seed=0):
    torch.manual_seed(seed)
    if kind == "basic-down":
        ds = nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
        block = tv.BasicBlock(8, 16, 2, ds)
    elif kind == "basic":
        block = tv.BasicBlock(16, 16)
    else:  # bottleneck with a projection shortcut
        ds = nn.Sequential(tv.conv1x1(16, 32, 1), nn.BatchNorm2d(32))
        block = tv.Bottleneck(16, 8, 1, ds)
    return randomize(block, seed).eval()


def _x(c=8, n=2, hw=(9, 10), seed=1):
    return torch.randn(n, c, *hw, generator=torch.Generator().manual_seed(seed))


def _fused(ref, backend="auto"):
    return fusedres.convert(copy.deepcopy(ref), backend=backend)


def _same_nan_pattern(out, ref, superset=False):
    """NaN exactly where the reference has NaN (``superset``: at least there), the rest close."""
    want, got = ref.isnan(), out.isnan()
    ok = bool((got | ~want).all()) if superset else torch.equal(got, want)
    assert ok, f"NaN pattern differs: fused {int(got.sum())} NaN, reference {int(want.sum())}"
    fin = ~got
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 1. NaN and Inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["input", "weight", "running_var", "residual"])
def test_nan_propagates_through_fused_ops(backend, where):
    """A NaN anywhere reaches the output exactly where torch's relu(conv(...)) has one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 7, 6, generator=g)
    w = torch.randn(12, 8, 3, 3, generator=g) * 0.2
    bn_w, bn_b = torch.rand(12, generator=g) + 0.5, torch.randn(12, generator=g) * 0.1
    mean, var = torch.randn(12, generator=g) * 0.1, torch.rand(12, generator=g) + 0.5
    res = torch.randn(2, 12, 7, 6, generator=g)
    {"input": x, "weight": w, "running_var": var, "residual": res}[where].view(-1)[5] = float("nan")
    out = fusedres.conv_bn_act(x, w, bn_w, bn_b, padding=1, residual=res, running_mean=mean, running_var=var,
                               backend=backend)
    ref = torch.relu(
        (torch.nn.functional.conv2d(x, w, padding=1) - mean.view(-1, 1, 1)) / (var.view(-1, 1, 1) + 1e-5).sqrt()
        * bn_w.view(-1, 1, 1) + bn_b.view(-1, 1, 1) + res
    )
    assert ref.isnan().any()
    # An implicit GEMM multiplies the zero padding by the weights too, so a NaN weight also
    # reaches the border outputs whose window overlaps the padding (torch's CPU conv skips the
    # padding).  Those outputs are NaN, never a finite value torch would not give.
    _same_nan_pattern(out, ref, superset=backend == "triton" and where == "weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_through_block_tail(backend):
    block = _block("basic-down")
    x = _x()
    x[0, 3, 4, 4] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    with torch.no_grad():
        ref = block(x)
        out = _fused(block, backend)(x)
    assert ref.isnan().any()
    _same_nan_pattern(out, ref)


def test_nan_pixel_gives_nan_logits():
    """A converted ResNet-18 with one NaN input pixel returns NaN logits, as torchvision does
    (oneDNN's ReLU post-op used to turn the NaN into 0 and give finite logits)."""
    ref = _resnet18()
    x = torch.randn(2, 3, 64, 64)
    x[0, 1, 20, 20] = float("nan")
    with torch.no_grad():
        want = ref(x)
        got = _fused(ref)(x)
    assert want[0].isnan().all() and not want[1].isnan().any()
    _same_nan_pattern(got, want)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("where", ["stem", "block", "downsample", "conv"])
def test_bn_moved_alone_to_bf16_raises_like_torchvision(where, train):
    """A BatchNorm (or a conv) moved on its own to bf16 under an fp32 input, after plans were
    made: torch raises, and so does the converted model, the same error, with no running
    statistic moved (the plan is stale and the new one sends it to the reference forward; the
    eval ops raised a TypeError of their own, the train chain cast the tensors and computed)."""
    ref = _resnet18().train(train)
    fused = _fused(ref).train(train)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref(x), fused(x)  # plans exist (and in train mode both moved their running statistics)
    pick = {"stem": lambda m: m.bn1, "block": lambda m: m.layer1[0].bn2,
            "downsample": lambda m: m.layer2[0].downsample[1], "conv": lambda m: m.layer1[1].conv1}[where]
    errors, moved = [], []
    for m in (ref, fused):
        pick(m).to(torch.bfloat16)
        before = [b.clone() for b in m.buffers()]
        with pytest.raises(RuntimeError) as info, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m(x)
        errors.append(str(info.value))
        moved.append([not torch.equal(a, b) for a, b in zip(before, m.buffers())])
    assert errors[0] == errors[1]
    # the same running statistics moved before the error (in train mode those of the layers that
    # ran before the failing one, as in torchvision; none in eval)
    assert moved[0] == moved[1] and (train or not any(moved[0]))


def test_bf16_model_with_fp32_bns_stays_fused():
    """bf16 activations with fp32 BatchNorms (torch's mixed-dtype BN) are not sent to the reference."""
    ref = _resnet18().bfloat16()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.float()
    fused = _fused(ref)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got, want = fused(x), ref(x)
    assert not [w for w in seen if "BatchNorm's" in str(w.message)]
    torch.testing.assert_close(got.float(), want.float(), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_stem_relu_after_pool_keeps_values_nan_and_inf(backend):
    """On backends whose ReLU is a separate pass, the eval stem runs it after the max-pool (on a
    quarter of the elements): same values, NaN and +-inf as torchvision's relu-then-pool,
    ceil_mode and a changed pool included; a pool module with a hook keeps the module call."""
    from fusedres import plan as plan_mod
    from fusedres.modules import _StemEvalRun

    ref = _resnet18()
    fused = _fused(ref, backend)
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    x[0, 0, 7, 7] = float("nan")
    x[1, 2, 3:5, 3:5] = float("inf")
    x[1, 1, 20, 20] = -float("inf")

    def stem(m, x):
        return m.maxpool(m.relu(m.bn1(m.conv1(x))))

    with torch.no_grad():
        for ceil_mode in (False, True):
            for m in (ref, fused):
                m.maxpool.ceil_mode = ceil_mode
            want, got = stem(ref, x), fused._stem(x)
            assert want.isnan().any() and want.isinf().any()
            _same_nan_pattern(got, want)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        runs = [p.run for p in plan_mod._PLANS[fused].values() if isinstance(p.run, _StemEvalRun)]
        assert runs and all(r.relu_after_pool for r in runs)
        seen = []
        fused.maxpool.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
        got = fused._stem(x)
        _same_nan_pattern(got, stem(ref, x))
        assert len(seen) == 1 and not (seen[0] < 0).any()  # the hook sees the ReLU's output, as in torchvision


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("geom", [(3, 7, 2, 3), (3, 3, 1, 1), (5, 1, 1, 0), (1, 3, 1, 1)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bf16_odd_channel_conv_keeps_nan_and_inf_where_they_belong(backend, geom, value):
    """oneDNN's bf16 convolutions with an odd channel count (an RGB stem) read each pixel's
    channels in pairs, the extra value against a zero filter tap: a NaN or inf input then put NaN
    beside its receptive field, or NaN where the sum is inf (12 NaN positions for one pixel through
    the 7x7 stem, instead of 9).  Both backends append a zero channel: every position and value is
    then what the exact sum of the bf16 operands gives."""
    if backend == "cpu" and not backends.get("cpu").is_available():
        pytest.skip("no oneDNN")
    cin, k, stride, pad = geom
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, cin, k, k, generator=g).bfloat16()
    scale, shift = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    for ch in {0, cin - 1}:
        x = torch.randn(2, cin, 9, 9, generator=g)
        x[1, ch, 4, 3] = value
        x = x.bfloat16()
        with torch.no_grad():
            got = fusedres.conv_bn_act(x, w, scale, shift, stride=stride, padding=pad, relu=False, backend=backend)
        want = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, pad)
        want = want * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        assert not torch.isfinite(want).all()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), (ch, value)
        assert torch.equal(got[got.isinf()], want[want.isinf()].to(got.dtype))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin].double(), want[fin], rtol=2e-2, atol=0.1)



def test_cpu_backend_declines_bf16_grouped_odd_channels():
    """The same oneDNN fault with groups: the cpu backend says so instead of padding each group."""
    if not backends.get("cpu").is_available():
        pytest.skip("no oneDNN")
    x, w = torch.randn(1, 6, 5, 5).bfloat16(), torch.randn(4, 3, 3, 3).bfloat16()
    with torch.no_grad(), pytest.raises(fusedres.BackendUnavailableError, match="odd channel count per group"):
        fusedres.conv_bn_act(x, w, torch.ones(4), torch.zeros(4), padding=1, groups=2, backend="cpu")



@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
def test_triton_train_kernels_keep_nan():
    """The train-mode BN-apply kernel and the conv's BN prologue keep NaN (as torch.relu)."""
    from fusedres.backends.triton import launch as L
    from fusedres.training import triton_kernels as tk

    z = torch.randn(2, 4, 5, 5)
    z[0, 1, 2, 2] = float("nan")
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    out = tk.bn_act(z, scale, shift, relu=True)
    assert out[0, 1, 2, 2].isnan() and int(out.isnan().sum()) == 1
    w = torch.randn(6, 4, 1, 1)
    conv = torch.full((2, 6, 5, 5), 0.0)
    L.conv_train_fwd(z, L.kernel_weight(w), conv, (1, 1), (0, 0), (1, 1), 1, scale, shift)
    assert conv[0, :, 2, 2].isnan().all() and int(conv.isnan().sum()) == 6


# --------------------------------------------------------------------------- 2. hooks


def test_submodule_hooks_fire_and_are_honoured():
    ref = _resnet18()
    fused = _fused(ref)
    x = torch.randn(2, 3, 48, 48)
    calls = {}

    def rescale(mod, args):  # a pre-hook that changes the conv's input
        calls["pre"] = calls.get("pre", 0) + 1
        return (args[0] * 0.5,)

    def record(mod, args, out):
        calls["fwd"] = calls.get("fwd", 0) + 1

    for m in (ref, fused):
        m.layer2[0].conv1.register_forward_pre_hook(rescale)
        m.layer3[1].bn2.register_forward_hook(record)
        m.bn1.register_forward_hook(record)  # the stem
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="has hooks"):
        got = fused(x)
    with torch.no_grad():
        want = ref(x)
    assert calls == {"pre": 2, "fwd": 4}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_global_hooks_take_the_reference_forward():
    ref = _resnet18()
    fused = _fused(ref)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m)))
    try:
        with torch.no_grad():
            fused(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert nn.Conv2d in seen and nn.BatchNorm2d in seen


def _transformed(transform):
    model = _resnet18()
    if transform == "spectral_norm":
        model.layer1[0].conv1 = nn.utils.spectral_norm(model.layer1[0].conv1)
        with torch.no_grad():  # power iterations in train mode; eval then uses u, v as they are
            model.train()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
        model.eval()
    elif transform == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.layer1[0].conv2 = nn.utils.weight_norm(model.layer1[0].conv2)
        with torch.no_grad():
            model.layer1[0].conv2.weight_g.mul_(1.7)  # the weight is remade from g and v by a pre-hook
    elif transform == "parametrize":
        nn.utils.parametrize.register_parametrization(model.layer1[1].conv1, "weight", _Double())
    else:
        import torch.nn.utils.prune as prune

        prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.3)
    return model


def _blockwise(model, x):
    """The converted model's forward with every block called as a module: never donates."""
    y = model._stem(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            y = block(y)
    return model.fc(torch.flatten(model.avgpool(y), 1))


def _count_donations(monkeypatch):
    from fusedres.backends import cpu

    seen = []
    into = cpu.conv_bn_act_into

    def counting(acc, *args, **kw):
        seen.append(acc)
        return into(acc, *args, **kw)

    monkeypatch.setattr(cpu, "conv_bn_act_into", counting)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_blocks_add_in_place_only_into_what_no_one_sees(monkeypatch, dtype):
    """FusedResNet hands a block's output to the next block as donated, so the CPU backend adds
    an identity residual in place; only tensors a fused block made, with no hook to see them."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bf16 on this CPU")
    torch.manual_seed(0)
    ref = randomize(torchvision.models.resnet50()).eval().to(dtype)
    fused = _fused(ref)
    seen = _count_donations(monkeypatch)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    x0 = x.clone()
    with torch.no_grad():
        out = fused(x)
        assert len(seen) == 12  # ResNet-50's identity blocks: 2 + 3 + 5 + 2
        assert torch.equal(x, x0)
        assert torch.equal(out, _blockwise(fused, x))  # bit-identical to the binary-add path
        assert len(seen) == 12  # direct block calls never donate
        truth = copy.deepcopy(ref).double()(x.double())
        assert_within_budget(out, ref(x), truth, dtype)

        # a hook that keeps a block's output, or a pre-hook that keeps its input: that tensor
        # is never written afterwards, and only the next hand-over is plain
        kept = []
        handles = [fused.layer1[0].register_forward_hook(lambda m, a, o: kept.append((o, o.clone()))),
                   fused.layer3[2].register_forward_pre_hook(lambda m, a: kept.append((a[0], a[0].clone())))]
        del seen[:]
        got = fused(x)
        # out of place: layer1[1] (its input was seen), layer3[2] (hooked: called as a module)
        # and layer3[3] (its input comes from a module call)
        assert len(seen) == 9
        assert all(torch.equal(t, c) for t, c in kept) and len(kept) == 2
        assert torch.equal(got, out)
        for h in handles:
            h.remove()

        # a hook on a stage: the stage runs as a module, its blocks called one by one
        h = fused.layer2.register_forward_hook(lambda m, a, o: kept.append((o, o.clone())))
        del seen[:], kept[:]
        assert torch.equal(fused(x), out)
        assert len(seen) == 9 and torch.equal(*kept[0])
        h.remove()

        # a subclass with its own forward inside a stage: called as a module, its forward runs
        class Halved(fusedres.Bottleneck):
            def forward(self, x):
                return super().forward(x) * 0.5

        block = fused.layer4[1]
        block.__class__ = Halved
        del seen[:]
        halved = fused(x)
        block.__class__ = fusedres.Bottleneck
        assert len(seen) == 10 and not torch.equal(halved, out)  # layer4[1] and [2] add out of place
        assert torch.equal(fused(x), out)

        # blocks as the user calls them: their outputs are the user's and are never donated
        a = fused.layer1[0](fused._stem(x))
        a0 = a.clone()
        b = fused.layer1[1](a)
        assert torch.equal(a, a0) and not torch.equal(b, a)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("transform", ["spectral_norm", "weight_norm", "parametrize"])
def test_weight_transforms_are_honoured(transform):
    ref, fused = _transformed(transform), fusedres.convert(_transformed(transform))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="reference forward"):
        got = fused(x)
    with torch.no_grad():
        want = ref(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pruned_conv_trains_for_two_steps():
    """``prune`` makes the weight in a pre-hook; training through it twice must work and match."""
    # float64: a training step's gradients are too ill-conditioned to compare in fp32 (see check.py)
    ref, fused = _transformed("prune").train().double(), fusedres.convert(_transformed("prune")).train().double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for model in (ref, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- 3. caches


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if HAS_TRITON else []))
def test_cache_follows_dtype_round_trip(backend):
    """``.bfloat16().float()`` swaps each weight's data (same parameter, same version counter):
    the next forward uses the rounded weights, not a cached copy of the old ones."""
    ref = _block("bottleneck")
    fused = _fused(ref, backend)
    x = _x(16)
    with torch.no_grad():
        fused(x)  # fills the caches
        for model in (ref, fused):  # the convs only: the BN values (compared by value) stay
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.bfloat16().float()
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_cpu_backend_follows_dtype_change():
    """An fp32 forward, then ``.bfloat16()``: the bf16 forward uses bf16 folds (it crashed)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU")
    ref = _block("basic-down")
    for m in ref.modules():  # a fresh BN (exact in bf16): only the weight cache can tell the dtypes apart
        if isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
    fused = _fused(ref, "cpu")
    x = _x()
    with torch.no_grad():
        fused(x)
        fused.bfloat16()
        out = fused(x.bfloat16())
        truth = ref.double()(x.double())
        assert_within_budget(out, ref.bfloat16()(x.bfloat16()), truth, torch.bfloat16)


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if HAS_TRITON else []))
def test_swap_on_conversion_after_a_forward(backend):
    """With ``torch.__future__.set_swap_module_params_on_conversion(True)``, ``load_state_dict`` and
    ``.bfloat16()`` swap each parameter with ``torch.utils.swap_tensors``, which refuses a tensor
    with a weak reference: after a forward (the caches reference each weight weakly) both failed.
    The fused modules drop their weights' entries first; a direct swap needs ``backends.forget``."""
    ref = _block("bottleneck")
    fused = _fused(ref, backend)
    other = _block("bottleneck", seed=1)
    x = _x(16)
    was = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.no_grad():
            fused(x)
            fused.load_state_dict(other.state_dict())
            torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
            fused.bfloat16().float()
            other.bfloat16().float()
            torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
            w = fused.conv1.weight
            backends.forget([w])
            torch.utils.swap_tensors(w, nn.Parameter(w.detach() * 2))
            other.conv1.weight.mul_(2)
            torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(was)


def test_shape_mistakes_raise_what_torchvision_raises():
    """A wrong channel count: torchvision's conv raises ``RuntimeError``; the fused model's checks
    raise :class:`fusedres.ShapeError`, a ``ValueError`` and a ``RuntimeError``."""
    ref = _resnet18()
    fused = _fused(ref, "cpu")
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            ref(x)
        with pytest.raises(RuntimeError, match="channel mismatch") as err:
            fused(x)
    assert isinstance(err.value, (ValueError, fusedres.ShapeError))


def test_meta_device_and_weightless_convs_fall_back():
    """A model built on the meta device (shape inference, before ``to_empty``) runs, eval and train
    (autocast does not know the device: it raised); a conv without ``.weight`` (a quantization
    fuser's ConvReLU2d) takes the reference instead of raising AttributeError."""
    with torch.device("meta"):
        meta = fusedres.convert(torchvision.models.resnet18(num_classes=10))
    for train in (False, True):
        assert meta.train(train)(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 10)
    ref = torch.ao.quantization.fuse_modules(_resnet18(), [["conv1", "bn1", "relu"],
                                                         ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"]])
    fused = _fused(ref)
    x = _x(3, hw=(32, 32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_weight_cache_pins_the_storage():
    """A new storage at the old data pointer still misses: the entry pins the old storage object."""
    cache = backends.WeightCache()
    w = torch.nn.Parameter(torch.randn(4, 4))
    cache.put(w, "old")
    assert cache.get(w) == "old"
    w.data = torch.randn(4, 4)  # what Module._apply does; the version counter stays
    assert cache.get(w) is None
    with torch.no_grad():
        w.mul_(2)
    assert cache.get(w) is None
    cache.put(w, "new")
    assert cache.get(w) == "new" and cache.get(w, "other-tag") is None


def test_weight_cache_forgets_a_freed_weight():
    """Entries are keyed by the weight's id and dropped with the weight, so nothing outlives the
    model and a later tensor that reuses the id finds nothing."""
    cache = backends.WeightCache()
    w, other = torch.nn.Parameter(torch.randn(4, 4)), torch.randn(4, 4)
    cache.put(w, "value")
    cache.put(other, "other")
    assert len(cache) == 2
    del w
    gc.collect()
    assert len(cache) == 1 and cache.get(other) == "other"


def _zero_variance(block):
    block.bn1.eps = 0.0
    block.bn1.running_var[3] = 0.0  # channel 3: x / sqrt(0)


def _infinite_gamma(block):
    block.bn2.weight.data[2] = float("inf")


def _overflowing_fold(block):
    block.bn1.weight.data[1] = 3e38  # finite scale, but scale * weight overflows fp32


@pytest.mark.parametrize("degenerate", [_zero_variance, _infinite_gamma, _overflowing_fold])
def test_degenerate_bn_gives_torchvisions_infinities(degenerate):
    """A BN scale the fold cannot carry (infinite, or overflowing the filter) is applied to the
    conv output instead, as torchvision does: +-inf stays +-inf where a folded filter's sum of
    infinities would be NaN, and finite channels are unchanged."""
    ref = randomize(tv.BasicBlock(8, 8)).eval()
    with torch.no_grad():
        degenerate(ref)
    fused = fusedres.convert(copy.deepcopy(ref), backend="cpu")
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        want, got = ref(x), fused(x)
    assert not torch.isfinite(want).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)  # values near 1e34 after the overflow case: summation order shows
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
def test_nan_weight_reaches_what_torchs_conv_reaches(batch):
    """A NaN weight: torch's CPU conv multiplies the zero padding by it in its native kernel (small
    batch-1 fp32 inputs) and skips the padding in oneDNN's (the rest), so the border outputs are
    NaN or finite by torch's choice of kernel; the cpu backend runs such a filter through
    ``F.conv2d`` and gets torch's answer either way (it left the border finite at batch 1)."""
    x = torch.randn(batch, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    w = torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    w.view(-1)[3] = float("nan")
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    want = torch.nn.functional.conv2d(x, w, None, 1, 1) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    with torch.no_grad():
        got = fusedres.conv_bn_act(x, w, scale, shift, padding=1, relu=False, backend="cpu")
    _same_nan_pattern(got, want)


def test_degenerate_bn_with_mixed_dtype_statistics():
    """bf16 activations, an fp32 running mean and bf16 variance with a zero (``eps=0``): the degenerate
    fold's ``F.batch_norm`` gets one dtype for its vectors (it raised)."""
    x = torch.randn(2, 8, 6, 6).bfloat16()
    w = torch.randn(8, 8, 3, 3).bfloat16()
    mean, var = torch.randn(8), (torch.rand(8) + 0.5).bfloat16()
    var[2] = 0
    scale, shift = (torch.rand(8) + 0.5).bfloat16(), torch.randn(8).bfloat16()
    with torch.no_grad():
        got = fusedres.conv_bn_act(x, w, scale, shift, padding=1, relu=False, backend="cpu", running_mean=mean,
                                   running_var=var, eps=0.0)
    assert got.dtype == torch.bfloat16 and not torch.isfinite(got[:, 2]).all() and torch.isfinite(got[:, 3]).all()


def test_huge_bn_scale_is_not_folded():
    """A finite but huge BN scale (gamma 3e38) that does not overflow the folded filter still
    overflows its partial sums, where torchvision's conv, normalised after, stays finite: such a
    scale (above 2**64) is applied to the conv output by torch's own BatchNorm op, whose order
    also keeps finite what a precomputed ``gamma * invstd`` makes infinite.  (Before: 10097
    infinities against torchvision's 972.)"""
    ref = _resnet18().layer2[0]
    with torch.no_grad():
        ref.bn1.weight[3] = 3e38
    fused = fusedres.convert(copy.deepcopy(ref), backend="cpu")
    for seed in range(3):
        x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(seed)).abs()
        with torch.no_grad():
            want, got = ref(x), fused(x)
        assert not torch.isfinite(want).all()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), seed
        assert torch.equal(torch.isnan(got), torch.isnan(want)), seed


def test_huge_folded_filter_entry_is_not_folded():
    """Weights of +-1e18 with a BN scale of 1e19 (below 2**64): the folded entries (1e37) times an input
    of 100 overflow, where torch's conv cancels to 0 before the scale.  A folded entry above 2**64 keeps
    the filter unscaled (a probe's case: inf against torch's 0.5)."""
    x = torch.full((1, 2, 1, 1), 100.0)
    w = torch.tensor([1e18, -1e18]).view(1, 2, 1, 1)
    scale, shift = torch.tensor([1e19]), torch.tensor([0.5])
    want = torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x, w), torch.zeros(1), torch.ones(1), scale,
                                          shift, False, 0.0, 0.0)
    assert want.item() == 0.5
    with torch.no_grad():
        for kw in (dict(), dict(running_mean=torch.zeros(1), running_var=torch.ones(1), eps=0.0)):
            got = fusedres.conv_bn_act(x, w, scale, shift, relu=False, backend="cpu", **kw)
            assert got.item() == 0.5, kw


def _shared_weights(m):
    m.conv2.weight.share_memory_()  # an actor's view of a learner's weights
    return lambda: m.conv2.weight.data.mul_(0.5)  # a write the version counter does not see, as another process's


def _flat_weights(m):
    params = [m.conv1.weight, m.conv2.weight]
    flat = torch.nn.utils.parameters_to_vector(params)
    torch.nn.utils.vector_to_parameters(flat, params)  # the parameters become views of ``flat``
    return lambda: flat.mul_(0.5)  # bumps flat's counter, not the parameters'


@pytest.mark.parametrize("alias", [_shared_weights, _flat_weights])
def test_writes_the_version_counter_cannot_see(alias):
    """Weights in shared memory or views of a flat buffer are never cached: a write through another
    process or through the buffer shows on the next call, as in torchvision."""
    ref = randomize(tv.BasicBlock(8, 8)).eval()
    fused = fusedres.convert(copy.deepcopy(ref), backend="cpu")
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        write_ref, write = alias(ref), alias(fused)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
        write_ref(), write()
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 4. forward AD


def test_jvp_matches_torchvision():
    ref = _resnet18().requires_grad_(False)
    fused = _fused(ref)
    x, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    _, want = torch.func.jvp(ref, (x,), (t,))
    with pytest.warns(RuntimeWarning, match="torch.func"):
        _, got = torch.func.jvp(fused, (x,), (t,))
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_forward_ad_matches_torchvision():
    import torch.autograd.forward_ad as fwad

    ref = _block("basic-down").requires_grad_(False)
    fused = _fused(ref)
    x, t = _x(), _x(seed=2)
    tangents = []
    for model in (ref, fused):
        with fwad.dual_level():
            tangents.append(fwad.unpack_dual(model(fwad.make_dual(x, t))).tangent)
    torch.testing.assert_close(tangents[1], tangents[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 5. tracing


def test_fx_trace_and_feature_extraction():
    from torchvision.models.feature_extraction import create_feature_extractor

    ref = _resnet18()
    fused = _fused(ref)
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(fused)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), ref(x), rtol=1e-4, atol=1e-4)
    ref_ops = [n.target for n in torch.fx.symbolic_trace(ref).graph.nodes]
    assert [n.target for n in traced.graph.nodes] == ref_ops  # torchvision's graph
    extractor = create_feature_extractor(fused, ["layer2", "layer4"])
    assert not fused.training  # restored after tracing in both modes
    with torch.no_grad():
        feats = extractor(x)
        want = create_feature_extractor(ref, ["layer2", "layer4"])(x)
    for k in want:
        torch.testing.assert_close(feats[k], want[k], rtol=1e-4, atol=1e-4)


def test_jit_trace_gives_the_reference_graph():
    ref = _resnet18()
    fused = _fused(ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)
        torch.testing.assert_close(traced(x), ref(x), rtol=1e-4, atol=1e-4)
    assert "mkldnn" not in str(traced.inlined_graph)


def test_onnx_export_torchscript_exporter(tmp_path):
    """``torch.onnx.export(dynamo=False)`` (a jit trace) gives the unconverted model's ONNX graph."""
    onnx = pytest.importorskip("onnx")
    ref = _resnet18()
    graphs = []
    for name, model in (("ref", ref), ("fused", _fused(ref))):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(tmp_path / f"{name}.onnx"), dynamo=False)
        graphs.append([n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node])
    assert graphs[1] == graphs[0] and "Conv" in graphs[0]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_onnx_export_dynamo_exporter(tmp_path, mode):
    """``torch.onnx.export(dynamo=True)`` (through torch.export) records torchvision's computation: in
    train mode torch's exporter gives its BatchNorms their running statistics, where the fused
    chain's batch statistics went into the graph (a BasicBlock's output differed by 3.7)."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ref = _block("basic-down").train(mode == "train")
    for bn in (m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    fused = _fused(ref)
    x = _x()
    outs, graphs = [], []
    for name, model in (("ref", ref), ("fused", fused)):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), dynamo=True).save(str(tmp_path / f"{name}.onnx"))
        graphs.append([n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node])
        sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert graphs[1] == graphs[0] and "Conv" in graphs[0]
    torch.testing.assert_close(torch.from_numpy(outs[1]), torch.from_numpy(outs[0]), rtol=1e-5, atol=1e-5)


def test_jit_script():
    ref = _resnet18()
    fused = _fused(ref)
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(fused)
    assert type(fused) is fusedres.FusedResNet and type(fused.layer1[0]) is fusedres.BasicBlock  # untouched
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["basic", "basic-down", "bottleneck"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_written_out_reference_forward_is_torchvisions(kind, mode):
    """The TorchScript copy of torchvision's block forward computes exactly what it does."""
    block = _block(kind)
    fused = _fused(block).train(mode == "train")
    block.train(mode == "train")
    x = _x(16 if kind != "basic-down" else 8)
    with torch.no_grad():
        assert torch.equal(fused._reference_forward(x), block(x))


def test_vmap_ensemble():
    models = [_fused(_block("basic-down", seed=s)) for s in range(3)]
    refs = [_block("basic-down", seed=s) for s in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = _x()

    def call(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    with torch.no_grad():
        out = torch.vmap(call, in_dims=(0, 0, None))(params, buffers, x)
        for i, r in enumerate(refs):
            torch.testing.assert_close(out[i], r(x), rtol=1e-4, atol=1e-4)


def test_torch_export_still_works():
    ref = _block("basic-down")
    fused = _fused(ref)
    x = _x()
    ep = torch.export.export(fused, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), ref(x), rtol=1e-4, atol=1e-4)


def test_train_export_keeps_the_declared_dynamic_range():
    """A training-mode export with symbolic H and W accepts every size in the declared range, as
    torchvision's does: the CPU layout choice (NCHW for tiny maps) adds no guard on the sizes."""
    ref = _resnet18().train()
    fused = _fused(ref)
    dims = {"x": {2: torch.export.Dim("h", min=33, max=512), 3: torch.export.Dim("w", min=33, max=512)}}
    x = torch.randn(2, 3, 64, 64)
    programs = {name: torch.export.export(m, (x,), dynamic_shapes=dims) for name, m in (("ref", ref), ("fused", fused))}
    assert str(programs["fused"].range_constraints) == str(programs["ref"].range_constraints)
    for hw in ((48, 48), (33, 70), (96, 96)):
        x = torch.randn(2, 3, *hw)
        torch.testing.assert_close(programs["fused"].module()(x), programs["ref"].module()(x), rtol=1e-4, atol=1e-4)


def test_train_export_saves_and_loads(tmp_path):
    """A training-mode program of a converted model saves and loads back like torchvision's, and the
    loaded one computes what torchvision's does, running statistics included (the running-stats
    update was a no_grad graph region with no outputs, which torch.export.load refused)."""
    ref = _resnet18().train()
    fused = _fused(ref)
    x = torch.randn(2, 3, 64, 64)  # (at 32x32 layer4's BNs see 2 values per channel: ill-conditioned in fp32)
    loaded = []
    for name, m in (("ref", ref), ("fused", fused)):
        torch.export.save(torch.export.export(m, (x,)), tmp_path / f"{name}.pt2")
        loaded.append(torch.export.load(tmp_path / f"{name}.pt2").module())
    torch.testing.assert_close(loaded[1](x), loaded[0](x), rtol=1e-4, atol=1e-4)
    want, got = dict(loaded[0].named_buffers()), dict(loaded[1].named_buffers())
    assert want.keys() == got.keys()
    for name, a in want.items():
        torch.testing.assert_close(got[name], a, rtol=1e-4, atol=1e-4, msg=name)


def test_train_export_with_a_batch_of_one_runs_like_torchvisions_program():
    """A training export with a dynamic batch that may be 1: at 32x32 layer4's BatchNorms then see
    one value per channel.  Eager raises; torchvision's program computes a finite output and
    non-finite running variances, and so does the fused one (a symbolic count of 1 divided as
    a Python number raised ZeroDivisionError)."""
    ref = _resnet18().train()
    fused = _fused(ref)
    dims = {"x": {0: torch.export.Dim("n", min=1, max=8)}}
    programs = [torch.export.export(m, (torch.randn(2, 3, 32, 32),), dynamic_shapes=dims).module() for m in (ref, fused)]
    x = torch.randn(1, 3, 32, 32)
    outs = [p(x) for p in programs]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    want, got = dict(programs[0].named_buffers()), dict(programs[1].named_buffers())
    for name, a in want.items():
        assert torch.equal(a.isfinite(), got[name].isfinite()), name


# --------------------------------------------------------------------------- 6. failing calls


def test_dtype_mismatch_fails_before_any_state_changes():
    ref = _resnet18().train()
    fused = _fused(ref)
    before = copy.deepcopy(fused.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError) as got:
        fused(x)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    assert str(got.value) == str(want.value)  # torchvision's own error, at conv1
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- 7. autocast


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_autocast_eval_follows_torchvision(backend):
    """Under CPU bf16 autocast the fused blocks run bf16, as torchvision's do."""
    ref = _resnet18()
    fused = _fused(ref, backend)
    x = torch.randn(2, 3, 48, 48)
    outs = {}
    for name, m in (("ref", ref), ("fused", fused)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            stem = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            outs[name] = (m.layer1(stem), m(x))
    assert outs["fused"][0].dtype == outs["ref"][0].dtype == torch.bfloat16
    with torch.no_grad():
        truth = copy.deepcopy(ref).double()(x.double())
    assert outs["fused"][1].dtype == torch.bfloat16
    assert_within_budget(outs["fused"][1].float(), outs["ref"][1].float(), truth, torch.bfloat16)


def test_autocast_weight_cast_is_cached():
    """The bf16 copy of an fp32 weight under autocast is made once (cpu backend fold cache)."""
    from fusedres.backends import cpu

    ref = _block("basic")
    fused = _fused(ref, "cpu")
    x = _x(16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x)
        tag = (torch.bfloat16, fused.bn1.eps)  # the fold of this weight for bf16 activations
        first = cpu._cache.get(fused.conv1.weight, tag)
        fused(x)
        assert first is not None and cpu._cache.get(fused.conv1.weight, tag) is first
    assert first.weight.dtype == torch.bfloat16

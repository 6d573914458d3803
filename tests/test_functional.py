"""``conv_bn_act`` / ``block_tail`` on CPU: numerics per backend, argument checks, backend selection."""

from __future__ import annotations

import warnings

import pytest
import torch

import fusedres
from fusedres import backends
from fusedres.backends import torch_ref
from helpers import assert_within_budget

# (C_in, C_out, k, stride, padding, dilation, groups)
CONV_CASES = [
    (3, 16, 7, 2, 3, 1, 1),  # stem
    (16, 16, 3, 1, 1, 1, 1),
    (16, 24, 3, 2, 1, 1, 1),
    (12, 20, 1, 1, 0, 1, 1),
    (12, 20, 1, 2, 0, 1, 1),
    (16, 16, 3, 1, 2, 2, 1),  # dilation
    (16, 32, 3, 1, 1, 1, 8),  # groups
    (5, 7, 3, 1, 1, 1, 1),  # odd channel counts
]


def _case(cin, cout, k, stride, padding, dilation, groups, n=2, h=11, w=9, dtype=torch.float32, cl=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5).to(dtype)
    scale = torch.rand(cout, generator=g) + 0.5
    shift = torch.randn(cout, generator=g) * 0.1
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    res = torch.randn(n, cout, oh, ow, generator=g).to(dtype)
    return x, wt, scale, shift, res, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _ref64(x, wt, scale, shift, res, kw, relu=True):
    return fusedres.conv_bn_act(
        x.double(), wt.double(), scale.double(), shift.double(),
        residual=None if res is None else res.double(), relu=relu, backend="torch", **kw,
    )


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "c{}-k{}-s{}-p{}-d{}-g{}".format(*c[1:]))
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_cpu_backend_conv_bn_act(case, residual, relu, cl):
    x, wt, scale, shift, res, kw = _case(*case, cl=cl)
    res = res if residual else None
    out = fusedres.conv_bn_act(x, wt, scale, shift, residual=res, relu=relu, backend="cpu", **kw)
    eager = fusedres.conv_bn_act(x, wt, scale, shift, residual=res, relu=relu, backend="torch", **kw)
    truth = _ref64(x, wt, scale, shift, res, kw, relu)
    assert out.dtype == x.dtype and out.shape == truth.shape
    assert_within_budget(out, eager, truth, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backend_block_tail(dtype):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 8, 5, 5, generator=g).to(dtype)
    x = torch.randn(2, 12, 10, 10, generator=g).to(dtype)
    w = (torch.randn(16, 8, 3, 3, generator=g) / 8).to(dtype)
    wd = (torch.randn(16, 12, 1, 1, generator=g) / 4).to(dtype)
    s, b, sd, bd = (torch.rand(16, generator=g) + 0.5 for _ in range(4))
    args = (y, w, s, b, x, wd, sd, bd)
    kw = dict(padding=1, ds_stride=2)
    out = fusedres.block_tail(*args, backend="cpu", **kw)
    eager = fusedres.block_tail(*args, backend="torch", **kw)
    truth = fusedres.block_tail(*(a.double() for a in args), backend="torch", **kw)
    assert out.dtype == dtype
    assert_within_budget(out, eager, truth, dtype)
    manual = torch.relu(
        torch.nn.functional.conv2d(y.double(), w.double(), padding=1) * s.double().view(1, -1, 1, 1)
        + b.double().view(1, -1, 1, 1)
        + torch.nn.functional.conv2d(x.double(), wd.double(), stride=2) * sd.double().view(1, -1, 1, 1)
        + bd.double().view(1, -1, 1, 1)
    )
    torch.testing.assert_close(truth, manual)


def test_torch_reference_matches_first_principles():
    """The reference is what the docstring says, checked against conv2d + explicit affine."""
    x, wt, scale, shift, res, kw = _case(*CONV_CASES[2], dtype=torch.float64)
    out = fusedres.conv_bn_act(x, wt, scale.double(), shift.double(), residual=res, backend="torch", **kw)
    conv = torch.nn.functional.conv2d(x, wt, None, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    expected = torch.relu(conv * scale.double()[:, None, None] + shift.double()[:, None, None] + res)
    torch.testing.assert_close(out, expected)


def test_empty_batch():
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1], n=0)
    out = fusedres.conv_bn_act(x, wt, scale, shift, **kw)
    assert out.shape == (0, 16, 11, 9)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_zero_channels_raise(backend):
    """No output channel (torch's conv2d raises) or no input channel (torch gives an (N, 0, H, W)
    tensor that no BN accepts): a clear error, not a kernel's relu(shift) or a oneDNN failure.
    The ops check it too (a compiled graph calls them without fusedres.functional)."""
    if backend != "auto" and not backends.is_available(backend):
        pytest.skip(f"{backend} unavailable")
    x, wt = torch.randn(2, 0, 5, 5), torch.randn(6, 0, 3, 3)
    with pytest.raises(ValueError, match="has no input channel"):
        fusedres.conv_bn_act(x, wt, torch.ones(6), torch.full((6,), 3.0), padding=1, backend=backend)
    with pytest.raises(ValueError, match="has no output channel"):
        fusedres.conv_bn_act(torch.randn(2, 4, 5, 5), torch.randn(0, 4, 3, 3), torch.ones(0), torch.ones(0),
                             padding=1, backend=backend)
    with pytest.raises(ValueError, match="has no output or no input channel"):
        torch.ops.fusedres.conv_bn_act_cpu(x, wt, torch.ones(6), torch.ones(6), None, None, None, 1e-5, [1, 1],
                                           [1, 1], [1, 1], 1, True)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
def test_empty_kernel_raises(backend):
    """A weight with a zero-size kernel dimension: torch's conv2d raises; the triton kernel had returned
    relu(shift) on an output larger than the input, oneDNN a primitive-descriptor error, and the ops'
    fake implementations a shape (a compiled graph traced, then failed)."""
    if backend != "auto" and not backends.is_available(backend):
        pytest.skip(f"{backend} unavailable")
    x, s, b = torch.randn(1, 4, 6, 6), torch.rand(8), torch.rand(8)
    for wshape in ((8, 4, 0, 3), (8, 4, 3, 0), (8, 4, 0, 0)):
        with pytest.raises(ValueError, match=r"weight \(8, 4, \d, \d\) has an empty \dx\d kernel"):
            fusedres.conv_bn_act(x, torch.randn(wshape), s, b, backend=backend)
    with pytest.raises(ValueError, match="has an empty 0x0 kernel"):
        fusedres.block_tail(torch.randn(1, 4, 3, 3), torch.randn(8, 4, 0, 0), s, b, x, torch.randn(8, 4, 1, 1), s, b,
                            ds_stride=2, backend=backend)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="has an empty 0x3 kernel"):
        torch.ops.fusedres.conv_bn_act_cpu(mode.from_tensor(x), mode.from_tensor(torch.randn(8, 4, 0, 3)),
                                           mode.from_tensor(s), mode.from_tensor(b), None, None, None, 1e-5, [1, 1],
                                           [0, 0], [1, 1], 1, True)


def test_bad_inputs_name_the_argument():
    x, wt, scale, shift, res, kw = _case(*CONV_CASES[1])
    with pytest.raises(ValueError, match="x must be 4-D"):
        fusedres.conv_bn_act(x[0], wt, scale, shift)
    with pytest.raises(TypeError, match="weight dtype"):
        fusedres.conv_bn_act(x, wt.double(), scale, shift, **kw)
    with pytest.raises(ValueError, match="channel mismatch"):
        fusedres.conv_bn_act(x[:, :8], wt, scale, shift, **kw)
    with pytest.raises(ValueError, match="scale must have 16"):
        fusedres.conv_bn_act(x, wt, scale[:4], shift, **kw)
    with pytest.raises(ValueError, match="weight is on meta"):
        fusedres.conv_bn_act(x, wt.to("meta"), scale, shift, **kw)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        fusedres.conv_bn_act(x, wt, scale, shift, residual=res[:, :, :3], **kw)
    with pytest.raises(TypeError, match="x must be a floating"):
        fusedres.conv_bn_act(x.int(), wt.int(), scale, shift, **kw)
    with pytest.raises(TypeError, match="shift must be float32"):
        fusedres.conv_bn_act(x, wt, scale, shift.half(), **kw)
    with pytest.raises(TypeError, match="stride"):
        fusedres.conv_bn_act(x, wt, scale, shift, stride="2")
    with pytest.raises(ValueError, match="groups"):
        fusedres.conv_bn_act(x, wt, scale, shift, groups=3)
    # no silent truncation or string unpacking: stride=(1.7, 1.2) used to run as (1, 1), "12" as (1, 2)
    for bad in ((1.7, 1.2), "12", True, 2.0):
        with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
            fusedres.conv_bn_act(x, wt, scale, shift, stride=bad)
    with pytest.raises(TypeError, match="groups must be an int"):
        fusedres.conv_bn_act(x, wt, scale, shift, groups=1.0)
    import numpy as np
    mean, var = torch.zeros(16), torch.ones(16)
    with torch.no_grad():  # NumPy integers and floats are numbers
        fusedres.conv_bn_act(x, wt, scale, shift, stride=(np.int64(1), 1), padding=np.int32(1), running_mean=mean,
                             running_var=var, eps=np.float32(1e-5))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        fusedres.conv_bn_act(x, wt, scale, shift, running_mean=mean, running_var=var, eps=float("nan"))
    with pytest.raises(ValueError, match="no running statistics"):
        fusedres.bn_scale_shift(torch.nn.BatchNorm2d(16, track_running_stats=False))


def _tail_args():
    g = torch.Generator().manual_seed(5)
    y, x = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 12, 10, 10, generator=g)
    w, wd = torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, 12, 1, 1, generator=g)
    s, b, sd, bd = (torch.rand(16, generator=g) + 0.5 for _ in range(4))
    return (y, w, s, b, x, wd, sd, bd)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw, needle", [
    (dict(stride=0), "stride must be >= 1"),
    (dict(ds_stride=(2, 0)), "ds_stride must be >= 1"),
    (dict(dilation=0), "dilation must be >= 1"),
    (dict(padding=-1), "padding must be >= 0"),
    (dict(padding=0, dilation=3), "y spatial size"),
], ids=["stride", "ds_stride", "dilation", "padding", "empty-output"])
def test_block_tail_checks_geometry(kw, needle, backend):
    """Like conv_bn_act, block_tail rejects a bad geometry by name before any backend runs
    (it used to divide by zero, or the Triton kernel returned a tensor where torch raises)."""
    kw = {"padding": 1, "ds_stride": 2, **kw}
    with pytest.raises(ValueError, match=needle):
        fusedres.block_tail(*_tail_args(), backend=backend, **kw)
    if "ds_stride" not in needle:  # conv_bn_act shares the check
        y, w, s, b = _tail_args()[:4]
        kw.pop("ds_stride")
        with pytest.raises(ValueError, match=needle.replace("y spatial", "x spatial")):
            fusedres.conv_bn_act(y, w, s, b, backend=backend, **kw)


def test_block_tail_names_the_mismatched_downsample_argument():
    """A ds_weight with another output-channel count was blamed on ds_scale (which fits the main
    branch), an x on another device on ds_scale too."""
    y, w, s, b, x, wd, sd, bd = _tail_args()
    with pytest.raises(ValueError, match="ds_weight has 15 output channels but weight has 16"):
        fusedres.block_tail(y, w, s, b, x, wd[:15], sd, bd, padding=1, ds_stride=2)
    with pytest.raises(ValueError, match="x is on meta but y is on cpu"):
        fusedres.block_tail(y, w, s, b, x.to("meta"), wd.to("meta"), sd, bd, padding=1, ds_stride=2)


def test_relu_must_be_a_bool():
    """relu="false" applied the ReLU (any truthy value did); bools and 0/1 are accepted."""
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
    for bad in ("false", "no", None, 2, 1.0):
        with pytest.raises(TypeError, match="relu must be a bool"):
            fusedres.conv_bn_act(x, wt, scale, shift, relu=bad, **kw)
        with pytest.raises(TypeError, match="relu must be a bool"):
            fusedres.block_tail(*_tail_args(), padding=1, ds_stride=2, relu=bad)
    import numpy as np

    torch.testing.assert_close(fusedres.conv_bn_act(x, wt, scale, shift, relu=0, **kw),
                               fusedres.conv_bn_act(x, wt, scale, shift, relu=False, **kw))
    torch.testing.assert_close(fusedres.conv_bn_act(x, wt, scale, shift, relu=np.True_, **kw),
                               fusedres.conv_bn_act(x, wt, scale, shift, relu=True, **kw))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ops_reject_a_negative_eps(backend):
    """The public ops computed with var + eps for a negative eps (fusedres.conv_bn_act and F.batch_norm
    reject it), and their fake implementations traced it."""
    if not backends.is_available(backend):
        pytest.skip(f"{backend} unavailable")
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.fusedres, f"conv_bn_act_{backend}")
    tail = getattr(torch.ops.fusedres, f"block_tail_{backend}")
    x, w, g, b = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.rand(8) + 0.5, torch.randn(8)
    m, v = torch.zeros(8), torch.ones(8)
    y, _, _, _, xd, wd, _, _ = _tail_args()
    w2, s2 = torch.randn(16, 8, 3, 3), torch.rand(16) + 0.5
    m2, v2 = torch.zeros(16), torch.ones(16)
    for mode in (None, FakeTensorMode()):
        f = (lambda t: t) if mode is None else mode.from_tensor
        with pytest.raises((ValueError, RuntimeError), match="eps must be a non-negative number"):
            op(f(x), f(w), f(g), f(b), None, f(m), f(v), -0.5, [1, 1], [1, 1], [1, 1], 1, False)
        for eps, ds_eps in ((-0.5, 1e-5), (1e-5, float("nan"))):
            with pytest.raises((ValueError, RuntimeError), match="eps and ds_eps must be non-negative"):
                tail(f(y), f(w2), f(s2), f(s2), f(xd), f(wd), f(s2), f(s2), f(m2), f(v2), eps, f(m2), f(v2), ds_eps,
                     [1, 1], [1, 1], [1, 1], 1, [2, 2], True)
        # Without statistics eps is not used, and every form of the op ignores it, as the functional API
        # (and the cuda backend's C++ op) do: eager and compiled calls agree.
        op(f(x), f(w), f(g), f(b), None, None, None, -0.5, [1, 1], [1, 1], [1, 1], 1, False)
        tail(f(y), f(w2), f(s2), f(s2), f(xd), f(wd), f(s2), f(s2), None, None, float("nan"), None, None, -1.0,
             [1, 1], [1, 1], [1, 1], 1, [2, 2], True)


def test_named_backend_errors_are_clear():
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedres.conv_bn_act(x, wt, scale, shift, backend="tensorrt", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(fusedres.BackendUnavailableError, match="'cuda'"):
            fusedres.conv_bn_act(x, wt, scale, shift, backend="cuda", **kw)
    # the oneDNN path is inference-only: asked for by name with autograd it refuses, clearly
    with pytest.raises(fusedres.BackendUnavailableError, match="autograd"):
        fusedres.conv_bn_act(x.requires_grad_(), wt, scale, shift, backend="cpu", **kw)


def test_forward_ad_and_func_transforms_take_the_differentiable_path():
    """A dual tensor or a torch.func transform passed to the oneDNN kernel lost its tangent (a zero
    JVP, silently) or failed on vmap's batched operands: such calls need the differentiable path
    (``auto`` takes the reference, ``cpu`` by name refuses)."""
    import torch.autograd.forward_ad as fwAD

    x, wt, scale, shift, res, kw = _case(4, 4, 3, 1, 1, 1, 1)
    tx = torch.randn_like(x)

    def f(backend):
        return lambda xx: fusedres.conv_bn_act(xx, wt, scale, shift, relu=False, backend=backend, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_out, want_tan = torch.func.jvp(f("torch"), (x,), (tx,))
        got_out, got_tan = torch.func.jvp(f("auto"), (x,), (tx,))
        torch.testing.assert_close(got_tan, want_tan)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(f("auto")(fwAD.make_dual(x, tx))).tangent
        torch.testing.assert_close(tangent, want_tan)
        xs = torch.randn(3, *x.shape)
        torch.testing.assert_close(torch.func.vmap(f("auto"))(xs), torch.stack([f("torch")(xi) for xi in xs]))
    with pytest.raises(fusedres.BackendUnavailableError, match="torch.func"):
        torch.func.jvp(f("cpu"), (x,), (tx,))


def test_running_statistics_are_differentiable():
    """An eval BN's running statistics that require grad (torchvision refuses them) get correct
    gradients and tangents from the reference's differentiable fold: gradcheck in float64, and
    forward AD against a central difference (README "What a drop-in keeps")."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    kw = dict(generator=g, dtype=torch.float64)
    x, w = torch.randn(2, 4, 6, 6, **kw), torch.randn(5, 4, 3, 3, **kw)
    s, b = torch.rand(5, **kw) + 0.5, torch.randn(5, **kw)
    m, v = torch.randn(5, **kw) * 0.1, torch.rand(5, **kw) + 0.5

    def f(mm, vv):
        return fusedres.conv_bn_act(x, w, s, b, padding=1, relu=False, running_mean=mm, running_var=vv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(f, (m.clone().requires_grad_(), v.clone().requires_grad_()))
        t = torch.randn(5, **kw)
        for which in (0, 1):
            args = [m, v]
            lo, hi = list(args), list(args)
            lo[which], hi[which] = args[which] - 1e-6 * t, args[which] + 1e-6 * t
            want = (f(*hi) - f(*lo)) / 2e-6
            with fwAD.dual_level():
                dual = list(args)
                dual[which] = fwAD.make_dual(args[which], t)
                got = fwAD.unpack_dual(f(*dual)).tangent
            assert want.abs().max() > 0.1
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _exact_bn(x, w, g, b, m, v, eps, padding=1):
    """conv + eval BN in float64 from the same values (the fp32 vectors widened exactly)."""
    d = torch.float64
    z = torch.nn.functional.conv2d(x.to(d), w.to(d), None, 1, padding)
    return torch.nn.functional.batch_norm(z, m.to(d), v.to(d), g.to(d), b.to(d), False, 0.0, eps)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_fp64_call_with_fp32_statistics_is_fp64_accurate(grad):
    """fp64 activations with fp32 BN vectors (allowed) were folded in fp32, so the call was only
    fp32-accurate (relative error 3e-8 where fp64 gives 1e-16; a review's finding).  Both paths: the
    reference applying the statistics (no autograd) and the differentiable fold (autograd)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(5, 4, 3, 3, generator=g,
                                                                                  dtype=torch.float64)
    gamma, beta = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    m, v = torch.randn(5, generator=g) * 0.1, torch.rand(5, generator=g) + 0.1
    want = _exact_bn(x, w, gamma, beta, m, v, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("torch", "auto"):
            got = fusedres.conv_bn_act(x.clone().requires_grad_(grad), w, gamma, beta, padding=1, relu=False,
                                       running_mean=m, running_var=v, eps=1e-5, backend=backend)
            assert got.dtype == torch.float64
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-13, backend


@pytest.mark.parametrize("layout", ["sparse", "mkldnn"])
def test_non_strided_tensors_are_refused_naming_the_argument(layout):
    """A sparse or mkldnn (opaque) tensor failed deep inside with errors naming no argument
    ("unsupported memory format option ChannelsLast", a conv type mismatch; a review's finding)."""
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
    other = x.to_sparse() if layout == "sparse" else x.to_mkldnn()
    for backend in ("auto", "torch"):
        with pytest.raises(TypeError, match="x must be a dense"):
            fusedres.conv_bn_act(other, wt, scale, shift, backend=backend, **kw)
    with pytest.raises(TypeError, match="scale must be a dense"):
        fusedres.conv_bn_act(x, wt, scale.to_sparse(), shift, **kw)


def test_geometry_beyond_what_the_convolutions_take():
    """A stride of 2**64 failed inside torch ("Overflow when unpacking long"); one of 2**63 - 1, which
    torch's conv computes, failed inside oneDNN with no argument named (a review's finding): the
    first is refused naming ``stride``, the second left to the reference by ``auto`` (torch's conv takes
    it for this small batch-1 input, which its native kernel runs)."""
    x, wt, scale, shift, _, _ = _case(4, 8, 3, 1, 1, 1, 1, n=1, h=5, w=5)
    for backend in ("auto", "torch", "cpu"):
        with pytest.raises(ValueError, match="stride must be at most"):
            fusedres.conv_bn_act(x, wt, scale, shift, stride=2**64, padding=1, backend=backend)
    with pytest.raises(fusedres.BackendUnavailableError, match="stride, padding or dilation above"):
        fusedres.conv_bn_act(x, wt, scale, shift, stride=2**63 - 1, padding=1, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fusedres.conv_bn_act(x, wt, scale, shift, stride=2**63 - 1, padding=1, backend="auto")
    want = torch.relu(torch.nn.functional.conv2d(x, wt, None, 2**63 - 1, 1) * scale.view(1, -1, 1, 1)
                      + shift.view(1, -1, 1, 1))
    torch.testing.assert_close(got, want)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1], dtype=torch.float64)
    s, b = scale.double(), shift.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with backends.record() as used:
            out1 = fusedres.conv_bn_act(x, wt, s, b, **kw)
            out2 = fusedres.conv_bn_act(x, wt, s, b, **kw)
    msgs = [str(w.message) for w in caught if "falls back" in str(w.message)]
    assert len(msgs) == 1 and "float64" in msgs[0], msgs
    assert used == {"torch"}
    torch.testing.assert_close(out1, out2)


def _cuda_spec(**kw):
    base = dict(device_type="cuda", dtype=torch.bfloat16, in_channels=64, out_channels=64, kernel_size=(3, 3),
                stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True, has_residual=False,
                channels_last=True, requires_grad=False, batch=8, input_size=(56, 56))
    return backends.ConvSpec(**{**base, **kw})


@pytest.mark.parametrize("kw, cuda_needle, triton_needle", [
    (dict(), None, None),
    # 600 * 2048 * 2048 output rows: the CUDA kernels chunk the batch, Triton's row index is int32.
    (dict(in_channels=8, out_channels=8, batch=600, input_size=(2048, 2048)), None, "output pixels"),
    (dict(batch=1, input_size=(6000, 6000)), "one input sample is 4608000000 bytes", "x: one image has"),
    (dict(ds_in_channels=64, ds_stride=(2, 2), ds_input_size=(12000, 12000)),
     "one downsample input sample is", "ds input: one image has"),
    (dict(in_channels=8192, out_channels=8192, kernel_size=(31, 31)), "one filter is", "weight has"),
], ids=["fits", "rows", "sample", "ds-sample", "filter"])
def test_size_limits_are_reported_by_unsupported_reason(kw, cuda_needle, triton_needle):
    """The kernels' 32-bit limits are declined up front (no GPU or compiled extension needed)."""
    pytest.importorskip("triton")
    from fusedres.backends import cuda as cuda_backend
    from fusedres.backends import triton as triton_backend

    spec = _cuda_spec(**kw)
    for backend, needle in ((cuda_backend, cuda_needle), (triton_backend, triton_needle)):
        reason = backend.unsupported_reason(spec)
        assert reason is None if needle is None else needle in (reason or ""), (backend.NAME, reason)


def test_auto_falls_back_on_size_limits(monkeypatch):
    """Too large for every fused kernel: "auto" takes the reference with its one warning instead of raising."""
    if not backends.is_available("triton"):
        pytest.skip("needs the triton backend (a GPU or TRITON_INTERPRET=1)")
    monkeypatch.setattr(backends, "_warned", set())
    spec = _cuda_spec(batch=1, input_size=(6000, 6000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.select("auto", spec).NAME == "torch"
        assert backends.select("auto", spec).NAME == "torch"
        # Another size, the same reason: still one warning (sizes are not part of its key).
        assert backends.select("auto", _cuda_spec(batch=1, input_size=(6000, 6001))).NAME == "torch"
    msgs = [str(w.message) for w in caught if "falls back" in str(w.message)]
    assert len(msgs) == 1 and "triton: x: one image has 2304000000 elements" in msgs[0], msgs
    with pytest.raises(fusedres.BackendUnavailableError, match="one image has"):
        backends.select("triton", spec)


def test_spec_describes_the_tensor_sizes(monkeypatch):
    specs = []
    select = backends.select
    monkeypatch.setattr(backends, "select", lambda backend, spec: specs.append(spec) or select(backend, spec))
    fusedres.block_tail(*_tail_args(), padding=1, ds_stride=2)
    (spec,) = specs
    assert (spec.batch, spec.input_size, spec.ds_input_size, spec.output_size) == (2, (5, 5), (10, 10), (5, 5))


def test_env_var_selects_backend(monkeypatch):
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
    monkeypatch.setenv("FUSEDRES_BACKEND", "torch")
    with backends.record() as used:
        fusedres.conv_bn_act(x, wt, scale, shift, **kw)
    assert used == {"torch"}
    monkeypatch.setenv("FUSEDRES_BACKEND", "gpu")
    # The caller passed no backend: the message names the variable that did.
    with pytest.raises(ValueError, match=r"\$FUSEDRES_BACKEND must be one of .*got 'gpu'"):
        fusedres.conv_bn_act(x, wt, scale, shift, **kw)
    with pytest.raises(ValueError, match=r"^backend must be one of .*got 'bogus'"):
        fusedres.conv_bn_act(x, wt, scale, shift, backend="bogus", **kw)


def test_cpu_fold_cache_tracks_weight_changes():
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
    first = fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
    wt.mul_(2.0)  # in place: same tensor, new version
    second = fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
    expected = torch_ref.conv_bn_act(x, wt, scale, shift, None, _spec_like(x, wt, kw))
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    third = fusedres.conv_bn_act(x, wt, scale * 0.5, shift, backend="cpu", **kw)
    expected = torch_ref.conv_bn_act(x, wt, scale * 0.5, shift, None, _spec_like(x, wt, kw))
    torch.testing.assert_close(third, expected, rtol=1e-5, atol=1e-5)


def _spec_like(x, wt, kw):
    from fusedres.functional import _pair

    return backends.ConvSpec(
        device_type="cpu", dtype=x.dtype, in_channels=x.shape[1], out_channels=wt.shape[0],
        kernel_size=tuple(wt.shape[2:]), stride=_pair("s", kw["stride"]), padding=_pair("p", kw["padding"]),
        dilation=_pair("d", kw["dilation"]), groups=kw["groups"], relu=True, has_residual=False,
        channels_last=False, requires_grad=False, batch=x.shape[0], input_size=tuple(x.shape[2:]),
    )


def test_cpu_backend_accepts_inference_tensors():
    """Weights created under inference_mode have no version counter: folded afresh, still right."""
    with torch.inference_mode():
        x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
        first = fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
        wt.mul_(2.0)
        second = fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
        expected = fusedres.conv_bn_act(x, wt, scale, shift, backend="torch", **kw)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


def test_clear_caches_after_writes_through_data():
    """``w.data`` writes bypass the version counter; clear_caches() makes them visible."""
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
    fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
    wt.data.mul_(-1.0)
    fusedres.clear_caches()
    out = fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
    expected = fusedres.conv_bn_act(x, wt, scale, shift, backend="torch", **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("written", ["weight", "gamma", "running_mean", "running_var"])
def test_a_write_while_folding_never_leaves_a_stale_fold(monkeypatch, written):
    """Another thread writing a conv weight or BN tensor in place while the ``cpu`` backend folds
    it (a hot reload during threaded inference): that call may see either values, but the cache
    must not keep a fold of the old ones stamped as current.  The write is made where it used to
    do harm, deterministically: a BN vector after the fold read it and before the copy it is
    compared against was taken; the weight after the fold read it and before the cache stamped
    it."""
    from fusedres.backends import cpu

    x, wt, _, _, _, kw = _case(*CONV_CASES[1])
    g = torch.Generator().manual_seed(3)
    tensors = dict(weight=wt, gamma=torch.rand(wt.shape[0], generator=g) + 0.5,
                   beta=torch.randn(wt.shape[0], generator=g), running_mean=torch.randn(wt.shape[0], generator=g),
                   running_var=torch.rand(wt.shape[0], generator=g) + 0.5)
    pending = [tensors[written]]

    class WrittenWhileFolding(cpu._Fold):
        __slots__ = ()

        def __init__(self):
            if pending:
                pending.pop().mul_(1.5)

    cacheable = backends._cacheable

    def written_before_stamping(w):
        if pending:
            pending.pop().mul_(1.5)
        return cacheable(w)

    if written == "weight":
        monkeypatch.setattr(backends, "_cacheable", written_before_stamping)
    else:
        monkeypatch.setattr(cpu, "_Fold", WrittenWhileFolding)
    cpu.clear_cache()

    def call():
        return fusedres.conv_bn_act(x, tensors["weight"], tensors["gamma"], tensors["beta"],
                                    running_mean=tensors["running_mean"], running_var=tensors["running_var"],
                                    backend="cpu", **kw)

    with torch.no_grad():
        call()  # the write lands inside this call's fold
        assert not pending
        out = call()
        expected = torch.relu(torch.nn.functional.batch_norm(
            torch.nn.functional.conv2d(x, tensors["weight"], None, **kw), tensors["running_mean"],
            tensors["running_var"], tensors["gamma"], tensors["beta"], False, 0.0, 1e-5))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_records_nest_and_close_by_identity():
    """``backends.record`` blocks that hold the same names (nested, or open in two threads) each
    close their own: ``list.remove`` would take the first equal one and leave this one recording."""
    x, wt, scale, shift, _, kw = _case(*CONV_CASES[1])
    with torch.no_grad(), backends.record() as outer:
        fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
        with backends.record() as inner:
            fusedres.conv_bn_act(x, wt, scale, shift, backend="cpu", **kw)
        fusedres.conv_bn_act(x, wt, scale, shift, backend="torch", **kw)
    assert inner == {"cpu"} and outer == {"cpu", "torch"}
    assert not any(r is outer or r is inner for r in backends._recorders)


def test_weight_cache_stamp_taken_before_the_value():
    """``WeightCache.put`` with the stamp taken before the value was made from the weight (how
    every backend stores its re-laid-out or cast weights): a write in between makes the entry
    miss, so the next call makes the value again from the new data."""
    cache = backends.WeightCache()
    w = torch.randn(4, 3, 3, 3)
    key = backends.data_key(w)
    value = w.clone()
    w.mul_(2)  # another thread's write, after the value was read
    cache.put(w, value, "tag", key=key)
    assert cache.get(w, "tag") is None
    cache.put(w, w.clone(), "tag")
    assert torch.equal(cache.get(w, "tag"), w)

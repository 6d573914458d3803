"""Train-mode Triton kernels (fusedres/training/triton_kernels.py) vs their torch counterparts.

Without a GPU they run through TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors; with one,
the ``cuda`` tests run them on the device.  The ``aot`` test compiles every kernel for sm_80
and sm_90 in a subprocess without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedres.training import ops

tk = pytest.importorskip("fusedres.training.triton_kernels")

# M = N*H*W = 2*33*34 = 2244 rows: more than one reduction program (2048 rows each), a ragged
# last row-tile, and C = 70 (two channel tiles, the second ragged).
SHAPE = (2, 70, 33, 34)
# Degenerate spatial sizes (a ResNet's layer4 on small inputs): H or W of 1 changes the strides.
EDGE_SHAPES = [(3, 5, 1, 1), (2, 5, 1, 7), (2, 5, 7, 1)]

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpret),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def _rand(shape, dtype, device, channels_last, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) + offset).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(device)


def _vec(c, device, seed, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g) * (hi - lo) + lo).to(device)


def _torch_ref(fn, *args, **kw):
    """The same op through the torch path: fp32 copies on the CPU."""
    def cpu(a):
        return a.cpu() if isinstance(a, torch.Tensor) else a
    return fn(*[cpu(a) for a in args], **{k: cpu(v) for k, v in kw.items()})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [SHAPE, *EDGE_SHAPES], ids=lambda s: "x".join(map(str, s)))
def test_channel_stats(device, dtype, channels_last, shape):
    # A mean of 300 with unit spread: a naive E[z^2] - E[z]^2 in fp32 loses the variance.
    z = _rand(shape, dtype, device, channels_last, offset=300.0)
    mean, var = tk.channel_stats(z)
    zd = z.double().cpu()
    torch.testing.assert_close(mean.cpu().double(), zd.mean((0, 2, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.cpu().double(), zd.var((0, 2, 3), correction=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["plain", "residual", "downsample"])
def test_bn_act(device, dtype, channels_last, mode):
    c = SHAPE[1]
    z = _rand(SHAPE, dtype, device, channels_last, seed=1)
    scale, shift = _vec(c, device, 2), _vec(c, device, 3)
    kw = {}
    if mode == "residual":  # the residual in the other layout: per-tensor strides must be honoured
        kw["residual"] = _rand(SHAPE, dtype, device, not channels_last, seed=4)
    if mode == "downsample":
        kw.update(zd=_rand(SHAPE, dtype, device, channels_last, seed=5), dscale=_vec(c, device, 6), dshift=_vec(c, device, 7))
    out = tk.bn_act(z, scale, shift, relu=True, **kw)
    ref = _torch_ref(ops.bn_act, z, scale, shift, relu=True, **kw)
    assert out.dtype == dtype and out.stride() == z.stride()
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu(), ref, rtol=tol or 1e-6, atol=tol or 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("masked", [True, False], ids=["relu-mask", "no-mask"])
@pytest.mark.parametrize("shape", [SHAPE, EDGE_SHAPES[1]], ids=lambda s: "x".join(map(str, s)))
def test_bn_backward_kernels(device, dtype, channels_last, masked, shape):
    c = shape[1]
    g = _rand(shape, dtype, device, channels_last, seed=8)
    z = _rand(shape, dtype, device, channels_last, offset=5.0, seed=9)
    y = _rand(shape, dtype, device, channels_last, seed=10) if masked else None
    mean = z.float().mean((0, 2, 3))
    sg, sgx = tk.bn_bwd_reduce(g, y, z, mean)
    rsg, rsgx = _torch_ref(ops.bn_bwd_reduce, g.float(), y, z.float(), mean)
    torch.testing.assert_close(sg.cpu(), rsg, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sgx.cpu(), rsgx, rtol=1e-4, atol=1e-3)
    a, b, cc = _vec(c, device, 11), _vec(c, device, 12), _vec(c, device, 13)
    gz, gp = tk.bn_bwd_apply(g, y, z, mean, a, b, cc, write_gp=True)
    rgz, rgp = _torch_ref(ops.bn_bwd_apply, g, y, z, mean, a, b, cc, write_gp=True)
    assert gz.dtype == dtype and gz.stride() == z.stride() and gp.stride() == g.stride()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gz.cpu(), rgz, rtol=tol, atol=tol)
    torch.testing.assert_close(gp.cpu(), rgp, rtol=0, atol=0)


_AOT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedres.training import triton_kernels as tk

    def sig(fn, ptrs, consts):
        s = {}
        for name in fn.arg_names:
            if name in consts:
                s[name] = "constexpr"
            elif name in ptrs:
                s[name] = ptrs[name]
            else:
                s[name] = "i64" if name.startswith(("s_", "zs_", "rs_", "ds_", "os_", "gs_", "ys_", "ps_")) else "i32"
        return s

    B = {"BLOCK_M": 64, "BLOCK_C": 64}
    jobs = []
    for act in ("fp32", "bf16", "fp16"):
        f32 = "*fp32"
        jobs.append((tk._channel_stats_kernel, {"z_ptr": "*" + act, "pivot_ptr": f32, "psum_ptr": f32, "psq_ptr": f32}, B))
        a = "*" + act
        jobs.append((tk._bn_act_kernel, {"z_ptr": a, "scale_ptr": f32, "shift_ptr": f32, "r_ptr": a, "zd_ptr": a,
                     "dscale_ptr": f32, "dshift_ptr": f32, "out_ptr": a},
                     dict(B, HAS_RES=False, HAS_DS=True, RELU=True)))
        jobs.append((tk._bn_bwd_reduce_kernel, {"g_ptr": a, "y_ptr": a, "z_ptr": a, "mean_ptr": f32, "psg_ptr": f32,
                     "psgx_ptr": f32}, dict(B, HAS_MASK=True)))
        jobs.append((tk._bn_bwd_apply_kernel, {"g_ptr": a, "y_ptr": a, "z_ptr": a, "mean_ptr": f32, "a_ptr": f32,
                     "b_ptr": f32, "c_ptr": f32, "gz_ptr": a, "gp_ptr": a}, dict(B, HAS_MASK=True, WRITE_GP=True)))
    for cc in (80, 90):
        for fn, ptrs, consts in jobs:
            k = triton.compile(ASTSource(fn, sig(fn, ptrs, consts), consts), target=GPUTarget("cuda", cc, 32))
            assert len(k.asm["cubin"]) > 0, (fn.__name__, cc)
    print("compiled", 2 * len(jobs))
    """
)


@pytest.mark.aot
def test_aot_compile_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled 24" in res.stdout

"""Argument checks shared by every backend's ``torch.library`` ops, eager and fake alike.

Each check is ``check(cond, message)``: :func:`require` in an eager implementation (a
``ValueError`` naming the backend), ``torch._check`` in a fake one, so an op reports the same
errors under ``torch.compile`` as eagerly.  Plain comparisons; messages are built only on
failure.  The user-facing :mod:`fusedres.functional` checks once more, naming each argument,
before a call is planned; compiled C++ kernels keep their own ``TORCH_CHECK`` s as the last guard.
"""

from __future__ import annotations

import torch

from . import conv_out_hw


def require(backend: str):
    """The eager ``check`` of ``backend``'s ops."""

    def check(cond: bool, message) -> None:
        if not cond:
            raise ValueError(f"fusedres {backend}: {message()}")

    return check


def check_conv(check, dtypes, x_name, x, w_name, weight, stride, padding, dilation, groups, stride_name="stride",
               w_dtypes=()):
    """``x`` ``(N, C, H, W)``, ``weight`` ``(K, C / groups, KH, KW)`` of one dtype in ``dtypes`` on one
    device (or a weight in ``w_dtypes``: an op that casts the weight itself, such as the fp32 master
    weight of an autocast call that the ``cpu`` fold rounds once), and the geometry; returns the
    output shape ``(N, K, OH, OW)``."""
    xs, ws, dt = x.shape, weight.shape, x.dtype
    check(len(xs) == 4 and len(ws) == 4 and dt in dtypes and (weight.dtype == dt or weight.dtype in w_dtypes)
          and weight.device == x.device,
          lambda: f"{x_name} and {w_name} must be 4-D {_names(dtypes)} tensors of one dtype on one device"
                  + (f" ({w_name} may also be {_names(w_dtypes)})" if w_dtypes else "") + ", got "
                  f"{tuple(xs)} {dt} on {x.device} and {tuple(ws)} {weight.dtype} on {weight.device}")
    (n, c, h, w), (k, cg, kh, kw) = xs, ws
    check(groups >= 1 and k % groups == 0 and cg * groups == c,
          lambda: f"{w_name} {tuple(ws)} with groups={groups} does not fit {x_name}'s {c} channels")
    check(k >= 1 and cg >= 1, lambda: f"{w_name} {tuple(ws)} has no output or no input channel")
    check(kh >= 1 and kw >= 1, lambda: f"{w_name} {tuple(ws)} has an empty {kh}x{kw} kernel")
    check(len(stride) == len(padding) == len(dilation) == 2 and min(*stride, *dilation) >= 1 and min(padding) >= 0,
          lambda: f"invalid {stride_name}={stride}, padding={padding}, dilation={dilation} for {w_name}")
    oh, ow = conv_out_hw(h, w, (kh, kw), stride, padding, dilation)
    check(oh >= 1 and ow >= 1, lambda: f"{x_name} spatial size {(h, w)} gives an empty output {oh}x{ow}")
    return n, k, oh, ow


def _names(dtypes) -> str:
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    names = [short.get(d, str(d)) for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_vectors(check, x, n, named, dtypes=None) -> None:
    """Each non-None ``(name, v)`` in ``named`` is ``(n,)`` on ``x``'s device, in ``dtypes`` (default fp32 or ``x``'s)."""
    dtypes = tuple(dict.fromkeys(dtypes or (torch.float32, x.dtype)))
    device = x.device
    for name, v in named:
        if v is not None:
            check(v.shape == (n,) and v.dtype in dtypes and v.device == device,
                  lambda: f"{name} must be a ({n},) tensor of {' or '.join(map(str, dtypes))} on {device}, "
                          f"got {tuple(v.shape)} {v.dtype} on {v.device}")


def check_conv_bn_act(check, dtypes, x, weight, scale, shift, residual, mean, var, stride, padding, dilation,
                      groups, w_dtypes=(), eps=0.0):
    """The operands of a ``conv_bn_act_<backend>`` op."""
    out = check_conv(check, dtypes, "x", x, "weight", weight, stride, padding, dilation, groups, w_dtypes=w_dtypes)
    check_vectors(check, x, out[1], (("scale", scale), ("shift", shift), ("mean", mean), ("var", var)))
    check((mean is None) == (var is None), lambda: "mean and var must be given together")
    # eps is used only with the statistics (the functional API and the cuda C++ op ignore it otherwise)
    check(mean is None or eps >= 0, lambda: f"eps must be a non-negative number, got {eps}")
    if residual is not None:
        check(residual.shape == out and residual.dtype == x.dtype and residual.device == x.device,
              lambda: f"residual must be a {out} {x.dtype} tensor on {x.device} (the output's), got "
                      f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    return out


def check_block_tail(check, dtypes, y, weight, scale, shift, x, ds_weight, ds_scale, ds_shift, mean, var, ds_mean,
                     ds_var, stride, padding, dilation, groups, ds_stride, stats_together=True, w_dtypes=(), eps=0.0,
                     ds_eps=0.0):
    """The operands of a ``block_tail_<backend>`` op; ``stats_together``: the op takes both branches'
    BN statistics or neither (else each branch's pair on its own)."""
    out = check_conv(check, dtypes, "y", y, "weight", weight, stride, padding, dilation, groups, w_dtypes=w_dtypes)
    ds_out = check_conv(check, dtypes, "x", x, "ds_weight", ds_weight, ds_stride, (0, 0), (1, 1), 1, "ds_stride",
                        w_dtypes=w_dtypes)
    check(x.dtype == y.dtype and x.device == y.device,
          lambda: f"x ({x.dtype} on {x.device}) must match y ({y.dtype} on {y.device})")
    check(ds_out == out and ds_weight.shape[2:] == (1, 1),
          lambda: f"the downsample branch (x {tuple(x.shape)}, ds_weight {tuple(ds_weight.shape)}, a 1x1 kernel, "
                  f"ds_stride={ds_stride}) must give the main branch's output {out}, got {ds_out}")
    check_vectors(check, y, out[1], (("scale", scale), ("shift", shift), ("ds_scale", ds_scale),
                                     ("ds_shift", ds_shift), ("mean", mean), ("var", var), ("ds_mean", ds_mean),
                                     ("ds_var", ds_var)))
    if stats_together:
        check((mean is None) == (var is None) == (ds_mean is None) == (ds_var is None),
              lambda: "BN statistics (mean, var, ds_mean, ds_var) must be given all together or not at all")
    else:
        check((mean is None) == (var is None) and (ds_mean is None) == (ds_var is None),
              lambda: "mean and var (and ds_mean and ds_var) must be given together")
    check((mean is None or eps >= 0) and (ds_mean is None or ds_eps >= 0),
          lambda: f"eps and ds_eps must be non-negative numbers, got {eps} and {ds_eps}")
    return out

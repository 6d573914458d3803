"""Train-mode conv+BN chains (a ResNet block or the stem) as one autograd node with a lean backward.

A *chain* is ``K`` convs, each followed by a batch-statistics BatchNorm; every BN but the last is
followed by ReLU, the last by an optional residual (the block input, or a 1x1 conv+BN
downsample of it), ReLU and an optional max-pool::

    a_0 = x
    z_i = conv_i(a_{i-1})                                  (pre-BN output, saved)
    a_i = relu(bn_i(z_i))                 i < K            (recomputed in backward, never saved)
    y   = relu(bn_K(z_K) [+ x | + bn_d(conv_d(x))])        (saved: it is the next chain's input anyway)
    out = y, or max_pool(y)                                (with a pool, y is recomputed, not saved)

On CUDA (Triton) each conv is one launch that also emits the batch statistics of its ``z_i``,
and ``a_i`` is not even written in forward: the next conv applies ``relu(bn_i(.))`` to ``z_i``
in its operand load (``ops.conv_stats``).

``bn_i(z) = (z - mean_i) * invstd_i * gamma_i + beta_i`` with ``mean_i`` / biased ``var_i`` over
``N, H, W`` (optionally over every rank of a process group).

Saved for backward: the chain input ``x``, the pre-BN outputs ``z_i`` (and ``z_d``), the
per-channel statistics, and ``y``.  With ``recompute_last`` the last ``z_K`` is not saved either
but recomputed in backward from ``a_{K-1}`` (which backward rebuilds anyway for the conv's weight
gradient): one extra convolution, worth it when the conv is cheap per output element (a
Bottleneck's 1x1 ``conv3``, the 3-channel stem) and its output is large.  Eager PyTorch
additionally keeps every ``a_i`` (and the pool's input and int64 indices); the ReLU masks are
recomputed here from ``z_i`` (``a_i > 0``) and from ``y`` (``y > 0``), so no mask tensor is
stored at all.  Measured with saved-tensor hooks (benchmarks/train_memory.py, fp32, batch 2,
224x224): with CUDA's recompute policy ResNet-50 keeps 0.52x and ResNet-18 0.51x of eager's
activation bytes; CPU chains save the last conv's output instead (compute-bound convolutions:
:data:`fusedres.training.CPU_RECOMPUTE_MAX_REDUCTION`), 0.80x and 0.66x.

Backward per BN (the standard formula, ``M`` = element count per channel over all ranks)::

    gp      = g * (a > 0)
    g_beta  = sum(gp),   g_gamma = invstd * sum(gp * (z - mean))
    g_z     = gamma*invstd * (gp - g_beta/M - (z - mean) * invstd^2 * sum(gp*(z - mean))/M)

with the two sums all-reduced over the group for synchronised BN (for ``g_z`` only: ``g_gamma``
and ``g_beta`` stay per rank, since DistributedDataParallel reduces parameter gradients).  The
convolutions' data and weight gradients come from ATen's ``convolution_backward`` (cuDNN on
CUDA, oneDNN/native on CPU).

Double backward (``create_graph=True``) does not use this backward: it runs the chain's forward
again with torch's own ops and differentiates that (:meth:`ChainTrain._differentiable_backward`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ops

_NO_DOUBLE_BACKWARD = (
    "fusedres train-mode blocks with synchronised BatchNorm do not support double backward "
    "(create_graph=True / higher-order gradients); revert the model with fusedres.revert() for that"
)


def _group_stats(mean: torch.Tensor, var: torch.Tensor, n: int, group):
    """``(mean, biased var, count)`` per channel from this rank's ``n`` samples' ``(mean, var)``;
    over all ranks of ``group`` when given (then ``count`` is a 0-d tensor, else ``n``).

    Ranks exchange ``(count, mean, var)`` with one ``all_gather`` and combine them with Chan's
    parallel formula (no ``E[x^2] - E[x]^2`` across ranks, so no cancellation).
    """
    if group is None:
        return mean, var, n
    local = torch.cat([mean, var, mean.new_full((1,), n)])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    allp = torch.stack(parts)
    c = mean.shape[0]
    counts = allp[:, 2 * c:]
    total = counts.sum()
    gmean = (counts * allp[:, :c]).sum(0) / total
    m2 = (counts * (allp[:, c:2 * c] + (allp[:, :c] - gmean) ** 2)).sum(0)
    # The global count stays a device tensor: no host sync per BN layer.
    return gmean, m2 / total, total


def _scale_shift(gamma, beta, mean, invstd):
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(invstd.dtype)
    return scale, shift


def _bn_backward(g, y, z, mean, invstd, gamma, count, group, *, write_gp: bool):
    """BN(+ReLU via ``y > 0``) backward: ``(g_z, g_gamma, g_beta, gp)``; see the module docstring."""
    if group is None:  # local statistics: ATen's one-call kernel where it applies
        fused = ops.bn_backward(g, y, z, mean, invstd, gamma, write_gp=write_gp)
        if fused is not None:
            return fused
    sg, sgx = ops.bn_bwd_reduce(g, y, z, mean)
    # gamma/beta get this rank's share only: DDP reduces parameter gradients itself.
    g_gamma, g_beta = sgx * invstd, sg
    if group is not None:  # g_z needs the sums over the whole (global) batch
        both = torch.stack([sg, sgx])
        dist.all_reduce(both, group=group)
        sg, sgx = both[0], both[1]
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    b = -scale * invstd * invstd * sgx / count
    c = -scale * sg / count
    gz, gp = ops.bn_bwd_apply(g, y, z, mean, scale, b, c, write_gp=write_gp)
    return gz, g_gamma, g_beta, gp


def update_running_stats(bns, stats) -> None:
    """``nn.BatchNorm2d``'s running-statistics update of each BN in ``bns`` from ``stats = (mean_1,
    var_1, ...)`` (unbiased variances): momentum, or a cumulative average if ``None``.

    Eager calls make it inside :meth:`ChainTrain.forward`, where BatchNorm makes it (inside its
    op): non-reentrant ``torch.utils.checkpoint`` stops a recomputation as soon as the last op
    has saved its tensors, so an update after the op would be skipped for the segment's last
    chain, where torchvision updates every BN again."""
    for i, bn in enumerate(bns):
        _update_one(bn, stats[2 * i], stats[2 * i + 1])


def _update_one(bn, mean: torch.Tensor, var: torch.Tensor) -> None:
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return
    if torch.compiler.is_compiling() and not (bn.running_mean.requires_grad or bn.running_var.requires_grad):
        # Traced (torch.compile, torch.export): detached operands instead of a no_grad region.  The
        # region became a graph node with no outputs, whose metadata torch.export.save drops, so a
        # saved train-mode program failed to load ("wrap_with_set_grad_enabled is missing val field").
        _update_values(bn, mean.detach(), var.detach())
        return
    with torch.no_grad():
        _update_values(bn, mean, var)


def _update_values(bn, mean: torch.Tensor, var: torch.Tensor) -> None:
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        # A tensor factor (not float(num_batches_tracked)) keeps torch.compile graphs whole;
        # fp64, like eager's Python float (a 0-d tensor does not promote the buffers).
        f = 1.0 / bn.num_batches_tracked.double() if bn.num_batches_tracked is not None else 0.0
    else:
        f = bn.momentum
    bn.running_mean.copy_(bn.running_mean * (1 - f) + mean.to(bn.running_mean.dtype) * f)
    bn.running_var.copy_(bn.running_var * (1 - f) + var.to(bn.running_var.dtype) * f)


def _conv(a, w, geom):
    stride, padding, dilation, groups = geom
    return F.conv2d(a, w, None, stride, padding, dilation, groups)


def _conv_backward(gz, a, w, geom, need_input: bool, need_weight: bool):
    stride, padding, dilation, groups = geom
    ga, gw, _ = torch.ops.aten.convolution_backward(
        gz, a, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_input, need_weight, False],
    )
    return ga, gw


def _save(ctx, **groups) -> None:
    """``save_for_backward`` by name: each value is a tensor (or ``None``) or a list of them."""
    ctx.saved_layout = tuple((name, len(v) if isinstance(v, (list, tuple)) else None) for name, v in groups.items())
    flat = []
    for v in groups.values():
        flat += list(v) if isinstance(v, (list, tuple)) else [v]
    ctx.save_for_backward(*flat)


def _load(ctx) -> dict:
    """The groups given to :func:`_save`, by name (lists come back as lists)."""
    it = iter(ctx.saved_tensors)
    return {name: (next(it) if n is None else [next(it) for _ in range(n)]) for name, n in ctx.saved_layout}


class ChainTrain(torch.autograd.Function):
    """Forward/backward of one chain; see the module docstring.

    ``apply(cfg, group, x, w_1, gamma_1, beta_1, ..., w_K, gamma_K, beta_K[, w_d, gamma_d, beta_d])``
    where ``cfg = (geoms, eps, residual, pool, recompute_last)``:

    * ``geoms``: per conv ``(stride, padding, dilation, groups)``, the downsample's last;
    * ``eps``: per BN, the downsample's last;
    * ``residual``: ``"none" | "identity" | "downsample"``;
    * ``pool``: ``None`` or ``(kernel_size, stride, padding, dilation, ceil_mode)`` of a max-pool;
    * ``recompute_last``: recompute ``z_K`` in backward instead of saving it;
    * ``group``: ``None`` (local statistics) or the process group to synchronise them over.

    ``x`` is in the compute dtype (the autocast dtype under AMP); the conv weights are the
    layers' own (fp32 masters under AMP): the chain casts each per forward into ``x``'s dtype
    (and layout: :func:`_compute_weight`), keeps a cast copy for backward (a same-dtype re-layout
    is made again there), and hands the weight gradients back in the weights' own dtype and
    strides (:func:`_like`).  The weights themselves are saved too, for double backward: no
    memory for parameters, but computed weights (``functional_call`` with fast weights under
    autocast) stay alive until backward beside their cast copies.  Gammas and betas may be fp32.
    Returns ``(out, mean_1, var_1, ...)``: batch mean and *unbiased* batch variance per BN (what
    the running statistics need), non-differentiable.
    """

    @staticmethod
    def forward(ctx, cfg, group, x, *params):
        geoms, eps, residual, pool, recompute_last = cfg[:5]
        nconv = len(geoms)
        k = nconv - (residual == "downsample")
        ws, gammas, betas = params[0::3], params[1::3], params[2::3]
        wcs = [_compute_weight(w, x) for w in ws]
        with torch.autocast(x.device.type, enabled=False):
            # conv_i's input a_{i-1} = relu(bn_{i-1}(z_{i-1})) is passed as (z_{i-1}, scale, shift):
            # ops.conv_stats applies the BN in the conv's operand load (Triton) or materialises it.
            a, a_bn = x, (None, None)
            zs, means, invstds, counts, stats_out = [], [], [], [], []
            for i in range(nconv):
                src, src_bn = (x, (None, None)) if i == k else (a, a_bn)
                z, mean, var = ops.conv_stats(src, wcs[i], geoms[i], *src_bn)
                mean, var, count = _group_stats(mean, var, z.numel() // z.shape[1], group)
                if isinstance(count, int) and count == 1:  # nn.BatchNorm2d's own check
                    raise ValueError(
                        f"Expected more than 1 value per channel when training, got input size {tuple(z.shape)}"
                    )
                counts.append(count)
                invstd = torch.rsqrt(var + eps[i])
                if i < k - 1:
                    a, a_bn = z, _scale_shift(gammas[i], betas[i], mean, invstd)
                zs.append(z)
                means.append(mean)
                invstds.append(invstd)
                # A symbolic count (torch.export with a dynamic batch) that may be 1 divides as a
                # tensor op, giving inf/NaN variance as torchvision's exported BatchNorm does, where
                # SymInt division raises ZeroDivisionError (eager raises BatchNorm's error above).
                unbiased = var * count / (count - 1) if isinstance(count, torch.SymInt) else var * (count / (count - 1))
                stats_out += [mean, unbiased]
            s, t = _scale_shift(gammas[k - 1], betas[k - 1], means[k - 1], invstds[k - 1])
            if residual == "downsample":
                sd, td = _scale_shift(gammas[k], betas[k], means[k], invstds[k])
                y = ops.bn_act(zs[k - 1], s, t, zd=zs[k], dscale=sd, dshift=td, relu=True)
            else:
                y = ops.bn_act(zs[k - 1], s, t, residual=x if residual == "identity" else None, relu=True)
            out = y if pool is None else F.max_pool2d(y, *pool)
        ctx.cfg, ctx.group, ctx.k, ctx.counts = cfg, group, k, tuple(counts)
        if recompute_last:
            zs[k - 1] = None
        _save(
            # a cast copy is kept (the caller's cast was, before the chain cast itself); a same-dtype
            # re-layout is made again in backward (see _compute_weight)
            ctx, x=x, y=None if pool is not None else y, ws=ws,
            wcs=[wc if wc.dtype != w.dtype else None for w, wc in zip(ws, wcs)], gammas=gammas, betas=betas,
            zs=zs, means=means, invstds=invstds,
        )
        ctx.mark_non_differentiable(*stats_out)
        if len(cfg) > 5 and not torch.compiler.is_compiling():
            update_running_stats(cfg[5], stats_out)
        return (out, *stats_out)

    @staticmethod
    def backward(ctx, gout, *_stat_grads):
        if not torch.is_grad_enabled():
            return ChainTrain._backward(ctx, gout)
        if ctx.group is None:
            return ChainTrain._differentiable_backward(ctx, gout)
        # create_graph=True with synchronised statistics: hand back gradients whose own backward raises
        # a clear error (what torch.autograd.function.once_differentiable does, naming fusedres).
        with torch.no_grad():
            grads = ChainTrain._backward(ctx, gout)
        live = [i for i, g in enumerate(grads) if g is not None]
        err = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD.encode(), len(live))
        wrapped = err(*[grads[i].detach().requires_grad_() for i in live])
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        out = list(grads)
        for i, w in zip(live, wrapped):
            out[i] = w
        return tuple(out)

    @staticmethod
    def _differentiable_backward(ctx, gout):
        """The backward of ``create_graph=True`` (a gradient penalty, a Hessian-vector product):
        the chain's forward again as torchvision computes it (``F.conv2d``, batch-statistics
        ``F.batch_norm`` that updates no running statistics, ReLU, the residual, the pool) from the
        saved inputs, differentiated with ``create_graph=True``, so the gradients carry their own
        graph back to the inputs, the parameters and ``gout``.  It costs one more forward of
        the block, and only here."""
        geoms, eps, residual, pool, _ = ctx.cfg[:5]
        k = ctx.k
        saved = _load(ctx)
        need = ctx.needs_input_grad[2:]
        # Each slot is differentiated through an alias of its own, so it gets exactly its share of the
        # gradient: autograd.grad with respect to the saved tensors themselves gave a tensor in two slots
        # (a weight or gamma used twice in the block, whether unpacked as one object or, under
        # saved-tensor hooks, as two) its whole gradient in each, and a weight shared with an earlier
        # block also its share from there (reached through x's history); autograd then adds the slots.
        inputs = [t.view_as(t) if t is not None and need[i] else t
                  for i, t in enumerate([saved["x"]] + _interleave(saved["ws"], saved["gammas"], saved["betas"]))]
        x, ws, gammas, betas = inputs[0], inputs[1::3], inputs[2::3], inputs[3::3]
        wanted = [i for i, t in enumerate(inputs) if t is not None and need[i]]
        with torch.autocast(x.device.type, enabled=False):
            a = x
            for i in range(k):
                a = F.batch_norm(_conv(a, _compute_weight(ws[i], x), geoms[i]), None, None, gammas[i], betas[i],
                                 True, 0.0, eps[i])
                if i < k - 1:
                    a = F.relu(a)
            if residual == "downsample":
                a = a + F.batch_norm(_conv(x, _compute_weight(ws[k], x), geoms[k]), None, None, gammas[k], betas[k],
                                     True, 0.0, eps[k])
            elif residual == "identity":
                a = a + x
            out = F.relu(a)
            if pool is not None:
                out = F.max_pool2d(out, *pool)
            got = torch.autograd.grad(out, [inputs[i] for i in wanted], gout, create_graph=True, allow_unused=True)
        grads = [None] * len(inputs)
        for i, g in zip(wanted, got):
            grads[i] = g
        return (None, None, *grads)

    @staticmethod
    @torch.no_grad()
    def _backward(ctx, gout):
        geoms, eps, residual, pool, _ = ctx.cfg[:5]
        group, k, counts = ctx.group, ctx.k, ctx.counts
        saved = _load(ctx)
        x, y, ws, gammas, betas = saved["x"], saved["y"], saved["ws"], saved["gammas"], saved["betas"]
        zs, means, invstds = saved["zs"], saved["means"], saved["invstds"]
        wcs = [_compute_weight(w, x) if wc is None else wc for w, wc in zip(ws, saved["wcs"])]
        nw = len(ws)
        need = ctx.needs_input_grad  # (cfg, group, x, w_1, gamma_1, beta_1, ...)
        grads = [None] * (3 * nw)

        def ab(i):
            return _scale_shift(gammas[i], betas[i], means[i], invstds[i])

        with torch.autocast(x.device.type, enabled=False):
            a_last = None
            if zs[k - 1] is None:  # recompute_last: rebuild conv_K's input, then z_K
                a_last = x if k == 1 else ops.bn_act(zs[k - 2], *ab(k - 2), relu=True)
                zs[k - 1] = _conv(a_last, wcs[k - 1], geoms[k - 1])
            if pool is not None:  # recompute y and the pool's argmax instead of having stored them
                s, t = ab(k - 1)
                if residual == "downsample":
                    sd, td = ab(k)
                    y = ops.bn_act(zs[k - 1], s, t, zd=zs[k], dscale=sd, dshift=td, relu=True)
                else:
                    y = ops.bn_act(zs[k - 1], s, t, residual=x if residual == "identity" else None, relu=True)
                _, idx = F.max_pool2d(y, *pool, return_indices=True)
                ks, st, pd, dl, ceil = pool
                gy = torch.ops.aten.max_pool2d_with_indices_backward(
                    gout, y, [ks, ks] if isinstance(ks, int) else list(ks),
                    [st, st] if isinstance(st, int) else list(st),
                    [pd, pd] if isinstance(pd, int) else list(pd),
                    [dl, dl] if isinstance(dl, int) else list(dl), ceil, idx,
                )
                del idx
            else:
                gy = gout
            gz, grads[3 * (k - 1) + 1], grads[3 * (k - 1) + 2], gp = _bn_backward(
                gy, y, zs[k - 1], means[k - 1], invstds[k - 1], gammas[k - 1], counts[k - 1], group,
                write_gp=residual == "identity" and need[2],
            )
            gx = gp
            if residual == "downsample":
                gzd, grads[3 * k + 1], grads[3 * k + 2], _ = _bn_backward(
                    gy, y, zs[k], means[k], invstds[k], gammas[k], counts[k], group, write_gp=False
                )
                gxd, grads[3 * k] = _conv_backward(gzd, x, wcs[k], geoms[k], need[2], need[3 + 3 * k])
                del gzd
                gx = gxd
            del gy, y
            for i in range(k - 1, -1, -1):
                if i == k - 1 and a_last is not None:
                    a = a_last
                else:
                    a = x if i == 0 else ops.bn_act(zs[i - 1], *ab(i - 1), relu=True)
                need_in = need[2] if i == 0 else True
                ga, grads[3 * i] = _conv_backward(gz, a, wcs[i], geoms[i], need_in, need[3 + 3 * i])
                if i > 0:
                    gz, grads[3 * (i - 1) + 1], grads[3 * (i - 1) + 2], _ = _bn_backward(
                        ga, a, zs[i - 1], means[i - 1], invstds[i - 1], gammas[i - 1], counts[i - 1], group,
                        write_gp=False,
                    )
                elif ga is not None:
                    gx = ga if gx is None else ga.add_(gx)  # ga is this backward's own tensor
        for j in range(nw):  # no gradient for an absent (None) gamma/beta or a frozen parameter
            for off in (0, 1, 2):
                if not need[3 + 3 * j + off]:
                    grads[3 * j + off] = None
        grads = [_like(g, p) for g, p in zip(grads, _interleave(ws, gammas, betas))]
        return (None, None, gx if need[2] else None, *grads)


def _compute_weight(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The copy of conv weight ``w`` a chain computes with: in ``x``'s dtype (the autocast dtype, rounded
    as autocast rounds) and, for a channels_last chain on CPU, channels_last, in one copy (``w`` itself
    when it already is).  ATen's CPU convolutions otherwise re-lay the weight out in forward and again
    in backward, and the weight gradient came back in the activations' layout for another copy: with
    autocast's cast and its backward, six weight-sized copies per 3x3 conv and step where three remain
    (this one, ATen's copy of the gradient into the activations' layout, and :func:`_like`'s);
    ResNet-50, bf16 autocast, batch 8: 30.6 -> 23.6 ms of copies per step (2 cores, profiler,
    2026-12-03).  A same-dtype re-layout (fp32) is not kept for backward but made again there, as
    ATen did: four copies per 3x3 conv either way, and no weight-sized tensor saved.  An NCHW chain
    (small maps on CPU) and CUDA keep the weight's own layout: a channels_last model's weights make
    ATen's CPU convolution run channels_last there, as before (re-laying them NCHW cost more copies
    and time), and the Triton kernels re-lay the weight out for themselves."""
    if x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        if w.dtype == x.dtype and w.is_contiguous(memory_format=torch.channels_last):
            return w  # (.to would copy a contiguous 1x1 filter to "re-lay" it)
        return w.to(x.dtype, memory_format=torch.channels_last)
    return w.to(x.dtype)


def _like(g, p):
    """The gradient ``g`` of ``p`` in ``p``'s dtype and with ``p``'s strides, in at most one copy.

    A channels_last chain's weight gradients come back channels_last in the compute dtype (bf16 under
    autocast) while the model's weights are usually fp32 and contiguous: one copy converts both, and
    ``AccumulateGrad`` then keeps the tensor as it is, where it would otherwise make a layout-changing
    copy on every step (or add across layouts into an existing ``.grad``).  Strides that differ only
    on size-1 dimensions (a 1x1 filter's) are set to ``p``'s without a copy, which
    DistributedDataParallel's ``gradient_as_bucket_view`` compares exactly.  A gradient batched by
    ``vmap`` (``is_grads_batched``) only changes dtype: vmap cannot query or choose layouts."""
    if g is None or p is None:
        return g
    if not torch.compiler.is_compiling() and (
            torch._C._functorch.is_legacy_batchedtensor(g) or torch._C._functorch.is_batchedtensor(g)):
        return g.to(p.dtype)
    if p.is_contiguous():
        fmt = torch.contiguous_format
    elif p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    else:
        return g.to(p.dtype)
    if g.dtype != p.dtype or not g.is_contiguous(memory_format=fmt):
        g = g.to(p.dtype, memory_format=fmt)
    # (not while compiling: the strides traced for ATen's CPU convolution backward are not always the
    # kernel's, and as_strided would then reinterpret the real gradient's memory)
    if (g.stride() != p.stride() and not torch.compiler.is_compiling()
            and all(n == 1 or a == b for n, a, b in zip(p.shape, g.stride(), p.stride()))):
        g = g.as_strided(p.shape, p.stride())
    return g


def _interleave(ws, gammas, betas):
    out = []
    for w, g, b in zip(ws, gammas, betas):
        out += [w, g, b]
    return out

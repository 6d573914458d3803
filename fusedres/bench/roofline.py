"""Roofline accounting: FLOPs and minimum bytes per workload, and the device's measured peaks.

Cost model.  A workload is a list of *ops*; each op is one fused conv as fusedres runs it
(conv + BN + ReLU (+ residual) (+ the 1x1 downsample conv of ``block_tail``)), or the
classifier.  An op's floor time is ``max(flops / peak_flops, bytes / peak_bandwidth)`` and a
workload's floor is the sum over its ops, so a memory-bound 1x1 conv is not hidden behind a
compute-bound 3x3 one.  ``percent of roofline = floor / measured time``.

* FLOPs: ``2 * MACs`` of the convs (and the linear layer); BN, ReLU, adds and pooling are
  ignored, as in torchvision's published counts.
* Minimum bytes: each op reads its input, weights (and BN scale/shift, fp32) and residual
  once and writes its output once.  The downsample conv's output never reaches memory in
  ``block_tail``, so it is not counted; pooling layers are not counted either.
* Train mode adds, per conv, the data-gradient (read grad-out and weights, write grad-in;
  skipped for the stem, whose input needs no gradient) and the weight-gradient (read
  grad-out and the input, write grad-weight), each ``2 * MACs`` FLOPs.  BN/ReLU backward and
  gradient accumulation are elementwise passes a fused kernel could fold in, so they are
  left out: the train floor is a lower bound, looser than the inference one.

Peaks are *measured*, on the same device at the start of the run, not taken from a data
sheet: a large matmul in the benchmark dtype gives the FLOP rate (on CPU the fastest of a
matmul, the same product as a 1x1 conv and a large 3x3 conv, see :func:`measure_peaks`) and a
large device-to-device copy (read + write bytes) the bandwidth.  Workloads can therefore exceed
100% only by beating the library's own matmul, reference convolutions or memcpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends import cudnn_conv_tf32
from .timing import Stats, sync, time_interleaved
from .workloads import BlockShape, count_macs, meta_model, model_blocks

_BN_BYTES = 2 * 4  # fp32 scale + shift per output channel


@dataclass(frozen=True)
class Op:
    """One memory round trip: ``flops`` of work on ``bytes`` of minimum traffic."""

    name: str
    flops: int
    bytes: int


def _conv_macs(cin, cout, k, groups, n, hout, wout) -> int:
    return n * cout * hout * wout * (cin // groups) * k * k


def _conv_ops(name, *, cin, cout, k, groups, n, hin, win, hout, wout, elem, train, needs_dgrad=True,
              residual_numel=0, ds=None) -> list[Op]:
    """The forward op of one fused conv (and its backward ops in train mode).

    ``ds``: ``(cin, cout, n, hin, win, hout, wout)`` of a fused 1x1 downsample conv.
    """
    macs = _conv_macs(cin, cout, k, groups, n, hout, wout)
    x, w, y = n * cin * hin * win, cout * (cin // groups) * k * k, n * cout * hout * wout
    fwd_bytes = (x + w + y + residual_numel) * elem + cout * _BN_BYTES
    fwd_macs = macs
    if ds is not None:
        dcin, dcout, dn, dh, dw_, dho, dwo = ds
        ds_w = dcout * dcin
        fwd_macs += _conv_macs(dcin, dcout, 1, 1, dn, dho, dwo)
        fwd_bytes += (dn * dcin * dh * dw_ + ds_w) * elem + dcout * _BN_BYTES
    ops = [Op(name, 2 * fwd_macs, fwd_bytes)]
    if train:
        ops.append(Op(name + ".wgrad", 2 * macs, (y + x + w) * elem))
        if needs_dgrad:
            ops.append(Op(name + ".dgrad", 2 * macs, (y + w + x) * elem))
        if ds is not None:
            dmacs = fwd_macs - macs
            ops.append(Op(name + ".ds.wgrad", 2 * dmacs, (y + dn * dcin * dh * dw_ + ds_w) * elem))
            ops.append(Op(name + ".ds.dgrad", 2 * dmacs, (y + ds_w + dn * dcin * dh * dw_) * elem))
    return ops


def block_ops(shape: BlockShape, batch: int, dtype: torch.dtype, train: bool = False) -> list[Op]:
    """The fused ops of one block at ``batch``, as fusedres runs them (2 or 3 per block)."""
    elem = torch.empty((), dtype=dtype).element_size()
    n, h, w = batch, shape.height, shape.width
    ho, wo = shape.out_hw
    cout = shape.out_channels
    ds = (shape.inplanes, cout, n, h, w, ho, wo) if shape.downsample else None
    # Without a downsample the tail reads the block input as its residual.
    res = 0 if shape.downsample else n * cout * ho * wo
    common = dict(n=n, elem=elem, train=train)
    if shape.kind == "basic":
        p = shape.planes
        return (
            _conv_ops("conv1", cin=shape.inplanes, cout=p, k=3, groups=1, hin=h, win=w, hout=ho, wout=wo, **common)
            + _conv_ops("conv2", cin=p, cout=cout, k=3, groups=1, hin=ho, win=wo, hout=ho, wout=wo,
                        residual_numel=res, ds=ds, **common)
        )
    wd = shape.width_channels
    return (
        _conv_ops("conv1", cin=shape.inplanes, cout=wd, k=1, groups=1, hin=h, win=w, hout=h, wout=w, **common)
        + _conv_ops("conv2", cin=wd, cout=wd, k=3, groups=shape.groups, hin=h, win=w, hout=ho, wout=wo, **common)
        + _conv_ops("conv3", cin=wd, cout=cout, k=1, groups=1, hin=ho, win=wo, hout=ho, wout=wo,
                    residual_numel=res, ds=ds, **common)
    )


def model_ops(name: str, batch: int, size: int, dtype: torch.dtype, train: bool = False) -> list[Op]:
    """Stem conv, every block's fused ops, and the classifier of model ``name``."""
    elem = torch.empty((), dtype=dtype).element_size()
    calls = {c.name: c for c in count_macs(meta_model(name), (batch, 3, size, size))}
    stem, fc = calls["conv1"], calls["fc"]
    _, cin, hin, win = stem.in_shape
    _, cout, hout, wout = stem.out_shape
    ops = _conv_ops("stem", cin=cin, cout=cout, k=stem.weight_shape[-1], groups=1, n=batch, hin=hin, win=win,
                    hout=hout, wout=wout, elem=elem, train=train, needs_dgrad=False)
    for i, shape in enumerate(model_blocks(name, size)):
        ops += [Op(f"block{i}.{op.name}", op.flops, op.bytes) for op in block_ops(shape, batch, dtype, train)]
    fc_bytes = (math.prod(fc.in_shape) + math.prod(fc.weight_shape) + math.prod(fc.out_shape)) * elem
    ops.append(Op("fc", 2 * fc.macs, fc_bytes))
    if train:
        ops.append(Op("fc.wgrad", 2 * fc.macs, fc_bytes))
        ops.append(Op("fc.dgrad", 2 * fc.macs, fc_bytes))
    return ops


@dataclass(frozen=True)
class Peaks:
    """Measured ceilings: matmul FLOP/s in the bench dtype and copy bandwidth (bytes/s)."""

    flops_per_s: float
    bytes_per_s: float
    matmul_n: int
    copy_bytes: int
    note: str

    def floor_s(self, ops: list[Op]) -> float:
        return sum(max(op.flops / self.flops_per_s, op.bytes / self.bytes_per_s) for op in ops)

    def as_dict(self) -> dict:
        return {
            "matmul_tflops": self.flops_per_s / 1e12,
            "copy_gbps": self.bytes_per_s / 1e9,
            "matmul_n": self.matmul_n,
            "copy_bytes": self.copy_bytes,
            "note": self.note,
        }


def matmul_as_conv_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, w)`` with ``conv2d(x, w)[0, j, i, 0] = sum_k b[k, j] * a[i, k] = (a @ b)[i, j]``.

    ``a``: ``(m, k)``, ``b``: ``(k, n)``; ``x``: ``(1, k, m, 1)``, ``w``: ``(n, k, 1, 1)``.
    """
    m, k = a.shape
    n = b.shape[1]
    return a.t().contiguous().view(1, k, m, 1), b.t().contiguous().view(n, k, 1, 1)


#: ``(batch, channels, size)`` of the CPU peak's 3x3 convolution: ResNet's layer3 width at
#: 28x28, about 7.4 GFLOP, 20 ms on two EPYC cores.
CPU_CONV3X3 = (8, 256, 28)


def measure_peaks(device: torch.device, dtype: torch.dtype, repeats: int | None = None) -> Peaks:
    """Time an ``n x n @ n x n`` matmul in ``dtype`` and a large copy on ``device``.

    GPU: n = 8192 and a 1 GiB copy, CUDA events, median of 20.  CPU: n = 2048 and a
    256 MiB copy, the fastest of 10 runs: on a shared host other processes only ever slow a
    run down, so the fastest one is the closest to what the hardware can do.
    fp32 on GPU is measured with TF32 allowed exactly when cuDNN convolutions may use it,
    so the roofline uses the rate the convolutions can actually reach.  On CPU ``torch.mm``
    goes to a BLAS that can run at half the rate of oneDNN, which computes the convolutions,
    so the same matmul is also timed as a 1x1 convolution (``(1, n, n, 1)`` input, ``n``
    output channels: ``n^3`` MACs), and so is a large 3x3 convolution (:data:`CPU_CONV3X3`,
    counted in direct-convolution FLOPs like the workloads): oneDNN's 3x3 kernels ran
    ResNet's 3x3 blocks at up to 124% of the 1x1 rate on the 2-core EPYC (2026-11-27,
    ``cpu-quick``; Winograd-style algorithms do fewer multiplications than they are
    credited with).  The fastest of the three sets the peak, so percent-of-roofline is
    measured against the best dense rate the library itself reaches on this machine.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    nbytes = (1 << 30) if cuda else (256 << 20)
    repeats = repeats or (20 if cuda else 10)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    note = "measured: matmul in bench dtype; copy counts read + write bytes"
    matmul = torch.backends.cuda.matmul
    # The new API where PyTorch has it: once it is used, reading the legacy allow_tf32 raises.
    knob = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    prev_tf32 = getattr(matmul, knob)
    if cuda and dtype == torch.float32:
        tf32 = cudnn_conv_tf32()
        setattr(matmul, knob, ("tf32" if tf32 else "ieee") if knob == "fp32_precision" else tf32)
        note += f"; fp32 matmul with TF32 {'on' if tf32 else 'off'} (as cuDNN convs)"
    fns = {"matmul": lambda _: torch.mm(a, b), "copy": lambda _: dst.copy_(src)}
    rate_flops = {"matmul": 2 * n**3}
    if not cuda:
        a4, b4 = matmul_as_conv_operands(a, b)
        fns["matmul-as-conv"] = lambda _: torch.nn.functional.conv2d(a4, b4)
        rate_flops["matmul-as-conv"] = 2 * n**3
        bn, c, hw = CPU_CONV3X3
        x3 = torch.randn(bn, c, hw, hw, dtype=dtype, generator=g)
        w3 = torch.randn(c, c, 3, 3, dtype=dtype, generator=g)
        fns["conv3x3"] = lambda _: torch.nn.functional.conv2d(x3, w3, padding=1)
        rate_flops["conv3x3"] = 2 * bn * hw * hw * c * c * 9
        note += ("; CPU compute peak: the fastest of torch.mm, the same product as a 1x1 conv and a "
                 f"{bn}x{c}x{hw}x{hw} 3x3 conv (oneDNN; direct-convolution FLOPs)")
    try:
        with torch.inference_mode():
            stats, errors = time_interleaved(fns, [None], device, repeats=repeats, warmup=2)
    finally:
        setattr(matmul, knob, prev_tf32)
    sync(device)
    if errors:
        raise RuntimeError(f"peak measurement failed on {device} {dtype}: {errors}")

    def best(s: Stats) -> float:
        return s.median if cuda else s.min

    flops_per_s = max(f / best(stats[k]) for k, f in rate_flops.items())
    return Peaks(
        flops_per_s=flops_per_s,
        bytes_per_s=2 * nbytes / best(stats["copy"]),
        matmul_n=n,
        copy_bytes=nbytes,
        note=note + ("; median of CUDA-event timings" if cuda else "; fastest of the perf_counter runs"),
    )

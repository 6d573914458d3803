"""Host side of the Triton conv kernels: weight layout, tile configs, autotuning, launch.

``launch`` writes into a caller-provided output (the ops allocate it; the tests pass a
NaN-poisoned one so an element the kernel forgets to write fails the comparison).

Tile configs
------------
On a GPU the kernel is autotuned over :data:`GPU_CONFIGS` (tensor-core tiles) or, for
fp32 with TF32 off, :data:`FMA_CONFIGS`, keyed on the problem shape,
the compile-time flags and the dtypes; Triton caches the winner per key for the life of
the process.  Before benchmarking, :func:`prune_configs` drops configs that cannot pay
off or cannot fit:

* ``BLOCK_N`` larger than the (power-of-two-rounded) output channels per group, and
  ``BLOCK_K`` larger than the input channels per group, only compute padding;
* ``BLOCK_M`` much larger than the number of output pixels likewise;
* with the downsample branch two fp32 accumulators are live at once, so tiles whose
  accumulator needs more than :data:`DS_ACC_REGS` registers per thread are dropped;
* ``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * elem_size`` bytes of pipelined operand
  tiles must fit the device's shared memory per block (163 KB on sm_80, 227 KB on sm_90);
* with the train-mode BN prologue, :data:`PROLOGUE_EXCLUDED` tiles (register spills);
* tensor-core tiles much smaller than the problem (``BLOCK_N < 64`` with 64+ output channels
  per group, ``BLOCK_K < 32`` with 64+ input channels, ``BLOCK_M < 64`` with 4096+ rows),
  unless nothing else is left: they never win there, and each costs a compile.

``FUSEDRES_TRITON_AUTOTUNE=0`` skips the benchmarking and takes the first surviving
config (useful for fast test runs).  Under ``TRITON_INTERPRET=1`` (CPU tensors) there is
nothing to time, so a small fixed :data:`INTERPRET_CONFIG` is used, small enough that the
tests' tiny problems still span several row, column and channel tiles.
"""

from __future__ import annotations

import atexit
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton

from .. import WeightCache, cudnn_conv_tf32, data_key
from .kernels import _conv1x1_tma_fwd_kernel, _conv_bn_act_fwd_kernel, _split_k_epilogue_kernel

try:  # host-side TMA descriptors (Triton 3.4+)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the TMA path is never taken
    TensorDescriptor = None


# Triton reads TRITON_INTERPRET when it is imported, so it cannot change afterwards.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRETING


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8

    def kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)

    def acc_regs(self) -> int:
        """fp32 accumulator registers per thread for one ``BLOCK_M x BLOCK_N`` accumulator."""
        return self.block_m * self.block_n // (32 * self.num_warps)

    def smem_bytes(self, elem_size: int) -> int:
        """Shared memory of the pipelined A/B operand tiles (the dominant term)."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * elem_size


#: Candidate tiles for GPUs, best general-purpose first (the first survivor is also the
#: untuned default).  None needs more than 64 accumulator registers per thread: 128x256
#: with 8 warps and 128x128 with 4 warps (128 each) spilled on sm_80/sm_90 (aot report).
#: 128x128x64 with 8 warps is the classic Hopper/Ampere GEMM tile; 64-wide N tiles serve
#: 64-channel layers; 256-wide N the 256..2048-channel 1x1 convs; BLOCK_K=16 the 3-channel
#: stem; 16/32-wide N tiles ResNeXt's 4..32 channels per group.  The same 128x128x64 tile with a
#: 4-stage ring (128 KB of shared memory at 16 bits; fp32 operands do not fit and are pruned) gives
#: the autotuner a deeper pipeline for the long reductions of the 3x3 and 1x1 convs with 256+ input
#: channels; it is second so that the untuned default stays the 3-stage tile.  Every variant that
#: keeps it (157 with all tiles: eval, train, hoisted, split-K) compiled for sm_80 and sm_90 with
#: 0 spills under Triton 3.6 and 3.8 (aot report; sm_90 128 KB of shared memory).  Not yet timed on
#: a GPU: the autotuner takes it only where it measures faster.
GPU_CONFIGS = (
    TileConfig(128, 128, 64, 3, 8),
    TileConfig(128, 128, 64, 4, 8),
    TileConfig(128, 64, 64, 3, 8),
    TileConfig(64, 128, 64, 3, 8),
    TileConfig(128, 64, 64, 4, 4),
    TileConfig(64, 128, 64, 4, 4),
    TileConfig(64, 64, 64, 4, 4),
    TileConfig(64, 256, 32, 4, 8),
    TileConfig(128, 64, 16, 4, 4),
    TileConfig(128, 32, 32, 4, 4),
    TileConfig(128, 16, 16, 4, 4),
    TileConfig(32, 16, 16, 2, 4),
)

#: Tiles for fp32 with TF32 off ("ieee"): tl.dot then runs on FMA units with both operand
#: tiles in registers, so only BLOCK_K=16 and at most 128x64 outputs per program avoid
#: register spills (checked by the aot report; 64x64x32 already spills on sm_80).
FMA_CONFIGS = (
    TileConfig(128, 64, 16, 2, 8),
    TileConfig(64, 64, 16, 2, 4),
    TileConfig(64, 32, 16, 2, 4),
    TileConfig(32, 16, 16, 2, 4),
)

#: Fixed tile for the interpreter: tiny, so test problems span several tiles per dim.
INTERPRET_CONFIG = TileConfig(32, 16, 16, 1, 4, group_m=2)


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def base_configs(precision: str) -> tuple[TileConfig, ...]:
    """The candidate list for a ``DOT_PRECISION``: FMA tiles for IEEE fp32, tensor-core tiles otherwise."""
    return FMA_CONFIGS if precision == "ieee" else GPU_CONFIGS


#: Per-accumulator register cap when the downsample GEMM keeps a second accumulator live
#: next to the first: 2 x 32 fp32 registers per thread.  Above it ptxas spilled on sm_80
#: and/or sm_90 (aot report: 128x128 with 8 warps, 128x64 with 4 warps).  The FMA (IEEE
#: fp32) path also holds its operand tiles in registers, hence its lower cap.
DS_ACC_REGS = 32
DS_ACC_REGS_FMA = 16


#: Tiles dropped when ``PROLOGUE_BN`` is on: the BN-apply routes the ``A`` tile through
#: registers (fp32) on its way to shared memory, and these spilled on sm_80 (aot report:
#: 64x128x64/4 warps bf16 12 B, 64x64x16/4 warps fp32-IEEE 24 B) or sat at the 255-register
#: limit (128x64x64/4 warps, 246-255 registers), where another Triton version may spill.
PROLOGUE_EXCLUDED = (
    TileConfig(64, 128, 64, 4, 4),
    TileConfig(128, 64, 64, 4, 4),
    TileConfig(64, 64, 16, 2, 4),
)

#: Dropped as well when the hoisted main loop (opt-in, :data:`HOISTED_ENABLED`) runs with the BN
#: prologue: its pointer increments and border bits stay live beside the prologue's registers, and
#: this tile spilled 8 B on sm_80 under Triton 3.6 (aot report, 128 registers; 3.8 and sm_90 did not).
HOISTED_PROLOGUE_EXCLUDED = (TileConfig(64, 128, 64, 3, 8),)


#: Caps when the output (or residual) is NCHW, i.e. contiguous along the tile's rows: the
#: epilogue then converts the accumulator's layout before storing, and ptxas spilled on
#: sm_80/sm_90 for every tile above 32 fp32 accumulator registers per thread or 64 rows
#: (aot report: 128x128x64/8 warps 2-2.8 KB, 128x64x64/8 warps 0.5 KB, 64x256x32/8 warps).
M_CONTIG_ACC_REGS = 32
M_CONTIG_BLOCK_M = 64


def _rows_contiguous(out_channel_stride: int, residual_channel_stride: int | None) -> bool:
    """Whether the output (or the residual) is NCHW-like: see :data:`M_CONTIG_ACC_REGS`."""
    return out_channel_stride != 1 or (residual_channel_stride is not None and residual_channel_stride != 1)


def prune_configs(configs, *, M: int, CG: int, KG: int, CD: int, elem_size: int, smem_limit: int,
                  has_downsample: bool = False, fma: bool = False, prologue_bn: bool = False,
                  m_contiguous_out: bool = False, hoisted: bool = False):
    """The configs worth benchmarking for one problem (see the module docstring)."""
    if prologue_bn:
        excluded = PROLOGUE_EXCLUDED + (HOISTED_PROLOGUE_EXCLUDED if hoisted else ())
        configs = [c for c in configs if c not in excluded]
    if m_contiguous_out:
        configs = [c for c in configs if c.acc_regs() <= M_CONTIG_ACC_REGS and c.block_m <= M_CONTIG_BLOCK_M]
    if has_downsample:
        cap = DS_ACC_REGS_FMA if fma else DS_ACC_REGS
        configs = [c for c in configs if c.acc_regs() <= cap]
    k_needed = _pow2_at_least(max(CG, CD))
    n_needed = _pow2_at_least(KG)
    m_needed = _pow2_at_least(M, 32)
    kept = [
        c for c in configs
        if c.block_n <= n_needed and c.block_k <= k_needed and c.block_m <= m_needed
        and c.smem_bytes(elem_size) <= smem_limit
    ]
    if not kept:  # tiny problem: the smallest tile that fits
        kept = [min(configs, key=lambda c: (c.block_m * c.block_n * c.block_k, c.num_stages))]
    if not fma:
        # Undersized tensor-core tiles on a problem that fills bigger ones only lose (less data
        # reuse per loaded byte) but each costs a compile and a benchmark on first use; dropping
        # them cuts ResNet-50's cold autotuning, which filled whole GPU-check budgets.
        full = [
            c for c in kept
            if not (n_needed >= 64 and c.block_n < 64) and not (k_needed >= 64 and c.block_k < 32)
            and not (m_needed >= 4096 and c.block_m < 64)
        ]
        kept = full or kept
    return kept


#: What a tuned tile is reused for.  Rows enter as ``M_BUCKET``, ``M`` rounded up to a power of
#: two (which is also all :func:`prune_configs` looks at), so a new batch size within the bucket
#: reuses the tile instead of benchmarking every candidate again: a ResNet-50 has about 20
#: distinct convs, and a server batching requests would re-tune them for each batch size.
_AUTOTUNE_KEY = [
    "M_BUCKET", "H", "W", "OH", "OW", "CG", "KG", "CD",
    "sxc", "sdc", "soc", "src",
    "conv_sh", "conv_sw", "pad_h", "pad_w", "dil_h", "dil_w", "ds_sh", "ds_sw",
    "KH", "KW", "PADDED", "HAS_RESIDUAL", "HAS_DOWNSAMPLE", "RELU", "PROLOGUE_BN", "EMIT_STATS",
    "BN_STATS", "DOT_PRECISION", "DOT_UPCAST",
]


def _max_shared_mem(device: torch.device) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device.index)
    return int(props["max_shared_mem"])


def _early_prune(configs, named_args, **kwargs):
    all_args = {**named_args, **kwargs}
    x = all_args["x_ptr"]
    by_cfg = {_tile_of(c): c for c in configs}
    candidates = [t for t in by_cfg if t in base_configs(all_args["DOT_PRECISION"])]
    kept = prune_configs(
        candidates, M=all_args["M"], CG=all_args["CG"], KG=all_args["KG"], CD=all_args["CD"],
        elem_size=x.element_size(), smem_limit=_max_shared_mem(x.device),
        has_downsample=bool(all_args["HAS_DOWNSAMPLE"]), fma=all_args["DOT_PRECISION"] == "ieee",
        prologue_bn=bool(all_args["PROLOGUE_BN"]), hoisted=bool(all_args.get("HOISTED", False)),
        m_contiguous_out=_rows_contiguous(all_args["soc"], all_args["src"] if all_args["HAS_RESIDUAL"] else None),
    )
    return [by_cfg[t] for t in kept]


_autotuned_kernel = triton.autotune(
    configs=[
        triton.Config(c.kwargs(), num_stages=c.num_stages, num_warps=c.num_warps)
        for c in dict.fromkeys(GPU_CONFIGS + FMA_CONFIGS)
    ],
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _early_prune},
)(_conv_bn_act_fwd_kernel)


def _autotune_enabled() -> bool:
    return os.environ.get("FUSEDRES_TRITON_AUTOTUNE", "1") != "0"


# --------------------------------------------------------------------------- weights

_weight_cache = WeightCache()


def _relayout(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (C_out, Cg, KH, KW) -> (KH, KW, Cg, C_out): output channel fastest, so a B tile row
    # (one input channel, BLOCK_N output channels) is one contiguous run.
    return w.detach().to(dtype).permute(2, 3, 1, 0).contiguous()


def kernel_weight(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w`` as ``(KH, KW, Cg, C_out)`` contiguous in ``dtype`` (default ``w``'s), cached per weight tensor.

    ``dtype`` differs from ``w``'s under autocast only (an fp32 model run in bf16/fp16).
    The cache holds the weight weakly and is valid while the weight's data is unchanged
    (:class:`fusedres.backends.WeightCache`: version counter, storage and dtype), so
    in-place updates (optimizer steps, ``load_state_dict``) and ``.half()`` / ``.to()``
    invalidate it.  Inference tensors are re-laid-out per call.
    """
    dtype = dtype or w.dtype
    wt = _weight_cache.get(w, dtype)
    if wt is None:
        key = data_key(w)  # before the copy reads w (see WeightCache.put)
        wt = _weight_cache.put(w, _relayout(w, dtype), dtype, key=key)
    return wt


# --------------------------------------------------------------------------- launch


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 convs use TF32 tensor cores exactly when PyTorch's cuDNN convs would."""
    if dtype == torch.float32 and not cudnn_conv_tf32():
        return "ieee"
    return "tf32"  # fp16/bf16 ignore it; fp32 with TF32 allowed (PyTorch's conv default)


def _strides4(t: torch.Tensor | None):
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


_INT32_MAX = 2**31 - 1


def launch(
    x: torch.Tensor,
    w_t: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    relu: bool,
    ds: tuple | None = None,
    config: TileConfig | None = None,
    bn_stats: tuple | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Run the fused conv into ``out`` ``(N, C_out, OH, OW)`` (any strides) and return it.

    ``w_t`` is the weight from :func:`kernel_weight`.  ``ds`` is ``None`` or
    ``(xd, wd_t, ds_scale, ds_shift, ds_stride)`` for the fused 1x1 downsample branch.
    ``bn_stats`` is ``None`` or ``(mean, var, eps)`` (plus ``(ds_mean, ds_var, ds_eps)``
    appended when ``ds`` is given): ``scale``/``shift`` (and ``ds_scale``/``ds_shift``) are
    then an eval BatchNorm's weight and bias, normalised in the kernel's epilogue
    (``BN_STATS``).  ``config`` forces a tile (no autotuning).  With :data:`TMA_ENABLED`, an
    eligible 1x1 conv (:func:`tma_eligible`) runs the TMA GEMM kernel instead.  ``split_k``
    splits the reduction (and the downsample's) that many ways (``1``: never); ``None`` leaves it to
    :func:`split_k_factor` when :data:`SPLIT_K_ENABLED`, else one pass.
    """
    if TMA_ENABLED and ds is None and split_k in (None, 1) and tma_eligible(x, w_t, residual, out, stride,
                                                                             padding, dilation, groups):
        _launch_tma(x, w_t, scale, shift, residual, out, relu, bn_stats, config)
        return out
    _launch(x, w_t, scale, shift, residual, out, stride, padding, dilation, groups, relu, ds=ds, config=config,
            bn_stats=bn_stats, split_k=split_k)
    return out


# --------------------------------------------------------------------------- hoisted main loop (opt-in)
#
# The kernel's HOISTED main loop advances the filter tap and the channel block as counters (no
# integer division per step), forms the A and B pointer tiles once (a step adds one of three
# precomputed offset increments), checks the padding border with one bit test per row (which rows and
# columns of taps fall outside x is found once per output row, hence filters up to 16x15 only: larger
# ones keep the default loop), and with EVEN_K (C_in per group a multiple of every BLOCK_K) drops the
# channel masks.  The aot report measures it: sm_90 bf16 3x3 with residual and BN statistics 232 -> 142
# main-loop SASS instructions per k-step (4 wgmma) with two bound compares per row, 122 with the bit
# test; 1x1 166 -> 104 (Triton 3.8).  It has never run on a GPU: it is taken only with
# FUSEDRES_TRITON_HOISTED=1 until a GPU run has verified it (numerics through the interpreter and the
# sm_80/sm_90 compilation are checked on the CPU).  fp16/bf16 only: with fp32 operands (twice the
# pointer vectors per thread) the heaviest train variant spilled 24 bytes on sm_80 under Triton 3.6.

HOISTED_ENABLED = os.environ.get("FUSEDRES_TRITON_HOISTED") == "1"
#: Every BLOCK_K a tile may use divides this, so ``C_in/groups % _MAX_BLOCK_K == 0`` is EVEN_K for all.
_MAX_BLOCK_K = max(c.block_k for c in (*GPU_CONFIGS, *FMA_CONFIGS, INTERPRET_CONFIG))


# --------------------------------------------------------------------------- split-K (opt-in)
#
# A conv with fewer output tiles than the GPU has SMs leaves SMs idle however fast each tile runs:
# ResNet-50's 7x7 3x3 conv at batch 1 has 4 output tiles (64x128) for 132 SMs, each streaming a quarter
# of the 4.7 MB filter.  Split-K gives each tile's reduction (KH * KW * ceil(C_in/groups / BLOCK_K) steps) to
# several programs, each storing an fp32 partial tile; a second kernel sums them in split order
# (deterministic) and applies the epilogue.  Taken only with FUSEDRES_TRITON_SPLITK=1 until a GPU run
# has verified and measured it (numerics through the interpreter and the sm_90 compilation are
# checked on the CPU); eval convs (a block tail's downsample GEMM in the same step range), on sm_90+ only: compiled for
# sm_80 by Triton 3.6 (the GPU machine's), three of the partial kernel's tiles spilled 12-24 bytes
# (128x64x64/8 warps, 64x64x64/4, 64x256x32/8; none under Triton 3.8).  With FUSEDRES_TRITON_TMA=1
# as well, the 1x1 convs the TMA kernel takes are not split.

SPLIT_K_ENABLED = os.environ.get("FUSEDRES_TRITON_SPLITK") == "1"
#: At most this many splits, each of at least this many BLOCK_K-wide reduction steps.
SPLIT_K_MAX = 16
SPLIT_K_MIN_STEPS = 4
#: The epilogue kernel's tile (BLOCK_M, BLOCK_N) and warps: an elementwise pass over the workspace.  At
#: 32x32 with 4 warps it needs 90-96 registers on sm_80/sm_90; 64x64 spilled 400 B with 4 warps and
#: took 184-200 registers with 8 (aot report, Triton 3.8: its 2-D 64-bit pointers dominate).
SPLIT_K_EPILOGUE_TILE = (32, 32, 4)
#: Where the main kernel takes its split-K workspace: the statistics pointer (unused in eval).
_WS_ARG = _conv_bn_act_fwd_kernel.arg_names.index("stat_sum_ptr")


def split_k_factor(tiles: int, steps: int, sms: int) -> int:
    """How many ways to split a conv's reduction: enough programs to fill ``sms`` SMs when its
    ``tiles`` output tiles (all groups) alone would not, at most :data:`SPLIT_K_MAX`, and at most
    ``steps // SPLIT_K_MIN_STEPS`` of them for its ``steps`` reduction steps.  The kernel gives each
    split ``ceil(steps / split)`` steps (the last one the rest), so the count is then lowered to
    the fewest splits with that share: no program is left without a step.  1: no split (a problem
    with more than half as many tiles as SMs would only add the workspace round trip)."""
    if tiles <= 0 or steps <= 0:
        return 1
    split = max(1, min(SPLIT_K_MAX, sms // tiles, steps // SPLIT_K_MIN_STEPS))
    return triton.cdiv(steps, triton.cdiv(steps, split))


_sm90_sms: dict[int, int] = {}


def _sm90_sm_count(device: torch.device) -> int:
    """``device``'s SM count on sm_90+, else 0: the SMs :func:`split_k_factor` may fill (0: no split),
    and the programs of a persistent TMA launch (which needs sm_90)."""
    n = _sm90_sms.get(device.index)
    if n is None:
        props = torch.cuda.get_device_properties(device)
        n = _sm90_sms[device.index] = props.multi_processor_count if props.major >= 9 else 0
    return n


def _launch_split_k(args, flags, config, split, grid_mn, groups, out, residual, epilogue) -> None:
    """The split-K pair: ``split`` partial programs per output tile into an fp32 workspace, then
    :func:`_split_k_epilogue_kernel`.  ``args``/``flags`` are the one-pass kernel's (:func:`_launch`),
    ``epilogue`` its ``(scale, shift, mean, var, eps)`` and the downsample's five, or None."""
    n, k, oh, ow = out.shape
    m = n * oh * ow
    has_ds = flags["HAS_DOWNSAMPLE"]
    ws = torch.empty((2 * split if has_ds else split, m, k), device=out.device, dtype=torch.float32)
    args = args[:_WS_ARG] + (ws,) + args[_WS_ARG + 1:]
    # The partial kernel stops before the epilogue: one compiled variant serves every epilogue.
    pflags = dict(flags, HAS_RESIDUAL=False, RELU=False, BN_STATS=False, SPLIT_K=True)
    opts = {} if interpreting() else dict(num_warps=config.num_warps, num_stages=config.num_stages)
    _conv_bn_act_fwd_kernel[(grid_mn, groups, split)](*args, **pflags, **config.kwargs(), **opts)
    scale, shift, mean, var, eps, ds_scale, ds_shift, ds_mean, ds_var, ds_eps = epilogue
    bm, bn, warps = SPLIT_K_EPILOGUE_TILE
    _split_k_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bn))](
        ws, scale, shift, mean, var, float(eps), residual if residual is not None else out, out,
        ds_scale, ds_shift, ds_mean, ds_var, float(ds_eps),
        m, k, oh, ow, split, *_strides4(residual), *out.stride(),
        HAS_RESIDUAL=residual is not None, HAS_DOWNSAMPLE=has_ds, RELU=flags["RELU"], BN_STATS=flags["BN_STATS"],
        BLOCK_M=bm, BLOCK_N=bn, **({} if interpreting() else dict(num_warps=warps)),
    )


# --------------------------------------------------------------------------- TMA (opt-in)
#
# 1x1 stride-1 convs (half of ResNet-50's FLOPs) over channels_last tensors are plain GEMMs, so
# on sm_90 both operands can come through TMA tensor descriptors, and the main loop loses its
# per-step address and mask arithmetic (the aot report measures it: main-loop SASS instructions
# per MMA).  The kernel has never run on a GPU: it is taken only with FUSEDRES_TRITON_TMA=1
# until a GPU run has verified it (numerics through the interpreter and sm_90 compilation are
# checked on the CPU).

TMA_ENABLED = os.environ.get("FUSEDRES_TRITON_TMA") == "1"
# With it, FUSEDRES_TRITON_PERSISTENT=1 runs the TMA kernel persistent (one program per SM, each
# looping over tiles) where a conv has more tiles than the GPU has SMs; also never run on a GPU.
PERSISTENT_ENABLED = os.environ.get("FUSEDRES_TRITON_PERSISTENT") == "1"
#: The program count of a persistent launch; None: the GPU's SM count (the interpreter's: 3).  Tests
#: set it, so that each program loops over several tiles of a small conv.
PERSISTENT_PROGRAMS: int | None = None
_TMA_DTYPES = (torch.float16, torch.bfloat16)


def _cl_rows(t: torch.Tensor) -> bool:
    """``t`` ``(N, C, H, W)`` is channels_last-contiguous, so ``(N*H*W, C)`` is a row-major view of it."""
    return t.is_contiguous(memory_format=torch.channels_last)


def tma_eligible(x, w_t, residual, out, stride, padding, dilation, groups) -> bool:
    """Whether the TMA kernel computes this conv: 1x1, stride 1, no padding, one group, fp16/bf16,
    channels_last input, output and residual, 16-byte aligned rows (channels multiples of 8), on an
    sm_90+ GPU (or the interpreter)."""
    if TensorDescriptor is None or x.dtype not in _TMA_DTYPES:
        return False
    kh, kw, cg, k = w_t.shape
    if (kh, kw) != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0) or groups != 1:
        return False
    if cg % 8 or k % 8 or not (_cl_rows(x) and _cl_rows(out) and (residual is None or _cl_rows(residual))):
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_properties(x.device).major < 9:
            return False
        if any(t.data_ptr() % 16 for t in (x, w_t, out) + ((residual,) if residual is not None else ())):
            return False
        return True
    return interpreting()


def _persistent_programs(tiles: int, config: TileConfig, device: torch.device) -> int:
    """The programs of a persistent TMA launch of ``tiles`` output tiles, or 0 for one tile per program.

    One per SM, and only for the 128x128 tile: its persistent form takes 128-160 KB of shared
    memory, so one program per SM is what fits anyway, and the persistent loop's overlap of one
    tile's epilogue with the next tile's loads is what it lacks.  The 128x64 tile (64 output
    channels) fits two CTAs per SM, which overlap each other already; one program per SM would
    halve that.  With no more tiles than programs, one tile per program is the same schedule."""
    if not PERSISTENT_ENABLED:
        return 0
    if PERSISTENT_PROGRAMS is not None:
        n = PERSISTENT_PROGRAMS
    elif interpreting():
        n = 3
    elif config.block_m * config.block_n < 128 * 128:
        return 0
    else:
        n = _sm90_sm_count(device)
    return n if tiles > n else 0


def _launch_tma(x, w_t, scale, shift, residual, out, relu, bn_stats, config=None) -> None:
    n, c, h, w = x.shape
    k = w_t.shape[3]
    m = n * h * w
    if m == 0:
        return
    if config is None:
        config = INTERPRET_CONFIG if interpreting() else prune_configs(
            base_configs("tf32"), M=m, CG=c, KG=k, CD=0, elem_size=x.element_size(),
            smem_limit=_max_shared_mem(x.device))[0]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    a = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1).reshape(m, c), [bm, bk])
    b = TensorDescriptor.from_tensor(w_t.view(c, k), [bk, bn])
    o = TensorDescriptor.from_tensor(out.permute(0, 2, 3, 1).reshape(m, k), [bm, bn])
    r = TensorDescriptor.from_tensor(residual.permute(0, 2, 3, 1).reshape(m, k), [bm, bn]) \
        if residual is not None else o
    scale, shift = scale.contiguous(), shift.contiguous()
    if bn_stats is not None:
        mean, var, eps = bn_stats[0].contiguous(), bn_stats[1].contiguous(), bn_stats[2]
    else:
        mean, var, eps = scale, shift, 0.0
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(k, config.block_n)
    sms = _persistent_programs(tiles, config, x.device)
    grid = (sms or tiles,)
    opts = {} if interpreting() else dict(num_warps=config.num_warps, num_stages=config.num_stages)
    guard = torch.cuda.device(x.device) if x.is_cuda and x.device.index != torch.cuda.current_device() \
        else nullcontext()
    with guard:
        _conv1x1_tma_fwd_kernel[grid](
            a, b, scale, shift, mean, var, float(eps), r, o, m, k, c,
            HAS_RESIDUAL=residual is not None, RELU=bool(relu), BN_STATS=bn_stats is not None,
            DOT_PRECISION="tf32", DOT_UPCAST=interpreting() and x.dtype == torch.bfloat16,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            NUM_SMS=sms, **opts,
        )


#: Smallest ``BLOCK_M`` any config may pick: sizes the statistics workspace before the
#: autotuner has chosen a tile.
_MIN_BLOCK_M = min(c.block_m for c in GPU_CONFIGS + FMA_CONFIGS + (INTERPRET_CONFIG,))


def conv_train_fwd(
    x: torch.Tensor,
    w_t: torch.Tensor,
    out: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train-mode conv: ``out = conv2d(a, w)`` and its per-channel batch statistics, one launch.

    ``a = relu(x * in_scale[c] + in_shift[c])`` (per input channel, zero padding applied to
    ``a``) when ``in_scale``/``in_shift`` ``(C_in,)`` fp32 are given, else ``a = x``: the
    previous BN-apply + ReLU fused into this conv's operand load.  Returns
    ``(out, mean, var)``: ``out`` ``(N, C_out, OH, OW)`` in ``x.dtype`` (the pre-BN output),
    ``mean`` and biased ``var`` ``(C_out,)`` fp32 over ``N, OH, OW``, computed from the fp32
    accumulator (see ``EMIT_STATS`` in ``kernels.py`` and :func:`merge_stats`).
    """
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    c_in = x.shape[1]
    for name, v in (("in_scale", in_scale), ("in_shift", in_shift)):
        if v is not None and (v.shape != (c_in,) or v.dtype != torch.float32 or v.device != x.device):
            raise ValueError(f"{name} must be an fp32 ({c_in},) tensor on {x.device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
    n, _, oh, ow = out.shape
    m = n * oh * ow
    if m == 0:
        raise ValueError(f"out {tuple(out.shape)} is empty: batch statistics need at least one element")
    c_out = out.shape[1]
    rows = triton.cdiv(m, _MIN_BLOCK_M)
    psum = torch.empty((rows, c_out), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(psum)
    prologue = (in_scale.contiguous(), in_shift.contiguous()) if in_scale is not None else None
    unused = torch.empty(0, device=x.device, dtype=torch.float32)  # scale/shift are not read
    block_m = _launch(x, w_t, unused, unused, None, out, stride, padding, dilation, groups, False,
                      prologue=prologue, stats=(psum, pm2), config=config)
    mean, var = merge_stats(psum[: triton.cdiv(m, block_m)], pm2[: triton.cdiv(m, block_m)], m, block_m)
    return out, mean, var


def merge_stats(psum: torch.Tensor, pm2: torch.Tensor, m: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased var)`` from per-tile ``sum`` and centred ``M2`` ``[P, C]``.

    Tile ``p`` holds ``n_p = block_m`` rows (the last ``m - (P-1) * block_m``), mean
    ``mu_p = sum_p / n_p``.  Chan's parallel combination is exact in real arithmetic::

        mean = sum_p sum_p / m,    M2 = sum_p M2_p + sum_p n_p * (mu_p - mean)^2

    Error reasoning (fp32, unit roundoff ``u = 2^-24``): every term of ``M2`` is non-negative,
    so summing them costs a relative error of at most about ``(block_m + P) * u`` (the
    reductions are trees: far less in practice).  In the kernel a rounding error ``d`` in a
    tile mean (``|d| ~ u * |mean|``) enters ``M2_p = sum (z - mu_p - d)^2`` only as
    ``n_p * d^2`` because the centred values sum to ~0: a relative error of order
    ``(u * |mean| / std)^2``.  So the variance stays accurate however large ``|mean| / std``
    is - unlike ``E[z^2] - E[z]^2``, whose relative error grows like ``u * mean^2 / var``.
    """
    p = psum.shape[0]
    counts = torch.full((p, 1), float(block_m), device=psum.device, dtype=torch.float32)
    counts[-1] = float(m - (p - 1) * block_m)
    mean = psum.sum(0) / m
    tile_dev = psum / counts - mean
    var = (pm2.sum(0) + (counts * tile_dev * tile_dev).sum(0)) / m
    return mean, var


# --------------------------------------------------------------------------- shipped tiles
#
# Cold autotuning benchmarks every candidate tile of every conv shape on its first launch:
# minutes for a ResNet-50 at two batch sizes, on every process start (and what ate whole GPU
# check budgets).  A GPU run records the tiles it tuned (``FUSEDRES_TRITON_TILES_OUT=path``, or
# ``fusedres tune``); merged into ``tiles.json`` beside this file, per arch, they ship with the
# package and ``_launch`` takes them instead of tuning.  A shipped tile is used only while it is
# still one of the candidates :func:`prune_configs` keeps for the problem (the candidate lists
# may change); shapes the table lacks are autotuned as before.

TILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiles.json")
_shipped: dict[str, dict] = {}


def _arch(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"sm{props.major}{props.minor}"


def table_key(key: tuple) -> str:
    """The process-independent text of a ``_tile_cache`` key: the device index and the autotune
    switch dropped, dtypes by name."""
    return "|".join(str(v).replace("torch.", "") for v in key[:-2])


def load_tiles(path: str | None = None) -> dict:
    try:
        with open(path or TILES_FILE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def shipped_tile(arch: str, key: tuple, candidates) -> TileConfig | None:
    """The shipped tile for ``key`` on ``arch`` if it is among ``candidates``, else None."""
    if arch not in _shipped:
        _shipped[arch] = load_tiles().get(arch, {})
    fields = _shipped[arch].get(table_key(key))
    if fields is None:
        return None
    tile = TileConfig(*fields)
    return tile if tile in candidates else None


def dump_tiles(path: str, arch: str) -> int:
    """Merge this process's tuned tiles for ``arch`` into the table at ``path``; returns how many."""
    table = load_tiles(path)
    entries = table.setdefault(arch, {})
    n = 0
    for key, tile in _tile_cache.items():
        if key[-1]:  # tuned (autotuning on), not the untuned first candidate
            entries[table_key(key)] = [tile.block_m, tile.block_n, tile.block_k, tile.num_stages, tile.num_warps,
                                       tile.group_m]
            n += 1
    table[arch] = dict(sorted(entries.items()))
    with open(path, "w") as f:
        json.dump(table, f, indent=0, sort_keys=True)
        f.write("\n")
    return n


def _dump_at_exit() -> None:
    path = os.environ.get("FUSEDRES_TRITON_TILES_OUT")
    if path and _tile_cache and torch.cuda.is_available():
        dump_tiles(path, _arch(torch.device("cuda", torch.cuda.current_device())))


atexit.register(_dump_at_exit)


#: Tile per problem, filled on a problem's first launch (by the autotuner, or the first
#: surviving config when autotuning is off).  Later launches of the same problem go straight
#: to the JIT function with that tile: Triton's ``Autotuner.run`` re-derives its key from
#: every argument on each call, which cost about 40 us of host time per launch on an H100
#: host (``benchmarks/host_overhead.py --launch-micro``), as much as a small conv's GPU time.
_tile_cache: dict[tuple, TileConfig] = {}


def _tile_of(cfg) -> TileConfig:
    kw = cfg.kwargs
    return TileConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_stages, cfg.num_warps, kw["GROUP_M"])


def _per_image(t: torch.Tensor) -> int:
    return t.numel() // t.shape[0] if t.shape[0] else 0


def size_limit_reason(rows: int, weight_numel: int, per_image) -> str | None:
    """Why the kernel's 32-bit indexing cannot run a problem, or None.

    ``rows`` is ``N * H_out * W_out``; ``per_image`` holds ``(name, C * H * W)`` of the input,
    the output (and so the residual, of the same shape) and the downsample input.
    """
    if rows > _INT32_MAX - 256:
        return f"N*H_out*W_out = {rows} output pixels exceeds the kernel's int32 row index"
    if weight_numel > _INT32_MAX:
        return f"weight has {weight_numel} elements; the kernel addresses it with int32"
    # Batch and spatial offsets are int64; a channel offset c * stride_c stays int32, which
    # is exact while one image (C * H * W) stays below 2**31 elements.
    for name, count in per_image:
        if count > _INT32_MAX:
            return f"{name}: one image has {count} elements; at most 2**31 - 1 supported"
    return None


def _launch(
    x, w_t, scale, shift, residual, out, stride, padding, dilation, groups, relu,
    ds=None, prologue=None, stats=None, config=None, bn_stats=None, split_k=None,
) -> int:
    """Launch the kernel (see :func:`launch`); return the ``BLOCK_M`` it ran with.

    ``prologue`` is ``None`` or ``(in_scale, in_shift)`` (``PROLOGUE_BN``); ``stats`` is
    ``None`` or the ``(psum, pm2)`` workspaces, each ``(>= cdiv(M, BLOCK_M), C_out)`` fp32
    contiguous (``EMIT_STATS``; scale/shift/residual/downsample/relu are then unused);
    ``bn_stats`` as in :func:`launch` (``BN_STATS``).
    """
    n, c, h, w = x.shape
    kh, kw, cg, k = w_t.shape
    _, _, oh, ow = out.shape
    m = n * oh * ow
    reason = size_limit_reason(m, w_t.numel(), (("x", _per_image(x)), ("out", _per_image(out)),
                                                ("ds input", _per_image(ds[0]) if ds else 0)))
    if reason is not None:
        raise ValueError(reason)
    if stats is not None and (residual is not None or ds is not None or relu or bn_stats is not None):
        raise ValueError("the statistics mode stores the raw conv output: no residual, downsample, relu or BN")
    splittable = prologue is None and stats is None
    if split_k is not None and (split_k < 1 or (split_k > 1 and not splittable)):
        raise ValueError(f"split_k={split_k}: must be >= 1, and 1 with a BN prologue or statistics (train mode)")
    kg = k // groups
    # The kernel reads every per-channel vector (scale, shift, BN statistics) at unit stride:
    # a strided 1-D view (a column of a 2-D tensor, an expand()ed scalar) is copied first.
    scale, shift = scale.contiguous(), shift.contiguous()
    if ds is not None:
        xd, wd_t, ds_scale, ds_shift, ds_stride = ds
        ds_scale, ds_shift = ds_scale.contiguous(), ds_shift.contiguous()
        cd = xd.shape[1]
        swdc, swdk = wd_t.stride(2), wd_t.stride(3)
    else:
        xd, wd_t, ds_scale, ds_shift, ds_stride = out, w_t, scale, shift, (1, 1)
        cd, swdc, swdk = 0, 0, 0
    in_scale, in_shift = prologue if prologue is not None else (scale, shift)
    psum, pm2 = stats if stats is not None else (scale, shift)
    if bn_stats is not None:
        mean, var, eps = bn_stats[0].contiguous(), bn_stats[1].contiguous(), bn_stats[2]
        ds_mean, ds_var, ds_eps = (
            (bn_stats[3].contiguous(), bn_stats[4].contiguous(), bn_stats[5]) if ds is not None else (mean, var, eps)
        )
    else:
        mean, var, eps, ds_mean, ds_var, ds_eps = scale, shift, 0.0, scale, shift, 0.0
    m_bucket = _pow2_at_least(m, 32)
    args = (
        x, w_t, scale, shift, residual if residual is not None else out, out,
        xd, wd_t, ds_scale, ds_shift,
        in_scale, in_shift, psum, pm2,
        mean, var, ds_mean, ds_var, float(eps), float(ds_eps),
        m, m_bucket, h, w, oh, ow, cg, kg, cd,
        *x.stride(),
        *w_t.stride(),
        *_strides4(residual),
        *out.stride(),
        *(xd.stride() if ds is not None else (0, 0, 0, 0)),
        swdc, swdk,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], ds_stride[0], ds_stride[1],
    )
    flags = dict(
        KH=kh, KW=kw, PADDED=padding[0] > 0 or padding[1] > 0,
        HAS_RESIDUAL=residual is not None, HAS_DOWNSAMPLE=ds is not None, RELU=bool(relu),
        PROLOGUE_BN=prologue is not None, EMIT_STATS=stats is not None, BN_STATS=bn_stats is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        # The interpreter's dot is wrong on bf16 (see kernels.py); GPUs use bf16 MMA.
        DOT_UPCAST=interpreting() and x.dtype == torch.bfloat16,
    )
    if HOISTED_ENABLED and x.element_size() == 2 and kh <= 16 and kw <= 15:  # opt-in (see HOISTED_ENABLED)
        flags.update(HOISTED=True, EVEN_K=cg % _MAX_BLOCK_K == 0)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(kg, meta["BLOCK_N"]), groups)

    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if out.numel() == 0:
        return config.block_m if config is not None else _MIN_BLOCK_M
    epilogue = (scale, shift, mean, var, eps, ds_scale, ds_shift, ds_mean, ds_var, ds_eps)
    if x.device.type != "cuda":  # the interpreter, on CPU tensors
        if split_k is not None and split_k > 1:
            _launch_split_k(args, flags, config, split_k, grid(config.kwargs())[0], groups, out, residual, epilogue)
        else:
            _conv_bn_act_fwd_kernel[grid](*args, **flags, **config.kwargs())
        return config.block_m
    key = None
    if config is None:
        # What the autotuner keys on (_AUTOTUNE_KEY) plus the device and the operand dtypes.
        key = (m_bucket, h, w, oh, ow, cg, kg, cd, x.stride(1), xd.stride(1), out.stride(1),
               residual.stride(1) if residual is not None else 0, tuple(stride), tuple(padding),
               tuple(dilation), tuple(ds_stride), *flags.values(), x.dtype, scale.dtype, shift.dtype,
               mean.dtype, x.device.index, _autotune_enabled())
        config = _tile_cache.get(key)
    if config is None:
        candidates = prune_configs(
            base_configs(flags["DOT_PRECISION"]), M=m, CG=cg, KG=kg, CD=cd, elem_size=x.element_size(),
            smem_limit=_max_shared_mem(x.device), has_downsample=ds is not None,
            fma=flags["DOT_PRECISION"] == "ieee", prologue_bn=prologue is not None,
            hoisted=flags.get("HOISTED", False),
            m_contiguous_out=_rows_contiguous(out.stride(1), residual.stride(1) if residual is not None else None),
        )
        if not _autotune_enabled():
            config = _tile_cache[key] = candidates[0]
        else:  # a tile a GPU run tuned for this problem and shipped with the package (tiles.json)
            config = shipped_tile(_arch(x.device), key, candidates)
            if config is not None:
                _tile_cache[key] = config
    # Triton launches on the current device; switch only when x lives elsewhere (the
    # guard costs host time on every call).
    guard = torch.cuda.device(x.device) if x.device.index != torch.cuda.current_device() else nullcontext()
    with guard:
        tuned_out = False
        if config is None:
            _autotuned_kernel[grid](*args, **flags)
            # The tile the autotuner ran with (its cached choice for this key).
            config = _tile_cache[key] = _tile_of(_autotuned_kernel.best_config)
            tuned_out = True
        split = split_k if split_k is not None else 1
        if split_k is None and SPLIT_K_ENABLED and splittable:
            tiles = grid(config.kwargs())[0] * groups
            steps = kh * kw * triton.cdiv(cg, config.block_k) + triton.cdiv(cd, config.block_k)
            split = split_k_factor(tiles, steps, _sm90_sm_count(x.device))
        if split > 1:
            # after autotuning too (its one-pass output is overwritten): every call of a problem,
            # the first included, gives the same split result
            _launch_split_k(args, flags, config, split, grid(config.kwargs())[0], groups, out, residual, epilogue)
            return config.block_m
        if tuned_out:
            return config.block_m
        _conv_bn_act_fwd_kernel[grid](
            *args, **flags, **config.kwargs(), num_warps=config.num_warps, num_stages=config.num_stages
        )
    return config.block_m

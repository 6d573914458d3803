"""Ahead-of-time compilation check of the Triton conv kernel for sm_80 and sm_90, no GPU needed.

    python -m fusedres.backends.triton.aot [--arch 80 --arch 90] [--all-configs] [--json PATH]

Compiles every compile-time variant of ``_conv_bn_act_fwd_kernel`` (filter size 1/3/7 x
residual x ReLU x downsample x dtype, fp32 in both TF32 and IEEE mode; padded exactly
when the filter is larger than 1x1, as in ResNets; with ReLU also with the eval
BN-statistics epilogue; and the train-mode statistics variants, with and without the BN
prologue) with the first
tile config that :func:`launch.prune_configs` keeps for a large problem of that dtype on
that arch, plus every surviving config for the heaviest variants (3x3 block tail with
both accumulators, bf16 and fp32; 3x3 train conv with prologue and statistics, bf16 and
fp32-IEEE).  The opt-in ``HOISTED`` main loop (``FUSEDRES_TRITON_HOISTED=1``) is compiled too
(:func:`hoisted_variants`, names ending ``@hoist``), and its eval kernels get their own median
line; so are the opt-in split-K partial kernels (:func:`split_k_variants`, ``@splitk``) and their
epilogue kernel (``splitk-epilogue``), for sm_90 (where the launcher takes them).  ``--all-configs`` compiles every surviving config for every variant (slow).

The signature mirrors what the JIT sees on the channels_last fast path: the unit strides
(channel stride of activations, output-channel stride of the re-laid-out weight) are the
constant 1, pointers and the other strides are 16-divisible.  A few extra variants cover
NCHW activations (unit width strides, channel strides of any value) and the padding flag
the other way round (a padded 1x1, an unpadded 3x3), at the default tile.

For each binary it reports registers per thread, spill bytes, shared memory, and the main
loop's SASS instruction and tensor-core instruction counts (``mainloop_instrs``,
``mainloop_mma``: :func:`mainloop`, from the SASS of Triton's bundled ``cuobjdump``), and
fails (exit status 1) on a compile error, any register spill, or shared memory above the
arch's per-block limit (sm_80: 163 KB, sm_90: 227 KB).  Registers and spills come from
``ptxas -v`` (Triton's bundled ptxas, run on the PTX Triton generated): a CompiledKernel
only learns ``n_regs``/``n_spills`` when it is loaded onto a GPU.  Shared memory is the
compiled kernel's ``metadata.shared``.

Must run in a process where ``TRITON_INTERPRET`` is not 1 (the JIT would then hand out
interpreted functions instead of compilable ones).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TRITON_DTYPE = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
_ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}
# Arguments that are exactly 1 on the channels_last fast path (JIT specialises them to constants).
_UNIT_STRIDES = ("sxc", "swk", "src", "soc", "sdc", "swdk")
# NCHW activations: the width strides are 1 instead; the weight is re-laid out either way.
_NCHW_UNIT_STRIDES = ("sxw", "swk", "srw", "sow", "sdw", "swdk")
# ... and their channel strides (H * W) and row strides (W) need not be 16-divisible (7 x 7).
_NCHW_UNALIGNED = ("sxc", "src", "soc", "sdc", "sxh", "srh", "soh", "sdh")
# Scalar float arguments (the BN epsilons).
_FLOAT_ARGS = ("eps", "ds_eps")
# Geometry arguments that vary per layer: left as plain i32 (no divisibility assumption).
_PLAIN_INTS = ("H", "W", "OH", "OW", "conv_sh", "conv_sw", "pad_h", "pad_w", "dil_h", "dil_w", "ds_sh", "ds_sw")


@dataclass(frozen=True)
class Variant:
    dtype: str
    precision: str
    kh: int
    has_residual: bool
    has_downsample: bool
    relu: bool
    prologue_bn: bool = False
    emit_stats: bool = False
    bn_stats: bool = False
    #: ``"cl"`` (channels_last: unit channel strides) or ``"nchw"`` (unit width strides).
    layout: str = "cl"
    #: ``PADDED``; ``None``: as in ResNets, exactly when the filter is larger than 1x1.
    padded: bool | None = None
    #: The opt-in ``HOISTED`` main loop: ``""`` (off), ``"even"`` (with ``EVEN_K``) or ``"ragged"``.
    hoisted: str = ""
    #: The opt-in split-K partial kernel (``SPLIT_K``: main loop over a share of the steps, raw store).
    split_k: bool = False

    @property
    def is_padded(self) -> bool:
        return self.kh > 1 if self.padded is None else self.padded

    @property
    def name(self) -> str:
        prec = f"-{self.precision}" if self.dtype == "fp32" else ""
        flags = "".join(f for f, on in (("+res", self.has_residual), ("+ds", self.has_downsample),
                                        ("+relu", self.relu), ("+pro", self.prologue_bn),
                                        ("+stats", self.emit_stats), ("+bn", self.bn_stats)) if on)
        extra = ("" if self.layout == "cl" else f"@{self.layout}") + (
            "" if self.padded is None else ("@pad" if self.padded else "@nopad")) + (
            {"": "", "even": "@hoist", "ragged": "@hoist-ragged"}[self.hoisted]) + ("@splitk" if self.split_k else "")
        return f"{self.dtype}{prec}-k{self.kh}{flags}{extra}"


def variants() -> list[Variant]:
    """Every constexpr combination the backend can launch (residual and downsample are exclusive)."""
    out = []
    dtypes = (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee"))
    for (dt, prec), kh, relu, (res, ds) in itertools.product(
        dtypes, (1, 3, 7), (True, False), ((False, False), (True, False), (False, True))
    ):
        out.append(Variant(dt, prec, kh, res, ds, relu))
        if relu:  # the drop-in blocks pass their eval BN's statistics (BN_STATS), always with ReLU
            out.append(Variant(dt, prec, kh, res, ds, relu, bn_stats=True))
    # Train mode (fusedres.training): every conv emits statistics of its raw output; convs
    # that follow a BN inside a block (1x1 and 3x3) also apply it in their operand load.
    for (dt, prec), (kh, pro) in itertools.product(
        dtypes, ((1, False), (1, True), (3, False), (3, True), (7, False))
    ):
        out.append(Variant(dt, prec, kh, False, False, False, prologue_bn=pro, emit_stats=True))
    return out


def hoisted_variants() -> list[Variant]:
    """The opt-in ``HOISTED`` main loop (16-bit operands only, see ``launch.HOISTED_ENABLED``): every
    bf16 variant with ``EVEN_K``, the fp16 ones of the representative flag sets, and a few without
    ``EVEN_K`` (ragged channel blocks)."""
    out = [replace(v, hoisted="even") for v in variants()
           if v.dtype == "bf16" or (v.dtype == "fp16" and v.name.split("-k", 1)[1] in {"3+ds+relu+bn", "3+pro+stats"})]
    out += [replace(v, hoisted="ragged") for v in variants()
            if v.name in {"bf16-k3+res+relu+bn", "bf16-k1+relu+bn", "bf16-k3+pro+stats", "bf16-k3+ds+relu"}]
    return out


def split_k_variants() -> list[Variant]:
    """The opt-in split-K partial kernel (``launch.SPLIT_K_ENABLED``), as the launcher runs it: no
    epilogue flag (the epilogue kernel applies them), per filter size and dtype, and with the hoisted
    loop."""
    out = [Variant(dt, prec, kh, False, False, False, split_k=True)
           for (dt, prec), kh in itertools.product((("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"),
                                                     ("fp32", "ieee")), (1, 3, 7))]
    out += [Variant("bf16", "tf32", kh, False, False, False, hoisted=h, split_k=True)
            for kh, h in ((1, "even"), (3, "even"), (3, "ragged"))]
    # the block tail: the downsample GEMM's share after the main one's (its accumulator not live at once)
    out += [Variant(dt, prec, kh, False, True, False, split_k=True)
            for dt, prec, kh in (("bf16", "tf32", 1), ("bf16", "tf32", 3), ("fp16", "tf32", 1), ("fp32", "tf32", 3),
                                 ("fp32", "ieee", 3))]
    out += [Variant("bf16", "tf32", kh, False, True, False, hoisted="even", split_k=True) for kh in (1, 3)]
    out.append(Variant("bf16", "tf32", 3, False, True, False, layout="nchw", split_k=True))
    out.append(Variant("bf16", "tf32", 3, False, False, False, layout="nchw", split_k=True))
    return out


#: The split-K epilogue kernel's variants: (residual, downsample, ReLU, BN statistics), per dtype.
SPLIT_K_EPILOGUES = {"affine": (False, False, False, False), "relu+bn": (False, False, True, True),
                     "res+relu": (True, False, True, False), "res+relu+bn": (True, False, True, True),
                     "ds": (False, True, False, False), "ds+relu": (False, True, True, False),
                     "ds+relu+bn": (False, True, True, True)}


def extra_variants() -> list[Variant]:
    """Off the ResNet fast path, compiled at the default tile: NCHW activations (unit width,
    not channel, strides) and the padding flag the other way round for 1x1 and 3x3."""
    return [
        Variant("bf16", "tf32", 3, True, False, True, bn_stats=True, layout="nchw"),
        Variant("fp32", "ieee", 3, False, True, True, layout="nchw"),
        Variant("bf16", "tf32", 1, False, False, False, prologue_bn=True, emit_stats=True, layout="nchw"),
        Variant("bf16", "tf32", 1, True, False, True, padded=True),
        Variant("bf16", "tf32", 3, False, True, True, padded=False),
    ]


def _signature_and_constants(kernel, v: Variant, cfg):
    sig, constants, attrs = {}, {}, {}
    act = "*" + _TRITON_DTYPE[v.dtype]
    unit = _UNIT_STRIDES if v.layout == "cl" else _NCHW_UNIT_STRIDES
    for i, name in enumerate(kernel.arg_names):
        if name.endswith("_ptr"):
            # scale/shift fp32 (functional callers fold in fp32); with BN_STATS all four BN vectors
            # in the activation dtype, as a converted bf16/fp16 model passes its BN as it is.
            fp32 = "stat_" in name or (
                not v.bn_stats and any(s in name for s in ("scale", "shift")))
            sig[name] = "*fp32" if fp32 else act
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in unit:
            sig[name] = "constexpr"
            constants[name] = 1
        elif kernel.params[i].is_constexpr:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
            if name not in _PLAIN_INTS and not (v.layout == "nchw" and name in _NCHW_UNALIGNED):
                attrs[(i,)] = [["tt.divisibility", 16]]
    constants.update(
        KH=v.kh, KW=v.kh, PADDED=v.is_padded,
        HAS_RESIDUAL=v.has_residual, HAS_DOWNSAMPLE=v.has_downsample, RELU=v.relu,
        PROLOGUE_BN=v.prologue_bn, EMIT_STATS=v.emit_stats, BN_STATS=v.bn_stats,
        DOT_PRECISION=v.precision, DOT_UPCAST=False, **cfg.kwargs(),
    )
    if v.hoisted:
        constants.update(HOISTED=True, EVEN_K=v.hoisted == "even")
    if v.split_k:
        constants.update(SPLIT_K=True)
    return sig, constants, attrs


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_usage(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # older Triton: no per-arch ptxas
        ptxas = get_ptxas().path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = proc.stderr + proc.stdout
    out = {}
    for key, rx in _PTXAS_RE.items():
        vals = [int(m) for m in rx.findall(log)]
        out[key] = max(vals) if vals else 0
    return out


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA)\b")


def mainloop(sass: str) -> tuple[int, int] | None:
    """``(instructions, MMA instructions)`` of the main loop in a kernel's SASS, or None.

    The main loop is the innermost loop (a backward ``BRA`` and the code from its target to it)
    that holds tensor-core instructions (``HGMMA`` on sm_90, ``HMMA`` on sm_80): one k-step of
    the implicit GEMM, every instruction of which one warp issues per step.  Instructions per
    MMA is the CPU-side measure of the loop's issue pressure (address math, masks, waits)."""
    code = [(int(a, 16), ins) for a, ins in _SASS_LINE.findall(sass)]
    best = None
    for addr, ins in code:
        m = _BRANCH.search(ins)
        if m is None or m.group(1) is None:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [i for a, i in code if target <= a <= addr]
        mma = sum(1 for i in body if _MMA.search(i))
        if mma and (best is None or len(body) < best[0]):
            best = (len(body), mma)
    return best


def _sass(cubin: bytes) -> str:
    """The SASS of a cubin, from the ``cuobjdump`` Triton ships (empty when it is missing)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout


@dataclass
class Result:
    arch: int
    variant: str
    config: str
    ok: bool
    regs: int = 0
    spill_bytes: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str = ""
    #: SASS instructions and tensor-core instructions in one main-loop iteration (:func:`mainloop`);
    #: None where the loop has no MMA (fp32 with TF32 off runs on FMA units) or no SASS was read.
    mainloop_instrs: int | None = None
    mainloop_mma: int | None = None


def compile_one(arch: int, v: Variant, cfg) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    from .kernels import _conv_bn_act_fwd_kernel as kernel

    cfg_name = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}-s{cfg.num_stages}-w{cfg.num_warps}"
    t0 = time.perf_counter()
    try:
        sig, constants, attrs = _signature_and_constants(kernel, v, cfg)
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
        ck = triton.compile(
            src, target=GPUTarget("cuda", arch, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
        usage = _ptxas_usage(ck.asm["ptx"], arch)
        loop = mainloop(_sass(ck.asm["cubin"]))
    except Exception as exc:  # reported, and fails the run
        return Result(arch, v.name, cfg_name, False, seconds=time.perf_counter() - t0,
                      error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    spill = usage["spill_stores"] + usage["spill_loads"]
    shared = int(ck.metadata.shared)
    problems = []
    if spill:
        problems.append(f"{spill} bytes of register spills")
    if shared > SMEM_LIMIT[arch]:
        problems.append(f"shared memory {shared} B > {SMEM_LIMIT[arch]} B")
    return Result(arch, v.name, cfg_name, not problems, usage["regs"], spill, shared,
                  time.perf_counter() - t0, "; ".join(problems), *(loop or (None, None)))


def plan(archs, all_configs: bool):
    """(arch, variant, config) triples to compile.

    Default (CI, a couple of minutes on 2 cores): per arch, every flag combination in bf16
    at the default tile; the other dtypes/precisions for the representative flag sets; and
    every tile the autotuner may pick for the heaviest variants (3x3 with residual, 3x3 train
    conv with BN prologue and statistics, 3x3 block tail, the last two also with the eval
    BN-statistics epilogue) in bf16, fp32-TF32 and fp32-IEEE; and :func:`extra_variants` at the
    default tile.  ``all_configs``: every variant x every tile.
    """
    from .launch import base_configs, prune_configs

    representative = {"k3+res+relu", "k3+ds+relu", "k7+relu", "k3+pro+stats"}
    heavy = {"bf16-k3+res+relu", "bf16-k3+ds+relu", "fp32-tf32-k3+ds+relu", "fp32-ieee-k3+ds+relu",
             "bf16-k3+pro+stats", "fp32-ieee-k3+pro+stats",
             # The eval BN-statistics epilogue (what converted blocks run) adds per-column vectors.
             "bf16-k3+res+relu+bn", "bf16-k3+ds+relu+bn", "fp32-tf32-k3+ds+relu+bn", "fp32-ieee-k3+ds+relu+bn"}

    def kept(v, arch):
        return prune_configs(
            base_configs(v.precision), M=1 << 20, CG=512, KG=512, CD=512 if v.has_downsample else 0,
            elem_size=_ELEM[v.dtype], smem_limit=SMEM_LIMIT[arch],
            has_downsample=v.has_downsample, fma=v.precision == "ieee", prologue_bn=v.prologue_bn,
            m_contiguous_out=v.layout == "nchw", hoisted=bool(v.hoisted),
        )

    jobs = []
    for arch in archs:
        for v in variants():
            configs = kept(v, arch)
            flags = v.name.split("-k", 1)[1]
            if all_configs or v.name in heavy:
                chosen = configs
            elif v.dtype == "bf16" or "k" + flags in representative:
                chosen = configs[:1]
            else:
                chosen = []
            jobs.extend((arch, v, c) for c in chosen)
        for v in extra_variants():
            configs = kept(v, arch)
            jobs.extend((arch, v, c) for c in (configs if all_configs else configs[:1]))
        for v in hoisted_variants():  # every tile for the heaviest, as for the default loop
            configs = kept(v, arch)
            every = all_configs or v.name in {"bf16-k3+res+relu+bn@hoist", "bf16-k3+pro+stats@hoist"}
            jobs.extend((arch, v, c) for c in (configs if every else configs[:1]))
        if arch >= 90:  # opt-in split-K (sm_90+ only): every tile for bf16 3x3, the heaviest eval loop
            for v in split_k_variants():
                configs = kept(v, arch)
                every = all_configs or v.name == "bf16-k3@splitk"
                jobs.extend((arch, v, c) for c in (configs if every else configs[:1]))
            jobs.extend(("splitk-epilogue", arch, dt, name) for dt in ("bf16", "fp32") for name in SPLIT_K_EPILOGUES)
            # one output pixel (a ResNet's 7x7 layer at 32x32 input, batch 1): the JIT passes M = OH = OW = 1
            # as constants, which the kernel must take as plain ints
            jobs.extend(("splitk-epilogue", arch, "bf16", name, True) for name in ("res+relu+bn", "ds+relu+bn"))
        if arch >= 90:  # the opt-in TMA kernel of 1x1 convs at the tiles its launcher takes (no autotuning):
            # 128x128, and 128x64 for 64 output channels; its persistent form (launch.PERSISTENT_ENABLED)
            # at the one tile it runs for (launch._persistent_programs)
            tiles = {prune_configs(base_configs("tf32"), M=1 << 20, CG=256, KG=kg, CD=0, elem_size=2,
                                   smem_limit=SMEM_LIMIT[arch])[0] for kg in (512, 64)}
            for tile in sorted(tiles, key=lambda t: -t.block_n):
                jobs.extend(("tma", arch, "bf16", name, tile) for name in TMA_VARIANTS)
                if tile.block_m * tile.block_n >= 128 * 128:
                    jobs.extend(("tma", arch, "bf16", name, tile, True) for name in TMA_VARIANTS)
    return jobs


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: TRITON_INTERPRET=1 is set; run this in a process without it", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT))
    p.add_argument("--all-configs", action="store_true")
    p.add_argument("--json", help="write the per-kernel report here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    jobs = plan(args.arch or [80, 90], args.all_configs)

    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile_job, jobs))
    else:
        results = [_compile_job(j) for j in jobs]
    print(f"{'arch':>4} {'variant':<24} {'config':<22} {'regs':>4} {'spill':>5} {'smem KB':>7} "
          f"{'loop':>5} {'mma':>4} {'/mma':>5}  status")
    for r in results:
        status = "ok" if r.ok else f"FAIL: {r.error}"
        per = f"{r.mainloop_instrs / r.mainloop_mma:.1f}" if r.mainloop_mma else "-"
        print(f"sm{r.arch:<2} {r.variant:<24} {r.config:<22} {r.regs:>4} {r.spill_bytes:>5} "
              f"{r.shared / 1024:>7.1f} {r.mainloop_instrs or '-':>5} {r.mainloop_mma or '-':>4} {per:>5}  {status}")
    bad = [r for r in results if not r.ok]
    print(f"aot: {len(results)} kernels compiled in {time.perf_counter() - t0:.0f}s, {len(bad)} failed")
    for arch in sorted({r.arch for r in results}):
        for label, hoist in (("eval kernels", False), ("opt-in hoisted-loop eval kernels", True)):
            per = sorted(r.mainloop_instrs / r.mainloop_mma for r in results
                         if r.arch == arch and r.mainloop_mma and "+stats" not in r.variant
                         and "tma" not in r.variant and "splitk" not in r.variant and ("@hoist" in r.variant) == hoist)
            if per:
                print(f"aot: sm{arch} {label}: median {per[len(per) // 2]:.1f} main-loop instructions per MMA "
                      f"(min {per[0]:.1f}, max {per[-1]:.1f}, {len(per)} kernels)")
        split = sorted(r.mainloop_instrs / r.mainloop_mma for r in results
                       if r.arch == arch and "@splitk" in r.variant and r.mainloop_mma)
        if split:
            print(f"aot: sm{arch} opt-in split-K partial kernels: median {split[len(split) // 2]:.1f} main-loop "
                  f"instructions per MMA ({len(split)} kernels)")
        tma = [r.mainloop_instrs / r.mainloop_mma for r in results if r.arch == arch and "tma" in r.variant
               and "@persist" not in r.variant and r.mainloop_mma]
        if tma:
            print(f"aot: sm{arch} opt-in TMA 1x1 kernels: {min(tma):.1f}-{max(tma):.1f} main-loop instructions per MMA")
        persist = [r.mainloop_instrs for r in results if r.arch == arch and "@persist" in r.variant and r.mainloop_mma]
        if persist:  # the tile loop flattened with the reduction loop: one loop, epilogue included
            print(f"aot: sm{arch} opt-in persistent TMA 1x1 kernels: {min(persist)}-{max(persist)} instructions in the "
                  f"flattened tile loop (epilogue included, run once per tile)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if bad else 0


def _compile_job(job):
    if job[0] == "tma":
        return compile_tma(*job[1:])
    if job[0] == "splitk-epilogue":
        return compile_split_k_epilogue(*job[1:])
    return compile_one(*job)


def compile_split_k_epilogue(arch: int, dtype: str, name: str, one_pixel: bool = False) -> Result:
    """Compile :func:`_split_k_epilogue_kernel` for ``arch`` at the launcher's tile
    (``launch.SPLIT_K_EPILOGUE_TILE``), channels_last output and residual (``one_pixel``: ``M``,
    ``OH`` and ``OW`` the constant 1, as the JIT specialises them)."""
    from .kernels import _split_k_epilogue_kernel as kernel
    from .launch import SPLIT_K_EPILOGUE_TILE

    has_res, has_ds, relu, bn = SPLIT_K_EPILOGUES[name]
    bm, bn_, warps = SPLIT_K_EPILOGUE_TILE
    act = "*" + _TRITON_DTYPE[dtype]
    sig, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg == "ws_ptr":
            sig[arg] = "*fp32"
        elif arg.endswith("_ptr"):
            sig[arg] = act if (bn or arg in ("res_ptr", "out_ptr")) else "*fp32"
        elif arg in ("eps", "ds_eps"):
            sig[arg] = "fp32"
        elif arg in ("src", "soc") or (one_pixel and arg in ("M", "OH", "OW")):
            sig[arg] = "constexpr"
        elif kernel.params[i].is_constexpr:
            sig[arg] = "constexpr"
        else:
            sig[arg] = "i32"
        if arg.endswith("_ptr"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constants = dict(src=1, soc=1, HAS_RESIDUAL=has_res, HAS_DOWNSAMPLE=has_ds, RELU=relu, BN_STATS=bn, BLOCK_M=bm,
                     BLOCK_N=bn_)
    if one_pixel:
        constants.update(M=1, OH=1, OW=1)
    variant = f"{dtype}-splitk-epilogue+{name}" + ("@1px" if one_pixel else "")
    cfg_name = f"{bm}x{bn_}-w{warps}"
    return _compile_report(arch, variant, cfg_name, kernel, sig, constants, attrs, {"num_warps": warps},
                           mainloop_too=False)


#: The opt-in TMA GEMM kernel of 1x1 convs (sm_90 only): its epilogue variants, eval.
TMA_VARIANTS = {"affine": (False, False, False), "res+relu": (True, True, False), "res+relu+bn": (True, True, True),
                "relu+bn": (False, True, True)}


#: The SM count the persistent TMA kernel is compiled for in the report (an H100's or an H200's).
PERSISTENT_SMS = 132


def compile_tma(arch: int, dtype: str, name: str, cfg, persistent: bool = False) -> Result:
    """Compile :func:`_conv1x1_tma_fwd_kernel` for ``arch`` (tensor descriptors of ``cfg``'s tile);
    ``persistent``: its persistent form, for an H100/H200's 132 SMs (``NUM_SMS``)."""
    from .kernels import _conv1x1_tma_fwd_kernel as kernel

    has_res, relu, bn = TMA_VARIANTS[name]
    cfg_name = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}-s{cfg.num_stages}-w{cfg.num_warps}"
    act = _TRITON_DTYPE[dtype]
    sig = {
        "a_desc": f"tensordesc<{act}[{cfg.block_m}, {cfg.block_k}]>",
        "b_desc": f"tensordesc<{act}[{cfg.block_k}, {cfg.block_n}]>",
        "scale_ptr": "*" + act if bn else "*fp32", "shift_ptr": "*" + act if bn else "*fp32",
        "mean_ptr": "*" + act if bn else "*fp32", "var_ptr": "*" + act if bn else "*fp32", "eps": "fp32",
        "r_desc": f"tensordesc<{act}[{cfg.block_m}, {cfg.block_n}]>",
        "o_desc": f"tensordesc<{act}[{cfg.block_m}, {cfg.block_n}]>", "M": "i32", "N": "i32", "K": "i32",
    }
    constants = dict(HAS_RESIDUAL=has_res, RELU=relu, BN_STATS=bn, DOT_PRECISION="tf32", DOT_UPCAST=False,
                     **cfg.kwargs(), NUM_SMS=PERSISTENT_SMS if persistent else 0)
    for c in constants:
        sig[c] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n.endswith("_ptr")}
    variant = f"{dtype}-tma1x1+{name}" + ("@persist" if persistent else "")
    return _compile_report(arch, variant, cfg_name, kernel, sig, constants, attrs,
                           {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _compile_report(arch, variant, cfg_name, kernel, sig, constants, attrs, options, mainloop_too=True) -> Result:
    """Compile one signature of ``kernel`` for ``arch`` and report it (:class:`Result`: registers, spills,
    shared memory, and with ``mainloop_too`` the main loop's SASS counts); a compile error, a spill or
    shared memory above the arch's limit fails it."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        usage = _ptxas_usage(ck.asm["ptx"], arch)
        loop = mainloop(_sass(ck.asm["cubin"])) if mainloop_too else None
    except Exception as exc:
        return Result(arch, variant, cfg_name, False, seconds=time.perf_counter() - t0,
                      error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    spill = usage["spill_stores"] + usage["spill_loads"]
    shared = int(ck.metadata.shared)
    problems = ([f"{spill} bytes of register spills"] if spill else []) + (
        [f"shared memory {shared} B > {SMEM_LIMIT[arch]} B"] if shared > SMEM_LIMIT[arch] else [])
    return Result(arch, variant, cfg_name, not problems, usage["regs"], spill, shared, time.perf_counter() - t0,
                  "; ".join(problems), *(loop or (None, None)))


if __name__ == "__main__":
    sys.exit(main())

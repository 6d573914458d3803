"""Runs workloads x contenders and turns the measurements into report rows.

Per workload and dtype: build the torchvision reference once (random weights, randomized BN
statistics so that folding BN is not the identity), build every contender from a deep copy of
it, run the reference once for the expected output, make each contender's first call (which
compiles; its wall time is reported as ``first_call_s``) and compare its output with the
reference, then time all contenders together with :func:`timing.time_interleaved`.  A
contender that fails at any step becomes an ``error`` row; the others go on.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import backends
from ..check import build_reference, randomize_bn
from . import roofline
from .contenders import COMPILE_NAMES, NOT_IN_COMPILE_ON, Contender
from .timing import Stats, time_graph_replay, time_interleaved, time_once
from .workloads import BlockShape, model_gmacs_per_image, published_gmacs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Input sets rotated through the timed rounds, unless they would exceed _INPUT_BYTES_CAP.
_INPUT_SETS = 4
_INPUT_BYTES_CAP = 1 << 30


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Workload:
    """A block shape or a whole model at one batch size (``size`` = the image side)."""

    kind: str  # "block" | "model"
    name: str
    batch: int
    size: int
    shape: BlockShape | None = None
    used_by: dict | None = None

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        if self.shape is not None:
            return (self.batch, self.shape.inplanes, self.shape.height, self.shape.width)
        return (self.batch, 3, self.size, self.size)

    def build_reference(self, seed: int) -> nn.Module:
        """The torchvision module on the CPU in fp32, random weights and BN statistics."""
        if self.shape is None:
            return build_reference(self.name, seed)
        torch.manual_seed(seed)
        block = self.shape.build()
        randomize_bn(block, torch.Generator().manual_seed(seed))
        return block

    def ops(self, dtype: torch.dtype, train: bool) -> list[roofline.Op]:
        if self.shape is not None:
            return roofline.block_ops(self.shape, self.batch, dtype, train)
        return roofline.model_ops(self.name, self.batch, self.size, dtype, train)


@dataclass
class Config:
    device: torch.device
    dtypes: list[torch.dtype]
    mode: str  # "infer" | "train"
    contenders: list[Contender]  # or any object with .name, .skip_reason(), .build()
    channels_last: bool = False
    compile_on: list[str] | None = None  # globs over workload names; None = every workload
    repeats: int = 20
    warmup: int = 3
    seed: int = 0
    time_budget_s: float | None = None
    timing: str = "pipelined"  # GPU timing mode, see timing.TIMING_MODES

    def skip_note(self, c, w: Workload) -> str | None:
        """:data:`NOT_IN_COMPILE_ON` for a compile contender that ``compile_on`` does not select
        for ``w`` (by the workload's name or ``name/b<batch>``): a ``skipped`` row, not a dropped one."""
        if c.name in COMPILE_NAMES and not compile_selected(w, self.compile_on):
            return NOT_IN_COMPILE_ON
        return None


def compile_selected(w: Workload, patterns: list[str] | None) -> bool:
    """Whether ``--compile-on`` globs select ``w`` (by name or ``name/b<batch>``); ``None`` selects all."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(k, p) for k in (w.name, f"{w.name}/b{w.batch}") for p in patterns)


def _make_inputs(w: Workload, cfg: Config, dtype: torch.dtype, train: bool) -> list[torch.Tensor]:
    per_set = math.prod(w.input_shape) * torch.empty((), dtype=dtype).element_size()
    n_sets = max(2, min(_INPUT_SETS, _INPUT_BYTES_CAP // max(per_set, 1)))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # Train mode runs under autocast on fp32 data (the usual AMP recipe); infer feeds the dtype.
    in_dtype = torch.float32 if train else dtype
    out = []
    for _ in range(n_sets):
        x = torch.randn(w.input_shape, generator=g).to(device=cfg.device, dtype=in_dtype, memory_format=fmt)
        # A block inside a network receives an input that needs a gradient; an image does not.
        out.append(x.requires_grad_(train and w.kind == "block"))
    return out


def _make_step(model: nn.Module, train: bool, amp_dtype: torch.dtype | None, device: torch.device):
    """``x -> output`` for inference; for train, forward + ``out.float().sum()`` + backward.

    The train step drops the previous gradients first (``set_to_none``, as an optimizer's
    ``zero_grad`` does) so no step pays for accumulating into the last one's.
    """
    if not train:
        return model
    params = list(model.parameters())
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    def step(x):
        for p in params:
            p.grad = None
        x.grad = None
        with amp():
            out = model(x)
        out.float().sum().backward()
        return out.detach()

    return step


#: The largest ``max_rel_err`` (max |out - eager| over max |eager|, one call) a contender's row may
#: have and still be timed; above it the row is an error ("numerics: ...") with no speedup.  A
#: gate against wrong contenders, far above rounding: the largest committed so far are 1.3e-6
#: (fp32 infer), 9.4e-5 (fp32 train), 6.9e-3 (bf16 infer, CUDA) and 9.0e-2 (bf16 train step's
#: output, ``torch.compile`` included; batch statistics of a random model amplify bf16 rounding).
#: It checks outputs only: ``fusedres check --mode train`` is the judge of gradients and statistics.
MAX_REL_ERR = {
    ("infer", torch.float32): 1e-3, ("infer", torch.bfloat16): 5e-2, ("infer", torch.float16): 1e-2,
    ("train", torch.float32): 1e-2, ("train", torch.bfloat16): 0.25, ("train", torch.float16): 0.1,
}


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference and that over ``max |ref|``, in float64."""
    if out.shape != ref.shape:
        raise RuntimeError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    diff = (out.double() - ref.double()).abs().max().item()
    return diff, diff / max(ref.double().abs().max().item(), 1e-30)


def _peak_mem_mb(step, x, device: torch.device) -> float | None:
    """Extra memory one call allocates at its peak, above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step(x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _base_row(w: Workload, dtype: torch.dtype, cfg: Config, c, ops) -> dict:
    flops = sum(op.flops for op in ops)
    return {
        "workload": w.name,
        "kind": w.kind,
        "block": w.shape.as_dict() if w.shape is not None else None,
        "used_by": w.used_by,
        "batch": w.batch,
        "image_size": w.size,
        "input_shape": list(w.input_shape),
        "dtype": dtype_name(dtype),
        "mode": cfg.mode,
        "channels_last": cfg.channels_last,
        "contender": c.name,
        "status": "ok",
        "error": None,
        "note": None,
        "backends_used": None,
        "first_call_s": None,
        "time_ms": None,
        "time_ms_p20": None,
        "time_ms_p80": None,
        "n_runs": None,
        "img_per_s": None,
        "tflops": None,
        "gbps": None,
        "floor_ms": None,
        "roofline_pct": None,
        "flops": flops,
        "min_bytes": sum(op.bytes for op in ops),
        "gmacs_per_image": model_gmacs_per_image(w.name, w.size) if w.kind == "model" else None,
        # torchvision's figure (weights metadata ``_ops``), published for 224x224 only.
        "published_gmacs_per_image": published_gmacs(w.name) if w.kind == "model" and w.size == 224 else None,
        "peak_mem_mb": None,
        "max_abs_err": None,
        "max_rel_err": None,
        "speedup_vs_eager": None,
        "speedup_vs_compile": None,
        "speedup_vs_compile_max": None,
    }


def run_workload(w: Workload, dtype: torch.dtype, cfg: Config, peaks: roofline.Peaks,
                 on_status=None, on_round=None) -> list[dict]:
    """All contenders on one workload in one dtype: one row per contender."""
    train = cfg.mode == "train"
    dev = cfg.device
    amp_dtype = dtype if train and dtype != torch.float32 else None
    ops = w.ops(dtype, train)
    floor_s = peaks.floor_s(ops)
    rows = {c.name: _base_row(w, dtype, cfg, c, ops) for c in cfg.contenders}

    def fail(name, stage, exc):
        rows[name]["status"] = "error"
        rows[name]["error"] = f"{stage}: {type(exc).__name__}: {exc}".strip()[:2000]

    def status(text):
        if on_status is not None:
            on_status(f"{w.name} b{w.batch} {dtype_name(dtype)}: {text}")

    ref = w.build_reference(cfg.seed).to(dev)
    if not train:
        ref = ref.to(dtype)
    if cfg.channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    ref.train(train)
    inputs = _make_inputs(w, cfg, dtype, train)

    # Built outside inference_mode: copies made inside it would be inference tensors, which
    # a model's parameters never are in real use.
    built = {}
    for c in cfg.contenders:
        reason = cfg.skip_note(c, w) or c.skip_reason(dev, cfg.mode)
        if reason is not None:
            rows[c.name].update(status="skipped", note=reason)
            continue
        try:
            built[c.name] = c.build(ref, inputs[0], dtype)
        except Exception as exc:
            fail(c.name, "build", exc)

    steps: dict = {}
    with contextlib.nullcontext() if train else torch.inference_mode():
        status("reference")
        ref_out = _make_step(ref, train, amp_dtype, dev)(inputs[0]).clone()
        gated = bool(torch.isfinite(ref_out).all())  # a non-finite reference output gives nothing to gate against
        for name, model in built.items():
            status(f"first call of {name}")
            try:
                step = _make_step(model, train, amp_dtype, dev)
                with backends.record() as used:
                    out, first_s = time_once(lambda: step(inputs[0]).clone(), dev)
                abs_err, rel_err = _errors(out, ref_out)
            except backends.BackendUnavailableError as exc:  # e.g. a shape this backend declines
                rows[name].update(status="skipped", note=str(exc))
                continue
            except Exception as exc:
                fail(name, "first call", exc)
                continue
            row = rows[name]
            row.update(first_call_s=first_s, max_abs_err=abs_err, max_rel_err=rel_err)
            tol = MAX_REL_ERR.get((cfg.mode, dtype))
            if gated and tol is not None and not rel_err <= tol:  # NaN fails too
                fail(name, "numerics", ValueError(f"max rel err {rel_err:.3g} against eager is above the "
                                                  f"{tol:g} tolerance for {dtype_name(dtype)} {cfg.mode}"))
                continue
            if name.startswith("fusedres-"):
                row["backends_used"] = sorted(used)
                if not set(used) - {"reference"}:  # "reference": an announced fallback to torchvision's forward
                    row["note"] = "no fused op ran: every block took torchvision's forward"
                elif train:
                    row["note"] = ("train mode: fusedres.training's chains ran (the backend name picks the "
                                   "eval kernels only)")
            steps[name] = step
        del ref_out

        status("timing")
        stats, errors = time_interleaved(steps, inputs, dev, cfg.repeats, cfg.warmup, on_round=on_round,
                                         mode=cfg.timing)
        for name, msg in errors.items():
            rows[name].update(status="error", error=f"timing: {msg}")
        for name, s in stats.items():
            try:
                mem = _peak_mem_mb(steps[name], inputs[0], dev)
            except Exception as exc:
                fail(name, "memory", exc)
                continue
            _fill_times(rows[name], s, w.batch, floor_s, mem)
            if dev.type == "cuda" and not train:
                status(f"graph replay of {name}")
                try:
                    rows[name]["graph_ms"] = time_graph_replay(steps[name], inputs[0], dev) * 1e3
                except Exception as exc:  # not capturable: the row keeps its wall time only
                    rows[name]["graph_ms"] = None
                    note = f"no graph time ({type(exc).__name__}: {str(exc)[:200]})"
                    rows[name]["note"] = f"{rows[name]['note']}; {note}" if rows[name]["note"] else note
    _fill_speedups(rows)
    return [rows[c.name] for c in cfg.contenders]


def _fill_times(row: dict, s: Stats, batch: int, floor_s: float, mem: float | None) -> None:
    row.update(
        time_ms=s.median * 1e3,
        time_ms_p20=s.p20 * 1e3,
        time_ms_p80=s.p80 * 1e3,
        n_runs=s.n,
        img_per_s=batch / s.median,
        tflops=row["flops"] / s.median / 1e12,
        gbps=row["min_bytes"] / s.median / 1e9,
        floor_ms=floor_s * 1e3,
        roofline_pct=100.0 * floor_s / s.median,
        peak_mem_mb=mem,
    )


def _fill_speedups(rows: dict) -> None:
    def base(name):
        r = rows.get(name)
        return r["time_ms"] if r is not None and r["status"] == "ok" else None

    for key, name in (("speedup_vs_eager", "eager"), ("speedup_vs_compile", "compile"),
                      ("speedup_vs_compile_max", "compile-max")):
        t0 = base(name)
        if t0 is None:
            continue
        for r in rows.values():
            if r["status"] == "ok" and r["time_ms"]:
                r[key] = t0 / r["time_ms"]


def measure_peaks(cfg: Config, progress=None) -> dict[str, roofline.Peaks]:
    """The roofline peaks for every dtype of the run, keyed by dtype name."""
    if cfg.device.type == "cuda":
        torch.cuda.set_device(cfg.device.index if cfg.device.index is not None else torch.cuda.current_device())
    peaks = {}
    for dtype in cfg.dtypes:
        if progress is not None:
            progress.status(f"measuring matmul and copy peaks ({dtype_name(dtype)})")
        peaks[dtype_name(dtype)] = roofline.measure_peaks(cfg.device, dtype)
    return peaks


def iter_rows(workloads: list[Workload], cfg: Config, peaks: dict[str, roofline.Peaks], progress=None):
    """Run every workload in every dtype, yielding each one's rows as soon as it is done.

    ``progress``: optional object with ``status(text)``, ``advance(n=1)`` (timed rounds) and
    ``total(n)``.  A workload that cannot start because ``cfg.time_budget_s`` is spent gets
    ``skipped`` rows saying so; one that fails outside any single contender (building the
    reference, out of memory for the inputs) gets ``error`` rows, and the run goes on.
    """
    if progress is not None:
        progress.total(len(workloads) * len(cfg.dtypes) * cfg.repeats)
    train = cfg.mode == "train"
    t_start = time.perf_counter()

    def rows_with(w, dtype, **fields):
        out = []
        for c in cfg.contenders:
            out.append(_base_row(w, dtype, cfg, c, w.ops(dtype, train)))
            note = cfg.skip_note(c, w)
            out[-1].update(dict(status="skipped", note=note) if note else fields)
        return out

    for dtype in cfg.dtypes:
        for w in workloads:
            if cfg.time_budget_s is not None and time.perf_counter() - t_start > cfg.time_budget_s:
                if progress is not None:
                    progress.advance(cfg.repeats)
                yield rows_with(w, dtype, status="skipped",
                                note=f"time budget of {cfg.time_budget_s:g} s spent before this workload")
                continue
            advanced = [0]

            def on_round():
                advanced[0] += 1
                progress.advance()

            try:
                rows = run_workload(
                    w, dtype, cfg, peaks[dtype_name(dtype)],
                    on_status=progress.status if progress is not None else None,
                    on_round=on_round if progress is not None else None,
                )
            except Exception as exc:
                rows = rows_with(w, dtype, status="error", error=f"workload: {type(exc).__name__}: {exc}"[:2000])
            finally:
                if progress is not None and advanced[0] < cfg.repeats:  # failed before or during timing
                    progress.advance(cfg.repeats - advanced[0])
                # Fresh compile caches per workload: every block instance shares its class's
                # forward code object, and Dynamo's recompile limit would otherwise silently
                # turn later workloads back to eager.
                torch._dynamo.reset()
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
            yield rows

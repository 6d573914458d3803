"""``fusedres check``: convert a torchvision model, check it against the reference, time both.

Numerics: the fused model and torchvision's model run the same input in the same dtype; a
float64 copy of the reference gives the ground truth.  The fused model passes when its
relative error against float64 is at most ``2 * (eager's own error) + atol[dtype]`` -- the
error budget PyTorch itself spends at that dtype (flash-attention's criterion), plus a small
floor for dtypes where eager happens to be very close.

``--mode train`` checks one training step instead (train-mode BatchNorm, forward under autocast
for fp16/bf16 with fp32 parameters, backward of a fixed random cotangent): the output, every
parameter's gradient and every BN's running statistics, each against the same kind of budget,
and times forward + backward.  A training step's gradients are ill-conditioned in floating
point in a way the forward is not: a few channels' gradients change by far more than the
rounding when the rounding changes (ReLU masks and max-pool choices at near-ties, amplified by
train-mode BatchNorm).  Eager PyTorch matches float64 only while its rounding follows float64's
closely: on ResNet-18 at batch 4, 112x112, fp32, eager's worst gradient error was 5e-6 in NCHW
and 5e-3 in channels_last (which the fused model runs).  So the training check has two parts:

* the algorithm: the fused model in float64 against the float64 reference, every output,
  gradient and running statistic within ``TRAIN_FP64_RTOL`` (2.6e-14 measured in that case), or twice
  what float64 torchvision moves by itself in channels_last where that is more (a few values per BN
  channel: batch 2 at 32x32);
* the run dtype: each tensor within ``max(2 * eager's error, TRAIN_FLOOR[dtype])``, eager's
  error being the larger of two equally valid runs (the model as given; channels_last on the
  input scaled by ``1 + eps``).  The floor is far below the O(1) error of a wrong formula.

Speed: reference and fused are timed interleaved (round-robin, order rotated each round) after
warm-up by :func:`fusedres.bench.timing.time_interleaved` (CUDA events on a GPU), and the
median is reported.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torchvision

from . import backends
from .bench.report import device_info, environment
from .bench.timing import time_interleaved
from .modules import _REFERENCE as _FUSED_CLASSES
from .modules import convert

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Floor of the relative-error budget per dtype (relative L2 norm vs the float64 reference).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Training check (module docstring): float64 agreement of the algorithm, and the gradient floor.
TRAIN_FP64_RTOL = 1e-9
TRAIN_FLOOR = {torch.float32: 2e-2, torch.bfloat16: 1e-1, torch.float16: 5e-2}


def _positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_arguments(p) -> None:
    p.add_argument("--model", default="resnet50",
                   help="torchvision model name, or timm/<name> for a timm model (default: resnet50)")
    p.add_argument("--batch", type=_positive_int, default=8)
    p.add_argument("--size", type=_positive_int, default=224, help="input height and width")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS)
    p.add_argument("--mode", default="infer", choices=("infer", "train"),
                   help="infer (eval BN, inference_mode) or train (one training step: output, gradients, "
                        "running statistics; autocast for fp16/bf16; --backend only picks eval kernels, so "
                        "it does not matter there)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="timed runs of each (default: 10 cpu, 50 cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")


def randomize_bn(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters.

    A freshly built model has mean 0, var 1, weight 1, bias 0: folding those is the identity,
    which would let a wrong fold pass.  Real checkpoints look like this instead.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=generator) * 0.8 + 0.6)
                m.bias.copy_(torch.rand(c, generator=generator) * 0.2 - 0.1)


def build_reference(name: str, seed: int = 0) -> torch.nn.Module:
    """A torchvision model (or ``timm/<name>``, a timm model) with random weights and randomized
    BN statistics (nothing downloaded)."""
    torch.manual_seed(seed)
    try:
        if name.startswith("timm/"):
            import timm

            model = timm.create_model(name[len("timm/"):], pretrained=False)
        else:
            model = torchvision.models.get_model(name, weights=None)
    except ImportError as exc:
        raise ValueError(f"--model {name}: {exc}") from None
    except (RuntimeError, ValueError, KeyError) as exc:  # timm: RuntimeError('Unknown model ...')
        raise ValueError(f"--model {name}: {exc}") from None
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 over the elements where ``ref`` is finite; infinite
    when ``out`` has a NaN or inf anywhere ``ref`` does not have the same one."""
    out, ref = out.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), fin) or not torch.equal(out.isnan(), ref.isnan()) \
            or not torch.equal(out[~fin & ~ref.isnan()], ref[~fin & ~ref.isnan()]):
        return float("inf")
    out, ref = out[fin], ref[fin]
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _train_step(model: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor, amp_dtype) -> torch.Tensor:
    """One training step's forward + backward of ``sum(out * cot)``; returns the output."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = model(x)
    (out.double() * cot).sum().backward()
    return out.detach()


def _worst(named_fused: dict, named_ref: dict, named_ref_p: dict, named_truth: dict, atol: float,
           floor: float) -> dict:
    """The tensor whose error against fp64 uses the largest share of its budget
    ``max(2 * e_ref + atol, floor)``, ``e_ref`` the larger of the reference's two runs."""
    worst = None
    for name, truth in named_truth.items():
        e_ref = max(rel_err(named_ref[name], truth), rel_err(named_ref_p[name], truth))
        e_fused = rel_err(named_fused[name], truth)
        budget = max(2 * e_ref + atol, floor)
        share = e_fused / budget
        if worst is None or share > worst["share"]:
            worst = {"name": name, "rel_err_reference": e_ref, "rel_err_fused": e_fused,
                     "budget": budget, "share": share}
    return worst


def _grads_and_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


def run_check(
    model: str = "resnet50",
    batch: int = 8,
    size: int = 224,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    repeats: int | None = None,
    seed: int = 0,
    progress=None,
    mode: str = "infer",
) -> dict:
    """Run the check and return the results as a dict (what ``--json`` writes)."""
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    for name, v in (("batch", batch), ("size", size)) + ((("repeats", repeats),) if repeats is not None else ()):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available")
    dt = DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    repeats = repeats or (50 if dev.type == "cuda" else 10)
    train = mode == "train"

    ref = build_reference(model, seed)
    ref64 = copy.deepcopy(ref).double().to(dev).train(train)
    # Train: fp32 parameters, autocast to fp16/bf16 (AMP); infer: the model in the dtype.
    amp = dt if train and dt != torch.float32 else None
    ref = ref.to(device=dev, dtype=torch.float32 if train else dt).train(train)
    fused = convert(copy.deepcopy(ref), backend=backend)
    if not any(type(m) in _FUSED_CLASSES for m in fused.modules()):
        raise ValueError(f"--model {model}: it has no torchvision or timm ResNet block or stem that fusedres converts")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(dev)
    xin = x if train else x.to(dt)
    extra = {}

    if train:
        cot = torch.randn(batch, ref.fc.out_features if hasattr(ref, "fc") else 1, generator=gen,
                          dtype=torch.float64).to(dev)
        # One step each from the same initial state; a second reference on the perturbed input.
        ref_p = copy.deepcopy(ref).to(memory_format=torch.channels_last)
        x_p = (xin * (1 + torch.finfo(dt).eps)).contiguous(memory_format=torch.channels_last)
        fused64 = convert(copy.deepcopy(ref64), backend=backend)
        ref64_buffers = [b.clone() for b in ref64.buffers()]
        truth = _train_step(ref64, x.double(), cot, None)
        out64 = _train_step(fused64, x.double(), cot, None)
        out_ref = _train_step(ref, xin, cot, amp)
        out_ref_p = _train_step(ref_p, x_p, cot, amp)
        with backends.record() as used:
            out_fused = _train_step(fused, xin, cot, amp)
        models = (fused, ref, ref_p, ref64)
        grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in models]
        bufs = [{n: b for n, b in m.named_buffers() if b.is_floating_point()} for m in models]
        for m in (fused, fused64):
            missing = grads[3].keys() - {n for n, p in m.named_parameters() if p.grad is not None}
            if missing:
                raise RuntimeError(f"fusedres check: no gradient for {sorted(missing)}")
        fp64_errs = [rel_err(out64, truth)]
        fp64_errs += [rel_err(a, b) for a, b in zip(_grads_and_buffers(fused64), _grads_and_buffers(ref64))]
        # How far float64 torchvision moves by itself (channels_last, another summation order): at
        # a few values per channel (batch 2 at 32x32 reaches 1x1 in layer4) it exceeds the floor.
        ref64_p = copy.deepcopy(ref64).to(memory_format=torch.channels_last)
        for b, b0 in zip(ref64_p.buffers(), ref64_buffers):  # the state before ref64's step
            b.copy_(b0)
        truth_p = _train_step(ref64_p, x.double().contiguous(memory_format=torch.channels_last), cot, None)
        spread = [rel_err(truth_p, truth)]
        spread += [rel_err(a, b) for a, b in zip(_grads_and_buffers(ref64_p), _grads_and_buffers(ref64))]
        fp64_rtol = max(TRAIN_FP64_RTOL, 2 * max(spread))
        extra = {"grads": _worst(*grads, ATOL[dt], TRAIN_FLOOR[dt]),
                 "buffers": _worst(*bufs, ATOL[dt], 0.0),  # forward statistics: well conditioned
                 "fp64_rel_err": max(fp64_errs), "fp64_rtol": fp64_rtol,
                 "fp64_reference_spread": max(spread)}
        fns = {name: (lambda inp, m=m: _train_step(m, inp, cot, amp)) for name, m in (("reference", ref),
                                                                                     ("fused", fused))}
        stats, errors = time_interleaved(fns, [xin], dev, repeats, warmup=2, on_round=progress)
    else:
        with torch.inference_mode():
            truth = ref64(x.double())
            out_ref = ref(xin)
            with backends.record() as used:
                out_fused = fused(xin)
            stats, errors = time_interleaved(
                {"reference": ref, "fused": fused}, [xin], dev, repeats, warmup=2, on_round=progress
            )
    if errors:
        raise RuntimeError(f"fusedres check: timing failed: {errors}")
    times = {name: st.median for name, st in stats.items()}
    err_ref = rel_err(out_ref, truth)
    if train:
        err_ref = max(err_ref, rel_err(out_ref_p, truth))
    err_fused = rel_err(out_fused, truth)
    budget = 2 * err_ref + ATOL[dt]
    diff = (out_fused.double() - out_ref.double()).abs()
    ok = err_fused <= budget
    if train:
        ok = ok and extra["grads"]["share"] <= 1 and extra["buffers"]["share"] <= 1
        ok = ok and extra["fp64_rel_err"] <= extra["fp64_rtol"]
    env = environment(dev)
    verdict = None
    if err_ref == float("inf"):  # an infinite budget would pass anything
        ok, verdict = False, "torchvision's own output has NaN or inf where float64 does not: nothing to judge against"
    elif not {u for u in used if u != "reference" and (train or not u.startswith("train:"))}:
        # "reference": a fallback to torchvision's forward, announced; judging that would compare torchvision with itself
        ok, verdict = False, "no fused op ran: every converted module fell back to torchvision's forward"
    return {
        "model": model,
        "mode": mode,
        "batch": batch,
        "size": size,
        "device": str(dev),
        "device_name": device_info(dev)["name"],
        "dtype": str(dt).replace("torch.", ""),
        "backend": backend,
        "backends_available": backends.available(),
        "backends_used": sorted(used),
        "max_abs_err_vs_reference": diff.max().item() if diff.numel() else 0.0,
        "max_rel_err_vs_reference": (diff.max() / out_ref.double().abs().max().clamp_min(1e-30)).item()
        if diff.numel() else 0.0,
        "rel_err_reference_vs_fp64": err_ref,
        "rel_err_fused_vs_fp64": err_fused,
        "rel_err_budget": budget,
        **extra,
        "numerics_ok": bool(ok),
        "verdict": verdict,
        "time_reference_ms": times["reference"] * 1e3,
        "time_fused_ms": times["fused"] * 1e3,
        "speedup": times["reference"] / times["fused"],
        "repeats": repeats,
        # Where, when and with what it ran (the bench results' provenance fields).
        **{k: env[k] for k in ("date", "versions", "git", "host")},
    }


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    what = "training step" if res["mode"] == "train" else "inference"
    t = Table(title=f"fusedres check ({what}): {res['model']} batch {res['batch']} {res['size']}x{res['size']} "
                    f"{res['dtype']} on {res['device']} ({res['device_name']})")
    for col in ("what", "value"):
        t.add_column(col)
    t.add_row("backend asked / used", f"{res['backend']} / {', '.join(res['backends_used']) or '-'}")
    t.add_row("max abs err vs torchvision", f"{res['max_abs_err_vs_reference']:.3e}")
    t.add_row("max rel err vs torchvision", f"{res['max_rel_err_vs_reference']:.3e}")
    t.add_row("rel err vs fp64: torchvision / fused (budget)",
              f"{res['rel_err_reference_vs_fp64']:.2e} / {res['rel_err_fused_vs_fp64']:.2e} ({res['rel_err_budget']:.2e})")
    if "fp64_rel_err" in res:
        t.add_row("float64 step, fused vs torchvision: worst rel err (tolerance)",
                  f"{res['fp64_rel_err']:.2e} ({res['fp64_rtol']:.0e})")
    for key, label in (("grads", "gradient"), ("buffers", "running statistic")):
        if key in res:
            w = res[key]
            t.add_row(f"worst {label} ({w['name']}): rel err vs fp64, torchvision / fused (budget)",
                      f"{w['rel_err_reference']:.2e} / {w['rel_err_fused']:.2e} ({w['budget']:.2e})")
    t.add_row("numerics", "[green]OK[/green]" if res["numerics_ok"] else "[red]FAIL[/red]")
    t.add_row("time per batch: torchvision", f"{res['time_reference_ms']:.2f} ms")
    t.add_row("time per batch: fused", f"{res['time_fused_ms']:.2f} ms")
    t.add_row("speedup", f"{res['speedup']:.2f}x (median of {res['repeats']})")
    Console().print(t)


def run(args) -> int:
    from rich.progress import Progress

    kwargs = dict(model=args.model, batch=args.batch, size=args.size, device=args.device, dtype=args.dtype,
                  backend=args.backend, repeats=args.repeats, seed=args.seed, mode=args.mode)
    if args.json_path and not os.path.isdir(os.path.dirname(os.path.abspath(args.json_path))):
        print(f"fusedres check: --json {args.json_path}: its directory does not exist", file=sys.stderr)
        return 2
    with Progress(transient=True) as bar:
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        task = bar.add_task("timing", total=args.repeats or (50 if dev.startswith("cuda") else 10))
        try:
            res = run_check(**kwargs, progress=lambda: bar.advance(task))
        except (ValueError, backends.BackendUnavailableError) as e:  # a bad argument: one line, no traceback
            bar.stop()
            print(f"fusedres check: {e}", file=sys.stderr)
            return 2
    _print_table(res)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(res, f, indent=2)
    if not res["numerics_ok"]:
        print("fusedres check: numerics FAILED" + (f" ({res['verdict']})" if res["verdict"] else ""), file=sys.stderr)
        return 1
    return 0

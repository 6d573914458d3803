"""Timing: contenders measured round-robin on rotated inputs, reported as median and spread.

Methodology (the same loop on both devices, only the clock differs):

* every contender is warmed up first (the first call, which compiles, is made and timed
  separately by the runner, so ``warmup`` here only settles caches and autotuners);
* each round times every contender once, in an order rotated by one per round, so drift of
  the machine (clock boost, other processes, thermal state) is spread evenly over all of them
  and no contender is always first after a cache flush;
* round ``r`` feeds input set ``r % len(inputs)``: several distinct input tensors so that an
  input left in cache by the previous call does not flatter the next one;
* GPU: each call is bracketed by CUDA events and preceded by overwriting a 256 MB buffer
  (larger than any current L2), the method ``triton.testing.do_bench`` uses, so every call
  starts from a cold L2.  Each contender's turn in a round starts with a synchronisation,
  so it starts on an idle GPU: without it a contender that is slow on the host hides behind
  the queue of work the previous contender left, and its host overhead goes unreported
  (H100, 2026-11-27: the Triton-backend ResNet-50 needed about 16 ms of host time per
  forward at batch 256, yet timed 14.6 ms right behind eager's 19.8 ms of queued work).
  Two modes (:data:`TIMING_MODES`):

  - ``pipelined`` (default; ``do_bench``'s semantics): a turn is :data:`BURST` calls back
    to back, with no synchronisation between them.  The events measure each call's span
    on the device, including any time the GPU waits for the host, so a host-bound
    contender shows its host time and a GPU-bound one its GPU time: steady-state cost
    per call, as inside a model or a serving loop.  (The flush before each call, about
    80 us of GPU time for 256 MB on an H100, lets that much host time per call go unseen,
    as in ``do_bench``.)
  - ``isolated``: a turn is one call, synchronised after the flush, so the events also
    include the host time up to the call's first launch: the latency of one call on an
    idle GPU.  Pessimistic for sub-millisecond blocks with Python-heavy launch paths (the
    H100 run of 2026-11-27 used this mode);

* CPU: ``time.perf_counter`` around each call (PyTorch CPU ops are synchronous), and each
  call starts only when no thread of this process is still running (:func:`wait_until_idle`):
  thread pools keep spinning after a call returns, ONNX Runtime's for about 45 ms and
  OpenMP's for about 10 ms (2-core AMD EPYC, 2026-12-01), and that spinning takes cores
  from whichever contender runs next.  Without the wait, fusedres's ResNet-50 b8 forward
  timed 358 ms right after ONNX Runtime's against 321 ms alone (and 321.5 ms after a
  200 ms pause): each contender is timed as if it ran alone, as it would in deployment.

The result per contender is the median and the 20th/80th percentiles of all timed calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

# Larger than the L2 of any current GPU (H100: 50 MB, B200: 126 MB); what do_bench flushes.
_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Stats:
    """Seconds per call: median, 20th/80th percentiles and minimum of ``n`` timed calls."""

    median: float
    p20: float
    p80: float
    n: int
    min: float

    @classmethod
    def of(cls, samples) -> Stats:
        a = np.asarray(samples, dtype=np.float64)
        if a.size == 0:
            raise ValueError("samples must not be empty")
        p20, med, p80 = np.percentile(a, [20, 50, 80])
        return cls(float(med), float(p20), float(p80), int(a.size), float(a.min()))


def wait_until_idle(poll: float = 0.005, busy: float = 0.05, timeout: float = 0.5) -> float:
    """Sleep until this process's threads are idle: less than ``busy`` of one core used over a
    ``poll``-second window (process CPU time, all threads), at most ``timeout`` seconds.

    Returns the seconds waited.  Another contender's spinning thread pool would otherwise
    run during the next timed call (see the module docstring).
    """
    start = t0 = time.perf_counter()
    c0 = time.process_time()
    while True:
        time.sleep(poll)
        t1, c1 = time.perf_counter(), time.process_time()
        if (c1 - c0) < busy * (t1 - t0) or t1 - start >= timeout:
            return t1 - start
        t0, c0 = t1, c1


def round_order(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: ``names`` rotated left by ``r``."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: GPU timing modes (see the module docstring).
TIMING_MODES = ("pipelined", "isolated")
#: Calls per contender turn in ``pipelined`` mode.
BURST = 5


def _gpu_rounds(names, inputs, repeats, mode, call, *, alive, sync, flush, event, on_round=None):
    """The GPU timing loop: ``repeats`` timed calls per contender, in rotated turns.

    ``call(name, x)`` runs one call (and drops a contender that raised: ``alive(name)``
    turns false); ``sync``, ``flush`` and ``event`` are the device hooks (injected so the
    loop's order of operations is testable without a GPU).  Returns seconds per call.
    """
    if mode not in TIMING_MODES:
        raise ValueError(f"timing mode must be one of {TIMING_MODES}, got {mode!r}")
    burst = BURST if mode == "pipelined" else 1
    pending: dict[str, list] = {n: [] for n in names}
    done = 0
    r = 0
    while done < repeats:
        n_calls = min(burst, repeats - done)
        for name in round_order([n for n in names if alive(n)], r):
            sync()  # every turn starts on an idle GPU: no hiding behind another's queue
            for i in range(n_calls):
                x = inputs[(done + i) % len(inputs)]
                flush()
                if mode == "isolated":
                    sync()  # and the call's host time to its first launch is timed too
                start, end = event(), event()
                start.record()
                call(name, x)
                end.record()
                if not alive(name):
                    break
                pending[name].append((start, end))
        done += n_calls
        r += 1
        if on_round is not None:
            for _ in range(n_calls):
                on_round()
    sync()
    return {n: [s.elapsed_time(e) / 1e3 for s, e in ev] for n, ev in pending.items() if alive(n)}


def time_interleaved(fns: dict, inputs: list, device: torch.device, repeats: int, warmup: int,
                     on_round=None, mode: str = "pipelined") -> tuple[dict[str, Stats], dict[str, str]]:
    """Time ``fns[name](x)`` for every name, round-robin, ``repeats`` calls each after ``warmup``.

    Args:
        fns: name -> callable taking one input.
        inputs: input sets, rotated per call (``len(inputs) >= 1``).
        on_round: called ``repeats`` times in all as the timing progresses (progress bars).
        mode: GPU timing mode, ``"pipelined"`` or ``"isolated"`` (module docstring); the
            CPU loop is the same in both.

    Returns:
        ``(stats, errors)``: :class:`Stats` per name that ran every round, and for a name
        whose call raised, the error text instead (the others go on without it).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not inputs:
        raise ValueError("inputs must hold at least one input set")
    live = dict(fns)
    errors: dict[str, str] = {}

    def call(name, x):
        try:
            return live[name](x)
        except Exception as exc:  # one contender failing must not end the run
            errors[name] = f"{type(exc).__name__}: {exc}"
            del live[name]
            return None

    for i in range(warmup):
        for name in list(live):
            call(name, inputs[i % len(inputs)])
    sync(device)

    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        samples = _gpu_rounds(
            list(live), inputs, repeats, mode, call, alive=lambda n: n in live,
            sync=lambda: torch.cuda.synchronize(device), flush=flush.zero_,
            event=lambda: torch.cuda.Event(enable_timing=True), on_round=on_round,
        )
    else:
        samples = {n: [] for n in live}
        for r in range(repeats):
            x = inputs[r % len(inputs)]
            for name in round_order(list(live), r):
                wait_until_idle()
                t0 = time.perf_counter()
                call(name, x)
                dt = time.perf_counter() - t0
                if name in live:
                    samples[name].append(dt)
            if on_round is not None:
                on_round()
    return {n: Stats.of(s) for n, s in samples.items() if n in live}, errors


def time_once(fn, device: torch.device) -> tuple[object, float]:
    """Run ``fn()`` once and return ``(result, wall seconds)``, synchronised on both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def time_graph_replay(fn, x: torch.Tensor, device: torch.device, reps: int = 20) -> float:
    """GPU seconds of ``fn(x)``'s kernels alone: the call captured once in a CUDA graph, then the
    graph replayed ``reps`` times (each after an L2 flush, as the timed calls); the median.

    No host time is in it, whatever the call's Python costs: the figure a contender would reach
    with its host path taken out of the loop (``fusedres.cuda_graphs``, ``reduce-overhead``).
    Raises what the capture raises (a contender that cannot be captured)."""
    if device.type != "cuda":
        raise ValueError("graph replay timing needs a CUDA device")
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn(x)  # warm: nothing that the capture cannot do (allocations, autotuning) is left for it
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize(device)
    return Stats.of([s.elapsed_time(e) / 1e3 for s, e in times]).median

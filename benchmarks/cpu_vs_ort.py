"""Where the CPU time goes, fusedres (``cpu`` backend) against ONNX Runtime, conv by conv.

    python benchmarks/cpu_vs_ort.py [--model resnet50,resnet18] [--batch 1,8] [--rounds 15] [--size 224] [--json F]

For a torchvision model (fp32, NCHW input, eval, 2 threads on this machine) this measures, in one
process, after warm-up, the two sides in alternate rounds, each call started with the process's
threads idle (``fusedres.bench.timing.wait_until_idle``: a thread pool still spinning from the
other side's call would take the cores):

* ORT: every node's kernel time from ONNX Runtime's own profiler (``SessionOptions.enable_profiling``,
  all graph optimisations on, intra-op spinning off so that its threads do not take the cores from
  the next measurement), the Conv nodes mapped back to the torchvision convs whose output they
  compute (a fused Conv+Add+ReLU node counts as its conv), and the whole ``run`` call;
* fusedres: every oneDNN call the converted model makes (``mkldnn::_convolution_pointwise`` and
  its in-place form, timed around the call, so including PyTorch's dispatch and oneDNN's
  primitive lookup), the whole forward, and the forward with every oneDNN call replaced by a
  stub returning a recorded output: everything that is not a conv (ReLU passes, residual adds,
  pooling, the classifier, the Python path, the fold checks).

Per conv shape (``C_in->C_out kK sS @HxW``, summed over the convs of that shape): fusedres
milliseconds, ORT milliseconds and ORT/fusedres (above 1: fusedres's kernel is faster).  Totals:
the conv sums, the wall times and what is not a conv (fusedres: the stubbed forward; ORT: its
``run`` minus its nodes' kernel times).  Medians over ``--rounds`` rounds.  Issue 16's
"profile both per op".
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fusedres  # noqa: E402
from fusedres.bench import report, timing  # noqa: E402


def conv_order(model) -> list[str]:
    """The torchvision conv names in the order the converted model calls oneDNN: the stem, then per
    block its convs, the downsample right before the block's last conv (the ``cpu`` block tail)."""
    order = ["conv1"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model, stage)):
            convs = [n for n in ("conv1", "conv2", "conv3") if hasattr(blk, n)]
            order += [f"{stage}.{i}.{c}" for c in convs[:-1]]
            if blk.downsample is not None:
                order.append(f"{stage}.{i}.downsample.0")
            order.append(f"{stage}.{i}.{convs[-1]}")
    return order


def _ort_conv_name(node: str, block_convs: dict) -> str:
    """The torchvision conv of an ORT Conv node, from the node's name (its output's: the ONNX export
    names values after the module that made them, e.g. ``/layer1/layer1.0/relu_1/Relu_output_0``)."""
    parts = node.split("_output_0")[0].strip("/").split("/")[:-1]  # drop the op part
    if len(parts) >= 2 and parts[0].startswith("layer"):
        parts = parts[1:]  # "/layer1/layer1.0/..." -> "layer1.0/..."
    path = ".".join(parts).replace("downsample.downsample.0", "downsample.0")
    block, _, last = path.rpartition(".")
    if last.startswith("relu"):  # a Conv+ReLU node named after the ReLU: the block's k-th ReLU is conv k's
        k = 0 if last == "relu" else int(last.split("_")[1])
        convs = block_convs.get(block, ["conv1"])
        return f"{block}.{convs[k]}" if block else convs[k]
    return path


def _ort_session(model, x, prefix: str):
    """An ONNX Runtime session of ``model`` exported for ``x``, profiling into ``prefix``; and its run."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return sess, lambda: sess.run(None, feed)


def _ort_profile(sess, model, warmup: int) -> tuple[dict, float]:
    """Per torchvision conv, the median kernel time (ms) of its ORT Conv node; and of the whole run."""
    events = json.loads(Path(sess.end_profiling()).read_text())
    block_convs = {}
    for name, mod in model.named_modules():
        convs = [n for n in ("conv1", "conv2", "conv3") if hasattr(mod, n) and hasattr(mod, "downsample")]
        if convs:
            block_convs[name] = convs
    per, runs = collections.defaultdict(list), []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"].get("op_name") == "Conv":
            per[_ort_conv_name(e["name"], block_convs)].append(e["dur"] / 1e3)
        elif e.get("name") == "model_run":
            runs.append(e["dur"] / 1e3)
    return {k: statistics.median(v[warmup:]) for k, v in per.items()}, statistics.median(runs[warmup:])


class _Timed:
    """Stands in for a ``torch.ops.mkldnn`` op: times each call, or (``stub``) returns the outputs
    recorded in the timed rounds instead of computing."""

    def __init__(self, op, log, stub=None):
        self.op, self.log, self.stub = op, log, stub

    def __call__(self, *args):
        if self.stub is not None:
            return self.stub.pop(0)
        t = time.perf_counter()
        out = self.op(*args)
        self.log.append((time.perf_counter() - t, out))
        return out

    @property
    def binary(self):
        return _Timed(self.op.binary, self.log, self.stub)


class _FusedRounds:
    """The converted model's three timings per round: every oneDNN call, the plain forward, and the
    forward with every oneDNN call stubbed (returning that round's recorded outputs)."""

    def __init__(self, model, x, n_convs: int):
        self.fused, self.x, self.n = fusedres.convert(model), x, n_convs
        self.log, self.walls, self.stubbed = [], [], []

    def __call__(self, timed: bool) -> None:
        ns = torch.ops.mkldnn
        real = ns._convolution_pointwise, ns._convolution_pointwise_
        try:
            with torch.inference_mode():
                if not timed:
                    self.fused(self.x)
                    return
                ns._convolution_pointwise, ns._convolution_pointwise_ = (_Timed(op, self.log) for op in real)
                self.fused(self.x)
                outs = [o for _, o in self.log[-self.n:]]
                ns._convolution_pointwise, ns._convolution_pointwise_ = real
                timing.wait_until_idle()
                t = time.perf_counter()
                self.fused(self.x)
                self.walls.append(time.perf_counter() - t)
                stub = list(outs)  # one list for both ops: they pop the outputs in call order
                ns._convolution_pointwise, ns._convolution_pointwise_ = (_Timed(op, self.log, stub) for op in real)
                timing.wait_until_idle()
                t = time.perf_counter()
                self.fused(self.x)
                self.stubbed.append(time.perf_counter() - t)
                if stub:
                    raise RuntimeError(f"the stubbed forward made {len(stub)} oneDNN calls fewer than the timed one")
        finally:
            ns._convolution_pointwise, ns._convolution_pointwise_ = real

    def result(self) -> tuple[list, float, float]:
        """(per call-position median ms, forward median ms, stubbed-forward median ms)."""
        rounds = len(self.walls)
        if len(self.log) != rounds * self.n:
            raise RuntimeError(f"expected {self.n} oneDNN calls per forward, got {len(self.log) / rounds}")
        per = [statistics.median(self.log[r * self.n + i][0] for r in range(rounds)) * 1e3 for i in range(self.n)]
        return per, statistics.median(self.walls) * 1e3, statistics.median(self.stubbed) * 1e3


def measure(name: str, batch: int, rounds: int, warmup: int, tmp: str, size: int = 224) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(batch, 3, size, size)
    order = conv_order(model)
    fused = _FusedRounds(model, x, len(order))
    sess, run_ort = _ort_session(model, x, tmp)
    for r in range(warmup + rounds):  # the two interleaved, each started on idle threads
        timing.wait_until_idle()
        fused(timed=r >= warmup)
        timing.wait_until_idle()
        run_ort()
    ours, wall, stub = fused.result()
    ort_conv, ort_wall = _ort_profile(sess, model, warmup)
    missing = set(order) ^ set(ort_conv)
    if missing:
        raise RuntimeError(f"ORT Conv nodes not matched to convs one to one: {sorted(missing)[:6]}")
    mods = dict(model.named_modules())
    groups: dict = {}
    for conv_name, ms in zip(order, ours):
        c = mods[conv_name]
        key = f"{c.in_channels}->{c.out_channels} k{c.kernel_size[0]} s{c.stride[0]}"
        g = groups.setdefault(key, {"shape": key, "convs": 0, "fusedres_ms": 0.0, "ort_ms": 0.0})
        g["convs"] += 1
        g["fusedres_ms"] += ms
        g["ort_ms"] += ort_conv[conv_name]
    rows = sorted(groups.values(), key=lambda g: g["ort_ms"] - g["fusedres_ms"])
    for g in rows:
        g["ort_over_fusedres"] = g["ort_ms"] / g["fusedres_ms"]
    conv_f, conv_o = sum(ours), sum(ort_conv.values())
    return {
        "model": name, "batch": batch, "size": size, "rounds": rounds, "per_shape": rows,
        "fusedres": {"conv_ms": conv_f, "forward_ms": wall, "not_conv_ms": stub},
        "ort": {"conv_ms": conv_o, "run_ms": ort_wall, "not_conv_ms": ort_wall - conv_o},
        "ort_speed_over_fusedres": wall / ort_wall,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50,resnet18")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="input image side")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import tempfile

    result = report.tool_result("fusedres-cpu-vs-ort/1", {"rounds": args.rounds, "warmup": args.warmup})
    result["runs"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model.split(","):
            for b in (int(v) for v in args.batch.split(",")):
                r = measure(name, b, args.rounds, args.warmup, f"{tmp}/ort_{name}_{b}", args.size)
                result["runs"].append(r)
                f, o = r["fusedres"], r["ort"]
                print(f"{name} batch {b}: forward {f['forward_ms']:.1f} ms (convs {f['conv_ms']:.1f}, not convs "
                      f"{f['not_conv_ms']:.1f}); ORT run {o['run_ms']:.1f} ms (convs {o['conv_ms']:.1f}, not convs "
                      f"{o['not_conv_ms']:.1f}); fusedres at {1 / r['ort_speed_over_fusedres']:.2f}x ORT's speed")
                for g in r["per_shape"]:
                    print(f"  {g['shape']:<22} x{g['convs']:<2} fusedres {g['fusedres_ms']:8.2f}  ORT {g['ort_ms']:8.2f}"
                          f"  ORT/fusedres {g['ort_over_fusedres']:.2f}")
    report.finish_tool_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

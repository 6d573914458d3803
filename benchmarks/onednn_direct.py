"""What calling oneDNN directly (cached primitives, no per-call setup) would buy the ``cpu`` backend.

    pip download --no-deps -d /tmp/odn onednn-cpu-gomp onednn-devel-cpu-gomp   # oneDNN 3.2 (2023.2.0)
    cd /tmp/odn && for f in *.whl; do unzip -qo $f -d x; done
    python benchmarks/onednn_direct.py --onednn /tmp/odn/x [--batch 1,8] [--rounds 9] [--json F]

The ``cpu`` backend calls oneDNN through ``torch.ops.mkldnn._convolution_pointwise``, which builds
oneDNN's primitive descriptor on every call (libtorch exports no oneDNN symbols to cache primitives
against, and its own prepacked path was slower).  Issue 16 asks whether that per-call cost, or
oneDNN's blocked activation layout (``nChw16c``, what ONNX Runtime's NCHWc kernels use), is what
keeps fusedres behind ONNX Runtime on CPU.  This probe builds a small C++ module against a separate
oneDNN (PyPI's ``onednn-cpu-gomp`` runtime, same GNU OpenMP as torch, and its ``-devel`` headers;
the two oneDNN copies do not share symbols) and measures, for torchvision's ResNet-50 (fp32, 2
threads on this machine):

* per conv, in isolation (same buffers every call, medians): torch's call with the prepacked filter
  the backend uses, a cached primitive on channels_last (NHWC) tensors, and the same on blocked
  ``nChw16c`` tensors (not the 3-channel stem);
* the whole model, interleaved rounds on idle threads: the converted model as shipped, the same
  with every plain fp32 conv of the backend routed to cached NHWC primitives (same folded filters
  and biases, same residual adds and ReLU passes), and ONNX Runtime on the exported model.

A measurement tool, not part of the package: nothing in ``fusedres`` depends on this oneDNN.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fusedres  # noqa: E402
from fusedres.backends import cpu as cpu_backend  # noqa: E402
from fusedres.bench import report, timing  # noqa: E402

_SRC = r"""
#include <torch/extension.h>
#include <oneapi/dnnl/dnnl.hpp>
#include <memory>
#include <vector>
using namespace dnnl;
static engine& eng() { static engine e(engine::kind::cpu, 0); return e; }
static stream& strm() { static stream s(eng()); return s; }
struct Conv { convolution_forward prim; memory weights, bias; memory::desc src, dst; };
static std::vector<std::unique_ptr<Conv>> convs;

// A cached fp32 convolution (groups 1, dilation 1): weight OIHW values in any torch layout, bias [O].
// blocked: src (when C_in % 16 == 0) and dst are nChw16c, else NHWC.  sum: dst += conv (oneDNN's sum post-op).
int64_t make(at::Tensor w, at::Tensor b, int64_t n, int64_t h, int64_t wd, int64_t stride, int64_t pad,
             bool blocked, bool sum) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 4 && w.size(2) == w.size(3), "weight: fp32 OIHW square");
  int64_t o = w.size(0), i = w.size(1), k = w.size(2);
  int64_t oh = (h + 2 * pad - k) / stride + 1, ow = (wd + 2 * pad - k) / stride + 1;
  auto nhwc = memory::format_tag::nhwc, blk = memory::format_tag::nChw16c;
  memory::desc src({n, i, h, wd}, memory::data_type::f32, blocked && i % 16 == 0 ? blk : nhwc);
  memory::desc dst({n, o, oh, ow}, memory::data_type::f32, blocked ? blk : nhwc);
  memory::desc wdesc({o, i, k, k}, memory::data_type::f32, memory::format_tag::any);
  memory::desc bdesc({o}, memory::data_type::f32, memory::format_tag::a);
  post_ops po;
  if (sum) po.append_sum(1.f);
  primitive_attr attr;
  attr.set_post_ops(po);
  auto pd = convolution_forward::primitive_desc(eng(), prop_kind::forward_inference, algorithm::convolution_direct,
                                                src, wdesc, bdesc, dst, {stride, stride}, {pad, pad}, {pad, pad}, attr);
  auto c = std::make_unique<Conv>();
  c->prim = convolution_forward(pd);
  auto wc = w.contiguous(at::MemoryFormat::ChannelsLast);
  memory plain({{o, i, k, k}, memory::data_type::f32, memory::format_tag::ohwi}, eng(), wc.data_ptr());
  c->weights = memory(pd.weights_desc(), eng());
  reorder(plain, c->weights).execute(strm(), plain, c->weights);
  auto bc = b.contiguous();
  c->bias = memory(bdesc, eng());
  std::memcpy(c->bias.get_data_handle(), bc.data_ptr(), o * sizeof(float));
  c->src = pd.src_desc();
  c->dst = pd.dst_desc();
  convs.push_back(std::move(c));
  return static_cast<int64_t>(convs.size()) - 1;
}

void run(int64_t id, at::Tensor x, at::Tensor y) {
  auto& c = *convs.at(id);
  memory s(c.src, eng(), x.data_ptr()), d(c.dst, eng(), y.data_ptr());
  c.prim.execute(strm(), {{DNNL_ARG_SRC, s}, {DNNL_ARG_WEIGHTS, c.weights}, {DNNL_ARG_BIAS, c.bias},
                          {DNNL_ARG_DST, d}});
}

std::string onednn_version() {
  auto v = dnnl::version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("make", &make);
  m.def("run", &run);
  m.def("version", &onednn_version);
}
"""


def build(prefix: Path, tmp: str):
    from torch.utils.cpp_extension import load

    inc = sorted(prefix.glob("**/include/oneapi/dnnl/dnnl.hpp"))
    lib = sorted(prefix.glob("**/lib/libdnnl.so.3"))
    if not inc or not lib:
        raise SystemExit(f"--onednn {prefix}: no include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so.3 under it")
    src = Path(tmp) / "onednn_direct.cpp"
    src.write_text(_SRC)
    libdir = lib[0].parent
    return load("fusedres_onednn_direct", [str(src)], extra_include_paths=[str(inc[0].parents[2])],
                extra_ldflags=[f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}"], build_directory=tmp)


def _median_ms(fn, rounds: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def per_conv(dn, batch: int, rounds: int) -> list[dict]:
    model = torchvision.models.resnet50().eval()
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((m, tuple(i[0].shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    rows = []
    for conv, (_, c, h, w) in shapes:
        x = torch.randn(batch, c, h, w).contiguous(memory_format=torch.channels_last)
        wt = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        b = torch.randn(wt.shape[0])
        s, p = conv.stride[0], conv.padding[0]
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(wt.to_mkldnn(), [p, p], [s, s], [1, 1], 1, list(x.shape))

        def torch_call():
            return torch.ops.mkldnn._convolution_pointwise(x, packed, b, [p, p], [s, s], [1, 1], 1, "none", [], "")

        y = torch_call()
        row = {"conv": f"{c}->{wt.shape[0]} k{wt.shape[2]} s{s} @{h}", "torch_ms": _median_ms(torch_call, rounds)}
        direct = dn.make(wt, b, batch, h, w, s, p, False, False)
        y_direct = torch.empty_like(y)
        row["direct_nhwc_ms"] = _median_ms(lambda: dn.run(direct, x, y_direct), rounds)
        row["max_abs_diff"] = (y_direct - y).abs().max().item()
        if c % 16 == 0:
            blocked = dn.make(wt, b, batch, h, w, s, p, True, False)
            xb, yb = torch.randn(x.numel()), torch.empty(y.numel())  # nChw16c buffers (C % 16 == 0)
            row["direct_blocked_ms"] = _median_ms(lambda: dn.run(blocked, xb, yb), rounds)
        rows.append(row)
    return rows


class _Direct:
    """The backend's ``_conv`` / ``_conv_into`` with each plain fp32 conv (groups 1, dilation 1,
    an ordinary fold) run by a cached primitive instead of torch's call; everything else as shipped."""

    def __init__(self, dn):
        self.dn, self.prims = dn, {}
        self.conv, self.conv_into = cpu_backend._conv, cpu_backend._conv_into

    def _prim(self, x, fold, stride, padding, into: bool):
        key = (id(fold), tuple(x.shape), into)
        hit = self.prims.get(key)
        if hit is None:
            w = fold.weight
            n, _, h, wd = x.shape
            k = w.shape[2]
            oh, ow = (h + 2 * padding[0] - k) // stride[0] + 1, (wd + 2 * padding[1] - k) // stride[1] + 1
            hit = self.prims[key] = (fold, self.dn.make(w, fold.bias, n, h, wd, stride[0], padding[0], False, into),
                                     (n, w.shape[0], oh, ow))
        return hit[1:]

    @staticmethod
    def _plain(x, fold, stride, padding, dilation, groups):
        return (x.dtype == torch.float32 and fold.affine is None and groups == 1 and tuple(dilation) == (1, 1)
                and stride[0] == stride[1] and padding[0] == padding[1] and fold.weight.shape[2] == fold.weight.shape[3])

    def _conv_impl(self, x, fold, stride, padding, dilation, groups, residual, relu):
        if not self._plain(x, fold, stride, padding, dilation, groups):
            return self.conv(x, fold, stride, padding, dilation, groups, residual, relu)
        x = x.contiguous(memory_format=torch.channels_last)
        prim, shape = self._prim(x, fold, stride, padding, False)
        out = torch.empty(shape, memory_format=torch.channels_last)
        self.dn.run(prim, x, out)
        if residual is not None:
            out.add_(residual)
        return out.relu_() if relu else out

    def _conv_into_impl(self, acc, x, fold, stride, padding, dilation, groups, relu):
        if not self._plain(x, fold, stride, padding, dilation, groups):
            return self.conv_into(acc, x, fold, stride, padding, dilation, groups, relu)
        x = x.contiguous(memory_format=torch.channels_last)
        prim, _ = self._prim(x, fold, stride, padding, True)
        self.dn.run(prim, x, acc)
        return acc.relu_() if relu else acc

    def __call__(self, on: bool) -> None:
        cpu_backend._conv, cpu_backend._conv_into = (self._conv_impl, self._conv_into_impl) if on \
            else (self.conv, self.conv_into)


def whole_model(dn, batch: int, rounds: int, tmp: str) -> dict:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, buf, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    fused = fusedres.convert(model)
    direct = _Direct(dn)
    times = {"fusedres": [], "fusedres_direct": [], "ort": []}
    errs = {}
    try:
        with torch.inference_mode():
            for on in (False, True):
                direct(on)
                errs["fusedres_direct" if on else "fusedres"] = (fused(x) - ref).abs().max().item()
            for r in range(rounds + 2):
                for name in times:
                    if name != "ort":
                        direct(name == "fusedres_direct")
                    fn = (lambda: sess.run(None, feed)) if name == "ort" else (lambda: fused(x))
                    timing.wait_until_idle()
                    t = time.perf_counter()
                    fn()
                    if r >= 2:
                        times[name].append(time.perf_counter() - t)
    finally:
        direct(False)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"batch": batch, "rounds": rounds, "median_ms": med, "max_abs_err_vs_torchvision": errs,
            "speed_vs_ort": {k: med["ort"] / med[k] for k in ("fusedres", "fusedres_direct")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onednn", required=True, type=Path, help="a prefix holding oneDNN's include/ and lib/")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json")
    args = p.parse_args(argv)
    result = report.tool_result("fusedres-onednn-direct/1", {"rounds": args.rounds})
    result["per_conv"], result["model"] = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        dn = build(args.onednn, tmp)
        result["versions"]["onednn_direct"] = dn.version()
        for b in (int(v) for v in args.batch.split(",")):
            rows = per_conv(dn, b, args.rounds)
            result["per_conv"][str(b)] = rows
            tot = {k: sum(r.get(k, 0.0) for r in rows[1:]) for k in ("torch_ms", "direct_nhwc_ms", "direct_blocked_ms")}
            print(f"batch {b}, ResNet-50's {len(rows)} convs in isolation: torch {rows[0]['torch_ms'] + tot['torch_ms']:.1f} ms, "
                  f"direct NHWC {rows[0]['direct_nhwc_ms'] + tot['direct_nhwc_ms']:.1f} ms; without the stem: torch "
                  f"{tot['torch_ms']:.1f}, NHWC {tot['direct_nhwc_ms']:.1f}, nChw16c {tot['direct_blocked_ms']:.1f} ms")
            m = whole_model(dn, b, args.rounds, tmp)
            result["model"].append(m)
            md, sp = m["median_ms"], m["speed_vs_ort"]
            print(f"batch {b}, whole ResNet-50: fusedres {md['fusedres']:.1f} ms ({sp['fusedres']:.3f}x ORT), with direct "
                  f"primitives {md['fusedres_direct']:.1f} ms ({sp['fusedres_direct']:.3f}x ORT), ORT {md['ort']:.1f} ms")
    report.finish_tool_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

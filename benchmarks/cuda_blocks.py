"""Time torchvision ResNet-18/50 blocks: eager vs fusedres with the ``cuda`` backend.

Each block is taken from a real torchvision model (eval mode, bf16, channels_last, BN
statistics randomised so the fold is not an identity), run eagerly and after
``fusedres.convert(block, backend=...)``, timed with ``triton.testing.do_bench``
(median, 20th and 80th percentiles, in ms) in the same process, and checked against
eager before timing.  Writes ``benchmarks/results/cuda_blocks_<gpu>.json``.

    python benchmarks/cuda_blocks.py [--batch 64 256] [--backends cuda triton] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
from pathlib import Path

import torch
import torchvision

import fusedres
from fusedres import backends

# (model, layer, block index, input channels, input H=W)
BLOCKS = [
    ("resnet18", "layer1", 0, 64, 56),
    ("resnet18", "layer2", 0, 64, 56),
    ("resnet18", "layer3", 0, 128, 28),
    ("resnet18", "layer4", 0, 256, 14),
    ("resnet50", "layer1", 0, 64, 56),
    ("resnet50", "layer1", 1, 256, 56),
    ("resnet50", "layer2", 0, 256, 56),
    ("resnet50", "layer3", 1, 1024, 14),
    ("resnet50", "layer4", 0, 1024, 14),
]


def _randomise_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_blocks: needs a CUDA GPU", file=sys.stderr)
        return 1
    from triton.testing import do_bench

    names = []
    for b in args.backends:
        try:
            backends.get(b)
        except backends.BackendUnavailableError as exc:
            print(f"skipping: {exc}")
        else:
            names.append(b)
    gpu = torch.cuda.get_device_name()
    dtype = torch.bfloat16
    models = {}
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for model_name, layer, idx, cin, hw in BLOCKS:
            if model_name not in models:
                m = getattr(torchvision.models, model_name)(weights=None)
                _randomise_bn(m)
                models[model_name] = m.eval().to("cuda", dtype).to(memory_format=torch.channels_last)
            eager = getattr(models[model_name], layer)[idx]
            fused = {b: fusedres.convert(copy.deepcopy(eager), backend=b) for b in names}
            for n in args.batch:
                x = torch.randn(n, cin, hw, hw, device="cuda", dtype=dtype).contiguous(
                    memory_format=torch.channels_last
                )
                ref = eager(x)
                row = {
                    "block": f"{model_name}.{layer}.{idx}", "batch": n, "in_shape": list(x.shape),
                    "out_shape": list(ref.shape), "dtype": str(dtype),
                }
                q = [0.5, 0.2, 0.8]
                row["eager_ms"] = do_bench(lambda: eager(x), quantiles=q)
                for b, blk in fused.items():
                    out = blk(x)
                    row[f"{b}_max_abs_err_vs_eager"] = (out.float() - ref.float()).abs().max().item()
                    row[f"{b}_ms"] = do_bench(lambda: blk(x), quantiles=q)
                    row[f"{b}_speedup"] = row["eager_ms"][0] / row[f"{b}_ms"][0]
                rows.append(row)
                print(
                    f"{row['block']:<22} N={n:<4} eager {row['eager_ms'][0]:.3f} ms  "
                    + "  ".join(f"{b} {row[f'{b}_ms'][0]:.3f} ms (x{row[f'{b}_speedup']:.2f})" for b in names)
                )
    result = {
        "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
        "timing": "triton.testing.do_bench, [median, p20, p80] ms", "backends": names, "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"cuda_blocks_{re.sub(r'[^A-Za-z0-9]+', '_', gpu)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

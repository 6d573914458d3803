"""``fusedres tune``: autotune the Triton kernels' tiles for some models and write them as a table.

    fusedres tune --model resnet50,resnet18 --batch 256,64 --out tiles.json [--mode infer,train]

Runs each converted model (eval forward, and with ``train`` one training step, bf16 autocast)
on the GPU with the autotuner on, then merges every tile it chose into ``--out`` under the GPU's
arch (``sm90``...).  Copied into ``fusedres/backends/triton/tiles.json``, the table ships with
the package and ``auto`` uses it instead of tuning those shapes (see ``launch.shipped_tile``).
A GPU run of ``scripts/device_check.sh`` writes the same table from its benchmarks
(``FUSEDRES_TRITON_TILES_OUT``), at no extra cost.
"""

from __future__ import annotations

import argparse

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet50,resnet18", help="comma list of torchvision model names")
    p.add_argument("--batch", default="256,64", help="comma list of batch sizes")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--mode", default="infer", help="comma list of infer, train")
    p.add_argument("--out", required=True, help="the tile table to write (merged when it exists)")


def run(args) -> int:
    import torchvision

    from . import convert
    from .backends.triton import launch

    if not torch.cuda.is_available():
        raise SystemExit("fusedres tune: needs a CUDA GPU (it times the Triton kernels)")
    if not launch._autotune_enabled():
        raise SystemExit("fusedres tune: FUSEDRES_TRITON_AUTOTUNE=0 turns the autotuner off")
    dtype = getattr(torch, args.dtype)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    for name in [m.strip() for m in args.model.split(",") if m.strip()]:
        model = torchvision.models.get_model(name, weights=None).cuda().to(memory_format=torch.channels_last)
        convert(model, backend="triton")
        for batch in [int(b) for b in args.batch.split(",")]:
            x = torch.randn(batch, 3, args.size, args.size, device="cuda").contiguous(
                memory_format=torch.channels_last)
            if "infer" in modes:
                with torch.inference_mode():
                    model.to(dtype).eval()(x.to(dtype))
            if "train" in modes:
                model.float().train()
                with torch.autocast("cuda", dtype=dtype if dtype != torch.float32 else torch.bfloat16,
                                    enabled=dtype != torch.float32):
                    model(x).float().sum().backward()
            torch.cuda.synchronize()
            print(f"tuned {name} batch {batch}: {len(launch._tile_cache)} tiles so far", flush=True)
    arch = launch._arch(torch.device("cuda", torch.cuda.current_device()))
    n = launch.dump_tiles(args.out, arch)
    print(f"wrote {n} {arch} tiles to {args.out}")
    return 0

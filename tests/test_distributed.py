"""convert_sync_batchnorm + DistributedDataParallel with gloo on CPU, 2 processes (loopback FileStore).

Each rank runs half of a batch through a fused, synchronised, DDP-wrapped model; the outputs,
DDP-averaged gradients and running statistics must equal those of one process running the
plain torchvision model (ordinary BatchNorm) on the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models import resnet as tv

import fusedres
from helpers import chain_nodes, randomize

WORLD = 2
PER_RANK = 2
STEPS = 2


def _model():
    torch.manual_seed(0)
    return randomize(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10)).train()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * PER_RANK, 3, 48, 40, generator=g)
    cot = torch.randn(WORLD * PER_RANK, 10, generator=g)
    return x, cot


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        model = fusedres.convert_sync_batchnorm(fusedres.convert(_model()))
        ddp = DDP(model)
        result = {"out": [], "grads": [], "chains": []}
        for step in range(STEPS):
            x, cot = _batch(step)
            sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            ddp.zero_grad()
            out = ddp(x[sl])
            result["chains"].append(chain_nodes(out))
            # DDP averages gradients over ranks; scaling by WORLD makes them the full batch's.
            ((out * cot[sl]).sum() * WORLD).backward()
            result["out"].append(out.detach())
            result["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        result["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_ddp_gloo_matches_single_process_full_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    ref = _model()
    for step in range(STEPS):
        x, cot = _batch(step)
        ref.zero_grad()
        out = ref(x)
        (out * cot).sum().backward()
        for r, res in enumerate(results):
            assert res["chains"][step] == 5, "the fused chains did not run"
            torch.testing.assert_close(
                res["out"][step], out[r * PER_RANK:(r + 1) * PER_RANK].detach(), rtol=1e-4, atol=1e-4
            )
            for n, p in ref.named_parameters():
                torch.testing.assert_close(
                    res["grads"][step][n], p.grad, rtol=1e-3, atol=1e-4,
                    msg=lambda m: f"rank {r} step {step} grad of {n}: {m}",
                )
    for r, res in enumerate(results):
        for n, b in ref.named_buffers():
            torch.testing.assert_close(
                res["buffers"][n], b, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {r} buffer {n}: {m}"
            )


"""Synchronised BatchNorm with gloo on CPU, 2 processes (loopback FileStore).

Each rank runs its share of a batch (even or uneven) through a fused, synchronised model:
``fusedres.convert_sync_batchnorm`` under DistributedDataParallel, or torch's
``nn.SyncBatchNorm.convert_sync_batchnorm`` of a converted model (gradients all-reduced by
hand: DDP refuses SyncBatchNorm on CPU).  The outputs, gradients and running statistics must
equal those of one process running the plain torchvision model (ordinary BatchNorm) on the
whole batch, and rank 0 must be able to evaluate alone afterwards.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models import resnet as tv

import fusedres
from helpers import chain_nodes, randomize

WORLD = 2
STEPS = 2
# Per-rank batch sizes: even, uneven (the global statistics weight each rank by its count), and
# one rank without samples (it must still take part in the exchange, or the other one waits forever).
SPLITS = {"even": (2, 2), "uneven": (3, 1), "empty": (4, 0)}


def _model():
    torch.manual_seed(0)
    return randomize(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10)).train()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 3, 48, 40, generator=g)
    cot = torch.randn(4, 10, generator=g)
    return x, cot


def _without_running_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def _worker(rank, store_path, out_dir, kind, split):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        if kind == "fusedres":
            model = fusedres.convert_sync_batchnorm(fusedres.convert(_model()))
            step_model = DDP(model)
        else:  # torch's own SyncBatchNorm on a converted model (DDP refuses it on CPU: reduce by hand)
            model = step_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.convert(_model()))
        result = {"out": [], "grads": [], "chains": []}
        lo = sum(split[:rank])
        sl = slice(lo, lo + split[rank])
        for step in range(STEPS):
            x, cot = _batch(step)
            model.zero_grad()
            out = step_model(x[sl])
            result["chains"].append(chain_nodes(out))
            # Each rank's loss is its share of the full batch's; DDP averages gradients over
            # ranks, so scaling by WORLD makes them the sum, i.e. the full batch's gradients.
            ((out * cot[sl]).sum() * (WORLD if kind == "fusedres" else 1)).backward()
            if kind != "fusedres":
                for p in model.parameters():
                    dist.all_reduce(p.grad)
            result["out"].append(out.detach())
            result["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        result["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
        # Rank 0 evaluates alone, with batch statistics (no running stats): the chains run but,
        # as with nn.SyncBatchNorm, exchange nothing in eval mode, so nothing waits for rank 1.
        if rank == 0:
            with torch.no_grad(), fusedres.backends.record() as used:
                result["eval"] = _without_running_stats(model).eval()(x[:2])
            result["eval_used"] = sorted(used)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("kind", ["fusedres", "torch-syncbn"])
def test_sync_bn_gloo_matches_single_process_full_batch(tmp_path, kind, split):
    """``fusedres.convert_sync_batchnorm`` under DDP, and torch's ``nn.SyncBatchNorm`` on a converted
    model: the fused chains run, synchronised, and match one process on the whole batch."""
    sizes = SPLITS[split]
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), kind, sizes), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    ref = _model()
    for step in range(STEPS):
        x, cot = _batch(step)
        ref.zero_grad()
        out = ref(x)
        (out * cot).sum().backward()
        for r, res in enumerate(results):
            assert res["chains"][step] == 5, "the fused chains did not run"
            lo = sum(sizes[:r])
            torch.testing.assert_close(res["out"][step], out[lo:lo + sizes[r]].detach(), rtol=1e-4, atol=1e-4)
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
    assert results[0]["eval_used"] == ["train:torch"]  # batch statistics: the chains ran
    with torch.no_grad():
        torch.testing.assert_close(results[0]["eval"], _without_running_stats(ref).eval()(x[:2]), rtol=1e-4, atol=1e-4)

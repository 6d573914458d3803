"""Small shared test utilities (the numerics reference itself lives in the package)."""

from __future__ import annotations

import torch

from fusedres.check import randomize_bn, rel_err  # noqa: F401  (re-exported for tests)

# Relative-error floor per dtype: a fused result passes when
# rel_err(fused, fp64) <= 2 * rel_err(eager same dtype, fp64) + FLOOR[dtype].
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def assert_within_budget(out, eager, truth, dtype, what="output"):
    e_fused = rel_err(out, truth)
    e_eager = rel_err(eager, truth)
    budget = 2 * e_eager + FLOOR[dtype]
    assert e_fused <= budget, f"{what}: rel err {e_fused:.3e} > budget {budget:.3e} (eager {e_eager:.3e})"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model


def chain_nodes(out: torch.Tensor) -> int:
    """Number of fused train-mode ``ChainTrain`` nodes in the autograd graph behind ``out``."""
    seen, stack, n = set(), [out.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n += type(fn).__name__ == "ChainTrainBackward"
        stack.extend(f for f, _ in fn.next_functions)
    return n

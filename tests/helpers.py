"""Small shared test utilities (the numerics reference itself lives in the package)."""

from __future__ import annotations

import copy

import torch

import fusedres
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


def count_modules(model: torch.nn.Module, classes) -> int:
    """How many of ``model``'s modules are exactly of one of ``classes`` (subclasses not counted)."""
    return sum(type(m) in classes for m in model.modules())


def assert_converts_and_matches(ref, ref_blocks, fused_blocks, fused_model_class, x, what="model"):
    """``fusedres.convert`` of a copy of the eval model ``ref``: every block of ``ref_blocks`` swapped
    for the matching class of ``fused_blocks``, the model itself for ``fused_model_class`` (still
    an instance of ``ref``'s class), the same ``state_dict`` keys, and on input ``x`` an output
    within the fp32 budget of fp64 truth with every conv on the ``cpu`` backend (no block fell
    back to the reference).  Returns ``(fused, number of blocks)``."""
    fused = fusedres.convert(copy.deepcopy(ref))
    n = count_modules(ref, ref_blocks)
    assert n > 0 and count_modules(fused, fused_blocks) == n
    assert type(fused) is fused_model_class and isinstance(fused, type(ref))
    assert list(fused.state_dict()) == list(ref.state_dict())
    with torch.no_grad(), fusedres.backends.record() as used:
        out = fused(x)
    with torch.no_grad():
        truth = copy.deepcopy(ref).double()(x.double())
        assert_within_budget(out, ref(x), truth, torch.float32, what=what)
    assert used == {"cpu"}
    return fused, n

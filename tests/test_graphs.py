"""fusedres.cuda_graphs without a GPU: arguments, and the eager fallback (the GPU cases are in
tests/test_gpu_models.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fusedres


def test_non_cuda_input_runs_eagerly_with_one_warning():
    model = fusedres.convert(torchvision.models.resnet18(num_classes=10).eval())
    run = fusedres.cuda_graphs(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="not a CUDA tensor"):
            out = run(x)
        torch.testing.assert_close(out, model(x))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(x)  # warned once
    assert not run._graphs


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fusedres.cuda_graphs(lambda x: x)
    with pytest.raises(ValueError, match="max_graphs"):
        fusedres.cuda_graphs(torch.nn.Identity(), max_graphs=0)


def test_compile_fullgraph_converted_model_no_recompiles():
    """A converted model traces whole (no graph breaks) and is not recompiled on repeated calls."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    fused = fusedres.convert(copy.deepcopy(ref))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1

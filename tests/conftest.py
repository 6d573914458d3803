"""Test configuration shared by the whole suite.

Without a GPU, Triton kernels run through the interpreter on CPU tensors: the variable
must be set before triton is first imported, hence here, at collection start.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _announce_again():
    """Each test sees fusedres's once-per-process fallback warnings afresh (a test asserting one
    must not depend on which tests ran before it)."""
    from fusedres import patterns

    patterns._announced.clear()
    yield


@pytest.fixture
def ieee_fp32():
    """Full-precision fp32 convolutions (TF32 off) for the duration of a test."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old

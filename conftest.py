"""Test set-up. TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at collection time: on machines without CUDA the Triton kernels then run on CPU tensors through
the interpreter (slowly: tests keep kernel shapes tiny). With CUDA present the real GPU is used."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

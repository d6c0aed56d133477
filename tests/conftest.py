"""Shared fixtures. CUDA cases exist only where torch sees a GPU (so a CPU run skips nothing):
the ``device`` fixture adds a CUDA case there, and files named ``*_cuda.py`` are collected only
there. Both carry the ``cuda`` marker, so ``pytest -m cuda`` runs exactly the GPU tests."""

import gc

import pytest
import torch

import blt_ext  # noqa: F401  (registers torch.ops.blt_ext)

HAS_CUDA = torch.cuda.is_available() and blt_ext.WITH_CUDA
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if HAS_CUDA else [])


def pytest_ignore_collect(collection_path, config):
    return collection_path.name.endswith("_cuda.py") and not HAS_CUDA


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def release_gpu_memory():
    """After the test, hand the allocator's cached GPU blocks back to the driver: the tests that
    fill tens of GB run in two pytest-xdist workers at once, and blocks one of them merely caches
    would make the other run out of memory."""
    yield
    gc.collect()
    torch.cuda.empty_cache()

"""Shared fixtures of the rehyat test suite."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the test's node id: fixed for a test, different between tests."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored afterwards). The op and module tests use tiny tensors, where
    OpenMP synchronisation dominates, and on a shared 2-core machine extra threads slow them down several fold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""benchmarks/ab_key_windows.py, ab_linear_branch.py, ab_cuda_graphs.py and profile_end_to_end.py are GPU-only:
without CUDA they stop with a message that says so, before building anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("script", ["ab_key_windows.py", "ab_linear_branch.py", "ab_cuda_graphs.py", "profile_end_to_end.py"])
def test_refuses_without_cuda(script):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode != 0
    assert f"{script} needs a CUDA device" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_end_to_end_refuses_full_size_on_cpu():
    """Without a GPU and without --quick / --device cpu, bench_end_to_end.py stops instead of building a 1.4B model."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_end_to_end.py")], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0
    assert "pass --quick" in r.stderr and "--device cpu" in r.stderr

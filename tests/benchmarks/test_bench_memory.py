"""benchmarks/bench_memory.py --compile: the blocks are compiled as rehyat generate compiles them on CUDA (the
teacher's, then again after the conversion, which turns on the compiled attention step), and the table says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_memory  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_compile_compiles_the_teacher_and_the_converted_model(tmp_path, monkeypatch):
    import rehyat.models

    converted = []

    def record(model):  # stands in for torch.compile (slow on the CPU): which model it was given
        converted.append(getattr(model, "rehyat_config", None) is not None)
        return model

    monkeypatch.setattr(rehyat.models, "compile_blocks", record)
    assert bench_memory.main(["--device", "cpu", "--smoke", "--compile", "--frames", "9", "--steps", "2",
                              "--out", str(tmp_path)]) == 0
    assert converted == [False, True]  # the plain teacher, then the converted model
    res = json.loads((tmp_path / "bench_memory.json").read_text())
    assert res["info"]["compiled"].startswith("every block under torch.compile")
    assert all(r["status"] == "ok" for r in res["rows"])


def test_compile_refused_in_cpu_mode():
    with pytest.raises(SystemExit, match="--compile: GPU mode only"):
        bench_memory.main(["--device", "cpu", "--compile"])

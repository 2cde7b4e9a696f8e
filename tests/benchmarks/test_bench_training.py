"""Smoke test of benchmarks/bench_training.py: the CPU quick mode (gloo, 1 and 2 processes, tiny models) runs every
row, and 2 processes follow 1 process's per-step losses at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _random_caption_table(path: Path) -> Path:
    """Every world caption (and "") with random 384-dim embeddings: the world export needs a table, and the real
    one (.devcarry/) is not in the repository."""
    from rehyat.commands.world import all_captions
    from rehyat.training.data import TextEmbeddingTable

    caps = all_captions() + [""]
    g = torch.Generator().manual_seed(0)
    return TextEmbeddingTable(caps, torch.randn(len(caps), 16, 384, generator=g) * 0.1, max_sequence_length=16,
                              text_encoder="random").save(path)


def test_bench_training_quick_cpu(tmp_path):
    table = _random_caption_table(tmp_path / "table.safetensors")
    out = tmp_path / "out"
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--device", "cpu", "--quick",
           "--text-embeddings", str(table), "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench_training.json", "bench_training.md"]
    res = json.loads((out / "bench_training.json").read_text())
    rows = res["rows"]
    assert [(r["model"], r["stage"], r["gpus"]) for r in rows] == [
        (m, s, n) for m in ("world", "wan") for s in ("distill", "finetune") for n in (1, 2)]
    for r in rows:
        assert r["status"] == "ok", r
        assert len(r["losses"]) == r["steps"] == 3
        assert r["samples_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert r["report"]["world_size"] == r["gpus"]
    for r in rows:
        if r["gpus"] == 2:
            # gloo, float32: 2 processes repeat 1 process up to summation order (tests/training/test_distributed.py)
            assert r["max_rel_loss_diff"] <= 1e-4, r
            assert r["speedup"] > 0
    md = (out / "bench_training.md").read_text()
    assert md == proc.stdout[proc.stdout.index("# Training throughput"):]
    table_rows = [x for x in md.splitlines() if x.startswith(("| world |", "| wan |"))]
    assert len(table_rows) == 8 and all(x.rstrip().endswith("| ok |") for x in table_rows)
    for key in ("- device: ", "- torch: ", "- date: ", "- command: "):
        assert key in md
    assert not any((tmp_path / "work").iterdir())  # the work folder is removed

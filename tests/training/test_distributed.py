"""Data parallelism: 2 processes (torchrun, gloo, CPU) give the run 1 process gives with the same global batch, and
agree on where to stop at Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def _log(folder):
    keep = ("step", "loss", "fm_loss", "rel_error", "rel_error_mean", "grad_norm", "lr")
    return [{k: v for k, v in json.loads(x).items() if k in keep}
            for x in (folder / "train" / "log.jsonl").read_text().splitlines()]


def _close(a, b, tol=1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, tol)
    elif isinstance(a, float):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (a, b)
    else:
        assert a == b


def test_two_processes_equal_one(pixel_student, pixel_dataset, teacher, prompts, tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        from _dist_worker import DISTILL, FINETUNE
    finally:
        sys.path.pop(0)
    from rehyat.training import distill, finetune

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "_dist_worker.py"), str(pixel_student), str(pixel_dataset), str(teacher), str(prompts),
           str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ft = finetune(tmp_path / "one" / "ft", **FINETUNE, model=pixel_student, data=pixel_dataset)
    di = distill(teacher, tmp_path / "one" / "distill", prompts=prompts, **DISTILL)

    for name in ("ft", "distill"):
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        _close(_log(one), _log(two))
        w1 = load_file(one / "transformer" / "diffusion_pytorch_model.safetensors")
        w2 = load_file(two / "transformer" / "diffusion_pytorch_model.safetensors")
        assert w1.keys() == w2.keys()
        for k in w1:
            # Adam divides by sqrt(v): entries with gradients near zero amplify summation-order differences
            torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-4)
    rep = json.loads((tmp_path / "two" / "ft" / "finetune_report.json").read_text())
    assert rep["world_size"] == 2
    _close(rep["flow_matching_eval_after"], ft.eval_after)
    rep = json.loads((tmp_path / "two" / "distill" / "distill_report.json").read_text())
    assert rep["world_size"] == 2
    _close({str(b): v for b, v in di.after.items()}, {b: v["after"] for b, v in rep["blocks"].items()})

    # Ctrl-C reaching one process only: both stop after the same step, saved, and resume to the uninterrupted run
    for rank in (0, 1):
        stopped = json.loads((tmp_path / "two" / f"ft_ctrl_c_rank{rank}.json").read_text())
        assert stopped == {"done": 2, "saved_step": 2, "in_step": False}, (rank, stopped)
    two, resumed = tmp_path / "two" / "ft", tmp_path / "two" / "ft_ctrl_c"
    assert _log(two) == _log(resumed)
    w1 = load_file(two / "transformer" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)

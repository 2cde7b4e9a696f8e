"""Finished training steps survive Ctrl-C, and --resume refuses a --steps below what the checkpoint has done."""

from __future__ import annotations

import pytest

from rehyat.cli import main


def _finetune_args(student, dataset, out, steps):
    return ["finetune", "--model", str(student), "--data", str(dataset), "--out", str(out), "--steps", str(steps),
            "--batch-size", "2", "--lr", "3e-3", "--checkpoint-every", "100", "--log-every", "1",
            "--eval-batches", "0", "--no-progress"]


def _distill_args(teacher, prompts, out, steps):
    return ["distill", "--model", str(teacher), "--prompts", str(prompts), "--out", str(out), "--steps", str(steps),
            "--frames", "4", "--height", "4", "--width", "4", "--sampling-steps", "3", "--batch-size", "2",
            "--lr", "1e-2", "--chunk-frames", "2", "--checkpoint-every", "100", "--eval-trajectories", "0",
            "--no-progress"]


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["finetune", "distill"])
def test_resume_with_fewer_steps_than_done_is_refused(command, pixel_student, pixel_dataset, teacher, prompts,
                                                       tmp_path, capsys):
    """The run's outputs would hold 4 steps' weights under a report of 3: refused before anything is touched."""
    out = tmp_path / "run"
    args = (lambda steps: _finetune_args(pixel_student, pixel_dataset, out, steps)) if command == "finetune" else \
        (lambda steps: _distill_args(teacher, prompts, out, steps))
    assert main(args(4)) == 0
    capsys.readouterr()
    before = _files(out)
    assert main(args(3) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"rehyat {command}: error: --resume")
    assert "4 steps" in err and "--steps 3" in err
    assert _files(out) == before
    assert main(args(4) + ["--resume"]) == 0  # as many steps as done: nothing to train, the outputs again

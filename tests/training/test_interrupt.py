"""Finished training steps survive Ctrl-C, and --resume refuses a --steps below what the checkpoint has done."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from rehyat.cli import main
from rehyat.testing import folder_weights, train_log
from rehyat.training import load_checkpoint


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


def _same_run(a, b):
    assert train_log(a) == train_log(b)
    wa, wb = folder_weights(a), folder_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _ctrl_c_in_optimizer_step(monkeypatch, at: int, times: int = 1):
    """Ctrl-C pressed ``times`` times while the ``at``-th AdamW update runs: SIGINT sent to this process there."""
    calls = [0]
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def _main(args):
    """``main(args)``; a KeyboardInterrupt escaping it fails the test instead of stopping the test session."""
    try:
        return main(args)
    except KeyboardInterrupt as e:
        pytest.fail(f"a KeyboardInterrupt escaped `rehyat {args[0]}`: {e!r}")


def _checkpoint(out):
    return out / "train" / "checkpoint.pt"


@pytest.mark.parametrize("command", ["finetune", "distill"])
def test_ctrl_c_saves_the_finished_step_and_resume_equals_uninterrupted(command, pixel_student, pixel_dataset, teacher,
                                                                        prompts, tmp_path, capsys, monkeypatch):
    """Ctrl-C in step 3, long before the first scheduled checkpoint: step 3 finishes, is saved, and exit code 130
    with one line saying where and how to resume; --resume then repeats the uninterrupted run bit for bit."""
    args = (lambda out, steps: _finetune_args(pixel_student, pixel_dataset, out, steps)) if command == "finetune" \
        else (lambda out, steps: _distill_args(teacher, prompts, out, steps))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(args(a, 6)) == 0
    with monkeypatch.context() as m:
        _ctrl_c_in_optimizer_step(m, at=3)
        capsys.readouterr()
        assert _main(args(b, 6)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"rehyat {command}: stopped by Ctrl-C after step 3 of 6; checkpoint saved "
                                            f"in {_checkpoint(b)}: to continue, run the same command with --resume")
    assert load_checkpoint(_checkpoint(b))["step"] == 3 and [r["step"] for r in train_log(b)] == [1, 2, 3]
    assert not (b / "transformer").exists()  # no model folder that looks finished
    assert main(args(b, 6) + ["--resume"]) == 0
    _same_run(a, b)


@pytest.mark.parametrize("checkpoint_every", [2, 100])
def test_second_ctrl_c_stops_mid_step_without_saving_it(checkpoint_every, pixel_student, pixel_dataset, tmp_path,
                                                         capsys, monkeypatch):
    """Ctrl-C twice in step 5: it stops at once, half-updated, so nothing of step 5 is written; the checkpoint of
    step 4 (if any) stays whole and resumes to the uninterrupted run."""
    a, b = tmp_path / "a", tmp_path / "b"
    every = ["--checkpoint-every", str(checkpoint_every)]
    assert main(_finetune_args(pixel_student, pixel_dataset, a, 6) + every) == 0
    with monkeypatch.context() as m:
        _ctrl_c_in_optimizer_step(m, at=5, times=2)
        capsys.readouterr()
        assert _main(_finetune_args(pixel_student, pixel_dataset, b, 6) + every) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert not [p.name for p in (b / "train").iterdir() if p.name.startswith(".")]  # no temporary checkpoint
    if checkpoint_every == 100:
        assert last == "rehyat finetune: stopped by Ctrl-C in step 5 of 6 before any checkpoint: nothing was saved"
        assert not _checkpoint(b).exists()
        return
    assert last == (f"rehyat finetune: stopped by Ctrl-C in step 5 of 6, which is not saved; {_checkpoint(b)} holds "
                    "step 4: to continue from there, run the same command with --resume")
    assert load_checkpoint(_checkpoint(b))["step"] == 4
    assert main(_finetune_args(pixel_student, pixel_dataset, b, 6) + every + ["--resume"]) == 0
    _same_run(a, b)


def test_keyboard_interrupt_between_steps_is_saved(teacher, prompts, tmp_path, monkeypatch):
    """A KeyboardInterrupt raised between two steps (here by the progress logger, in the Python API) in one
    process: the state is whole, so it is saved; TrainingInterrupted says so."""
    from rehyat.training import TrainingInterrupted, distill
    from rehyat.training.progress import RunLog

    original = RunLog.step

    def step(self, n, record, postfix=None):
        original(self, n, record, postfix)
        if n == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunLog, "step", step)
    kw = dict(prompts=prompts, frames=4, height=4, width=4, chunk_frames=2, sampling_steps=3, batch_size=2,
              steps=5, checkpoint_every=100, eval_trajectories=0, progress=False)
    with pytest.raises(TrainingInterrupted) as info:
        distill(teacher, tmp_path / "b", **kw)
    e = info.value
    assert (e.done, e.steps, e.checkpoint, e.saved_step, e.in_step) == (2, 5, _checkpoint(tmp_path / "b"), 2, False)
    assert load_checkpoint(_checkpoint(tmp_path / "b"))["step"] == 2

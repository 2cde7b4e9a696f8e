"""The run skeleton shared by distill and finetune (rehyat.training.run.TrainingRun), on a toy model."""

from __future__ import annotations

import json

import pytest
import torch

from rehyat.training import load_checkpoint
from rehyat.training.distributed import DistEnv
from rehyat.training.run import TrainingRun

KW = dict(checkpoint_every=2, log_every=1, overwrite=False, desc="toy", progress=False)


def _toy_run(out, steps, *, resume=False, settings=None):
    run = TrainingRun.open(out, settings or {"lr": 0.5, "out": out}, steps=steps, resume=resume, **KW)
    run.attach(DistEnv())
    model = torch.nn.Linear(2, 1, bias=False)
    if run.checkpoint is not None:
        with torch.no_grad():
            model.weight.copy_(run.checkpoint["model"]["weight"])
    run.restore()
    run.write_config()
    saved = []

    def step(s):
        with torch.no_grad():
            model.weight.add_(1.0)
        return {"loss": float(s)}

    def save(s):
        saved.append(s)
        run.save_checkpoint(s, model, data={"sampler": None}, extra={"note": s}, optimizer={"s": s})

    run.train(step, save=save, record=lambda s, rec, log: log.step(s, rec), samples_per_step=1)
    return run, model, saved


def test_training_run_checkpoints_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    run, model, saved = _toy_run(out, 3)
    assert saved == [2, 3]  # every checkpoint_every steps and at the end
    assert json.loads((out / "train" / "run_config.json").read_text()) == {"lr": 0.5, "out": str(out)}
    ckpt = load_checkpoint(out / "train" / "checkpoint.pt")
    assert (ckpt["step"], ckpt["extra"], ckpt["optimizer"], ckpt["world_size"]) == (3, {"note": 3}, {"s": 3}, 1)
    assert torch.equal(ckpt["model"]["weight"], model.weight.detach())
    assert [json.loads(x)["step"] for x in (out / "train" / "log.jsonl").read_text().splitlines()] == [1, 2, 3]

    with pytest.raises(FileExistsError, match="--overwrite"):
        TrainingRun.open(out, {"lr": 0.5}, steps=3, resume=False, **KW)
    with pytest.raises(ValueError, match="lr"):
        TrainingRun.open(out, {"lr": 0.25, "out": out}, steps=5, resume=True, **KW)
    with pytest.raises(ValueError, match="--steps 2"):
        TrainingRun.open(out, {"lr": 0.5, "out": out}, steps=2, resume=True, **KW)

    run, model2, saved = _toy_run(out, 5, resume=True)
    assert run.start == 3 and saved == [4, 5]
    assert torch.equal(model2.weight.detach(), ckpt["model"]["weight"] + 2.0)  # two more steps of +1
    assert [json.loads(x)["step"] for x in (out / "train" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_training_run_restore_refuses_another_process_count_mid_trajectory(tmp_path):
    class Traj:
        loaded = None

        def load_state_dict(self, s):
            self.loaded = s

    run = TrainingRun(tmp_path, {}, steps=4, resume=True, **KW)
    run.attach(DistEnv())
    run.checkpoint = {"step": 2, "world_size": 2, "rng": [None, None],
                      "data": {"trajectories": [{"latents": torch.zeros(1)}, {"latents": torch.zeros(1)}]}}
    with pytest.raises(ValueError, match="written by 2 processes mid-trajectory"):
        run.restore(Traj())
    run.checkpoint["data"]["trajectories"] = [{"latents": None}, {"latents": None}]  # between trajectories: fine
    traj = Traj()
    run.restore(traj)
    assert traj.loaded == {"latents": None} and run.start == 2

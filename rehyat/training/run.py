"""The skeleton of a training run, shared by :func:`~rehyat.training.finetune` and :func:`~rehyat.training.distill`.

A run (:class:`TrainingRun`) goes through the same steps whatever it trains:

1. :meth:`TrainingRun.open` (before any weights load): check ``--out`` (:func:`~.common.prepare_run_folder`),
   make the settings JSON-safe (they become ``train/run_config.json``), and with ``resume`` read
   ``train/checkpoint.pt`` and refuse other settings or fewer ``steps`` than it holds;
2. :meth:`TrainingRun.attach`: the processes (:class:`~.distributed.DistEnv`), once they are started;
3. :meth:`TrainingRun.restore`: after the run has restored its own model and optimizer from :attr:`checkpoint`,
   the part every run shares: per-rank teacher trajectories, RNG states, the step count, the log cut back to it;
4. :meth:`TrainingRun.write_config`: ``--out`` is written only now, with everything loaded (a run that fails
   before leaves it as it was): ``--overwrite`` clears the earlier run's outputs, ``run_config.json`` is written;
5. :meth:`TrainingRun.train`: the step loop with the progress log (:class:`~.progress.RunLog`), scheduled
   checkpoints (:meth:`TrainingRun.save_checkpoint`) and Ctrl-C (:class:`~.interrupt.GracefulStop`), the log
   closed however the loop ends;
6. :meth:`TrainingRun.finish`: the main process writes the outputs, every process waits for it.

The checkpoint layout is :mod:`.checkpoint`'s; what a run adds to it (optimizer states, data order, ``extra``) is
its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, trainable_state
from .common import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    LOG_NAME,
    TRAIN_DIR,
    check_resume_config,
    check_resume_steps,
    clear_run_outputs,
    prepare_run_folder,
    run_config,
)
from .distributed import DistEnv
from .interrupt import GracefulStop
from .progress import RunLog, truncate_log

__all__ = ["TrainingRun"]


class TrainingRun:
    """One training run's folder, settings, checkpoint, log and step loop (see the module docstring).

    Args:
        out: the run's ``--out`` folder. settings: the run's settings (made JSON-safe: :func:`~.common.run_config`).
        steps: the total optimizer steps. checkpoint_every, log_every: steps between checkpoints / log flushes.
        resume, overwrite: as the commands' ``--resume`` / ``--overwrite``. desc: the progress bar's label.
        progress: show the progress bar.

    Attributes:
        checkpoint: the resumed checkpoint (``None`` for a fresh run). start: steps done before this invocation.
        env: the processes (set by :meth:`attach`).

    Build it with :meth:`open`.
    """

    def __init__(self, out: Path, settings: dict, *, steps: int, checkpoint_every: int, log_every: int,
                 resume: bool, overwrite: bool, desc: str, progress: bool) -> None:
        self.out, self.settings, self.steps = Path(out), settings, steps
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.resume, self.overwrite, self.desc, self.progress = resume, overwrite, desc, progress
        self.checkpoint: dict | None = None
        self.start = 0
        self.env: DistEnv | None = None

    @classmethod
    def open(cls, out, settings: dict, *, steps: int, checkpoint_every: int, log_every: int, resume: bool,
             overwrite: bool, desc: str, progress: bool) -> "TrainingRun":
        """Check ``out`` and, with ``resume``, the checkpoint against ``settings``; nothing is written.

        Raises:
            FileNotFoundError / FileExistsError: as :func:`~.common.prepare_run_folder`. ValueError: settings that
                differ from the checkpoint's run, or ``steps`` below its steps.
        """
        prepare_run_folder(out, overwrite=overwrite, resume=resume)
        run = cls(out, run_config(settings), steps=steps, checkpoint_every=checkpoint_every, log_every=log_every,
                  resume=resume, overwrite=overwrite, desc=desc, progress=progress)
        if resume:
            run.checkpoint = load_checkpoint(run.checkpoint_path)
            check_resume_config(run.checkpoint["config"], run.settings)
            check_resume_steps(run.checkpoint["step"], steps, run.checkpoint_path)
        return run

    @property
    def checkpoint_path(self) -> Path:
        return self.out / TRAIN_DIR / CHECKPOINT_NAME

    @property
    def log_path(self) -> Path:
        return self.out / TRAIN_DIR / LOG_NAME

    def attach(self, env: DistEnv) -> DistEnv:
        """Record the processes the run trains on; returns ``env``."""
        self.env = env
        return env

    # ------------------------------------------------------------------------------------------------ resume
    def restore(self, trajectories=None) -> None:
        """Restore what every run keeps in its checkpoint (no-op for a fresh run): this rank's teacher
        ``trajectories`` (if the run has them), the RNG states (when the process count is the same), the step
        count (:attr:`start`); the main process drops log lines past it.

        Raises:
            ValueError: the checkpoint was written mid-trajectory by another number of processes.
        """
        ckpt, env = self.checkpoint, self.env
        if ckpt is None:
            return
        if trajectories is not None:
            trajs = ckpt["data"]["trajectories"]
            if ckpt["world_size"] != env.world_size and trajs[0]["latents"] is not None:
                raise ValueError(f"--resume: the checkpoint was written by {ckpt['world_size']} processes "
                                 f"mid-trajectory; resume with {ckpt['world_size']} processes")
            trajectories.load_state_dict(trajs[min(env.rank, len(trajs) - 1)])
        if len(ckpt["rng"]) == env.world_size:
            set_rng_state(ckpt["rng"][env.rank])
        self.start = ckpt["step"]
        if env.is_main:
            truncate_log(self.log_path, self.start)

    def save_checkpoint(self, step: int, model: torch.nn.Module, *, data: dict, extra: dict, **state) -> None:
        """Write the checkpoint of ``step`` (collective: every process calls it; rank 0 writes).

        It holds ``model``'s trainable tensors, ``data`` (already gathered over processes), ``extra``, the run's
        own ``state`` entries (e.g. ``optimizer=optimizer.state_dict()``), every rank's RNG states, the process
        count and the settings.
        """
        rngs = self.env.gather_objects(rng_state())
        if self.env.is_main:
            save_checkpoint(self.checkpoint_path, {
                "step": step, "model": trainable_state(model), **state, "rng": rngs, "data": data,
                "world_size": self.env.world_size, "config": self.settings, "extra": extra,
            })
        self.env.barrier()

    # ------------------------------------------------------------------------------------------------ the run
    def write_config(self) -> None:
        """Start writing ``out`` (a fresh run): clear an earlier run's outputs with ``overwrite``, write
        ``train/run_config.json``. Collective."""
        env = self.env
        if env.is_main and not self.resume:
            if self.overwrite and self.out.is_dir():
                clear_run_outputs(self.out)
            (self.out / TRAIN_DIR).mkdir(parents=True, exist_ok=True)
            (self.out / TRAIN_DIR / CONFIG_NAME).write_text(json.dumps(self.settings, indent=2) + "\n")
        env.barrier()

    def train(self, step: Callable[[int], object], *, save: Callable[[int], None],
              record: Callable[[int, object, RunLog], None], samples_per_step: int, intro: str | None = None) -> float:
        """The step loop from :attr:`start` + 1 to ``steps``: ``step(s)`` does optimizer step ``s`` and returns its
        records, ``record(s, records, log)`` logs them; ``save(s)`` (collective) writes a checkpoint every
        ``checkpoint_every`` steps and at the end; Ctrl-C stops at a step boundary with a checkpoint
        (:class:`~.interrupt.TrainingInterrupted`). ``intro`` is printed first on a fresh run.

        Returns:
            the seconds this invocation spent in the loop.
        """
        env = self.env
        log = RunLog(self.log_path, is_main=env.is_main, device=env.device, total_steps=self.steps,
                     start_step=self.start, samples_per_step=samples_per_step, log_every=self.log_every,
                     desc=self.desc, progress=self.progress)
        if intro and env.is_main and self.start == 0:
            log.write(intro)
        stop = GracefulStop(env, save=save, path=self.checkpoint_path, start=self.start, steps=self.steps,
                            resumed=self.resume, flush=log.flush)
        t0 = time.perf_counter()
        try:
            with stop:
                for s in range(self.start + 1, self.steps + 1):
                    with stop.step(s):
                        rec = step(s)
                    record(s, rec, log)
                    if s % self.checkpoint_every == 0 or s == self.steps:
                        log.flush()
                        stop.save(s)
                        log.reset_timer()
                    stop.check()
        finally:
            log.close()
        return time.perf_counter() - t0

    def finish(self, write: Callable[[], None]) -> None:
        """``write()`` the run's outputs on the main process; every process waits for it."""
        if self.env.is_main:
            write()
        self.env.barrier()

"""Ctrl-C in a training run: the step under way finishes, a resumable checkpoint is saved, then the run stops.

:class:`GracefulStop` wraps the step loop of :func:`~rehyat.training.finetune` and :func:`~rehyat.training.distill`:

* the first SIGINT (Ctrl-C) only sets a flag; between two steps every process checks it, agreed over all
  processes (one scalar all-reduce per step, which waits for the step's work on a GPU), and at the first step
  boundary where any process has it set, every process stops there: the checkpoint (the same file ``--resume``
  reads, written atomically by rank 0 after gathering every rank's state) holds exactly the steps done;
* a ``KeyboardInterrupt`` raised between steps (e.g. by a callback) saves the same way in a single process; in
  several processes it is not agreed, so nothing is saved (the other processes are elsewhere in their collectives);
* a ``KeyboardInterrupt`` raised inside a step (a second Ctrl-C in a single process, which stops at once) saves
  nothing: the model, optimizer and data order are then half-updated; the last checkpoint stays as it was.

Then :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised, saying where the checkpoint is. Under
``torchrun`` the launcher forwards Ctrl-C to every worker as one SIGINT, so further SIGINTs are ignored there, and
it kills the workers ``--shutdown-timeout`` seconds later (30 by default): raise it above a step's time plus a
checkpoint's. The handler is installed only in the main thread and only over Python's default SIGINT handler (a
process that ignores SIGINT, or a caller's own handler, is left alone).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

__all__ = ["GracefulStop", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """A training run stopped by Ctrl-C; its message says what was saved and how to continue.

    Attributes:
        done: optimizer steps done when it stopped. steps: the run's total ``steps``.
        checkpoint: the checkpoint ``--resume`` continues from, or ``None`` when the run has none.
        saved_step: the step that checkpoint holds. in_step: it stopped inside step ``done + 1`` (or, in several
            processes, where they had not agreed to stop), a state that is not saved.
    """

    def __init__(self, done: int, steps: int, checkpoint: Path | None, saved_step: int | None,
                 in_step: bool = False) -> None:
        self.done, self.steps, self.checkpoint, self.saved_step = done, steps, checkpoint, saved_step
        self.in_step = in_step
        if checkpoint is not None and saved_step == done and not in_step:
            msg = (f"stopped by Ctrl-C after step {done} of {steps}; checkpoint saved in {checkpoint}: to continue, "
                   "run the same command with --resume")
        elif checkpoint is not None:
            msg = (f"stopped by Ctrl-C in step {done + 1} of {steps}, which is not saved; {checkpoint} holds step "
                   f"{saved_step}: to continue from there, run the same command with --resume")
        else:
            msg = f"stopped by Ctrl-C in step {done + 1} of {steps} before any checkpoint: nothing was saved"
        super().__init__(msg)


class _Agreed(KeyboardInterrupt):
    """Every process stops at this step boundary (raised by :meth:`GracefulStop.check`)."""


class GracefulStop:
    """Context manager around a training loop: see the module docstring.

    Args:
        env: the processes (:class:`~rehyat.training.distributed.DistEnv`).
        save: ``save(step)`` writes the checkpoint of ``step``; collective (every process calls it).
        path: where ``save`` writes. start: steps done before the loop (a resumed checkpoint's). steps: the total.
        resumed: whether ``path`` already holds step ``start``.
        flush: called before an interrupt's save (the run log's pending lines).

    In the loop: ``with stop.step(s): <the update of step s>``; ``stop.save(s)`` for a scheduled checkpoint;
    ``stop.check()`` between steps. Leaving the ``with stop:`` block on a ``KeyboardInterrupt`` raises
    :class:`TrainingInterrupted`.
    """

    def __init__(self, env, *, save: Callable[[int], None], path: Path, start: int, steps: int, resumed: bool,
                 flush: Callable[[], object] = lambda: None) -> None:
        self.env, self._save, self.path, self.steps, self._flush = env, save, Path(path), steps, flush
        self.done, self.saved = start, (start if resumed else None)
        self.in_step = False
        self.requested = False
        self._previous = None

    # ------------------------------------------------------------------------------------------------ the signal
    def __enter__(self) -> "GracefulStop":
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        if self.requested and not self.env.distributed:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once, without saving
        if not self.requested and self.env.is_main:
            print("\nCtrl-C: stopping after the step under way, with a checkpoint"
                  + ("" if self.env.distributed else " (Ctrl-C again to stop at once without saving)"),
                  file=sys.stderr, flush=True)
        self.requested = True

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if exc_type is None or not issubclass(exc_type, KeyboardInterrupt) or isinstance(exc, TrainingInterrupted):
            return False
        if not self.in_step and (isinstance(exc, _Agreed) or not self.env.distributed) and self.saved != self.done:
            self._flush()
            self.save(self.done)
        raise TrainingInterrupted(self.done, self.steps, self.path if self.saved is not None else None, self.saved,
                                  self.in_step or self.saved != self.done) from None

    # ------------------------------------------------------------------------------------------------ the loop
    @contextmanager
    def step(self, step: int):
        """Marks the update of ``step``: an interrupt inside it leaves a state that is not saved."""
        self.in_step = True
        yield
        self.done, self.in_step = step, False

    def save(self, step: int) -> None:
        """Write the checkpoint of ``step`` (every process calls it) and remember it as the one to resume from."""
        self._save(step)
        self.saved = step

    def check(self) -> None:
        """Between steps: raise (on every process at once) when any process got Ctrl-C."""
        flag = self.requested
        if self.env.distributed:
            t = torch.tensor([float(flag)], device=self.env.device)
            flag = bool(self.env.all_reduce_max(t).item())
        if flag:
            raise _Agreed

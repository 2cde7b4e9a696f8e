"""Training checkpoints: written atomically, restored exactly.

A checkpoint (``torch.save`` of a dict) holds everything a killed run needs to continue as if it had not stopped:

* ``"step"``: optimizer steps done;
* ``"model"``: the trainable tensors only (``{name: tensor}``: feature maps, LoRA weights, or the whole model),
  by parameter name; the frozen rest is reloaded from the run's source folder;
* ``"optimizer"``, ``"lr_scheduler"``: their ``state_dict()``;
* ``"rng"``: per-process RNG states (torch CPU, CUDA if any, numpy, python ``random``), a list indexed by rank;
* ``"data"``: the data order (:class:`~rehyat.training.sampler.GlobalBatchSampler` state) and/or per-rank teacher
  trajectory states;
* ``"config"``: the run's settings, checked on resume; ``"extra"``: anything else the run keeps (reports).

:func:`save_checkpoint` writes to a temporary file in the same folder, flushes it to disk and renames it over the
old checkpoint (``os.replace``), so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "trainable_state", "load_trainable_state"]


def save_checkpoint(path, state: dict) -> Path:
    """Atomically write ``state`` to ``path`` (temporary file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises FileNotFoundError for a missing file. Checkpoints hold pickled Python objects (scheduler states), so
    load only files your own runs wrote.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """This process's RNG states: torch (CPU and every CUDA device), numpy's global RNG, python ``random``."""
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` (CPU copies) of the parameters of ``model`` that require grad."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``model``'s parameters.

    Raises:
        ValueError: the names differ from the model's trainable parameters (the checkpoint is of another run).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(
            f"the checkpoint's trainable tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(f"checkpoint tensor {n} has shape {tuple(state[n].shape)}, the model's is {tuple(p.shape)}")
            p.copy_(state[n])

"""Data-parallel training on one or several processes (``torchrun``), GPUs (NCCL) or CPUs (gloo).

Every command of :mod:`rehyat.training` runs unchanged under ``torchrun --nproc-per-node N``: each process takes a
contiguous slice of every global batch (:func:`local_slice`), so the global batch, the random draws (made for the
whole global batch from step-seeded generators) and therefore the result are the same for any number of processes,
up to floating-point summation order. Fine-tuning wraps the model in DDP; distillation, whose blocks backpropagate
inside the forward, averages the feature-map gradients explicitly (:func:`average_gradients`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "average_gradients", "local_slice", "resolve_device"]


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``; default ``cuda`` when available, else ``cpu``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@dataclass
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` over processes, in place; returns it."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world_size)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (picklable), as a list indexed by rank, on every process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device=None) -> DistEnv:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``).

    With ``WORLD_SIZE`` unset or 1 this is a single process on ``device``. Otherwise it initialises
    ``torch.distributed`` (NCCL on CUDA, gloo on the CPU) if not done yet, and on CUDA each process takes the GPU
    ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: a CUDA device is asked for but fewer GPUs than local processes are visible.
    """
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistEnv(device=dev)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"process with LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev)


def local_slice(global_size: int, env: DistEnv, what: str = "--batch-size") -> slice:
    """This process's contiguous part of a global batch of ``global_size``.

    Raises:
        ValueError: ``global_size`` is not a multiple of the number of processes.
    """
    if global_size % env.world_size != 0:
        raise ValueError(f"{what} {global_size} must be a multiple of the number of processes ({env.world_size})")
    b = global_size // env.world_size
    return slice(env.rank * b, (env.rank + 1) * b)


def average_gradients(params, env: DistEnv) -> None:
    """Average the ``.grad`` of ``params`` over processes with one flattened all-reduce (missing grads count as 0)."""
    if not env.distributed:
        return
    params = [p for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    env.all_reduce_mean(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if p.grad is None else p.grad.copy_(flat[offset : offset + n].view_as(g))
        offset += n

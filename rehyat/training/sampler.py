"""The data order of training: global batches of sample indices, the same for any number of processes, with a
state that resumes exactly (saved in checkpoints, :mod:`rehyat.training.checkpoint`)."""

from __future__ import annotations

import torch

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler:
    """Global batches of sample indices, the same for any number of processes.

    Epoch ``e`` visits the samples in the order ``randperm(N)`` drawn from ``manual_seed(seed, e)``; a global batch
    takes the next ``batch_size`` entries, continuing into the next epoch when one runs out (so N < batch_size
    works). Each process then trains on its contiguous slice ``[rank*b, (rank+1)*b)`` of the global batch.

    State (``state_dict``): ``{"epoch", "position"}``, enough to continue exactly after a restart.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_samples, generator=g)

    def next_batch(self) -> torch.Tensor:
        """The next global batch, int64 ``[batch_size]`` (CPU)."""
        parts, need = [], self.batch_size
        while need:
            take = self._perm[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_samples"], state["batch_size"], state["seed"]) != (self.num_samples, self.batch_size, self.seed):
            raise ValueError("the checkpoint's data order was made with another dataset size, batch size or seed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)

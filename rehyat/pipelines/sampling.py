"""One sampling path: classifier-free guidance and the scheduler loop.

Used by :class:`rehyat.pipelines.ReHyAtVideoPipeline` (parallel, recurrent and streaming modes) and by
distillation's teacher trajectories (:class:`rehyat.training.TeacherTrajectories`), so the two sample alike:

* guidance (off at ``guidance_scale <= 1``): the model runs on the batch ``[uncond; cond]`` (the latents twice,
  the text input ``[negative; prompt]``, :func:`guidance_embeds`) and the velocity is
  ``uncond + guidance_scale * (cond - uncond)`` in float32 (:func:`guided_inputs`, :func:`guided_output`, both in
  :func:`guided_velocity`);
* the scheduler loop: a copy of the scheduler with ``steps`` timesteps set, then per timestep the (guided) velocity
  and ``scheduler.step`` (:class:`SamplingLoop`, one step at a time for a caller that trains between steps;
  :func:`denoise`, the whole loop).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

__all__ = ["guidance_on", "guidance_embeds", "guided_inputs", "guided_output", "guided_velocity", "SamplingLoop",
           "denoise"]


def guidance_on(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: ``guidance_scale > 1``."""
    return guidance_scale > 1.0


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[-2]))


def guidance_embeds(negative: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The text input of a guided batch: ``[negative (once per row of embeds); embeds]``.

    Args:
        negative: ``[1, L0, D]`` or ``[L0, D]``, the negative prompt's embeddings.
        embeds: ``[b, L1, D]``, the prompts' embeddings (same dtype and device as ``negative``).

    Returns:
        ``[2b, max(L0, L1), D]``, both zero-padded to the longer token count.
    """
    L = max(negative.shape[-2], embeds.shape[-2])
    neg = _pad_tokens(negative.reshape(1, *negative.shape[-2:]), L).expand(embeds.shape[0], -1, -1)
    return torch.cat([neg, _pad_tokens(embeds, L)])


def guided_inputs(latents: torch.Tensor, t: torch.Tensor, guidance_scale: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's latent and timestep inputs of one step: ``(x, ts)``.

    Args:
        latents: ``[b, C, F, H, W]`` (float32 as the scheduler keeps them).
        t: a 0-dim timestep (an element of ``scheduler.timesteps``).
        guidance_scale: guidance is on above 1.
        dtype: the transformer's dtype.

    Returns:
        ``x``: ``[2b, ...]`` (``[latents; latents]``) under guidance, else ``[b, ...]``, in ``dtype``;
        ``ts``: ``[len(x)]``, ``t`` for every row, on the latents' device.
    """
    x = torch.cat([latents, latents]) if guidance_on(guidance_scale) else latents
    return x.to(dtype), t.expand(x.shape[0]).to(x.device)


def guided_output(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The guided velocity (float32) from the model's output on :func:`guided_inputs`: the output itself without
    guidance, else ``uncond + guidance_scale * (cond - uncond)`` of its two halves ``[uncond; cond]``."""
    out = out.float()
    if not guidance_on(guidance_scale):
        return out
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def guided_velocity(forward: Callable, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                    guidance_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """One guided model evaluation: ``guided_output(forward(x, ts, embeds))`` on ``guided_inputs(latents, t)``.

    Args:
        forward: ``forward(x [n, C, F, H, W], ts [n], embeds) -> velocity [n, C, F, H, W]``.
        latents: ``[b, C, F, H, W]``; t: a 0-dim timestep.
        embeds: the text input, ``[2b, L, D]`` under guidance (:func:`guidance_embeds`), else ``[b, L, D]``.
        guidance_scale: CFG scale, off at <= 1. dtype: the transformer's dtype.

    Returns:
        ``[b, C, F, H, W]`` float32.
    """
    x, ts = guided_inputs(latents, t, guidance_scale, dtype)
    return guided_output(forward(x, ts, embeds), guidance_scale)


class SamplingLoop:
    """The scheduler loop over given latents, one step at a time.

    A deep copy of ``scheduler`` (``scheduler`` itself is not modified) with ``steps`` timesteps set on the
    latents' device; :meth:`step` applies ``scheduler.step`` with a velocity at the current timestep.

    Args:
        scheduler: a diffusers flow-matching scheduler.
        latents: ``[b, C, F, H, W]`` float32, the starting noise.
        steps: sampler steps, >= 1.

    Attributes:
        scheduler: the copy; latents: the current latents; index: steps taken so far.
    """

    def __init__(self, scheduler, latents: torch.Tensor, steps: int) -> None:
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=latents.device)
        self.latents, self.index = latents, 0

    @classmethod
    def resume(cls, scheduler, latents: torch.Tensor, index: int) -> "SamplingLoop":
        """A loop at step ``index`` from a saved scheduler (timesteps set, used as it is, not copied) and latents."""
        loop = cls.__new__(cls)
        loop.scheduler, loop.latents, loop.index = scheduler, latents, index
        return loop

    @property
    def timesteps(self) -> torch.Tensor:
        """All timesteps of the loop, ``[steps]``."""
        return self.scheduler.timesteps

    @property
    def timestep(self) -> torch.Tensor:
        """The current step's timestep (0-dim)."""
        return self.scheduler.timesteps[self.index]

    @property
    def done(self) -> bool:
        """Whether every timestep has been stepped."""
        return self.index >= len(self.scheduler.timesteps)

    def step(self, velocity: torch.Tensor) -> torch.Tensor:
        """``scheduler.step`` with ``velocity`` (``[b, C, F, H, W]`` float32) at the current timestep; returns
        and keeps the new latents."""
        self.latents = self.scheduler.step(velocity, self.timestep, self.latents, return_dict=False)[0]
        self.index += 1
        return self.latents


def denoise(scheduler, latents: torch.Tensor, steps: int, velocity: Callable, *,
            after_step: Callable | None = None, progress: bool = False, desc: str = "denoising") -> torch.Tensor:
    """The whole scheduler loop (:class:`SamplingLoop`): for each timestep ``t`` (step ``i``),
    ``latents = scheduler.step(velocity(latents, t, i), t, latents)``.

    Args:
        scheduler: a diffusers flow-matching scheduler (copied, not modified).
        latents: ``[b, C, F, H, W]`` float32 starting noise.
        steps: sampler steps.
        velocity: ``velocity(latents, t, i) -> [b, C, F, H, W]`` float32 (e.g. :func:`guided_velocity`).
        after_step: called as ``after_step(i, latents)`` after each step (e.g. a finiteness check that raises).
        progress: a tqdm bar over the steps; desc: its label.

    Returns:
        The final latents ``[b, C, F, H, W]`` float32.
    """
    loop = SamplingLoop(scheduler, latents, steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loop.timesteps), desc=desc, leave=False)
    try:
        while not loop.done:
            i = loop.index
            loop.step(velocity(loop.latents, loop.timestep, i))
            if after_step is not None:
                after_step(i, loop.latents)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return loop.latents

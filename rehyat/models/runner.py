"""Recurrent runner: a converted, chunk-causal Wan transformer executed one chunk of latent frames at a time.

Every token-wise part of the transformer (patch embedding with temporal patch 1, modulation, cross-attention, FFN,
output head) gives the same result on a slice of frames; only self-attention couples frames, and in a chunk-causal
model it couples a chunk to earlier frames alone. So the runner calls the transformer itself on each chunk's
latents, with the model's :class:`~rehyat.models.wan.RunContext` in recurrent mode: converted blocks carry their
ReHyAt state (constant size), chunk-causal softmax blocks a K/V cache, and RoPE uses the chunk's absolute start
frame. The result equals the parallel forward of the same causal model (design section 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..ops import RecurrentState
from .wan import get_rehyat_config, recurrent_mode, runner_chunk_frames

__all__ = ["TransformerState", "check_recurrent", "forward_chunk", "recurrent_forward"]


@dataclass
class TransformerState:
    """Recurrent state of a whole converted transformer after ``frames_seen`` latent frames.

    Attributes:
        block_states: ``{block index: RecurrentState}`` for every chunked block (converted or chunk-causal).
        frames_seen: latent frames processed so far, the absolute start frame of the next chunk.
    """

    block_states: dict[int, RecurrentState] = field(default_factory=dict)
    frames_seen: int = 0

    def nbytes(self) -> int:
        """Bytes held by all block states (constant for converted blocks; grows for chunk-causal softmax)."""
        return sum(s.nbytes() for s in self.block_states.values())


def check_recurrent(transformer) -> int:
    """Check that ``transformer`` can run chunk by chunk; return its runner chunk size in latent frames.

    Raises:
        ValueError: the model is not converted, its linear branch is bidirectional, or some blocks keep
            bidirectional softmax attention (convert them, or convert with ``softmax_blocks="chunk_causal"``).
    """
    cfg = get_rehyat_config(transformer)
    if cfg is None:
        raise ValueError("a plain Wan transformer is not causal and cannot run recurrently (mode 'recurrent' or "
                         "'streaming'): generate with mode 'parallel', or convert it first")
    problem = cfg.recurrence_problem(len(transformer.blocks))
    if problem is not None:
        raise ValueError(f"this ReHyAt model is not causal and cannot run recurrently: {problem}; as it is, it "
                         "generates in parallel mode only")
    return runner_chunk_frames(transformer)


@torch.no_grad()
def forward_chunk(
    transformer,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    state: TransformerState | None = None,
) -> tuple[torch.Tensor, TransformerState]:
    """Run one chunk of latent frames through the whole transformer.

    Args:
        transformer: a converted, causal transformer (see :func:`check_recurrent`).
        latents: ``[B, C, F_c, H, W]``, the chunk's latent frames (F_c a multiple of the runner chunk, or the last
            chunk of the video).
        timestep: ``[B]`` diffusion timesteps, as for ``WanTransformer3DModel.forward``.
        encoder_hidden_states: ``[B, L, text_dim]`` text embeddings.
        state: the state after the previous chunks (``None``: this chunk starts the video). Not modified.

    Returns:
        ``(output [B, C_out, F_c, H, W], new_state)``.

    Raises:
        ValueError: a model that is not causal (:func:`check_recurrent`).
    """
    check_recurrent(transformer)
    return _forward_chunk(transformer, latents, timestep, encoder_hidden_states, state)


@torch.no_grad()
def _forward_chunk(transformer, latents, timestep, encoder_hidden_states, state):
    """:func:`forward_chunk` without :func:`check_recurrent`: for callers that checked ``transformer`` once before
    any work (:func:`recurrent_forward`, the pipeline's streaming mode) and run it chunk after chunk."""
    state = TransformerState() if state is None else state
    with recurrent_mode(transformer, frame_offset=state.frames_seen, states=dict(state.block_states)) as ctx:
        out = transformer(latents, timestep, encoder_hidden_states, return_dict=False)[0]
        new_states = ctx.states
    return out, TransformerState(new_states, state.frames_seen + latents.shape[2])


@torch.no_grad()
def recurrent_forward(
    transformer,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor],
    *,
    chunk_frames: int | None = None,
) -> torch.Tensor:
    """The transformer's forward computed chunk by chunk with constant-size state (the RNN form).

    Args:
        latents: ``[B, C, F, H, W]``; timestep ``[B]``.
        encoder_hidden_states: text embeddings ``[B, L, text_dim]``, or a sequence of them, one per chunk of
            ``chunk_frames`` (ceil(F / chunk_frames) of them): the text conditioning then changes between chunks
            while the state carries over (a prompt schedule).
        chunk_frames: latent frames per call, a multiple of the model's runner chunk (default: the runner chunk,
            the least common multiple of the blocks' ``chunk_frames``).

    Returns:
        ``[B, C_out, F, H, W]``, equal to ``transformer(latents, timestep, encoder_hidden_states)`` of the same
        causal model.

    Raises:
        ValueError: a model that is not causal (:func:`check_recurrent`), ``chunk_frames`` not a positive
            multiple of the runner chunk, or per-chunk embeddings not one per chunk.
    """
    base = check_recurrent(transformer)
    return _recurrent_forward(transformer, latents, timestep, encoder_hidden_states, chunk_frames=chunk_frames,
                              runner_chunk=base)


@torch.no_grad()
def _recurrent_forward(transformer, latents, timestep, encoder_hidden_states, *, chunk_frames, runner_chunk: int):
    """:func:`recurrent_forward` of a transformer whose :func:`check_recurrent` returned ``runner_chunk``: for callers
    that checked it once before any work (the pipeline's recurrent mode, one call per denoising step)."""
    base = runner_chunk
    chunk_frames = base if chunk_frames is None else chunk_frames
    if not isinstance(chunk_frames, int) or chunk_frames < 1 or chunk_frames % base != 0:
        raise ValueError(f"chunk_frames must be a positive multiple of the model's runner chunk ({base}), got {chunk_frames!r}")
    starts = range(0, latents.shape[2], chunk_frames)
    texts = [encoder_hidden_states] * len(starts) if torch.is_tensor(encoder_hidden_states) else encoder_hidden_states
    if len(texts) != len(starts):
        raise ValueError(f"encoder_hidden_states must be one tensor or one per chunk of {chunk_frames} latent frames "
                         f"({len(starts)} for {latents.shape[2]} frames), got {len(texts)}")
    state = None
    outs = []
    for f0, text in zip(starts, texts):
        out, state = _forward_chunk(transformer, latents[:, :, f0 : f0 + chunk_frames], timestep, text, state)
        outs.append(out)
    return torch.cat(outs, dim=2)

"""ReHyAt inside diffusers' Wan2.1 transformer (``WanTransformer3DModel``): processors, conversion, save and load.

Conversion swaps the self-attention processor (``blocks[i].attn1``) of the chosen blocks for a
:class:`ReHyAtAttnProcessor`, an ``nn.Module`` that owns the block's feature maps ``phi_q``, ``phi_k`` (so they sit
in the transformer's ``state_dict`` under ``blocks.{i}.attn1.processor.*`` and train with it) and calls
:func:`rehyat.ops.rehyat_attention`. The teacher's weights are not touched. Unconverted blocks keep the teacher's
bidirectional softmax, or get a :class:`ChunkCausalAttnProcessor` (block-causal softmax, design section 6) so that
the whole model is chunk-causal and can run as an RNN (:mod:`rehyat.models.runner`).

The processors need the number of tokens per latent frame, which a diffusers processor does not receive; a forward
pre-hook on the transformer reads it from the latents ``[B, C, F, H, W]`` into a :class:`RunContext` shared by all
processors of the model. The same context carries the run mode (parallel or recurrent), the recurrent states and
the distillation switch. RoPE is replaced by :class:`AbsoluteRotaryPosEmbed`, which computes the teacher's exact
frequencies for absolute frame positions (chunk start as offset, no 1,024-frame table limit).

Where the conversion settings live. :func:`convert_wan` registers them in the transformer's diffusers config
(``transformer.config["rehyat"]``, a :meth:`ReHyAtConfig.to_dict`), so ``config.json`` written by ANY
``save_pretrained`` (the transformer's own, diffusers' ``WanPipeline``'s, ours) carries them beside the feature-map
weights the same call writes: a converted model cannot be saved as a teacher by accident. :func:`save_rehyat` also keeps
writing ``rehyat_config.json``, the only home of the settings in folders saved before (the student shipped until
2026-12-04 among them), so those and older readers keep working. :func:`read_rehyat_settings` is the one reader: it
accepts either source and refuses two that disagree. Loading is strict (:func:`load_transformer`): the weight keys must
be exactly those of the model the settings describe (feature maps without settings, settings without feature maps,
missing or unexpected keys are one-line errors), since diffusers would otherwise drop unknown keys with a warning and
leave missing ones uninitialised. diffusers 0.42.1 ignores the unknown ``"rehyat"`` config entry with a warning (and
copies it into the loaded model's config), so ``WanTransformer3DModel.from_pretrained`` of a ReHyAt folder still gives
the plain teacher to users without rehyat.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import FEATURE_MAPS, make_feature_map
from ..ops import RecurrentState, rehyat_attention, rehyat_attention_step
from ..ops.mass import attention_mass
from ..ops._checks import check_linear_norm_frames, check_settings

__all__ = [
    "ReHyAtConfig",
    "RunContext",
    "distill_mode",
    "recurrent_mode",
    "AbsoluteRotaryPosEmbed",
    "ReHyAtAttnProcessor",
    "ChunkCausalAttnProcessor",
    "convert_wan",
    "get_rehyat_config",
    "get_context",
    "save_rehyat",
    "set_linear_norm_frames",
    "load_transformer",
    "read_wan_config",
    "read_rehyat_settings",
    "REHYAT_CONFIG_NAME",
    "REHYAT_CONFIG_KEY",
]

REHYAT_CONFIG_NAME = "rehyat_config.json"
REHYAT_CONFIG_KEY = "rehyat"  # the settings' entry in the transformer's diffusers config (config.json)
UNBOUNDED = sys.maxsize  # overlap of a chunk-causal softmax block: every earlier frame stays in the window
SOFTMAX_BLOCKS = ("bidirectional", "chunk_causal")
FEATURE_MAP_INPUTS = ("rotated", "unrotated", "spatial")
TEACHER_ATTENTION = ("bidirectional", "chunk_causal")


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReHyAtConfig:
    """What a conversion did; saved in the transformer's ``config.json`` (entry ``"rehyat"``) and, by
    :func:`save_rehyat`, as ``rehyat_config.json`` beside it. Its fields are :func:`convert_wan`'s keyword arguments.

    Attributes:
        blocks: indices of the converted blocks (sorted).
        chunk_frames: T_c, latent frames per chunk (default of every converted block, and the chunk of the
            chunk-causal softmax blocks).
        overlap_frames: T_o, default of every converted block.
        block_settings: per-block overrides ``{block: {"chunk_frames": .., "overlap_frames": ..}}`` (the knapsack
            block selection picks these); keys are ints in memory, strings in JSON. With ``softmax_blocks=
            "chunk_causal"`` an unconverted block may have ``{"overlap_frames": T_o}``: its softmax window is then
            its chunk plus T_o earlier frames, nothing further back (default: every earlier frame).
        causal: causal (True, recurrent) or bidirectional linear keys.
        stabilizer: ``"lse"`` or ``"max"`` (design section 3).
        feature_map: ``"polynomial"`` or ``"hedgehog"``; ``feature_map_kwargs`` go to its constructor.
        feature_map_input: ``"rotated"`` (phi sees q, k after RoPE, as the teacher's attention does),
            ``"unrotated"`` (before RoPE) or ``"spatial"`` (after RoPE's height and width rotations only, so the
            linear branch does not depend on absolute frame positions: design section 4).
        softmax_blocks: unconverted blocks stay ``"bidirectional"`` (the teacher) or become ``"chunk_causal"``.
        teacher_attention: the attention of the model that was converted: ``"bidirectional"`` (a softmax DiT such
            as Wan2.1) or ``"chunk_causal"`` (a block-causal model, e.g. the embedded teacher, converted further by
            :func:`convert_wan`); distillation fits each converted block to that attention.
        linear_scale: each converted block has a learned per-head scale of its linear branch
            (``processor.linear_log_scale [H]``, design section 4); a folder whose ``rehyat_config.json`` does not
            name this key was written before it existed and has none (read as False).
        linear_norm_frames: ``None`` (plain sums, the paper's) or H >= 1: a converted block's linear sums over
            ``n > H`` frames are scaled by ``H / n`` (design section 3, "The linear branch at length"); causal only.
            Set it to the most frames the training clips put into the linear branch to keep that branch's mass at
            longer lengths; :func:`set_linear_norm_frames` changes it on a converted model.
    """

    blocks: list[int]
    chunk_frames: int = 3
    overlap_frames: int = 1
    block_settings: dict[int, dict[str, int]] = field(default_factory=dict)
    causal: bool = True
    stabilizer: str = "lse"
    feature_map: str = "polynomial"
    feature_map_kwargs: dict = field(default_factory=dict)
    feature_map_input: str = "rotated"
    softmax_blocks: str = "bidirectional"
    teacher_attention: str = "bidirectional"
    linear_scale: bool = True
    linear_norm_frames: int | None = None

    def settings_for(self, block: int) -> tuple[int, int]:
        """``(chunk_frames, overlap_frames)`` of a converted block."""
        s = self.block_settings.get(block, {})
        return s.get("chunk_frames", self.chunk_frames), s.get("overlap_frames", self.overlap_frames)

    def recurrence_problem(self, num_blocks: int) -> str | None:
        """Why a transformer of ``num_blocks`` blocks converted this way cannot run chunk by chunk (recurrent and
        streaming generation), or ``None`` when every block is chunk-causal and it can."""
        if not self.causal:
            return "it uses bidirectional linear attention (converted with causal=False)"
        kept = [] if self.softmax_blocks == "chunk_causal" else sorted(set(range(num_blocks)) - set(self.blocks))
        if kept:
            return (f"blocks {kept} keep bidirectional softmax attention: convert them too, or convert with "
                    "softmax_blocks='chunk_causal' (rehyat distill / convert: --softmax-blocks chunk_causal)")
        return None

    def runner_chunk_frames(self) -> int:
        """Latent frames per chunk of the recurrent runner: the least common multiple of every chunked block's
        ``chunk_frames`` (the converted blocks', and ``chunk_frames`` of chunk-causal softmax blocks)."""
        sizes = [self.settings_for(b)[0] for b in self.blocks]
        if self.softmax_blocks == "chunk_causal":
            sizes.append(self.chunk_frames)
        return math.lcm(*sizes) if sizes else self.chunk_frames

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_settings"] = {str(b): dict(s) for b, s in self.block_settings.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ReHyAtConfig":
        d = dict(d)
        d["block_settings"] = {int(b): dict(s) for b, s in d.get("block_settings", {}).items()}
        d.setdefault("linear_scale", False)  # written before the learned linear scale existed
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ReHyAt settings {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)

    def conversion_kwargs(self) -> dict:
        """The keyword arguments of :func:`convert_wan` that redo this conversion."""
        return asdict(self)


class RunContext:
    """Per-model run state shared by the processors of one converted transformer.

    Attributes:
        frame_tokens: S, tokens per latent frame of the current forward (set by the transformer's pre-hook).
        frame_offset: absolute index of the first latent frame of the current forward (recurrent mode).
        mode: ``"parallel"`` (all frames at once) or ``"recurrent"`` (this forward is one chunk; states below).
        states: per-block recurrent state (``RecurrentState``), read and replaced by the processors.
        distill: when True, converted blocks return the teacher's softmax output (teacher forcing) and record the
            student's error in ``records`` (``l1``, ``rel_error``); with ``distill_backward`` they also backpropagate
            ``distill_loss`` into their feature maps right away (one teacher forward trains every block).
        distill_loss: ``loss(student, teacher, mass) -> scalar tensor`` of one converted block in distillation mode
            (``student``, ``teacher``: its hybrid output, with grad, and the teacher's attention output, both
            ``[B, N, H, D]``; ``mass``: :func:`rehyat.ops.attention_mass`'s dict when ``measure_mass`` or
            ``mass_weight`` asks for it, else ``None``), backpropagated with ``distill_backward``. The loss is the
            caller's (training: :func:`rehyat.training.distill.attention_distill_loss`); ``None`` outside training.
        compile_step: recurrent mode runs the attention step through ``torch.compile``
            (``rehyat_attention_step(..., compiled=True)``); set by :func:`rehyat.models.compile_blocks`.
        mass_weight: in distillation mode, weight of the mass term of each converted block's loss (the mean L1 gap
            between its linear share and softmax's share of the same keys on the sampled queries): when nonzero,
            the blocks compute the mass and pass it to ``distill_loss``.
        teacher_chunk_frames: the chunk of a block-causal teacher (``ReHyAtConfig.teacher_attention ==
            "chunk_causal"``), ``None`` for a bidirectional one: what distillation mode returns as the teacher's
            attention (:func:`teacher_attention_output`).
        measure_mass: in distillation mode, converted blocks also record where their joint normaliser's mass goes
            (:func:`rehyat.ops.attention_mass`: ``linear_share``, ``teacher_share``, ``teacher_mass`` and the
            sampled queries' ``masses`` ``{"linear", "teacher_linear": [B, n, H] CPU tensors}`` in ``records``).
    """

    def __init__(self) -> None:
        self.frame_tokens: int | None = None
        self.frame_offset: int = 0
        self.mode: str = "parallel"
        self.states: dict[int, RecurrentState] = {}
        self.distill: bool = False
        self.distill_backward: bool = False
        self.distill_loss: Callable | None = None
        self.records: dict[int, dict[str, float]] = {}
        self.compile_step: bool = False
        self.measure_mass: bool = False
        self.mass_weight: float = 0.0
        self.teacher_chunk_frames: int | None = None


def _context_of(model_or_context) -> RunContext:
    return model_or_context if isinstance(model_or_context, RunContext) else get_context(model_or_context)


@contextmanager
def distill_mode(model_or_context, *, backward: bool = False, measure_mass: bool = False, mass_weight: float = 0.0,
                 loss: Callable | None = None):
    """Run a converted transformer in distillation mode inside the ``with`` block (:class:`RunContext`
    ``distill``; see there): teacher forcing, every converted block records its error in ``records`` (emptied on
    entry, kept on exit for the caller to read).

    Args:
        model_or_context: a converted transformer or its :class:`RunContext` (ValueError for a plain transformer).
        backward: each block also backpropagates ``loss`` into its feature maps (``distill_backward``); a block
            run with ``backward`` and no ``loss`` raises ValueError.
        measure_mass: record the mass diagnostic too (``measure_mass``).
        mass_weight: weight of the mass term in each block's loss (``mass_weight``; the blocks then pass the mass
            to ``loss``).
        loss: each block's loss (``distill_loss``; see :class:`RunContext`), e.g.
            :func:`rehyat.training.distill.attention_distill_loss`.

    On exit, also by an exception, ``distill``, ``distill_backward`` and ``measure_mass`` are False, ``mass_weight``
    is 0 and ``distill_loss`` ``None`` again. Yields the context.
    """
    ctx = _context_of(model_or_context)
    ctx.distill, ctx.distill_backward, ctx.measure_mass = True, bool(backward), bool(measure_mass)
    ctx.mass_weight, ctx.distill_loss, ctx.records = float(mass_weight), loss, {}
    try:
        yield ctx
    finally:
        ctx.distill = ctx.distill_backward = ctx.measure_mass = False
        ctx.mass_weight, ctx.distill_loss = 0.0, None


@contextmanager
def recurrent_mode(model_or_context, *, frame_offset: int, states: dict):
    """Run a converted transformer in recurrent mode inside the ``with`` block: each forward is one chunk whose
    first latent frame is ``frame_offset``, starting from the per-block ``states`` (:class:`RunContext` ``mode``,
    ``frame_offset``, ``states``; the processors replace ``ctx.states`` with the states after the chunk, read them
    inside the block). On exit, also by an exception, the context is back in parallel mode (offset 0, no states).
    Yields the context; ValueError for a plain transformer."""
    ctx = _context_of(model_or_context)
    ctx.mode, ctx.frame_offset, ctx.states = "recurrent", frame_offset, states
    try:
        yield ctx
    finally:
        ctx.mode, ctx.frame_offset, ctx.states = "parallel", 0, {}


# ----------------------------------------------------------------------------------------------------------------
# RoPE at absolute frame positions
# ----------------------------------------------------------------------------------------------------------------
def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head's channels between RoPE's time, height and width axes ``(t, h, w)``: h = w =
    2 * (D // 6), t the rest (Wan2.1's D = 128: 44 / 42 / 42); the time channels come first."""
    h = 2 * (head_dim // 6)
    return head_dim - 2 * h, h, h


class AbsoluteRotaryPosEmbed(nn.Module):
    """Wan's 3-D RoPE computed for absolute positions instead of read from a precomputed table.

    Same frequencies as diffusers' ``WanRotaryPosEmbed`` (head dim split t/h/w with h = w = 2*(D//6), theta
    10,000, interleaved pairs, computed in float64 then cast to float32, through diffusers'
    ``get_1d_rotary_pos_embed``), so for frames below the teacher's ``rope_max_seq_len`` it returns the teacher's
    values; frame positions start at ``context.frame_offset`` and are not limited by any table.

    ``forward(hidden_states [B, C, F, H, W]) -> (cos, sin)``, each ``[1, F*H*W/(p_t p_h p_w), 1, D]`` float32.
    """

    def __init__(self, attention_head_dim: int, patch_size, context: RunContext, theta: float = 10000.0) -> None:
        super().__init__()
        self.attention_head_dim = attention_head_dim
        self.patch_size = tuple(patch_size)
        self.theta = theta
        self.t_dim, self.h_dim, self.w_dim = rope_axis_dims(attention_head_dim)
        self.context = context

    def _axis(self, dim: int, start: int, length: int, device):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
        return get_1d_rotary_pos_embed(
            dim, pos, self.theta, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
        )

    def forward(self, hidden_states: torch.Tensor):
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        dev = hidden_states.device
        (cf, sf) = self._axis(self.t_dim, self.context.frame_offset, ppf, dev)
        (ch, sh) = self._axis(self.h_dim, 0, pph, dev)
        (cw, sw) = self._axis(self.w_dim, 0, ppw, dev)

        def grid(f, h, w):
            f = f.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            h = h.view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            w = w.view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            return torch.cat([f, h, w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1)

        return grid(cf, ch, cw), grid(sf, sh, sw)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``[B, N, H, D]`` by ``(cos, sin)`` ``[1, N, 1, D]`` (Wan's RoPE)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def spatial_rotary(rotary_emb, head_dim: int):
    """RoPE's ``(cos, sin)`` ``[1, N, 1, D]`` with the temporal rotation removed (cos 1, sin 0 on the time channels,
    :func:`rope_axis_dims`): the height and width rotations only, the same at every frame position."""
    t_dim = rope_axis_dims(head_dim)[0]
    cos, sin = (x.clone() for x in rotary_emb)
    cos[..., :t_dim], sin[..., :t_dim] = 1.0, 0.0
    return cos, sin


def _project_qkv(attn, hidden_states, rotary_emb, feature_map_input: str = "unrotated"):
    """The teacher's q, k, v for self-attention, as in diffusers' ``WanAttnProcessor``, and what the feature maps
    see of q and k besides the rotated ones.

    Returns ``(q, k, v, q_phi, k_phi)``, each ``[B, N, H, D]``: ``q_phi, k_phi`` are q, k before RoPE
    (``feature_map_input="unrotated"`` or ``"rotated"``, where the processor uses q, k themselves) or after its
    height and width rotations only (``"spatial"``, :func:`spatial_rotary`).
    """
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    q_rot, k_rot, q_phi, k_phi = query, key, query, key
    if rotary_emb is not None:
        q_rot = apply_rotary_emb(query, *rotary_emb)
        k_rot = apply_rotary_emb(key, *rotary_emb)
        if feature_map_input == "spatial":
            spatial = spatial_rotary(rotary_emb, query.shape[-1])
            q_phi, k_phi = apply_rotary_emb(query, *spatial), apply_rotary_emb(key, *spatial)
    return q_rot, k_rot, value, q_phi, k_phi


def _out(attn, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    y = y.flatten(2, 3).type_as(like)
    return attn.to_out[1](attn.to_out[0](y))


def teacher_attention_output(q, k, v, frame_tokens: int, teacher_chunk_frames: int | None):
    """The teacher's self-attention output ``[B, N, H, D]`` on ``q, k, v [B, N, H, D]``: full bidirectional softmax
    through SDPA (what diffusers' ``WanAttnProcessor`` computes) for ``teacher_chunk_frames=None``, else
    block-causal softmax with chunks of that many frames (what :class:`ChunkCausalAttnProcessor` computes)."""
    if teacher_chunk_frames is None:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    empty = q.new_zeros(*q.shape[:3], 0, dtype=torch.float32)
    return rehyat_attention(q, k, v, empty, empty, frame_tokens=frame_tokens, chunk_frames=teacher_chunk_frames,
                            overlap_frames=q.shape[1] // frame_tokens)


class _ChunkedProcessorBase(nn.Module):
    """Shared plumbing: projections, RoPE, parallel or recurrent dispatch, output projection."""

    feature_map_input = "rotated"  # what the feature maps see of q, k (a converted block sets its own)
    linear_norm_frames = None  # length normalisation of the linear branch (a converted block sets its own)

    def __init__(self, block_index: int, chunk_frames: int, overlap_frames: int, stabilizer: str, context: RunContext):
        super().__init__()
        self.block_index = block_index
        self.chunk_frames = chunk_frames
        self.overlap_frames = overlap_frames
        self.stabilizer = stabilizer
        # A plain attribute, not a submodule: the context holds no weights.
        object.__setattr__(self, "context", context)

    def features(self, q, k, q_phi, k_phi):  # pragma: no cover - overridden
        raise NotImplementedError

    def _frame_tokens(self) -> int:
        s = self.context.frame_tokens
        if s is None:
            raise RuntimeError(
                "ReHyAt processors need the tokens per frame: call the converted transformer itself "
                "(its forward pre-hook sets them), not the attention module alone"
            )
        return s

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} is a self-attention processor: encoder_hidden_states and attention_mask "
                "must be None"
            )
        S = self._frame_tokens()
        q, k, v, q_phi, k_phi = _project_qkv(attn, hidden_states, rotary_emb, self.feature_map_input)
        ctx = self.context
        if ctx.mode == "recurrent":
            y = self._recurrent(q, k, v, q_phi, k_phi, S)
        else:
            y = self._parallel(q, k, v, q_phi, k_phi, S)
        return _out(attn, y, q)

    def _parallel(self, q, k, v, q_phi, k_phi, S):
        return self._hybrid(q, k, v, *self.features(q, k, q_phi, k_phi), S)

    def _hybrid(self, q, k, v, fq, fk, S):
        T = q.shape[1] // S
        return rehyat_attention(
            q, k, v, fq, fk, frame_tokens=S, chunk_frames=self.chunk_frames,
            overlap_frames=min(self.overlap_frames, T), causal=self.causal, stabilizer=self.stabilizer,
            linear_norm_frames=self.linear_norm_frames,
        )

    # Not traced by torch.compile (a graph break around it, a no-op in eager code): the chunk's state lives in the
    # shared context's dict and its frame counters change every chunk, so tracing it would recompile the block for
    # every chunk position (see rehyat.models.compile_blocks).
    @torch.compiler.disable
    def _recurrent(self, q, k, v, q_phi, k_phi, S):
        ctx = self.context
        if not self.causal:
            raise RuntimeError(f"block {self.block_index} is bidirectional and cannot run recurrently")
        state = ctx.states.get(self.block_index)
        seen = 0 if state is None else state.frames_seen
        if seen != ctx.frame_offset:
            raise RuntimeError(
                f"block {self.block_index}: state has seen {seen} frames but this chunk starts at frame "
                f"{ctx.frame_offset}; pass the states of the previous chunk"
            )
        if seen % self.chunk_frames != 0:
            raise RuntimeError(
                f"block {self.block_index}: chunk start frame {seen} is not a multiple of its chunk_frames "
                f"({self.chunk_frames})"
            )
        fq, fk = self.features(q, k, q_phi, k_phi)
        step = self.chunk_frames * S
        outs = []
        for i in range(0, q.shape[1], step):
            sl = slice(i, i + step)
            y, state = rehyat_attention_step(
                q[:, sl], k[:, sl], v[:, sl], fq[:, sl], fk[:, sl], state,
                frame_tokens=S, overlap_frames=self.overlap_frames, stabilizer=self.stabilizer,
                compiled=ctx.compile_step, linear_norm_frames=self.linear_norm_frames,
            )
            outs.append(y)
        ctx.states[self.block_index] = state
        return torch.cat(outs, dim=1)


class ReHyAtAttnProcessor(_ChunkedProcessorBase):
    """Self-attention processor of a converted Wan block: ReHyAt hybrid attention with learned feature maps.

    Callable like any diffusers processor: ``(attn, hidden_states [B, N, dim], encoder_hidden_states=None,
    attention_mask=None, rotary_emb=(cos, sin)) -> [B, N, dim]``. q, k, v come from the teacher's projections and
    qk-norm exactly as in ``WanAttnProcessor``; the feature maps ``feature_map_q``, ``feature_map_k`` (per head,
    ``[B, N, H, D] -> [B, N, H, D']``) are this module's parameters.

    Modes (from the shared :class:`RunContext`): parallel (:func:`rehyat.ops.rehyat_attention` over all frames),
    recurrent (:func:`rehyat.ops.rehyat_attention_step` per chunk, state in ``context.states[block_index]``), and
    distillation (returns the teacher's softmax output, records the student's error and optionally backpropagates
    the context's ``distill_loss`` of the two outputs, design section 7).

    With ``linear_scale=True`` (default) the processor also owns ``linear_log_scale [H]`` (float, init 0): the
    linear branch of head ``h`` is multiplied by ``exp(linear_log_scale[h])`` (folded into ``phi_k``, so every
    path computes the same thing), design section 4. Distillation first calibrates it so the linear branch takes
    the share of the normaliser that softmax gives the same keys, then trains it with the feature maps.
    """

    def __init__(
        self,
        block_index: int,
        num_heads: int,
        head_dim: int,
        *,
        chunk_frames: int,
        overlap_frames: int,
        causal: bool,
        stabilizer: str,
        feature_map: str,
        feature_map_kwargs: dict,
        feature_map_input: str,
        context: RunContext,
        linear_scale: bool = True,
        linear_norm_frames: int | None = None,
    ) -> None:
        super().__init__(block_index, chunk_frames, overlap_frames, stabilizer, context)
        self.causal = causal
        self.linear_norm_frames = linear_norm_frames
        self.feature_map_input = feature_map_input
        self.feature_map_q = make_feature_map(feature_map, num_heads, head_dim, **feature_map_kwargs)
        self.feature_map_k = make_feature_map(feature_map, num_heads, head_dim, **feature_map_kwargs)
        self.linear_log_scale = nn.Parameter(torch.zeros(num_heads)) if linear_scale else None

    def features(self, q, k, q_phi, k_phi):
        """``(phi_q(q), exp(linear_log_scale) * phi_k(k))``, each ``[B, N, H, D']``; phi sees the rotated ``q, k``
        or, for ``feature_map_input`` ``"unrotated"`` / ``"spatial"``, ``q_phi, k_phi`` (:func:`_project_qkv`)."""
        if self.feature_map_input != "rotated":
            q, k = q_phi, k_phi
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        if self.linear_log_scale is not None:
            fk = fk * self.linear_log_scale.exp().to(fk.dtype)[:, None]
        return fq, fk

    def attention_mass(self, q, k, fq, fk, S) -> dict:
        """:func:`rehyat.ops.attention_mass` of this block's settings on ``q, k [B, N, H, D]`` and features."""
        T = q.shape[1] // S
        return attention_mass(q, k, fq, fk, frame_tokens=S, chunk_frames=self.chunk_frames,
                              overlap_frames=min(self.overlap_frames, T), causal=self.causal,
                              stabilizer=self.stabilizer, linear_norm_frames=self.linear_norm_frames)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        if not self.context.distill:
            return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)
        return self._distill(attn, hidden_states, rotary_emb)

    def _distill(self, attn, hidden_states, rotary_emb):
        """Teacher forcing: return the teacher's output and record how far the hybrid output is from it; with
        ``context.distill_backward``, backpropagate ``context.distill_loss(student, teacher, mass)`` (the
        training's loss) into the feature maps."""
        S, ctx = self._frame_tokens(), self.context
        if ctx.distill_backward and ctx.distill_loss is None:
            raise ValueError("distillation with backward=True needs a loss: distill_mode(..., loss=...), e.g. "
                             "rehyat.training.distill.attention_distill_loss")
        with torch.no_grad():
            q, k, v, q_phi, k_phi = _project_qkv(attn, hidden_states, rotary_emb, self.feature_map_input)
            teacher = teacher_attention_output(q, k, v, S, ctx.teacher_chunk_frames)
        mass = None
        with torch.enable_grad():
            fq, fk = self.features(q, k, q_phi, k_phi)
            student = self._hybrid(q, k, v, fq, fk, S)
            if ctx.measure_mass or ctx.mass_weight:
                mass = self.attention_mass(q, k, fq, fk, S)
            if ctx.distill_backward:
                loss = ctx.distill_loss(student, teacher, mass)
                if loss.requires_grad:
                    loss.backward()
        ctx.records[self.block_index] = self._record(student.detach(), teacher, mass if ctx.measure_mass else None)
        return _out(attn, teacher, q)

    @torch.no_grad()
    def _record(self, student, teacher, mass) -> dict:
        """``{"l1", "rel_error"}`` of the student's output against the teacher's (the mean absolute error, the
        per-sample relative L2 error averaged), with the mass diagnostic when ``mass`` is given."""
        l1 = (student.float() - teacher.float()).abs().mean()
        diff = (student.float() - teacher.float()).flatten(1).norm(dim=1)
        rel = (diff / teacher.float().flatten(1).norm(dim=1).clamp_min(1e-30)).mean()
        record = {"l1": float(l1), "rel_error": float(rel)}
        if mass is not None:
            mass = {key: t.detach() for key, t in mass.items()}
            record.update(mass_summary(mass, self.context.teacher_chunk_frames is not None),
                          masses={key: mass[key].cpu() for key in ("linear", "teacher_linear")})
        return record


def mass_summary(mass: dict, causal_teacher: bool = False) -> dict:
    """Means over the sampled queries of :func:`rehyat.ops.attention_mass`'s output (NaN when there are none).

    Returns ``linear_share`` (the hybrid's linear branch: ``linear / (window + linear)``), ``teacher_share``
    (softmax over the same keys: ``teacher_linear / (window + teacher_linear)``) and ``teacher_mass`` (the
    teacher's own attention on the linear keys: a bidirectional teacher also attends to the keys in neither set,
    a block-causal one (``causal_teacher``) attends to exactly the hybrid's keys, so there it is ``teacher_share``).
    """
    win, lin, t_lin = mass["window"], mass["linear"], mass["teacher_linear"]
    rest = 0 if causal_teacher else mass["teacher_rest"]
    mean = lambda x: float(x.mean()) if x.numel() else float("nan")  # noqa: E731
    return {
        "linear_share": mean(lin / (win + lin)),
        "teacher_share": mean(t_lin / (win + t_lin)),
        "teacher_mass": mean(t_lin / (win + t_lin + rest)),
    }


#: the linear share may differ from softmax's over the same keys by this much before distill / eval warn
MASS_WARN_GAP = 0.15


def mass_warnings(records: dict[int, dict[str, float]], gap: float = MASS_WARN_GAP) -> list[str]:
    """One line per block whose linear share differs from softmax's share of the same keys by more than ``gap``."""
    out = []
    for b, r in records.items():
        lin, ref = r.get("linear_share"), r.get("teacher_share")
        if lin is not None and ref is not None and abs(lin - ref) > gap:
            out.append(f"block {b}: the linear branch takes {lin:.3f} of the attention mass where softmax over the "
                       f"same keys gives {ref:.3f} (gap > {gap})")
    return out


class ChunkCausalAttnProcessor(_ChunkedProcessorBase):
    """Block-causal softmax for an unconverted block (CausVid-style): chunk c attends to every frame up to its end,
    or, with a finite ``overlap_frames`` T_o, to its own frames and the T_o frames before them only (a sliding
    softmax window; nothing further back is attended at all).

    This is the ReHyAt operator with no linear branch, so it shares the hybrid code path. In recurrent mode its K/V
    cache holds every frame seen (``overlap_frames=UNBOUNDED``, the default: memory grows with the video) or the
    last T_o frames (a finite window: memory flat in the video length, as a converted block's state).
    """

    causal = True

    def __init__(self, block_index: int, *, chunk_frames: int, context: RunContext,
                 overlap_frames: int = UNBOUNDED) -> None:
        super().__init__(block_index, chunk_frames, overlap_frames, "lse", context)

    def features(self, q, k, q_phi, k_phi):
        empty = q.new_zeros(*q.shape[:3], 0, dtype=torch.float32)
        return empty, empty

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        if self.context.distill:
            # Distillation runs the teacher's forward: an unconverted block answers as the teacher's attention
            # (bidirectional softmax, or its own block-causal one), so every converted block sees the teacher's
            # activations.
            q, k, v, _, _ = _project_qkv(attn, hidden_states, rotary_emb)
            return _out(attn, teacher_attention_output(q, k, v, self._frame_tokens(), self.context.teacher_chunk_frames), q)
        return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Conversion, save, load
# ----------------------------------------------------------------------------------------------------------------
def _frame_tokens_hook(module, args, kwargs):
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if hs is None or hs.dim() != 5:
        raise ValueError("hidden_states must be latents [B, C, F, H, W]")
    _, p_h, p_w = module.config.patch_size
    h, w = hs.shape[-2:]
    ctx = module._rehyat_context
    ctx.frame_tokens = (h // p_h) * (w // p_w)


def _is_wan_transformer(transformer) -> bool:
    return type(transformer).__name__ == "WanTransformer3DModel" or hasattr(transformer, "blocks") and hasattr(
        transformer, "rope"
    )


def convert_wan(
    transformer,
    *,
    blocks="all",
    chunk_frames: int = 3,
    overlap_frames: int = 1,
    causal: bool = True,
    stabilizer: str = "lse",
    feature_map: str = "polynomial",
    feature_map_kwargs: dict | None = None,
    feature_map_input: str = "rotated",
    softmax_blocks: str = "bidirectional",
    block_settings: dict | None = None,
    linear_scale: bool = True,
    teacher_attention: str | None = None,
    linear_norm_frames: int | None = None,
):
    """Convert a diffusers ``WanTransformer3DModel`` to ReHyAt, in place (design sections 5 and 6).

    Args:
        transformer: the teacher, a ``WanTransformer3DModel`` with temporal patch size 1 (Wan2.1's (1, 2, 2)).
        blocks: ``"all"`` or an iterable of block indices to convert.
        chunk_frames, overlap_frames: T_c >= 1 and T_o >= 0, in latent frames (design section 2).
        causal: causal (recurrent) or bidirectional linear keys.
        stabilizer: ``"lse"`` (default) or ``"max"``.
        feature_map: ``"polynomial"`` (the paper's, default) or ``"hedgehog"``; ``feature_map_kwargs`` go to it.
        feature_map_input: ``"rotated"`` (default: phi sees q, k after RoPE), ``"unrotated"`` or ``"spatial"``
            (RoPE's height and width rotations only: the linear branch is the same at every frame position).
        softmax_blocks: unconverted blocks stay ``"bidirectional"`` or become ``"chunk_causal"`` (needed to run a
            partly converted model recurrently).
        block_settings: optional per-block ``{"chunk_frames": .., "overlap_frames": ..}`` overrides of converted
            blocks; with ``softmax_blocks="chunk_causal"`` also ``{"overlap_frames": T_o}`` of an unconverted block
            (a sliding softmax window of its chunk and T_o earlier frames, and a K/V cache of T_o frames when
            streaming, instead of every earlier frame).
        linear_scale: give every converted block a learned per-head scale of its linear branch (default True;
            initialised to 1, calibrated by distillation, design section 4).
        teacher_attention: what the converted blocks are distilled against: ``None`` (default) takes it from the
            model (``"chunk_causal"`` for a block-causal model, else ``"bidirectional"``); ``"chunk_causal"`` on a
            plain model says its weights were trained block-causal (a saved student of such a teacher, reloaded).
        linear_norm_frames: ``None`` (default) or H >= 1 latent frames: the length normalisation of every converted
            block's linear branch (:class:`ReHyAtConfig`; causal only).

    Returns:
        The same transformer, with converted processors (feature maps in the transformer's dtype and device),
        the :class:`AbsoluteRotaryPosEmbed`, the frame-size pre-hook, ``transformer.rehyat_config`` and the same
        settings as a dict in ``transformer.config["rehyat"]`` (so ``save_pretrained`` saves them).

    Raises:
        ValueError: an already converted model (other than a block-causal one with no converted block, which is
            converted further as a causal teacher: ``softmax_blocks="chunk_causal"`` with its ``chunk_frames``,
            ``teacher_attention`` ``"chunk_causal"``), a model that is not a Wan transformer, a block index out of
            range, or a bad setting, before anything is changed.
    """
    cfg, teacher_chunk = _conversion_config(
        transformer, blocks=blocks, chunk_frames=chunk_frames, overlap_frames=overlap_frames, causal=causal,
        stabilizer=stabilizer, feature_map=feature_map, feature_map_kwargs=feature_map_kwargs,
        feature_map_input=feature_map_input, softmax_blocks=softmax_blocks, block_settings=block_settings,
        linear_scale=linear_scale, teacher_attention=teacher_attention, linear_norm_frames=linear_norm_frames)
    # Build every processor first, so a bad feature_map_kwargs fails before the model is changed.
    ctx = RunContext()
    ctx.teacher_chunk_frames = teacher_chunk
    processors = _build_processors(transformer, cfg, ctx)
    _install(transformer, cfg, ctx, processors)
    return transformer


def _conversion_config(
    transformer, *, blocks, chunk_frames, overlap_frames, causal, stabilizer, feature_map, feature_map_kwargs,
    feature_map_input, softmax_blocks, block_settings, linear_scale, teacher_attention, linear_norm_frames=None,
) -> tuple[ReHyAtConfig, int | None]:
    """Check :func:`convert_wan`'s arguments (its Raises, in the same order) without changing anything; return
    the :class:`ReHyAtConfig` and the teacher's chunk (``None``: a bidirectional teacher)."""
    if not _is_wan_transformer(transformer):
        raise ValueError(f"transformer must be a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    teacher_chunk = _teacher_chunk_frames(transformer, softmax_blocks, chunk_frames)
    if teacher_attention not in (None, *TEACHER_ATTENTION):
        raise ValueError(f"teacher_attention must be one of {TEACHER_ATTENTION} or None, got {teacher_attention!r}")
    if teacher_attention == "bidirectional" and teacher_chunk is not None:
        raise ValueError("teacher_attention='bidirectional' for a block-causal model")
    if teacher_attention == "chunk_causal":
        teacher_chunk = chunk_frames
    blocks = _check_blocks(blocks, len(transformer.blocks))
    check_settings(frame_tokens=1, chunk_frames=chunk_frames, overlap_frames=overlap_frames, stabilizer=stabilizer)
    check_linear_norm_frames(linear_norm_frames, causal)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
    if feature_map_input not in FEATURE_MAP_INPUTS:
        raise ValueError(f"feature_map_input must be one of {FEATURE_MAP_INPUTS}, got {feature_map_input!r}")
    if softmax_blocks not in SOFTMAX_BLOCKS:
        raise ValueError(f"softmax_blocks must be one of {SOFTMAX_BLOCKS}, got {softmax_blocks!r}")
    if transformer.config.patch_size[0] != 1:
        raise ValueError(f"only temporal patch size 1 is supported, got patch_size {transformer.config.patch_size}")
    block_settings = _check_block_settings(block_settings, blocks, chunk_frames, overlap_frames, stabilizer,
                                           softmax_blocks, len(transformer.blocks))
    cfg = ReHyAtConfig(
        blocks=blocks, chunk_frames=chunk_frames, overlap_frames=overlap_frames, block_settings=block_settings,
        causal=causal, stabilizer=stabilizer, feature_map=feature_map,
        feature_map_kwargs=dict(feature_map_kwargs or {}), feature_map_input=feature_map_input,
        softmax_blocks=softmax_blocks, linear_scale=bool(linear_scale),
        teacher_attention="bidirectional" if teacher_chunk is None else "chunk_causal",
        linear_norm_frames=linear_norm_frames,
    )
    return cfg, teacher_chunk


def _check_blocks(blocks, n_blocks: int) -> list[int]:
    """``"all"`` or an iterable of block indices, as the sorted distinct indices; ValueError naming ``blocks``
    for another string or an index outside ``0..n_blocks - 1``."""
    if isinstance(blocks, str):
        if blocks != "all":
            raise ValueError(f"blocks must be 'all' or a list of block indices, got {blocks!r}")
        blocks = list(range(n_blocks))
    blocks = sorted(set(int(b) for b in blocks))
    bad = [b for b in blocks if not 0 <= b < n_blocks]
    if bad:
        raise ValueError(f"blocks {bad} out of range: the transformer has {n_blocks} blocks (0..{n_blocks - 1})")
    return blocks


def _check_block_settings(block_settings: dict | None, blocks: list[int], chunk_frames: int, overlap_frames: int,
                          stabilizer: str, softmax_blocks: str = "bidirectional",
                          n_blocks: int = 0) -> dict[int, dict]:
    """Per-block overrides with int keys (a copy): ``{"chunk_frames": .., "overlap_frames": ..}`` of a converted
    block, or ``{"overlap_frames": ..}`` of a chunk-causal softmax block (its sliding window; with
    ``softmax_blocks="chunk_causal"`` only, a block of ``0..n_blocks - 1``). ValueError, naming ``block_settings``
    and the block, for another form than ``{block: {key: int}}``, another block, an unknown key or a value
    :func:`~rehyat.ops.check_settings` refuses."""
    form = "a dict {block: {'chunk_frames' | 'overlap_frames': int}}"
    if block_settings is not None and not isinstance(block_settings, dict):
        raise ValueError(f"block_settings must be {form}, got {block_settings!r}")
    out = {}
    for b, s in (block_settings or {}).items():
        if not isinstance(s, dict) or isinstance(b, bool) or not str(b).lstrip("-").isdigit():
            raise ValueError(f"block_settings must be {form}, got {{{b!r}: {s!r}}}")
        out[int(b)] = dict(s)
    for b, s in out.items():
        keys = {"chunk_frames", "overlap_frames"}
        if b not in blocks:
            if not 0 <= b < n_blocks and softmax_blocks == "chunk_causal":
                raise ValueError(f"block_settings names block {b}, out of range: the transformer has blocks "
                                 f"0..{n_blocks - 1}")
            if softmax_blocks != "chunk_causal":
                raise ValueError(f"block_settings names block {b}, which is not in blocks {blocks} (only with "
                                 "softmax_blocks='chunk_causal' may it name another block, to bound that softmax "
                                 "block's window)")
            keys = {"overlap_frames"}  # a chunk-causal softmax block keeps the model's chunk_frames
        unknown = set(s) - keys
        if unknown:
            raise ValueError(f"block_settings[{b}] has unknown keys {sorted(unknown)} (allowed: {sorted(keys)})")
        try:
            check_settings(frame_tokens=1, chunk_frames=s.get("chunk_frames", chunk_frames),
                           overlap_frames=s.get("overlap_frames", overlap_frames), stabilizer=stabilizer)
        except ValueError as e:
            raise ValueError(f"block_settings[{b}]: {e}") from None
    return out


def _build_processors(transformer, cfg: ReHyAtConfig, ctx: RunContext) -> dict[int, "_ChunkedProcessorBase"]:
    """The processor of every block ``cfg`` changes, sharing ``ctx``: a :class:`ReHyAtAttnProcessor` per converted
    block (feature maps in the attention weights' dtype and device), and with ``softmax_blocks="chunk_causal"`` a
    :class:`ChunkCausalAttnProcessor` per other block. ValueError if ``cfg.feature_map_kwargs`` do not fit."""
    heads = transformer.config.num_attention_heads
    head_dim = transformer.config.attention_head_dim
    param = transformer.blocks[0].attn1.to_q.weight  # feature maps take the attention weights' dtype/device
    processors = {}
    for b in cfg.blocks:
        tc, to = cfg.settings_for(b)
        try:
            processors[b] = ReHyAtAttnProcessor(
                b, heads, head_dim, chunk_frames=tc, overlap_frames=to, causal=cfg.causal, stabilizer=cfg.stabilizer,
                feature_map=cfg.feature_map, feature_map_kwargs=cfg.feature_map_kwargs,
                feature_map_input=cfg.feature_map_input, context=ctx, linear_scale=cfg.linear_scale,
                linear_norm_frames=cfg.linear_norm_frames,
            ).to(device=param.device, dtype=param.dtype)
        except TypeError as e:  # an unknown keyword in feature_map_kwargs
            raise ValueError(f"feature_map_kwargs {cfg.feature_map_kwargs} do not fit feature_map "
                             f"{cfg.feature_map!r}: {e}") from None
    if cfg.softmax_blocks == "chunk_causal":
        for b in range(len(transformer.blocks)):
            if b not in processors:
                window = cfg.block_settings.get(b, {}).get("overlap_frames", UNBOUNDED)
                processors[b] = ChunkCausalAttnProcessor(b, chunk_frames=cfg.chunk_frames, context=ctx,
                                                         overlap_frames=window)
    return processors


def _install(transformer, cfg: ReHyAtConfig, ctx: RunContext, processors: dict) -> None:
    """Change the model: set ``processors``, replace the rotary embedding by :class:`AbsoluteRotaryPosEmbed`, attach
    ``ctx`` and ``cfg`` (also into the diffusers config) and the frame-size pre-hook (replacing an earlier one)."""
    for b, p in processors.items():
        transformer.blocks[b].attn1.set_processor(p)
    if getattr(transformer, "_rehyat_hook", None) is not None:  # a block-causal model's hook (and context)
        transformer._rehyat_hook.remove()
    transformer.rope = AbsoluteRotaryPosEmbed(transformer.config.attention_head_dim, transformer.config.patch_size, ctx)
    transformer._rehyat_context = ctx
    transformer.rehyat_config = cfg
    # The settings also go into the diffusers config, so that config.json written by any save_pretrained carries
    # them (module docstring); diffusers keeps an entry its __init__ does not take and saves it with the rest.
    if hasattr(transformer, "register_to_config"):  # every diffusers model
        transformer.register_to_config(**{REHYAT_CONFIG_KEY: cfg.to_dict()})
    transformer._rehyat_hook = transformer.register_forward_pre_hook(_frame_tokens_hook, with_kwargs=True)


def _teacher_chunk_frames(transformer, softmax_blocks: str, chunk_frames: int) -> int | None:
    """``None`` for a plain (bidirectional) teacher; the chunk of a block-causal model with no converted block (its
    blocks may be converted further, keeping that chunk). ValueError for any other converted model."""
    cfg = get_rehyat_config(transformer)
    if cfg is None:
        return None
    if cfg.blocks or cfg.softmax_blocks != "chunk_causal":
        raise ValueError("transformer is already converted to ReHyAt")
    if softmax_blocks != "chunk_causal" or chunk_frames != cfg.chunk_frames:
        raise ValueError(f"transformer is block-causal with chunk_frames {cfg.chunk_frames}: convert it with "
                         f"softmax_blocks='chunk_causal' and chunk_frames={cfg.chunk_frames} (got {softmax_blocks!r}, "
                         f"{chunk_frames})")
    return cfg.chunk_frames


def get_rehyat_config(transformer) -> ReHyAtConfig | None:
    """The :class:`ReHyAtConfig` of a converted transformer, or ``None`` for a plain one."""
    return getattr(transformer, "rehyat_config", None)


def get_context(transformer) -> RunContext:
    """The :class:`RunContext` of a converted transformer; ``ValueError`` for a plain one."""
    ctx = getattr(transformer, "_rehyat_context", None)
    if ctx is None:
        raise ValueError("transformer is not converted to ReHyAt (see rehyat.convert_wan)")
    return ctx


def set_linear_norm_frames(transformer, linear_norm_frames: int | None):
    """Set the length normalisation of every converted block's linear branch, in place (:class:`ReHyAtConfig`'s
    ``linear_norm_frames``; design section 3): ``None`` for plain sums, or H >= 1 latent frames. The model's
    settings (and so a later save) carry the new value. Returns the transformer.

    Raises:
        ValueError: a transformer that is not converted, a value that is not None or an int >= 1, or a
            bidirectional conversion (causal=False), before anything is changed.
    """
    cfg = get_rehyat_config(transformer)
    if cfg is None:
        raise ValueError("transformer is not converted to ReHyAt (see rehyat.convert_wan)")
    check_linear_norm_frames(linear_norm_frames, cfg.causal)
    for b in cfg.blocks:
        transformer.blocks[b].attn1.processor.linear_norm_frames = linear_norm_frames
    transformer.rehyat_config = replace(cfg, linear_norm_frames=linear_norm_frames)
    transformer.register_to_config(**{REHYAT_CONFIG_KEY: transformer.rehyat_config.to_dict()})
    return transformer


def save_rehyat(transformer, folder, *, overwrite: bool = False, **save_kwargs) -> Path:
    """Save a converted transformer to ``folder`` with ``save_pretrained`` plus ``rehyat_config.json``.

    The safetensors file holds the teacher's weights unchanged and the feature maps under
    ``blocks.{i}.attn1.processor.feature_map_{q,k}.*``; ``config.json`` holds the settings under ``"rehyat"`` and
    ``rehyat_config.json`` the same settings (for readers of folders saved before the config entry existed; a plain
    ``transformer.save_pretrained`` is enough for :func:`load_transformer`). Missing parent folders are created.
    Refuses (``FileExistsError``) a non-empty folder unless ``overwrite=True``; ``ValueError`` for a transformer that
    is not converted.
    """
    cfg = get_rehyat_config(transformer)
    if cfg is None:
        raise ValueError("transformer is not converted to ReHyAt; save a plain model with save_pretrained")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace its files")
    transformer.register_to_config(**{REHYAT_CONFIG_KEY: cfg.to_dict()})  # the two copies cannot disagree
    transformer.save_pretrained(folder, **save_kwargs)  # creates missing parent folders, like diffusers does
    (folder / REHYAT_CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return folder


def read_rehyat_settings(folder, config: dict) -> ReHyAtConfig | None:
    """The ReHyAt settings of a transformer folder, ``None`` for a plain one: the one reader of them.

    Two sources, either enough: the ``"rehyat"`` entry of its ``config.json`` (``config``, that file as read by
    :func:`read_wan_config`; written by any ``save_pretrained`` of a model converted by this version) and
    ``rehyat_config.json`` (written by :func:`save_rehyat`; the only source in older folders). Reads no weights.

    Raises:
        ValueError: a source that is not valid JSON or not a settings object (unknown or missing keys), naming its
            file; both sources present but different, naming the folder and the settings that differ.
    """
    from ..io import read_json_object

    folder = Path(folder)
    sources = {}
    if config.get(REHYAT_CONFIG_KEY) is not None:
        sources[f"{folder / 'config.json'} (entry {REHYAT_CONFIG_KEY!r})"] = config[REHYAT_CONFIG_KEY]
    if (folder / REHYAT_CONFIG_NAME).is_file():
        sources[str(folder / REHYAT_CONFIG_NAME)] = read_json_object(folder / REHYAT_CONFIG_NAME)
    parsed = []
    for where, raw in sources.items():
        try:
            parsed.append(ReHyAtConfig.from_dict(raw).to_dict())
        except (TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{where}: not valid ReHyAt settings: {e}") from None
    if not parsed:
        return None
    if len(parsed) == 2 and parsed[0] != parsed[1]:
        a, b = parsed
        diff = ", ".join(f"{k} ({a[k]!r} vs {b[k]!r})" for k in a if a[k] != b[k])
        raise ValueError(f"{folder}: the ReHyAt settings in config.json (entry {REHYAT_CONFIG_KEY!r}) and in "
                         f"{REHYAT_CONFIG_NAME} disagree on {diff}; edit one to match the other")
    return ReHyAtConfig.from_dict(parsed[0])


# ------------------------------------------------------------------------------------------- weights on disk
_SAFETENSORS = "diffusion_pytorch_model.safetensors"
_BIN = "diffusion_pytorch_model.bin"


def _is_processor_key(key: str) -> bool:
    """A weight of a ReHyAt processor (the feature maps), which a plain ``WanTransformer3DModel`` does not have."""
    return ".attn1.processor." in key


def _open_weights(path: Path):
    """``{key: tensor}`` of one weights file, lazily for safetensors; ``ValueError`` naming an unreadable file."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".bin":
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return safe_open(path, "pt")
    except (OSError, SafetensorError, RuntimeError, EOFError) as e:
        kind = "PyTorch" if path.suffix == ".bin" else "safetensors"
        raise ValueError(f"{path} is not a readable {kind} file: {e}") from None


class _WeightFiles:
    """A transformer folder's weights (one safetensors file, a sharded one with its index, or one PyTorch ``.bin``),
    each file opened once: its header gives the keys, and its tensors are read from that same handle.

    Attributes:
        weight_map: ``{key: file}`` of every weight in the folder.

    Raises (at construction):
        FileNotFoundError: no weights file. ValueError: an index without a ``weight_map`` object, or an unreadable
            file, naming it.
    """

    def __init__(self, folder: Path) -> None:
        from ..io import read_json_object

        single, index, pickled = folder / _SAFETENSORS, folder / f"{_SAFETENSORS}.index.json", folder / _BIN
        self._files: dict[Path, object] = {}
        if index.exists() and not single.exists():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' object")
            self.weight_map = {k: folder / f for k, f in weight_map.items()}
            return
        path = single if single.exists() else pickled
        if not path.exists():
            raise FileNotFoundError(f"no {_SAFETENSORS} (or its index, or {_BIN}) in {folder}")
        self.weight_map = dict.fromkeys(self._open(path).keys(), path)

    def _open(self, path: Path):
        if path not in self._files:
            self._files[path] = _open_weights(path)
        return self._files[path]

    def by_file(self, keys) -> dict[Path, list[str]]:
        """``{file: its keys among keys}`` (``keys``: a subset of :attr:`weight_map`), files in sorted order."""
        out: dict[Path, list[str]] = {}
        for k in keys:
            out.setdefault(self.weight_map[k], []).append(k)
        return dict(sorted(out.items()))

    def read(self, keys) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (a subset of :attr:`weight_map`); ValueError naming the file for a key it lacks or a
        truncated file."""
        out = {}
        for path, mine in self.by_file(keys).items():
            f = self._open(path)
            try:
                out.update({k: f[k] if isinstance(f, dict) else f.get_tensor(k) for k in mine})
            except Exception as e:  # a key the index names but the file lacks, a truncated file
                raise ValueError(f"cannot read {mine[:4]} from {path}: {e}") from None
        return out


def _expected_keys(folder: Path, config: dict, settings: ReHyAtConfig | None) -> set[str]:
    """The ``state_dict`` keys of the model ``config.json`` and the settings describe, built on the meta device
    (no memory, no weights; 0.1 s for Wan2.1-1.3B). ``ValueError`` naming ``folder`` for settings that
    :func:`convert_wan` refuses."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # from_pretrained warns about the config once, later
    try:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config({k: v for k, v in config.items() if k != REHYAT_CONFIG_KEY})
    finally:
        diffusers_logging.set_verbosity(level)
    if settings is not None:
        try:
            with torch.device("meta"):  # the feature maps too: no memory, no draw from the global RNG
                convert_wan(model, **settings.conversion_kwargs())
        except ValueError as e:
            raise ValueError(f"{folder}: bad ReHyAt settings: {e}") from None
    return set(model.state_dict())


def _some(keys) -> str:
    keys = sorted(keys)
    return f"{len(keys)} key{'s' * (len(keys) != 1)}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"


def _check_weight_keys(folder: Path, saved, expected, settings: ReHyAtConfig | None) -> None:
    """Refuse weights whose keys are not exactly ``expected`` (diffusers' own ignorable keys aside), with one line
    naming the folder and the keys; the message says which of feature maps and settings is missing."""
    from diffusers import WanTransformer3DModel

    ignorable = WanTransformer3DModel._keys_to_ignore_on_load_unexpected or []
    saved = {k for k in saved if not any(re.search(p, k) for p in ignorable)}
    missing, unexpected = expected - saved, saved - expected
    if not missing and not unexpected:
        return
    features = sorted(k for k in unexpected if _is_processor_key(k))
    if settings is None and features:
        raise ValueError(
            f"{folder} holds ReHyAt feature maps ({_some(features)}) but no ReHyAt settings (no {REHYAT_CONFIG_KEY!r} "
            f"entry in config.json, no {REHYAT_CONFIG_NAME}): it would load as the plain teacher; put back the "
            f"settings it was converted with (e.g. its {REHYAT_CONFIG_NAME})")
    what = "a plain WanTransformer3DModel" if settings is None else f"its ReHyAt settings (blocks {settings.blocks})"
    parts = [f"missing {_some(missing)}"] * bool(missing) + [f"unexpected {_some(unexpected)}"] * bool(unexpected)
    hint = ""
    if settings is not None and any(_is_processor_key(k) for k in missing) and not any(map(_is_processor_key, saved)):
        hint = ("; the file has no feature maps: was a model loaded without rehyat (plain diffusers) saved here? "
                "Load converted models with rehyat.load_transformer")
    raise ValueError(f"the weights in {folder} do not match {what}: {'; '.join(parts)}{hint}")


@contextmanager
def _diffusers_quiet(quiet: bool):
    """Silence diffusers' warnings inside the block when ``quiet``."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    if quiet:
        diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _load_teacher(folder: Path, config: dict, weights: _WeightFiles, torch_dtype, quiet: bool):
    """The plain ``WanTransformer3DModel`` of ``config`` (``config.json`` as already read) with its weights from
    ``weights`` (the files already opened), built as ``WanTransformer3DModel.from_pretrained(folder,
    torch_dtype=...)`` builds it (no weight initialisation, built under ``torch_dtype``, weights cast by diffusers'
    ``load_model_dict_into_meta`` with the modules diffusers keeps in float32 kept there, ``_name_or_path``, eval
    mode) without reading the config or a file header again. ``quiet`` silences diffusers' warnings (for a ReHyAt
    folder: the ``"rehyat"`` config entry, which diffusers does not know)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from diffusers.models.modeling_utils import no_init_weights

    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}")
    default = torch.get_default_dtype()
    try:
        if torch_dtype is not None:
            torch.set_default_dtype(torch_dtype)
        with _diffusers_quiet(quiet), no_init_weights(), init_empty_weights():
            model = WanTransformer3DModel.from_config(copy.deepcopy(config))
    finally:
        torch.set_default_dtype(default)
    keep = WanTransformer3DModel._keep_in_fp32_modules or []
    wanted = set(model.state_dict())
    for keys in weights.by_file(k for k in weights.weight_map if k in wanted).values():  # one file at a time
        load_model_dict_into_meta(model, weights.read(keys), dtype=torch_dtype, model_name_or_path=str(folder),
                                  keep_in_fp32_modules=list(keep))
    model.register_to_config(_name_or_path=folder)
    return model.eval()


def read_wan_config(folder) -> tuple[Path, dict]:
    """``(transformer folder, its config.json)`` for a ``WanTransformer3DModel`` folder or a pipeline folder that
    holds one under ``transformer/``; reads no weights.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: ``config.json`` is not valid JSON or not a ``WanTransformer3DModel`` config.
    """
    from ..io import read_json_object

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not (folder / "config.json").exists() and (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} is not a Wan model folder: no config.json (nor transformer/config.json)")
    config = read_json_object(cfg_path)
    if config.get("_class_name") != "WanTransformer3DModel":
        raise ValueError(f"{cfg_path} describes {config.get('_class_name')!r}, expected 'WanTransformer3DModel'")
    return folder, config


def load_transformer(folder, *, torch_dtype: torch.dtype | None = None, device=None):
    """Load a Wan transformer folder: a ReHyAt one converted (settings from :func:`read_rehyat_settings`), else the
    plain teacher. Strict: every weight in the folder must be one of the model's and every weight of the model
    must be in the folder, checked from the file headers before any weights load.

    Args:
        folder: a ``WanTransformer3DModel`` folder written by ``save_pretrained`` (a converted model's own, or
            diffusers' ``WanPipeline.save_pretrained``, or :func:`save_rehyat`), or a pipeline folder that holds
            one under ``transformer/``.
        torch_dtype: dtype of the loaded weights. Default ``None`` follows diffusers' ``from_pretrained``: float32,
            whatever dtype the folder was saved in; pass ``torch.bfloat16`` for a bfloat16 model (diffusers then
            keeps the modules it keeps in float32 there, as for the teacher).
        device: move the model there (default: CPU).

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its weights file is missing.
        ValueError (one line, naming the file or folder): ``config.json`` is not a ``WanTransformer3DModel`` config;
            malformed or disagreeing ReHyAt settings; an unreadable weights file; feature-map weights without
            settings, settings without feature-map weights, or any other missing or unexpected weight key.
    """
    folder, config = read_wan_config(folder)  # config.json and each weights file's header: read once, here
    settings = read_rehyat_settings(folder, config)
    weights = _WeightFiles(folder)
    _check_weight_keys(folder, set(weights.weight_map), _expected_keys(folder, config, settings), settings)
    # The teacher's weights load as diffusers loads them (dtype handling, fp32-kept modules); the feature maps,
    # which diffusers does not know, then come from the same open files.
    model = _load_teacher(folder, config, weights, torch_dtype, quiet=settings is not None)
    if settings is not None:
        convert_wan(model, **settings.conversion_kwargs())
        model.load_state_dict(weights.read([k for k in weights.weight_map if _is_processor_key(k)]), strict=False)
    model = model.to(device) if device is not None else model
    return model.eval()


def runner_chunk_frames(transformer) -> int:
    """Frames per runner chunk: the least common multiple of every chunked block's ``chunk_frames``."""
    cfg = get_rehyat_config(transformer)
    if cfg is None:
        raise ValueError("transformer is not converted to ReHyAt")
    return cfg.runner_chunk_frames()


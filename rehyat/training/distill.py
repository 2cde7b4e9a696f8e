"""Stage 1, attention distillation (design section 7): fit every converted block's feature maps to the teacher.

The teacher is converted in place with :func:`rehyat.convert_wan` and run in the converted model's distillation
mode (:class:`rehyat.models.RunContext` ``distill=True``): each converted block computes the teacher's q, k, v and
softmax output, returns the teacher's output (teacher forcing, so the forward IS the teacher's forward and its
output goes down the network unchanged), and backpropagates the L1 error of its hybrid output into its own
feature maps during the forward. One teacher forward therefore trains every chosen block; only feature-map
parameters require grad and sit in the optimizer, everything else is frozen and bit-for-bit unchanged.

Inputs are the teacher's own sampling trajectories from prompts (:class:`~rehyat.training.trajectory.
TeacherTrajectories`): the folder's scheduler, CFG as the pipeline does it, noise from seeds; every visited
sampling step is one teacher forward and one optimizer step.

Python API: :class:`Distiller` (in memory: a converted model + trajectories -> optimizer steps and error records),
:func:`evaluate_blocks` (per-block error on fixed trajectories, no training) and :func:`distill` (the whole run
behind ``rehyat distill``: folders, checkpoints, resume, logs, reports, several processes).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..models.wan import mass_warnings
from .common import (
    block_overlap_settings,
    cast_frozen_model,
    default_geometry,
    feature_map_parameters,
    latent_shape_for,
    parse_blocks,
    resolve_dtype,
)
from .conversion import CONVERSION_NAMES, ConversionSettings
from .distributed import DistEnv, average_gradients, init_distributed
from .run import TrainingRun
from .trajectory import PromptPool, TeacherTrajectories, read_prompt_file, resolve_prompt_pool

__all__ = ["Distiller", "evaluate_blocks", "prepare_for_distillation", "distill", "DistillResult", "error_table"]

EVAL_SEED_OFFSET = 7_777_777  # evaluation trajectories use seed + this: other noise than training
CALIBRATION_SEED_OFFSET = 3_333_333  # the linear-scale calibration's trajectory: other noise than both


def prepare_for_distillation(transformer, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Freeze a converted transformer except its feature maps; cast the frozen teacher to ``dtype``.

    The feature maps stay float32 (they are trained); the teacher's weights are cast to ``dtype`` (bfloat16 on a
    GPU: the teacher as it runs in inference) and never change. Returns the trainable parameters.

    Raises:
        ValueError: the transformer is not converted.
    """
    from ..models import get_rehyat_config

    if get_rehyat_config(transformer) is None:
        raise ValueError("distillation needs a converted transformer (rehyat.convert_wan)")
    transformer.requires_grad_(False)
    cast_frozen_model(transformer, dtype)
    params = []
    for block in transformer.blocks:
        proc = block.attn1.processor
        if isinstance(proc, torch.nn.Module) and any(True for _ in proc.parameters()):
            proc.float().requires_grad_(True)
            params += list(proc.parameters())
    return params


#: what a converted block records per distillation forward: errors, and with ``measure_mass`` the mass shares
RECORD_KEYS = ("l1", "rel_error")
MASS_KEYS = ("linear_share", "teacher_share", "teacher_mass")


def _records_tensor(records: dict, blocks: list[int], device, keys=RECORD_KEYS) -> torch.Tensor:
    return torch.tensor([[records[b][k] for k in keys] for b in blocks], dtype=torch.float64, device=device)


def _records_dict(t: torch.Tensor, blocks: list[int], keys=RECORD_KEYS) -> dict[int, dict[str, float]]:
    rows = t.tolist()
    return {b: dict(zip(keys, rows[i])) for i, b in enumerate(blocks)}


@torch.no_grad()
def calibrate_linear_scale(transformer, trajectories: TeacherTrajectories, env: DistEnv | None = None,
                           num_steps: int | None = None) -> dict[int, list[float]]:
    """Calibrate every converted block's per-head linear scale against the teacher (design section 4).

    Runs ``num_steps`` teacher forwards (default: one whole trajectory, every noise level) in distillation mode,
    measuring the sampled queries' linear masses and softmax's masses on the same keys
    (:func:`rehyat.ops.attention_mass`), gathers them over every forward and process, and adds
    :func:`rehyat.ops.log_scale_for_mass` of them to each block's ``linear_log_scale``: afterwards the median
    linear mass equals the median mass softmax gives the same keys, per head, so the linear branch neither
    swamps the softmax window nor vanishes, and its gradient is not starved. The result does not depend on how
    the batch is split over processes. Blocks without ``linear_log_scale`` are left alone.

    Returns:
        ``{block: [log-scale change per head]}``.
    """
    from ..models import get_rehyat_config
    from ..ops import log_scale_for_mass

    env = env or DistEnv(device=trajectories.device)
    procs = {b: transformer.blocks[b].attn1.processor for b in get_rehyat_config(transformer).blocks}
    procs = {b: p for b, p in procs.items() if getattr(p, "linear_log_scale", None) is not None}
    if not procs:
        return {}
    masses = {b: [] for b in procs}  # per block: (linear, teacher_linear) [b, n, H] of every forward
    for records in _teacher_forced(transformer, trajectories, num_steps):
        for b in procs:
            masses[b].append((records[b]["masses"]["linear"], records[b]["masses"]["teacher_linear"]))
    result = {}
    for b, p in procs.items():
        parts = [m for rank in env.gather_objects(masses[b]) for m in rank]
        gap = log_scale_for_mass(torch.cat([m[0] for m in parts]), torch.cat([m[1] for m in parts]))
        p.linear_log_scale.add_(gap.to(p.linear_log_scale))
        result[b] = gap.tolist()
    return result


@torch.no_grad()
def evaluate_blocks(transformer, trajectories: TeacherTrajectories, env: DistEnv | None = None,
                    num_steps: int | None = None) -> dict[int, dict[str, float]]:
    """Per-block distillation error on fixed trajectories, without training.

    Runs ``num_steps`` (default: one whole trajectory) teacher forwards in distillation mode and averages every
    converted block's ``{"l1", "rel_error"}`` over them (and over processes). ``rel_error`` is
    ``||y_student - y_teacher|| / ||y_teacher||`` per sample, averaged. Also the mass diagnostic
    (:func:`rehyat.models.wan.mass_summary`): ``linear_share`` (the hybrid's linear branch's share of the joint
    normaliser, for queries that have linear keys), ``teacher_share`` (softmax's share of the same keys) and
    ``teacher_mass`` (the bidirectional teacher's attention on them); NaN where no query has linear keys.

    Returns:
        ``{block: {"l1", "rel_error", "linear_share", "teacher_share", "teacher_mass": float}}``.
    """
    from ..models import get_rehyat_config

    env = env or DistEnv(device=trajectories.device)
    blocks = get_rehyat_config(transformer).blocks
    keys = RECORD_KEYS + MASS_KEYS
    total = torch.zeros(len(blocks), len(keys), dtype=torch.float64, device=env.device)
    n = trajectories.steps if num_steps is None else num_steps
    for records in _teacher_forced(transformer, trajectories, n):
        total += _records_tensor(records, blocks, env.device, keys)
    env.all_reduce_mean(total)
    return _records_dict(total / max(n, 1), blocks, keys)


def _teacher_forced(transformer, trajectories: TeacherTrajectories, num_steps: int | None):
    """Teacher forwards along ``trajectories`` in distillation mode with the mass diagnostic, no gradient for the
    student (its parameters' ``requires_grad`` put back afterwards): yields each forward's per-block records.
    ``num_steps`` default: one whole trajectory."""
    from ..models import distill_mode

    with _no_grad_for([p for _, p in feature_map_parameters(transformer)]):  # no graph for the student: records only
        for _ in range(trajectories.steps if num_steps is None else num_steps):
            with distill_mode(transformer, measure_mass=True) as ctx:
                x, t, e = trajectories.inputs()
                out = transformer(x, t, e, return_dict=False)[0]
            yield ctx.records
            trajectories.advance(out)


@contextmanager
def _no_grad_for(params: list[torch.nn.Parameter]):
    """``requires_grad`` off for ``params`` inside the block, each put back as it was on exit."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def attention_distill_loss(student: torch.Tensor, teacher: torch.Tensor, mass: dict | None = None, *,
                           mass_weight: float = 0.0) -> torch.Tensor:
    """One converted block's distillation loss (value distillation, design section 7): the mean absolute error of
    its hybrid output against the teacher's attention output, plus ``mass_weight`` times the mean absolute gap
    between its linear share of the normaliser and softmax's share of the same keys on the sampled queries.

    Args:
        student: the block's hybrid attention output ``[B, N, H, D]`` (any float dtype; with grad to train).
        teacher: the teacher's attention output, same shape.
        mass: :func:`rehyat.ops.attention_mass`'s dict (``window``, ``linear``, ``teacher_linear``: ``[B, n, H]``), or
            ``None``; the mass term needs it and some sampled query with linear keys (``n > 0``), else it is left out.
        mass_weight: weight of the mass term (default 0: the L1 term alone).

    Returns:
        A float32 scalar. The blocks backpropagate it in distillation mode (:func:`rehyat.models.distill_mode`
        ``loss=``; :class:`Distiller` passes this one).
    """
    l1 = (student.float() - teacher.float()).abs().mean()
    if mass_weight and mass is not None and mass["linear"].numel():
        win, lin, t_lin = mass["window"], mass["linear"], mass["teacher_linear"]
        return l1 + mass_weight * (lin / (win + lin) - t_lin / (win + t_lin)).abs().mean().float()
    return l1


class Distiller:
    """Distillation of a converted transformer in memory: one teacher forward and one optimizer step per call.

    Args:
        transformer: a converted transformer prepared with :func:`prepare_for_distillation`.
        trajectories: where the teacher's inputs come from.
        lr: AdamW learning rate (default 1e-3); ``weight_decay`` (0), ``betas`` ((0.9, 0.999)).
        warmup_steps: linear warm-up of the learning rate (0: none); constant afterwards.
        max_grad_norm: clip the feature maps' global gradient norm (``None``: no clipping).
        env: processes; gradients are averaged across them before each step.
        mass_every: every this many steps (the first included) the forward also measures the mass diagnostic
            (``linear_share``, ``teacher_share``, ``teacher_mass`` in the records, see :func:`evaluate_blocks`);
            0: never.
        mass_weight: weight of the mass term in every block's loss (:func:`attention_distill_loss`; 0: the L1
            output loss alone).

    ``step()`` returns ``{block: {"l1", "rel_error"}}`` of that forward (before the update; averaged over
    processes), with the mass keys on measuring steps.
    """

    def __init__(self, transformer, trajectories: TeacherTrajectories, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), warmup_steps: int = 0, max_grad_norm: float | None = None,
                 env: DistEnv | None = None, mass_every: int = 0, mass_weight: float = 0.0) -> None:
        from ..models import get_context, get_rehyat_config

        self.model, self.traj = transformer, trajectories
        self.env = env or DistEnv(device=trajectories.device)
        self.ctx = get_context(transformer)
        self.blocks = get_rehyat_config(transformer).blocks
        self.params = [p for _, p in feature_map_parameters(transformer)]
        if not self.params or not all(p.requires_grad for p in self.params):
            raise ValueError("call prepare_for_distillation(transformer) first")
        fused = self.env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)
        w = max(int(warmup_steps), 0)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / w) if w else 1.0)
        self.max_grad_norm = max_grad_norm
        self.mass_every, self.mass_weight = mass_every, float(mass_weight)
        self.step_count = 0

    def step(self) -> dict[int, dict[str, float]]:
        from ..models import distill_mode

        x, t, e = self.traj.inputs()
        measure = bool(self.mass_every) and self.step_count % self.mass_every == 0
        with distill_mode(self.ctx, backward=True, measure_mass=measure, mass_weight=self.mass_weight,
                          loss=partial(attention_distill_loss, mass_weight=self.mass_weight)) as ctx:
            with torch.no_grad():
                out = self.model(x, t, e, return_dict=False)[0]
        missing = [b for b in self.blocks if b not in ctx.records]
        if missing:
            raise RuntimeError(f"blocks {missing} recorded no distillation error: is the model called in distill mode?")
        average_gradients(self.params, self.env)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.traj.advance(out)
        self.step_count += 1
        keys = RECORD_KEYS + MASS_KEYS if measure else RECORD_KEYS
        rec = _records_tensor(ctx.records, self.blocks, self.env.device, keys)
        return _records_dict(self.env.all_reduce_mean(rec), self.blocks, keys)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "step": self.step_count}

    def load_state_dict(self, s: dict) -> None:
        self.optimizer.load_state_dict(s["optimizer"])
        self.lr_scheduler.load_state_dict(s["lr_scheduler"])
        self.step_count = s["step"]


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------
def error_table(blocks: list[int], settings: dict[int, tuple[int, int]], before: dict | None, after: dict) -> str:
    """Markdown table of per-block relative (and L1) errors before and after distillation, and the mass diagnostic
    (the linear branch's share of the normaliser before / after, softmax's share of the same keys, the
    bidirectional teacher's attention on them; :func:`evaluate_blocks`)."""
    lines = ["| block | chunk_frames | overlap_frames | rel. error before | rel. error after | L1 before | L1 after "
             "| linear share before | linear share after | softmax share | teacher mass |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda d, b, k: f"{d[b][k]:.4f}" if d and b in d and k in d[b] else "-"  # noqa: E731
    for b in blocks:
        tc, to = settings[b]
        lines.append(f"| {b} | {tc} | {to} | {fmt(before, b, 'rel_error')} | {fmt(after, b, 'rel_error')} | "
                     f"{fmt(before, b, 'l1')} | {fmt(after, b, 'l1')} | {fmt(before, b, 'linear_share')} | "
                     f"{fmt(after, b, 'linear_share')} | {fmt(after, b, 'teacher_share')} | "
                     f"{fmt(after, b, 'teacher_mass')} |")
    mean = lambda d: sum(d[b]["rel_error"] for b in blocks) / len(blocks) if d else float("nan")  # noqa: E731
    lines.append(f"| mean | | | {mean(before):.4f} | {mean(after):.4f} | | | | | | |")
    return "\n".join(lines)


def _mass_log(records: dict) -> dict:
    """The mass diagnostic of one step's records for the log (empty on steps that did not measure it)."""
    if not all("linear_share" in r for r in records.values()):
        return {}
    return {k: {str(b): round(r[k], 4) for b, r in records.items()} for k in ("linear_share", "teacher_share")}


@dataclass
class DistillResult:
    """What :func:`distill` did.

    Attributes:
        out: the written model folder. blocks: the distilled blocks. before / after: per-block
            ``{"l1", "rel_error"}`` on the evaluation trajectories (``None`` with ``eval_trajectories=0``).
        history: per optimizer step, ``{block: {"l1", "rel_error"}}`` (this invocation's steps only).
        ranking: for ``blocks="best:N"``, the per-block errors that chose them. report: the Markdown table.
    """

    out: Path
    blocks: list[int]
    before: dict | None
    after: dict | None
    history: list[dict] = field(default_factory=list)
    ranking: dict | None = None
    report: str = ""
    steps: int = 0


def _conversion_kwargs(*settings) -> dict:
    """The conversion keyword dict of the eight settings, given in :class:`~.conversion.ConversionSettings`'s
    order (ValueError for a bad ``feature_map_kwargs``)."""
    return ConversionSettings(*settings).to_kwargs()


def build_student(model, blocks, conversion: dict | None, block_settings: dict | None, feature_maps: dict):
    """The student as it is saved: the teacher's weights exactly as in ``model`` (float32, CPU), converted with
    ``blocks``/``conversion``/``block_settings`` (``blocks=None``: the folder is already converted), and the
    trained feature maps ``feature_maps`` (``{parameter name: tensor}``) copied in."""
    from ..models import convert_wan
    from .components import load_model_folder

    student = load_model_folder(model, device="cpu").transformer
    if blocks is not None:
        convert_wan(student, blocks=blocks, block_settings=block_settings, **conversion)
    load_feature_maps(student, feature_maps)
    return student.eval()


@torch.no_grad()
def load_feature_maps(transformer, feature_maps: dict) -> None:
    """Copy trained feature maps and linear scales (``{parameter name: tensor}``, as :func:`short_distillation`
    returns them) into a converted ``transformer``'s :func:`feature_map_parameters`, in place.

    Raises:
        ValueError: the names are not exactly those of the transformer's converted blocks.
    """
    params = dict(feature_map_parameters(transformer))
    if set(params) != set(feature_maps):
        raise ValueError("the trained feature maps do not match the student's converted blocks")
    for n, p in params.items():
        p.copy_(feature_maps[n])


def short_distillation(model, conversion: dict, blocks, pool: PromptPool, latent_shape, *, steps: int, lr: float,
                       batch_size: int, sampling_steps: int, guidance: float, seed: int, env: DistEnv,
                       dtype: torch.dtype, block_settings: dict | None = None, progress: bool = False,
                       desc: str = "short distillation"):
    """Convert a fresh copy of ``model``'s teacher, distil ``steps`` steps, and measure every block on one
    evaluation trajectory. Used to rank blocks (``best:N``) and to price knapsack candidates.

    Returns:
        ``(errors {block: {"l1", "rel_error"}}, feature-map state {name: tensor} (CPU))``.
    """
    from tqdm.auto import tqdm

    from ..models import convert_wan
    from .components import load_model_folder

    pipe = load_model_folder(model, device=env.device)
    teacher = convert_wan(pipe.transformer, blocks=blocks, block_settings=block_settings, **conversion)
    prepare_for_distillation(teacher, dtype)
    traj_kw = dict(batch_size=batch_size, sampling_steps=sampling_steps, guidance_scale=guidance, env=env, dtype=dtype)
    calibrate_linear_scale(teacher, TeacherTrajectories(pipe.scheduler, pool, latent_shape,
                                                        seed=seed + CALIBRATION_SEED_OFFSET, **traj_kw), env)
    traj = TeacherTrajectories(pipe.scheduler, pool, latent_shape, seed=seed, **traj_kw)
    d = Distiller(teacher, traj, lr=lr, env=env)
    for _ in tqdm(range(steps), desc=desc, disable=not (progress and env.is_main), leave=False):
        d.step()
    ev = TeacherTrajectories(pipe.scheduler, pool, latent_shape, seed=seed + EVAL_SEED_OFFSET, **traj_kw)
    errors = evaluate_blocks(teacher, ev, env)
    state = {n: p.detach().cpu().clone() for n, p in feature_map_parameters(teacher)}
    return errors, state


def rank_blocks(model, conversion: dict, n: int, pool: PromptPool, latent_shape, *, rank_steps: int, lr: float,
                batch_size: int, sampling_steps: int, guidance: float, seed: int, env: DistEnv, dtype: torch.dtype,
                progress: bool = False, desc: str = "ranking blocks"):
    """``--blocks best:N``, for ``rehyat distill`` and ``rehyat convert`` alike: a :func:`short_distillation` of
    every block (``rank_steps`` steps, one setting: ``conversion``, feature maps initialised from ``seed``), then
    the ``n`` blocks with the lowest relative error on the evaluation trajectory.

    The chosen blocks keep the feature maps and linear scales this short distillation trained (a head start, and
    the maps whose errors chose them); both commands start from them.

    Returns:
        ``(chosen, errors, feature_maps)``: the chosen blocks, sorted; every block's ``{"l1", "rel_error", ...}``,
        ordered from the lowest error to the highest (ties: lower block first); the chosen blocks' feature-map
        state ``{name: tensor}`` (CPU, float32).
    """
    torch.manual_seed(seed)
    errors, state = short_distillation(model, conversion, "all", pool, latent_shape, steps=rank_steps, lr=lr,
                                       batch_size=batch_size, sampling_steps=sampling_steps, guidance=guidance,
                                       seed=seed, env=env, dtype=dtype, progress=progress, desc=desc)
    order = sorted(errors, key=lambda b: errors[b]["rel_error"])
    chosen = sorted(order[:n])
    prefixes = tuple(f"blocks.{b}.attn1.processor." for b in chosen)
    return chosen, {b: errors[b] for b in order}, {k: v for k, v in state.items() if k.startswith(prefixes)}


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------
def distill(
    model,
    out,
    *,
    prompts=None,
    data=None,
    text_embeddings=None,
    blocks="all",
    block_overlap_frames: dict[int, int] | None = None,
    chunk_frames: int = 3,
    overlap_frames: int = 1,
    causal: bool = True,
    stabilizer: str = "lse",
    feature_map: str = "polynomial",
    feature_map_kwargs: dict | None = None,
    feature_map_input: str = "rotated",
    softmax_blocks: str = "bidirectional",
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    sampling_steps: int = 50,
    guidance: float | None = None,
    steps: int = 1000,
    lr: float = 1e-3,
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    batch_size: int = 1,
    rank_steps: int = 20,
    eval_trajectories: int = 1,
    seed: int = 0,
    checkpoint_every: int = 100,
    log_every: int = 1,
    mass_every: int = 50,
    mass_weight: float = 0.0,
    device=None,
    precision: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
) -> DistillResult:
    """Distil a teacher's attention into ReHyAt feature maps and write the student model folder (``rehyat distill``).

    Args:
        model: the teacher's model folder (``ReHyAtVideoPipeline.from_pretrained`` layout). A folder whose
            transformer is already converted (e.g. by ``rehyat convert``) is distilled as it is: its blocks,
            settings and feature maps are kept and the conversion arguments below are ignored.
        out: output folder: the student model folder (teacher's components copied, transformer saved with
            :func:`rehyat.save_rehyat`), plus ``distill_report.{md,json}`` and ``train/`` (``checkpoint.pt``,
            ``log.jsonl``, ``run_config.json``).
        prompts: prompt file (one per line), encoded with the teacher's text encoder or looked up in
            ``text_embeddings``. data: a dataset folder instead (its text embeddings; its latent shape as the
            geometry). text_embeddings: caption table (alone: every caption in it is a prompt).
        blocks: ``"all"``, indices (list or ``"0,3,5"``), or ``"best:N"`` (rank all blocks by their error after
            ``rank_steps`` steps of distillation, then distil the N best, starting from the feature maps and linear
            scales the ranking trained: :func:`rank_blocks`, as ``rehyat convert --blocks best:N``).
        block_overlap_frames: per-block ``overlap_frames`` overrides ``{block: frames}`` (default ``None``: every
            block takes ``overlap_frames``), e.g. ``{0: 12, 2: 12, 5: 12}`` for a wide softmax window in those
            blocks. Each block must be converted (in ``blocks``, given as ``"all"`` or a list; refused with
            ``best:N``, whose blocks are only known after the ranking, and with an already converted folder), or,
            with ``softmax_blocks="chunk_causal"``, an unconverted block: its chunk-causal softmax then attends to
            its chunk and that many earlier frames only (a sliding window, flat memory when streaming; distillation
            itself runs the teacher's attention there). Each value an int >= 0. They become the conversion's
            ``block_settings`` (:func:`rehyat.convert_wan`), so the student's ``rehyat_config.json`` carries them
            and finetuning, generation and streaming use them.
        chunk_frames, overlap_frames, causal, stabilizer, feature_map, feature_map_kwargs, feature_map_input,
            softmax_blocks: the conversion (see :func:`rehyat.convert_wan`).
        frames, height, width: video geometry of the trajectories (default: the folder's ``defaults``, else
            81 x 480 x 832); ignored with ``data``.
        sampling_steps: scheduler steps per trajectory (default 50). guidance: CFG scale (default: the folder's
            ``defaults.guidance``, else 5.0; <= 1 turns guidance off).
        steps: optimizer steps (= teacher forwards). lr, warmup_steps, max_grad_norm: AdamW on the feature maps.
        batch_size: prompts per trajectory, global (split across processes; a multiple of their number).
        rank_steps: steps of the short distillation that ranks blocks for ``best:N``.
        eval_trajectories: trajectories (fixed seeds, not trained on) measured before and after (0: skip).
        seed: noise, prompt order and feature-map initialisation seed.
        checkpoint_every: steps between checkpoints (and at the end). log_every: steps between log flushes.
        mass_every: steps between measurements of the mass diagnostic in the log (0: none); before and after
            are always measured on the evaluation trajectories, and a block whose linear share differs from
            softmax's share of the same keys by more than 0.15 afterwards is warned about (printed and in
            ``distill_report.{md,json}``). A fresh conversion's per-head linear scales are calibrated
            (:func:`calibrate_linear_scale`) before the first step (``best:N``: in the ranking run, before its
            steps; the report's calibration is then null, as for an already converted folder).
        mass_weight: add this times the mean L1 gap between each block's linear share and softmax's share of the
            same keys to its loss (default 0: the output loss alone; the output loss alone lets the linear share
            fall below softmax's, design section 4).
        device: torch device (default: cuda if available). precision: ``"auto"`` (teacher in bfloat16 on CUDA,
            float32 on the CPU), ``"bf16"`` or ``"fp32"``; the feature maps always train in float32.
        overwrite: replace the outputs of an earlier run in ``out``. resume: continue the run in ``out`` from
            its checkpoint (same settings; ``steps`` may grow, not fall below the checkpoint's).
        progress: show progress bars. callback: called as ``callback(step, records)`` after every step.

    Returns:
        :class:`DistillResult`.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: an empty prompt file, no prompts, a block index out of
            range, a bad geometry or setting, a ``block_overlap_frames`` block that is not converted (nor a
            chunk-causal softmax block) or value that is not an int >= 0, data that does not fit the model, an
            existing ``out`` without ``overwrite``/``resume``, a missing checkpoint for ``resume``, settings that
            differ from the checkpoint's, or ``steps`` below the checkpoint's; all before any model weights are
            loaded.
    """
    job = _DistillJob(DistillArgs.from_kwargs(locals()))
    job.open()
    job.build()
    job.train()
    return job.finish()


@dataclass
class DistillArgs:
    """:func:`distill`'s arguments, typed (see its docstring for each); its eight conversion arguments are one
    :class:`~.conversion.ConversionSettings`, ``conversion``."""

    model: Path
    out: Path
    prompts: Path | None
    data: Path | None
    text_embeddings: Path | None
    blocks: object
    block_overlap_frames: dict | None
    conversion: ConversionSettings
    frames: int | None
    height: int | None
    width: int | None
    sampling_steps: int
    guidance: float | None
    steps: int
    lr: float
    warmup_steps: int
    max_grad_norm: float | None
    batch_size: int
    rank_steps: int
    eval_trajectories: int
    seed: int
    checkpoint_every: int
    log_every: int
    mass_every: int
    mass_weight: float
    device: object
    precision: str
    overwrite: bool
    resume: bool
    progress: bool
    callback: Callable[[int, dict], None] | None

    def __post_init__(self) -> None:
        self.model, self.out = Path(self.model), Path(self.out)

    @classmethod
    def from_kwargs(cls, kwargs) -> "DistillArgs":
        """From :func:`distill`'s keyword arguments (a mapping of every name, e.g. its ``locals()``): the eight
        conversion names go into ``conversion``, the others into their fields."""
        rest = {name: value for name, value in kwargs.items() if name not in CONVERSION_NAMES}
        return cls(**rest, conversion=ConversionSettings.from_kwargs(kwargs))


class _DistillJob:
    """The steps of one :func:`distill` run, in order: :meth:`open` (checks and settings, no weights),
    :meth:`build` (processes, blocks, the converted teacher, resume), :meth:`train`, :meth:`finish` (reports)."""

    def __init__(self, a: DistillArgs) -> None:
        self.a = a

    # ------------------------------------------------------------------------------------------------ checks
    def open(self) -> None:
        """Every check and the run's settings, before any weights are loaded."""
        from ..pipelines.folders import ModelFolder

        a = self.a
        self.model = ModelFolder(a.model)  # its configs are read once, for every check and load below
        self.tcfg = tcfg = self.model.transformer_config
        self.converted_cfg = tcfg["rehyat"]
        if block_causal_chunk(self.converted_cfg) is not None:  # a block-causal teacher: its blocks are converted here
            check_block_causal_teacher(a.model, self.converted_cfg, a.conversion.chunk_frames,
                                       a.conversion.softmax_blocks)
            self.converted_cfg = None
        self.kind, self.bval = self._block_choice()
        self.block_settings_given = self._block_overrides()
        self._check_numbers()
        self.latent_shape, geometry = self._geometry()
        self.guidance = float(a.guidance if a.guidance is not None else self.model.generation_defaults["guidance"])
        self.conversion = a.conversion.to_kwargs()  # the run_config.json entry and convert_wan's keywords
        if self.converted_cfg is None:
            a.conversion.check(tcfg["attention_head_dim"])  # bad settings fail here, before loading weights
        self.run = TrainingRun.open(a.out, self._settings(geometry), steps=a.steps,
                                    checkpoint_every=a.checkpoint_every, log_every=a.log_every, resume=a.resume,
                                    overwrite=a.overwrite, desc="distill", progress=a.progress)

    def _block_choice(self):
        a, converted_cfg = self.a, self.converted_cfg
        if converted_cfg is None:
            return parse_blocks(a.blocks, self.tcfg["num_layers"])
        if a.blocks != "all":
            raise ValueError(f"{a.model} is already converted (blocks {converted_cfg['blocks']}): its blocks are "
                             f"distilled as they are, so --blocks {a.blocks} cannot apply; pass the teacher instead")
        if not converted_cfg["blocks"]:
            raise ValueError(f"{a.model}'s transformer is converted but has no converted block to distil")
        return "list", sorted(converted_cfg["blocks"])

    def _block_overrides(self) -> dict[int, dict[str, int]] | None:
        """``block_overlap_frames`` checked, as :func:`~rehyat.convert_wan`'s ``block_settings`` (``None``: none)."""
        a, given = self.a, self.a.block_overlap_frames
        if given is None:
            return None
        if self.converted_cfg is not None:
            raise ValueError(f"--block-overlap-frames: {a.model} is already converted, its settings are kept; pass "
                             "the teacher instead")
        return block_overlap_settings(given, self.kind, self.bval, self.tcfg["num_layers"],
                                      a.conversion.softmax_blocks, a.blocks)

    def _check_numbers(self) -> None:
        a = self.a
        if a.prompts is not None:
            read_prompt_file(a.prompts)
        if a.prompts is None and a.data is None and a.text_embeddings is None:
            raise ValueError("no prompts: pass a prompt file (--prompts), --data DATASET or --text-embeddings TABLE")
        for name, v in (("--steps", a.steps), ("--sampling-steps", a.sampling_steps), ("--batch-size", a.batch_size),
                        ("--checkpoint-every", a.checkpoint_every)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(a.mass_every, int) or a.mass_every < 0:
            raise ValueError(f"--mass-every must be an int >= 0, got {a.mass_every!r}")
        if not a.mass_weight >= 0:
            raise ValueError(f"--mass-weight must be >= 0, got {a.mass_weight!r}")
        if not a.lr > 0:
            raise ValueError(f"--lr must be > 0, got {a.lr}")

    def _geometry(self):
        from .dataset import check_dataset_fits_model, read_dataset_info

        a = self.a
        if a.data is not None:
            info = read_dataset_info(a.data)
            check_dataset_fits_model(info, self.tcfg)
            return info.latent_shape, {"data": str(Path(a.data).resolve()), "latent_shape": list(info.latent_shape)}
        f, h, w = default_geometry(self.model, a.frames, a.height, a.width)
        return latent_shape_for(self.model, f, h, w), {"frames": f, "height": h, "width": w}

    def _settings(self, geometry: dict) -> dict:
        a = self.a
        return {
            "model": str(a.model.resolve()), "prompts": a.prompts and str(Path(a.prompts).resolve()),
            "text_embeddings": a.text_embeddings and str(Path(a.text_embeddings).resolve()), **geometry,
            "blocks": a.blocks if isinstance(a.blocks, str) else list(a.blocks), "conversion": self.conversion,
            "block_settings": self.block_settings_given and {str(b): s for b, s in self.block_settings_given.items()},
            "sampling_steps": a.sampling_steps, "guidance": self.guidance, "steps": a.steps, "lr": a.lr,
            "warmup_steps": a.warmup_steps, "max_grad_norm": a.max_grad_norm, "batch_size": a.batch_size,
            "rank_steps": a.rank_steps, "eval_trajectories": a.eval_trajectories, "seed": a.seed,
            "checkpoint_every": a.checkpoint_every, "log_every": a.log_every, "precision": a.precision,
            "mass_weight": a.mass_weight,
        }

    # ------------------------------------------------------------------------------------------------ models
    def build(self) -> None:
        """Processes, prompts, the chosen blocks, the converted teacher, its trajectories and :class:`Distiller`;
        then the resumed state, or the evaluation before training and the calibration of a fresh conversion."""
        a = self.a
        env = self.env = self.run.attach(init_distributed(a.device))
        self.dtype = resolve_dtype(a.precision, env.device)
        torch.manual_seed(a.seed)
        self.pool = resolve_prompt_pool(self.model, prompts=a.prompts, data=a.data, text_embeddings=a.text_embeddings,
                                        device=env.device, text_dim=self.tcfg["text_dim"])
        self.chosen, self.ranking, ranked_maps = self._choose_blocks()
        self._build_teacher(ranked_maps)
        self.traj = self._trajectories(a.seed)
        self.distiller = Distiller(self.teacher, self.traj, lr=a.lr, warmup_steps=a.warmup_steps,
                                   max_grad_norm=a.max_grad_norm, env=env, mass_every=a.mass_every,
                                   mass_weight=a.mass_weight)
        ckpt = self.run.checkpoint
        self.before, self.calibration = None, None
        if ckpt is not None:
            from .checkpoint import load_trainable_state

            load_trainable_state(self.teacher, ckpt["model"])
            self.distiller.load_state_dict(ckpt["optimizer_state"])
            self.run.restore(self.traj)
            self.before, self.calibration = ckpt["extra"].get("before"), ckpt["extra"].get("calibration")
            return
        if a.eval_trajectories > 0:
            self.before = self._evaluate()
        if self.converted_cfg is None and ranked_maps is None:  # a fresh conversion: calibrate first
            trajectories = self._trajectories(a.seed + CALIBRATION_SEED_OFFSET)
            self.calibration = calibrate_linear_scale(self.teacher, trajectories, env)

    def _choose_blocks(self):
        """``(chosen blocks, ranking or None, the ranking's feature maps or None)``."""
        a, ckpt = self.a, self.run.checkpoint
        if ckpt is not None:
            return ckpt["extra"]["blocks"], ckpt["extra"].get("ranking"), None
        if self.kind != "best":
            return self.bval, None, None
        chosen, errors, ranked_maps = rank_blocks(
            self.model, self.conversion, self.bval, self.pool, self.latent_shape, rank_steps=a.rank_steps, lr=a.lr,
            batch_size=a.batch_size, sampling_steps=a.sampling_steps, guidance=self.guidance, seed=a.seed,
            env=self.env, dtype=self.dtype, progress=a.progress)
        return chosen, {"rank_steps": a.rank_steps, "errors": {str(b): e for b, e in errors.items()}}, ranked_maps

    def _build_teacher(self, ranked_maps) -> None:
        from ..models import convert_wan, get_rehyat_config
        from .components import load_model_folder

        self.pipe = load_model_folder(self.model, device=self.env.device)
        teacher = self.teacher = self.pipe.transformer
        if self.converted_cfg is None:
            torch.manual_seed(self.a.seed)
            convert_wan(teacher, blocks=self.chosen, block_settings=self.block_settings_given, **self.conversion)
            if ranked_maps is not None:  # best:N: the maps the ranking trained, as `rehyat convert --blocks best:N`
                load_feature_maps(teacher, ranked_maps)
        prepare_for_distillation(teacher, self.dtype)
        self.rcfg = get_rehyat_config(teacher)
        self.block_settings = {b: self.rcfg.settings_for(b) for b in self.rcfg.blocks}

    def _trajectories(self, seed: int) -> TeacherTrajectories:
        a = self.a
        return TeacherTrajectories(self.pipe.scheduler, self.pool, self.latent_shape, seed=seed,
                                   batch_size=a.batch_size, sampling_steps=a.sampling_steps,
                                   guidance_scale=self.guidance, env=self.env, dtype=self.dtype)

    def _evaluate(self) -> dict:
        a = self.a
        return evaluate_blocks(self.teacher, self._trajectories(a.seed + EVAL_SEED_OFFSET), self.env,
                               num_steps=a.eval_trajectories * a.sampling_steps)

    # ------------------------------------------------------------------------------------------------ training
    def _checkpoint(self, step: int) -> None:
        trajs = self.env.gather_objects(self.traj.state_dict())
        self.run.save_checkpoint(step, self.teacher, optimizer_state=self.distiller.state_dict(),
                                 data={"trajectories": trajs},
                                 extra={"blocks": self.chosen, "ranking": self.ranking, "before": self.before,
                                        "calibration": self.calibration})

    def _record(self, step: int, rec: dict, log) -> None:
        self.history.append(rec)
        rels = {str(b): round(r["rel_error"], 6) for b, r in rec.items()}
        mean_rel = sum(r["rel_error"] for r in rec.values()) / len(rec)
        worst = max(rec, key=lambda b: rec[b]["rel_error"])
        log.step(step, {"loss": sum(r["l1"] for r in rec.values()) / len(rec), "rel_error_mean": mean_rel,
                        "rel_error": rels, "lr": self.distiller.lr_scheduler.get_last_lr()[0],
                        "trajectory": self.traj.trajectory, "sampling_step": self.traj.step, **_mass_log(rec)},
                 postfix={"rel": mean_rel, "worst": f"{worst}:{rec[worst]['rel_error']:.3f}"})
        if self.a.callback is not None:
            self.a.callback(step, rec)

    def train(self) -> None:
        """The steps, then the evaluation after them (or the last step's records without evaluation)."""
        a = self.a
        self.run.write_config()
        self.history = []
        self.train_s = self.run.train(lambda step: self.distiller.step(), save=self._checkpoint, record=self._record,
                                      samples_per_step=a.batch_size * (2 if self.guidance > 1.0 else 1))
        self.after = self._evaluate() if a.eval_trajectories > 0 else (self.history[-1] if self.history else None)

    # ------------------------------------------------------------------------------------------------ outputs
    def finish(self) -> "DistillResult":
        """Warnings, the student model folder and the reports (main process); the result."""
        a, after, rcfg = self.a, self.after, self.rcfg
        report = error_table(rcfg.blocks, self.block_settings, self.before, after) if after else ""
        warnings = mass_warnings(after) if after else []
        if warnings and self.env.is_main:
            print("rehyat distill: warning: "
                  + "\n  ".join(["the linear branch's mass differs from softmax's:"] + warnings))
        self.run.finish(lambda: self._write_outputs(report, warnings))
        return DistillResult(out=a.out, blocks=rcfg.blocks, before=self.before, after=after, history=self.history,
                             ranking=self.ranking, report=report, steps=a.steps)

    def _write_outputs(self, report: str, warnings: list[str]) -> None:
        from .components import save_model_folder

        a, before, after, bs = self.a, self.before, self.after, self.block_settings
        fm_state = {n: p.detach().float().cpu() for n, p in feature_map_parameters(self.teacher)}
        student = build_student(self.model, None if self.converted_cfg is not None else self.chosen, self.conversion,
                                self.block_settings_given, fm_state)
        save_model_folder(student, a.out, components_from=self.model)
        summary = {
            "blocks": {str(b): {"chunk_frames": bs[b][0], "overlap_frames": bs[b][1],
                                "before": before and before.get(b), "after": after and after.get(b)}
                       for b in self.rcfg.blocks},
            "mean_rel_error_before": before and sum(v["rel_error"] for v in before.values()) / len(before),
            "mean_rel_error_after": after and sum(v["rel_error"] for v in after.values()) / len(after),
            "steps": a.steps, "sampling_steps": a.sampling_steps, "batch_size": a.batch_size,
            "guidance": self.guidance, "world_size": self.env.world_size,
            "train_seconds_this_invocation": round(self.train_s, 3),
            "ranking": self.ranking, "evaluation": f"{a.eval_trajectories} trajectories x {a.sampling_steps} steps, "
                                                   f"seed {a.seed + EVAL_SEED_OFFSET}, not trained on",
            "linear_log_scale_calibration": self.calibration and {str(b): g for b, g in self.calibration.items()},
            "mass_warnings": warnings,
        }
        (a.out / "distill_report.json").write_text(json.dumps(summary, indent=2) + "\n")
        (a.out / "distill_report.md").write_text("# Distillation: per-block error vs the teacher's attention output\n\n"
                                                 + report + "\n" + "".join(f"\n- warning: {w}" for w in warnings))


def block_causal_chunk(rehyat_cfg: dict | None) -> int | None:
    """The chunk of a block-causal model folder with no converted block (a causal teacher: ``rehyat_config.json``
    with ``"blocks": []`` and ``"softmax_blocks": "chunk_causal"``), else ``None``."""
    if rehyat_cfg and not rehyat_cfg.get("blocks") and rehyat_cfg.get("softmax_blocks") == "chunk_causal":
        return rehyat_cfg.get("chunk_frames", 3)
    return None


def check_block_causal_teacher(model, rehyat_cfg: dict, chunk_frames: int, softmax_blocks: str) -> None:
    """ValueError (naming the arguments) unless a block-causal teacher is converted with its own chunk and its
    other blocks stay block-causal."""
    chunk = block_causal_chunk(rehyat_cfg)
    if chunk_frames != chunk or softmax_blocks != "chunk_causal":
        raise ValueError(f"{model} is a block-causal teacher with chunk_frames {chunk}: distil it with "
                         f"--chunk-frames {chunk} --softmax-blocks chunk_causal (got --chunk-frames {chunk_frames} "
                         f"--softmax-blocks {softmax_blocks})")

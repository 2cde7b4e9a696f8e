"""Block selection (Attention Surgery, design section 6): which blocks to convert, and with which chunk settings.

* Ranking (``best:N``): distil every block briefly with one setting and convert the N blocks with the lowest error.
* Budgeted choice (``auto``): per block, choose among candidate ``(chunk_frames, overlap_frames)`` settings and
  "keep softmax" to minimise the total distillation error subject to an attention-FLOP budget, a fraction of the
  teacher's self-attention FLOPs at the target geometry. This is a multiple-choice knapsack, solved exactly by
  :func:`solve_mckp` (dynamic programming over exact integer costs, keeping only Pareto-optimal partial
  solutions).

FLOP model (:func:`attention_flops`, per video, multiply-add = 2 FLOPs, the self-attention operator only: the
q/k/v/out projections are the same in every option and left out):

* softmax over a query set Q and key set K: ``4 |Q| |K| H D`` (``QK^T`` and ``PV``);
* teacher: one window of all N tokens: ``4 N^2 H D``; a chunk-causal softmax block: chunk c's queries against every
  frame up to the chunk's end;
* ReHyAt block: softmax over each chunk's window plus the linear branch: both feature maps (``2 N H`` times the
  map's FLOPs per head-vector: ``2 D h + 2 h D'`` for the polynomial MLP, ``2 D D'/2`` for Hedgehog), the per-frame
  sums ``phi_k^T v`` (``2 N H D' D``) and the read-out ``phi_q (S, z)`` (``2 N H D' (D + 1)``).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from .conversion import ConversionSettings

__all__ = [
    "attention_flops",
    "feature_map_flops",
    "solve_mckp",
    "brute_force_mckp",
    "parse_candidates",
    "BlockChoice",
    "Selection",
    "select_blocks_budget",
    "selection_table",
    "convert_model",
]


def feature_map_flops(head_dim: int, feature_map: str = "polynomial", feature_map_kwargs: dict | None = None) -> int:
    """FLOPs of one feature map on one head-vector (``D -> D'``)."""
    kw = dict(feature_map_kwargs or {})
    fdim = kw.get("feature_dim") or 2 * head_dim
    if feature_map == "hedgehog":
        return 2 * head_dim * (fdim // 2)
    hidden = kw.get("hidden_dim") or fdim
    return 2 * head_dim * hidden + 2 * hidden * fdim


def attention_flops(num_frames: int, frame_tokens: int, heads: int, head_dim: int, setting=None, *,
                    feature_map: str = "polynomial", feature_map_kwargs: dict | None = None,
                    softmax: str = "bidirectional") -> int:
    """Self-attention FLOPs of one block on one video (exact integer, see the module docstring).

    Args:
        num_frames: latent frames T. frame_tokens: tokens per frame S. heads, head_dim: H, D.
        setting: ``None`` for a softmax block, or ``(chunk_frames, overlap_frames)`` for a ReHyAt block.
        feature_map, feature_map_kwargs: the ReHyAt block's feature maps.
        softmax: a softmax block's attention (with ``setting=None``): ``"bidirectional"`` (the teacher) or
            ``("chunk_causal", chunk_frames)`` (block-causal softmax, design section 6).
    """
    from ..ops import chunk_windows

    T, S, H, D = num_frames, frame_tokens, heads, head_dim
    N = T * S
    if setting is None:
        if softmax == "bidirectional":
            return 4 * N * N * H * D
        kind, tc = softmax
        if kind != "chunk_causal":
            raise ValueError(f"softmax must be 'bidirectional' or ('chunk_causal', chunk_frames), got {softmax!r}")
        return sum(4 * (q1 - q0) * S * q1 * S * H * D for _, q0, q1 in chunk_windows(T, tc, T))
    tc, to = setting
    soft = sum(4 * (q1 - q0) * S * (q1 - w0) * S * H * D for w0, q0, q1 in chunk_windows(T, tc, to))
    fdim = dict(feature_map_kwargs or {}).get("feature_dim") or 2 * D
    phi = 2 * N * H * feature_map_flops(D, feature_map, feature_map_kwargs)
    linear = 2 * N * H * fdim * D + 2 * N * H * fdim * (D + 1)
    return soft + phi + linear


# ----------------------------------------------------------------------------------------------------------------
# Multiple-choice knapsack
# ----------------------------------------------------------------------------------------------------------------
def solve_mckp(errors: list[list[float]], costs: list[list[int]], budget: int) -> tuple[list[int], float, int]:
    """Exact multiple-choice knapsack: pick one option per group, total cost <= ``budget``, least total error.

    Dynamic programming over groups on exact integer costs: after each group only the Pareto-optimal partial
    solutions (no other one both cheaper-or-equal and lower-or-equal in error) are kept, which is exact and small
    here (the number of distinct total costs is bounded by the multisets of option costs). Ties in error go to the
    cheaper solution, then to the lexicographically smaller choice.

    Args:
        errors: ``errors[g][o]`` error of option o in group g (finite floats).
        costs: ``costs[g][o]`` integer cost (>= 0).
        budget: integer budget.

    Returns:
        ``(choice, total_error, total_cost)``: ``choice[g]`` the option index chosen for group g.

    Raises:
        ValueError: mismatched shapes, an empty group, non-integer or negative costs, or no feasible choice
            (the message gives the least achievable cost).
    """
    if len(errors) != len(costs):
        raise ValueError("errors and costs must have one entry per group")
    for g, (e, c) in enumerate(zip(errors, costs)):
        if not e or len(e) != len(c):
            raise ValueError(f"group {g}: errors and costs must be non-empty and of equal length")
        if any(not isinstance(x, int) or x < 0 for x in c):
            raise ValueError(f"group {g}: costs must be non-negative ints, got {c}")
    # frontier: list of (cost, error, choice tuple), sorted by cost, errors strictly decreasing
    frontier = [(0, 0.0, ())]
    for e, c in zip(errors, costs):
        cand = {}
        for cost0, err0, ch in frontier:
            for o, (eo, co) in enumerate(zip(e, c)):
                cost = cost0 + co
                if cost > budget:
                    continue
                key = (err0 + eo, ch + (o,))
                if cost not in cand or key < cand[cost]:
                    cand[cost] = key
        frontier = []
        best = None
        for cost in sorted(cand):
            err, ch = cand[cost]
            if best is None or err < best:
                frontier.append((cost, err, ch))
                best = err
        if not frontier:
            least = sum(min(c) for c in costs)
            raise ValueError(f"no choice fits the budget {budget}: the cheapest choice costs {least}")
    cost, err, ch = min(frontier, key=lambda x: (x[1], x[0], x[2]))
    return list(ch), err, cost


def brute_force_mckp(errors, costs, budget) -> tuple[list[int], float, int] | None:
    """Reference for tests: try every combination. Returns the optimum like :func:`solve_mckp`, or ``None``."""
    best = None
    for ch in itertools.product(*[range(len(e)) for e in errors]):
        cost = sum(c[o] for c, o in zip(costs, ch))
        if cost > budget:
            continue
        err = sum(e[o] for e, o in zip(errors, ch))
        if best is None or (err, cost) < (best[1], best[2]):
            best = (list(ch), err, cost)
    return best


def parse_candidates(spec: str) -> list[tuple[int, int]]:
    """``"3,1;5,1;2,0"`` -> ``[(3, 1), (5, 1), (2, 0)]`` (chunk_frames >= 1, overlap_frames >= 0).

    Raises ValueError for a malformed list."""
    out = []
    for part in str(spec).split(";"):
        if not part.strip():
            continue
        try:
            tc, to = (int(x) for x in part.split(","))
        except ValueError:
            raise ValueError(f"--candidates must look like '3,1;5,1;2,0' (chunk,overlap pairs), got {spec!r}") from None
        if tc < 1 or to < 0:
            raise ValueError(f"--candidates: chunk_frames must be >= 1 and overlap_frames >= 0, got {tc},{to}")
        out.append((tc, to))
    if not out:
        raise ValueError("--candidates lists no (chunk_frames, overlap_frames) pair")
    return list(dict.fromkeys(out))


@dataclass
class BlockChoice:
    """One block's options and the chosen one: ``setting`` is ``None`` for "keep softmax"."""

    block: int
    setting: tuple[int, int] | None
    error: float
    flops: int
    options: dict  # "softmax" / "tc,to" -> {"rel_error", "flops"}


@dataclass
class Selection:
    """Result of a block selection: per-block choices and totals."""

    choices: list[BlockChoice]
    total_error: float
    total_flops: int
    teacher_flops: int
    budget_flops: int | None
    method: str

    @property
    def converted(self) -> dict[int, tuple[int, int]]:
        return {c.block: c.setting for c in self.choices if c.setting is not None}

    def to_dict(self) -> dict:
        return {
            "method": self.method, "total_error": self.total_error, "total_flops": self.total_flops,
            "teacher_flops": self.teacher_flops, "budget_flops": self.budget_flops,
            "flops_fraction": self.total_flops / self.teacher_flops,
            "blocks": [{"block": c.block, "choice": "softmax" if c.setting is None else list(c.setting),
                        "rel_error": c.error, "flops": c.flops, "options": c.options} for c in self.choices],
        }


def check_budget(budget: float, *, num_blocks: int, flops: dict, softmax_flops: int,
                 teacher_flops_per_block: int) -> None:
    """Raise ``ValueError`` when no choice can meet ``budget`` or when every block would stay softmax; needs only
    FLOP counts, so :func:`convert_model` calls it before any distillation.

    Args: as :func:`select_blocks_budget` (``flops`` ``{(tc, to): FLOPs of a converted block}``).
    """
    teacher = teacher_flops_per_block * num_blocks
    cap = int(budget * teacher)
    cheapest_conv = min(flops.values())
    if num_blocks * min(softmax_flops, cheapest_conv) > cap:
        if cheapest_conv >= softmax_flops:
            raise ValueError(
                f"--budget {budget}: at this geometry every candidate costs more attention FLOPs than a softmax block "
                f"(the cheapest {cheapest_conv / softmax_flops:.2f}x), so converting cannot reduce the cost; use the "
                "real video length (--frames), or candidates with smaller windows (--candidates)")
        least = num_blocks * min(softmax_flops, cheapest_conv)
        raise ValueError(f"--budget {budget} is below what any choice reaches: converting every block with its "
                         f"cheapest candidate costs {least / teacher:.3f} of the teacher's attention FLOPs")
    if num_blocks * softmax_flops <= cap:
        raise ValueError(f"--budget {budget} keeps every block softmax (softmax everywhere costs "
                         f"{num_blocks * softmax_flops / teacher:.3f} of the teacher's attention FLOPs): nothing to "
                         "convert; lower --budget")


def select_blocks_budget(errors: dict[tuple[int, int], dict[int, float]], *, num_blocks: int, flops: dict,
                         softmax_flops: int, teacher_flops_per_block: int, budget: float) -> Selection:
    """Choose per block among candidate settings and "keep softmax" under a FLOP budget (exact knapsack).

    Args:
        errors: ``{(tc, to): {block: rel_error}}`` from short distillations.
        num_blocks: blocks of the model.
        flops: ``{(tc, to): FLOPs of a converted block}``; softmax_flops: FLOPs of a kept softmax block.
        teacher_flops_per_block: the teacher's (bidirectional) FLOPs per block; budget: fraction of the teacher's
            total, in (0, 1] (or more).

    Raises:
        ValueError: a budget no choice fits.
    """
    cands = list(errors)
    teacher = teacher_flops_per_block * num_blocks
    cap = int(budget * teacher)
    check_budget(budget, num_blocks=num_blocks, flops={c: flops[c] for c in cands}, softmax_flops=softmax_flops,
                 teacher_flops_per_block=teacher_flops_per_block)
    errs, costs = [], []
    for b in range(num_blocks):
        errs.append([0.0] + [float(errors[c][b]) for c in cands])
        costs.append([softmax_flops] + [flops[c] for c in cands])
    choice, total, cost = solve_mckp(errs, costs, cap)
    out = []
    for b, o in enumerate(choice):
        options = {"softmax": {"rel_error": 0.0, "flops": softmax_flops}}
        options.update({f"{c[0]},{c[1]}": {"rel_error": float(errors[c][b]), "flops": flops[c]} for c in cands})
        setting = None if o == 0 else cands[o - 1]
        out.append(BlockChoice(b, setting, errs[b][o], costs[b][o], options))
    return Selection(out, total, cost, teacher, cap, "knapsack")


def selection_table(sel: Selection) -> str:
    """Markdown table of a :class:`Selection`."""
    keys = list(sel.choices[0].options) if sel.choices else []
    head = "| block | choice | " + " | ".join(f"err {k}" for k in keys if k != "softmax") + " | FLOPs (G) |"
    lines = [head, "|" + "---:|" * (3 + len([k for k in keys if k != "softmax"]))]
    for c in sel.choices:
        ch = "softmax" if c.setting is None else f"T_c={c.setting[0]}, T_o={c.setting[1]}"
        errs = " | ".join(f"{c.options[k]['rel_error']:.4f}" if c.options[k]["rel_error"] == c.options[k]["rel_error"]
                          else "-" for k in keys if k != "softmax")
        lines.append(f"| {c.block} | {ch} | {errs} | {c.flops / 1e9:.4g} |")
    frac = sel.total_flops / sel.teacher_flops
    budget = f", budget {sel.budget_flops / sel.teacher_flops:.3f}" if sel.budget_flops else ""
    lines.append(f"\nTotal error {sel.total_error:.4f}; attention FLOPs {frac:.3f} of the teacher's{budget} "
                 f"({sel.method}).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# rehyat convert
# ----------------------------------------------------------------------------------------------------------------
def convert_model(
    model,
    out,
    *,
    blocks="all",
    budget: float | None = None,
    candidates: str | list | None = None,
    chunk_frames: int = 3,
    overlap_frames: int = 1,
    causal: bool = True,
    stabilizer: str = "lse",
    feature_map: str = "polynomial",
    feature_map_kwargs: dict | None = None,
    feature_map_input: str = "rotated",
    softmax_blocks: str = "bidirectional",
    block_overlap_frames: dict[int, int] | None = None,
    prompts=None,
    data=None,
    text_embeddings=None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    rank_steps: int = 20,
    sampling_steps: int = 20,
    guidance: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 1,
    seed: int = 0,
    device=None,
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, Selection | None]:
    """Convert a teacher folder to ReHyAt, choosing the blocks (``rehyat convert``).

    ``blocks``: ``"all"`` or a list (plain conversion with ``chunk_frames``/``overlap_frames``, no distillation);
    ``"best:N"`` (short distillation of every block, ``rank_steps`` steps, with that setting; the N lowest-error
    blocks are converted); ``"auto"`` with ``budget`` (fraction of the teacher's self-attention FLOPs at the
    target geometry) and ``candidates`` (``"3,1;5,1;2,0"``): one short distillation per candidate setting (all
    blocks at once, since teacher forcing makes them independent), then the exact knapsack of
    :func:`select_blocks_budget`. Converted blocks keep the feature maps of their short distillation (a head
    start for ``rehyat distill``). Unconverted blocks keep bidirectional softmax unless
    ``softmax_blocks="chunk_causal"`` (then their cost is the chunk-causal one). ``block_overlap_frames``
    (``{block: frames}``, with ``"all"`` or a list only) gives those blocks their own ``overlap_frames``: converted
    blocks a wider or narrower window, and with ``softmax_blocks="chunk_causal"`` unconverted blocks a bounded
    softmax window (:func:`rehyat.training.distill`'s argument of the same name).

    The output is a model folder (teacher components copied, transformer via :func:`rehyat.save_rehyat` with
    per-block ``block_settings``) plus ``selection.json`` / ``selection.md`` for ``best:N`` and ``auto``. Prompts
    and geometry are as in :func:`rehyat.training.distill`.

    Returns:
        ``(out, selection)`` (``selection`` is ``None`` for a plain conversion).

    Raises:
        ValueError / FileNotFoundError / FileExistsError: bad blocks, budget, candidates or
            ``block_overlap_frames``, an already converted folder, missing prompts for a ranked selection, an
            existing ``out``; all before any weights load.
    """
    from ..pipelines.folders import ModelFolder
    from .common import block_overlap_settings
    from .dataset import prepare_output_folder
    from .distributed import init_distributed

    model, out = ModelFolder.of(model), Path(out)  # its configs are read once, for every step below
    tcfg, kind, bval, conversion = _check_conversion(model, blocks, ConversionSettings.from_kwargs(locals()))
    cands = _check_selection_args(kind, blocks, budget, candidates, prompts, data, text_embeddings,
                                  rank_steps=rank_steps, sampling_steps=sampling_steps, batch_size=batch_size)
    given_settings = block_overlap_settings(block_overlap_frames, kind, bval, tcfg["num_layers"],
                                            conversion["softmax_blocks"], blocks)
    latent_shape = _latent_shape(model, tcfg, data, frames, height, width)
    costs = _BlockCosts(tcfg, latent_shape, conversion)
    if kind == "auto":  # FLOP counts alone decide whether the budget can be met: check before any distillation
        check_budget(budget, num_blocks=costs.num_blocks, flops={c: costs.converted(c) for c in cands},
                     softmax_flops=costs.softmax, teacher_flops_per_block=costs.teacher)
    prepare_output_folder(out, overwrite=overwrite)

    selection, feature_maps, block_settings, chosen = None, {}, given_settings, bval
    if kind in ("best", "auto"):
        env = init_distributed(device)
        run = _selection_run(model, tcfg, latent_shape, env, prompts=prompts, data=data,
                             text_embeddings=text_embeddings, guidance=guidance, lr=lr, batch_size=batch_size,
                             sampling_steps=sampling_steps, seed=seed, precision=precision, progress=progress)
        if kind == "best":
            selection, feature_maps = _ranked_selection(model, conversion, bval, costs, rank_steps, run)
        else:
            selection, feature_maps, block_settings = _budget_selection(model, conversion, cands, costs, budget,
                                                                        rank_steps, run)
        chosen = sorted(selection.converted)
        if not env.is_main:
            return out, selection
    _write_converted(model, out, chosen, conversion, block_settings, feature_maps, selection, seed=seed,
                     overwrite=overwrite)
    return out, selection


def _check_conversion(model, blocks, settings: ConversionSettings):
    """``(transformer config, blocks kind, its value, conversion kwargs)`` after checking that ``model`` is a teacher
    (or a block-causal teacher converted with its own chunk) and that the conversion ``settings`` are valid."""
    from .common import parse_blocks
    from .distill import block_causal_chunk, check_block_causal_teacher

    tcfg = model.transformer_config
    if block_causal_chunk(tcfg["rehyat"]) is not None:  # a block-causal teacher: its blocks are converted here
        check_block_causal_teacher(model, tcfg["rehyat"], settings.chunk_frames, settings.softmax_blocks)
    elif tcfg["rehyat"] is not None:
        raise ValueError(f"{model} is already converted to ReHyAt; convert the teacher folder")
    kind, bval = parse_blocks(blocks, tcfg["num_layers"], allow=("all", "list", "best", "auto"))
    conversion = settings.to_kwargs()
    settings.check(tcfg["attention_head_dim"])
    return tcfg, kind, bval, conversion


def _check_selection_args(kind: str, blocks, budget, candidates, prompts, data, text_embeddings, *,
                          rank_steps, sampling_steps, batch_size) -> list[tuple[int, int]] | None:
    """The candidate settings of ``--blocks auto`` (``None`` otherwise), after checking the arguments of a ranked
    or budgeted selection. Raises ValueError naming the argument."""
    from .trajectory import read_prompt_file

    cands = None
    if kind == "auto":
        if budget is None or not 0 < budget < 1:
            raise ValueError(f"--blocks auto needs 0 < --budget < 1 (a fraction of the teacher's attention FLOPs; "
                             f"at 1 or more keeping every block softmax is optimal), got {budget}")
        cands = parse_candidates(candidates if candidates is not None else "3,1;5,1;2,0") \
            if not isinstance(candidates, list) else [tuple(c) for c in candidates]
    elif budget is not None or candidates is not None:
        raise ValueError("--budget and --candidates go with --blocks auto")
    if kind in ("best", "auto"):
        if prompts is not None:
            read_prompt_file(prompts)
        elif data is None and text_embeddings is None:
            raise ValueError(f"--blocks {blocks} ranks blocks by a short distillation: pass --prompts, --data or "
                             "--text-embeddings")
        for name, v in (("--rank-steps", rank_steps), ("--sampling-steps", sampling_steps), ("--batch-size", batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return cands


def _latent_shape(model, tcfg: dict, data, frames, height, width) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of the target geometry: the dataset's (checked against the model), else the given or the
    folder's default video size."""
    from .common import default_geometry, latent_shape_for
    from .dataset import check_dataset_fits_model, read_dataset_info

    if data is not None:
        info = read_dataset_info(data)
        check_dataset_fits_model(info, tcfg)
        return info.latent_shape
    return latent_shape_for(model, *default_geometry(model, frames, height, width))


class _BlockCosts:
    """Self-attention FLOPs of one of the model's ``num_blocks`` blocks at the target geometry
    (:func:`attention_flops`): ``teacher`` (bidirectional softmax), ``softmax`` (a block left unconverted: bidirectional or chunk-causal, as ``softmax_blocks`` says) and
    :meth:`converted` (a ReHyAt block with a ``(chunk_frames, overlap_frames)`` setting)."""

    def __init__(self, tcfg: dict, latent_shape, conversion: dict) -> None:
        _, F, H, W = latent_shape
        S = (H // tcfg["patch_size"][1]) * (W // tcfg["patch_size"][2])
        self.num_blocks = tcfg["num_layers"]
        self._shape = (F, S, tcfg["num_attention_heads"], tcfg["attention_head_dim"])
        self._fm = dict(feature_map=conversion["feature_map"], feature_map_kwargs=conversion["feature_map_kwargs"])
        self.teacher = attention_flops(*self._shape, None)
        self.softmax = self.teacher if conversion["softmax_blocks"] == "bidirectional" else \
            attention_flops(*self._shape, None, softmax=("chunk_causal", conversion["chunk_frames"]))

    def converted(self, setting: tuple[int, int]) -> int:
        return attention_flops(*self._shape, setting, **self._fm)


def _selection_run(model, tcfg: dict, latent_shape, env, *, prompts, data, text_embeddings, guidance, lr,
                   batch_size, sampling_steps, seed, precision, progress) -> dict:
    """The keyword arguments every short distillation of a ranked selection takes: the prompt pool
    (:func:`~rehyat.training.trajectory.resolve_prompt_pool`), the guidance (``None``: the folder's default, else
    5.0), the run's dtype from ``precision`` on ``env.device``, and the rest as given."""
    from .common import resolve_dtype
    from .trajectory import resolve_prompt_pool

    if guidance is None:
        guidance = model.generation_defaults["guidance"]
    return dict(pool=resolve_prompt_pool(model, prompts=prompts, data=data, text_embeddings=text_embeddings,
                                         device=env.device, text_dim=tcfg["text_dim"]),
                latent_shape=latent_shape, lr=lr, batch_size=batch_size, sampling_steps=sampling_steps,
                guidance=float(guidance), seed=seed, env=env, dtype=resolve_dtype(precision, env.device),
                progress=progress)


def _ranked_selection(model, conversion: dict, n: int, costs: _BlockCosts, rank_steps: int, run: dict):
    """``best:N``: :func:`rehyat.training.distill.rank_blocks` as a :class:`Selection`, and the chosen blocks'
    trained feature maps."""
    from .distill import rank_blocks

    setting = (conversion["chunk_frames"], conversion["overlap_frames"])
    chosen, errors, feature_maps = rank_blocks(model, conversion, n, rank_steps=rank_steps,
                                               desc=f"short distillation T_c={setting[0]}, T_o={setting[1]}", **run)
    cost = costs.converted(setting)
    choices = []
    for b in sorted(errors):
        err = errors[b]["rel_error"]
        options = {"softmax": {"rel_error": 0.0, "flops": costs.softmax},
                   f"{setting[0]},{setting[1]}": {"rel_error": err, "flops": cost}}
        choices.append(BlockChoice(b, setting, err, cost, options) if b in chosen
                       else BlockChoice(b, None, 0.0, costs.softmax, options))
    selection = Selection(choices, sum(c.error for c in choices), sum(c.flops for c in choices),
                          costs.teacher * len(choices), None, f"best:{n} (ranked after {rank_steps} steps)")
    return selection, feature_maps


def _budget_selection(model, conversion: dict, cands: list, costs: _BlockCosts, budget: float, rank_steps: int,
                      run: dict):
    """``auto``: one short distillation per candidate setting, the exact knapsack over their errors; the selection,
    every converted block's feature maps from its chosen setting's short distillation, and the per-block
    ``block_settings`` of :func:`~rehyat.models.convert_wan` for the chosen settings."""
    import torch

    from .distill import short_distillation

    errors, states = {}, {}
    for tc, to in cands:
        torch.manual_seed(run["seed"])
        err, states[(tc, to)] = short_distillation(model, dict(conversion, chunk_frames=tc, overlap_frames=to), "all",
                                                   steps=rank_steps, desc=f"short distillation T_c={tc}, T_o={to}",
                                                   **run)
        errors[(tc, to)] = {b: err[b]["rel_error"] for b in err}
    # (check_budget in convert_model guarantees at least one converted block)
    selection = select_blocks_budget(errors, num_blocks=costs.num_blocks,
                                     flops={c: costs.converted(c) for c in cands}, softmax_flops=costs.softmax,
                                     teacher_flops_per_block=costs.teacher, budget=budget)
    selection.method = f"knapsack over {len(cands)} candidates + softmax, errors after {rank_steps} steps"
    feature_maps = {}
    for b, setting in selection.converted.items():
        prefix = f"blocks.{b}.attn1.processor."
        feature_maps.update({k: v for k, v in states[setting].items() if k.startswith(prefix)})
    block_settings = {b: {"chunk_frames": tc, "overlap_frames": to} for b, (tc, to) in selection.converted.items()}
    return selection, feature_maps, block_settings


def _write_converted(model, out: Path, chosen, conversion: dict, block_settings, feature_maps: dict,
                     selection: Selection | None, *, seed: int, overwrite: bool) -> None:
    """Write the converted model folder (with ``feature_maps`` if any, else freshly initialised ones from ``seed``)
    and, for a selection, ``selection.{json,md}``."""
    import torch

    from ..models import convert_wan
    from .components import load_model_folder, save_model_folder
    from .distill import build_student

    if feature_maps:
        student = build_student(model, chosen, conversion, block_settings, feature_maps)
    else:
        torch.manual_seed(seed)
        student = convert_wan(load_model_folder(model, device="cpu").transformer, blocks=chosen,
                              block_settings=block_settings, **conversion)
    if overwrite and out.is_dir():
        from .common import clear_run_outputs

        clear_run_outputs(out)
    save_model_folder(student, out, components_from=model)
    if selection is not None:
        (out / "selection.json").write_text(json.dumps(selection.to_dict(), indent=2) + "\n")
        (out / "selection.md").write_text("# Block selection\n\n" + selection_table(selection) + "\n")

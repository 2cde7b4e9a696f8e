"""Stage 2, fine-tuning (design section 7), and training a Wan transformer from scratch: flow matching on latents.

Flow matching as in Wan / diffusers' flow schedulers: for clean latents ``x_0``, noise ``eps`` and a noise level
``t`` in (0, 1), the model sees ``x_t = (1 - t) x_0 + t eps`` at timestep ``1000 t`` (what Wan's scheduler passes)
and is trained to predict the velocity ``eps - x_0`` with a mean-squared error. Noise levels are drawn

* ``"shifted"`` (default): ``u ~ U(0, 1)``, ``t = s u / (1 + (s - 1) u)`` with the flow shift ``s`` (3.0, Wan's
  480p sampling shift, design section 1): the same warping the sampler applies to its sigmas, so training sees the
  noise levels sampling visits (more weight on high noise);
* ``"uniform"``: ``t ~ U(0, 1)``.

Optional teacher-velocity loss (``teacher``, ``teacher_weight`` w): ``w * MSE(student(x_t), teacher(x_t))`` at the
same noisy input. With data it is added to the flow-matching loss; without data the noisy inputs come from the
teacher's own sampling trajectories for the given prompts (no videos needed) and it is the only loss.

Modes: full fine-tuning (every parameter) or LoRA through ``peft`` (``lora_rank`` > 0: adapters on the attention
and FFN linear layers; the ReHyAt feature maps train fully; the adapters are merged into the weights when saved).

Several processes (``torchrun``): DDP; each process takes its slice of every global batch, and every random draw
(batch order, noise levels, noise, caption dropout) is made for the whole global batch from a generator seeded by
``(seed, step)``, so any number of processes gives the same run. GPU: bfloat16 autocast, optional gradient
checkpointing, the dataset held on the GPU when it fits.
"""

from __future__ import annotations

import inspect
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import load_trainable_state
from .common import (
    cast_frozen_model,
    default_geometry,
    feature_map_parameters,
    latent_shape_for,
    resolve_dtype,
    set_deterministic,
)
from .distributed import DistEnv, init_distributed, local_slice
from .progress import peak_memory_gib
from .run import TrainingRun
from .trajectory import TeacherTrajectories, read_prompt_file, resolve_prompt_pool

__all__ = [
    "TIMESTEP_SAMPLING",
    "LORA_TARGETS",
    "sample_noise_levels",
    "flow_matching_inputs",
    "step_generator",
    "add_lora",
    "merge_lora",
    "evaluate_flow_matching",
    "finetune",
    "FinetuneResult",
    "transformer_config",
    "check_transformer_config",
]

TIMESTEP_SAMPLING = ("shifted", "uniform")
TRAINABLE = ("all", "feature_maps")  # what fine-tuning trains (``--trainable``)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
EVAL_SEED_OFFSET = 9_999_991


# ----------------------------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------------------------
def step_generator(seed: int, step: int, device) -> torch.Generator:
    """A generator on ``device`` seeded by ``(seed, step)``: the random draws of one optimizer step."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63))
    return g


def sample_noise_levels(n: int, generator: torch.Generator, *, sampling: str = "shifted", shift: float = 3.0,
                        device=None) -> torch.Tensor:
    """``n`` noise levels ``t`` in (0, 1), float32 on ``device`` (see the module docstring for the schedules)."""
    if sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {sampling!r}")
    u = torch.rand(n, generator=generator, device=device).clamp(1e-5, 1 - 1e-5)
    if sampling == "uniform":
        return u
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_inputs(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """``(x_t, timestep, target)`` for clean latents ``x0 [b, C, F, H, W]``, noise (same shape) and levels ``t [b]``:
    ``x_t = (1 - t) x0 + t noise``, ``timestep = 1000 t``, ``target = noise - x0``."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise, t * 1000.0, noise - x0


def _global_draws(step: int, seed: int, B: int, shape, device, local: slice, sampling: str, shift: float,
                  text_dropout: float):
    g = step_generator(seed, step, device)
    t = sample_noise_levels(B, g, sampling=sampling, shift=shift, device=device)
    noise = torch.randn((B, *shape), generator=g, device=device)
    drop = torch.rand(B, generator=g, device=device) < text_dropout
    return t[local], noise[local], drop[local]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def transformer_config(config) -> dict:
    """A complete ``WanTransformer3DModel`` config from a dict or JSON file (keys starting with ``_`` ignored;
    missing ones take the class defaults), checked by :func:`check_transformer_config`.

    Raises:
        FileNotFoundError: a missing file. ValueError: not valid JSON, not a JSON object, an unknown key, or a
            bad value (naming the file and the key).
    """
    from diffusers import WanTransformer3DModel

    source = "--config"
    if not isinstance(config, dict):
        path = Path(config)
        source = f"--config {path}"
        if not path.is_file():
            raise FileNotFoundError(f"--config file {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{source} must hold a JSON object of WanTransformer3DModel settings, got a "
                             f"{type(config).__name__}")
    params = inspect.signature(WanTransformer3DModel.__init__).parameters
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise ValueError(f"{source}: unknown WanTransformer3DModel settings {unknown}")
    full = {k: p.default for k, p in params.items() if k != "self"}
    full.update(cfg)
    if full["out_channels"] is None:
        full["out_channels"] = full["in_channels"]
    check_transformer_config(full, source)
    full["patch_size"] = list(full["patch_size"])
    return full


_WAN_SIZES = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
              "freq_dim", "ffn_dim", "rope_max_seq_len")
_WAN_OPTIONAL_SIZES = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def check_transformer_config(cfg: dict, source: str = "--config") -> None:
    """Check a complete ``WanTransformer3DModel`` config before anything is written: every size an int >= 1
    (``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len`` may be null), ``patch_size`` three of them, and
    the model constructible (built on the meta device: no memory, no weights).

    Raises:
        ValueError: naming ``source`` (e.g. ``--config FILE``) and the key.
    """
    import torch
    from diffusers import WanTransformer3DModel

    def size(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    params = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    for k in _WAN_SIZES + _WAN_OPTIONAL_SIZES:
        v = cfg.get(k)
        if not size(v) and not (v is None and k in _WAN_OPTIONAL_SIZES):
            raise ValueError(f"{source}: {k} must be an int >= 1{' or null' if k in _WAN_OPTIONAL_SIZES else ''}, "
                             f"got {v!r}")
    ps = cfg.get("patch_size")
    if not isinstance(ps, (list, tuple)) or len(ps) != 3 or not all(size(v) for v in ps):
        raise ValueError(f"{source}: patch_size must be a list of 3 ints >= 1, got {ps!r}")
    eps = cfg.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{source}: eps must be a number > 0, got {eps!r}")
    try:
        with torch.device("meta"):
            WanTransformer3DModel(**{k: v for k, v in cfg.items() if k in params})
    except Exception as e:  # e.g. diffusers' RoPE asserts an even split of attention_head_dim
        raise ValueError(f"{source}: WanTransformer3DModel cannot be built from these settings "
                         f"({e!r}); check attention_head_dim (must be even)") from None


def train_feature_maps_only(transformer) -> list[str]:
    """Freeze everything but the converted blocks' processors (feature maps, linear-branch scales); returns the
    trainable parameter names. ``ValueError`` for a model without converted blocks (nothing would train)."""
    transformer.requires_grad_(False)
    names = []
    for n, p in feature_map_parameters(transformer):
        p.requires_grad_(True)
        names.append(n)
    if not names:
        raise ValueError("--trainable feature_maps: the model has no converted blocks, so no feature maps to train")
    return names


def add_lora(transformer, rank: int, alpha: float | None = None, targets=LORA_TARGETS) -> list[str]:
    """Add LoRA adapters (peft) to the attention and FFN linear layers and freeze the base weights.

    Only the adapters and the ReHyAt feature maps (if any) require grad afterwards. Returns the trainable
    parameter names. Raises ValueError for ``rank < 1`` or targets that match no layer.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be an int >= 1, got {rank!r}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                     lora_dropout=0.0, bias="none")
    transformer.requires_grad_(False)
    try:
        inject_adapter_in_model(cfg, transformer)
    except ValueError as e:
        raise ValueError(f"LoRA targets {list(targets)} match no layer of the model: {e}") from None
    for n, p in transformer.named_parameters():
        p.requires_grad_(".lora_" in n or ".attn1.processor." in n)
    return [n for n, p in transformer.named_parameters() if p.requires_grad]


def merge_lora(transformer) -> int:
    """Merge every LoRA adapter into its base layer and put the plain layer back (so the model saves and loads
    like one without adapters). Returns the number of merged layers."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for name, module in list(transformer.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
            n += 1
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
    return n


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_flow_matching(model, dataset, *, batch_size: int, num_batches: int = 2, seed: int = 0,
                           sampling: str = "shifted", shift: float = 3.0, env: DistEnv | None = None,
                           autocast_dtype: torch.dtype | None = None) -> float:
    """Mean flow-matching loss on fixed samples, noise and noise levels (drawn from ``seed``): comparable across
    models and runs. ``dataset`` is a :class:`~rehyat.training.dataset.LatentDataset`; the first ``num_batches *
    batch_size`` samples (cycled) are used, split across processes like training batches."""
    env = env or DistEnv(device=next(model.parameters()).device)
    local = local_slice(batch_size, env)
    shape = dataset.info.latent_shape
    total = torch.zeros((), dtype=torch.float64, device=env.device)
    for i in range(num_batches):
        idx = torch.arange(i * batch_size, (i + 1) * batch_size) % len(dataset)
        x0, emb = dataset.batch(idx[local], device=env.device)
        t, noise, _ = _global_draws(i, seed + EVAL_SEED_OFFSET, batch_size, shape, env.device, local, sampling, shift, 0.0)
        xt, ts, target = flow_matching_inputs(x0, noise, t)
        ctx = torch.autocast(env.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            pred = model(xt, ts, emb, return_dict=False)[0]
        total += F.mse_loss(pred.float(), target)
    env.all_reduce_mean(total)
    return float(total / num_batches)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What :func:`finetune` did: the model folder, this invocation's per-step losses, the fixed-sample
    flow-matching loss before and after (``None`` without data or with ``eval_batches=0``), and the report dict."""

    out: Path
    losses: list[float] = field(default_factory=list)
    eval_before: float | None = None
    eval_after: float | None = None
    report: dict = field(default_factory=dict)


def _lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            p = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0
    return f


def _pipeline_config_from_data(info) -> dict:
    cfg = {"max_sequence_length": info.max_sequence_length,
           "defaults": {"frames": info.num_frames, "height": info.height, "width": info.width}}
    if info.fps:
        cfg["fps"] = info.fps
    if info.text_encoder and info.text_encoder != "folder":
        cfg["text_encoder"] = info.text_encoder
    return cfg


def finetune(
    out,
    *,
    model=None,
    config=None,
    data=None,
    teacher=None,
    teacher_weight: float = 1.0,
    prompts=None,
    text_embeddings=None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    sampling_steps: int = 50,
    guidance: float | None = None,
    components_from=None,
    steps: int = 1000,
    batch_size: int = 8,
    micro_batch_size: int | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    lr_schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets=LORA_TARGETS,
    trainable: str = "all",
    timestep_sampling: str = "shifted",
    flow_shift: float = 3.0,
    text_dropout: float = 0.0,
    seed: int = 0,
    init_seed: int | None = None,
    chunk_causal: int | None = None,
    precision: str = "auto",
    gradient_checkpointing: bool = False,
    compile: bool = False,
    deterministic: bool = False,
    checkpoint_every: int = 500,
    log_every: int = 10,
    eval_batches: int = 2,
    data_device: str = "auto",
    device=None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a (converted or plain) Wan transformer, or train one from scratch (``rehyat finetune``).

    Args:
        out: output folder: a model folder at the end (the source folder's other components copied), plus
            ``finetune_report.json`` and ``train/`` (``checkpoint.pt``, ``log.jsonl``, ``run_config.json``).
        model: the model folder to start from. config: instead, a ``WanTransformer3DModel`` config (dict or JSON
            file) for a fresh model (weights from ``init_seed``, default ``seed``).
        chunk_causal: with ``config``: train the fresh model block-causal, chunks of this many latent frames
            (``rehyat.convert_wan(blocks=[], softmax_blocks="chunk_causal")``: every block's softmax attends to its
            chunk and every earlier frame, so the model streams, and a ReHyAt student of it can match it exactly
            where a causal student of a bidirectional teacher cannot); ``None`` (default): bidirectional.
        data: dataset folder (:mod:`rehyat.training.dataset`): flow-matching loss on its latents.
        teacher, teacher_weight: teacher model folder (same architecture) and the weight w of the
            teacher-velocity loss (default 1.0).
        prompts, text_embeddings: prompts for the teacher's trajectories when there is no ``data`` (as in
            :func:`rehyat.training.distill`). frames, height, width, sampling_steps (50), guidance: their
            geometry and sampler.
        components_from: model folder whose scheduler / VAE / text encoder the output gets (default: ``model``;
            with ``config``: the dataset's ``source_model`` when it exists).
        steps: optimizer steps. batch_size: global batch (a multiple of the number of processes).
            micro_batch_size: per-process samples per forward (gradient accumulation; default the whole local
            batch).
        lr, weight_decay, warmup_steps, lr_schedule (``"constant"`` | ``"cosine"``), min_lr_ratio: AdamW and its
            schedule. max_grad_norm: gradient clipping (``None``: off).
        lora_rank: > 0 trains LoRA adapters of that rank (``lora_alpha`` default = rank) on ``lora_targets`` plus
            the feature maps; 0 (default) trains everything.
        trainable: ``"all"`` (default: every parameter, or the LoRA adapters and feature maps) or
            ``"feature_maps"``: only the converted blocks' feature maps and linear-branch scales; the teacher's
            weights stay as they are, so a block-causal student's first chunk (which has no linear keys) stays
            exactly its teacher's. ``"feature_maps"`` needs a converted ``model`` and ``lora_rank`` 0.
        timestep_sampling: ``"shifted"`` (default, ``flow_shift`` 3.0) or ``"uniform"``.
        text_dropout: probability of replacing a sample's text embedding by the dataset's null embedding (zeros
            if it has none), for classifier-free guidance.
        seed: every random draw. precision: ``"auto"`` (bfloat16 autocast on CUDA, float32 on the CPU), ``"bf16"``
            or ``"fp32"``; weights and optimizer stay float32. gradient_checkpointing: recompute blocks in backward.
            compile: ``torch.compile`` the student (``nn.Module.compile``; the first steps are slow while it
            compiles). deterministic: deterministic kernels (:func:`~rehyat.training.common.set_deterministic`).
        checkpoint_every, log_every: steps between checkpoints / log flushes. eval_batches: fixed batches for the
            before/after flow-matching loss (0: skip). data_device: ``"auto"`` (on the GPU when it takes < 30% of
            its free memory), ``"cpu"`` or ``"device"``.
        device: torch device (default cuda if available). overwrite, resume: as in :func:`rehyat.training.distill`.
        callback: ``callback(step, loss)`` after every step (forces a device sync).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ValueError / FileNotFoundError / FileExistsError, before any weights load: neither or both of ``model``
            and ``config``; a ``config`` that is not a JSON object or has a bad value (see
            :func:`check_transformer_config`); malformed JSON in the model folder; nothing to train on (no data
            and no teacher); a teacher of another architecture;
            latents or text embeddings that do not fit the model (channels, text width, sizes not divisible by
            the patch); a dataset folder without ``dataset.json``; an empty prompt file; bad numbers; an existing
            ``out`` without ``overwrite``/``resume``; settings that differ from the resumed checkpoint's; ``steps``
            below the checkpoint's.
    """
    job = _FinetuneJob(FinetuneArgs(**locals()))
    job.open()
    job.build()
    job.train()
    return job.finish()


@dataclass
class FinetuneArgs:
    """:func:`finetune`'s arguments, typed (see its docstring for each)."""

    out: Path
    model: Path | None
    config: object
    data: Path | None
    teacher: Path | None
    teacher_weight: float
    prompts: Path | None
    text_embeddings: Path | None
    frames: int | None
    height: int | None
    width: int | None
    sampling_steps: int
    guidance: float | None
    components_from: Path | None
    steps: int
    batch_size: int
    micro_batch_size: int | None
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    min_lr_ratio: float
    max_grad_norm: float | None
    lora_rank: int
    lora_alpha: float | None
    lora_targets: tuple
    trainable: str
    timestep_sampling: str
    flow_shift: float
    text_dropout: float
    seed: int
    init_seed: int | None
    chunk_causal: int | None
    precision: str
    gradient_checkpointing: bool
    compile: bool
    deterministic: bool
    checkpoint_every: int
    log_every: int
    eval_batches: int
    data_device: str
    device: object
    overwrite: bool
    resume: bool
    progress: bool
    callback: Callable[[int, float], None] | None

    def __post_init__(self) -> None:
        self.out = Path(self.out)


class _FinetuneJob:
    """The steps of one :func:`finetune` run, in order: :meth:`open` (checks and settings, no weights),
    :meth:`build` (processes, data, models, optimizer, resume), :meth:`train`, :meth:`finish` (model and report)."""

    def __init__(self, a: FinetuneArgs) -> None:
        self.a = a

    # ------------------------------------------------------------------------------------------------ checks
    def open(self) -> None:
        """Every check and the run's settings, before any weights are loaded."""
        a = self.a
        self._check_source()
        self._check_numbers()
        self._check_data_and_teacher()
        if a.trainable == "feature_maps" and self.scfg.get("rehyat") is None:  # the --model's config, read once
            raise ValueError(f"--trainable feature_maps: --model {a.model} is not converted (no feature maps)")
        if a.components_from is None:
            if a.model is not None:
                a.components_from = self.model  # its configs already read
            elif self.info is not None and self.info.source_model and Path(self.info.source_model).is_dir():
                a.components_from = self.info.source_model
        from ..pipelines.folders import WAN21_DEFAULTS

        pdefaults = self.teacher.generation_defaults if self.teacher is not None else WAN21_DEFAULTS
        self.guidance = float(a.guidance if a.guidance is not None else pdefaults["guidance"])
        self.run = TrainingRun.open(a.out, self._settings(), steps=a.steps, checkpoint_every=a.checkpoint_every,
                                    log_every=a.log_every, resume=a.resume, overwrite=a.overwrite, desc="finetune",
                                    progress=a.progress)

    def _check_source(self) -> None:
        from ..pipelines.folders import ModelFolder

        a = self.a
        if (a.model is None) == (a.config is None):
            raise ValueError("pass exactly one of --model (a model folder to fine-tune) and --config (a fresh model)")
        self.model = ModelFolder(a.model) if a.model is not None else None  # configs read once, here and below
        self.scfg = self.model.transformer_config if a.model is not None else transformer_config(a.config)
        cc = a.chunk_causal
        if cc is not None and (a.config is None or not isinstance(cc, int) or cc < 1):
            raise ValueError(f"--chunk-causal goes with --config and must be an int >= 1 (latent frames per chunk), "
                             f"got {cc!r}{'' if a.config is not None else ' with --model'}")
        if a.model is not None:
            self.model.pipeline_config  # noqa: B018  (a malformed rehyat_pipeline.json fails here, naming the file)

    def _check_numbers(self) -> None:
        a = self.a
        for name, v in (("--steps", a.steps), ("--batch-size", a.batch_size),
                        ("--checkpoint-every", a.checkpoint_every), ("--sampling-steps", a.sampling_steps)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not a.lr > 0:
            raise ValueError(f"--lr must be > 0, got {a.lr}")
        if a.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"--timestep-sampling must be one of {TIMESTEP_SAMPLING}, got {a.timestep_sampling!r}")
        if a.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule must be constant or cosine, got {a.lr_schedule!r}")
        if not 0.0 <= a.text_dropout < 1.0:
            raise ValueError(f"--text-dropout must be in [0, 1), got {a.text_dropout}")
        if a.lora_rank and (not isinstance(a.lora_rank, int) or a.lora_rank < 0):
            raise ValueError(f"--lora-rank must be an int >= 0, got {a.lora_rank!r}")
        if a.trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {TRAINABLE}, got {a.trainable!r}")
        if a.trainable == "feature_maps" and (a.lora_rank or a.model is None):
            raise ValueError("--trainable feature_maps trains a converted --model's feature maps alone: it needs "
                             "--model (not --config) and no --lora-rank")
        if a.data_device not in ("auto", "cpu", "device"):
            raise ValueError(f"--data-device must be auto, cpu or device, got {a.data_device!r}")

    def _check_data_and_teacher(self) -> None:
        """The dataset and the teacher fit the student; the latent shape (the dataset's, or the teacher's
        trajectories')."""
        from ..pipelines.folders import ModelFolder
        from .components import same_architecture
        from .dataset import check_dataset_fits_model, read_dataset_info

        a, scfg = self.a, self.scfg
        self.info = None
        self.teacher = ModelFolder(a.teacher) if a.teacher is not None else None  # configs read once
        if a.data is not None:
            self.info = read_dataset_info(a.data)
            check_dataset_fits_model(self.info, scfg)
        if a.teacher is not None:
            tcfg = self.teacher.transformer_config
            diff = same_architecture(tcfg, scfg)
            if diff:
                detail = ", ".join(f"{k}: teacher {tcfg.get(k)!r} vs student {scfg.get(k)!r}" for k in diff[:4])
                raise ValueError(f"the teacher and the student have different architectures ({detail})")
            if not a.teacher_weight > 0:
                raise ValueError(f"--teacher-weight must be > 0, got {a.teacher_weight}")
        if a.data is None and a.teacher is None:
            raise ValueError("nothing to train on: pass --data DATASET, or --teacher DIR with prompts")
        self.latent_shape = self.info.latent_shape if self.info is not None else None
        if a.data is None:
            if a.prompts is not None:
                read_prompt_file(a.prompts)
            elif a.text_embeddings is None:
                raise ValueError("the teacher-velocity loss without --data needs prompts: --prompts FILE or "
                                 "--text-embeddings")
            self.latent_shape = latent_shape_for(self.teacher, *default_geometry(self.teacher, a.frames, a.height,
                                                                                 a.width))
            if self.latent_shape[0] != scfg["in_channels"]:
                raise ValueError(f"the teacher's latents have {self.latent_shape[0]} channels, the student takes "
                                 f"{scfg['in_channels']}")

    def _settings(self) -> dict:
        a = self.a
        resolved = lambda p: p and str(Path(p).resolve())  # noqa: E731
        return {
            "model": resolved(a.model), "config": self.scfg if a.config is not None else None,
            "data": resolved(a.data), "teacher": resolved(a.teacher),
            "teacher_weight": a.teacher_weight if a.teacher is not None else None,
            "prompts": resolved(a.prompts), "text_embeddings": resolved(a.text_embeddings),
            "latent_shape": list(self.latent_shape), "sampling_steps": a.sampling_steps if a.data is None else None,
            "guidance": self.guidance if a.data is None else None, "steps": a.steps, "batch_size": a.batch_size,
            "micro_batch_size": a.micro_batch_size, "lr": a.lr, "weight_decay": a.weight_decay,
            "warmup_steps": a.warmup_steps, "lr_schedule": a.lr_schedule, "min_lr_ratio": a.min_lr_ratio,
            "max_grad_norm": a.max_grad_norm, "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha,
            "lora_targets": list(a.lora_targets), "timestep_sampling": a.timestep_sampling,
            "flow_shift": a.flow_shift, "text_dropout": a.text_dropout, "seed": a.seed, "init_seed": a.init_seed,
            "chunk_causal": a.chunk_causal, "precision": a.precision,
            "gradient_checkpointing": a.gradient_checkpointing, "compile": a.compile,
            "deterministic": a.deterministic, "checkpoint_every": a.checkpoint_every, "log_every": a.log_every,
            "eval_batches": a.eval_batches,
            # only when set, so that the settings of runs from before the option (their resume check) are unchanged
            **({"trainable": a.trainable} if a.trainable != "all" else {}),
        }

    # ------------------------------------------------------------------------------------------------ models
    def build(self) -> None:
        """Processes, data or prompts, the student (and teacher), the optimizer; then the resumed state, or the
        evaluation before training."""
        a = self.a
        if a.deterministic:
            set_deterministic()
        env = self.env = self.run.attach(init_distributed(a.device))
        self.dev = dev = env.device
        self.local = local_slice(a.batch_size, env)
        self.b_local = self.local.stop - self.local.start
        self.mb = mb = a.micro_batch_size or self.b_local
        if not isinstance(mb, int) or mb < 1 or self.b_local % mb != 0:
            raise ValueError(f"--micro-batch-size {a.micro_batch_size} must divide the per-process batch {self.b_local}")
        autocast_dtype = resolve_dtype(a.precision, dev)
        self.autocast_dtype = None if autocast_dtype == torch.float32 else autocast_dtype
        self._load_data()
        self._build_student()
        self._build_teacher()
        if self.run.checkpoint is not None:
            load_trainable_state(self.student, self.run.checkpoint["model"])
        self._build_optimizer()
        self._resume_or_evaluate()

    def _load_data(self) -> None:
        from .dataset import load_dataset
        from .sampler import GlobalBatchSampler

        a, dev = self.a, self.dev
        self.pool = self.dataset = self.sampler = self.null = None
        if a.data is None:
            self.pool = resolve_prompt_pool(self.teacher, prompts=a.prompts, text_embeddings=a.text_embeddings,
                                            device=dev, text_dim=self.scfg["text_dim"])
            return
        dataset = self.dataset = load_dataset(a.data)
        where = a.data_device
        if where == "auto":
            where = "cpu"
            if dev.type == "cuda" and dataset.in_memory:
                free, _ = torch.cuda.mem_get_info(dev)
                where = "device" if dataset.nbytes < 0.3 * free else "cpu"
        if where == "device":
            dataset.to(dev)
        elif dev.type == "cuda" and dataset.in_memory:
            dataset.latents, dataset.prompt_embeds = dataset.latents.pin_memory(), dataset.prompt_embeds.pin_memory()
        self.sampler = GlobalBatchSampler(len(dataset), a.batch_size, a.seed)
        info = self.info
        null = dataset.null_embeds if dataset.null_embeds is not None else torch.zeros(info.max_sequence_length,
                                                                                       info.text_dim)
        self.null = null.to(dev)

    def _build_student(self) -> None:
        from .components import load_model_folder

        a, dev = self.a, self.dev
        if a.model is not None:
            student = load_model_folder(self.model, device=dev).transformer
        else:
            from diffusers import WanTransformer3DModel

            torch.manual_seed(a.seed if a.init_seed is None else a.init_seed)
            student = WanTransformer3DModel(**{k: v for k, v in self.scfg.items() if k != "rehyat"}).to(dev)
            if a.chunk_causal is not None:
                from ..models import convert_wan

                convert_wan(student, blocks=[], softmax_blocks="chunk_causal", chunk_frames=a.chunk_causal)
        student.train()
        if a.lora_rank:
            add_lora(student, a.lora_rank, a.lora_alpha, a.lora_targets)
        elif a.trainable == "feature_maps":
            train_feature_maps_only(student)
        else:
            student.requires_grad_(True)
        if a.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.params = [p for p in student.parameters() if p.requires_grad]
        if a.compile:
            student.compile()  # in place: parameter names (checkpoints, saving) stay the same
        self.n_trainable = sum(p.numel() for p in self.params)
        self.student = student

    def _build_teacher(self) -> None:
        from .components import load_model_folder

        self.teacher_model = self.traj = None
        if self.a.teacher is None:
            return
        tp = load_model_folder(self.teacher, device=self.dev)
        self.teacher_model, self.scheduler = tp.transformer.eval().requires_grad_(False), tp.scheduler
        if self.autocast_dtype is not None:
            cast_frozen_model(self.teacher_model, self.autocast_dtype)

    def _build_optimizer(self) -> None:
        a, env, dev = self.a, self.env, self.dev
        self.train_model = self.student
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.student, device_ids=[dev] if dev.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=a.weight_decay, fused=dev.type == "cuda")
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(a.lr_schedule, a.warmup_steps, a.steps, a.min_lr_ratio))
        if self.dataset is None:
            self.traj = TeacherTrajectories(self.scheduler, self.pool, self.latent_shape, batch_size=a.batch_size,
                                            sampling_steps=a.sampling_steps, guidance_scale=self.guidance, seed=a.seed,
                                            env=env, dtype=self.autocast_dtype or torch.float32)

    def _resume_or_evaluate(self) -> None:
        ckpt = self.run.checkpoint
        self.eval_before = None
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_sched.load_state_dict(ckpt["lr_scheduler"])
            if self.sampler is not None:
                self.sampler.load_state_dict(ckpt["data"]["sampler"])
            self.run.restore(self.traj)
            self.eval_before = ckpt["extra"].get("eval_before")
        elif self.dataset is not None and self.a.eval_batches > 0:
            self.student.eval()
            self.eval_before = self._evaluate()
            self.student.train()

    def _evaluate(self) -> float:
        a = self.a
        return evaluate_flow_matching(self.student, self.dataset, batch_size=a.batch_size, num_batches=a.eval_batches,
                                      seed=a.seed, sampling=a.timestep_sampling, shift=a.flow_shift, env=self.env,
                                      autocast_dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------------------------ training
    def _autocast(self):
        return torch.autocast(self.dev.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def _checkpoint(self, step: int) -> None:
        env = self.env
        data_state = {"sampler": self.sampler.state_dict() if self.sampler is not None else None,
                      "trajectories": env.gather_objects(self.traj.state_dict()) if self.traj is not None else None}
        self.run.save_checkpoint(step, self.student, optimizer=self.optimizer.state_dict(),
                                 lr_scheduler=self.lr_sched.state_dict(), data=data_state,
                                 extra={"eval_before": self.eval_before})

    def _inputs(self, step: int):
        """``(x_t, timesteps, text embeddings, flow-matching target or None, teacher output or None)`` of a step:
        from the dataset, or from the teacher's trajectories (then the teacher's output is the target)."""
        a, dev = self.a, self.dev
        if self.dataset is None:
            xt, ts, emb = self.traj.inputs()
            with torch.no_grad(), self._autocast():
                traj_out = self.teacher_model(xt, ts, emb, return_dict=False)[0].float()
            return xt, ts, emb, None, traj_out
        idx = self.sampler.next_batch()[self.local]
        x0, emb = self.dataset.batch(idx, device=dev)
        t, noise, drop = _global_draws(step, a.seed, a.batch_size, self.info.latent_shape, dev, self.local,
                                       a.timestep_sampling, a.flow_shift, a.text_dropout)
        if a.text_dropout > 0:
            emb = torch.where(drop.view(-1, 1, 1), self.null.expand_as(emb), emb)
        xt, ts, target = flow_matching_inputs(x0, noise, t)
        return xt, ts, emb, target, None

    def _micro_batch(self, xt, ts, emb, target, traj_out, sl: slice, frac: float) -> tuple:
        """Forward and backward of one micro-batch (its loss weighted by its share ``frac`` of the batch);
        returns its ``(flow-matching loss, teacher loss)`` (detached, weighted by ``frac``)."""
        w = self.a.teacher_weight
        with self._autocast():
            pred = self.train_model(xt[sl], ts[sl], emb[sl], return_dict=False)[0]
        pred = pred.float()
        fm = tv = torch.zeros((), device=self.dev)
        if target is not None:
            fm = F.mse_loss(pred, target[sl])
            loss = fm
            if self.teacher_model is not None:
                with torch.no_grad(), self._autocast():
                    tv_ref = self.teacher_model(xt[sl], ts[sl], emb[sl], return_dict=False)[0].float()
                tv = F.mse_loss(pred, tv_ref)
                loss = loss + w * tv
        else:
            tv = F.mse_loss(pred, traj_out[sl])
            loss = w * tv
        (loss * frac).backward()
        return fm.detach() * frac, tv.detach() * frac

    def _step(self, step: int) -> dict:
        """One optimizer step (micro-batches accumulated); returns device-tensor log values."""
        a = self.a
        xt, ts, emb, target, traj_out = self._inputs(step)
        fm_total = torch.zeros((), device=self.dev)
        tv_total = torch.zeros((), device=self.dev)
        n = xt.shape[0]
        m = self.mb if self.traj is None else self.mb * (n // self.b_local)  # guidance doubles the trajectory batch
        chunks = range(0, n, m)
        for i, c0 in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = nullcontext() if (last or not self.env.distributed) else self.train_model.no_sync()
            with sync:
                fm, tv = self._micro_batch(xt, ts, emb, target, traj_out, slice(c0, c0 + m), (min(c0 + m, n) - c0) / n)
            fm_total += fm
            tv_total += tv
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm) if a.max_grad_norm else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_sched.step()
        if self.traj is not None:
            self.traj.advance(traj_out)
        rec = {"loss": fm_total + (a.teacher_weight * tv_total if self.teacher_model is not None else 0.0)}
        if target is not None:
            rec["fm_loss"] = fm_total
        if self.teacher_model is not None:
            rec["teacher_loss"] = tv_total
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        return rec

    def _record(self, step: int, rec: dict, log) -> None:
        env = self.env
        if env.distributed:  # the global batch's losses (one all-reduce, no host sync)
            keys = [k for k in ("loss", "fm_loss", "teacher_loss") if k in rec]
            vals = env.all_reduce_mean(torch.stack([torch.as_tensor(rec[k], device=self.dev).float() for k in keys]))
            rec.update(zip(keys, vals.unbind()))
        rec["lr"] = self.lr_sched.get_last_lr()[0]
        self.losses.append(rec["loss"])
        log.step(step, rec)
        if self.a.callback is not None:
            self.a.callback(step, float(rec["loss"]))

    def train(self) -> None:
        """The steps, then the flow-matching loss on the fixed batches after them."""
        a, env = self.a, self.env
        self.run.write_config()
        self.samples_per_step = a.batch_size * (2 if (self.traj is not None and self.guidance > 1.0) else 1)
        ds = self.dataset
        intro = (f"finetune: {self.n_trainable:,} trainable parameters "
                 f"({'LoRA r=%d' % a.lora_rank if a.lora_rank else 'full'}), global batch {a.batch_size} on "
                 f"{env.world_size} process(es), {self.dev}, {'bf16 autocast' if self.autocast_dtype else 'fp32'}"
                 + (f", data on {ds.latents.device if ds.in_memory else 'disk'}" if ds is not None else ""))
        self.losses: list[torch.Tensor] = []
        self.train_s = self.run.train(self._step, save=self._checkpoint, record=self._record,
                                      samples_per_step=self.samples_per_step, intro=intro)
        self.eval_after = None
        if self.dataset is not None and a.eval_batches > 0:
            self.student.eval()
            self.eval_after = self._evaluate()

    # ------------------------------------------------------------------------------------------------ outputs
    def finish(self) -> FinetuneResult:
        """The report; the model folder (LoRA merged, float32) and ``finetune_report.json`` (main process)."""
        a, start, train_s = self.a, self.run.start, self.train_s
        loss_values = [float(x) for x in self.losses]
        report = {
            "steps": a.steps, "steps_this_invocation": a.steps - start, "global_batch": a.batch_size,
            "world_size": self.env.world_size, "trainable_parameters": self.n_trainable,
            "mode": f"lora r={a.lora_rank}" if a.lora_rank else "full",
            "final_loss": loss_values[-1] if loss_values else None,
            "flow_matching_eval_before": self.eval_before, "flow_matching_eval_after": self.eval_after,
            "train_seconds_this_invocation": round(train_s, 3),
            "samples_per_s": round(self.samples_per_step * (a.steps - start) / train_s, 3)
            if train_s > 0 and a.steps > start else None,
            "peak_mem_gib": round(peak_memory_gib(self.dev), 4),
            "timestep_sampling": a.timestep_sampling, "flow_shift": a.flow_shift,
        }
        self.run.finish(lambda: self._write_outputs(report))
        return FinetuneResult(out=a.out, losses=loss_values, eval_before=self.eval_before, eval_after=self.eval_after,
                              report=report)

    def _write_outputs(self, report: dict) -> None:
        from .components import save_model_folder

        a, student = self.a, self.student
        student.eval()
        if a.lora_rank:
            merge_lora(student)
        if a.gradient_checkpointing:
            student.disable_gradient_checkpointing()
        student.float().to("cpu")
        pcfg = _pipeline_config_from_data(self.info) if (self.info is not None and a.model is None) else None
        save_model_folder(student, a.out, components_from=a.components_from, pipeline_config=pcfg)
        (a.out / "finetune_report.json").write_text(json.dumps(report, indent=2) + "\n")

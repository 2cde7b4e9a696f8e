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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, load_trainable_state, rng_state, save_checkpoint, set_rng_state, trainable_state
from .common import (
    CHECKPOINT_NAME,
    cast_frozen_model,
    CONFIG_NAME,
    LOG_NAME,
    TRAIN_DIR,
    check_resume_config,
    check_resume_steps,
    clear_run_outputs,
    default_geometry,
    latent_shape_for,
    prepare_run_folder,
    resolve_dtype,
    run_config,
    set_deterministic,
)
from .distributed import DistEnv, init_distributed, local_slice
from .interrupt import GracefulStop
from .progress import peak_memory_gib

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
    models and runs. ``dataset`` is a :class:`~rehyat.training.data.LatentDataset`; the first ``num_batches *
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
        data: dataset folder (:mod:`rehyat.training.data`): flow-matching loss on its latents.
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
    from .components import load_model_folder, read_pipeline_config, read_transformer_config, \
        same_architecture, save_model_folder
    from .data import GlobalBatchSampler, check_dataset_fits_model, load_dataset, read_dataset_info
    from .progress import RunLog, truncate_log
    from .trajectory import TeacherTrajectories, read_prompt_file, resolve_prompt_pool

    # ---------------------------------------------------------------- checks, before any weights are loaded
    out = Path(out)
    if (model is None) == (config is None):
        raise ValueError("pass exactly one of --model (a model folder to fine-tune) and --config (a fresh model)")
    scfg = read_transformer_config(model) if model is not None else transformer_config(config)
    if chunk_causal is not None and (config is None or not isinstance(chunk_causal, int) or chunk_causal < 1):
        raise ValueError(f"--chunk-causal goes with --config and must be an int >= 1 (latent frames per chunk), got "
                         f"{chunk_causal!r}{'' if config is not None else ' with --model'}")
    if model is not None:
        read_pipeline_config(model)  # a malformed rehyat_pipeline.json fails here, naming the file
    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every),
                    ("--sampling-steps", sampling_steps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"--timestep-sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"--lr-schedule must be constant or cosine, got {lr_schedule!r}")
    if not 0.0 <= text_dropout < 1.0:
        raise ValueError(f"--text-dropout must be in [0, 1), got {text_dropout}")
    if lora_rank and (not isinstance(lora_rank, int) or lora_rank < 0):
        raise ValueError(f"--lora-rank must be an int >= 0, got {lora_rank!r}")
    if data_device not in ("auto", "cpu", "device"):
        raise ValueError(f"--data-device must be auto, cpu or device, got {data_device!r}")
    info = None
    if data is not None:
        info = read_dataset_info(data)
        check_dataset_fits_model(info, scfg)
    if teacher is not None:
        tcfg = read_transformer_config(teacher)
        diff = same_architecture(tcfg, scfg)
        if diff:
            detail = ", ".join(f"{k}: teacher {tcfg.get(k)!r} vs student {scfg.get(k)!r}" for k in diff[:4])
            raise ValueError(f"the teacher and the student have different architectures ({detail})")
        if not teacher_weight > 0:
            raise ValueError(f"--teacher-weight must be > 0, got {teacher_weight}")
    if data is None and teacher is None:
        raise ValueError("nothing to train on: pass --data DATASET, or --teacher DIR with prompts")
    latent_shape = info.latent_shape if info is not None else None
    if data is None:
        if prompts is not None:
            read_prompt_file(prompts)
        elif text_embeddings is None:
            raise ValueError("the teacher-velocity loss without --data needs prompts: --prompts FILE or --text-embeddings")
        latent_shape = latent_shape_for(teacher, *default_geometry(teacher, frames, height, width))
        if latent_shape[0] != scfg["in_channels"]:
            raise ValueError(f"the teacher's latents have {latent_shape[0]} channels, the student takes {scfg['in_channels']}")
    if components_from is None:
        if model is not None:
            components_from = model
        elif info is not None and info.source_model and Path(info.source_model).is_dir():
            components_from = info.source_model
    prepare_run_folder(out, overwrite=overwrite, resume=resume)
    pdefaults = read_pipeline_config(teacher).get("defaults", {}) if teacher is not None else {}
    guidance = float(guidance if guidance is not None else pdefaults.get("guidance", 5.0))
    settings = run_config({
        "model": model and str(Path(model).resolve()), "config": scfg if config is not None else None,
        "data": data and str(Path(data).resolve()), "teacher": teacher and str(Path(teacher).resolve()),
        "teacher_weight": teacher_weight if teacher is not None else None,
        "prompts": prompts and str(Path(prompts).resolve()),
        "text_embeddings": text_embeddings and str(Path(text_embeddings).resolve()),
        "latent_shape": list(latent_shape), "sampling_steps": sampling_steps if data is None else None,
        "guidance": guidance if data is None else None, "steps": steps, "batch_size": batch_size,
        "micro_batch_size": micro_batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
        "lr_schedule": lr_schedule, "min_lr_ratio": min_lr_ratio, "max_grad_norm": max_grad_norm,
        "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_targets": list(lora_targets),
        "timestep_sampling": timestep_sampling, "flow_shift": flow_shift, "text_dropout": text_dropout,
        "seed": seed, "init_seed": init_seed, "chunk_causal": chunk_causal, "precision": precision,
        "gradient_checkpointing": gradient_checkpointing, "compile": compile, "deterministic": deterministic,
        "checkpoint_every": checkpoint_every,
        "log_every": log_every, "eval_batches": eval_batches,
    })
    ckpt_path = out / TRAIN_DIR / CHECKPOINT_NAME
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_resume_config(ckpt["config"], settings)
        check_resume_steps(ckpt["step"], steps, ckpt_path)

    # ---------------------------------------------------------------- processes, data, models
    if deterministic:
        set_deterministic()
    env = init_distributed(device)
    dev = env.device
    local = local_slice(batch_size, env)
    b_local = local.stop - local.start
    mb = micro_batch_size or b_local
    if not isinstance(mb, int) or mb < 1 or b_local % mb != 0:
        raise ValueError(f"--micro-batch-size {micro_batch_size} must divide the per-process batch {b_local}")
    autocast_dtype = resolve_dtype(precision, dev)
    autocast_dtype = None if autocast_dtype == torch.float32 else autocast_dtype
    pool = None
    if data is None:
        pool = resolve_prompt_pool(teacher, prompts=prompts, text_embeddings=text_embeddings, device=dev,
                                   text_dim=scfg["text_dim"])
    dataset = None
    if data is not None:
        dataset = load_dataset(data)
        where = data_device
        if where == "auto":
            where = "cpu"
            if dev.type == "cuda" and dataset.in_memory:
                free, _ = torch.cuda.mem_get_info(dev)
                where = "device" if dataset.nbytes < 0.3 * free else "cpu"
        if where == "device":
            dataset.to(dev)
        elif dev.type == "cuda" and dataset.in_memory:
            dataset.latents, dataset.prompt_embeds = dataset.latents.pin_memory(), dataset.prompt_embeds.pin_memory()

    if model is not None:
        student = load_model_folder(model, device=dev).transformer
    else:
        from diffusers import WanTransformer3DModel

        torch.manual_seed(seed if init_seed is None else init_seed)
        student = WanTransformer3DModel(**{k: v for k, v in scfg.items() if k != "rehyat"}).to(dev)
        if chunk_causal is not None:
            from ..models import convert_wan

            convert_wan(student, blocks=[], softmax_blocks="chunk_causal", chunk_frames=chunk_causal)
    student.train()
    if lora_rank:
        add_lora(student, lora_rank, lora_alpha, lora_targets)
    else:
        student.requires_grad_(True)
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
    params = [p for p in student.parameters() if p.requires_grad]
    if compile:
        student.compile()  # in place: parameter names (checkpoints, saving) stay the same
    n_trainable = sum(p.numel() for p in params)
    teacher_model, scheduler = None, None
    if teacher is not None:
        tp = load_model_folder(teacher, device=dev)
        teacher_model, scheduler = tp.transformer.eval().requires_grad_(False), tp.scheduler
        if autocast_dtype is not None:
            cast_frozen_model(teacher_model, autocast_dtype)
    if ckpt is not None:
        load_trainable_state(student, ckpt["model"])
    train_model = student
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(student, device_ids=[dev] if dev.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=dev.type == "cuda")
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(lr_schedule, warmup_steps, steps, min_lr_ratio))
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed) if dataset is not None else None
    traj = None
    if dataset is None:
        traj = TeacherTrajectories(scheduler, pool, latent_shape, batch_size=batch_size, sampling_steps=sampling_steps,
                                   guidance_scale=guidance, seed=seed, env=env,
                                   dtype=autocast_dtype or torch.float32)
    null = None
    if dataset is not None:
        L, D = info.max_sequence_length, info.text_dim
        null = dataset.null_embeds if dataset.null_embeds is not None else torch.zeros(L, D)
        null = null.to(dev)
    start = 0
    eval_before = None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        if sampler is not None:
            sampler.load_state_dict(ckpt["data"]["sampler"])
        if traj is not None:
            trajs = ckpt["data"]["trajectories"]
            if ckpt["world_size"] != env.world_size and trajs[0]["latents"] is not None:
                raise ValueError(f"--resume: the checkpoint was written by {ckpt['world_size']} processes "
                                 f"mid-trajectory; resume with {ckpt['world_size']} processes")
            traj.load_state_dict(trajs[min(env.rank, len(trajs) - 1)])
        if len(ckpt["rng"]) == env.world_size:
            set_rng_state(ckpt["rng"][env.rank])
        start = ckpt["step"]
        eval_before = ckpt["extra"].get("eval_before")
        if env.is_main:
            truncate_log(out / TRAIN_DIR / LOG_NAME, start)
    elif dataset is not None and eval_batches > 0:
        student.eval()
        eval_before = evaluate_flow_matching(student, dataset, batch_size=batch_size, num_batches=eval_batches, seed=seed,
                                             sampling=timestep_sampling, shift=flow_shift, env=env,
                                             autocast_dtype=autocast_dtype)
        student.train()

    def autocast():
        return torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def checkpoint(step: int) -> None:
        data_state = {"sampler": sampler.state_dict() if sampler is not None else None,
                      "trajectories": env.gather_objects(traj.state_dict()) if traj is not None else None}
        rngs = env.gather_objects(rng_state())
        if env.is_main:
            save_checkpoint(ckpt_path, {
                "step": step, "model": trainable_state(student), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(), "rng": rngs, "data": data_state, "world_size": env.world_size,
                "config": settings, "extra": {"eval_before": eval_before},
            })
        env.barrier()

    def train_step(step: int) -> dict:
        """One optimizer step; returns device-tensor log values."""
        fm_total = torch.zeros((), device=dev)
        tv_total = torch.zeros((), device=dev)
        if dataset is not None:
            idx = sampler.next_batch()[local]
            x0, emb = dataset.batch(idx, device=dev)
            t, noise, drop = _global_draws(step, seed, batch_size, info.latent_shape, dev, local, timestep_sampling,
                                           flow_shift, text_dropout)
            if text_dropout > 0:
                emb = torch.where(drop.view(-1, 1, 1), null.expand_as(emb), emb)
            xt, ts, target = flow_matching_inputs(x0, noise, t)
            traj_out = None
        else:
            xt, ts, emb = traj.inputs()
            target = None
            with torch.no_grad(), autocast():
                traj_out = teacher_model(xt, ts, emb, return_dict=False)[0].float()
        n = xt.shape[0]
        m = mb if traj is None else mb * (n // b_local)  # guidance doubles the trajectory batch
        chunks = range(0, n, m)
        for i, c0 in enumerate(chunks):
            sl = slice(c0, c0 + m)
            last = i == len(chunks) - 1
            sync = nullcontext() if (last or not env.distributed) else train_model.no_sync()
            with sync:
                with autocast():
                    pred = train_model(xt[sl], ts[sl], emb[sl], return_dict=False)[0]
                pred = pred.float()
                loss = torch.zeros((), device=dev)
                frac = (min(c0 + m, n) - c0) / n
                if target is not None:
                    fm = F.mse_loss(pred, target[sl])
                    loss = loss + fm
                    fm_total += fm.detach() * frac
                    if teacher_model is not None:
                        with torch.no_grad(), autocast():
                            tv_ref = teacher_model(xt[sl], ts[sl], emb[sl], return_dict=False)[0].float()
                        tv = F.mse_loss(pred, tv_ref)
                        loss = loss + teacher_weight * tv
                        tv_total += tv.detach() * frac
                else:
                    tv = F.mse_loss(pred, traj_out[sl])
                    loss = loss + teacher_weight * tv
                    tv_total += tv.detach() * frac
                (loss * frac).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_sched.step()
        if traj is not None:
            traj.advance(traj_out)
        rec = {"loss": fm_total + (teacher_weight * tv_total if teacher_model is not None else 0.0)}
        if target is not None:
            rec["fm_loss"] = fm_total
        if teacher_model is not None:
            rec["teacher_loss"] = tv_total
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        return rec

    # ---------------------------------------------------------------- training
    # --out is written only now, with everything loaded: a run that fails before leaves it as it was
    if env.is_main and not resume:
        if overwrite and out.is_dir():
            clear_run_outputs(out)
        (out / TRAIN_DIR).mkdir(parents=True, exist_ok=True)
        (out / TRAIN_DIR / CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    env.barrier()
    samples_per_step = batch_size * (2 if (traj is not None and guidance > 1.0) else 1)
    log = RunLog(out / TRAIN_DIR / LOG_NAME, is_main=env.is_main, device=dev, total_steps=steps, start_step=start,
                 samples_per_step=samples_per_step, log_every=log_every, desc="finetune", progress=progress)
    if env.is_main and start == 0:
        log.write(f"finetune: {n_trainable:,} trainable parameters ({'LoRA r=%d' % lora_rank if lora_rank else 'full'}), "
                  f"global batch {batch_size} on {env.world_size} process(es), {dev}, "
                  f"{'bf16 autocast' if autocast_dtype else 'fp32'}"
                  + (f", data on {dataset.latents.device if dataset.in_memory else 'disk'}" if dataset is not None else ""))
    losses: list[torch.Tensor] = []
    stop = GracefulStop(env, save=checkpoint, path=ckpt_path, start=start, steps=steps, resumed=resume, flush=log.flush)
    t0 = time.perf_counter()
    try:
        with stop:
            for step in range(start + 1, steps + 1):
                with stop.step(step):
                    rec = train_step(step)
                if env.distributed:  # the global batch's losses (one all-reduce, no host sync)
                    keys = [k for k in ("loss", "fm_loss", "teacher_loss") if k in rec]
                    vals = env.all_reduce_mean(torch.stack([torch.as_tensor(rec[k], device=dev).float() for k in keys]))
                    rec.update(zip(keys, vals.unbind()))
                rec["lr"] = lr_sched.get_last_lr()[0]
                losses.append(rec["loss"])
                log.step(step, rec)
                if callback is not None:
                    callback(step, float(rec["loss"]))
                if step % checkpoint_every == 0 or step == steps:
                    log.flush()
                    stop.save(step)
                    log.reset_timer()
                stop.check()
    finally:
        log.close()
    train_s = time.perf_counter() - t0
    loss_values = [float(x) for x in losses]

    eval_after = None
    if dataset is not None and eval_batches > 0:
        student.eval()
        eval_after = evaluate_flow_matching(student, dataset, batch_size=batch_size, num_batches=eval_batches, seed=seed,
                                            sampling=timestep_sampling, shift=flow_shift, env=env,
                                            autocast_dtype=autocast_dtype)

    # ---------------------------------------------------------------- outputs
    report = {
        "steps": steps, "steps_this_invocation": steps - start, "global_batch": batch_size,
        "world_size": env.world_size, "trainable_parameters": n_trainable,
        "mode": f"lora r={lora_rank}" if lora_rank else "full",
        "final_loss": loss_values[-1] if loss_values else None,
        "flow_matching_eval_before": eval_before, "flow_matching_eval_after": eval_after,
        "train_seconds_this_invocation": round(train_s, 3),
        "samples_per_s": round(samples_per_step * (steps - start) / train_s, 3) if train_s > 0 and steps > start else None,
        "peak_mem_gib": round(peak_memory_gib(dev), 4),
        "timestep_sampling": timestep_sampling, "flow_shift": flow_shift,
    }
    if env.is_main:
        student.eval()
        if lora_rank:
            merge_lora(student)
        if gradient_checkpointing:
            student.disable_gradient_checkpointing()
        student.float().to("cpu")
        pcfg = _pipeline_config_from_data(info) if (info is not None and model is None) else None
        save_model_folder(student, out, components_from=components_from, pipeline_config=pcfg)
        (out / "finetune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    env.barrier()
    return FinetuneResult(out=out, losses=loss_values, eval_before=eval_before, eval_after=eval_after, report=report)

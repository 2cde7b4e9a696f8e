"""``rehyat finetune``: flow-matching fine-tuning of a converted (or plain) model, or training a fresh one from a
``--config``; optional teacher-velocity loss; see :func:`rehyat.training.finetune`. Runs under ``torchrun``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELP = "flow-matching fine-tuning (full or LoRA, optional teacher-velocity loss) or training from scratch"


def add_parser(sub) -> None:
    from ..training.cli_args import add_geometry_args, add_run_args

    p = sub.add_parser("finetune", help=HELP, description=HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="model folder to fine-tune (converted or plain)")
    src.add_argument("--config", type=Path, help="WanTransformer3DModel config JSON: train a fresh model")
    p.add_argument("--out", type=Path, required=True, help="output: model folder, finetune_report.json and train/")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (rehyat prepare-data)")
    p.add_argument("--components-from", type=Path, default=None,
                   help="model folder whose scheduler/VAE/text encoder the output gets (default: --model, or the "
                        "dataset's source model)")
    g = p.add_argument_group("teacher-velocity loss")
    g.add_argument("--teacher", type=Path, default=None, help="teacher model folder (same architecture)")
    g.add_argument("--teacher-weight", type=float, default=1.0, help="weight of the teacher MSE (default 1.0)")
    g.add_argument("--prompts", "--prompt-file", dest="prompts", type=Path, default=None,
                   help="without --data: prompts for the teacher's sampling trajectories")
    g.add_argument("--text-embeddings", type=Path, default=None, help="caption table instead of a text encoder")
    g.add_argument("--sampling-steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=None)
    add_geometry_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8, help="global batch over all processes (default 8)")
    t.add_argument("--micro-batch-size", type=int, default=None, help="per-process samples per forward (accumulation)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    t.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: final lr / lr")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    t.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA on attention/FFN linears (+ feature maps)")
    t.add_argument("--lora-alpha", type=float, default=None)
    t.add_argument("--trainable", choices=["all", "feature_maps"], default="all",
                   help="all (default) or feature_maps: only a converted model's feature maps and linear scales train; "
                        "the teacher's weights stay, so a block-causal student's first chunk stays its teacher's")
    t.add_argument("--timestep-sampling", choices=["shifted", "uniform"], default="shifted",
                   help="noise levels: shifted (t = s u / (1 + (s-1) u), u uniform; default) or uniform")
    t.add_argument("--flow-shift", type=float, default=3.0)
    t.add_argument("--text-dropout", type=float, default=0.0,
                   help="probability of the null text embedding (for classifier-free guidance)")
    t.add_argument("--init-seed", type=int, default=None, help="--config: weight initialisation seed (default --seed)")
    t.add_argument("--chunk-causal", type=int, default=None, metavar="FRAMES",
                   help="--config: train the fresh model block-causal with chunks of FRAMES latent frames (it streams; "
                        "a ReHyAt student with the same chunk can then match it); default: bidirectional")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first steps)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, so a resumed GPU run repeats an uninterrupted one (slower)")
    t.add_argument("--eval-batches", type=int, default=2, help="fixed batches for the before/after loss (0 skips)")
    t.add_argument("--data-device", choices=["auto", "cpu", "device"], default="auto")
    add_run_args(p, checkpoint_every=500, log_every=10)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..training import TrainingInterrupted, finetune

    try:
        res = finetune(
            args.out, model=args.model, config=args.config, data=args.data, teacher=args.teacher,
            teacher_weight=args.teacher_weight, prompts=args.prompts, text_embeddings=args.text_embeddings,
            frames=args.frames, height=args.height, width=args.width, sampling_steps=args.sampling_steps,
            guidance=args.guidance, components_from=args.components_from, steps=args.steps, batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio,
            max_grad_norm=args.max_grad_norm or None, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            trainable=args.trainable, timestep_sampling=args.timestep_sampling, flow_shift=args.flow_shift, text_dropout=args.text_dropout,
            seed=args.seed, init_seed=args.init_seed, chunk_causal=args.chunk_causal, precision=args.precision,
            gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, deterministic=args.deterministic,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every, eval_batches=args.eval_batches, data_device=args.data_device, device=args.device,
            overwrite=args.overwrite, resume=args.resume, progress=args.progress,
        )
    except TrainingInterrupted as e:  # Ctrl-C: the message says where the checkpoint is and how to resume
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"rehyat finetune: {e}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        r = res.report
        if res.eval_before is not None:
            print(f"flow-matching loss on fixed batches: {res.eval_before:.5f} -> {res.eval_after:.5f}")
        print(f"final loss {r['final_loss']}, {r['samples_per_s']} samples/s, peak memory {r['peak_mem_gib']} GiB")
        print(f"wrote {res.out}")
    return 0

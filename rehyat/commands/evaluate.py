"""``rehyat eval``: teacher vs ReHyAt student on the world's ground truth, PSNR/SSIM and attention error."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "evaluate a teacher and its ReHyAt student (world checks, PSNR/SSIM, attention error)"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: the embedded teacher)")
    p.add_argument("--student", type=Path, default=None, help="ReHyAt folder (default: the embedded student)")
    p.add_argument("--prompt-file", type=Path, default=None,
                   help="world captions, one per line (default: --num-prompts captions sampled from the world)")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--seeds", type=number_list(int), default=[0],
                   help="comma-separated noise seeds, one video per prompt and seed")
    p.add_argument("--lengths", type=number_list(float), default=[1.0, 4.0, 16.0],
                   help="comma-separated multiples of the model's training length (its default frame count)")
    p.add_argument("--teacher-max-frames", type=int, default=None,
                   help="skip teacher videos longer than this (full attention is quadratic)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--out", type=Path, required=True, help="folder for eval.md and eval.json (created)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--text-embeddings", type=Path, default=None,
                   help="caption-embedding table used instead of the models' text encoder")
    p.add_argument("--device", default=None)
    p.set_defaults(run=run)


def number_list(kind):
    """argparse type: a comma-separated list of ``kind`` values, e.g. "1,4,16" (floats > 0, ints >= 0)."""
    import argparse

    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        low_ok = (lambda v: v > 0) if kind is float else (lambda v: v >= 0)
        if not all(low_ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {'positive' if kind is float else 'non-negative'} values, "
                                             f"got {text!r}")
        return values

    return parse


def _defaults(folder: Path) -> dict:
    cfg = folder / "rehyat_pipeline.json"
    return json.loads(cfg.read_text()).get("defaults", {}) if cfg.exists() else {}


def scale_length(frames: int, multiple: float, temporal: int) -> int:
    """``multiple`` x a training length of ``frames`` video frames, kept at ``temporal * k + 1`` frames."""
    latent = (frames - 1) // temporal + 1
    return (round(latent * multiple) - 1) * temporal + 1


def run(args) -> int:
    import torch

    from ..assets import default_model
    from ..evaluation import evaluate_models, results_markdown
    from ..pipelines import ReHyAtVideoPipeline
    from ..world import caption, sample_scene

    teacher_dir = args.teacher or default_model("teacher")
    student_dir = args.student or default_model("student")
    for name, d in (("--teacher", teacher_dir), ("--student", student_dir)):
        if not (Path(d) / "transformer" / "config.json").exists():
            raise ValueError(f"{name} {d} is not a Wan or ReHyAt checkpoint (no transformer/config.json)")
    if args.prompt_file is not None:
        prompts = [ln.strip() for ln in args.prompt_file.read_text().splitlines() if ln.strip()]
        if not prompts:
            raise ValueError(f"--prompt-file {args.prompt_file} holds no prompt")
    else:
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        prompts = [caption(sample_scene(10_000 + i)) for i in range(args.num_prompts)]
    from ..world import parse_caption

    for p in prompts:
        parse_caption(p)  # ValueError for a prompt the world checks cannot score
    seeds, multiples = args.seeds, args.lengths
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {out.parent} does not exist")

    d = _defaults(Path(student_dir))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    load = dict(torch_dtype=dtype, device=device, text_embeddings=args.text_embeddings)
    teacher = ReHyAtVideoPipeline.from_pretrained(teacher_dir, **load)
    student = ReHyAtVideoPipeline.from_pretrained(student_dir, **load)
    base = d.get("frames", 81)
    lengths = [scale_length(base, m, student.temporal_factor) for m in multiples]
    if min(lengths) < 1:
        raise ValueError(f"--lengths {multiples} gives a video shorter than one frame")
    result = evaluate_models(
        teacher, student, prompts, seeds=seeds, lengths=lengths, height=d.get("height", 480),
        width=d.get("width", 832), steps=args.steps or d.get("steps", 50),
        guidance=args.guidance if args.guidance is not None else d.get("guidance", 5.0),
        teacher_max_frames=args.teacher_max_frames, progress=lambda m: print(m, flush=True),
    )
    result.update({"teacher": str(teacher_dir), "student": str(student_dir), "prompts": prompts, "seeds": seeds,
                   "device": device})
    out.mkdir(exist_ok=True)
    md = results_markdown(result)
    (out / "eval.md").write_text(md + "\n")
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(md)
    print(f"wrote {out / 'eval.md'} and {out / 'eval.json'}")
    return 0

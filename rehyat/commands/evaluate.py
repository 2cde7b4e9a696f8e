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
    p.add_argument("--num-prompts", type=int, default=4,
                   help="world captions sampled when --prompts is not given (default 4)")
    p.add_argument("--seeds", type=number_list(int), default=[0],
                   help="comma-separated noise seeds, one video per prompt and seed")
    p.add_argument("--lengths", type=number_list(float), default=[1.0, 4.0, 16.0],
                   help="comma-separated multiples of the model's training length (its default frame count)")
    p.add_argument("--teacher-max-frames", type=int, default=None,
                   help="skip teacher videos longer than this (full attention is quadratic)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the student's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, >= 0 (default: the student's)")
    p.add_argument("--out", type=Path, required=True, help="folder for eval.md and eval.json (created)")
    p.add_argument("--overwrite", action="store_true", help="write eval.md and eval.json into a non-empty --out, "
                   "replacing an earlier evaluation's (other files are left alone)")
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


def scale_length(frames: int, multiple: float, temporal: int) -> int:
    """``multiple`` x a training length of ``frames`` video frames, kept at ``temporal * k + 1`` frames."""
    latent = (frames - 1) // temporal + 1
    return (round(latent * multiple) - 1) * temporal + 1


def check_pair(teacher_dir, student_dir, multiples, text_embeddings=None,
               lengths_arg: str = "--lengths") -> tuple[dict, list[int]]:
    """Check a teacher and its student from their configs alone, before any weights load.

    Both are compared at the student's default size (``rehyat_pipeline.json``, else Wan2.1's 81 x 480 x 832) and
    at ``multiples`` x its frame count. Returns ``(settings, lengths)``: the student's defaults with Wan2.1's
    fallbacks, and the frame counts. Raises ``ValueError`` naming ``--teacher`` / ``--student`` for a folder that
    is not a checkpoint, has no text encoder, cannot decode video, has other default sizes than the other model, or
    cannot make the student's videos (or makes other latents); naming ``lengths_arg`` for a video under one frame.
    """
    from ..pipelines.folders import WAN21_DEFAULTS, ModelFolder
    from .generate import check_text_source, check_video_output

    folders = {"--teacher": ModelFolder.of(teacher_dir), "--student": ModelFolder.of(student_dir)}
    for name, d in folders.items():
        if not (d.path / "transformer" / "config.json").exists():
            raise ValueError(f"{name} {d} is not a Wan or ReHyAt checkpoint (no transformer/config.json)")
        check_text_source(d, text_embeddings, arg=name)
    dt, ds = (f.pipeline_config.get("defaults", {}) for f in folders.values())
    differ = [f"{k} {dt[k]} vs {ds[k]}" for k in ("frames", "height", "width")
              if k in dt and k in ds and dt[k] != ds[k]]
    if differ:
        raise ValueError(f"--teacher {teacher_dir} and --student {student_dir} have different default sizes "
                         f"({', '.join(differ)}): pass the student's own teacher")
    d = {**WAN21_DEFAULTS, **ds}
    lengths = [scale_length(d["frames"], m, folders["--student"].vae_factors[0]) for m in multiples]
    short = [f"{m:g}" for m, n in zip(multiples, lengths) if n < 1]
    if short:
        raise ValueError(f"{lengths_arg} {','.join(short)} gives a video shorter than one frame")
    for n in lengths:
        shapes = {}
        for name, folder in folders.items():
            try:
                shapes[name] = folder.latent_shape(n, d["height"], d["width"])
            except ValueError as e:
                raise ValueError(f"{name} {folder} cannot make the student's {n} frames of {d['height']}x{d['width']}: "
                                 f"{e}; pass a teacher and student of the same geometry") from None
        if shapes["--teacher"] != shapes["--student"]:
            raise ValueError(f"--teacher {teacher_dir} and --student {student_dir} have different latents for "
                             f"{n} frames of {d['height']}x{d['width']} ({shapes['--teacher']} vs "
                             f"{shapes['--student']}): pass the student's own teacher")
    for name, folder in folders.items():
        check_video_output(folder, shapes[name][1], arg=name)
    return d, lengths


def run(args) -> int:
    """Raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` naming the argument, before any model
    loads: bad ``--steps`` / ``--guidance`` / prompts, models that do not pair (:func:`check_pair`), ``--out`` a
    file, or a non-empty ``--out`` without ``--overwrite``."""
    import torch

    from ..assets import default_model
    from ..evaluation import evaluate_models, results_markdown
    from ..pipelines import ReHyAtVideoPipeline
    from ..pipelines.folders import ModelFolder
    from ..world import caption, sample_scene
    from ._checks import check_guidance, check_output_folder, check_steps

    check_steps(args.steps)
    check_guidance(args.guidance)
    teacher_dir = ModelFolder(args.teacher or default_model("teacher"))  # configs read once, for checks and loading
    student_dir = ModelFolder(args.student or default_model("student"))
    d, lengths = check_pair(teacher_dir, student_dir, args.lengths, args.text_embeddings)
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
    seeds = args.seeds
    out = Path(args.out)
    check_output_folder(out, overwrite=args.overwrite, command="eval")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite or choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {out.parent} does not exist")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # eager (compile="off"): seconds_per_video compares teacher and student, and a compiling first video would not
    load = dict(torch_dtype=dtype, device=device, text_embeddings=args.text_embeddings, compile="off")
    teacher = ReHyAtVideoPipeline.from_pretrained(teacher_dir, **load)
    student = ReHyAtVideoPipeline.from_pretrained(student_dir, **load)
    result = evaluate_models(
        teacher, student, prompts, seeds=seeds, lengths=lengths, height=d["height"], width=d["width"],
        steps=args.steps if args.steps is not None else d["steps"],
        guidance=args.guidance if args.guidance is not None else d["guidance"],
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

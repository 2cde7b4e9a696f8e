"""``rehyat demo``: the README's main job on the embedded models, in a few minutes on a laptop CPU.

Writes into ``--out``:

* ``rehyat_<N>x.mp4``: a video ``--length`` times the training length from the ReHyAt student, in streaming mode
  (each chunk fully denoised and written before the next; memory constant in the length);
* ``side_by_side.mp4``: teacher (left) and ReHyAt student (right), labelled, at the training length, same prompt
  and noise;
* ``time_memory.png``: time and peak memory of one denoising step against video length, teacher vs ReHyAt;
* ``report.md`` / ``report.json``: the evaluation table (world ground-truth checks, PSNR/SSIM vs teacher,
  per-block attention error) and the time/memory table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .evaluate import number_list

if TYPE_CHECKING:
    from ..pipelines.folders import ModelFolder

#: What the report says of the embedded models (only when both are the embedded ones); numbers in
#: docs/results/embedded_models/TRAINING.md.
EMBEDDED_NOTE = (
    "The embedded models (docs/results/embedded_models/TRAINING.md in the repository): a block-causal teacher trained "
    "on the world's 16-frame clips (world checks at 16 frames, 48 prompts x 2 seeds: colour 1.00, shape 0.99, "
    "direction 1.00, persistence 0.99) and its student, blocks 1, 3, 4 ReHyAt and blocks 0, 2, 5 chunk-causal "
    "softmax with a 12-frame window, so every block streams in constant memory. Against its teacher at 16 frames "
    "the student is within 0.006 on every check and 30.1 dB PSNR from it (same prompts and noise); streamed at 128 "
    "frames, with its linear branch held to 9 frames' mass (linear_norm_frames 9), it keeps 100% / 97% / 100% / 98% "
    "of its colour / shape / direction / persistence scores (48 videos, CPU), where the teacher keeps 91% / 83% / "
    "100% / 77%. One video is not those averages: the long video here may still split or fray the object in places.")
SWEEP_REPEATS = 3  # timed steps per point of the time/memory plot (their median): one sample misleads on a busy CPU
HELP = "run the main job on the embedded models: long streamed video, side-by-side, evaluation report and plot"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=HELP, description=HELP)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: the embedded teacher)")
    p.add_argument("--student", type=Path, default=None, help="ReHyAt folder (default: the embedded student)")
    p.add_argument("--prompts", nargs="+", default=["a red circle moving right on a grey background",
                                                     "a yellow square moving up on a blue background"],
                   help="world captions; the first one is used for the videos")
    p.add_argument("--length", type=int, default=8,
                   help="long video = this many times the training length (default 8: 128 frames with the embedded "
                        "models, trained on 16-frame clips)")
    p.add_argument("--sweep", type=number_list(float), default=[1.0, 2.0, 4.0, 8.0],
                   help="video lengths for the time/memory plot, x training length")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --out: the files a demo writes (rehyat_<N>x.mp4, "
                        "side_by_side.mp4, time_memory.png, report.md, report.json) are deleted first; other files "
                        "are left alone")
    p.set_defaults(run=run)

# every file a demo writes into --out (what --overwrite deletes)
OUTPUTS = r"rehyat_\d+x\.mp4|side_by_side\.mp4|time_memory\.png|report\.md|report\.json"


def side_by_side(teacher, student, labels=("teacher", "student")):
    """``[F, H, W, 3]`` uint8 videos side by side, 2 white pixels apart, each under a white band with its label
    (black, PIL's default bitmap font). Returns ``[F, 12 + H, 2 W + 2, 3]`` uint8 (height and width kept even)."""
    import numpy as np
    from PIL import Image, ImageDraw

    f, h, w, _ = teacher.shape
    band = Image.new("RGB", (2 * w + 2, 12), "white")
    draw = ImageDraw.Draw(band)
    for i, label in enumerate(labels):
        draw.text((i * (w + 2) + 1, 0), label, fill="black")
    gap = np.full((f, h, 2, 3), 255, dtype=np.uint8)
    body = np.concatenate([teacher, gap, student], axis=2)
    return np.concatenate([np.broadcast_to(np.asarray(band), (f, *np.asarray(band).shape)), body], axis=1)


def run(args) -> int:
    """Raises ``ValueError`` / ``FileExistsError`` naming the argument before anything is loaded or written: bad
    ``--steps`` / ``--length`` / prompts, models that do not pair (:func:`~rehyat.commands.evaluate.check_pair`),
    ``--out`` a file, or a file of the demo already there without ``--overwrite``."""
    import torch

    from ..evaluation import block_diagnostics
    from ..pipelines import ReHyAtVideoPipeline

    t_start = time.perf_counter()
    plan = _check_args(args)
    torch.manual_seed(0)
    print(f"loading {plan.teacher_dir} and {plan.student_dir}", flush=True)
    teacher = ReHyAtVideoPipeline.from_pretrained(plan.teacher_dir)
    student = ReHyAtVideoPipeline.from_pretrained(plan.student_dir)
    d = plan.geometry
    steps = args.steps if args.steps is not None else d["steps"]
    gen = dict(height=d["height"], width=d["width"], num_inference_steps=steps, guidance_scale=d["guidance"],
               progress=True)
    plan.out.mkdir(parents=True, exist_ok=True)
    for path in plan.stale:  # an earlier demo's files (--overwrite), so none is left beside the new ones
        path.unlink()

    long_row = _long_video(args, student, d["frames"], plan.names["long"], gen)
    rows = [*_pair_rows(args, teacher, student, d["frames"], plan.names["side"], gen), long_row]
    print("[3/4] per-block attention error and attention mass", flush=True)
    att = block_diagnostics(student, student.encode_prompt([args.prompts[0]]), d["frames"], d["height"], d["width"])
    result = {"rows": rows, "attention": {str(b): a for b, a in att.items()}}
    sweep_rows = _sweep(args, plan, student.temporal_factor)

    md = _report_markdown(args, plan, steps, long_row["frames"], result, sweep_rows, time.perf_counter() - t_start)
    plan.names["md"].write_text("\n".join(md) + "\n")
    plan.names["json"].write_text(json.dumps({"evaluation": result, "sweep": sweep_rows}, indent=2) + "\n")
    print("\n".join(md))
    print(f"\nwrote {', '.join(str(p) for p in plan.names.values())}")
    return 0


@dataclass
class _Plan:
    """What :func:`_check_args` found: the model folders, whether both are the embedded ones, their shared
    geometry (:func:`~rehyat.commands.evaluate.check_pair`'s dict: frames, height, width, steps, guidance), the
    output folder, an earlier demo's files to delete (``--overwrite``) and the paths to write (:data:`OUTPUTS`)."""

    teacher_dir: ModelFolder
    student_dir: ModelFolder
    embedded: bool
    geometry: dict
    out: Path
    stale: list
    names: dict[str, Path]


def _check_args(args) -> _Plan:
    """Every check of ``rehyat demo``'s arguments and output folder, before anything is loaded or written."""
    from ..assets import default_model
    from ..io import check_output_file
    from ..world import parse_caption
    from ..pipelines.folders import ModelFolder
    from ._checks import check_output_folder, check_steps
    from .evaluate import check_pair

    check_steps(args.steps)
    teacher_dir = ModelFolder(args.teacher or default_model("teacher"))  # configs read once, for checks and loading
    student_dir = ModelFolder(args.student or default_model("student"))
    embedded = all(Path(d).resolve() == Path(default_model(n)).resolve()
                   for d, n in ((teacher_dir, "teacher"), (student_dir, "student")))
    for p in args.prompts:
        parse_caption(p)
    if args.length < 1:
        raise ValueError(f"--length must be >= 1, got {args.length}")
    d, _ = check_pair(teacher_dir, student_dir, [1, args.length, *args.sweep], lengths_arg="--sweep")
    out = Path(args.out)
    stale = check_output_folder(out, overwrite=args.overwrite, command="demo", outputs=OUTPUTS,
                                keep_others=True)
    names = {"long": out / f"rehyat_{args.length}x.mp4", "side": out / "side_by_side.mp4",
             "plot": out / "time_memory.png", "md": out / "report.md", "json": out / "report.json"}
    if out.is_dir() and not args.overwrite:
        for path in names.values():
            check_output_file(path, overwrite=False)
    return _Plan(teacher_dir, student_dir, embedded, d, out, stale, names)


def _long_video(args, student, frames: int, path: Path, gen: dict) -> dict:
    """Step 1: a video ``--length`` times the training length ``frames`` from the student, streamed to ``path``
    chunk by chunk (the file is aborted on any error); returns its report row."""
    from ..io import VideoWriter
    from ..world import check_video
    from .evaluate import scale_length

    prompt = args.prompts[0]
    long_frames = scale_length(frames, args.length, student.temporal_factor)
    print(f"[1/4] ReHyAt, streaming {long_frames} frames ({args.length}x the training length): {prompt!r}", flush=True)
    writer = VideoWriter(path, fps=student.fps)
    try:
        res = student(prompt, num_frames=long_frames, seed=args.seed, mode="streaming",
                      on_frames=writer.append, keep_video=True, **gen)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return {"model": "rehyat", "frames": long_frames, "mode": "streaming", "videos": 1,
            "seconds_per_video": res.seconds, **_checks(check_video(res.video, prompt))}


def _pair_rows(args, teacher, student, frames: int, side_path: Path, gen: dict) -> list[dict]:
    """Step 2: teacher (parallel) and student (streaming) on every prompt at the training length ``frames``, same
    noise; the first prompt's pair is written side by side to ``side_path``. Returns the teacher's and the
    student's report rows (the student's with PSNR/SSIM against the teacher)."""
    from ..evaluation.metrics import video_similarity
    from ..io import write_video
    from ..world import check_video, summarise

    print(f"[2/4] teacher vs ReHyAt at the training length ({frames} frames), {len(args.prompts)} prompts", flush=True)
    pair_rows = {"teacher": [], "rehyat": []}
    sims = []
    for i, p in enumerate(args.prompts):
        runs = {}
        for name, pipe, mode in (("teacher", teacher, "parallel"), ("rehyat", student, "streaming")):
            r = pipe(p, num_frames=frames, seed=args.seed, mode=mode, **gen)
            runs[name] = r.video
            pair_rows[name].append((r.seconds, check_video(r.video, p)))
        sims.append(video_similarity(runs["rehyat"], runs["teacher"]))
        if i == 0:
            write_video(side_path, side_by_side(runs["teacher"], runs["rehyat"]), fps=student.fps)
    rows = []
    for name, mode in (("teacher", "parallel"), ("rehyat", "streaming")):
        rs = pair_rows[name]
        row = {"model": name, "frames": frames, "mode": mode, "videos": len(rs),
               "seconds_per_video": sum(r[0] for r in rs) / len(rs), **_checks(summarise([r[1] for r in rs]))}
        if name == "rehyat":
            row["psnr_vs_teacher"] = sum(s["psnr"] for s in sims) / len(sims)
            row["ssim_vs_teacher"] = sum(s["ssim"] for s in sims) / len(sims)
        rows.append(row)
    return rows


def _sweep(args, plan: _Plan, temporal_factor: int) -> list[dict]:
    """Step 4: one denoising step's time and peak memory against length (``--sweep`` x the training length),
    teacher vs ReHyAt, each point in a fresh process; plots them to ``plan.names["plot"]`` and returns the rows."""
    import torch

    from ..evaluation import plot_sweep, time_memory_sweep_isolated
    from .evaluate import scale_length

    d = plan.geometry
    lengths = [scale_length(d["frames"], m, temporal_factor) for m in args.sweep]
    print(f"[4/4] one denoising step at {lengths} frames, teacher vs ReHyAt", flush=True)
    sweep_rows = time_memory_sweep_isolated(
        {"teacher (softmax)": (plan.teacher_dir, "parallel"), "ReHyAt (recurrent)": (plan.student_dir, "recurrent")},
        lengths, d["height"], d["width"], threads=torch.get_num_threads(), repeats=SWEEP_REPEATS,
        progress=lambda m: print("   ", m, flush=True))
    plot_sweep(sweep_rows, plan.names["plot"], title="one denoising step with CFG, CPU (one fresh process per point)")
    return sweep_rows


def _report_markdown(args, plan: _Plan, steps: int, long_frames: int, result: dict, sweep_rows: list,
                     seconds: float) -> list[str]:
    """The lines of report.md: setup, the files, the evaluation table, the time/memory table and plot."""
    import torch

    from ..evaluation import results_markdown, sweep_markdown

    d, names = plan.geometry, plan.names
    return [
        "# rehyat demo", "",
        f"Models: teacher `{plan.teacher_dir}`, ReHyAt student `{plan.student_dir}`. Device: CPU, "
        f"{torch.get_num_threads()} threads. {steps} steps, guidance {d['guidance']}, seed {args.seed}. "
        f"Training length: {d['frames']} frames of {d['height']}x{d['width']}.", "",
        f"- `{names['long'].name}`: {long_frames} frames streamed by ReHyAt ({args.length}x the training length), "
        f"prompt: *{args.prompts[0]}*",
        f"- `{names['side'].name}`: teacher (left) and ReHyAt student (right), labelled, {d['frames']} frames, same "
        "prompt and noise", "",
        "## Evaluation (the world's ground truth; 1.0 is perfect, flicker: lower is better)", "",
        results_markdown(result), "",
        *([EMBEDDED_NOTE, ""] if plan.embedded else []),
        "## Time and peak memory of one denoising step against video length", "",
        "Each point runs in a fresh process (loaded model, warmed up on the shortest length) and is the median of "
        f"{SWEEP_REPEATS} timed steps; peak memory is the growth of the resident set during a step (median too).", "",
        sweep_markdown(sweep_rows), "", f"![time and memory]({names['plot'].name})", "",
        f"Total demo time: {seconds:.0f} s.",
    ]


def _checks(summary: dict) -> dict:
    keys = ("colour_present", "shape_correct", "direction_correct", "persistence", "background_correct", "flicker")
    return {k: summary[k] for k in keys if k in summary}

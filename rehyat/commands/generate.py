"""``rehyat generate``: text-to-video with a Wan or ReHyAt model folder (default: the embedded ReHyAt model)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..io import first_line
from ._checks import USER_ERRORS
from ._video_names import vbench_name  # noqa: F401  (the file names of --prompt-file; kept importable here)

HELP = "generate a video from a text prompt (parallel, recurrent or streaming)"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless X is None or the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP, formatter_class=_DefaultsFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded ReHyAt model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompt-file", type=Path,
                     help="one prompt per line; writes '<prompt>-<i>.mp4' per prompt and seed into --out (a folder), "
                          "the file names VBench's standard mode reads ('/' becomes a space; a prompt too long for a "
                          "255-byte file name gets '<prompt cut>~<hash>-<i>.mp4'), and prompts.jsonl, each file's "
                          "full prompt and seed. A failing video does not stop the others: a summary at the end")
    src.add_argument("--prompt-schedule", type=Path,
                     help="prompt switching while streaming: one '<start frame> <prompt>' per line (blank and '#' "
                          "lines skipped), the first at frame 0, start frames increasing and below --frames. Each "
                          "prompt conditions the chunks from the one holding its start frame (a start frame inside "
                          "a chunk takes effect from the chunk's first frame; one prompt per chunk); the states "
                          "carry over. Recurrent and streaming modes only")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init-video", type=Path, default=None,
                      help="continue this video (streaming mode): its frames are encoded with the model's VAE, kept "
                           "as they are (the output starts with their VAE round trip) and the model streams on from "
                           "them to --frames. It must fill whole chunks (the error names the frame counts that do: "
                           "4, 8, 12, ... for the embedded model) and be 4k+1 frames for Wan's VAE; --height / "
                           "--width default to its size. Continuing the model's own first frames with the same "
                           "--seed and prompt gives the one-run video (up to the codec's and the VAE's error)")
    init.add_argument("--init-latents", type=Path, default=None,
                      help="as --init-video, from latents saved by --save-latents (a [1, C, F, h, w] tensor): "
                           "continuing a run's own latents with the same --seed and prompt gives that run's video "
                           "extended, frame for frame")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for guidance (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="video frames (4k+1 for Wan's VAE; default: the model's)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of VAE stride x patch size: 16 for Wan2.1, 32 for Wan2.2-TI2V-5B, 4 for "
                        "the embedded model (default: the model's)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of VAE stride x patch size: 16 for Wan2.1, 32 for Wan2.2-TI2V-5B, 4 for "
                        "the embedded model (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 50 for Wan)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos-per-prompt", type=int, default=1, help="with --prompt-file: seeds seed .. seed+n-1")
    p.add_argument("--mode", choices=["auto", "parallel", "recurrent", "streaming"], default="auto",
                   help="auto: streaming for a chunk-causal ReHyAt model, parallel otherwise (a plain Wan teacher)")
    p.add_argument("--compile", choices=["auto", "on", "off"], nargs="?", const="on", default="auto",
                   help="torch.compile every transformer block (the first video compiles): auto (default) on a "
                        "CUDA device only, where it pays, not on the CPU; a bare --compile is on. Parallel mode: on "
                        "an H200 a converted Wan2.1-1.3B forward at 81 frames took 301 ms compiled, 599 ms eager "
                        "(first forward 17-19 s with compilation). Recurrent/streaming: each block around the "
                        "attention step, and the step on its own (an H200 forward chunk by chunk: 1.39x of the "
                        "compiled teacher, against 1.01x with the step eager)")
    p.add_argument("--linear-norm-frames", default=None, metavar="FRAMES|off",
                   help="override the model's length normalisation of its linear branch for this run: a converted "
                        "block's linear sums over more than FRAMES *latent* frames are scaled down to FRAMES frames' "
                        "mass (docs/design.md section 3); 'off' for plain sums (default: the model folder's setting). "
                        "Leaves videos up to the training length unchanged with FRAMES = the training clip's latent "
                        "frames - chunk_frames - overlap_frames (e.g. 17 for 81-frame Wan2.1 clips at chunk 3, "
                        "overlap 1; the embedded student ships with 9)")
    p.add_argument("--out", type=Path, required=True,
                   help="output .mp4 (a folder with --prompt-file, created if missing)")
    p.add_argument("--save-latents", type=Path, default=None,
                   help="also save the final latents (torch .pt), written before the video is decoded: a failed "
                        "decode keeps them")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--text-embeddings", type=Path, default=None,
                   help="caption-embedding table used instead of the model's text encoder")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="transformer dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.set_defaults(run=run)


def check_device(device: str | None) -> str:
    """``--device`` as a torch device string (default: cuda if available, else cpu); ValueError if unusable."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build or machine has no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def check_text_source(model, text_embeddings, arg: str = "--model") -> None:
    """``ValueError`` when prompts cannot be encoded: ``model`` has no text encoder (``tokenizer/`` +
    ``text_encoder/``, or ``"text_encoder": "minilm"`` in ``rehyat_pipeline.json``) and no ``--text-embeddings``
    table is given."""
    from ..pipelines.folders import ModelFolder

    if text_embeddings is not None:
        return
    if not ModelFolder.of(model).has_text_encoder:  # as ReHyAtVideoPipeline.from_pretrained
        raise ValueError(f"{arg} {model} has no text encoder (no tokenizer/ and text_encoder/): pass "
                         "--text-embeddings FILE, a caption-embedding table holding your prompts")


def check_video_output(model, channels: int, arg: str = "--model") -> None:
    """``ValueError`` when a model folder's output cannot be written as a video: no ``vae/`` to decode its latents
    and a transformer whose channels are not pixels (1 or 3)."""
    if channels not in (1, 3) and not (Path(model) / "vae").is_dir():
        raise ValueError(f"{arg} {model} has no vae/ and its transformer makes {channels}-channel latents, not "
                         "pixels: writing a video needs the VAE (add the model's vae/ folder)")


def _prompt_file_jobs(args) -> list[tuple[str, int, Path]]:
    """``(prompt, seed, path)`` of every video of ``--prompt-file``, named by :mod:`._video_names` and checked before
    any work: ValueError / FileExistsError for no prompt, a prompt on two lines, ``--out`` a file, a foreign
    ``prompts.jsonl`` in ``--out``, or an existing video without ``--overwrite``."""
    from ..io import check_output_file
    from ._video_names import plan_names, read_index

    try:
        text = args.prompt_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({e})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text, 1) if line.strip()]
    if not lines:
        raise ValueError(f"--prompt-file {args.prompt_file} holds no prompt")
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} is a file, expected a folder with --prompt-file")
    names = plan_names(lines, args.videos_per_prompt, arg=f"--prompt-file {args.prompt_file}")
    if args.out.is_dir():  # else run() creates it
        read_index(args.out)
    jobs = []
    for _, prompt in lines:
        for i, name in enumerate(names[prompt]):
            if args.out.is_dir():
                check_output_file(args.out / name, overwrite=args.overwrite)
            jobs.append((prompt, args.seed + i, args.out / name))
    return jobs


def _resolve(args):
    """Check every argument that can be checked without the model's weights; return (folder, jobs, device, settings),
    the folder a :class:`~rehyat.pipelines.folders.ModelFolder` whose configs are read once, here.

    Raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``IsADirectoryError`` naming the argument:
    bad settings, existing outputs without ``--overwrite``, ``--out`` a file with ``--prompt-file``, a video past a
    plain Wan transformer's RoPE table, a model folder without a text encoder (and no ``--text-embeddings``) or
    without the VAE its latents need for a video.
    """
    from ..pipelines.folders import ModelFolder

    model = _check_model_and_counts(args)
    jobs, labels = _jobs(args)
    if not (Path(model) / "transformer" / "config.json").exists():
        raise ValueError(f"--model {model} is not a Wan or ReHyAt checkpoint: no transformer/config.json inside it")
    model = ModelFolder(model)
    geometry = _geometry(args, model)
    _check_mode(args, model)
    args.linear_norm_frames = _linear_norm_frames(args, model)
    shape = _latent_shape(args, model, geometry)
    if args.prompt_schedule is not None:
        _plan_schedule(args, model, jobs[0][0], labels, geometry["frames"])
    if geometry["init"] is not None:
        _check_init(args, model, geometry["init"], shape, geometry)
    model.check_rope_table(shape)
    check_video_output(model, shape[1])
    check_text_source(model, args.text_embeddings)
    device = check_device(args.device)
    return model, jobs, device, geometry


def _check_model_and_counts(args):
    """The model folder (``--model``, default the embedded student), after checking it is a folder, ``--steps``,
    ``--guidance`` and ``--videos-per-prompt``."""
    from ..assets import default_model
    from ._checks import check_guidance, check_steps

    model = args.model if args.model is not None else default_model("student")
    if not Path(model).is_dir():
        raise FileNotFoundError(f"--model: folder {model} does not exist")
    check_steps(args.steps)
    check_guidance(args.guidance)
    if args.videos_per_prompt < 1:
        raise ValueError(f"--videos-per-prompt must be >= 1, got {args.videos_per_prompt}")
    return model


def _jobs(args) -> tuple[list[tuple], list[str] | None]:
    """``(jobs, labels)``: the videos to make, ``(prompt or prompt schedule, seed, out path)`` each, after checking
    ``--prompt`` / ``--prompt-schedule`` / ``--prompt-file`` with ``--out``, ``--videos-per-prompt``, ``--init-*``
    and ``--save-latents``; ``labels`` are the ``--prompt-schedule`` lines (else None)."""
    from ..io import check_output_file
    from ..pipelines.schedule import read_prompt_schedule

    jobs = []  # (prompt or prompt schedule, seed, out path)
    labels = None  # of the --prompt-schedule lines
    if args.prompt_file is None:
        single = "--prompt" if args.prompt is not None else "--prompt-schedule"
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("--prompt must not be empty")
        if args.videos_per_prompt != 1:
            raise ValueError(f"--videos-per-prompt goes with --prompt-file (one video per prompt and seed); with "
                             f"{single}, run once per --seed")
        if args.out.suffix.lower() != ".mp4":
            raise ValueError(f"--out must be an .mp4 file, got {args.out}")
        prompt = args.prompt
        if args.prompt_schedule is not None:
            prompt, labels = read_prompt_schedule(args.prompt_schedule)
        jobs.append((prompt, args.seed, check_output_file(args.out, overwrite=args.overwrite)))
    else:
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file {args.prompt_file} does not exist")
        jobs = _prompt_file_jobs(args)
    if args.prompt_file is not None and (args.init_video or args.init_latents):
        raise ValueError(f"{'--init-video' if args.init_video else '--init-latents'} continues one video: use it with "
                         "--prompt or --prompt-schedule, not --prompt-file")
    if args.save_latents is not None:
        if len(jobs) != 1:
            raise ValueError("--save-latents works with a single --prompt")
        check_output_file(args.save_latents, overwrite=args.overwrite, arg="--save-latents")
        if Path(args.save_latents).resolve() == Path(jobs[0][2]).resolve():
            raise ValueError(f"--save-latents must differ from --out (both are {args.out}): the latents would "
                             "replace the video")
    return jobs, labels


def _geometry(args, model) -> dict:
    """``frames``, ``height``, ``width``, ``steps``, ``guidance`` (the argument, else the folder's default, else
    Wan's 81 x 480 x 832, 50 steps, 5.0; height and width default to an ``--init-*``'s size) and ``init``
    (:func:`_read_init`); the steps and guidance checked."""
    from ._checks import check_guidance, check_steps

    init = _read_init(args)
    defaults = model.generation_defaults
    if init is not None:  # --height / --width default to the given video's size
        spatial = 1 if args.init_video is not None else model.vae_factors[1]
        size = init.shape[1:3] if args.init_video is not None else init.shape[3:]
        defaults = defaults | dict(height=int(size[0]) * spatial, width=int(size[1]) * spatial)
    pick = lambda value, key: value if value is not None else defaults[key]  # noqa: E731
    geometry = dict(frames=pick(args.frames, "frames"), height=pick(args.height, "height"),
                    width=pick(args.width, "width"), steps=pick(args.steps, "steps"),
                    guidance=pick(args.guidance, "guidance"), init=init)
    check_steps(geometry["steps"])
    check_guidance(geometry["guidance"])
    return geometry


def _check_mode(args, model) -> None:
    """ValueError when ``--mode`` is recurrent or streaming and the model is plain Wan or cannot run chunk by chunk."""
    if args.mode in ("recurrent", "streaming"):
        from ._notes import folder_recurrence_problem

        if model.rehyat is None:
            raise ValueError(f"--mode {args.mode} needs a converted ReHyAt model; {model} is a plain Wan transformer "
                             "(not causal): use --mode parallel or auto, or convert it first")
        problem = folder_recurrence_problem(model)
        if problem is not None:
            raise ValueError(f"--mode {args.mode}: this ReHyAt model generates in parallel mode only: {problem}")


def _linear_norm_frames(args, model):
    """``--linear-norm-frames`` as the value to set (an int >= 1, ``None`` for off, or ``"keep"`` when not given);
    ValueError naming the flag for another value, or for a model with no causal converted block."""
    from ..ops._checks import check_linear_norm_frames

    given = args.linear_norm_frames
    if given is None:
        return "keep"
    try:
        value = None if given.strip().lower() == "off" else int(given)
        check_linear_norm_frames(value)
    except ValueError:
        raise ValueError(f"--linear-norm-frames must be an int >= 1 or 'off', got {given!r}") from None
    converted = model.rehyat is not None and bool(model.rehyat["blocks"])
    if value is None:  # nothing to scale: harmless for any model
        return None if converted and model.rehyat["causal"] else "keep"
    if not converted:
        raise ValueError(f"--linear-norm-frames needs a model with converted blocks; {model} has none")
    if not model.rehyat["causal"]:
        raise ValueError(f"--linear-norm-frames needs causal converted blocks; {model} was converted bidirectional")
    return value


def _norm_note(pipe) -> str:
    """``", linear_norm_frames N"`` when the loaded transformer's converted blocks scale their linear sums, else ""."""
    from ..models.wan import get_rehyat_config

    cfg = get_rehyat_config(pipe.transformer)
    h = None if cfg is None else cfg.linear_norm_frames
    return "" if h is None else f", linear_norm_frames {h}"


def _latent_shape(args, model, geometry: dict) -> tuple[int, int, int, int, int]:
    """The latents' shape ``[1, C, F, h, w]`` of the video to generate (:meth:`~rehyat.pipelines.folders.
    ModelFolder.latent_shape`); its ValueError names ``--init-*`` when the size came from there."""
    init = geometry["init"]
    try:
        return model.latent_shape(geometry["frames"], geometry["height"], geometry["width"])
    except ValueError as e:  # a size taken from --init-video / --init-latents: say so
        if init is None or (args.height is not None and args.width is not None):
            raise
        raise ValueError(f"{_init_arg(args)} gives the size to generate, {geometry['width']}x{geometry['height']} "
                         f"(width x height): {e}") from None


def _runner_chunk(args, model, arg: str, why: str, modes: tuple[str, ...]) -> int:
    """The runner chunk (latent frames) of ``model``, for an option ``arg`` that works in ``modes`` only (``why``
    says why), from the folder's configs; ValueError when ``--mode`` or the model (plain or not causal) rule it
    out."""
    from ._notes import folder_recurrence_problem, folder_runner_chunk

    if args.mode not in ("auto", *modes):
        raise ValueError(f"{arg}: {why}, in --mode {' or '.join(modes)} (auto streams a causal ReHyAt model), not "
                         f"--mode {args.mode}")
    chunk = folder_runner_chunk(model)
    problem = folder_recurrence_problem(model) if chunk is not None else "it is a plain Wan transformer (not causal)"
    if problem is not None:
        raise ValueError(f"{arg}: {why}, and {model} generates in parallel mode only: {problem}")
    return chunk


def _read_init(args):
    """The video (``[F, H, W, 3]`` uint8) or latents (``[1, C, F, h, w]`` float) of ``--init-video`` /
    ``--init-latents`` (``None`` without them). FileNotFoundError, or ValueError naming the option for a file that
    is not a video ffmpeg decodes / a tensor saved by torch (``--save-latents``), or latents with NaN or Inf."""
    import torch

    from ..io import first_line

    if args.init_video is not None:
        from ..world import read_video

        if not args.init_video.is_file():
            raise FileNotFoundError(f"--init-video {args.init_video} does not exist")
        try:
            return read_video(args.init_video)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"--init-video {args.init_video}: not a video ffmpeg can decode ({first_line(e)})") from None
    if args.init_latents is None:
        return None
    if not args.init_latents.is_file():
        raise FileNotFoundError(f"--init-latents {args.init_latents} does not exist")
    try:
        latents = torch.load(args.init_latents, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or torch errors: any of them means "not a latents file"
        raise ValueError(f"--init-latents {args.init_latents}: not a tensor file written by torch.save / "
                         f"--save-latents ({first_line(e)})") from None
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.dim() != 5:
        raise ValueError(f"--init-latents {args.init_latents} must hold one float tensor [1, C, F, h, w] (as "
                         f"--save-latents writes), got {type(latents).__name__} {getattr(latents, 'shape', '')}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(f"--init-latents {args.init_latents} holds NaN or Inf")
    return latents.float()


def _init_arg(args) -> str:
    return f"--init-video {args.init_video}" if args.init_video is not None else f"--init-latents {args.init_latents}"


def _check_init(args, model, init, shape, geometry) -> None:
    """Check ``--init-video`` / ``--init-latents`` against the model and the video to generate, from the folder's
    configs (:func:`~rehyat.pipelines.video.check_init_video`, :func:`~rehyat.pipelines.video.check_init_latents`)."""
    from ..pipelines.video import check_init_latents, check_init_video, folder_vae_factors

    video, arg = args.init_video is not None, _init_arg(args)
    chunk = _runner_chunk(args, model, arg, "a continuation streams on from the given chunks", ("streaming",))
    temporal = folder_vae_factors(model)[0]
    if video:
        check_init_video(init.shape, init.dtype, temporal, geometry["height"], geometry["width"], arg=arg)
        init_shape = (1, shape[1], (len(init) - 1) // temporal + 1, *shape[3:])
    else:
        init_shape = init.shape
    check_init_latents(init_shape, shape, chunk, temporal, arg=arg)
    given = (init_shape[2] - 1) * temporal + 1
    print(f"continuing {arg}: its {given} frames are kept, frames {given}-{geometry['frames'] - 1} are generated",
          file=sys.stderr)


def _plan_schedule(args, model, schedule, labels: list[str], frames: int) -> None:
    """Check ``--prompt-schedule`` against the model and ``--frames`` (:func:`~rehyat.pipelines.schedule.
    plan_prompt_schedule`) from the folder's configs, and say on stderr where each prompt takes effect. ValueError:
    a bad schedule, or a model or ``--mode`` that generates in parallel."""
    from ..pipelines.schedule import chunk_frame_range, plan_prompt_schedule
    from ..pipelines.video import folder_vae_factors

    arg = f"--prompt-schedule {args.prompt_schedule}"
    chunk = _runner_chunk(args, model, arg, "prompts switch per chunk", ("recurrent", "streaming"))
    temporal = folder_vae_factors(model)[0]
    chunks = plan_prompt_schedule(schedule, frames, temporal, chunk, arg=arg, labels=labels)
    for (start, prompt), k, label in zip(schedule, chunks, labels):
        first, last = chunk_frame_range(k, chunk, temporal, frames)
        moved = "" if first == start else f" (the chunk of frame {start}, frames {first}-{last})"
        print(f"prompt schedule {label}: from frame {first}{moved}: {prompt}", file=sys.stderr)


def run(args) -> int:
    import torch

    from ..pipelines import ReHyAtVideoPipeline

    model, jobs, device, g = _resolve(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    ]
    pipe = ReHyAtVideoPipeline.from_pretrained(model, torch_dtype=dtype, device=device,
                                               text_embeddings=args.text_embeddings, compile=args.compile)
    if args.linear_norm_frames != "keep":
        from ..models.wan import set_linear_norm_frames

        set_linear_norm_frames(pipe.transformer, args.linear_norm_frames)
    mode = args.mode
    if mode == "auto":
        from ..models.wan import get_rehyat_config

        cfg = get_rehyat_config(pipe.transformer)
        problem = None if cfg is None else cfg.recurrence_problem(len(pipe.transformer.blocks))
        mode = "streaming" if cfg is not None and problem is None else "parallel"
        if problem is not None:
            print(f"note: --mode auto chose parallel, since the model cannot stream: {problem}", file=sys.stderr)
    print(f"{g['frames']} frames at {g['height']}x{g['width']}, {g['steps']} steps, guidance {g['guidance']:g}, "
          f"mode {mode}{' (compiled)' if pipe.compiled else ''}{_norm_note(pipe)}, {dtype} on {device} (settings not "
          "given come from "
          "the model folder, else Wan2.1's)",
          file=sys.stderr)
    if args.prompt_file is not None:
        from ._video_names import write_index

        args.out.mkdir(parents=True, exist_ok=True)
        write_index(args.out, [{"file": out.name, "prompt": prompt, "seed": seed} for prompt, seed, out in jobs])
    failed, reported = [], False
    for prompt, seed, out in jobs:
        try:
            _generate_one(pipe, args, g, mode, prompt, seed, out)
        except Exception as e:  # one failing video does not stop the others; REHYAT_DEBUG=1 shows the traceback
            if os.environ.get("REHYAT_DEBUG"):
                raise
            failed.append((out.name, e))
            if len(jobs) > 1:
                print(f"failed: {_failure(out.name, e)}", file=sys.stderr, flush=True)
        reported = reported or _report_compile(pipe)
    return _summary(args, len(jobs), failed)


def _report_compile(pipe) -> bool:
    """Say on stderr how long the compiled transformer's first forward took (its wall time, compilation
    included), once it has run; returns whether it was said."""
    if pipe.compile_seconds is None:
        return False
    print(f"compiled the transformer blocks: first forward took {pipe.compile_seconds:.1f} s (--compile off turns "
          "it off)", file=sys.stderr, flush=True)
    return True


def _generate_one(pipe, args, g, mode, prompt, seed, out) -> None:
    """Generate one video into ``out`` (atomically). With ``--save-latents`` the latents are written (atomically)
    before they are decoded, so a failed decode keeps them."""
    import time

    import torch

    from ..io import VideoWriter, replace_atomically

    kw = dict(negative_prompt=args.negative_prompt, num_frames=g["frames"], height=g["height"], width=g["width"],
              num_inference_steps=g["steps"], guidance_scale=g["guidance"], seed=seed, mode=mode, keep_video=False)
    if not isinstance(prompt, str):  # --prompt-schedule
        kw["prompt_schedule"], prompt = prompt, None
    if g["init"] is not None:
        kw["init_video" if args.init_video is not None else "init_latents"] = g["init"]
    writer = VideoWriter(out, fps=pipe.fps)
    try:
        if args.save_latents is None:
            res = pipe(prompt, on_frames=writer.append, **kw)
        else:
            res = pipe(prompt, output_type="latent", **kw)
        if mode != "streaming" and not sys.stderr.isatty():
            print(file=sys.stderr, flush=True)  # the closed denoising bar ends its line with "\r", not a newline
        seconds = res.seconds
        if args.save_latents is not None:
            replace_atomically(args.save_latents, lambda tmp: torch.save(res.latents.cpu(), tmp))
            print(f"wrote {args.save_latents}", flush=True)
            t0 = time.perf_counter()
            pipe.decode_latents(res.latents, on_frames=writer.append, keep_video=False)
            seconds += time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    writer.close()
    print(f"wrote {out} ({writer.frames} frames, {seconds:.1f} s, mode {mode})", flush=True)


def _failure(name: str, e: BaseException) -> str:
    return f"{name}: {type(e).__name__}: {first_line(e)}"


def _summary(args, total: int, failed: list[tuple[str, BaseException]]) -> int:
    """Print what a run wrote and, one line each, which videos failed and why; the exit code (1 if any failed).
    A single video's failure is the error itself, as for any other error of the command."""
    if args.prompt_file is None:
        if failed:
            name, e = failed[0]
            print(f"rehyat generate: error: {first_line(e) if isinstance(e, USER_ERRORS) else _failure(name, e)}",
                  file=sys.stderr)
        return 1 if failed else 0
    done = f"wrote {total - len(failed)} of {total} videos into {args.out} (prompts in {args.out / 'prompts.jsonl'})"
    if not failed:
        print(done)
        return 0
    print(f"rehyat generate: {done}; {len(failed)} failed:", file=sys.stderr)
    for name, e in failed:
        print(f"  {_failure(name, e)}", file=sys.stderr)
    return 1

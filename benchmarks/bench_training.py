"""Data-parallel scaling of the two training stages, ``rehyat distill`` (stage 1) and ``rehyat finetune`` (stage 2),
on 1 and 2 GPUs, each launched exactly as a user would: ``python -m torch.distributed.run --standalone
--nproc-per-node N -m rehyat.cli distill|finetune ...``.

Usage (from the repository root):

    python benchmarks/bench_training.py --out "$OUT"          # 2 GPUs, both models (~6-7 min; --budget caps it)
    python benchmarks/bench_training.py --device cpu --quick --out /tmp/bt   # CPU smoke test: gloo, tiny models

Models (``--models``, default both):

* ``world``: the project's shipped small teacher ``rehyat/assets/teacher`` (1.79M parameters, pixel space,
  3x16x40x40 videos, 1,600 tokens per sample; block-causal with chunks of 4 frames) on a procedural world dataset
  the script exports itself (``python -m rehyat.cli world export --format dataset --text-embeddings TABLE``,
  ``--world-videos`` videos). Stage 1 converts and distils all 6 blocks (chunk_frames 4, overlap_frames 1,
  ``--softmax-blocks chunk_causal`` as a block-causal teacher needs, 20-step trajectories, lr 2e-3);
  stage 2 fine-tunes the shipped student ``rehyat/assets/student`` (full, lr 1e-4). TABLE is ``--text-embeddings``
  (default ``.devcarry/world_text_embeddings.safetensors``, git-ignored: carry it); without it this model is
  skipped and the table says so.
* ``wan``: a WanTransformer3DModel with Wan2.1-T2V-1.3B's configuration (``wan_bench_common.WAN_1_3B``, about 1.4B
  parameters, random weights, stored float32 like the released checkpoint), saved with ``save_pretrained`` into a
  temporary model folder (transformer, Wan's default UniPC scheduler, ``rehyat_pipeline.json``; no VAE or text
  encoder: neither command needs them with ``--data``), and a synthetic dataset in the project's format
  (``rehyat.training.dataset.DatasetWriter``): ``--wan-samples`` samples of random latents [16, 21, 60, 104]
  (81 frames at 480x832) and random text embeddings [512, 4096], reused. Stage 1 distils every other block
  (0, 2, ..., 28; the other 15 become chunk-causal softmax, as in the README's recipe; chunk_frames 3,
  overlap_frames 1, lr 1e-3); stage 2 fully fine-tunes the same model converted that way (lr 1e-4, gradient
  checkpointing: without it one 32,760-token sample needs about 100 GiB of activations).

Each (model, stage, N in ``--gpus``) is one launch with the SAME global batch, seed and steps, into its own
folder, with its own timeout (``--run-timeout``); the script reads back rank 0's ``train/log.jsonl`` (per-step
``loss``; every ``log-every`` steps ``samples_per_s``, ``step_s``, ``peak_mem_gib``) and the run's
``finetune_report.json`` / ``distill_report.json`` (``world_size``, which must equal N), then deletes the run's
checkpoint and weights. Table columns:

* samples/s: global samples per second in steady state, i.e. over the logging windows after the first (the first
  holds the first steps' warm-up; ``--log-every`` defaults to steps/5). Model loading, the final checkpoint and the
  saving of the model folder are not in it (they are in "run s", the whole launch). ``distill`` counts both
  classifier-free-guidance branches (its log's convention: a global batch of B prompts is 2B samples per step);
* speed-up vs 1 GPU: samples/s over the 1-GPU run's; the target is >= 0.9 N (1.8x on 2 GPUs), checked on CUDA;
* peak GiB per GPU: rank 0's ``torch.cuda.max_memory_allocated`` (on the CPU: peak RSS of rank 0's process);
* max rel. loss diff: max over steps of |loss_N - loss_1| / |loss_1|, the per-step loss (the global batch's, all-
  reduced) against the 1-GPU run; the N-GPU run must follow it: bound ``--loss-rtol`` (default 2e-2 on CUDA, where
  bfloat16 autocast on another per-GPU batch runs other kernels; 1e-4 on the CPU in float32).

A failed or timed-out run becomes its row's status and the script goes on; ``--budget`` (default 540 s) stops
launching runs that could not finish before it, so the results come back within a 10-minute device call. The
Markdown table is printed last, after device, torch, diffusers, date and command; ``--out DIR`` writes
``DIR/bench_training.json`` (every run's command, per-step losses, logging windows, reports, log tail) and
``DIR/bench_training.md``, and nothing else, rewritten after every run. Children get the current environment with
the repository root on ``PYTHONPATH`` and ``NCCL_NVLS_ENABLE=0`` (unless set); on the CPU ``OMP_NUM_THREADS=1``.
Work files go to ``--workdir`` (default: a temporary folder in /dev/shm on CUDA when it has 48 GiB free, else in
the system temp dir; a Wan fine-tuning run writes a 17 GB checkpoint, weights and AdamW state, at its end),
removed at the end.

Defaults and their cost on 2 H200 (estimates from BENCHMARKS.md sections 3 and 4, not yet measured together):

* world (``--world-steps 30``, ``--world-batch 256`` for both stages, ``--world-videos 1024``): export ~10 s;
  each launch ~10-15 s of start-up plus 30 steps of about 0.1-0.25 s (1 GPU); ~1.5 minutes for the 4 launches;
* wan (``--wan-steps 10``, ``--wan-batch 2``, ``--wan-samples 4``): set-up ~30 s (random init on GPU 0, two 5.7 GB
  folders); distil: a step is one teacher forward of 2 prompts x 2 guidance branches (about 4 x 0.6 s + the
  distillation backward, ~3 s on 1 GPU), ~10 steps -> ~30 s + ~25 s loading and saving; fine-tune: 2 samples of
  32,760 tokens forward + recomputation + backward, ~5 s per step on 1 GPU (23 GB of fp32 weights, gradients and
  AdamW state plus ~20 GB of activations), ~50 s + ~40 s for the 17 GB checkpoint and the 5.7 GB model at the end;
  about 4 minutes for the 4 launches; ~6-7 minutes in all. Half the steps halve the training part only.

``--quick`` (CPU smoke test, under 1.5 minutes on 2 cores): the world model on an 8-video, 8-frame 24x24 export,
global batch 4; a tiny Wan (``rehyat.testing.tiny_wan_transformer``: 2 blocks, 2 heads x 32, text_dim 64) on 4
synthetic samples [16, 4, 8, 8] with text [16, 64], chunk_frames 2, global batch 2; 3 steps each; 1 and 2 gloo
processes. On the CPU the speed-ups say nothing about GPUs; the smoke test checks the mechanics and that 2
processes repeat 1 process's losses.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from wan_bench_common import WAN_1_3B, build_model, device_name, log  # noqa: E402

DEFAULT_TABLE = ".devcarry/world_text_embeddings.safetensors"
STAGES = ("distill", "finetune")
JSON_NAME, MD_NAME = "bench_training.json", "bench_training.md"
# checkpoint and weights of a finished run: deleted once its logs and reports are read
HEAVY = ("train/checkpoint.pt", "transformer", ".transformer.partial")


class Skip(Exception):
    """A model that cannot be benchmarked here; the message becomes its rows' status."""


@dataclass
class ModelSpec:
    """A model's two stages: the CLI arguments of each (without --steps/--out/logging), its batches and notes."""

    name: str
    description: str
    steps: int
    args: dict[str, list[str]]
    batch: dict[str, int]
    cfg: dict[str, bool] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------------------------
def child_env(device: str) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(cmd: list[str], env: dict, timeout: float, log_path: Path) -> tuple[int | None, float, str]:
    """Run ``cmd`` in its own process group, output to ``log_path``. Returns (exit code or None on timeout, seconds,
    last lines of the output). On timeout the whole group (torchrun and its workers) is terminated, then killed."""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    wall = time.perf_counter() - t0
    try:
        lines = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    return rc, wall, "\n".join(lines[-40:])


_CLI_ERROR = re.compile(r"rehyat [\w-]+: error: .*")
_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception)\b.*)")


def error_line(log_path: Path) -> str:
    """The most telling line of a failed launch's output: the CLI's one-line error, else the first exception line
    of a worker (torchrun's own ChildFailedError summary comes after it and says less), else the last line."""
    try:
        lines = [x.strip() for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    for x in lines:
        m = _CLI_ERROR.search(x)
        if m:
            return m.group(0)
    for x in lines:
        m = _EXCEPTION.match(x)
        if m and "ChildFailedError" not in x:
            return m.group(1)
    for x in lines:
        if x.startswith("Signal ") or "Signals." in x:
            return x
    return lines[-1] if lines else ""


def setup_world(a, work: Path, env: dict) -> ModelSpec:
    table = Path(a.text_embeddings)
    if not table.is_absolute() and not table.exists():
        table = REPO / table  # the default is relative to the repository root
    table = table.resolve()
    if not table.is_file():
        raise Skip(f"skipped: text-embedding table {a.text_embeddings} not found (it is git-ignored: carry .devcarry/ "
                   f"or pass --text-embeddings)")
    teacher, student = REPO / "rehyat/assets/teacher", REPO / "rehyat/assets/student"
    for f in (teacher, student):
        if not (f / "transformer" / "config.json").is_file():
            raise Skip(f"skipped: {f.relative_to(REPO)} is missing")
    videos, frames, size = (8, 8, 24) if a.quick else (a.world_videos, 16, 40)
    patch = json.loads((teacher / "transformer" / "config.json").read_text())["patch_size"][-1]
    data = work / "world_data"
    cmd = [sys.executable, "-m", "rehyat.cli", "world", "export", "--format", "dataset", "--text-embeddings", str(table),
           "--num-videos", str(videos), "--frames", str(frames), "--height", str(size), "--width", str(size),
           "--seed", str(a.seed), "--out", str(data)]
    if a.quick:
        cmd += ["--workers", "1"]
    log(f"world: exporting {videos} videos ({frames} frames, {size}x{size})")
    rc, wall, tail = launch(cmd, env, 300, work / "world_export.log")
    if rc != 0:
        raise Skip(f"set-up failed: world export exited {rc}: {error_line(work / 'world_export.log')[:200]}")
    log(f"world: exported in {wall:.1f} s")
    b = a.world_batch or (4 if a.quick else 256)
    # the shipped teacher is block-causal (chunk 4): its blocks are converted with its chunk, as chunk-causal softmax
    distill = ["distill", "--teacher", str(teacher), "--data", str(data), "--blocks", "all", "--chunk-frames", "4",
               "--overlap-frames", "1", "--softmax-blocks", "chunk_causal", "--sampling-steps", "20",
               "--batch-size", str(b), "--lr", "2e-3", "--eval-trajectories", "0"]
    finetune = ["finetune", "--model", str(student), "--data", str(data), "--batch-size", str(b), "--lr", "1e-4",
                "--eval-batches", "0"]
    if a.teacher_loss:
        finetune += ["--teacher", str(teacher), "--teacher-weight", "1.0"]
    desc = (f"shipped world teacher (1.79M parameters, 6 blocks) / student, pixel space [3, {frames}, {size}, {size}] "
            f"({frames * (size // patch) ** 2} tokens per sample), {videos} exported videos; distill all 6 blocks "
            f"(chunk 4, overlap 1); finetune the shipped student"
            + (" + teacher-velocity loss" if a.teacher_loss else ""))
    return ModelSpec("world", desc, a.world_steps or (3 if a.quick else 30), {"distill": distill, "finetune": finetune},
                     {"distill": b, "finetune": b}, {"distill": True, "finetune": False})


def setup_wan(a, work: Path, device: str) -> ModelSpec:
    from rehyat.models import convert_wan
    from rehyat.pipelines import ReHyAtVideoPipeline
    from rehyat.training.dataset import DatasetInfo, DatasetWriter

    if a.quick:
        from rehyat.testing import tiny_wan_transformer

        model = tiny_wan_transformer(num_layers=2, in_channels=16, text_dim=64, seed=a.seed)
        (C, F, H, W), (L, D), chunk = (16, 4, 8, 8), (16, 64), 2
        what = "tiny Wan, rehyat.testing.tiny_wan_transformer"
    else:
        if device != "cuda":
            log("wan: building the 1.3B model on the CPU (minutes; the script is meant for CUDA or --quick)")
        model = build_model(WAN_1_3B, torch.device(device), torch.float32, a.seed).to("cpu")
        (C, F, H, W), (L, D), chunk = (16, 21, 60, 104), (512, 4096), 3
        what = "Wan2.1-T2V-1.3B geometry, random weights"
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    what += (f" ({cfg.num_layers} blocks, {cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
             f"{n_params / 1e6:,.1f}M parameters)")
    frames, height, width = 4 * (F - 1) + 1, 8 * H, 8 * W
    defaults = dict(frames=frames, height=height, width=width, guidance=5.0)
    teacher, student, data = work / "wan_teacher", work / "wan_student", work / "wan_data"
    t0 = time.perf_counter()
    ReHyAtVideoPipeline(model, max_sequence_length=L, fps=16, defaults=defaults).save_pretrained(teacher)
    blocks_all = range(len(model.blocks))
    blocks = list(blocks_all[::2])
    torch.manual_seed(a.seed)
    convert_wan(model, blocks=blocks, chunk_frames=chunk, overlap_frames=1, softmax_blocks="chunk_causal")
    ReHyAtVideoPipeline(model, max_sequence_length=L, fps=16, defaults=defaults).save_pretrained(student)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    info = DatasetInfo(latent_channels=C, latent_frames=F, latent_height=H, latent_width=W, text_dim=D,
                       max_sequence_length=L, latent_space="vae", num_frames=frames, height=height, width=width,
                       num_samples=0, fps=16, text_encoder="random")
    writer = DatasetWriter(data, info)
    g = torch.Generator().manual_seed(a.seed)
    n = a.wan_samples or 4
    for i in range(n):
        writer.add(torch.randn(C, F, H, W, generator=g), torch.randn(L, D, generator=g), f"synthetic sample {i}")
    writer.set_null_embeds(torch.randn(L, D, generator=g))
    writer.close()
    log(f"wan: teacher, converted student and {n} synthetic samples written in {time.perf_counter() - t0:.1f} s")
    b = a.wan_batch or 2
    bl = ",".join(map(str, blocks))
    distill = ["distill", "--teacher", str(teacher), "--data", str(data), "--blocks", bl, "--chunk-frames", str(chunk),
               "--overlap-frames", "1", "--softmax-blocks", "chunk_causal", "--sampling-steps", "50",
               "--batch-size", str(b), "--lr", "1e-3", "--eval-trajectories", "0"]
    finetune = ["finetune", "--model", str(student), "--data", str(data), "--batch-size", str(b), "--lr", "1e-4",
                "--eval-batches", "0"]
    if not a.no_gradient_checkpointing:
        finetune.append("--gradient-checkpointing")
    if a.teacher_loss:
        finetune += ["--teacher", str(teacher), "--teacher-weight", "1.0"]
    shown = bl if len(blocks) <= 4 else f"{blocks[0]},{blocks[1]},...,{blocks[-1]}"
    desc = (f"{what}, synthetic data: {n} samples of latents [{C}, {F}, {H}, {W}] ({F * H * W // 4:,} tokens) and "
            f"text [{L}, {D}]; distill blocks {shown} ({len(blocks)} of {len(blocks_all)}; chunk {chunk}, overlap 1, "
            f"the others chunk-causal softmax); finetune that "
            f"converted model in full" + ("" if a.no_gradient_checkpointing else " with gradient checkpointing")
            + (" + teacher-velocity loss" if a.teacher_loss else ""))
    return ModelSpec("wan", desc, a.wan_steps or (3 if a.quick else 10), {"distill": distill, "finetune": finetune},
                     {"distill": b, "finetune": b}, {"distill": True, "finetune": False})


# ------------------------------------------------------------------------------------------------------------------
# reading a run back
# ------------------------------------------------------------------------------------------------------------------
def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_run(out: Path, stage: str) -> dict:
    """Per-step losses, logging windows, steady-state samples/s and peak memory from a run folder."""
    lines = [json.loads(x) for x in (out / "train" / "log.jsonl").read_text().splitlines() if x.strip()]
    losses = [_float(r.get("loss")) for r in lines]
    windows, prev = [], 0
    for r in lines:
        if r.get("samples_per_s") is not None and r.get("step_s") is not None:
            n = r["step"] - prev
            dt = r["step_s"] * n
            windows.append({"last_step": r["step"], "steps": n, "seconds": dt, "samples_per_s": r["samples_per_s"],
                            "peak_mem_gib": r.get("peak_mem_gib")})
            prev = r["step"]
    steady = windows[1:] if len(windows) > 1 else windows

    def rate(ws):
        t = sum(w["seconds"] for w in ws)
        return sum(w["samples_per_s"] * w["seconds"] for w in ws) / t if t > 0 else None

    peaks = [w["peak_mem_gib"] for w in windows if w["peak_mem_gib"] is not None]
    report_name = "finetune_report.json" if stage == "finetune" else "distill_report.json"
    report = json.loads((out / report_name).read_text()) if (out / report_name).is_file() else None
    if report is not None:
        report.pop("blocks", None)
    return {"losses": losses, "windows": windows, "samples_per_s": rate(steady), "samples_per_s_all_windows": rate(windows),
            "steady_steps": sum(w["steps"] for w in steady), "peak_mem_gib": max(peaks) if peaks else None,
            "report": report}


def drop_heavy(out: Path) -> None:
    for name in HEAVY:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def max_rel_diff(a: list[float], b: list[float]) -> float | None:
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(x), 1e-12) if math.isfinite(x) and math.isfinite(y) else float("inf")
               for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------------
def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(res: dict) -> str:
    h, s = res["header"], res["settings"]
    cuda = s["device"] == "cuda"
    lines = ["# Training throughput: 1 vs N processes (benchmarks/bench_training.py)", "",
             f"- device: {h['device']}", f"- torch: {h['torch']}; diffusers: {h['diffusers']}",
             f"- date: {h['date']}", f"- command: `{h['command']}`"]
    for name, m in res["models"].items():
        lines.append(f"- {name}: {m.get('description') or m.get('status')}")
    lines.append(f"- total: {res.get('total_s', 0):.0f} s" + ("" if res.get("finished") else " (still running)"))
    mem = "peak GiB per GPU (rank 0)" if cuda else "peak GiB per process (rank 0 RSS)"
    lines += ["", f"| model | stage | {'GPUs' if cuda else 'processes'} | global batch | steps | samples/s | "
              f"speed-up vs 1 (target >= {s['target_efficiency'] * 2:.1f}x on 2) | {mem} | "
              f"max rel. loss diff vs 1 (bound {s['loss_rtol']:g}) | run s | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        batch = f"{r['global_batch']}" + (" (x2 CFG)" if r.get("cfg") else "")
        sp = "-"
        if r.get("speedup") is not None:
            sp = f"{r['speedup']:.2f}x"
            if cuda and r["gpus"] > 1:
                sp += " ok" if r["speedup"] >= s["target_efficiency"] * r["gpus"] else " BELOW"
        ld = "-"
        if r.get("max_rel_loss_diff") is not None:
            ld = f"{r['max_rel_loss_diff']:.1e}" + (" ok" if r["max_rel_loss_diff"] <= s["loss_rtol"] else " DIFFERS")
        lines.append(f"| {r['model']} | {r['stage']} | {r['gpus']} | {batch} | {r['steps']} | "
                     f"{fmt(r.get('samples_per_s'), ',.1f')} | {sp} | {fmt(r.get('peak_mem_gib'), '.2f')} | {ld} | "
                     f"{fmt(r.get('wall_s'), '.0f')} | {r['status']} |")
    lines += ["", "samples/s: steady state, the logging windows after the first (distill counts both guidance "
              "branches); run s: the whole launch (start-up, loading, training, final checkpoint, saving). "
              "Loss diff: max over steps of |loss_N - loss_1| / |loss_1| at the same global batch and seed."]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / MD_NAME).write_text(markdown(res))


def header(a, device: str) -> dict:
    import diffusers

    if device == "cuda":
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001  (a version string must not stop the benchmark)
            nccl = "?"
        dev = f"{n} x {', '.join(names)} (CUDA {torch.version.cuda}, NCCL {nccl})"
    else:
        dev = f"{device_name(torch.device('cpu'))}, gloo"
    cmd = "python benchmarks/bench_training.py" + (" " + shlex.join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    return {"device": dev, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": cmd,
            "python": sys.version.split()[0], "host_cpus": os.cpu_count()}


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny models and data, 3 steps (CPU smoke test)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="process counts to run (default 1 2; 1 first)")
    p.add_argument("--models", default="world,wan", help="comma list of world, wan (default both)")
    p.add_argument("--stages", default="distill,finetune", help="comma list of distill, finetune (default both)")
    p.add_argument("--text-embeddings", default=DEFAULT_TABLE, help=f"world caption table (default {DEFAULT_TABLE})")
    p.add_argument("--world-steps", type=int, default=None, help="default 30 (--quick: 3)")
    p.add_argument("--world-batch", type=int, default=None, help="global batch, both stages (default 256; --quick: 4)")
    p.add_argument("--world-videos", type=int, default=1024, help="exported world videos (default 1024; --quick: 8)")
    p.add_argument("--wan-steps", type=int, default=None, help="default 10 (--quick: 3)")
    p.add_argument("--wan-batch", type=int, default=None, help="global batch, both stages (default 2)")
    p.add_argument("--wan-samples", type=int, default=None, help="synthetic samples (default 4)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="wan finetune without it (OOM risk)")
    p.add_argument("--teacher-loss", action="store_true", help="finetune adds the teacher-velocity loss (--teacher)")
    p.add_argument("--log-every", type=int, default=None, help="log windows (default steps // 5, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=float, default=240.0, help="seconds per launch (default 240)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for the whole script: a launch gets at most what is left (default 540)")
    p.add_argument("--loss-rtol", type=float, default=None, help="loss-curve bound (default 2e-2 CUDA, 1e-4 CPU)")
    p.add_argument("--target-efficiency", type=float, default=0.9, help="speed-up target per process (default 0.9)")
    p.add_argument("--workdir", default=None, help="work files (default: a fresh temporary folder, removed at the end)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the work folder (run logs, data, models)")
    p.add_argument("--out", default=None, help=f"folder for {JSON_NAME} and {MD_NAME}")
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [m for m in a.models if m not in ("world", "wan")] + [s for s in a.stages if s not in STAGES]
    if bad:
        p.error(f"unknown model or stage {bad}")
    if any(n < 1 for n in a.gpus):
        p.error("--gpus must be >= 1")
    a.gpus = sorted(set(a.gpus))
    if a.loss_rtol is None:
        a.loss_rtol = 2e-2 if a.device == "cuda" else 1e-4
    return a


def make_workdir(a) -> Path:
    if a.workdir:
        w = Path(a.workdir)
        w.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="bench_training_", dir=w))
    base = None
    if a.device == "cuda" and not a.quick and os.path.isdir("/dev/shm"):
        try:
            if shutil.disk_usage("/dev/shm").free >= 48 * 2**30:
                base = "/dev/shm"
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="bench_training_", dir=base))


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(a.out) if a.out else None
    device = a.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    env = child_env(device)
    work = make_workdir(a)
    res = {"header": header(a, device), "settings": {k: v for k, v in vars(a).items()}, "models": {}, "rows": [],
           "workdir": str(work), "finished": False}
    log(f"device {res['header']['device']}; work folder {work}")
    write_outputs(res, out)
    visible = torch.cuda.device_count() if device == "cuda" else os.cpu_count() or 1

    def left() -> float:
        return a.budget - (time.perf_counter() - t_start)

    try:
        for name in a.models:
            t0 = time.perf_counter()
            try:
                if left() < 30:
                    raise Skip("skipped: time budget spent")
                spec = setup_world(a, work, env) if name == "world" else setup_wan(a, work, device)
                res["models"][name] = {"description": spec.description, "setup_s": round(time.perf_counter() - t0, 1)}
            except Skip as e:
                spec = None
                status = str(e)
            except Exception as e:  # noqa: BLE001  (a set-up error must not lose the other model's rows)
                spec = None
                status = f"set-up failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if spec is None:
                log(f"{name}: {status}")
                res["models"][name] = {"status": status}
                for stage in a.stages:
                    for n in a.gpus:
                        res["rows"].append({"model": name, "stage": stage, "gpus": n, "global_batch": "-",
                                            "steps": "-", "status": status})
                write_outputs(res, out)
                continue
            log_every = a.log_every or max(1, spec.steps // 5)
            for stage in a.stages:
                base = None
                for n in a.gpus:
                    b = spec.batch[stage]
                    row = {"model": name, "stage": stage, "gpus": n, "global_batch": b, "cfg": spec.cfg.get(stage),
                           "steps": spec.steps, "log_every": log_every}
                    res["rows"].append(row)
                    run_out = work / "runs" / f"{name}_{stage}_{n}"
                    run_out.parent.mkdir(parents=True, exist_ok=True)
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           "-m", "rehyat.cli", *spec.args[stage], "--steps", str(spec.steps), "--seed", str(a.seed),
                           "--log-every", str(log_every), "--checkpoint-every", str(spec.steps), "--no-progress",
                           "--out", str(run_out)]
                    if device == "cpu":
                        cmd += ["--device", "cpu"]
                    row["command"] = shlex.join(cmd)
                    timeout = min(a.run_timeout, left())
                    if device == "cuda" and n > visible:
                        row["status"] = f"skipped: {visible} GPU(s) visible"
                    elif b % n:
                        row["status"] = f"skipped: global batch {b} not a multiple of {n}"
                    elif left() < 20:
                        row["status"] = "skipped: time budget spent"
                    else:
                        log(f"{name} {stage}, {n} process(es), global batch {b}, {spec.steps} steps "
                            f"(timeout {timeout:.0f} s)")
                        run_log = work / "runs" / f"{name}_{stage}_{n}.log"
                        rc, wall, tail = launch(cmd, env, timeout, run_log)
                        row["wall_s"] = round(wall, 1)
                        if rc is None:
                            row["status"] = f"timeout after {timeout:.0f} s"
                        elif rc != 0:
                            row["status"] = f"failed (exit {rc}): {error_line(run_log)[:200]}"
                        if rc != 0:
                            row["log_tail"] = tail
                        try:
                            got = read_run(run_out, stage)
                            row.update(got)
                        except (OSError, ValueError, KeyError) as e:
                            if rc == 0:
                                row["status"] = f"no results: {type(e).__name__}: {e}"
                        if rc == 0 and "status" not in row:
                            ws = (row.get("report") or {}).get("world_size")
                            if ws != n:
                                row["status"] = f"report says world_size {ws}, expected {n}"
                            elif len(row.get("losses", [])) != spec.steps:
                                row["status"] = f"log has {len(row.get('losses', []))} steps, expected {spec.steps}"
                            else:
                                row["status"] = "ok"
                        drop_heavy(run_out)
                        log(f"  -> {row['status']}, {fmt(row.get('samples_per_s'), ',.1f')} samples/s, "
                            f"peak {fmt(row.get('peak_mem_gib'), '.2f')} GiB, {wall:.0f} s")
                    if n == a.gpus[0] == 1:
                        base = row if row.get("status") == "ok" else None
                    elif base is not None and row.get("status") == "ok":
                        if base.get("samples_per_s") and row.get("samples_per_s"):
                            row["speedup"] = row["samples_per_s"] / base["samples_per_s"]
                        row["max_rel_loss_diff"] = max_rel_diff(base["losses"], row["losses"])
                    if n == 1 and row.get("status") == "ok":
                        row["speedup"] = 1.0
                    res["total_s"] = round(time.perf_counter() - t_start, 1)
                    write_outputs(res, out)
    finally:
        res["total_s"] = round(time.perf_counter() - t_start, 1)
        res["finished"] = True
        write_outputs(res, out)
        if a.keep_workdir:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(markdown(res), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Progress bar and JSONL loss log of a training run, written by the main process.

Each optimizer step gets one JSON line ``{"step", "loss", "lr", ...}``. Loss values stay on the device until a
flush (every ``log_every`` steps, at checkpoints and at the end), so the hot loop does not wait for the GPU; a
flush adds ``samples_per_s`` (global samples per second over the steps since the previous flush), ``step_s`` and
``peak_mem_gib`` (CUDA ``max_memory_allocated`` on a GPU, the process's peak resident memory on the CPU).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

__all__ = ["RunLog", "truncate_log", "peak_memory_gib"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process on ``device`` in GiB (CUDA allocator peak, or peak RSS on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_log(path, last_step: int) -> None:
    """Drop lines of a JSONL log whose ``step`` is past ``last_step`` (after resuming from that checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def _value(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLog:
    """Log of one run: tqdm bar and JSONL lines on the main process, nothing on the others.

    Args:
        path: the JSONL file (appended to).
        is_main: whether this process writes.
        device: for the memory figure.
        total_steps, start_step: bar range.
        samples_per_step: global samples per optimizer step (for ``samples_per_s``).
        log_every: flush every this many steps.
        desc: bar label.
        progress: show the bar.
    """

    def __init__(self, path, *, is_main: bool, device: torch.device, total_steps: int, start_step: int,
                 samples_per_step: int, log_every: int = 10, desc: str = "train", progress: bool = True) -> None:
        self.path, self.is_main, self.device = Path(path), is_main, device
        self.samples_per_step, self.log_every = samples_per_step, max(1, log_every)
        self.pending: list[tuple[int, dict]] = []
        self.postfix_keys: tuple[str, ...] = ("loss",)
        self.t_last = time.perf_counter()
        self.steps_since = 0
        self.bar = None
        if is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def step(self, step: int, record: dict, postfix: dict | None = None) -> None:
        """Record step ``step``; values may be device tensors (read at the next flush)."""
        self.steps_since += 1
        if not self.is_main:
            if step % self.log_every == 0:
                self.t_last, self.steps_since = time.perf_counter(), 0
            return
        rec = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        self.pending.append((step, rec))
        self.bar.update(1)
        if postfix is not None:
            self._postfix = postfix
        if step % self.log_every == 0:
            self.flush()

    def flush(self) -> list[dict]:
        """Write pending lines (one device sync); returns them."""
        now = time.perf_counter()
        if not self.is_main or not self.pending:
            self.t_last, self.steps_since = now, 0
            return []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            now = time.perf_counter()
        dt = now - self.t_last
        speed = {
            "samples_per_s": round(self.samples_per_step * self.steps_since / dt, 3) if dt > 0 else None,
            "step_s": round(dt / max(self.steps_since, 1), 5),
            "peak_mem_gib": round(peak_memory_gib(self.device), 4),
        }
        lines = []
        for step, rec in self.pending:
            out = {"step": step}
            out.update({k: _value(v) if not isinstance(v, dict) else {kk: _value(vv) for kk, vv in v.items()}
                        for k, v in rec.items()})
            lines.append(out)
        lines[-1].update(speed)
        with open(self.path, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")
        post = dict(getattr(self, "_postfix", {}) or {})
        post = {k: (f"{_value(v):.4g}" if isinstance(_value(v), float) else _value(v)) for k, v in post.items()}
        if "loss" in lines[-1] and "loss" not in post and isinstance(lines[-1]["loss"], float):
            post["loss"] = f"{lines[-1]['loss']:.4g}"
        if speed["samples_per_s"] is not None:
            post["samples/s"] = f"{speed['samples_per_s']:.1f}"
        post["mem"] = f"{speed['peak_mem_gib']:.2f}G"
        self.bar.set_postfix(post, refresh=False)
        self.pending, self.t_last, self.steps_since = [], now, 0
        return lines

    def reset_timer(self) -> None:
        """Start timing afresh (e.g. after a checkpoint save, whose time is not training)."""
        self.t_last = time.perf_counter()

    def write(self, msg: str) -> None:
        """Print a message (main process) without breaking the bar."""
        if self.is_main:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg)

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()

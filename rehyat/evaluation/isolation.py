"""Peak-memory measurement on the CPU, one fresh child process per measurement.

A process's resident memory only tells the truth about one run when nothing ran before it in the same process
(memory freed earlier is reused without growing the resident set). So each measurement runs in a child process
started by a fork server that has already imported torch and diffusers (no import cost per child); the child resets
its peak resident set (``/proc/self/clear_refs``), works, and reads ``VmHWM``.
"""

from __future__ import annotations

import queue as queue_mod
import time

__all__ = ["proc_status", "reset_peak_rss", "peak_rss", "isolated_context", "run_isolated"]

PRELOAD = ["torch", "diffusers", "diffusers.models.transformers.transformer_wan",
           "diffusers.models.autoencoders.autoencoder_kl_wan", "diffusers.models.embeddings",
           "diffusers.schedulers.scheduling_unipc_multistep", "tqdm.auto", "rehyat.models", "rehyat.pipelines"]


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` value in bytes (``VmRSS``, ``VmHWM``), or -1 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``) to its current size (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak resident set in bytes (``VmHWM``, else ``getrusage``)."""
    hwm = proc_status("VmHWM")
    if hwm > 0:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def isolated_context(extra_preload: list[str] | None = None):
    """A multiprocessing context whose children start with torch, diffusers and rehyat imported (fork server),
    or a spawn context where fork servers are unavailable."""
    import multiprocessing as mp

    try:
        ctx = mp.get_context("forkserver")
        # diffusers imports its classes lazily: name the modules themselves, or each child pays for them.
        ctx.set_forkserver_preload(PRELOAD + list(extra_preload or []))
    except ValueError:
        ctx = mp.get_context("spawn")
    return ctx


def _child(fn, task, q) -> None:
    try:
        q.put(fn(task))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a row
        q.put({"status": "error", "note": f"{type(exc).__name__}: {exc}"})


def run_isolated(ctx, fn, task: dict, limit: float) -> dict:
    """Run ``fn(task) -> dict`` in a fresh child of ``ctx``; an error row if it fails, dies or runs past ``limit`` s.

    ``fn`` must be importable (a module-level function).
    """
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, task, q), daemon=True)
    p.start()
    deadline = time.perf_counter() + limit
    try:
        while True:
            try:
                return q.get(timeout=1.0)
            except queue_mod.Empty:
                pass
            if not p.is_alive():
                try:
                    return q.get(timeout=1.0)
                except queue_mod.Empty:
                    return {"status": "error", "note": f"child exited with code {p.exitcode} and no result"}
            if time.perf_counter() > deadline:
                p.kill()
                return {"status": "error", "note": f"no result within {limit:g} s"}
    finally:
        p.join(timeout=5)

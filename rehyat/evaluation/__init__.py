"""Evaluation without downloaded networks: attention error, PSNR/SSIM, world checks, time and memory sweeps."""

from .metrics import (
    PeakMemory,
    attention_errors,
    block_diagnostics,
    evaluate_models,
    plot_sweep,
    results_markdown,
    sweep_markdown,
    time_memory_sweep_isolated,
    video_similarity,
)

__all__ = [
    "PeakMemory", "attention_errors", "block_diagnostics", "evaluate_models", "plot_sweep", "results_markdown", "sweep_markdown",
    "time_memory_sweep_isolated", "video_similarity",
]

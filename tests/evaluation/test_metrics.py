"""Evaluation helpers: PSNR/SSIM, attention errors, sweeps, peak memory in a child process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rehyat.evaluation import attention_errors, sweep_markdown, time_memory_sweep_isolated, video_similarity
from rehyat.evaluation.isolation import isolated_context, run_isolated
from rehyat.models import convert_wan
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.testing import tiny_pipeline_folder, tiny_wan_transformer


def test_video_similarity_identity_and_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    same = video_similarity(a, a)
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    noisy = video_similarity(a, b)
    assert 15 < noisy["psnr"] < 40 and noisy["ssim"] < 0.99
    with pytest.raises(ValueError, match="same shape"):
        video_similarity(a, a[:2])


def test_video_similarity_psnr_is_the_whole_videos_not_a_frame_mean():
    # frames 0-1 identical, frames 2-3 off by 16 everywhere: the video's MSE is 128, PSNR 10 log10(255^2 / 128);
    # a mean of per-frame PSNRs (capped at 100 dB) would give (100 + 100 + 24.0 + 24.0) / 4 = 62 dB
    a = np.full((4, 8, 8, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[2:] += 16
    got = video_similarity(a, b)["psnr"]
    assert got == pytest.approx(10 * np.log10(255.0**2 / 128), rel=1e-9)


def test_attention_errors_zero_for_one_chunk_and_positive_otherwise():
    emb = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    one = ReHyAtVideoPipeline(convert_wan(tiny_wan_transformer(), chunk_frames=8, overlap_frames=1))
    errs = attention_errors(one, emb, 5, 32, 32)  # no VAE: 5 frames are 5 latent frames
    assert set(errs) == {0, 1} and all(e < 1e-5 for e in errs.values())
    many = ReHyAtVideoPipeline(convert_wan(tiny_wan_transformer(), chunk_frames=1, overlap_frames=0))
    errs = attention_errors(many, emb, 5, 32, 32)
    assert all(e > 1e-3 for e in errs.values())
    # distillation mode is switched off again afterwards
    from rehyat.models import get_context

    assert not get_context(many.transformer).distill


def _child_alloc(task):
    from rehyat.evaluation.isolation import peak_rss, proc_status, reset_peak_rss

    base = proc_status("VmRSS")
    reset_peak_rss()
    x = torch.ones(task["mb"] * 2**20 // 4)
    del x
    return {"status": "ok", "grew_mb": (peak_rss() - base) / 2**20}


def test_isolated_child_measures_its_own_peak():
    ctx = isolated_context()
    res = run_isolated(ctx, _child_alloc, {"mb": 200}, limit=120)
    assert res["status"] == "ok" and 150 < res["grew_mb"] < 400


def test_isolated_sweep_rows(tmp_path):
    folder = tiny_pipeline_folder(tmp_path / "s", vae=False)
    rows = time_memory_sweep_isolated({"rehyat": (folder, "recurrent")}, [4, 8], 32, 32, max_seconds=120)
    assert [r["frames"] for r in rows] == [4, 8]
    assert all(r["seconds"] > 0 and r["tokens"] == r["frames"] * 256 for r in rows)
    assert "| rehyat | recurrent | 8 | 2048 |" in sweep_markdown(rows)

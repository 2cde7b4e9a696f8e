"""``--geometry wan2.2-5b`` of benchmarks/bench_end_to_end.py and bench_memory.py: the Wan2.2-TI2V-5B transformer
config builds a 5.0B model whose forward at 704x1280 has the right shapes (on the meta device: no memory, no
compute), and the scripts' CPU smoke paths run that geometry's tiny models; sizes it cannot take are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import wan_bench_common as common  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_5b_config_builds_5b_parameters_and_the_720p_shapes():
    from diffusers import WanTransformer3DModel

    from rehyat.models import convert_wan

    geo = common.GEOMETRIES["wan2.2-5b"]
    assert (geo.height, geo.width, geo.spatial) == (704, 1280, 16)
    with torch.device("meta"):
        teacher = WanTransformer3DModel(**geo.config)
    assert 4.99e9 < sum(p.numel() for p in teacher.parameters()) < 5.01e9
    assert teacher.config.num_attention_heads * teacher.config.attention_head_dim == 3072
    lat_h, lat_w = geo.latent_size(geo.height, geo.width)
    T = common.latent_frames(geo.frames[0])
    assert (T, lat_h, lat_w) == (31, 44, 80)  # 121 frames: 31 x 22 x 40 = 27,280 tokens
    x = torch.empty(1, 48, T, lat_h, lat_w, device="meta")
    t, e = torch.full((1,), 500.0, device="meta"), torch.empty(1, 512, 4096, device="meta")
    with torch.no_grad():
        assert teacher(x, t, e, return_dict=False)[0].shape == x.shape
        convert_wan(teacher, blocks="all", chunk_frames=3, overlap_frames=1)
        assert teacher(x, t, e, return_dict=False)[0].shape == x.shape


def test_sizes_the_geometry_cannot_take_are_refused():
    geo = common.GEOMETRIES["wan2.2-5b"]
    with pytest.raises(SystemExit, match="--height must be a positive multiple of 32 for the Wan2.2-TI2V-5B"):
        geo.latent_size(720, 1280)  # 720p is 704 for this VAE x patch
    assert common.GEOMETRIES["wan2.1-1.3b"].latent_size(720, 1280) == (90, 160)


def test_end_to_end_quick_runs_the_5b_geometry(tmp_path):
    import bench_end_to_end

    assert bench_end_to_end.main(["--device", "cpu", "--quick", "--geometry", "wan2.2-5b", "--frames", "9",
                                  "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_end_to_end.json").read_text())
    assert "Wan2.2-TI2V-5B geometry, its 48 latent channels" in res["info"]["model"]
    # --quick: 128x128 pixels, 16x VAE: 8x8 latents, 16 tokens per latent frame
    assert {r["tokens"] for r in res["rows"]} == {3 * 16} and all(r["status"] == "ok" for r in res["rows"])
    assert {r["variant"] for r in res["rows"]} == {"teacher", "ReHyAt 4/4", "ReHyAt 2/4"}
    assert res["verdicts"][0].startswith("no speed-up targets for this geometry")


def test_memory_smoke_runs_the_5b_geometry(tmp_path):
    import bench_memory

    assert bench_memory.main(["--device", "cpu", "--smoke", "--geometry", "wan2.2-5b", "--frames", "9",
                              "--height", "64", "--width", "96", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_memory.json").read_text())
    assert "Wan2.2-TI2V-5B geometry, its 48 latent channels" in res["info"]["model"]
    assert res["info"]["geometry"].startswith("64x96 pixels -> latents 4x6, 6 tokens per latent frame")
    assert len(res["rows"]) == 4 and all(r["status"] == "ok" for r in res["rows"])

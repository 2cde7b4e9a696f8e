"""`rehyat eval`, `rehyat demo` and `rehyat world` on tiny pixel-space models: files, tables, errors."""

from __future__ import annotations

import json

import pytest

from rehyat.cli import main
from rehyat.testing import tiny_pipeline_folder
from rehyat.world import read_video


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return (tiny_pipeline_folder(root / "teacher", converted=False, vae=False),
            tiny_pipeline_folder(root / "student", converted=True, vae=False))


def test_eval_writes_tables(models, tmp_path):
    teacher, student = models
    out = tmp_path / "eval"
    assert main(["eval", "--teacher", str(teacher), "--student", str(student), "--num-prompts", "1",
                 "--lengths", "1,2", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    rows = {(r["model"], r["frames"]) for r in result["rows"]}
    assert rows == {("teacher", 8), ("rehyat", 8), ("teacher", 16), ("rehyat", 16)}
    assert set(result["attention"]) == {"0", "1"}
    md = (out / "eval.md").read_text()
    assert "| teacher | 8 | parallel |" in md and "PSNR vs teacher" in md
    # refuses to overwrite without asking
    assert main(["eval", "--teacher", str(teacher), "--student", str(student), "--num-prompts", "1",
                 "--lengths", "1", "--steps", "1", "--out", str(out)]) == 2


def test_eval_rejects_prompts_the_checks_cannot_score(models, tmp_path, capsys):
    teacher, student = models
    pf = tmp_path / "p.txt"
    pf.write_text("a corgi surfing\n")
    assert main(["eval", "--teacher", str(teacher), "--student", str(student), "--prompt-file", str(pf),
                 "--out", str(tmp_path / "e")]) == 2
    assert "error" in capsys.readouterr().err


def test_demo_writes_everything(models, tmp_path):
    teacher, student = models
    out = tmp_path / "demo"
    assert main(["demo", "--teacher", str(teacher), "--student", str(student), "--out", str(out),
                 "--prompts", "a red circle moving right on a grey background", "--length", "2", "--sweep", "1,2",
                 "--steps", "1"]) == 0
    assert read_video(out / "rehyat_2x.mp4").shape == (16, 32, 32, 3)
    assert read_video(out / "side_by_side.mp4").shape == (8, 32, 66, 3)  # two videos and a 2-pixel gap
    assert (out / "time_memory.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| rehyat | 16 | streaming |" in report and "| ReHyAt (recurrent) | recurrent | 16 |" in report
    # a second run refuses to overwrite the first one's files unless asked
    assert main(["demo", "--teacher", str(teacher), "--student", str(student), "--out", str(out), "--steps", "1"]) == 2


def test_world_captions_and_export(tmp_path):
    caps = tmp_path / "captions.txt"
    assert main(["world", "captions", "--out", str(caps)]) == 0
    lines = caps.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 504
    out = tmp_path / "videos"
    assert main(["world", "export", "--out", str(out), "--num-videos", "2", "--frames", "4", "--height", "16",
                 "--width", "16"]) == 0
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in meta] == ["000000.mp4", "000001.mp4"]
    assert main(["world", "export", "--out", str(out), "--num-videos", "0"]) == 2
    assert main(["world", "export", "--out", str(tmp_path / "d"), "--num-videos", "2", "--format", "dataset"]) == 2


def test_world_dataset_export_with_model_text_encoder(models, tmp_path):
    teacher, _ = models
    out = tmp_path / "data"
    assert main(["world", "export", "--format", "dataset", "--model", str(teacher), "--out", str(out),
                 "--num-videos", "3", "--frames", "4", "--height", "16", "--width", "16", "--workers", "1"]) == 0
    from rehyat.training.data import load_dataset

    ds = load_dataset(out)
    assert ds.info.latent_space == "pixel" and ds.info.latent_shape == (3, 4, 16, 16)
    assert ds.info.text_dim == 64 and ds.info.num_samples == 3

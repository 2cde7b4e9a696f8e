"""`rehyat eval`, `rehyat demo` and `rehyat world` on tiny pixel-space models: files, tables, errors."""

from __future__ import annotations

import json
import shutil

import pytest

from rehyat.cli import main
from rehyat.commands.demo import EMBEDDED_NOTE
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
    side = read_video(out / "side_by_side.mp4")
    assert side.shape == (8, 44, 66, 3)  # two videos and a 2-pixel gap, under a 12-row band of labels
    band = side[0, :12].astype(int).sum(-1)
    assert (band[:, :32] < 300).any() and (band[:, 34:] < 300).any()  # dark label text over each video
    assert (out / "time_memory.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| rehyat | 16 | streaming |" in report and "| ReHyAt (recurrent) | recurrent | 16 |" in report
    assert EMBEDDED_NOTE not in report  # that note is about the embedded models only
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


@pytest.mark.parametrize("command, args, match", [
    *[(c, ["--steps", n], f"--steps must be an int >= 1, got {n}") for c in ("eval", "demo") for n in ("0", "-1")],
    ("eval", ["--guidance", "-2"], "--guidance must be a number >= 0"),  # demo has no --guidance
])
def test_eval_demo_check_steps_and_guidance_first(models, tmp_path, capsys, command, args, match):
    teacher, student = models
    out = tmp_path / "new" / "out"
    assert main([command, "--teacher", str(teacher), "--student", str(student), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rehyat {command}: error: {match}")
    assert not (tmp_path / "new").exists()  # no folder left behind


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_eval_demo_out_is_a_file(models, tmp_path, capsys, command):
    teacher, student = models
    out = tmp_path / "afile"
    out.write_text("user data")
    assert main([command, "--teacher", str(teacher), "--student", str(student), "--out", str(out),
                 "--steps", "1"]) == 2
    assert f"--out: {out} is a file, expected a folder" in capsys.readouterr().err
    assert out.read_text() == "user data"


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_eval_demo_refuse_a_teacher_of_another_geometry(models, tmp_path, capsys, command):
    teacher, student = models  # 8 frames of 32x32; the embedded teacher: 16 frames of 40x40
    out = tmp_path / "out"
    assert main([command, "--student", str(student), "--out", str(out), "--steps", "1"]) == 2
    captured = capsys.readouterr()
    assert "--teacher" in captured.err and "--student" in captured.err and "different default sizes" in captured.err
    assert "loading" not in captured.out and not out.exists()  # refused before the models load
    # a student without default sizes is generated at Wan's 480x832, which a teacher of 7x7 patches cannot make
    bare, coarse = tmp_path / "bare", tmp_path / "coarse"
    for src, dst in ((student, bare), (teacher, coarse)):
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "rehyat_pipeline.json").read_text())
        del cfg["defaults"]
        (dst / "rehyat_pipeline.json").write_text(json.dumps(cfg))
    tcfg = json.loads((coarse / "transformer" / "config.json").read_text())
    (coarse / "transformer" / "config.json").write_text(json.dumps({**tcfg, "patch_size": [1, 7, 7]}))
    assert main([command, "--teacher", str(coarse), "--student", str(bare), "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "cannot make the student's" in err and "multiple of 7" in err, err
    assert not out.exists()


def test_demo_overwrite_removes_an_earlier_demo_only(models, tmp_path):
    teacher, student = models
    out = tmp_path / "demo"
    out.mkdir()
    (out / "rehyat_4x.mp4").write_bytes(b"an earlier demo's video")
    (out / "report.md").write_text("an earlier report")
    (out / "notes.txt").write_text("the user's")
    assert main(["demo", "--teacher", str(teacher), "--student", str(student), "--out", str(out), "--length", "1",
                 "--sweep", "1", "--steps", "1", "--prompts", "a red circle moving right on a grey background",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "rehyat_1x.mp4", "report.json", "report.md",
                                                    "side_by_side.mp4", "time_memory.png"]
    assert (out / "notes.txt").read_text() == "the user's"


def test_world_errors_name_the_action_and_cli_flags(tmp_path, capsys):
    out = tmp_path / "videos"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["world", "export", "--out", str(out), "--num-videos", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rehyat world export: error: --out") and "--overwrite" in err and "overwrite=True" not in err
    # --overwrite never deletes a file an export does not write
    assert main(["world", "export", "--out", str(out), "--num-videos", "1", "--overwrite"]) == 2
    assert "keep.txt" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["world", "captions", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("rehyat world captions: error: --out")
    afile = tmp_path / "afile"
    afile.write_text("user data")
    assert main(["world", "export", "--out", str(afile), "--num-videos", "1"]) == 2
    assert "is a file, expected a folder" in capsys.readouterr().err and afile.read_text() == "user data"


def test_world_export_overwrite_leaves_no_stale_files(models, tmp_path):
    teacher, _ = models
    small = ["--frames", "2", "--height", "16", "--width", "16"]
    out = tmp_path / "new" / "videos"  # parents are created
    assert main(["world", "export", "--out", str(out), "--num-videos", "3", *small]) == 0
    assert main(["world", "export", "--out", str(out), "--num-videos", "1", "--overwrite", *small]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.mp4", "metadata.jsonl"]
    data = tmp_path / "data"
    dataset = ["world", "export", "--format", "dataset", "--model", str(teacher), "--out", str(data), "--workers",
               "1", *small]
    assert main([*dataset, "--num-videos", "3"]) == 0
    assert main([*dataset, "--num-videos", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in data.iterdir()) == ["000000.safetensors", "dataset.json", "metadata.jsonl",
                                                     "null_embeds.safetensors"]

"""`rehyat generate` keeps finished work: latents saved before decoding, file names that fit the file system, one
failing prompt not stopping the others."""

from __future__ import annotations

import json

import pytest
import torch

from _generate_cli import gen

from rehyat.commands._video_names import NAME_MAX_BYTES, fits, hashed_name, plan_names, vbench_name
from rehyat.world import read_video


def _partials(folder):
    return [p.name for p in folder.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("mode", ["parallel", "streaming"])
def test_failed_decode_keeps_the_latents(model, tmp_path, capsys, monkeypatch, mode):
    """The VAE fails: the latents of the finished sampling are on disk, whole, and the command exits 1 with one
    line, leaving no video. Unbroken, the same run writes the same latents and the video of a plain run."""
    from rehyat.pipelines.video import StreamingDecoder

    def broken(self, latents):
        raise RuntimeError("CUDA out of memory in the VAE\nsecond line")

    with monkeypatch.context() as m:
        m.setattr(StreamingDecoder, "__call__", broken)
        capsys.readouterr()
        assert gen(model, tmp_path / "v.mp4", "--prompt", "a red circle", "--mode", mode,
                   "--save-latents", str(tmp_path / "l.pt")) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1] == \
        "rehyat generate: error: v.mp4: RuntimeError: CUDA out of memory in the VAE"
    assert f"wrote {tmp_path / 'l.pt'}" in captured.out
    latents = torch.load(tmp_path / "l.pt")
    assert latents.shape == (1, 16, 3, 4, 4) and torch.isfinite(latents).all()
    assert not (tmp_path / "v.mp4").exists() and not _partials(tmp_path)

    assert gen(model, tmp_path / "w.mp4", "--prompt", "a red circle", "--mode", mode,
               "--save-latents", str(tmp_path / "l2.pt")) == 0
    assert torch.equal(torch.load(tmp_path / "l2.pt"), latents)
    assert gen(model, tmp_path / "plain.mp4", "--prompt", "a red circle", "--mode", mode) == 0
    assert abs(read_video(tmp_path / "w.mp4").astype(int) - read_video(tmp_path / "plain.mp4").astype(int)).max() <= 1


def test_names_fit_the_file_system():
    short = "a red circle"
    assert plan_names([(1, short)], 2) == {short: [vbench_name(short, 0), vbench_name(short, 1)]}
    # the longest VBench name that fits: its temporary sibling ".<stem>.partial.mp4" is 255 bytes
    edge = "x" * (NAME_MAX_BYTES - len("..partial") - len("-0.mp4"))
    assert plan_names([(1, edge)], 1)[edge] == [f"{edge}-0.mp4"]
    assert plan_names([(1, edge)], 10)[edge][9] == f"{edge}-9.mp4"
    assert plan_names([(1, edge)], 11)[edge][0] == hashed_name(edge, 0)  # "-10" does not fit: every video hashed
    assert plan_names([(1, edge + "x")], 1)[edge + "x"] == [hashed_name(edge + "x", 0)]
    for prompt in ("y" * 300, "動画" * 50, "é" * 130, "a/" * 200):
        names = plan_names([(1, prompt)], 3)[prompt]
        for i, name in enumerate(names):
            assert fits(name) and len(f".{name[:-4]}.partial.mp4".encode()) <= NAME_MAX_BYTES
            assert "/" not in name and name.endswith(f"-{i}.mp4") and name == hashed_name(prompt, i)  # deterministic
            assert name.encode("utf-8").decode("utf-8") == name  # not cut inside a character
    assert hashed_name("z" * 300, 0) != hashed_name("z" * 299 + "y", 0)  # same cut, other hash


def test_prompts_sharing_a_name_get_distinct_ones():
    names = plan_names([(1, "a cat/dog"), (2, "a cat dog"), (3, "a bird/plane")], 1)
    assert names["a bird/plane"] == ["a bird plane-0.mp4"]  # '/' cannot make a folder
    assert names["a cat/dog"] != names["a cat dog"]
    assert names["a cat/dog"][0].startswith("a cat dog~") and names["a cat dog"][0].startswith("a cat dog~")
    with pytest.raises(ValueError, match="lines 1 and 3 hold the same prompt"):
        plan_names([(1, "a cat"), (3, "a cat")], 1)


def test_long_multibyte_and_slashed_prompts(model, tmp_path):
    """Wan-style long prompts (ASCII, and multi-byte: short in characters, long in bytes) and a '/' get valid names;
    prompts.jsonl maps every file to its full prompt."""
    long_ascii = "A detailed shot of " + "a red circle moving slowly to the left, " * 8
    long_cjk = "赤い円がゆっくり左へ動く" * 12  # 144 characters, 432 bytes
    prompts = [long_ascii.strip(), long_cjk, "a cat/dog on a mat"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "videos"
    assert gen(model, out, "--prompt-file", str(pf), "--mode", "parallel") == 0
    index = {e["file"]: e["prompt"] for e in map(json.loads, (out / "prompts.jsonl").read_text("utf-8").splitlines())}
    assert sorted(index.values()) == sorted(prompts)
    assert sorted(p.name for p in out.iterdir()) == sorted([*index, "prompts.jsonl"])  # no sub-folder
    assert index["a cat dog on a mat-0.mp4"] == "a cat/dog on a mat"  # VBench's name where it fits
    for name in index:
        assert len(name.encode()) <= NAME_MAX_BYTES and read_video(out / name).shape == (9, 32, 32, 3)


def test_a_failing_prompt_does_not_stop_the_others(model, tmp_path, capsys, monkeypatch):
    from rehyat.pipelines import ReHyAtVideoPipeline

    call = ReHyAtVideoPipeline.__call__

    def flaky(self, prompt=None, **kw):
        if prompt == "a green square":
            raise RuntimeError("boom\nmore")
        return call(self, prompt, **kw)

    monkeypatch.setattr(ReHyAtVideoPipeline, "__call__", flaky)
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na green square\na blue triangle\n")
    out = tmp_path / "videos"
    capsys.readouterr()
    assert gen(model, out, "--prompt-file", str(pf), "--mode", "parallel") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-2:] == [
        f"rehyat generate: wrote 2 of 3 videos into {out} (prompts in {out / 'prompts.jsonl'}); 1 failed:",
        "  a green square-0.mp4: RuntimeError: boom"]
    assert sorted(p.name for p in out.iterdir()) == ["a blue triangle-0.mp4", "a red circle-0.mp4", "prompts.jsonl"]


def test_duplicate_prompts_are_refused_before_any_work(model, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na cat\n\na red circle\n")
    out = tmp_path / "videos"
    assert gen(model, out, "--prompt-file", str(pf)) == 2
    err = capsys.readouterr().err
    assert f"rehyat generate: error: --prompt-file {pf}: lines 1 and 4 hold the same prompt" in err
    assert " frames at " not in err and not out.exists()

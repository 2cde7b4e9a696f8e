"""`rehyat generate` end to end on a tiny model folder: outputs, VBench names, and errors before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _generate_cli import gen

from rehyat.cli import main
from rehyat.testing import assert_outputs_close, tiny_pipeline_folder
from rehyat.world import read_video


def test_writes_video_and_latents(model, tmp_path):
    out = tmp_path / "v.mp4"
    assert gen(model, out, "--prompt", "a red circle", "--save-latents", str(tmp_path / "l.pt")) == 0
    frames = read_video(out)
    assert frames.shape == (9, 32, 32, 3)
    assert torch.load(tmp_path / "l.pt").shape == (1, 16, 3, 4, 4)
    assert not list(tmp_path.glob(".*partial*"))


def test_modes_give_same_video(model, tmp_path):
    videos = {}
    for mode in ("parallel", "streaming"):
        out = tmp_path / f"{mode}.mp4"
        assert gen(model, out, "--prompt", "a blue square", "--mode", mode, "--seed", "5") == 0
        videos[mode] = read_video(out).astype(int)
    assert abs(videos["parallel"] - videos["streaming"]).mean() < 1.0


def test_refuses_existing_output_unless_overwrite(model, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"user data")
    assert gen(model, out, "--prompt", "a red circle") == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"user data"
    assert gen(model, out, "--prompt", "a red circle", "--overwrite") == 0
    assert read_video(out).shape[0] == 9


def test_prompt_file_vbench_names(model, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\n\na green square\n")
    outdir = tmp_path / "videos"
    outdir.mkdir()
    assert gen(model, outdir, "--prompt-file", str(pf), "--videos-per-prompt", "2") == 0
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["a green square-0.mp4", "a green square-1.mp4", "a red circle-0.mp4", "a red circle-1.mp4",
                     "prompts.jsonl"]
    index = [json.loads(line) for line in (outdir / "prompts.jsonl").read_text().splitlines()]
    assert index == [{"file": "a red circle-0.mp4", "prompt": "a red circle", "seed": 0},
                     {"file": "a red circle-1.mp4", "prompt": "a red circle", "seed": 1},
                     {"file": "a green square-0.mp4", "prompt": "a green square", "seed": 0},
                     {"file": "a green square-1.mp4", "prompt": "a green square", "seed": 1}]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--prompt", " "], "empty"),
        (["--prompt", "a cat", "--frames", "10"], "4k\\+1"),
        (["--prompt", "a cat", "--height", "20"], "height"),
        (["--prompt", "a cat", "--steps", "0"], "steps"),
        (["--prompt", "a cat", "--frames", "0"], "frames must be an int >= 1"),
        (["--prompt", "a cat", "--height", "0"], "height"),
        (["--prompt", "a cat", "--guidance", "-1"], "guidance"),
        (["--prompt", "a cat", "--guidance", "nan"], "--guidance must be a number >= 0"),
        (["--prompt", "a cat", "--steps", "-2"], "--steps must be an int >= 1"),
        (["--prompt", "a cat", "--device", "tpu"], "--device"),
    ],
)
def test_bad_input(model, tmp_path, capsys, args, match):
    out = tmp_path / "v.mp4"
    base = ["generate", "--model", str(model), "--out", str(out), "--frames", "9", "--height", "32",
            "--width", "32", "--steps", "1"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("rehyat generate: error:")
    import re

    assert re.search(match, err)
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_missing_out_folder_and_bad_model(model, tmp_path, capsys):
    assert gen(model, tmp_path / "nope" / "v.mp4", "--prompt", "a cat") == 2
    assert "does not exist" in capsys.readouterr().err
    assert gen(tmp_path, tmp_path / "v.mp4", "--prompt", "a cat") == 2
    assert "not a Wan or ReHyAt checkpoint" in capsys.readouterr().err
    empty_prompts = tmp_path / "p.txt"
    empty_prompts.write_text("\n \n")
    assert gen(model, tmp_path, "--prompt-file", str(empty_prompts)) == 2
    assert "no prompt" in capsys.readouterr().err


def test_auto_mode_runs_a_plain_teacher_in_parallel(tmp_path, capsys):
    teacher = tiny_pipeline_folder(tmp_path / "teacher", converted=False)
    assert gen(teacher, tmp_path / "t.mp4", "--prompt", "a red circle") == 0
    assert "mode parallel" in capsys.readouterr().out
    assert gen(teacher, tmp_path / "s.mp4", "--prompt", "a red circle", "--mode", "streaming") == 2
    err = capsys.readouterr().err
    assert "not causal" in err
    # refused before the model is loaded (no settings line yet)
    assert "--mode streaming needs a converted ReHyAt model" in err and " frames at " not in err


def test_auto_mode_streams_a_causal_model(model, tmp_path, capsys):
    assert gen(model, tmp_path / "v.mp4", "--prompt", "a red circle") == 0
    assert "mode streaming" in capsys.readouterr().out


def test_unreadable_model_config(tmp_path, capsys):
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text("{not json")
    assert gen(tmp_path / "m", tmp_path / "v.mp4", "--prompt", "a cat") == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_auto_mode_notes_a_partly_converted_model(tmp_path, capsys):
    from rehyat.commands._notes import recurrence_note
    from rehyat.models import convert_wan, load_transformer, save_rehyat

    folder = tiny_pipeline_folder(tmp_path / "partial", converted=False)
    assert recurrence_note(folder) is None  # a plain teacher: nothing to say
    transformer = load_transformer(folder)
    convert_wan(transformer, blocks=[0], chunk_frames=2, overlap_frames=1)
    save_rehyat(transformer, folder / "transformer", overwrite=True)
    note = recurrence_note(folder)
    assert "blocks [1] keep bidirectional softmax" in note and "--softmax-blocks chunk_causal" in note
    assert gen(folder, tmp_path / "v.mp4", "--prompt", "a red circle") == 0
    captured = capsys.readouterr()
    assert "mode parallel" in captured.out and "--mode auto chose parallel" in captured.err
    assert gen(folder, tmp_path / "s.mp4", "--prompt", "a red circle", "--mode", "streaming") == 2
    err = capsys.readouterr().err
    assert "generates in parallel mode only" in err and "blocks [1] keep bidirectional softmax" in err
    assert " frames at " not in err and not (tmp_path / "s.mp4").exists()
    # chunk-causal softmax blocks: the model streams, no note
    transformer = load_transformer(tiny_pipeline_folder(tmp_path / "cc", converted=False))
    convert_wan(transformer, blocks=[0], chunk_frames=2, overlap_frames=1, softmax_blocks="chunk_causal")
    save_rehyat(transformer, tmp_path / "cc" / "transformer", overwrite=True)
    assert recurrence_note(tmp_path / "cc") is None


def test_videos_per_prompt_needs_a_prompt_file(model, tmp_path, capsys):
    assert gen(model, tmp_path / "v.mp4", "--prompt", "a red circle", "--videos-per-prompt", "3") == 2
    assert "--videos-per-prompt goes with --prompt-file" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("mode", ["parallel", "streaming"])
def test_compile_gives_the_eager_video(model, tmp_path, capsys, mode):
    """--compile (regional torch.compile of the blocks, inductor on the CPU) writes the video eager mode writes; in
    streaming mode the recurrent attention step is compiled on its own, outside the blocks' graphs."""
    videos = {}
    for extra in ((), ("--compile",)):
        out = tmp_path / f"v{len(extra)}.mp4"
        assert gen(model, out, "--prompt", "a blue square", "--mode", mode, "--seed", "5", *extra) == 0
        videos[extra] = read_video(out).astype(int)
    err = capsys.readouterr().err
    assert "(compiled)" in err
    assert err.count("compiled the transformer blocks: first forward took ") == 1
    assert abs(videos[()] - videos[("--compile",)]).mean() < 1.0


@pytest.mark.parametrize("extra", [(), ("--compile", "auto"), ("--compile", "off")])
def test_compile_auto_and_off_stay_eager_on_the_cpu(model, tmp_path, capsys, extra):
    """The default (auto) compiles on a CUDA device only: on the CPU, as with off, nothing compiles or is said."""
    assert gen(model, tmp_path / "v.mp4", "--prompt", "a blue square", *extra) == 0
    err = capsys.readouterr().err
    assert "(compiled)" not in err and "compiled the transformer blocks" not in err


def test_compile_refuses_an_unknown_value(model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gen(model, tmp_path / "v.mp4", "--prompt", "a blue square", "--compile", "yes")
    assert "--compile: invalid choice: 'yes'" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_save_latents_must_not_replace_the_video(model, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert gen(model, out, "--prompt", "a cat", "--save-latents", str(out)) == 2
    assert "--save-latents must differ from --out" in capsys.readouterr().err
    assert not out.exists()



def test_latents_without_vae_are_refused_before_generating(tmp_path, capsys):
    import shutil

    folder = tiny_pipeline_folder(tmp_path / "novae", vae=True)  # 16 latent channels
    shutil.rmtree(folder / "vae")
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rehyat generate: error: --model" in err and "16-channel latents" in err and "vae/" in err
    assert " frames at " not in err  # refused before the model loads
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_no_text_encoder_points_to_text_embeddings(tmp_path, capsys):
    import shutil

    folder = tiny_pipeline_folder(tmp_path / "notext", vae=False)
    shutil.rmtree(folder / "tokenizer")
    shutil.rmtree(folder / "text_encoder")
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no text encoder" in err and "--text-embeddings" in err and "prompt_embeds" not in err
    assert " frames at " not in err and not out.exists()


def test_prompt_file_creates_out_folder(model, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\n")
    outdir = tmp_path / "new" / "videos"
    assert gen(model, outdir, "--prompt-file", str(pf)) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["a red circle-0.mp4", "prompts.jsonl"]
    afile = tmp_path / "afile"
    afile.write_text("user data")
    assert gen(model, afile, "--prompt-file", str(pf)) == 2
    assert "--out" in capsys.readouterr().err and afile.read_text() == "user data"


def test_bad_settings_leave_no_prompt_file_folder(model, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\n")
    outdir = tmp_path / "videos"
    assert gen(model, outdir, "--prompt-file", str(pf), "--steps", "-1") == 2
    assert "--steps must be an int >= 1" in capsys.readouterr().err
    assert not outdir.exists()


def test_wrote_line_follows_the_progress_bar(model, tmp_path, capsys):
    """Parallel mode's denoising bar ends with a carriage return: in a log (not a terminal) a newline follows it, so
    the "wrote" line does not share its line."""
    assert gen(model, tmp_path / "v.mp4", "--prompt", "a red circle", "--mode", "parallel") == 0
    captured = capsys.readouterr()
    assert captured.err.endswith("\n") and captured.out.startswith("wrote ")


def test_teacher_past_its_rope_table_refused_before_loading(tmp_path, capsys):
    """The tiny teacher's RoPE table has 32 positions: 129 frames are 33 latent frames (VAE: 4x in time)."""
    teacher = tiny_pipeline_folder(tmp_path / "teacher", converted=False)
    capsys.readouterr()  # the folder's writing progress
    out = tmp_path / "v.mp4"
    for args, said in ((["--frames", "129"], "frames 129 (33 latent frames) is past this plain Wan transformer's "
                                             "RoPE table (rope_max_seq_len=32 positions per axis), which supports "
                                             "up to 125 frames (32 latent frames) in every mode"),
                       (["--height", "528"], "height 528 (33 patches) is past"),
                       (["--width", "528"], "width 528 (33 patches) is past")):
        assert gen(teacher, out, "--prompt", "a red circle", *args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rehyat generate: error: {said}") and len(err.strip().splitlines()) == 1
        assert "ReHyAt-converted model (rehyat convert) has no such limit in any mode" in err
        assert " frames at " not in err and not out.exists()  # refused before the model loads


def test_converted_teacher_is_not_refused_past_the_rope_table(tmp_path, capsys):
    """A pixel-space teacher (32 RoPE positions) is refused at 33 frames; converted, the same folder generates them."""
    import shutil

    from rehyat.models import convert_wan, load_transformer, save_rehyat

    teacher = tiny_pipeline_folder(tmp_path / "teacher", converted=False, vae=False)
    student = tmp_path / "student"
    shutil.copytree(teacher, student)
    transformer = convert_wan(load_transformer(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    save_rehyat(transformer, student / "transformer", overwrite=True)
    args = ["--prompt", "a red circle", "--frames", "33", "--height", "8", "--width", "8", "--steps", "1"]
    assert gen(teacher, tmp_path / "t.mp4", *args) == 2
    assert "rope_max_seq_len=32" in capsys.readouterr().err
    for mode in ("parallel", "streaming"):
        assert gen(student, tmp_path / f"{mode}.mp4", *args, "--mode", mode) == 0
        assert read_video(tmp_path / f"{mode}.mp4").shape == (33, 8, 8, 3)

@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The tiny causal model (chunks of 2 latent frames) with block 0's phi_k bias saved as NaN: latent frames 0-1
    (chunk 0, no linear keys) stay finite, latent frame 2 (video frames 5-8 of 9) and later read NaN."""
    from safetensors.torch import load_file, save_file

    folder = tiny_pipeline_folder(tmp_path_factory.mktemp("nan") / "model")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["blocks.0.attn1.processor.feature_map_k.b2"].fill_(float("nan"))
    save_file(sd, weights, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("mode", ["parallel", "recurrent", "streaming"])
def test_nan_output_is_refused_and_nothing_written(nan_model, tmp_path, capsys, mode):
    """Issue 15: a run whose latents turn NaN stops with a one-line error naming the frame (exit status 1); no
    video, no --save-latents file, no partial file, and an existing video (--overwrite) is left as it was."""
    out, latents = tmp_path / "v.mp4", tmp_path / "l.pt"
    out.write_bytes(b"the user's earlier video")
    code = gen(nan_model, out, "--prompt", "a red circle", "--mode", mode, "--save-latents", str(latents),
               "--overwrite")
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert code == 1 and len(errors) == 1, captured.err
    assert errors[0].startswith("rehyat generate: error: the latents hold NaN or Inf after denoising step 1 of 2")
    assert "first at video frame 5 (latent frame 2, which decodes to video frames 5-8)" in errors[0]
    assert "Traceback" not in captured.err and "wrote" not in captured.out
    assert out.read_bytes() == b"the user's earlier video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


# ----------------------------------------------------------------------------------------------------------------
# --prompt-schedule (issue 18): 13 frames = 4 latent frames, chunks of 2 latent frames: frames 0-4 and 5-12
# ----------------------------------------------------------------------------------------------------------------
def schedule_file(tmp_path, text, name="schedule.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_prompt_schedule_switches_after_the_first_chunk(model, tmp_path, capsys, single_thread):
    """Frames before the switch are the single-prompt run's (two model objects: up to rounding), later ones differ;
    a start frame inside a chunk is said to take effect from the chunk's first frame."""
    sched = schedule_file(tmp_path, "# two segments\n0 a red circle\n\n7 a blue square moving up\n")
    args = ["--frames", "13", "--seed", "3"]
    assert gen(model, tmp_path / "s.mp4", "--prompt-schedule", sched, *args, "--save-latents",
               str(tmp_path / "s.pt")) == 0
    err = capsys.readouterr().err
    assert "prompt schedule line 2: from frame 0: a red circle" in err
    assert "prompt schedule line 4: from frame 5 (the chunk of frame 7, frames 5-12): a blue square moving up" in err
    assert gen(model, tmp_path / "p.mp4", "--prompt", "a red circle", *args, "--save-latents",
               str(tmp_path / "p.pt")) == 0
    switched, plain = torch.load(tmp_path / "s.pt"), torch.load(tmp_path / "p.pt")
    assert_outputs_close(switched[:, :, :2], plain[:, :, :2])
    assert (switched[:, :, 2:] - plain[:, :, 2:]).abs().mean() > 0.01 * plain.abs().mean()  # rounding: 1e-6
    video, plain_video = read_video(tmp_path / "s.mp4").astype(int), read_video(tmp_path / "p.mp4").astype(int)
    assert video.shape == (13, 32, 32, 3)
    assert abs(video[:5] - plain_video[:5]).mean() < 1.0


@pytest.mark.parametrize("text, extra, match", [
    ("0 a red circle\n9 a blue square\n5 a green circle\n", [],
     "line 3: start frame 5 does not come after line 2's 9 \\(start frames must increase\\)"),
    ("0 a red circle\n5 a blue square\n5 a green circle\n", [], "line 3: start frame 5 does not come after line 2's 5"),
    ("0 a red circle\n13 a blue square\n", [], "line 2: start frame 13 is past the video's last frame 12 \\(13 frames\\)"),
    ("2 a red circle\n", [], "line 1: the first prompt must start at frame 0, got 2"),
    ("0 a red circle\n3 a blue square\n", [], "line 2: start frame 3 is in the chunk of frames 0-4, as line 1's 0 is"),
    ("0 a red circle\nfive a blue square\n", [], "line 2: expected '<start frame> <prompt>'"),
    ("0 a red circle\n5\n", [], "line 2: no prompt after the start frame 5"),
    ("\n# nothing\n", [], "--prompt-schedule .* must be a non-empty list"),
    ("0 a red circle\n", ["--mode", "parallel"], "prompts switch per chunk, in --mode recurrent or streaming"),
    ("0 a red circle\n", ["--videos-per-prompt", "2"], "--videos-per-prompt goes with --prompt-file"),
])
def test_bad_prompt_schedule_refused_before_loading(model, tmp_path, capsys, text, extra, match):
    import re

    out = tmp_path / "v.mp4"
    assert gen(model, out, "--frames", "13", "--prompt-schedule", schedule_file(tmp_path, text), *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("rehyat generate: error: --prompt-schedule") or "--videos-per-prompt" in match, err
    assert re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_prompt_schedule_needs_a_causal_model_and_no_other_prompt(tmp_path, capsys):
    teacher = tiny_pipeline_folder(tmp_path / "teacher", converted=False)
    capsys.readouterr()
    sched = schedule_file(tmp_path, "0 a red circle\n5 a blue square\n")
    assert gen(teacher, tmp_path / "v.mp4", "--frames", "13", "--prompt-schedule", sched) == 2
    err = capsys.readouterr().err
    assert "generates in parallel mode only: it is a plain Wan transformer (not causal)" in err
    assert " frames at " not in err
    with pytest.raises(SystemExit):  # argparse: one of --prompt, --prompt-file, --prompt-schedule
        gen(teacher, tmp_path / "v.mp4", "--prompt", "a cat", "--prompt-schedule", sched)
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


# ----------------------------------------------------------------------------------------------------------------
# --init-video / --init-latents (issue 18): 21 frames = 6 latent frames, chunks of 2: 5 or 13 frames are whole chunks
# ----------------------------------------------------------------------------------------------------------------
def test_init_latents_continue_a_run_frame_for_frame(model, tmp_path, capsys, single_thread):
    """A run's first chunk (--save-latents), continued with the same seed and prompt: the whole run."""
    args = ["--prompt", "a red circle", "--frames", "21", "--seed", "3"]
    assert gen(model, tmp_path / "full.mp4", *args, "--save-latents", str(tmp_path / "full.pt")) == 0
    full = torch.load(tmp_path / "full.pt")
    torch.save(full[:, :, :2].clone(), tmp_path / "first.pt")
    assert gen(model, tmp_path / "cont.mp4", *args, "--init-latents", str(tmp_path / "first.pt"),
               "--save-latents", str(tmp_path / "cont.pt")) == 0
    assert "its 5 frames are kept, frames 5-20 are generated" in capsys.readouterr().err
    assert_outputs_close(torch.load(tmp_path / "cont.pt"), full)  # two model objects: up to rounding
    assert abs(read_video(tmp_path / "cont.mp4").astype(int) - read_video(tmp_path / "full.mp4").astype(int)).max() <= 1


def test_init_video_starts_the_output_with_its_vae_round_trip(model, tmp_path, single_thread):
    from rehyat.pipelines import ReHyAtVideoPipeline
    from rehyat.world import write_video

    given = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "in.mp4", given, fps=8, lossless=True)
    assert gen(model, tmp_path / "out.mp4", "--prompt", "a red circle", "--frames", "13", "--init-video",
               str(tmp_path / "in.mp4")) == 0
    out = read_video(tmp_path / "out.mp4").astype(int)
    pipe = ReHyAtVideoPipeline.from_pretrained(model)
    round_trip = pipe.decode_latents(pipe.encode_video(read_video(tmp_path / "in.mp4"))).astype(int)
    assert out.shape == (13, 32, 32, 3)
    assert abs(out[:5] - round_trip).mean() < 4.0  # the output's H.264 coding (measured: 2.4)
    assert abs(out[:5] - given).mean() > 10 * abs(out[:5] - round_trip).mean()  # the tiny random VAE's round trip


def test_init_video_of_own_frames_continues_the_run(tmp_path, single_thread):
    """Pixel space, a lossless input: the run's first 4 frames (chunks of 2) continue as the run, up to 8-bit
    rounding of the given frames and the output's H.264 coding."""
    from rehyat.world import write_video

    pixels = tiny_pipeline_folder(tmp_path / "pixels", vae=False)
    args = ["--prompt", "a red circle", "--frames", "8", "--seed", "1"]
    assert gen(pixels, tmp_path / "full.mp4", *args, "--save-latents", str(tmp_path / "full.pt")) == 0
    full = torch.load(tmp_path / "full.pt")
    first = ((full[0, :, :4].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    write_video(tmp_path / "first.mp4", first, fps=8, lossless=True)
    assert gen(pixels, tmp_path / "cont.mp4", *args, "--init-video", str(tmp_path / "first.mp4"),
               "--save-latents", str(tmp_path / "cont.pt")) == 0
    cont = torch.load(tmp_path / "cont.pt")
    assert torch.equal(cont[:, :, :4], torch.from_numpy(first).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    assert (cont[:, :, 4:] - full[:, :, 4:]).abs().max() < 0.02  # given frames off by up to 1/255


@pytest.mark.parametrize("make, extra, match", [
    ("video10", [], "--init-video .*in.mp4 has 10 frames; this model's VAE takes 4k\\+1 frames \\(e.g. 9 or 13\\)"),
    ("video9", [], "--init-video .*in.mp4 holds 9 video frames \\(3 latent frames\\): a continuation starts from "
                   "whole chunks of 2 latent frames, i.e. 5, 13, 21, ... video frames"),
    ("video5", ["--height", "64"], "--init-video .*in.mp4 is 32x32 \\(width x height\\), the video to generate 32x64"),
    ("video5", ["--mode", "recurrent"], "a continuation streams on from the given chunks, in --mode streaming "
                                        "\\(auto streams a causal ReHyAt model\\), not --mode recurrent"),
    ("video5", ["--frames", "5"], "holds 5 video frames, the video to generate 5: nothing is left to generate"),
    ("text", [], "--init-video .*in.mp4: not a video ffmpeg can decode"),
    ("latents_text", [], "--init-latents .*in.pt: not a tensor file written by torch.save / --save-latents"),
    ("latents_dict", [], "--init-latents .*in.pt must hold one float tensor \\[1, C, F, h, w\\]"),
    ("latents_nan", [], "--init-latents .*in.pt holds NaN or Inf"),
    ("latents_channels", [], "--init-latents .*in.pt has shape \\[1, 3, 2, 4, 4\\], expected \\[1, 16, F, 4, 4\\]"),
    ("missing", [], "--init-video .*in.mp4 does not exist"),
])
def test_bad_init_refused_before_loading(model, tmp_path, capsys, make, extra, match):
    import re

    from rehyat.world import write_video

    path = tmp_path / ("in.pt" if make.startswith("latents") else "in.mp4")
    if make.startswith("video"):
        write_video(path, np.zeros((int(make[5:]), 32, 32, 3), np.uint8), fps=8, lossless=True)
    elif make == "text" or make == "latents_text":
        path.write_text("not a video\n")
    elif make.startswith("latents"):
        torch.save({"latents": torch.zeros(1, 16, 2, 4, 4)} if make == "latents_dict" else
                   torch.full((1, 16, 2, 4, 4), float("nan")) if make == "latents_nan" else torch.zeros(1, 3, 2, 4, 4),
                   path)
    out = tmp_path / "v.mp4"
    opt = "--init-latents" if make.startswith("latents") else "--init-video"
    assert gen(model, out, "--prompt", "a red circle", "--frames", "21", opt, str(path), *extra) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and err.startswith("rehyat generate: error:") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_init_needs_one_causal_video(model, tmp_path, capsys):
    from rehyat.world import write_video

    write_video(tmp_path / "in.mp4", np.zeros((5, 32, 32, 3), np.uint8), fps=8, lossless=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert gen(model, tmp_path / "videos", "--prompt-file", str(prompts), "--init-video", str(tmp_path / "in.mp4")) == 2
    assert "--init-video continues one video: use it with --prompt or --prompt-schedule" in capsys.readouterr().err
    teacher = tiny_pipeline_folder(tmp_path / "teacher", converted=False)
    capsys.readouterr()
    assert gen(teacher, tmp_path / "v.mp4", "--prompt", "a cat", "--init-video", str(tmp_path / "in.mp4")) == 2
    err = capsys.readouterr().err
    assert "generates in parallel mode only: it is a plain Wan transformer" in err and " frames at " not in err
    with pytest.raises(SystemExit):
        gen(model, tmp_path / "v.mp4", "--prompt", "a cat", "--init-video", "a.mp4", "--init-latents", "b.pt")
    assert "not allowed with argument" in capsys.readouterr().err


def test_linear_norm_frames_overrides_the_model_for_the_run(model, tmp_path):
    """--linear-norm-frames N reaches the converted blocks (7 latent frames: the last chunk's linear branch holds
    more than one frame, so N = 1 changes the latents); 'off' is the folder's own setting (none here)."""
    latents = {}
    for extra in ((), ("--linear-norm-frames", "1"), ("--linear-norm-frames", "off")):
        path = tmp_path / f"l{len(latents)}.pt"
        assert main(["generate", "--model", str(model), "--frames", "25", "--height", "32", "--width", "32",
                     "--steps", "2", "--guidance", "2.0", "--out", str(tmp_path / f"v{len(latents)}.mp4"),
                     "--prompt", "a red circle", "--save-latents", str(path), *extra]) == 0
        latents[extra] = torch.load(path)
    plain = latents[()]
    assert torch.equal(latents[("--linear-norm-frames", "off")], plain)
    assert not torch.equal(latents[("--linear-norm-frames", "1")], plain)


@pytest.mark.parametrize("value", ["0", "-3", "nine", "2.5", "²", ""])
def test_linear_norm_frames_bad_value_refused_before_loading(model, tmp_path, capsys, value):
    assert gen(model, tmp_path / "v.mp4", "--prompt", "a cat", "--linear-norm-frames", value) == 2
    assert f"--linear-norm-frames must be an int >= 1 or 'off', got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_linear_norm_frames_refused_for_a_plain_teacher_but_off_is_harmless(tmp_path, capsys):
    teacher = tiny_pipeline_folder(tmp_path / "teacher", converted=False)
    assert gen(teacher, tmp_path / "v.mp4", "--prompt", "a cat", "--linear-norm-frames", "3") == 2
    assert "--linear-norm-frames needs a model with converted blocks" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
    assert gen(teacher, tmp_path / "v.mp4", "--prompt", "a cat", "--linear-norm-frames", "OFF") == 0


def test_linear_norm_frames_in_use_is_printed(model, tmp_path, capsys):
    assert gen(model, tmp_path / "v.mp4", "--prompt", "a cat", "--linear-norm-frames", " 4") == 0
    assert ", linear_norm_frames 4," in capsys.readouterr().err

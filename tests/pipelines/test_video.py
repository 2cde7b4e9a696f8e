"""Generation: the three modes agree for a causal model; streaming decode equals whole-video decode; errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rehyat.models import convert_wan
from rehyat.pipelines import NonFiniteOutputError, ReHyAtVideoPipeline, StreamingDecoder, initial_noise
from rehyat.pipelines.video import check_finite
from rehyat.testing import (GEOMETRIES, assert_outputs_close, tiny_pipeline_folder, tiny_vae, tiny_wan_transformer,
                            tiny_wan_vae)


def geometry_pipe(geometry: str) -> ReHyAtVideoPipeline:
    """A fully causal tiny model with the tiny VAE of ``geometry`` (Wan2.1: 16 channels, 8x; Wan2.2: 48, 16x)."""
    vae = tiny_vae(geometry)
    model = convert_wan(tiny_wan_transformer(in_channels=vae.config.z_dim), blocks="all", chunk_frames=2,
                        overlap_frames=1)
    return ReHyAtVideoPipeline(model, vae=vae)


@pytest.fixture(scope="module")
def causal_pipe():
    return geometry_pipe("wan2.1")


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def geometry_pipes(request):
    """``(pipeline, size)``: a causal pipeline of each geometry and a size giving it 4 x 4 latents."""
    return geometry_pipe(request.param), 4 * GEOMETRIES[request.param]["spatial"]


def embeds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 6, 64, generator=g), torch.randn(1, 6, 64, generator=g)


@pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only wait on each other
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_three_modes_same_video(geometry_pipes, guidance):
    pipe, size = geometry_pipes
    pos, neg = embeds()
    outs = {}
    for mode in ("parallel", "recurrent", "streaming"):
        outs[mode] = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=21, height=size, width=size,
                          num_inference_steps=4, guidance_scale=guidance, seed=3, mode=mode, progress=False)
    ref = outs["parallel"]
    assert ref.video.shape == (21, size, size, 3) and ref.video.dtype == np.uint8
    assert ref.latents.shape == (1, pipe.vae.config.z_dim, 6, 4, 4)
    for mode in ("recurrent", "streaming"):
        torch.testing.assert_close(outs[mode].latents, ref.latents, rtol=1e-4, atol=1e-4)
        # identical up to rounding to 8 bits
        assert np.abs(outs[mode].video.astype(int) - ref.video.astype(int)).max() <= 1


def test_seed_changes_video(causal_pipe):
    pos, _ = embeds()
    a = causal_pipe(prompt_embeds=pos, num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                    seed=0, progress=False)
    b = causal_pipe(prompt_embeds=pos, num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                    seed=1, progress=False)
    assert not torch.equal(a.latents, b.latents)


@pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only wait on each other
def test_streaming_emits_frames_per_chunk(geometry_pipes):
    pipe, size = geometry_pipes
    pos, _ = embeds()
    blocks = []
    out = pipe(prompt_embeds=pos, num_frames=13, height=size, width=size, num_inference_steps=2,
               guidance_scale=1.0, mode="streaming", on_frames=blocks.append, keep_video=False, progress=False)
    assert out.video is None
    # 4 latent frames, chunks of 2: the first chunk decodes to 1 + 4 frames, the second to 8
    assert [len(b) for b in blocks] == [5, 8] and blocks[0].shape[1:] == (size, size, 3)


@pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only wait on each other
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_streaming_decoder_equals_vae_decode(geometry):
    # Wan2.2's VAE adds residual up-blocks (which treat the first chunk apart) and the 2x2 pixel patch
    vae = tiny_vae(geometry)
    z = torch.randn(1, vae.config.z_dim, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    from rehyat.pipelines.video import _denormalize

    with torch.no_grad():
        whole = vae.decode(_denormalize(vae, z), return_dict=False)[0]
        dec = StreamingDecoder(vae)
        parts = torch.cat([dec(z[:, :, :2]), dec(z[:, :, 2:3]), dec(z[:, :, 3:])], dim=2)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)


def test_initial_noise_is_per_frame():
    full = initial_noise(7, (1, 4, 6, 3, 3))
    tail = initial_noise(7, (1, 4, 2, 3, 3), frame_start=4)
    assert torch.equal(full[:, :, 4:], tail)
    assert not torch.equal(initial_noise(8, (1, 4, 6, 3, 3)), full)


def test_teacher_refuses_recurrent_modes():
    pipe = ReHyAtVideoPipeline(tiny_wan_transformer(), vae=tiny_wan_vae())
    pos, _ = embeds()
    for mode in ("recurrent", "streaming"):
        with pytest.raises(ValueError, match="not causal"):
            pipe(prompt_embeds=pos, num_frames=5, height=32, width=32, num_inference_steps=1, mode=mode)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=10), "4k\\+1"),
        (dict(height=24), "height"),
        (dict(width=40), "width"),
        (dict(mode="fast"), "mode"),
        (dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_input(causal_pipe, kwargs, match):
    pos, _ = embeds()
    args = dict(prompt_embeds=pos, num_frames=5, height=32, width=32, num_inference_steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_pipe(**args)


def test_empty_prompt(causal_pipe):
    with pytest.raises(ValueError, match="prompt"):
        causal_pipe("  ", num_frames=5, height=32, width=32)


def test_folder_round_trip_with_text_encoder(tmp_path):
    folder = tiny_pipeline_folder(tmp_path / "m")
    pipe = ReHyAtVideoPipeline.from_pretrained(folder)
    out = pipe("a red circle moving left", num_frames=9, height=32, width=32, num_inference_steps=2,
               guidance_scale=3.0, mode="streaming", progress=False)
    assert out.video.shape == (9, 32, 32, 3)
    # the same prompt encodes to the same embeddings after a reload (two text-encoder objects: up to rounding)
    again = ReHyAtVideoPipeline.from_pretrained(folder)
    assert_outputs_close(again.encode_prompt(["a red square"]), pipe.encode_prompt(["a red square"]))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        ReHyAtVideoPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a Wan or ReHyAt checkpoint"):
        ReHyAtVideoPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("compile", ["auto", "off"])
def test_compile_auto_and_off_stay_eager_on_the_cpu(tmp_path, compile):
    """``compile="auto"`` (the default) compiles on a CUDA device only; on the CPU, as ``"off"``, the blocks stay
    eager and no first-forward time is kept."""
    kw = {} if compile == "auto" else {"compile": compile}
    pipe = ReHyAtVideoPipeline.from_pretrained(tiny_pipeline_folder(tmp_path / "m", vae=False), **kw)
    assert not pipe.compiled
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in pipe.transformer.blocks)
    pipe("a red circle", progress=False)
    assert pipe.compile_seconds is None


@pytest.mark.parametrize("mode", ["parallel", "streaming"])
def test_compile_on_compiles_once_and_times_the_first_forward(tmp_path, monkeypatch, mode):
    """``compile="on"`` calls compile_blocks once on the loaded transformer (stubbed here: the real compilation is
    tested in tests/models/test_compile.py and tests/commands/test_generate.py) and keeps the first denoising
    forward's wall time, in every mode's forward path."""
    calls = []
    monkeypatch.setattr("rehyat.pipelines.video.compile_blocks", lambda tr: calls.append(tr) or tr)
    pipe = ReHyAtVideoPipeline.from_pretrained(tiny_pipeline_folder(tmp_path / "m", vae=False), compile="on")
    assert calls == [pipe.transformer] and pipe.compiled and pipe.compile_seconds is None
    pipe("a red circle", mode=mode, progress=False)
    first = pipe.compile_seconds
    assert isinstance(first, float) and first > 0
    pipe("a red circle", mode=mode, progress=False)
    assert pipe.compile_seconds == first and len(calls) == 1


def test_compile_auto_compiles_on_cuda_only():
    from rehyat.models import should_compile

    assert [should_compile("auto", d) for d in ("cuda", "cuda:1", torch.device("cuda"), "cpu", "mps")] == [
        True, True, True, False, False]
    assert should_compile("on", "cpu") and not should_compile("off", "cuda")


@pytest.mark.parametrize("value", ["yes", "", True, None])
def test_compile_refuses_other_values_before_loading(tmp_path, value):
    with pytest.raises(ValueError, match=r"compile must be one of auto, on, off, got "):
        ReHyAtVideoPipeline.from_pretrained(tmp_path / "missing", compile=value)  # not FileNotFoundError: first


def test_call_uses_the_folder_defaults(tmp_path):
    folder = tiny_pipeline_folder(tmp_path / "m", vae=False)  # defaults: 8 frames of 32 x 32, 2 steps
    pipe = ReHyAtVideoPipeline.from_pretrained(folder)
    out = pipe("a red circle", progress=False)
    assert out.video.shape == (8, 32, 32, 3)


@pytest.mark.parametrize("axis", ["frames", "height", "width"])
def test_rope_check_matches_the_teacher_table(axis):
    """check_rope_table's limit is where diffusers' precomputed table ends, on every axis (the tiny teacher: 32
    positions, patch (1, 2, 2)); a converted model has no limit."""
    from rehyat.pipelines.video import check_rope_table

    teacher = tiny_wan_transformer()
    for n, fits in ((32, True), (33, False)):  # positions on `axis`
        dims = dict(frames=4, height=4, width=4) | {axis: n * (1 if axis == "frames" else 2)}
        shape = (1, 16, dims["frames"], dims["height"], dims["width"])
        args = ((1, 2, 2), shape, 4, 8)
        check_rope_table(None, *args)
        if fits:
            teacher.rope(torch.zeros(shape))
            check_rope_table(32, *args)
        else:
            with pytest.raises(RuntimeError):
                teacher.rope(torch.zeros(shape))
            with pytest.raises(ValueError, match=f"^{axis} .*rope_max_seq_len=32"):
                check_rope_table(32, *args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_frames=129), r"^frames 129 \(33 latent frames\) is past .*up to 125 frames \(32 latent frames\)"),
    (dict(height=528), r"^height 528 \(33 patches\) is past .*up to 512 pixels \(32 patches\)"),
    (dict(width=528), r"^width 528 \(33 patches\) is past .*up to 512 pixels \(32 patches\)"),
])
def test_teacher_past_its_rope_table_refused_before_any_work(kwargs, match):
    pipe = ReHyAtVideoPipeline(tiny_wan_transformer(), vae=tiny_wan_vae())  # RoPE table of 32 positions

    def no_forward(*args):
        raise AssertionError("the transformer ran before the check")

    pipe.transformer.register_forward_pre_hook(no_forward)
    pos, _ = embeds()
    args = dict(prompt_embeds=pos, num_frames=5, height=32, width=32, num_inference_steps=1) | kwargs
    with pytest.raises(ValueError, match=match) as info:
        pipe(**args)
    assert "ReHyAt-converted model" in str(info.value) and "\n" not in str(info.value)


def test_converted_model_generates_past_the_teacher_table():
    """The teacher's table ends at 32 positions; the same transformer converted generates 33 frames (pixel space)."""
    teacher = tiny_wan_transformer(in_channels=3)
    args = dict(prompt_embeds=embeds()[0], num_frames=33, height=8, width=8, num_inference_steps=1,
                guidance_scale=1.0, progress=False)
    with pytest.raises(ValueError, match="rope_max_seq_len=32"):
        ReHyAtVideoPipeline(copy.deepcopy(teacher))(**args)
    pipe = ReHyAtVideoPipeline(convert_wan(teacher, blocks="all", chunk_frames=2, overlap_frames=1))
    for mode in ("parallel", "streaming"):
        assert pipe(**args, mode=mode).video.shape == (33, 8, 8, 3)

# ----------------------------------------------------------------------------------------------------------------
# Non-finite output is refused (issue 15): never decoded, handed out or returned
# ----------------------------------------------------------------------------------------------------------------
def nan_feature_map_pipe(vae: bool, dtype=torch.float32):
    """A causal tiny model (chunks of 2 latent frames) whose block-0 phi_k is NaN: chunk 0 has no linear keys and
    stays finite, every later latent frame reads the NaN state, so latent frame 2 is the first bad one."""
    model = convert_wan(tiny_wan_transformer(in_channels=16 if vae else 3), blocks="all", chunk_frames=2,
                        overlap_frames=1)
    with torch.no_grad():
        model.blocks[0].attn1.processor.feature_map_k.b2.fill_(float("nan"))
    return ReHyAtVideoPipeline(model.to(dtype), vae=tiny_wan_vae() if vae else None)


@pytest.mark.parametrize("mode", ["parallel", "recurrent", "streaming"])
@pytest.mark.parametrize("vae, frames, named", [
    (True, 13, "video frame 5 (latent frame 2, which decodes to video frames 5-8)"),
    (False, 6, "video frame 2 (latent frame 2)"),
], ids=["vae", "pixels"])
@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_nan_latents_are_refused(mode, vae, frames, named, output_type):
    pipe = nan_feature_map_pipe(vae)
    pos, _ = embeds()
    blocks = []
    with pytest.raises(FloatingPointError, match="NaN or Inf after denoising step 1 of 2") as err:
        pipe(prompt_embeds=pos, num_frames=frames, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
             mode=mode, output_type=output_type, on_frames=blocks.append, progress=False)
    assert isinstance(err.value, NonFiniteOutputError)
    assert f"first at {named}, counting from 0" in str(err.value)
    assert "float16" not in str(err.value)
    # streaming hands out the finite first chunk (latent frames 0-1) only; the other modes nothing
    handed = [len(b) for b in blocks]
    assert handed == ([5 if vae else 2] if mode == "streaming" and output_type == "np" else [])


def test_float16_error_points_to_bfloat16():
    pipe = nan_feature_map_pipe(vae=False, dtype=torch.float16)
    with pytest.raises(NonFiniteOutputError, match="float16, whose range ends at 65504: use bfloat16 or float32"):
        pipe(prompt_embeds=embeds()[0].half(), num_frames=6, height=32, width=32, num_inference_steps=1,
             guidance_scale=1.0, mode="streaming", progress=False)


@pytest.mark.parametrize("mode", ["parallel", "streaming"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_decoded_frames_are_refused(causal_pipe, monkeypatch, mode, bad):
    """Finite latents, but the VAE decodes latent frame 2 to NaN or Inf (Inf would be clamped to a white frame)."""
    decoder = causal_pipe.vae.decoder
    real, calls = decoder.forward, []

    def forward(x, *args, **kwargs):  # StreamingDecoder calls it once per latent frame, in order
        calls.append(1)
        out = real(x, *args, **kwargs)
        return out + bad if len(calls) == 3 else out

    monkeypatch.setattr(decoder, "forward", forward)
    blocks = []
    with pytest.raises(NonFiniteOutputError, match="the VAE decoded NaN or Inf, first at video frame 5 "
                                                   "\\(latent frame 2\\), counting from 0"):
        causal_pipe(prompt_embeds=embeds()[0], num_frames=13, height=32, width=32, num_inference_steps=1,
                    guidance_scale=1.0, mode=mode, on_frames=blocks.append, progress=False)
    assert [len(b) for b in blocks] == ([5] if mode == "streaming" else [])


def test_check_finite_names_the_first_bad_frame():
    x = torch.zeros(2, 3, 6, 2, 2)
    check_finite(x, kind="latents", frame_start=0, temporal=4)  # finite: no error
    x[1, 2, 4, 1, 0] = float("-inf")
    x[0, 0, 5, 0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="latents hold NaN or Inf, first at video frame 25 \\(latent "
                                                   "frame 7, which decodes to video frames 25-28\\)"):
        check_finite(x, kind="latents", frame_start=3, temporal=4)
    with pytest.raises(NonFiniteOutputError, match="first at video frame 7 \\(latent frame 2\\)"):
        check_finite(x, kind="frames", frame_start=3, temporal=4)


def test_shipped_student_in_float16_matches_float32():
    """Issue 15: the shipped student in float16 gave NaN latents from frame 4 on (its linear branch overflowed
    float16 from the second chunk); now it follows float32 to float16's rounding (measured: 6e-3 at most)."""
    from rehyat.assets import default_model

    latents, embeds_ = {}, None
    for dtype in (torch.float32, torch.float16):
        pipe = ReHyAtVideoPipeline.from_pretrained(default_model("student"), torch_dtype=dtype)
        if embeds_ is None:
            embeds_ = pipe.encode_prompt(["a red circle moving right"]).float()
        latents[dtype] = pipe(prompt_embeds=embeds_, num_frames=16, num_inference_steps=1, guidance_scale=1.0,
                              mode="streaming", output_type="latent", progress=False).latents
    torch.testing.assert_close(latents[torch.float16], latents[torch.float32], rtol=0, atol=3e-2)


# ----------------------------------------------------------------------------------------------------------------
# Prompt schedule (issue 18): the text conditioning changes at a chunk, the states carry over
# ----------------------------------------------------------------------------------------------------------------
SCHEDULE_ARGS = dict(num_frames=21, height=32, width=32, num_inference_steps=2, seed=4, progress=False)


@pytest.mark.parametrize("mode", ["recurrent", "streaming"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_prompt_schedule_switches_at_the_chunk(causal_pipe, mode, guidance, single_thread):
    """21 frames = 6 latent frames in chunks of 2 (frames 0-4, 5-12, 13-20); a switch at frame 5 leaves the first
    chunk as the single-prompt run's (the same computation: bitwise) and changes the later ones. A start frame
    inside a chunk (7) takes effect from the chunk's first frame: the same video."""
    a, neg = embeds(0)
    b, _ = embeds(1)
    kw = dict(SCHEDULE_ARGS, negative_prompt_embeds=neg, guidance_scale=guidance, mode=mode)
    single = causal_pipe(prompt_embeds=a, **kw)
    switched = causal_pipe(prompt_schedule=[(0, a), (5, b)], **kw)
    assert torch.equal(switched.latents[:, :, :2], single.latents[:, :, :2])
    assert np.array_equal(switched.video[:5], single.video[:5])
    for f0 in (2, 4):
        change = (switched.latents[:, :, f0 : f0 + 2] - single.latents[:, :, f0 : f0 + 2]).abs().mean()
        assert change > 0.05 * single.latents.abs().mean()
    snapped = causal_pipe(prompt_schedule=[(0, a), (7, b)], **kw)
    assert torch.equal(snapped.latents, switched.latents)


def test_prompt_schedule_same_in_recurrent_and_streaming(causal_pipe, single_thread):
    """The per-chunk conditioning is one parameter of both loops: the modes still agree (up to rounding)."""
    a, neg = embeds(0)
    b, _ = embeds(1)
    kw = dict(SCHEDULE_ARGS, prompt_schedule=[(0, a), (13, b)], negative_prompt_embeds=neg, guidance_scale=3.0)
    rec = causal_pipe(mode="recurrent", **kw)
    stream = causal_pipe(mode="streaming", **kw)
    assert_outputs_close(stream.latents, rec.latents)


def test_prompt_schedule_with_text(tmp_path, single_thread):
    """Prompts as text: a one-prompt schedule is the plain run (bitwise), a switch changes the later chunks."""
    pipe = ReHyAtVideoPipeline.from_pretrained(tiny_pipeline_folder(tmp_path / "m", vae=False))  # chunks of 2
    kw = dict(num_frames=8, height=32, width=32, num_inference_steps=2, guidance_scale=2.0, mode="streaming",
              progress=False)
    plain = pipe("a red circle", **kw)
    assert torch.equal(pipe(prompt_schedule=[(0, "a red circle")], **kw).latents, plain.latents)
    switched = pipe(prompt_schedule=[(0, "a red circle"), (4, "a blue square moving up")], **kw)
    assert torch.equal(switched.latents[:, :, :4], plain.latents[:, :, :4])
    assert not torch.equal(switched.latents[:, :, 4:], plain.latents[:, :, 4:])


@pytest.mark.parametrize("schedule, kwargs, match", [
    ([], {}, "prompt_schedule must be a non-empty list"),
    ([(1, "A")], {}, "prompt_schedule entry 0: the first prompt must start at frame 0, got 1"),
    ([(0, "A"), (13, "B"), (5, "A")], {}, "entry 2: start frame 5 does not come after entry 1's 13"),
    ([(0, "A"), (5, "B"), (5, "A")], {}, "entry 2: start frame 5 does not come after entry 1's 5"),
    ([(0, "A"), (21, "B")], {}, "entry 1: start frame 21 is past the video's last frame 20 \\(21 frames\\)"),
    ([(0, "A"), (5, " ")], {}, "entry 1: the prompt must be a non-empty string"),
    ([(0, "A"), (-3, "B")], {}, "entry 1: the start frame must be an int >= 0, got -3"),
    ([(0, "A"), (5, "B"), (9, "A")], {}, "entry 2: start frame 9 is in the chunk of frames 5-12, as entry 1's 5 is"),
    ([(0, "A"), (3, "B")], {}, "entry 1: start frame 3 is in the chunk of frames 0-4, as entry 0's 0 is"),
    ([(0, "A")], dict(mode="parallel"), "prompt_schedule needs mode 'recurrent' or 'streaming'"),
    ([(0, "A")], dict(prompt="a cat"), "pass prompt_schedule or prompt / prompt_embeds, not both"),
])
def test_bad_prompt_schedule_refused_before_any_work(causal_pipe, schedule, kwargs, match):
    a, b = embeds(0)
    named = {"A": a, "B": b}
    schedule = [(s, named.get(p, p)) for s, p in schedule]

    def no_forward(*args):
        raise AssertionError("the transformer ran before the check")

    hook = causal_pipe.transformer.register_forward_pre_hook(no_forward)
    try:
        with pytest.raises(ValueError, match=match) as info:
            causal_pipe(prompt_schedule=schedule, **(dict(SCHEDULE_ARGS, mode="streaming") | kwargs))
    finally:
        hook.remove()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Continuing a video (issue 18): 21 frames = 6 latent frames in chunks of 2; the first 13 frames are 2 chunks
# ----------------------------------------------------------------------------------------------------------------
CONTINUE_ARGS = dict(num_frames=21, height=32, width=32, num_inference_steps=3, mode="streaming", progress=False)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_continuing_own_latents_gives_the_one_run_video(causal_pipe, guidance, single_thread):
    """The model's own first 2 chunks, same seed and prompt (a schedule too): the whole one-run video, bitwise
    (the same computation on one object)."""
    a, neg = embeds(0)
    b, _ = embeds(1)
    kw = dict(CONTINUE_ARGS, prompt_schedule=[(0, a), (13, b)], negative_prompt_embeds=neg, guidance_scale=guidance,
              seed=4)
    one = causal_pipe(**kw)
    for given in (2, 4):
        cont = causal_pipe(init_latents=one.latents[:, :, :given].clone(), **kw)
        assert torch.equal(cont.latents, one.latents)
        assert np.array_equal(cont.video, one.video)


def test_continuation_follows_the_given_latents(causal_pipe, single_thread):
    """The given chunks' states come from the given latents: nearly the model's own (1e-4 off) continue nearly
    as the one run; another video's continue differently; the given latents come back as they are."""
    a, neg = embeds(0)
    kw = dict(CONTINUE_ARGS, prompt_embeds=a, negative_prompt_embeds=neg, guidance_scale=3.0, seed=4)
    one = causal_pipe(**kw)
    g = torch.Generator().manual_seed(1)
    near = one.latents[:, :, :4] + 1e-4 * torch.randn(one.latents[:, :, :4].shape, generator=g)
    other = causal_pipe(**(kw | dict(seed=5, output_type="latent"))).latents[:, :, :4]
    diffs = {}
    for name, given in (("near", near), ("other", other)):
        cont = causal_pipe(init_latents=given, **kw)
        assert torch.equal(cont.latents[:, :, :4], given)
        diffs[name] = ((cont.latents[:, :, 4:] - one.latents[:, :, 4:]).norm() / one.latents[:, :, 4:].norm()).item()
    assert diffs["near"] < 1e-5 and diffs["other"] > 1e-3  # measured: 7e-7 and 1e-2


def test_continuation_starts_with_the_vae_round_trip_of_the_given_video(causal_pipe, single_thread):
    a, neg = embeds(0)
    kw = dict(CONTINUE_ARGS, prompt_embeds=a, negative_prompt_embeds=neg, guidance_scale=3.0)
    given = causal_pipe(**(kw | dict(seed=5))).video[:13]
    del kw["height"], kw["width"]  # they default to the given video's size
    out = causal_pipe(init_video=given, seed=4, **kw)
    latents = causal_pipe.encode_video(given)
    assert latents.shape == (1, 16, 4, 4, 4) and torch.equal(out.latents[:, :, :4], latents)
    assert np.array_equal(out.video[:13], causal_pipe.decode_latents(latents))
    assert out.video.shape == (21, 32, 32, 3)


def test_pixel_space_continuation_of_own_frames(single_thread):
    """Without a VAE the given frames are the latents in [-1, 1]: the output starts with them exactly, and the
    model's own frames (rounded to 8 bits) continue as the one run, up to that rounding's effect."""
    pipe = ReHyAtVideoPipeline(convert_wan(tiny_wan_transformer(in_channels=3), blocks="all", chunk_frames=2,
                                           overlap_frames=1))
    kw = dict(prompt_embeds=embeds(0)[0], num_frames=8, height=16, width=16, num_inference_steps=3,
              guidance_scale=1.0, seed=2, mode="streaming", progress=False)
    one = pipe(**kw)
    cont = pipe(init_video=one.video[:4], **kw)
    assert np.array_equal(cont.video[:4], one.video[:4])
    assert np.abs(cont.video[4:].astype(int) - one.video[4:].astype(int)).max() <= 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_video=np.zeros((10, 32, 32, 3), np.uint8)), "init_video has 10 frames; this model's VAE takes 4k\\+1 "
                                                            "frames \\(e.g. 9 or 13\\)"),
    (dict(init_video=np.zeros((13, 32, 48, 3), np.uint8)), "init_video is 48x32 \\(width x height\\), the video to "
                                                            "generate 32x32"),
    (dict(init_video=np.zeros((9, 32, 32, 3), np.uint8)), "init_video holds 9 video frames \\(3 latent frames\\): a "
                                                           "continuation starts from whole chunks of 2 latent frames, "
                                                           "i.e. 5, 13, 21, ... video frames"),
    (dict(init_video=np.zeros((21, 32, 32, 3), np.uint8)), "init_video holds 21 video frames, the video to generate "
                                                            "21: nothing is left to generate"),
    (dict(init_video=np.zeros((13, 32, 32, 3), np.float32)), "init_video must be uint8 frames \\[F, H, W, 3\\]"),
    (dict(init_latents=torch.zeros(1, 16, 4, 4, 2)), "init_latents has shape \\[1, 16, 4, 4, 2\\], expected "
                                                     "\\[1, 16, F, 4, 4\\]"),
    (dict(init_latents=torch.zeros(1, 3, 4, 4, 4)), "init_latents has shape \\[1, 3, 4, 4, 4\\], expected "),
    (dict(init_latents=torch.full((1, 16, 2, 4, 4), float("nan"))), "init_latents hold NaN or Inf"),
    (dict(init_latents=torch.zeros(1, 16, 2, 4, 4), mode="recurrent"), "init_latents continues a video in mode "
                                                                       "'streaming'.*got mode 'recurrent'"),
    (dict(init_latents=torch.zeros(1, 16, 2, 4, 4), mode="parallel"), "got mode 'parallel'"),
    (dict(init_latents=torch.zeros(1, 16, 2, 4, 4), init_video=np.zeros((5, 32, 32, 3), np.uint8)),
     "pass init_latents or init_video, not both"),
])
def test_bad_continuation_refused_before_any_work(causal_pipe, kwargs, match):
    def no_forward(*args):
        raise AssertionError("the model ran before the check")

    hooks = [causal_pipe.transformer.register_forward_pre_hook(no_forward),
             causal_pipe.vae.register_forward_pre_hook(no_forward)]
    args = dict(CONTINUE_ARGS, prompt_embeds=embeds(0)[0], seed=0) | kwargs
    try:
        with pytest.raises(ValueError, match=match) as info:
            causal_pipe(**args)
    finally:
        for hook in hooks:
            hook.remove()
    assert "\n" not in str(info.value)


def test_shipped_student_follows_a_background_switch(single_thread):
    """The embedded world (issue 18): the shipped student, grey background switched to white at frame 8 (chunks of 4
    frames). Frames 0-7 are the single-prompt run's; the background turns white in the chunk of the switch (the
    student shipped 2026-12-04; measured over seeds 0-7: 0.93-0.99 of the pixels of frames 8-11 and 0.99-1.00 of
    frames 12-15 white), never in the single run."""
    from rehyat.assets import default_model
    from rehyat.world import check_video

    pipe = ReHyAtVideoPipeline.from_pretrained(default_model("student"))
    grey, white = (f"a red circle moving right on a {bg} background" for bg in ("grey", "white"))
    kw = dict(num_frames=16, seed=0, mode="streaming", progress=False)
    single = pipe(grey, **kw).video
    switched = pipe(prompt_schedule=[(0, grey), (8, white)], **kw).video
    assert np.array_equal(switched[:8], single[:8])  # one object, the same computation
    assert check_video(switched[8:], white)["background_correct"] == 1.0
    assert check_video(single[8:], white)["background_correct"] == 0.0
    assert check_video(single[12:], grey)["background_correct"] == 1.0


@pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only wait on each other
@pytest.mark.parametrize("mode", ["recurrent", "streaming"])
def test_generation_checks_the_transformer_once(causal_pipe, monkeypatch, mode):
    """The pipeline checks that its transformer can run chunk by chunk once, before any work; the runner does not
    check it again at each denoising step and chunk."""
    from rehyat.models import check_recurrent, runner
    from rehyat.pipelines import video

    calls = []
    count = lambda m: calls.append(m) or check_recurrent(m)  # noqa: E731
    monkeypatch.setattr(video, "check_recurrent", count)
    monkeypatch.setattr(runner, "check_recurrent", count)
    pos, _ = embeds()
    causal_pipe(prompt_embeds=pos, num_frames=13, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                mode=mode, progress=False)  # 4 latent frames: 2 chunks, 2 steps
    assert calls == [causal_pipe.transformer]

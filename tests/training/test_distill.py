"""Stage 1: attention distillation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from rehyat.cli import main
from rehyat.training import distill

# tiny geometry: pixel-space latents [3, 4, 4, 4] (no VAE): 4 frames of 4 tokens
GEOM = dict(frames=4, height=4, width=4)


def _weights(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("softmax_blocks", ["bidirectional", "chunk_causal"])
def test_teacher_forcing_output_equals_teacher(softmax_blocks):
    from rehyat.models import convert_wan, get_context
    from rehyat.testing import assert_outputs_close, tiny_wan_transformer

    t = tiny_wan_transformer(num_layers=3)
    s = convert_wan(copy.deepcopy(t), blocks=[0, 2], chunk_frames=2, overlap_frames=1, softmax_blocks=softmax_blocks)
    x, ts, e = torch.randn(2, 16, 5, 4, 4), torch.tensor([700.0, 300.0]), torch.randn(2, 8, 64)
    ctx = get_context(s)
    with torch.no_grad():
        ref = t(x, ts, e, return_dict=False)[0]
        student = s(x, ts, e, return_dict=False)[0]
        ctx.distill = True
        try:
            forced = s(x, ts, e, return_dict=False)[0]
        finally:
            ctx.distill = False
    # two model objects and two code paths (the processor's own RoPE and SDPA call): equal up to float32 rounding
    assert_outputs_close(forced, ref)
    assert not torch.allclose(student, ref, atol=1e-3)  # without teacher forcing the student differs
    assert set(ctx.records) == {0, 2}


def test_one_teacher_forward_trains_every_block(teacher, prompts):
    """One Distiller step = one transformer forward; every converted block gets gradients and changes."""
    from rehyat.models import convert_wan
    from rehyat.training import Distiller, TeacherTrajectories, prepare_for_distillation, resolve_prompt_pool
    from rehyat.training.components import load_model_folder
    from rehyat.training.distributed import DistEnv

    pipe = load_model_folder(teacher)
    model = convert_wan(pipe.transformer, blocks="all", chunk_frames=1, overlap_frames=0)
    params = prepare_for_distillation(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    pool = resolve_prompt_pool(teacher, prompts=prompts)
    traj = TeacherTrajectories(pipe.scheduler, pool, (3, 4, 4, 4), batch_size=2, sampling_steps=3, guidance_scale=5.0,
                               seed=0, env=DistEnv())
    d = Distiller(model, traj, lr=1e-2)
    rec = d.step()
    assert len(calls) == 1
    assert set(rec) == {0, 1}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert ".processor.feature_map_" in n or n.endswith(".processor.linear_log_scale")
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, frozen[n]), n
    assert len(params) == 18  # 2 blocks x (2 maps x (w1, b1, w2, b2) + the linear log-scale)


def test_distillation_lowers_block_error_and_changes_only_feature_maps(root, teacher, prompts, tmp_path):
    out = tmp_path / "student"
    res = distill(teacher, out, prompts=prompts, **GEOM, chunk_frames=1, overlap_frames=0, causal=False,
                  sampling_steps=4, steps=120, lr=3e-3, batch_size=2, seed=0, progress=False, checkpoint_every=120)
    assert set(res.before) == set(res.after) == {0, 1}
    for b in (0, 1):
        # held-out trajectories, same ones before and after: the error must drop clearly
        assert res.after[b]["rel_error"] < 0.9 * res.before[b]["rel_error"], (b, res.before[b], res.after[b])
    # teacher weights bit-identical, feature maps trained
    t, s = _weights(teacher), _weights(out)
    fm = {k for k in s if ".processor.feature_map_" in k or k.endswith(".processor.linear_log_scale")}
    assert fm and set(s) - fm == set(t)
    for k in t:
        assert torch.equal(s[k], t[k]), k
    # the model folder is complete and loads
    from rehyat.pipelines import ReHyAtVideoPipeline

    pipe = ReHyAtVideoPipeline.from_pretrained(out)
    assert pipe.has_text_encoder and pipe.transformer.rehyat_config.blocks == [0, 1]
    report = json.loads((out / "distill_report.json").read_text())
    assert report["mean_rel_error_after"] < report["mean_rel_error_before"]
    assert "| block |" in (out / "distill_report.md").read_text()
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 121))
    assert set(log[0]["rel_error"]) == {"0", "1"} and "samples_per_s" in log[-1] and "peak_mem_gib" in log[-1]


def test_distill_cli_best_n_and_resume_equals_uninterrupted(teacher, prompts, tmp_path, capsys):
    common = ["distill", "--model", str(teacher), "--prompts", str(prompts), "--frames", "4", "--height", "4",
              "--width", "4", "--sampling-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--chunk-frames", "2",
              "--blocks", "best:1", "--rank-steps", "2", "--no-progress", "--checkpoint-every", "3",
              "--eval-trajectories", "0"]
    assert main(common + ["--steps", "7", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "| block |" in printed
    report = json.loads((tmp_path / "a" / "distill_report.json").read_text())
    ranked = report["ranking"]["errors"]
    best = min(ranked, key=lambda b: ranked[b]["rel_error"])
    assert list(report["blocks"]) == [best]

    # killed after step 4 (last checkpoint at 3; not Ctrl-C, which saves step 4), then resumed
    def kill(step, rec):
        if step == 4:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        distill(teacher, tmp_path / "b", prompts=prompts, **GEOM, chunk_frames=2, blocks="best:1", rank_steps=2,
                sampling_steps=3, batch_size=2, lr=1e-2, steps=7, checkpoint_every=3, eval_trajectories=0,
                progress=False, callback=kill)
    assert main(common + ["--steps", "7", "--out", str(tmp_path / "b"), "--resume"]) == 0
    la = (tmp_path / "a" / "train" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "train" / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("samples_per_s", "step_s", "peak_mem_gib")}
                           for x in lines]  # noqa: E731
    assert strip(la) == strip(lb)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

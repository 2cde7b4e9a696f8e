"""Stage 1: attention distillation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rehyat.cli import main
from rehyat.testing import folder_weights, train_log
from rehyat.training import distill

# tiny geometry: pixel-space latents [3, 4, 4, 4] (no VAE): 4 frames of 4 tokens
GEOM = dict(frames=4, height=4, width=4)


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
    t, s = folder_weights(teacher), folder_weights(out)
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
    assert train_log(tmp_path / "a") == train_log(tmp_path / "b")
    wa, wb = folder_weights(tmp_path / "a"), folder_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------------------------
# The linear branch's share of the joint normaliser: calibration, diagnostic, warnings
# ----------------------------------------------------------------------------------------------------------------
def _distill_module():
    import importlib

    return importlib.import_module("rehyat.training.distill")  # rehyat.training.distill is also the function


def _converted_teacher(folder, seed=0, **conversion):
    from rehyat.models import convert_wan
    from rehyat.training import prepare_for_distillation
    from rehyat.training.components import load_model_folder

    pipe = load_model_folder(folder)
    torch.manual_seed(seed)
    model = convert_wan(pipe.transformer, blocks="all", **conversion)
    prepare_for_distillation(model)
    return pipe, model


def _trajectories(folder, pipe, prompts, seed, frames=4):
    from rehyat.training import TeacherTrajectories, resolve_prompt_pool
    from rehyat.training.distributed import DistEnv

    pool = resolve_prompt_pool(folder, prompts=prompts)
    return TeacherTrajectories(pipe.scheduler, pool, (3, frames, 4, 4), batch_size=2, sampling_steps=3,
                               guidance_scale=5.0, seed=seed, env=DistEnv())


def _scales(model):
    return {b: model.blocks[b].attn1.processor.linear_log_scale.detach().clone() for b in range(len(model.blocks))}


def test_calibration_brings_the_linear_share_to_softmax_share(teacher, prompts):
    from rehyat.training import evaluate_blocks

    calibrate_linear_scale = _distill_module().calibrate_linear_scale
    pipe, model = _converted_teacher(teacher, chunk_frames=1, overlap_frames=0)
    before = evaluate_blocks(model, _trajectories(teacher, pipe, prompts, seed=1))
    for b, r in before.items():  # fresh feature maps: the linear branch swamps the window
        assert r["linear_share"] > 0.95 and r["linear_share"] - r["teacher_share"] > 0.3, (b, r)
    scales = _scales(model)
    gaps = calibrate_linear_scale(model, _trajectories(teacher, pipe, prompts, seed=2))
    assert set(gaps) == {0, 1} and all(len(g) == 2 and all(x < -1 for x in g) for g in gaps.values()), gaps
    for b, g in gaps.items():  # the returned change is what was added to each head's scale
        torch.testing.assert_close(_scales(model)[b] - scales[b], torch.tensor(g, dtype=torch.float32))
    after = evaluate_blocks(model, _trajectories(teacher, pipe, prompts, seed=1))  # the same held-out inputs
    for b, r in after.items():
        assert abs(r["linear_share"] - r["teacher_share"]) < 0.1, (b, r)
        assert r["teacher_share"] == pytest.approx(before[b]["teacher_share"], rel=1e-6)  # the teacher's, unchanged
        assert r["rel_error"] < 0.95 * before[b]["rel_error"], (b, before[b], r)


def test_calibration_leaves_alone_what_it_cannot_measure(teacher, prompts):
    from rehyat.training import evaluate_blocks

    m = _distill_module()
    _, no_scale = _converted_teacher(teacher, chunk_frames=1, overlap_frames=0, linear_scale=False)
    pipe, one_chunk = _converted_teacher(teacher, chunk_frames=4, overlap_frames=1)  # 4 frames: no linear keys
    assert m.calibrate_linear_scale(no_scale, _trajectories(teacher, pipe, prompts, seed=2)) == {}
    gaps = m.calibrate_linear_scale(one_chunk, _trajectories(teacher, pipe, prompts, seed=2))
    assert gaps == {0: [0.0, 0.0], 1: [0.0, 0.0]}
    assert all(torch.equal(s, torch.zeros(2)) for s in _scales(one_chunk).values())
    rec = evaluate_blocks(one_chunk, _trajectories(teacher, pipe, prompts, seed=1))
    assert all(r[k] != r[k] for r in rec.values() for k in m.MASS_KEYS)  # NaN: nothing measured
    assert m.mass_warnings(rec) == []


def test_mass_warnings_lists_exactly_the_blocks_beyond_the_gap():
    mass_warnings = _distill_module().mass_warnings
    records = {
        0: {"l1": 1.0, "linear_share": 0.99, "teacher_share": 0.40},  # 0.59 apart
        1: {"l1": 1.0, "linear_share": 0.50, "teacher_share": 0.40},  # 0.10
        2: {"l1": 1.0, "linear_share": 0.20, "teacher_share": 0.40},  # 0.20, the linear branch too small
        3: {"l1": 1.0},  # not measured
        4: {"l1": 1.0, "linear_share": float("nan"), "teacher_share": float("nan")},  # no query had linear keys
        5: {"l1": 1.0, "linear_share": 0.54, "teacher_share": 0.40},  # 0.14
    }
    warned = mass_warnings(records)
    assert [w.split(":")[0] for w in warned] == ["block 0", "block 2"]
    assert "0.990" in warned[0] and "0.400" in warned[0] and "\n" not in warned[0]
    assert [w.split(":")[0] for w in mass_warnings(records, gap=0.12)] == ["block 0", "block 2", "block 5"]
    assert mass_warnings(records, gap=0.6) == []


def _md_rows(md: str) -> dict[int, list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ") and "block" not in line]
    return {int(r[0]): [c.strip() for c in r] for r in rows if r[0].strip().isdigit()}


def test_distill_reports_and_logs_the_mass_diagnostic(teacher, prompts, tmp_path, monkeypatch, capsys):
    m = _distill_module()
    real = m.mass_warnings
    gaps = {}

    def one_warning(records):  # a gap between the two blocks' (calibrated, small) gaps: the larger one is warned
        gaps.update({b: abs(r["linear_share"] - r["teacher_share"]) for b, r in records.items()})
        return real(records, gap=min(gaps.values()))

    monkeypatch.setattr(m, "mass_warnings", one_warning)
    out = tmp_path / "student"
    steps, lr = 4, 1e-3
    res = distill(teacher, out, prompts=prompts, **GEOM, chunk_frames=1, overlap_frames=0, sampling_steps=2,
                  steps=steps, lr=lr, batch_size=2, mass_every=2, checkpoint_every=steps, progress=False)
    # the report: mass columns before / after, softmax's share and the bidirectional teacher's mass
    md = (out / "distill_report.md").read_text()
    assert "| linear share before | linear share after | softmax share | teacher mass |" in md
    rows = _md_rows(md)
    assert set(rows) == {0, 1}
    for b, row in rows.items():
        assert row[7:11] == [f"{res.before[b]['linear_share']:.4f}", f"{res.after[b]['linear_share']:.4f}",
                             f"{res.after[b]['teacher_share']:.4f}", f"{res.after[b]['teacher_mass']:.4f}"]
        assert res.before[b]["linear_share"] > 0.95 and abs(res.after[b]["linear_share"]
                                                            - res.after[b]["teacher_share"]) < 0.1
        assert res.after[b]["teacher_mass"] < res.after[b]["teacher_share"]  # it also attends to future frames
    report = json.loads((out / "distill_report.json").read_text())
    for b in ("0", "1"):
        assert all(set(m.MASS_KEYS) <= set(report["blocks"][b][when]) for when in ("before", "after"))
    # warnings: exactly the blocks past the gap, in the JSON, the Markdown and on stdout
    expected = real(res.after, gap=min(gaps.values()))
    assert len(expected) == 1 and expected[0].startswith(f"block {max(gaps, key=gaps.get)}:")
    assert report["mass_warnings"] == expected
    assert [line[len("- warning: "):] for line in md.splitlines() if line.startswith("- warning: ")] == expected
    printed = capsys.readouterr().out
    assert "rehyat distill: warning:" in printed and expected[0] in printed
    # the calibration: one log scale per head and block, and what the saved student's scales started from
    cal = report["linear_log_scale_calibration"]
    assert set(cal) == {"0", "1"} and all(len(g) == 2 and all(x < -1 for x in g) for g in cal.values())
    saved = folder_weights(out)
    for b, g in cal.items():
        trained = saved[f"blocks.{b}.attn1.processor.linear_log_scale"]
        assert (trained - torch.tensor(g)).abs().max() <= 1.5 * steps * lr, (trained, g)  # Adam moves ~lr a step
    # the log: the mass diagnostic on steps 1, 3 (every mass_every steps, the first included)
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        measured = r["step"] in (1, 3)
        assert ("linear_share" in r) == measured and ("teacher_share" in r) == measured, r
        if measured:
            assert set(r["linear_share"]) == set(r["teacher_share"]) == {"0", "1"}
    assert [set(h[0]) >= {"linear_share"} for h in res.history] == [True, False, True, False]


def test_mass_every_zero_logs_none(teacher, prompts, tmp_path):
    res = distill(teacher, tmp_path / "s", prompts=prompts, **GEOM, chunk_frames=1, overlap_frames=0,
                  sampling_steps=2, steps=2, batch_size=2, mass_every=0, eval_trajectories=0, progress=False)
    log = [json.loads(line) for line in (tmp_path / "s" / "train" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and not any("linear_share" in r for r in log)
    assert all("linear_share" not in h[0] for h in res.history)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_bad_mass_every_refused_up_front(teacher, prompts, tmp_path, capsys, no_weights, bad):
    with pytest.raises(ValueError, match="--mass-every"):
        distill(teacher, tmp_path / "o", prompts=prompts, **GEOM, mass_every=bad, progress=False)
    assert not (tmp_path / "o").exists()
    code = main(["distill", "--model", str(teacher), "--prompts", str(prompts), "--frames", "4", "--height", "4",
                 "--width", "4", "--out", str(tmp_path / "o"), "--mass-every", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--mass-every" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_short_distillation_calibrates_its_fresh_conversion(teacher, prompts):
    """short_distillation (best:N ranking, knapsack pricing) calibrates before its steps: with 0 steps its linear
    scales are the calibration of its feature maps on the calibration trajectory, redone here."""
    from rehyat.training import resolve_prompt_pool
    from rehyat.training.distributed import DistEnv

    m = _distill_module()
    conversion = m._conversion_kwargs(1, 0, True, "lse", "polynomial", None, "rotated", "bidirectional")
    pool = resolve_prompt_pool(teacher, prompts=prompts)
    errors, state = m.short_distillation(teacher, conversion, "all", pool, (3, 4, 4, 4), steps=0, lr=1e-3,
                                         batch_size=2, sampling_steps=2, guidance=5.0, seed=0, env=DistEnv(),
                                         dtype=torch.float32)
    pipe, model = _converted_teacher(teacher, chunk_frames=1, overlap_frames=0)
    with torch.no_grad():  # its feature maps, scales back at 0
        for n, p in model.named_parameters():
            if ".attn1.processor.feature_map_" in n:
                p.copy_(state[n])
    assert all(torch.equal(s, torch.zeros(2)) for s in _scales(model).values())
    calib = m.TeacherTrajectories(pipe.scheduler, pool, (3, 4, 4, 4), batch_size=2, sampling_steps=2,
                                  guidance_scale=5.0, seed=m.CALIBRATION_SEED_OFFSET, env=DistEnv())
    gaps = m.calibrate_linear_scale(model, calib)
    for b in (0, 1):
        got = state[f"blocks.{b}.attn1.processor.linear_log_scale"]
        torch.testing.assert_close(got, torch.tensor(gaps[b], dtype=torch.float32), rtol=1e-5, atol=1e-5)
        assert abs(errors[b]["linear_share"] - errors[b]["teacher_share"]) < 0.1, errors[b]


# ----------------------------------------------------------------------------------------------------------------
# Block-causal teachers (a model trained block-causal, rehyat finetune --chunk-causal)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def block_causal_teacher(root, teacher):
    """The tiny teacher made block-causal (chunks of 2 frames), saved as a model folder with its components."""
    from rehyat.models import convert_wan
    from rehyat.training.components import load_model_folder, save_model_folder

    folder = root / "block_causal_teacher"
    if not folder.exists():
        tr = load_model_folder(teacher).transformer
        convert_wan(tr, blocks=[], softmax_blocks="chunk_causal", chunk_frames=2)
        save_model_folder(tr, folder, components_from=teacher)
    return folder


def test_distill_a_block_causal_teacher(block_causal_teacher, prompts, tmp_path):
    from rehyat.models import get_context
    from rehyat.pipelines import ReHyAtVideoPipeline

    out = tmp_path / "student"
    # 6 frames, chunks of 2, overlap 1: the queries of chunk 1 have linear keys (frame 0) and future frames (4, 5)
    res = distill(block_causal_teacher, out, prompts=prompts, frames=6, height=4, width=4, chunk_frames=2,
                  overlap_frames=1, softmax_blocks="chunk_causal", sampling_steps=2, steps=2, batch_size=2,
                  progress=False)
    report = json.loads((out / "distill_report.json").read_text())
    for b in ("0", "1"):
        after = report["blocks"][b]["after"]
        # the block-causal teacher attends to exactly the hybrid's keys: its mass on the linear keys is the share
        assert after["teacher_mass"] == pytest.approx(after["teacher_share"], rel=1e-12, abs=0)
        assert 0 < after["teacher_share"] < 1
    assert set(report["linear_log_scale_calibration"]) == {"0", "1"}
    pipe = ReHyAtVideoPipeline.from_pretrained(out)
    cfg = pipe.transformer.rehyat_config
    assert (cfg.blocks, cfg.softmax_blocks, cfg.chunk_frames, cfg.teacher_attention) == \
           ([0, 1], "chunk_causal", 2, "chunk_causal")
    assert get_context(pipe.transformer).teacher_chunk_frames == 2
    assert res.after[0]["rel_error"] < 1


def test_block_causal_teacher_with_other_settings_refused_up_front(block_causal_teacher, prompts, tmp_path, capsys,
                                                                  no_weights):
    common = ["--model", str(block_causal_teacher), "--prompts", str(prompts), "--frames", "6", "--height", "4",
              "--width", "4", "--out", str(tmp_path / "o")]
    for cmd, extra, named in [
        ("distill", ["--chunk-frames", "3", "--softmax-blocks", "chunk_causal"], "--chunk-frames 2"),
        ("distill", ["--chunk-frames", "2"], "--softmax-blocks chunk_causal"),
        ("convert", ["--chunk-frames", "1", "--softmax-blocks", "chunk_causal"], "--chunk-frames 2"),
    ]:
        code = main([cmd] + common + extra)
        err = capsys.readouterr().err
        assert code == 2 and named in err and str(block_causal_teacher) in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="--chunk-frames"):
        distill(block_causal_teacher, tmp_path / "o", prompts=prompts, frames=6, height=4, width=4, chunk_frames=3,
                softmax_blocks="chunk_causal", progress=False)


def test_resume_keeps_the_calibration(teacher, prompts, tmp_path):
    """A resumed run neither calibrates again (the trained scales come from the checkpoint) nor loses the
    calibration from its report."""
    kw = dict(prompts=prompts, **GEOM, chunk_frames=1, overlap_frames=0, sampling_steps=2, steps=3, batch_size=2,
              checkpoint_every=1, eval_trajectories=0, progress=False)
    distill(teacher, tmp_path / "a", **kw)

    def kill(step, rec):
        if step == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        distill(teacher, tmp_path / "b", callback=kill, **kw)
    distill(teacher, tmp_path / "b", resume=True, **kw)
    ra, rb = (json.loads((tmp_path / x / "distill_report.json").read_text()) for x in ("a", "b"))
    assert ra["linear_log_scale_calibration"] == rb["linear_log_scale_calibration"] is not None
    wa, wb = folder_weights(tmp_path / "a"), folder_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k.endswith("linear_log_scale"))


def test_an_already_converted_folder_is_not_calibrated_again(pixel_student, prompts, tmp_path):
    """Only a fresh conversion is calibrated: a converted folder's scales (here 0, as converted) are its own,
    and distillation only trains them."""
    steps, lr = 2, 1e-3
    distill(pixel_student, tmp_path / "s", prompts=prompts, **GEOM, sampling_steps=2, steps=steps, lr=lr,
            batch_size=2, eval_trajectories=0, progress=False)
    assert json.loads((tmp_path / "s" / "distill_report.json").read_text())["linear_log_scale_calibration"] is None
    before, after = folder_weights(pixel_student), folder_weights(tmp_path / "s")
    keys = [k for k in after if k.endswith(".attn1.processor.linear_log_scale")]
    assert len(keys) == 2
    for k in keys:
        assert torch.equal(before[k], torch.zeros(2)) and (after[k] - before[k]).abs().max() <= 1.5 * steps * lr


def test_distillation_loss_is_the_trainings(monkeypatch):
    """The attention processor computes the two outputs and the mass; the loss it backpropagates is the one
    distill_mode gets (issue 17: it was computed inside the processor): attention_distill_loss, the L1 output error
    plus mass_weight times the mass gap, gives the gradients of that formula written out here."""
    from functools import partial

    from rehyat.models import convert_wan, distill_mode
    from rehyat.training import attention_distill_loss
    from rehyat.training.common import feature_map_parameters
    from rehyat.testing import tiny_wan_transformer

    torch.manual_seed(0)
    s = convert_wan(tiny_wan_transformer(num_layers=3), blocks=[0, 2], chunk_frames=2, overlap_frames=1)
    params = [p for _, p in feature_map_parameters(s)]
    s.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    x, ts, e = torch.randn(1, 16, 5, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 64)
    with distill_mode(s, backward=True, mass_weight=0.5, loss=partial(attention_distill_loss, mass_weight=0.5)) as ctx:
        with torch.no_grad():
            s(x, ts, e, return_dict=False)
    grads = [p.grad.clone() for p in params]
    assert set(ctx.records) == {0, 2} and all(g.abs().sum() > 0 for g in grads)

    seen = []  # the blocks' outputs and masses, with their graphs; the loss returned here trains nothing

    def capture(student, teacher, mass):
        seen.append((student, teacher, mass))
        return torch.zeros(())  # no grad: nothing is backpropagated

    for p in params:
        p.grad = None
    with distill_mode(s, backward=True, mass_weight=0.5, loss=capture) as ctx:
        with torch.no_grad():
            s(x, ts, e, return_dict=False)
    assert all(p.grad is None for p in params)
    for (student, teacher, mass), block in zip(seen, (0, 2)):
        l1 = (student.float() - teacher.float()).abs().mean()
        assert float(l1) == ctx.records[block]["l1"]
        win, lin, t_lin = mass["window"], mass["linear"], mass["teacher_linear"]
        (l1 + 0.5 * (lin / (win + lin) - t_lin / (win + t_lin)).abs().mean().float()).backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)


def test_distillation_backward_without_a_loss_is_refused():
    from rehyat.models import convert_wan, distill_mode
    from rehyat.testing import tiny_wan_transformer

    s = convert_wan(tiny_wan_transformer(num_layers=2), blocks=[0], chunk_frames=2, overlap_frames=1)
    with pytest.raises(ValueError, match="loss"), distill_mode(s, backward=True):
        s(torch.randn(1, 16, 5, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 64), return_dict=False)


# ----------------------------------------------------------------------------------------------------------------
# Per-block overlap_frames (--block-overlap-frames)
# ----------------------------------------------------------------------------------------------------------------
def _distill_cli(teacher, prompts, out, *extra):
    return main(["distill", "--model", str(teacher), "--prompts", str(prompts), "--frames", "4", "--height", "4",
                 "--width", "4", "--sampling-steps", "2", "--batch-size", "2", "--steps", "1", "--chunk-frames", "1",
                 "--overlap-frames", "0", "--no-progress", "--out", str(out), *extra])


def test_block_overlap_frames_reach_the_saved_student_and_its_report(teacher, prompts, tmp_path, capsys):
    from rehyat.training.components import load_model_folder

    out = tmp_path / "wide"
    assert _distill_cli(teacher, prompts, out, "--blocks", "0,1", "--block-overlap-frames", "1=2") == 0
    printed = capsys.readouterr().out
    rc = json.loads((out / "transformer" / "rehyat_config.json").read_text())
    assert rc["blocks"] == [0, 1] and rc["overlap_frames"] == 0
    assert rc["block_settings"] == {"1": {"overlap_frames": 2}}
    tr = load_model_folder(out, device="cpu").transformer
    assert [tr.blocks[b].attn1.processor.overlap_frames for b in (0, 1)] == [0, 2]
    assert [tr.blocks[b].attn1.processor.chunk_frames for b in (0, 1)] == [1, 1]
    md = (out / "distill_report.md").read_text()
    rows = _md_rows(md)
    assert [rows[b][1:3] for b in (0, 1)] == [["1", "0"], ["1", "2"]]
    assert "| 1 | 1 | 2 |" in printed
    report = json.loads((out / "distill_report.json").read_text())
    assert [report["blocks"][b]["overlap_frames"] for b in ("0", "1")] == [0, 2]
    cfg = json.loads((out / "train" / "run_config.json").read_text())
    assert cfg["block_settings"] == {"1": {"overlap_frames": 2}}


def test_block_overlap_frames_bound_a_chunk_causal_softmax_block(teacher, prompts, tmp_path, capsys):
    # with --softmax-blocks chunk_causal an unconverted block may be named: its softmax window is bounded
    from rehyat.models.wan import ChunkCausalAttnProcessor
    from rehyat.training.components import load_model_folder

    out = tmp_path / "window"
    assert _distill_cli(teacher, prompts, out, "--blocks", "1", "--softmax-blocks", "chunk_causal",
                        "--block-overlap-frames", "0=2") == 0
    rc = json.loads((out / "transformer" / "rehyat_config.json").read_text())
    assert rc["blocks"] == [1] and rc["block_settings"] == {"0": {"overlap_frames": 2}}
    tr = load_model_folder(out, device="cpu").transformer
    p0 = tr.blocks[0].attn1.processor
    assert isinstance(p0, ChunkCausalAttnProcessor) and (p0.chunk_frames, p0.overlap_frames) == (1, 2)
    assert tr.blocks[1].attn1.processor.overlap_frames == 0
    code = _distill_cli(teacher, prompts, tmp_path / "o", "--blocks", "1", "--softmax-blocks", "chunk_causal",
                        "--block-overlap-frames", "7=2")
    err = capsys.readouterr().err
    assert code == 2 and "--block-overlap-frames names block 7: it must be one of the teacher's blocks" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("blocks, given, match", [
    ([0], {1: 12}, r"--block-overlap-frames names block 1, which is not converted: it must be one of --blocks \[0\]"),
    ([0, 1], {0: -1}, r"--block-overlap-frames: block 0 needs an int >= 0 of overlap frames, got -1"),
    ([0, 1], {0: 1.5}, r"--block-overlap-frames: block 0 needs an int >= 0"),
    ("best:1", {0: 12}, r"--block-overlap-frames needs the converted blocks named up front, not --blocks best:1"),
])
def test_bad_block_overlap_frames_refused_before_any_work(teacher, prompts, tmp_path, no_weights, blocks, given,
                                                         match):
    with pytest.raises(ValueError, match=match):
        distill(teacher, tmp_path / "o", prompts=prompts, **GEOM, blocks=blocks, block_overlap_frames=given,
                progress=False)
    assert not (tmp_path / "o").exists()


def test_block_overlap_frames_refused_for_an_already_converted_folder(pixel_student, prompts, tmp_path, no_weights):
    with pytest.raises(ValueError, match="--block-overlap-frames: .* is already converted"):
        distill(pixel_student, tmp_path / "o", prompts=prompts, **GEOM, block_overlap_frames={0: 2}, progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, expected", [
    ("0:12", "must be BLOCK=FRAMES,..."), ("0=x", "must be BLOCK=FRAMES,..."), ("0=12,", "must be BLOCK=FRAMES,..."),
    ("", "must be BLOCK=FRAMES,..."), ("0=12,0=3", "names block 0 twice"),
    ("1=12", "names block 1, which is not converted"),
])
def test_bad_block_overlap_frames_flag_refused(teacher, prompts, tmp_path, capsys, no_weights, flag, expected):
    code = _distill_cli(teacher, prompts, tmp_path / "o", "--blocks", "0", "--block-overlap-frames", flag)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("rehyat distill: error: --block-overlap-frames") and expected in err, err
    assert not (tmp_path / "o").exists()

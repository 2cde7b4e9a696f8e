"""Block selection: exact multiple-choice knapsack, FLOP model, `rehyat convert`."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rehyat.cli import main
from rehyat.training import attention_flops, brute_force_mckp, parse_candidates, solve_mckp


def test_knapsack_is_exact_against_brute_force():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        groups = rng.randint(1, 5)
        opts = [rng.randint(1, 4) for _ in range(groups)]
        errors = [[round(rng.random(), 3) for _ in range(o)] for o in opts]
        costs = [[rng.randint(0, 20) for _ in range(o)] for o in opts]
        budget = rng.randint(0, 60)
        ref = brute_force_mckp(errors, costs, budget)
        if ref is None:
            with pytest.raises(ValueError, match="no choice fits"):
                solve_mckp(errors, costs, budget)
            continue
        choice, err, cost = solve_mckp(errors, costs, budget)
        assert cost <= budget
        assert cost == sum(c[o] for c, o in zip(costs, choice))
        assert err == pytest.approx(sum(e[o] for e, o in zip(errors, choice)), abs=1e-12)
        assert err == pytest.approx(ref[1], abs=1e-9)
        checked += 1
    assert checked > 150


def test_knapsack_large_costs_are_exact():
    # FLOP-sized integer costs: exact integer arithmetic, no rounding of costs into units
    big = 10**15
    errors = [[0.0, 0.3, 0.2], [0.0, 0.1, 0.25], [0.0, 0.5, 0.4]]
    costs = [[10 * big, 3 * big + 1, 2 * big], [10 * big, 3 * big, 2 * big], [10 * big, 3 * big, 2 * big + 7]]
    for budget in (15 * big, 16 * big, 22 * big + 1, 23 * big + 1, 30 * big):
        ref = brute_force_mckp(errors, costs, budget)
        choice, err, cost = solve_mckp(errors, costs, budget)
        assert cost <= budget and err == pytest.approx(ref[1])


def test_flop_model():
    T, S, H, D = 6, 16, 2, 32
    teacher = attention_flops(T, S, H, D, None)
    assert teacher == 4 * (T * S) ** 2 * H * D
    linear_only = attention_flops(T, S, H, D, (T, 0)) - teacher  # one chunk: softmax part = the teacher
    assert linear_only > 0
    # smaller chunks -> fewer softmax FLOPs; overlap costs more
    assert attention_flops(T, S, H, D, (1, 0)) < attention_flops(T, S, H, D, (2, 0)) < attention_flops(T, S, H, D, (2, 1))
    causal = attention_flops(T, S, H, D, None, softmax=("chunk_causal", 2))
    assert causal < teacher and causal == sum(4 * 2 * S * e * S * H * D for e in (2, 4, 6))


def test_parse_candidates():
    assert parse_candidates("3,1;5,1;2,0") == [(3, 1), (5, 1), (2, 0)]
    for bad in ("3;1", "a,b", "0,1", "2,-1", ""):
        with pytest.raises(ValueError):
            parse_candidates(bad)


def test_convert_auto_budget_and_best_n(teacher, prompts, tmp_path, capsys):
    from rehyat.models import load_transformer

    # 6 frames of 64 tokens, small feature maps: converted blocks cost 0.27 to 0.66 of a softmax block
    args = ["convert", "--model", str(teacher), "--prompts", str(prompts), "--frames", "6", "--height", "16",
            "--width", "16", "--feature-map-kwargs", '{"feature_dim": 16}', "--rank-steps", "3",
            "--sampling-steps", "2", "--batch-size", "1", "--no-progress"]
    # auto: per-block choice among candidates and softmax under half the teacher's attention FLOPs
    assert main(args + ["--blocks", "auto", "--budget", "0.5", "--candidates", "1,0;2,1;4,0",
                        "--out", str(tmp_path / "auto")]) == 0
    assert "| block |" in capsys.readouterr().out
    sel = json.loads((tmp_path / "auto" / "selection.json").read_text())
    assert sel["total_flops"] <= sel["budget_flops"] == int(0.5 * sel["teacher_flops"])
    # the choice is the knapsack optimum over the measured errors
    opts = [b["options"] for b in sel["blocks"]]
    keys = list(opts[0])
    errors = [[o[k]["rel_error"] for k in keys] for o in opts]
    costs = [[o[k]["flops"] for k in keys] for o in opts]
    ref = brute_force_mckp(errors, costs, sel["budget_flops"])
    assert sel["total_error"] == pytest.approx(ref[1])
    rc = json.loads((tmp_path / "auto" / "transformer" / "rehyat_config.json").read_text())
    chosen = {str(b["block"]): b["choice"] for b in sel["blocks"] if b["choice"] != "softmax"}
    assert sorted(map(int, chosen)) == rc["blocks"]
    for b, (tc, to) in chosen.items():
        assert rc["block_settings"][b] == {"chunk_frames": tc, "overlap_frames": to}
    model = load_transformer(tmp_path / "auto")
    assert model.rehyat_config.blocks == rc["blocks"]
    # best:1 with the default setting
    assert main(args + ["--blocks", "best:1", "--chunk-frames", "2", "--out", str(tmp_path / "best")]) == 0
    # the unconverted block stays bidirectional softmax: the command says the model cannot stream, and the fix
    out = capsys.readouterr().out
    assert "keep bidirectional softmax attention" in out and "--softmax-blocks chunk_causal" in out
    sel = json.loads((tmp_path / "best" / "selection.json").read_text())
    errs = {b["block"]: b["options"]["2,1"]["rel_error"] for b in sel["blocks"]}
    rc = json.loads((tmp_path / "best" / "transformer" / "rehyat_config.json").read_text())
    assert rc["blocks"] == [min(errs, key=errs.get)] and rc["chunk_frames"] == 2
    # stage 1 continues from the converted folder: same blocks and settings, its feature maps as the start
    from rehyat.training import distill

    res = distill(tmp_path / "best", tmp_path / "distilled", prompts=prompts, frames=6, height=16, width=16,
                  sampling_steps=2, steps=2, eval_trajectories=1, progress=False)
    assert res.blocks == rc["blocks"]
    assert json.loads((tmp_path / "distilled" / "transformer" / "rehyat_config.json").read_text()) == rc
    # same held-out trajectories as convert's measurement: the 'before' error is that of convert's feature maps
    assert res.before[rc["blocks"][0]]["rel_error"] == pytest.approx(errs[rc["blocks"][0]], rel=1e-4)
    assert main(["distill", "--model", str(tmp_path / "best"), "--prompts", str(prompts), "--blocks", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "already converted" in capsys.readouterr().err
    # too small a budget is refused with the least reachable fraction, before any distillation or output folder
    assert main(args + ["--blocks", "auto", "--budget", "0.001", "--out", str(tmp_path / "none")]) == 2
    assert "cheapest candidate" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_check_budget():
    from rehyat.training.selection import check_budget

    kw = dict(num_blocks=4, softmax_flops=100, teacher_flops_per_block=100)
    check_budget(0.5, flops={(3, 1): 40, (1, 0): 20}, **kw)  # reachable, and softmax everywhere is not
    with pytest.raises(ValueError, match=r"cheapest candidate costs 0\.200"):
        check_budget(0.1, flops={(3, 1): 40, (1, 0): 20}, **kw)
    # converting costs more than softmax (short videos): said so, not a misleading "1.000"
    with pytest.raises(ValueError, match=r"costs more attention FLOPs than a softmax block \(the cheapest 1\.50x\)"):
        check_budget(0.5, flops={(3, 1): 150, (1, 0): 200}, **kw)
    # chunk-causal softmax blocks may already fit the budget: nothing would be converted
    with pytest.raises(ValueError, match="keeps every block softmax"):
        check_budget(0.5, flops={(3, 1): 20}, num_blocks=4, softmax_flops=40, teacher_flops_per_block=100)


def test_best_n_keeps_the_ranking_feature_maps_in_convert_and_distill(teacher, prompts, tmp_path):
    """``best:N`` has one behaviour: the chosen blocks start from the feature maps (and linear scales) that the
    ranking's short distillation trained, in ``rehyat convert`` and in ``rehyat distill`` alike; so distilling
    ``best:1`` from the teacher is ``convert --blocks best:1`` followed by distilling that folder."""
    from safetensors.torch import load_file

    from rehyat.training import convert_model, distill

    kw = dict(prompts=prompts, frames=4, height=4, width=4, sampling_steps=2, batch_size=2, lr=1e-2, seed=3,
              progress=False)
    conv = dict(chunk_frames=2, overlap_frames=1)
    _, sel = convert_model(teacher, tmp_path / "best", blocks="best:1", rank_steps=3, **conv, **kw)
    ranked = {c.block: c.options["2,1"]["rel_error"] for c in sel.choices}
    (block,) = sel.converted
    assert block == min(ranked, key=ranked.get)
    a = distill(tmp_path / "best", tmp_path / "a", steps=3, eval_trajectories=1, **kw)
    b = distill(teacher, tmp_path / "b", blocks="best:1", rank_steps=3, steps=3, eval_trajectories=1, **conv, **kw)
    assert a.blocks == b.blocks == [block]
    assert b.ranking["errors"][str(block)]["rel_error"] == pytest.approx(ranked[block], rel=1e-5)
    # distill's 'before' is measured on the held-out trajectories the ranking measured: the ranking's maps
    for res in (a, b):
        assert res.before[block]["rel_error"] == pytest.approx(ranked[block], rel=1e-4)
    wa, wb = (load_file(p / "transformer" / "diffusion_pytorch_model.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
    assert wa.keys() == wb.keys()
    for k in wa:  # the same computation in two runs (two model objects): float32 rounding apart at most
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_convert_block_overlap_frames_bound_a_softmax_block(teacher, prompts, tmp_path, capsys):
    # a plain conversion of a listed block, the others chunk-causal softmax, block 0's window bounded
    from rehyat.models import load_transformer
    from rehyat.models.wan import ChunkCausalAttnProcessor

    args = ["convert", "--model", str(teacher), "--chunk-frames", "2", "--overlap-frames", "1",
            "--softmax-blocks", "chunk_causal", "--no-progress"]
    assert main(args + ["--blocks", "1", "--block-overlap-frames", "0=3", "--out", str(tmp_path / "w")]) == 0
    rc = json.loads((tmp_path / "w" / "transformer" / "rehyat_config.json").read_text())
    assert rc["blocks"] == [1] and rc["block_settings"] == {"0": {"overlap_frames": 3}}
    p0 = load_transformer(tmp_path / "w" / "transformer").blocks[0].attn1.processor
    assert isinstance(p0, ChunkCausalAttnProcessor) and p0.overlap_frames == 3
    capsys.readouterr()
    # refused before anything is written: a ranked or budgeted choice, a block of no such window
    for extra, expected in ((["--blocks", "best:1", "--prompts", str(prompts), "--block-overlap-frames", "0=3"],
                             "--block-overlap-frames needs the converted blocks named up front, not --blocks best:1"),
                            (["--blocks", "1", "--block-overlap-frames", "9=3"],
                             "--block-overlap-frames names block 9: it must be one of the teacher's blocks")):
        assert main(args + extra + ["--out", str(tmp_path / "no")]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "no").exists()

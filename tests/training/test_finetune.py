"""Stage 2: flow-matching fine-tuning, LoRA, teacher-velocity loss, training from scratch, resume."""

from __future__ import annotations

import json

import pytest
import torch

from rehyat.testing import folder_weights, train_log
from rehyat.training import add_lora, finetune

def test_finetune_lowers_flow_matching_loss(pixel_student, pixel_dataset, tmp_path):
    res = finetune(tmp_path / "ft", model=pixel_student, data=pixel_dataset, steps=30, batch_size=4, lr=3e-3,
                   eval_batches=2, progress=False, log_every=10, checkpoint_every=30)
    # fixed samples, noise and noise levels before and after
    assert res.eval_after < 0.7 * res.eval_before, (res.eval_before, res.eval_after)
    log = train_log(tmp_path / "ft")
    assert [r["step"] for r in log] == list(range(1, 31)) and all("fm_loss" in r for r in log)
    report = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    assert report["samples_per_s"] > 0 and report["peak_mem_gib"] > 0
    from rehyat.pipelines import ReHyAtVideoPipeline

    pipe = ReHyAtVideoPipeline.from_pretrained(tmp_path / "ft")  # a complete model folder
    assert pipe.transformer.rehyat_config is not None and pipe.has_text_encoder


def test_lora_trains_only_adapters_and_feature_maps(pixel_student, pixel_dataset, tmp_path):
    from rehyat.models import load_transformer

    model = load_transformer(pixel_student)
    names = add_lora(model, 4)
    assert names and all(".lora_" in n or ".processor.feature_map_" in n or n.endswith(".processor.linear_log_scale")
                         for n in names)
    assert any(".processor.feature_map_" in n for n in names)
    wrapped = {n.split(".lora_")[0] for n in names if ".lora_" in n}
    assert len(wrapped) == 2 * 10  # per block: attn1 and attn2 q, k, v, out; FFN in and out

    finetune(tmp_path / "lora", model=pixel_student, data=pixel_dataset, steps=4, batch_size=2, lr=1e-2, lora_rank=4,
             eval_batches=0, progress=False)
    before, after = folder_weights(pixel_student), folder_weights(tmp_path / "lora")
    assert before.keys() == after.keys()  # adapters merged away: a plain converted checkpoint
    targets = ("to_q.", "to_k.", "to_v.", "to_out.0.", "ffn.net.0.proj.", "ffn.net.2.")
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if ".processor.feature_map_" in k or k.endswith(".processor.linear_log_scale"):
            assert changed, k
        elif any(t in k for t in targets) and k.endswith(".weight"):
            assert changed, k  # the merged adapter
        else:
            assert not changed, k  # biases, norms, embeddings, modulation: frozen
    load_transformer(tmp_path / "lora")


def test_teacher_velocity_loss_without_data(pixel_teacher, pixel_student, prompts, tmp_path):
    out = tmp_path / "tv"
    res = finetune(out, model=pixel_student, teacher=pixel_teacher, prompts=prompts, frames=4, height=8, width=8,
                   sampling_steps=4, guidance=3.0, steps=24, batch_size=2, lr=3e-3, progress=False, log_every=4)
    log = train_log(out)
    assert all("fm_loss" not in r and "teacher_loss" in r for r in log)
    per_traj = [sum(r["teacher_loss"] for r in log[i : i + 4]) for i in range(0, 24, 4)]  # same noise levels
    assert per_traj[-1] < 0.6 * per_traj[0], per_traj
    assert res.eval_before is None  # no data, nothing to evaluate on


def test_resume_equals_uninterrupted_with_data(pixel_student, pixel_dataset, tmp_path):
    kw = dict(model=pixel_student, data=pixel_dataset, steps=6, batch_size=2, lr=3e-3, warmup_steps=2,
              lr_schedule="cosine", text_dropout=0.3, checkpoint_every=2, eval_batches=0, progress=False, log_every=1)
    finetune(tmp_path / "a", **kw)

    def kill(step, loss):
        if step == 5:  # killed after step 5 (not Ctrl-C, which saves step 5); the last checkpoint is step 4
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        finetune(tmp_path / "b", callback=kill, **kw)
    assert len(train_log(tmp_path / "b")) >= 4
    finetune(tmp_path / "b", resume=True, **kw)
    assert train_log(tmp_path / "a") == train_log(tmp_path / "b")
    wa, wb = folder_weights(tmp_path / "a"), folder_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_mid_trajectory_equals_uninterrupted(pixel_teacher, pixel_student, prompts, tmp_path):
    kw = dict(model=pixel_student, teacher=pixel_teacher, prompts=prompts, frames=4, height=8, width=8,
              sampling_steps=4, steps=6, batch_size=2, lr=3e-3, checkpoint_every=3, progress=False, log_every=1)
    finetune(tmp_path / "a", **kw)

    def kill(step, loss):
        if step == 4:  # killed (not Ctrl-C, which saves step 4); the last checkpoint is step 3
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        finetune(tmp_path / "b", callback=kill, **kw)
    finetune(tmp_path / "b", resume=True, **kw)
    assert train_log(tmp_path / "a") == train_log(tmp_path / "b")
    wa, wb = folder_weights(tmp_path / "a"), folder_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_from_scratch_with_config(pixel_teacher, pixel_dataset, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2],
                               "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 3,
                               "out_channels": 3, "text_dim": 64, "freq_dim": 32, "ffn_dim": 64, "num_layers": 1}))
    from rehyat.cli import main

    assert main(["finetune", "--config", str(cfg), "--data", str(pixel_dataset), "--out", str(tmp_path / "s"),
                 "--steps", "20", "--batch-size", "4", "--lr", "3e-3", "--text-dropout", "0.1", "--no-progress"]) == 0
    rep = json.loads((tmp_path / "s" / "finetune_report.json").read_text())
    assert rep["flow_matching_eval_after"] < rep["flow_matching_eval_before"]
    tcfg = json.loads((tmp_path / "s" / "transformer" / "config.json").read_text())
    assert (tcfg["num_layers"], tcfg["attention_head_dim"], tcfg["in_channels"]) == (1, 16, 3)
    pcfg = json.loads((tmp_path / "s" / "rehyat_pipeline.json").read_text())
    assert pcfg["defaults"] == {"frames": 5, "height": 8, "width": 8} | pcfg["defaults"]
    assert pcfg["max_sequence_length"] == 8
    from rehyat.pipelines import ReHyAtVideoPipeline

    pipe = ReHyAtVideoPipeline.from_pretrained(tmp_path / "s")  # text encoder copied from the data's source model
    out = pipe("a red circle", num_frames=5, height=8, width=8, num_inference_steps=2, guidance_scale=2.0,
               progress=False)
    assert out.video.shape == (5, 8, 8, 3)


def test_gradient_checkpointing_gives_the_same_gradients():
    """The ReHyAt processors under diffusers' gradient checkpointing: recomputed in backward, same gradients."""
    import copy

    from rehyat.models import convert_wan
    from rehyat.testing import tiny_wan_transformer

    base = convert_wan(tiny_wan_transformer(in_channels=3), blocks=[0], chunk_frames=2, overlap_frames=1,
                       softmax_blocks="chunk_causal").train()
    x = torch.randn(2, 3, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    t, e = torch.tensor([300.0, 800.0]), torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    grads, calls = [], []
    for ckpt in (False, True):
        m = copy.deepcopy(base)
        n = [0]
        m.blocks[0].attn1.processor.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        if ckpt:
            m.enable_gradient_checkpointing()
        m(x, t, e, return_dict=False)[0].square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
        calls.append(n[0])
    assert calls == [1, 2]  # recomputed in backward: checkpointing is really on
    assert any(".processor.feature_map_" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_and_checkpointing_run(pixel_student, pixel_dataset, tmp_path):
    res = finetune(tmp_path / "bf16", model=pixel_student, data=pixel_dataset, steps=2, batch_size=2, lr=1e-3,
                   precision="bf16", gradient_checkpointing=True, eval_batches=1, progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    w = folder_weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in w.values())  # saved in float32


def _fresh_config(folder, num_layers=2):
    cfg = folder / "cfg.json"
    cfg.write_text(json.dumps({"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2],
                               "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 3,
                               "out_channels": 3, "text_dim": 64, "freq_dim": 32, "ffn_dim": 64,
                               "num_layers": num_layers}))
    return cfg


def _outputs_with_other_later_frames(transformer):
    """The transformer's outputs ``[1, 3, 5, 8, 8]`` on latents and on the same latents with frames 2-4 redrawn."""
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(1, 3, 5, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 8, 64, generator=g)
    later = x.clone()
    later[:, :, 2:] = torch.randn(1, 3, 3, 8, 8, generator=g)
    with torch.no_grad():
        return tuple(transformer(v, t, e, return_dict=False)[0] for v in (x, later))


def test_chunk_causal_trains_a_block_causal_model_that_streams(pixel_dataset, tmp_path):
    from rehyat.cli import main
    from rehyat.models import get_rehyat_config
    from rehyat.pipelines import ReHyAtVideoPipeline

    out = tmp_path / "causal"
    assert main(["finetune", "--config", str(_fresh_config(tmp_path)), "--data", str(pixel_dataset), "--out", str(out),
                 "--steps", "1", "--batch-size", "2", "--chunk-causal", "2", "--eval-batches", "0",
                 "--no-progress"]) == 0
    settings = json.loads((out / "transformer" / "rehyat_config.json").read_text())
    assert (settings["blocks"], settings["softmax_blocks"], settings["chunk_frames"]) == ([], "chunk_causal", 2)
    assert json.loads((out / "train" / "run_config.json").read_text())["chunk_causal"] == 2
    pipe = ReHyAtVideoPipeline.from_pretrained(out)
    cfg = get_rehyat_config(pipe.transformer)
    assert (cfg.blocks, cfg.softmax_blocks, cfg.chunk_frames) == ([], "chunk_causal", 2)
    y, y_later = _outputs_with_other_later_frames(pipe.transformer)
    # block-causal: the first chunk's output does not depend on later frames
    torch.testing.assert_close(y_later[:, :, :2], y[:, :, :2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y_later[:, :, 2:], y[:, :, 2:], atol=1e-3)
    # and it generates chunk by chunk: streaming and recurrent give the parallel video (float32 rounding over steps)
    kw = dict(num_frames=5, height=8, width=8, num_inference_steps=2, guidance_scale=2.0, seed=0, progress=False)
    videos = {m: pipe("a red circle moving left", mode=m, **kw).latents for m in ("parallel", "recurrent", "streaming")}
    assert videos["parallel"].shape == (1, 3, 5, 8, 8)
    for m in ("recurrent", "streaming"):
        torch.testing.assert_close(videos[m], videos["parallel"], rtol=1e-4, atol=1e-4, msg=m)


def test_without_chunk_causal_the_fresh_model_is_bidirectional(pixel_dataset, tmp_path):
    # the converse of the test above: without --chunk-causal the model is plain (and not streamable)
    from rehyat.models import load_transformer

    finetune(tmp_path / "plain", config=_fresh_config(tmp_path), data=pixel_dataset, steps=1, batch_size=2,
             eval_batches=0, progress=False)
    assert not (tmp_path / "plain" / "transformer" / "rehyat_config.json").exists()
    y, y_later = _outputs_with_other_later_frames(load_transformer(tmp_path / "plain" / "transformer"))
    assert not torch.allclose(y_later[:, :, :2], y[:, :, :2], atol=1e-3)


@pytest.mark.parametrize("how, value", [("model", 2), ("config", 0), ("config", -1), ("config", 1.5), ("config", "2")])
def test_bad_chunk_causal_refused_up_front(pixel_student, pixel_dataset, tmp_path, no_weights, how, value):
    source = dict(model=pixel_student) if how == "model" else dict(config=_fresh_config(tmp_path))
    with pytest.raises(ValueError, match="--chunk-causal") as e:
        finetune(tmp_path / "o", data=pixel_dataset, chunk_causal=value, steps=1, progress=False, **source)
    assert ("with --model" in str(e.value)) == (how == "model")
    assert not (tmp_path / "o").exists()


def test_trainable_feature_maps_keeps_the_teachers_weights(pixel_student, pixel_dataset, tmp_path):
    """--trainable feature_maps: only the converted blocks' feature maps and linear scales change, bit for bit."""
    finetune(tmp_path / "fm", model=pixel_student, data=pixel_dataset, steps=3, batch_size=2, lr=1e-2,
             trainable="feature_maps", progress=False)
    before, after = folder_weights(pixel_student), folder_weights(tmp_path / "fm")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn1.processor." in k for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if ".attn1.processor." not in k)
    run = json.loads((tmp_path / "fm" / "train" / "run_config.json").read_text())
    assert json.dumps(run).count('"trainable": "feature_maps"') == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(trainable="everything"), "--trainable must be one of"),
    (dict(trainable="feature_maps", lora_rank=2), "--trainable feature_maps trains a converted --model"),
    (dict(trainable="feature_maps", model="teacher"), "is not converted"),
])
def test_trainable_refused_before_any_weights(pixel_teacher, pixel_student, pixel_dataset, tmp_path, no_weights,
                                              kwargs, match):
    kwargs = {"model": pixel_student, **kwargs}
    if kwargs["model"] == "teacher":
        kwargs["model"] = pixel_teacher
    with pytest.raises(ValueError, match=match):
        finetune(tmp_path / "bad", data=pixel_dataset, steps=1, batch_size=2, progress=False, **kwargs)
    assert not (tmp_path / "bad").exists()

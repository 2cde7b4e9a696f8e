"""The one sampling path (rehyat.pipelines.sampling) against plain loops written here, on a tiny model; and the
pipeline and the teacher trajectories of distillation sampling through it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from rehyat.pipelines import ReHyAtVideoPipeline, initial_noise
from rehyat.pipelines.folders import default_scheduler
from rehyat.pipelines.sampling import SamplingLoop, denoise, guidance_embeds, guided_velocity
from rehyat.testing import assert_outputs_close, tiny_wan_transformer


@pytest.fixture(scope="module")
def model():
    return tiny_wan_transformer()


def forward_of(model):
    return lambda x, t, e: model(x, t, e, return_dict=False)[0]


def text(gen, tokens=6):
    return torch.randn(1, tokens, 64, generator=gen)


def plain_velocity(model, latents, t, neg, cond, scale, dtype):
    """Guidance written out: two separate model runs (unconditional, conditional) and their mix."""
    run = lambda e: model(latents.to(dtype), t.expand(1), e.to(dtype), return_dict=False)[0].float()  # noqa: E731
    c = run(cond)
    if scale <= 1.0:
        return c
    u = run(neg)
    return u + scale * (c - u)


def plain_denoise(scheduler, latents, steps, velocity):
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        latents = scheduler.step(velocity(latents, t), t, latents, return_dict=False)[0]
    return latents


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guided_velocity_is_plain_guidance(model, gen, dtype, scale):
    m = copy.deepcopy(model).to(dtype)
    latents, t = torch.randn(1, 16, 3, 4, 4, generator=gen), torch.tensor(700.0)
    neg, cond = text(gen, 4), text(gen, 6)  # guidance_embeds pads the shorter one with zero tokens
    embeds = guidance_embeds(neg.to(dtype), cond.to(dtype)) if scale > 1 else cond.to(dtype)
    v = guided_velocity(forward_of(m), latents, t, embeds, scale, dtype)
    assert v.dtype == torch.float32 and v.shape == latents.shape
    neg_padded = torch.nn.functional.pad(neg, (0, 0, 0, 2))
    ref = plain_velocity(m, latents, t, neg_padded, cond, scale, dtype)
    # the mix amplifies the difference of two bf16-rounded outputs by the scale
    assert_outputs_close(v.to(dtype), ref.to(dtype)) if dtype == torch.float32 else torch.testing.assert_close(
        v, ref, rtol=0, atol=scale * 2e-2 * ref.abs().max().item())


def test_guidance_embeds_pads_and_repeats_the_negative(gen):
    neg, cond = text(gen, 3), torch.randn(2, 5, 64, generator=gen)
    e = guidance_embeds(neg[0], cond)
    assert e.shape == (4, 5, 64)
    for row in (0, 1):
        assert torch.equal(e[row, :3], neg[0]) and not e[row, 3:].any()
    assert torch.equal(e[2:], cond)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoise_is_the_plain_scheduler_loop(model, gen, dtype):
    m = copy.deepcopy(model).to(dtype)
    neg, cond = text(gen), text(gen)
    embeds = guidance_embeds(neg, cond).to(dtype)
    noise = torch.randn(1, 16, 3, 4, 4, generator=gen)
    scheduler = default_scheduler()
    timesteps = scheduler.timesteps.clone()
    velocity = lambda x, t: guided_velocity(forward_of(m), x, t, embeds, 3.0, dtype)  # noqa: E731
    seen = []
    out = denoise(scheduler, noise, 4, lambda x, t, i: velocity(x, t), after_step=lambda i, x: seen.append(i))
    ref = plain_denoise(scheduler, noise, 4, velocity)
    assert seen == [0, 1, 2, 3]
    assert torch.equal(scheduler.timesteps, timesteps)  # the caller's scheduler is copied, not set
    # the same computation in the same order: equal up to the model's rounding in its dtype
    assert_outputs_close(out.to(dtype), ref.to(dtype))


@pytest.mark.usefixtures("single_thread")
def test_sampling_loop_resumed_from_a_pickle_equals_the_uninterrupted_loop(model, gen):
    noise = torch.randn(1, 16, 3, 4, 4, generator=gen)
    e = text(gen)
    velocity = lambda x, t: guided_velocity(forward_of(model), x, t, e, 1.0, torch.float32)  # noqa: E731
    loop = SamplingLoop(default_scheduler(), noise, 5)
    for _ in range(2):
        loop.step(velocity(loop.latents, loop.timestep))
    saved = pickle.dumps(loop.scheduler), loop.latents.clone(), loop.index
    resumed = SamplingLoop.resume(pickle.loads(saved[0]), saved[1], saved[2])
    for lp in (loop, resumed):
        while not lp.done:
            lp.step(velocity(lp.latents, lp.timestep))
    assert torch.equal(resumed.latents, loop.latents)  # one computation rerun on one object: bitwise
    assert_outputs_close(loop.latents, plain_denoise(default_scheduler(), noise, 5, velocity))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_pipeline_parallel_mode_is_the_plain_loop(model, gen, scale):
    pipe = ReHyAtVideoPipeline(model)  # pixel space: latents are the video
    neg, cond = text(gen), text(gen)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, num_frames=3, height=4, width=4,
               num_inference_steps=3, guidance_scale=scale, seed=5, output_type="latent", progress=False)
    velocity = lambda x, t: plain_velocity(model, x, t, neg, cond, scale, torch.float32)  # noqa: E731
    ref = plain_denoise(pipe.scheduler, initial_noise(5, (1, 16, 3, 4, 4)), 3, velocity)
    assert_outputs_close(out.latents, ref)


@pytest.mark.usefixtures("single_thread")
def test_teacher_trajectory_is_the_plain_loop(model, gen):
    """Distillation's teacher trajectories walk the pipeline's loop: [uncond; cond] batch, mix, scheduler step."""
    from rehyat.training import PromptPool, TeacherTrajectories
    from rehyat.training.distributed import DistEnv

    pool = PromptPool(torch.randn(3, 6, 64, generator=gen), torch.randn(4, 64, generator=gen), ["a", "b", "c"])
    traj = TeacherTrajectories(default_scheduler(), pool, (16, 3, 4, 4), batch_size=1, sampling_steps=3,
                               guidance_scale=4.0, seed=0, env=DistEnv())
    x, t, e = traj.inputs()
    noise, cond, loop = traj.latents.clone(), e[1:], traj.loop
    for _ in range(3):
        traj.advance(model(x, t, e, return_dict=False)[0])
        if traj.loop is not None:
            x, t, e = traj.inputs()
    assert traj.trajectory == 1 and traj.loop is None and loop.done
    neg = torch.nn.functional.pad(pool.negative, (0, 0, 0, 2))[None]  # zero tokens up to the prompts' 6
    velocity = lambda x, t: plain_velocity(model, x, t, neg, cond, 4.0, torch.float32)  # noqa: E731
    assert_outputs_close(loop.latents, plain_denoise(default_scheduler(), noise, 3, velocity))

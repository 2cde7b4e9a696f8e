"""Prompts and the teacher's own sampling trajectories: the inputs of distillation (design section 7, "inputs: teacher
activations along the teacher's own sampling trajectories from prompts, no videos needed") and of the teacher-
velocity loss without data.

A :class:`PromptPool` holds text embeddings ``[P, L, D]`` (from a prompt file and the model's text encoder or a
caption table, or from a dataset) and the negative-prompt embedding for classifier-free guidance.
:class:`TeacherTrajectories` walks sampling trajectories exactly as :class:`rehyat.pipelines.ReHyAtVideoPipeline`
does (the folder's scheduler, CFG batch ``[uncond; cond]``, guided velocity, ``scheduler.step``), one visited step
at a time: :meth:`~TeacherTrajectories.inputs` gives the model inputs of the current step, the caller runs the
model (and trains on it), and :meth:`~TeacherTrajectories.advance` moves on with the model's output.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..pipelines.sampling import SamplingLoop, guidance_embeds, guidance_on, guided_inputs, guided_output
from .distributed import DistEnv, local_slice

__all__ = ["PromptPool", "read_prompt_file", "resolve_prompt_pool", "TeacherTrajectories"]


@dataclass
class PromptPool:
    """Text embeddings to sample with.

    Attributes:
        embeds: ``[P, L, D]`` float32 (CPU), one row per prompt.
        negative: ``[L', D]`` float32 negative-prompt embedding for guidance, or ``None`` (zeros are used, as the
            pipeline does without a text encoder).
        captions: the P prompts (or ``"<sample i>"`` placeholders).
    """

    embeds: torch.Tensor
    negative: torch.Tensor | None
    captions: list[str]

    def __len__(self) -> int:
        return self.embeds.shape[0]


def read_prompt_file(path) -> list[str]:
    """Non-empty lines of a prompt file. Raises FileNotFoundError, or ValueError when it holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (it is empty)")
    return prompts


def _dataset_prompt_embeds(folder: Path):
    from safetensors import safe_open

    from .dataset import read_dataset_info, read_metadata

    info = read_dataset_info(folder)
    rows = read_metadata(folder)
    if not rows:
        raise ValueError(f"dataset {folder} has no samples")
    embeds = []
    for r in rows:
        with safe_open(str(folder / r["file_name"]), framework="pt") as f:
            embeds.append(f.get_tensor("prompt_embeds").float())
    neg = None
    if info.null_embeds:
        with safe_open(str(folder / info.null_embeds), framework="pt") as f:
            neg = f.get_tensor("prompt_embeds").float()
    return info, torch.stack(embeds), neg, [r["text"] for r in rows]


def resolve_prompt_pool(model, *, prompts=None, text_embeddings=None, data=None, device="cpu",
                        text_dim: int | None = None) -> PromptPool:
    """Build the prompts a run samples with.

    Exactly one source of prompts: ``prompts`` (a prompt file, encoded with the model folder's text encoder, or
    looked up in ``text_embeddings`` when given), ``data`` (a dataset folder: its samples' embeddings), or
    ``text_embeddings`` alone (every caption in the table but the negative prompt). The negative prompt (the
    folder's ``negative_prompt``, default ``""``) comes from the same place when it can, else zeros.

    Raises:
        ValueError: no or several sources, an empty prompt file, captions missing from the table, a folder
            without a text encoder and no table, or embeddings whose width is not ``text_dim``.
        FileNotFoundError: a missing file or folder.
    """
    from ..text_encoder import TextEmbeddingTable
    from ..pipelines.folders import ModelFolder, load_prompt_encoder

    model = ModelFolder.of(model)
    if (prompts is not None) + (data is not None) == 2:
        raise ValueError("pass either a prompt file or --data, not both")
    if prompts is None and data is None and text_embeddings is None:
        raise ValueError("no prompts: pass a prompt file (--prompts), --data DATASET or --text-embeddings TABLE")
    neg_text = model.pipeline_config.get("negative_prompt", "")
    negative = None
    if data is not None:
        _, embeds, negative, captions = _dataset_prompt_embeds(Path(data))
    else:
        table = TextEmbeddingTable.load(text_embeddings) if text_embeddings is not None else None
        if prompts is not None:
            captions = read_prompt_file(prompts)
        else:
            captions = [c for c in table.captions if c != neg_text]
            if not captions:
                raise ValueError(f"{text_embeddings} holds no caption besides the negative prompt")
        if table is not None:
            embeds = table.lookup(captions).float()
            if neg_text in table:
                negative = table.lookup([neg_text])[0].float()
        else:
            encode = load_prompt_encoder(model, device=device)
            embeds, negative = encode(captions), encode([neg_text])[0]
            del encode  # frees the text encoder
    if text_dim is not None and embeds.shape[-1] != text_dim:
        raise ValueError(f"the prompts' text embeddings are {embeds.shape[-1]}-dim, the model takes text_dim={text_dim}")
    return PromptPool(embeds.cpu(), None if negative is None else negative.cpu(), list(captions))


def _noise_seed(seed: int, trajectory: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(trajectory), int(index)]).generate_state(1)[0])


class TeacherTrajectories:
    """The teacher's sampling trajectories, one visited step at a time, split across processes.

    Trajectory ``r`` samples the global batch of prompts ``perm[(r*B + i) % P]`` (``i < B``, ``perm`` a seeded
    permutation of the pool) from the noise :func:`rehyat.pipelines.initial_noise` gives for seed
    ``SeedSequence(seed, r, i)``, with ``sampling_steps`` steps of a copy of ``scheduler`` and guidance scale
    ``guidance_scale`` (off at <= 1), through the pipeline's own sampling path
    (:class:`rehyat.pipelines.sampling.SamplingLoop`, :func:`~rehyat.pipelines.sampling.guided_inputs`,
    :func:`~rehyat.pipelines.sampling.guided_output`). This process holds the samples ``local_slice(B)``.

    Args:
        scheduler: a diffusers flow-matching scheduler (copied per trajectory).
        pool: the :class:`PromptPool`.
        latent_shape: ``(C, F, H, W)``.
        batch_size: B, global prompts per trajectory.
        sampling_steps: scheduler steps per trajectory.
        guidance_scale: CFG scale.
        seed: noise and prompt-order seed.
        env: the :class:`~rehyat.training.distributed.DistEnv`.
        dtype: dtype of the model inputs.
    """

    def __init__(self, scheduler, pool: PromptPool, latent_shape, *, batch_size: int, sampling_steps: int,
                 guidance_scale: float, seed: int, env: DistEnv, dtype: torch.dtype = torch.float32) -> None:
        if sampling_steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {sampling_steps}")
        self.scheduler, self.pool, self.shape = scheduler, pool, tuple(latent_shape)
        self.B, self.steps, self.guidance, self.seed = batch_size, sampling_steps, guidance_scale, seed
        self.env, self.dtype, self.device = env, dtype, env.device
        self.local = local_slice(batch_size, env)
        g = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(pool), generator=g)
        self.trajectory = 0
        self.loop: SamplingLoop | None = None  # the current trajectory's scheduler loop, None between trajectories
        self.cfg = guidance_on(guidance_scale)
        L, D = pool.embeds.shape[1:]
        neg = pool.negative if pool.negative is not None else torch.zeros(L, D)
        self.Lmax = max(L, neg.shape[0])
        pad = lambda e: torch.nn.functional.pad(e, (0, 0, 0, self.Lmax - e.shape[-2]))  # noqa: E731
        self.pool_embeds = pad(pool.embeds).to(self.device)
        self.negative = pad(neg).to(self.device)

    @property
    def step(self) -> int:
        """The current trajectory's step (0 between trajectories)."""
        return 0 if self.loop is None else self.loop.index

    @property
    def latents(self) -> torch.Tensor | None:
        """The current trajectory's latents ``[b, C, F, H, W]`` float32, ``None`` between trajectories."""
        return None if self.loop is None else self.loop.latents

    def _start(self) -> None:
        from ..pipelines import initial_noise

        r, B = self.trajectory, self.B
        idx = [r * B + i for i in range(self.local.start, self.local.stop)]
        prompt_idx = self.order[torch.tensor([i % len(self.pool) for i in idx])]
        C, F, H, W = self.shape
        latents = torch.cat([initial_noise(_noise_seed(self.seed, r, i), (1, C, F, H, W)) for i in idx]).to(self.device)
        self.embeds = self.pool_embeds[prompt_idx.to(self.device)]
        self.loop = SamplingLoop(self.scheduler, latents, self.steps)

    def inputs(self):
        """Model inputs of the current step: ``(x [n, C, F, H, W], t [n], embeds [n, L, D])`` with ``n = 2b`` under
        guidance (``[uncond; cond]``, as the pipeline) else ``b``, in ``dtype`` on the device."""
        if self.loop is None:
            self._start()
        x, ts = guided_inputs(self.loop.latents, self.loop.timestep, self.guidance, self.dtype)
        e = guidance_embeds(self.negative, self.embeds) if self.cfg else self.embeds
        return x, ts, e.to(self.dtype)

    def guided(self, out: torch.Tensor) -> torch.Tensor:
        """The guided velocity (float32) from the model output on :meth:`inputs`."""
        return guided_output(out, self.guidance)

    def advance(self, out: torch.Tensor) -> None:
        """Step the trajectory with the model output on :meth:`inputs`; start the next trajectory after the last step."""
        self.loop.step(self.guided(out))
        if self.loop.index == self.steps:
            self.trajectory, self.loop = self.trajectory + 1, None

    def state_dict(self) -> dict:
        """This process's position and, mid-trajectory, its latents and scheduler (pickled)."""
        return {
            "trajectory": self.trajectory,
            "step": self.step,
            "latents": None if self.loop is None else self.loop.latents.cpu(),
            "scheduler": None if self.loop is None else pickle.dumps(self.loop.scheduler),
        }

    def load_state_dict(self, state: dict) -> None:
        """Go back to where :meth:`state_dict` was taken (its trajectory, step, latents and scheduler)."""
        self.trajectory = state["trajectory"]
        if state["latents"] is None:
            self.loop = None
            return
        self._start()  # prompts of this trajectory
        self.loop = SamplingLoop.resume(pickle.loads(state["scheduler"]), state["latents"].to(self.device),
                                        state["step"])

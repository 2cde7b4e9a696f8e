"""Prompt schedules: the text conditioning of a streamed video changes at chunk boundaries.

A schedule is a list of ``(start frame, prompt)`` pairs in video (pixel) frames, as ``num_frames`` / ``--frames``
count them. In recurrent and streaming generation each prompt conditions the runner chunks from the one that holds
its start frame on; the transformer's recurrent states carry over the switch. A start frame inside a chunk takes
effect from that chunk's first frame (it snaps back to the chunk boundary); two prompts in one chunk are refused.
With Wan's VAE (4x temporal compression) video frame ``f >= 1`` is in latent frame ``(f - 1) // 4 + 1`` and frame 0
in latent frame 0; a chunk of ``c`` latent frames starting at latent frame ``l >= 1`` starts at video frame
``4 (l - 1) + 1``. The file form (``rehyat generate --prompt-schedule FILE``) has one ``<start frame> <prompt>``
per line; blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .video import latent_frame_of, video_frames_of

__all__ = ["read_prompt_schedule", "plan_prompt_schedule", "chunk_frame_range"]


def read_prompt_schedule(path, *, arg: str = "--prompt-schedule") -> tuple[list[tuple[int, str]], list[str]]:
    """Read a schedule file: one ``<start frame> <prompt>`` per line (blank and ``#`` lines skipped).

    Returns:
        ``(schedule, labels)``: the ``(start frame, prompt)`` pairs in file order, and ``"line N"`` for each, to
        name it in the errors of :func:`plan_prompt_schedule`.

    Raises:
        FileNotFoundError: no such file. ValueError: not UTF-8 text, a line without a prompt after its start frame,
            or a start frame that is not an integer (one line, naming ``arg``, the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{arg} {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{arg} {path} is not UTF-8 text ({e})") from None
    schedule, labels = [], []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if not parts[0].lstrip("+-").isdigit():
            raise ValueError(f"{arg} {path} line {n}: expected '<start frame> <prompt>' with the start frame an "
                             f"integer, got {line!r}")
        if len(parts) < 2:
            raise ValueError(f"{arg} {path} line {n}: no prompt after the start frame {parts[0]}")
        schedule.append((int(parts[0]), parts[1].strip()))
        labels.append(f"line {n}")
    return schedule, labels


def chunk_frame_range(k: int, chunk: int, temporal: int, num_frames: int) -> tuple[int, int]:
    """First and last video frame of runner chunk ``k`` (``chunk`` latent frames) of a ``num_frames`` video."""
    first = video_frames_of(k * chunk, temporal)[0]
    last = min(video_frames_of((k + 1) * chunk - 1, temporal)[1], num_frames - 1)
    return first, last


def plan_prompt_schedule(schedule, num_frames: int, temporal: int, chunk: int, *, arg: str = "prompt_schedule",
                         labels: list[str] | None = None) -> list[int]:
    """Check a prompt schedule against a video and return the runner chunk each prompt starts at.

    Args:
        schedule: ``[(start frame, prompt), ...]``; a prompt is a non-empty string or text embeddings
            ``[1, L, text_dim]``. Start frames are video frames, the first 0, increasing, below ``num_frames``.
        num_frames: the video's frames. temporal: the VAE's temporal compression (1 in pixel space).
        chunk: the runner chunk in latent frames (:func:`rehyat.models.check_recurrent`).
        arg: the argument's name in errors; labels: each entry's name in errors (default ``"entry i"``).

    Returns:
        The chunk index of each entry (increasing): the entry's prompt conditions that chunk and the later ones
        up to the next entry's chunk.

    Raises:
        ValueError: one line naming ``arg`` and the entry: an empty schedule, an entry that is not a pair, a start
            frame that is not an int >= 0, a first start frame other than 0, start frames not increasing, a start
            frame past the video, an empty prompt, or two entries in one chunk.
    """
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError(f"{arg} must be a non-empty list of (start frame, prompt) pairs, got {schedule!r:.80}")
    labels = labels if labels is not None else [f"entry {i}" for i in range(len(schedule))]
    chunks: list[int] = []
    for i, (entry, label) in enumerate(zip(schedule, labels)):
        where = f"{arg} {label}"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"{where}: expected a (start frame, prompt) pair, got {entry!r:.80}")
        start, prompt = entry
        _check_prompt(prompt, where)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"{where}: the start frame must be an int >= 0, got {start!r}")
        if i == 0 and start != 0:
            raise ValueError(f"{where}: the first prompt must start at frame 0, got {start}")
        if i > 0 and start <= schedule[i - 1][0]:
            raise ValueError(f"{where}: start frame {start} does not come after {labels[i - 1]}'s "
                             f"{schedule[i - 1][0]} (start frames must increase)")
        if start >= num_frames:
            raise ValueError(f"{where}: start frame {start} is past the video's last frame {num_frames - 1} "
                             f"({num_frames} frames)")
        k = latent_frame_of(start, temporal) // chunk
        if chunks and k == chunks[-1]:
            first, last = chunk_frame_range(k, chunk, temporal, num_frames)
            raise ValueError(f"{where}: start frame {start} is in the chunk of frames {first}-{last}, as "
                             f"{labels[i - 1]}'s {schedule[i - 1][0]} is: the prompt changes at chunk boundaries "
                             f"({chunk} latent frames each), one prompt per chunk")
        chunks.append(k)
    return chunks


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 3 or prompt.shape[0] != 1:
            raise ValueError(f"{where}: prompt embeddings must be [1, L, text_dim], got {tuple(prompt.shape)}")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: the prompt must be a non-empty string (or embeddings [1, L, text_dim]), "
                         f"got {prompt!r:.80}")

"""Videos of a videofolder as tensors: reading a file (an error naming it when ffmpeg cannot decode it) and
turning uint8 frames into the ``[3, F, H, W]`` float video the VAE (or pixel space) takes."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["read_video_file", "video_tensor"]


def video_tensor(frames) -> torch.Tensor:
    """uint8 frames ``[F, H, W, 3]`` (a numpy array) -> the video as float32 ``[3, F, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


def read_video_file(path: Path):
    """:func:`rehyat.world.read_video`: the file's frames, uint8 ``[F, H, W, 3]`` (a numpy array).

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: a file ffmpeg cannot decode, or one without frames
            (naming the file).
    """
    from ..io import first_line
    from ..world import read_video

    try:
        return read_video(path)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as e:  # imageio: "Could not load meta information", "can not handle the given uri"
        raise ValueError(f"cannot read the video {path}: not a video file ffmpeg can decode ({first_line(e)})") from None

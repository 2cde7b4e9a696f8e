"""Writing and reading the world's videos as an mp4 "videofolder" dataset.

The layout follows the Hugging Face ``videofolder`` convention::

    out_dir/000000.mp4
    out_dir/000001.mp4
    out_dir/metadata.jsonl   # one JSON object per line, with "file_name" and "text"

Videos are written with imageio's FFMPEG plugin (imageio-ffmpeg) using libx264.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .scenes import Scene, _check_int, caption, render_video, sample_scene

METADATA_FILE = "metadata.jsonl"


def scene_seed(seed: int, index: int) -> int:
    """Seed of video ``index`` in a dataset drawn with ``seed``.

    Mixes both numbers with :class:`numpy.random.SeedSequence`, so datasets drawn
    with neighbouring seeds do not share scenes (unlike ``seed + index``).

    Returns:
        A non-negative int below 2**32.
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8, lossless: bool = False) -> None:
    """Write an RGB video to an mp4 file with libx264.

    Args:
        path: output file (``.mp4``).
        frames: uint8 array ``[F, H, W, 3]``.
        fps: frames per second (> 0). Default 8.
        lossless: if False (default), H.264 ``yuv420p`` at CRF 10 (plays
            everywhere; chroma is subsampled, so colours bleed about a pixel at
            edges; H and W must be even). If True, ``libx264rgb`` at CRF 0 with
            ``rgb24`` pixels: decoded frames equal ``frames`` exactly.

    Raises:
        ValueError: bad ``frames`` shape/dtype, odd size with ``lossless=False``,
            or ``fps <= 0``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    _, h, w, _ = frames.shape
    if not lossless and (h % 2 or w % 2):
        raise ValueError(f"height and width must be even for yuv420p video, got {h}x{w}")

    import imageio.v2 as imageio

    if lossless:
        codec, pix_fmt, crf = "libx264rgb", "rgb24", "0"
    else:
        codec, pix_fmt, crf = "libx264", "yuv420p", "10"
    writer = imageio.get_writer(
        str(path),
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec=codec,
        pixelformat=pix_fmt,
        quality=None,
        output_params=["-crf", crf],
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
    finally:
        writer.close()


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file (any format ffmpeg reads) to RGB frames.

    Returns:
        uint8 array ``[F, H, W, 3]``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file holds no frames.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")

    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG", mode="I")
    try:
        frames = [np.asarray(f)[..., :3] for f in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path} has no frames")
    return np.stack(frames).astype(np.uint8, copy=False)


def read_metadata(out_dir: str | os.PathLike) -> list[dict]:
    """Read ``out_dir/metadata.jsonl`` into a list of dicts (one per video, in file order)."""
    with open(Path(out_dir) / METADATA_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def export_video_dataset(
    out_dir: str | os.PathLike,
    num_videos: int,
    num_frames: int,
    height: int,
    width: int,
    seed: int,
    fps: float = 8,
    *,
    overwrite: bool = False,
    lossless: bool = False,
    scene_options: dict | None = None,
) -> list[dict]:
    """Render ``num_videos`` random scenes and write them as a videofolder dataset.

    Video ``i`` shows ``sample_scene(scene_seed(seed, i), **scene_options)`` and is
    written to ``out_dir/{i:06d}.mp4``; ``out_dir/metadata.jsonl`` gets one line
    per video::

        {"file_name": "000000.mp4", "text": <caption>, "scene": {<Scene fields>},
         "seed": <scene seed>, "num_frames": F, "height": H, "width": W, "fps": fps}

    Args:
        out_dir: target folder; created if missing.
        num_videos: number of videos (>= 1).
        num_frames: frames per video (>= 1).
        height, width: frame size in pixels (>= 8; even unless ``lossless``).
        seed: dataset seed (non-negative int).
        fps: frames per second stored in the files (> 0). Default 8.
        overwrite: allow writing into a non-empty folder (existing files with
            the same names are replaced; others are left alone). Default False.
        lossless: see :func:`write_video`. Default False (yuv420p).
        scene_options: keyword arguments for :func:`sample_scene`, e.g.
            ``{"colours": ["red", "blue"]}``.

    Returns:
        The metadata records, in order.

    Raises:
        ValueError: naming the first bad argument, or if ``out_dir`` is a
            non-empty folder (or a file) and ``overwrite`` is False. Nothing is
            written in those cases.
    """
    _check_export_args(num_videos, num_frames, height, width, seed, fps, lossless=lossless)
    scene_options = dict(scene_options or {})
    out = _check_out_dir(out_dir, overwrite=overwrite)

    # Draw every scene before writing anything, so bad scene_options fail early.
    seeds = [scene_seed(seed, i) for i in range(num_videos)]
    scenes: list[Scene] = [sample_scene(s, **scene_options) for s in seeds]

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (s, scene) in enumerate(zip(seeds, scenes)):
        name = f"{i:06d}.mp4"
        write_video(out / name, render_video(scene, num_frames, height, width), fps=fps, lossless=lossless)
        records.append({"file_name": name, "text": caption(scene), "scene": scene.to_dict(), "seed": s,
                        "num_frames": int(num_frames), "height": int(height), "width": int(width), "fps": fps})
    with open(out / METADATA_FILE, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return records


def _check_export_args(num_videos, num_frames, height, width, seed, fps, *, lossless: bool) -> None:
    """ValueError naming the first bad number among :func:`export_video_dataset`'s arguments."""
    _check_int("num_videos", num_videos, 1)
    _check_int("num_frames", num_frames, 1)
    _check_int("height", height, 8)
    _check_int("width", width, 8)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not lossless and (height % 2 or width % 2):
        raise ValueError(f"height and width must be even unless lossless=True, got {height}x{width}")


def _check_out_dir(out_dir, *, overwrite: bool) -> Path:
    """``out_dir`` as a Path; ValueError if it is a file, or a non-empty folder and ``overwrite`` is False."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out_dir {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"out_dir {out} is not empty; pass overwrite=True to write into it")
    return out

"""Output files: checked before any work, written to a temporary name and moved into place when complete."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def check_output_file(path, *, overwrite: bool, arg: str = "--out") -> Path:
    """Validate an output file path before any work: its folder must exist, and an existing file is refused
    unless ``overwrite``. Raises ``FileNotFoundError`` / ``FileExistsError`` naming ``arg``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{arg}: folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{arg}: {path} is a folder, expected a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{arg}: {path} exists; pass --overwrite to replace it")
    return path


def read_json_object(path) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file when it is not valid JSON or not an object."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name when it has none), to quote a library's
    verbose error (diffusers, imageio) inside a shorter one."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def partial_path(path: Path) -> Path:
    """Temporary sibling of ``path`` used while it is being written (same suffix, so codecs are inferred)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def replace_atomically(path, write) -> Path:
    """Write a file through ``write(tmp)`` to its :func:`partial_path`, then move it to ``path`` (``os.replace``), so
    ``path`` is either the old file or the complete new one; the temporary file is deleted when ``write`` fails."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _temporary_folder(folder: Path, suffix: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=suffix, dir=folder.parent))


def write_folder_atomically(folder, write, *, overwrite: bool = False) -> Path:
    """Write a folder through ``write(tmp)`` into a new temporary folder beside it, then move it into place, so a
    failed or interrupted write never leaves a half-written folder or entry.

    Where ``folder`` is absent or empty, the written folder replaces it by one rename: ``folder`` is then either
    absent (or still empty) or complete. Into a non-empty folder (``overwrite=True``) each top-level entry ``write``
    made is moved in by one rename, in place of the entry of that name (other entries are kept, e.g. a training
    run's ``train/``); the replaced entries go to a temporary folder beside it, deleted at the end. The temporary
    folders (hidden: ``.NAME.*.partial``) are deleted when ``write`` fails. Missing parent folders are created.

    Raises:
        FileExistsError: ``folder`` is a file, or (without ``overwrite``) a non-empty folder; raised before
            anything is written.
    """
    import shutil

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace its files")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_folder(folder, ".partial")
    try:
        write(tmp)
        if not folder.is_dir() or not any(folder.iterdir()):
            if folder.is_dir():
                folder.rmdir()
            tmp.rename(folder)
            return folder
        old = _temporary_folder(folder, ".old.partial")
        for entry in sorted(tmp.iterdir()):
            target = folder / entry.name
            if target.exists() or target.is_symlink():
                target.rename(old / entry.name)
            entry.rename(target)
        shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


class VideoWriter:
    """Append ``[f, H, W, 3]`` uint8 frames to an MP4 (H.264 via imageio-ffmpeg) as they are produced.

    Frames go to a hidden temporary file; :meth:`close` moves it to ``path`` atomically, :meth:`abort` deletes it,
    so a failed run never leaves a half-written video under the requested name.
    """

    def __init__(self, path, fps: int) -> None:
        import imageio.v2 as imageio

        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self._w = imageio.get_writer(self.tmp, fps=fps, codec="libx264", quality=9, macro_block_size=1,
                                     ffmpeg_log_level="error")
        self.frames = 0

    def append(self, frames: np.ndarray) -> None:
        for f in frames:
            self._w.append_data(np.ascontiguousarray(f))
        self.frames += len(frames)

    def close(self) -> Path:
        self._w.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._w.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_video(path, frames: np.ndarray, fps: int) -> Path:
    """Write ``[F, H, W, 3]`` uint8 frames to ``path`` (MP4) atomically."""
    w = VideoWriter(path, fps)
    try:
        w.append(frames)
    except BaseException:
        w.abort()
        raise
    return w.close()

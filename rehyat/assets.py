"""Paths of the models the project ships (``rehyat/assets/``): the embedded teacher and its ReHyAt student."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_TEACHER = ASSETS / "teacher"
DEFAULT_STUDENT = ASSETS / "student"


def default_model(kind: str = "student") -> Path:
    """Folder of the embedded default model: ``"student"`` (ReHyAt, the default) or ``"teacher"``.

    Raises ``FileNotFoundError`` if the package was installed without its model files.
    """
    if kind not in ("student", "teacher"):
        raise ValueError(f"kind must be 'student' or 'teacher', got {kind!r}")
    path = DEFAULT_STUDENT if kind == "student" else DEFAULT_TEACHER
    if not (path / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"the embedded {kind} model is missing at {path}; pass --model DIR")
    return path

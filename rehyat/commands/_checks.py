"""Argument checks shared by the commands, made before any model loads or any file is written."""

from __future__ import annotations

import math
import re
from pathlib import Path


def check_steps(steps) -> None:
    """``--steps``: ``None`` (the model's default) or an int >= 1; ``ValueError`` naming ``--steps`` otherwise."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"--steps must be an int >= 1, got {steps!r}")


def check_guidance(guidance) -> None:
    """``--guidance``: ``None`` (the model's default) or a finite number >= 0; ``ValueError`` naming it otherwise."""
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance must be a number >= 0, got {guidance!r}")


def check_output_folder(out, *, overwrite: bool, command: str, outputs: str | None = None, keep_others: bool = False,
                        arg: str = "--out") -> list[Path]:
    """Check an output folder before any work; returns the files an earlier run left there, to delete before writing.

    ``outputs``: a regular expression matching the names of every file ``command`` writes into the folder. With
    ``overwrite`` and ``outputs``, the files matching it are returned; any other entry in the folder is refused
    (``keep_others``: left alone), so ``--overwrite`` never deletes a file the command does not write. Does not
    create the folder.

    Raises:
        FileExistsError: ``out`` is a file, or (``overwrite``, ``outputs``, not ``keep_others``) it holds other files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{arg}: {out} is a file, expected a folder")
    if not (overwrite and outputs is not None and out.is_dir()):
        return []
    ours, other = [], []
    for p in sorted(out.iterdir()):
        (ours if p.is_file() and re.fullmatch(outputs, p.name) else other).append(p)
    if other and not keep_others:
        raise FileExistsError(f"{arg}: {out} holds files that `rehyat {command}` does not write "
                              f"(e.g. {other[0].name}); --overwrite only replaces an earlier run's outputs: move them or choose another {arg}")
    return ours


#: errors a command reports as one line without a traceback: bad input (exit status 2) and output refused for
#: holding NaN / Inf (FloatingPointError, e.g. rehyat.pipelines.NonFiniteOutputError; exit status 1)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, FloatingPointError)

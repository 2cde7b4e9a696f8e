"""File names of ``rehyat generate --prompt-file``, all chosen and checked before any video is generated.

* VBench's name, ``<prompt>-<index>.mp4`` (what its standard mode reads), wherever it is a valid file name: ``/``
  (and NUL) become spaces, and the name, counted in UTF-8 bytes, leaves room in the file system's 255-byte limit
  for the hidden temporary name the video is written under (:func:`rehyat.io.partial_path`, 9 bytes longer);
* otherwise ``<prompt cut to fit>~<hash>-<index>.mp4``, ``<hash>`` the first 12 hexadecimal digits of the SHA-256
  of the prompt's UTF-8 bytes: deterministic, and distinct for distinct prompts. Also used by every prompt whose
  VBench name another prompt shares (``a/b`` and ``a b``), so that no video overwrites another.

``prompts.jsonl`` in the output folder maps every file name to its full prompt (``{"file", "prompt", "seed"}`` per
line). It is written atomically before the first video, keeping the entries of other files already there, and
lists every video the run sets out to write: one missing from the folder failed (the run's summary says why).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

INDEX_NAME = "prompts.jsonl"
NAME_MAX_BYTES = 255  # ext4, XFS, Btrfs, ZFS
_PARTIAL_EXTRA = len(".") + len(".partial")  # partial_path(path): f".{stem}.partial{suffix}"


def _bytes(name: str) -> int:
    return len(name.encode("utf-8"))


def fits(name: str) -> bool:
    """Whether a file ``name`` and its temporary sibling (:func:`rehyat.io.partial_path`) fit in 255 UTF-8 bytes."""
    return _bytes(name) + _PARTIAL_EXTRA <= NAME_MAX_BYTES


def _clean(prompt: str) -> str:
    return prompt.replace("/", " ").replace("\0", " ")


def vbench_name(prompt: str, index: int) -> str:
    """VBench standard-mode file name: the prompt itself, then ``-<index>.mp4`` ('/' is not allowed in names)."""
    return f"{_clean(prompt)}-{index}.mp4"


def hashed_name(prompt: str, index: int) -> str:
    """``<prompt cut>~<12 hex digits of SHA-256(prompt)>-<index>.mp4``, cut at a character boundary to :func:`fits`."""
    tail = f"~{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:12]}-{index}.mp4"
    room = NAME_MAX_BYTES - _PARTIAL_EXTRA - _bytes(tail)
    head = _clean(prompt).encode("utf-8")[:room].decode("utf-8", "ignore").rstrip()
    return head + tail


def plan_names(prompts: list[tuple[int, str]], videos: int, arg: str = "--prompt-file") -> dict[str, list[str]]:
    """``{prompt: [file name of video 0, ..., videos - 1]}`` for ``(line number, prompt)`` pairs (see the module
    docstring for the rule).

    Raises:
        ValueError: the same prompt on two lines (naming both: their videos would be the same files).
    """
    first: dict[str, int] = {}
    for line, prompt in prompts:
        if prompt in first:
            raise ValueError(f"{arg}: lines {first[prompt]} and {line} hold the same prompt ({prompt[:60]!r}): their "
                             "videos would overwrite each other; remove one (--videos-per-prompt gives more seeds)")
        first[prompt] = line
    owners: dict[str, set[str]] = {}
    for prompt in first:
        owners.setdefault(vbench_name(prompt, 0), set()).add(prompt)
    names = {}
    for prompt in first:
        vbench = fits(vbench_name(prompt, videos - 1)) and len(owners[vbench_name(prompt, 0)]) == 1
        names[prompt] = [(vbench_name if vbench else hashed_name)(prompt, i) for i in range(videos)]
    every = [n for ns in names.values() for n in ns]
    if len(set(every)) != len(every):  # a VBench name equal to another prompt's hashed one: not seen in practice
        raise ValueError(f"{arg}: two prompts give the same file name; rename one")
    return names


def read_index(folder) -> list[dict]:
    """The entries of ``folder/prompts.jsonl`` (``[]`` without it); ``ValueError`` naming it when a line is not a
    JSON object with a ``"file"``."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            entry = {}
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("file"), str)):
            raise ValueError(f"--out: {path} line {n} is not a `rehyat generate` index entry (a JSON object with a "
                             "\"file\"): move the file or choose another --out")
        if entry is not None:
            entries.append(entry)
    return entries


def write_index(folder, entries: list[dict]) -> Path:
    """Write ``entries`` to ``folder/prompts.jsonl`` atomically, after the entries already there for other files."""
    from ..io import replace_atomically

    ours = {e["file"] for e in entries}
    kept = [e for e in read_index(folder) if e["file"] not in ours]
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept + entries)
    return replace_atomically(Path(folder) / INDEX_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))

"""What the package ships in ``rehyat/assets/`` (model folders only), and the links of the docs that moved out of it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import rehyat
from rehyat.assets import ASSETS

REPO = Path(__file__).resolve().parents[1]
#: the parts of a model folder (rehyat/pipelines/folders.py's module docstring)
MODEL_FOLDER_PARTS = {"rehyat_pipeline.json", "transformer", "scheduler", "vae", "tokenizer", "text_encoder"}


def test_assets_hold_model_folders_only():
    """Training logs, run settings, reports and evaluation tables live in docs/results/embedded_models/."""
    assert sorted(p.name for p in ASSETS.iterdir()) == ["student", "teacher"]
    for folder in ASSETS.iterdir():
        assert {p.name for p in folder.iterdir()} <= MODEL_FOLDER_PARTS, folder
        assert (folder / "transformer" / "config.json").is_file()


def test_relative_markdown_links_resolve():
    """Every relative link ``[text](path)`` of the repository's Markdown files names an existing file or folder."""
    if not (REPO / "README.md").is_file() or Path(rehyat.__file__).resolve().parents[1] != REPO:
        pytest.skip("not run from a source checkout")
    files = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md")),
             *sorted((REPO / "benchmarks").rglob("*.md"))]
    broken = []
    for f in files:
        for m in re.finditer(r"\]\(([^)\s]+)\)", f.read_text()):
            target = m.group(1).split("#")[0]
            if target and not re.match(r"[a-z]+:", target) and not (f.parent / target).exists():
                broken.append(f"{f.relative_to(REPO)}: {m.group(1)}")
    assert not broken, "broken links:\n" + "\n".join(broken)

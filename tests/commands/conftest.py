"""Fixtures shared by the command tests."""

from __future__ import annotations

import pytest

from rehyat.testing import tiny_pipeline_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny converted pipeline folder (one per test module)."""
    return tiny_pipeline_folder(tmp_path_factory.mktemp("m") / "model")

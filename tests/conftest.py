"""Shared test fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint_session(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint built once per test session; do not modify it."""
    from spinflow.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture
def tiny_checkpoint(tiny_checkpoint_session, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may change."""
    return Path(shutil.copytree(tiny_checkpoint_session, tmp_path / "tiny-model"))

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


@pytest.fixture(scope="session")
def tiny_tokenizer_session(tiny_checkpoint_session):
    """The tiny checkpoint's tokenizer, loaded once; do not modify it."""
    from spinflow.models import load_tokenizer

    return load_tokenizer(tiny_checkpoint_session)


@pytest.fixture(scope="session")
def tiny_model_session(tiny_checkpoint_session):
    """The tiny model in eval mode, loaded once, for tests that only run it (never train it)."""
    from spinflow.models import load_model

    return load_model(tiny_checkpoint_session).eval()


@pytest.fixture
def tiny_model(tiny_checkpoint_session):
    """A freshly loaded tiny model that a test may train."""
    from spinflow.models import load_model

    return load_model(tiny_checkpoint_session)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model work on one thread (restored afterwards): tiny matrices gain
    nothing from more threads, and on a busy 2-core machine they run several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

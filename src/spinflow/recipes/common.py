"""What every recipe's stage functions share: locating inputs made by other stages."""

from __future__ import annotations

from pathlib import Path

from spinflow.errors import SpinflowError
from spinflow.graph import Graph


def require(graph: Graph, path: Path) -> Path:
    """``path`` if it exists; else one line naming the stage that makes it."""
    if not path.exists():
        stage = graph.producer(path)
        raise SpinflowError(
            f"{path}: missing; it is made by stage '{stage}' (run `dvc repro {stage}`)"
        )
    return path

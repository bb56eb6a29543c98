"""Timings of a training stage, kept out of everything DVC hashes.

Seconds, throughput and peak memory differ on every run. In ``metrics/*.json`` they would change
``dvc.lock`` on every identical re-run and clutter ``dvc exp show``; so a training stage writes
them to ``timings/<stage>.json`` (:func:`spinflow.graph.timings_file`), a file dvc.yaml does not
declare and Git ignores, and tracking logs them to MLflow.

The file names the checkpoint it describes by the hash of that checkpoint's ``provenance.json``:
when DVC restores a checkpoint from its cache instead of training it, the file on disk is from
another run, and :func:`read_timings` gives nothing rather than that run's figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinflow.io import read_json, write_json, write_text
from spinflow.provenance import PROVENANCE_FILE

FOR_KEY = "provenance_sha256_16"


def _provenance_hash(model_dir: Path) -> str | None:
    import hashlib

    path = model_dir / PROVENANCE_FILE
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_timings(path: Path, model_dir: Path, timings: dict[str, float]) -> None:
    """Write ``timings`` of the training that produced ``model_dir`` (after its provenance)."""
    ignore = path.parent / ".gitignore"
    if not ignore.is_file():
        write_text(ignore, "# run-to-run timings, written by training stages; not versioned\n*\n")
    write_json(path, {**timings, FOR_KEY: _provenance_hash(model_dir)})


def read_timings(path: Path | None, model_dir: Path) -> dict[str, Any]:
    """The timings of the training that produced ``model_dir``; {} when unknown."""
    if path is None or not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.pop(FOR_KEY, None) != _provenance_hash(model_dir):
        return {}
    return data

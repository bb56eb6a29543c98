"""What produced an output: a small JSON written beside every stage output."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from spinflow.errors import SpinflowError

PROVENANCE_FILE = "provenance.json"
LIBRARIES = ("spinflow", "torch", "transformers", "accelerate", "peft", "datasets", "tokenizers")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def tree_hash(path: str | os.PathLike) -> str:
    """sha256 over the relative names and bytes of every file below ``path`` (or of one file)."""
    root = Path(path)
    if not root.exists():
        raise SpinflowError(f"cannot hash {root}: it does not exist")
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        if file.name == PROVENANCE_FILE:
            continue
        digest.update(str(file.relative_to(root) if file != root else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def provenance(
    stage: str, params: dict[str, Any], inputs: dict[str, str | os.PathLike]
) -> dict[str, Any]:
    """Stage name, the params it read, hashes of its inputs, library versions and the device kind."""
    import torch

    return {
        "stage": stage,
        "params": params,
        "inputs": {
            name: {"path": str(path), "sha256_16": tree_hash(path)} for name, path in inputs.items()
        },
        "libraries": library_versions(),
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }

"""What a run came from: the Git commit, DVC's recorded hashes, and the stages' provenance files."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from spinflow.io import read_json
from spinflow.provenance import PROVENANCE_FILE, tree_hash
from spinflow.tracking.store import TAG_KEY

LOCK_FILE = "dvc.lock"
DVC_FILE = "dvc.yaml"


def git_commit() -> str | None:
    """``git rev-parse HEAD`` in the working directory, else ``DVC_EXP_BASELINE_REV``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DVC_EXP_BASELINE_REV") or None


def context_tags(key: str, commit: str | None) -> dict[str, str]:
    """Tags on every run and version: the pipeline key, the commit, the DVC experiment."""
    tags = {TAG_KEY: key}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _lock_hash(entry: dict[str, Any]) -> str | None:
    kind = entry.get("hash", "md5")
    value = entry.get(kind) or entry.get("md5") or entry.get("etag") or entry.get("checksum")
    return str(value) if value else None


def lock_hashes(stage: str, *, running: str | None, root: Path = Path(".")) -> dict[str, str]:
    """Dependency path → hash of ``stage`` as DVC records them in ``dvc.lock``.

    For the stage that is ``running``, its own lock entry is stale, so only the dependencies that
    other stages produce are given, with the hashes recorded for those stages' outputs.
    """
    stages = _read_yaml(root / LOCK_FILE).get("stages") or {}
    if stage != running:
        entry = stages.get(stage) or {}
        return {
            str(d["path"]): h
            for d in entry.get("deps") or []
            if isinstance(d, dict) and "path" in d and (h := _lock_hash(d))
        }
    declared = ((_read_yaml(root / DVC_FILE).get("stages") or {}).get(stage) or {}).get("deps")
    produced: dict[str, str] = {}
    for name, entry in stages.items():
        if name == stage or not isinstance(entry, dict):
            continue
        for out in entry.get("outs") or []:
            if isinstance(out, dict) and "path" in out and (h := _lock_hash(out)):
                produced[str(out["path"])] = h
    return {str(d): produced[str(d)] for d in declared or [] if str(d) in produced}


def _provenance(directory: Path) -> dict[str, Any]:
    path = directory / PROVENANCE_FILE
    return read_json(path) if path.is_file() else {}


def provenance_inputs(directory: Path) -> dict[str, str]:
    """Input name → sha256 (16 hex) from the ``provenance.json`` a stage wrote in ``directory``."""
    inputs = _provenance(directory).get("inputs") or {}
    return {name: str(v.get("sha256_16")) for name, v in inputs.items() if isinstance(v, dict)}


def provenance_path(directory: Path, name: str) -> str | None:
    """The path the stage that wrote ``directory`` read its input ``name`` from."""
    entry = (_provenance(directory).get("inputs") or {}).get(name) or {}
    return entry.get("path")


def provenance_params(directory: Path) -> dict[str, Any]:
    """The params the stage that wrote ``directory`` read."""
    return _provenance(directory).get("params") or {}


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def optional_hash(path: Path) -> str | None:
    return tree_hash(path) if path.exists() else None

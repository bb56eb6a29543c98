"""Checks of params.yaml beyond the schema, and the ``validate_params`` stage.

The schema (:mod:`spinflow.config`) checks every key and value of params.yaml whenever it is
loaded. What it cannot see is checked here:

- :func:`check_references`: the files params.yaml names exist and are what they should be
  (``spin.accelerate_config`` and ``generate.accelerate_config`` accelerate config files, a
  local ``data.source`` a file, not a directory, a local ``model.source`` present), and the
  lm-evaluation-harness tasks ``eval.lm_eval.tasks`` names are known to the harness (or to
  ``eval.lm_eval.include_path``);
- :func:`check_dvc_keys`: params.yaml itself holds every key a stage of dvc.yaml lists (DVC
  reads them from the file, not from the schema's defaults).

``spinflow validate`` and ``spinflow pipeline write`` run :func:`check_references`; the
``validate_params`` stage, first in dvc.yaml, runs both and compares dvc.yaml with params.yaml,
after the stage runner has loaded the whole file through the schema.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from spinflow.config import PARAMS_FILE, Params, read_params_file
from spinflow.errors import ConfigError
from spinflow.graph import Graph, build

log = logging.getLogger(__name__)

KEYWORD_SOURCES = ("embedded", "tiny", "builtin")
ACCELERATE_KEYS = {
    "spin.accelerate_config": "training",
    "generate.accelerate_config": "generation",
}


def _accelerate_problem(key: str, config: str | None) -> str | None:
    """Why the accelerate config at ``key`` cannot be launched with, or None: it must be a
    YAML mapping with a ``distributed_type``, as ``accelerate config`` writes."""
    if not config:
        return None
    path = Path(config).expanduser()
    hint = (
        f"(ready-made ones are in configs/accelerate/; null runs {ACCELERATE_KEYS[key]} in one "
        "process)"
    )
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "file not found"
        return f"{key}: {config}: {what} {hint}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"{key}: {config}: not an accelerate config (not UTF-8 text) {hint}"
    except OSError as exc:
        return f"{key}: {config}: cannot be read ({exc.strerror or exc})"
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "unparsable"
        return f"{key}: {config}: not an accelerate config (invalid YAML: {problem}) {hint}"
    if not isinstance(data, dict) or "distributed_type" not in data:
        return (
            f"{key}: {config}: not an accelerate config (a YAML mapping with a distributed_type "
            f"key, as `accelerate config` writes) {hint}"
        )
    return None


def _data_problem(source: str) -> str | None:
    from spinflow.data import DATA_SUFFIXES, looks_like_hub_id

    if source in KEYWORD_SOURCES:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return (
            f"data.source: {source} is a directory; name one .jsonl, .parquet or .csv file "
            "inside it (or a Hub dataset id such as HuggingFaceH4/ultrachat_200k)"
        )
    if path.exists():
        if path.suffix.lower() not in DATA_SUFFIXES:
            return (
                f"data.source: {source}: unsupported file type "
                f"{path.suffix or '(no suffix)'!r}; use .jsonl, .parquet or .csv"
            )
        return None
    if looks_like_hub_id(source):
        return None
    return f"data.source: {source}: file not found (nor is it a Hub dataset id org/name)"


def _model_problem(source: str, gguf_file: str | None) -> str | None:
    from spinflow.errors import ModelError
    from spinflow.models import _looks_like_hub_id, _resolve_local

    if source in KEYWORD_SOURCES:
        return None
    if not Path(source).expanduser().exists() and _looks_like_hub_id(source):
        return None
    try:
        _resolve_local(source, gguf_file)
    except ModelError as exc:
        return f"model.source: {exc}"
    return None


def check_references(params: Params) -> None:
    """The files params.yaml names: one ConfigError line for the first problem."""
    for problem in (
        *(_accelerate_problem(key, params.value(key)) for key in ACCELERATE_KEYS),
        _data_problem(params.data.source),
        _model_problem(params.model.source, params.model.gguf_file),
    ):
        if problem:
            raise ConfigError(problem)
    if params.eval.lm_eval.tasks:
        from spinflow.harness import check_tasks

        check_tasks(params.eval.lm_eval)


def _has_key(tree: Any, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_dvc_keys(raw: dict[str, Any], graph: Graph, source: str = PARAMS_FILE) -> None:
    """Every params key a stage lists is in the file (DVC stops on a missing one, stage by stage,
    after earlier stages have run)."""
    for stage in graph.stages.values():
        for key in stage.params:
            if not _has_key(raw, key):
                raise ConfigError(
                    f"{source}: missing key '{key}' (stage '{stage.name}' depends on it and DVC "
                    "reads it from the file; `spinflow params` shows its default)"
                )


def validate_stage(params: Params) -> dict[str, Any]:
    """The ``validate_params`` stage: the runner has loaded params.yaml through the schema (every
    key, no duplicates, finite numbers); this checks the files it names (first: a missing one is
    why `spinflow pipeline write` refused), that dvc.yaml matches it, and that DVC finds every
    key it reads."""
    from spinflow.runner import check_pipeline_file

    check_references(params)
    check_pipeline_file(params)
    check_dvc_keys(read_params_file(PARAMS_FILE), build(params))
    log.info("%s: valid", PARAMS_FILE)
    return {"params": PARAMS_FILE, "valid": True}

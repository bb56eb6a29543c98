"""Standard benchmarks through lm-evaluation-harness (``eval.lm_eval``).

The harness runs in-process on a model and tokenizer that are already loaded (its ``HFLM``
wrapper over them), so it never fetches a model. Task names are checked against the harness's
task index (its own tasks, plus the YAMLs under ``eval.lm_eval.include_path``) before any model
is loaded; a task whose data cannot be loaded (a hub dataset while offline) stops with one line
naming it.

Results come back as ``{task: {metric: value}}`` where ``metric`` is the harness's metric name
(``acc``, ``acc_norm``, ``acc_stderr``), followed by ``/<filter>`` when the task's filter is not
``none`` (gsm8k: ``exact_match/strict-match``). Only finite numbers are kept.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinflow.config import LmEvalParams
from spinflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INSTALL = "pip install 'spinflow[lmeval]'"
RESULTS_FILE = "lm_eval.json"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def enabled(settings: LmEvalParams) -> bool:
    return bool(settings.tasks)


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            "eval.lm_eval.tasks is set, but lm-evaluation-harness is not installed: "
            f"{INSTALL} (or set eval.lm_eval.tasks: [])"
        ) from None


def include_dir(settings: LmEvalParams) -> Path | None:
    """``eval.lm_eval.include_path`` as a directory that exists, or None when unset."""
    if settings.include_path is None:
        return None
    path = Path(settings.include_path).expanduser()
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "directory not found"
        raise ConfigError(f"eval.lm_eval.include_path: {settings.include_path}: {what}")
    return path


@functools.lru_cache(maxsize=4)
def _index(include: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def task_manager(settings: LmEvalParams):
    """A harness ``TaskManager`` that knows every name of ``eval.lm_eval.tasks``.

    When the include directory alone defines them all, the harness's own few thousand task
    files are not indexed (seconds saved). An unknown name is one ConfigError line naming it.
    """
    _require_harness()
    include = include_dir(settings)
    folder = str(include.resolve()) if include is not None else None
    if folder is not None:
        local = _index(folder, False)
        if all(name in local.all_tasks for name in settings.tasks):
            return local
    manager = _index(folder, True)
    known = set(manager.all_tasks)
    unknown = [name for name in settings.tasks if name not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        more = f" (and {', '.join(repr(n) for n in unknown[1:])})" if len(unknown) > 1 else ""
        where = (
            f"the harness's tasks and {settings.include_path}"
            if include is not None
            else "the harness's tasks (local ones need eval.lm_eval.include_path)"
        )
        raise ConfigError(
            f"eval.lm_eval.tasks: unknown task {unknown[0]!r}{more}, not in {where}{hint}; "
            "`lm-eval ls tasks` lists them"
        )
    return manager


def check_tasks(settings: LmEvalParams) -> None:
    """The harness is installed, the include directory exists and every task name is known."""
    if enabled(settings):
        task_manager(settings)


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES
    )


def load_tasks(manager, settings: LmEvalParams) -> list:
    """The harness's Task and Group objects of every listed name, few-shot counts applied.

    Loading a task loads its data set, so a hub data set that is not cached while offline, or a
    local file that is missing, stops here with one line naming the task.
    """
    top: list = []
    for name in settings.tasks:
        try:
            loaded = manager.load([name])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            advice = (
                "; offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), a hub data set must already be "
                "in the datasets cache: run once online, or define the task on a local file"
                if _offline()
                else "; for a local task, data_files paths are relative to the project root"
            )
            raise DataError(
                f"eval.lm_eval.tasks: {name}: its data could not be loaded ({first}){advice}"
            ) from None
        shots = settings.num_fewshot
        if isinstance(shots, dict):
            shots = shots.get(name)
        if shots is not None:
            for task in loaded["tasks"].values():
                # a task whose config fixes 0 keeps 0, as in the harness's own command
                if task.get_config("num_fewshot") == 0:
                    continue
                task.set_config(key="num_fewshot", value=shots)
        children = {child for kids in loaded["group_map"].values() for child in kids}
        groups = [group for gname, group in loaded["groups"].items() if gname not in children]
        top.extend(groups or loaded["tasks"].values())
    return top


def _metric_values(values: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # name, alias, sample_len; "N/A" stderr
        if not math.isfinite(value):
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """What spinflow keeps of the harness's results: every task's and group's metrics, the
    few-shot counts, the example counts and task versions (no dates, paths or timings, so the
    same model gives the same bytes)."""
    import lm_eval

    return {
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "results": {task: _metric_values(v) for task, v in sorted(results["results"].items())},
        "groups": {g: list(kids) for g, kids in sorted(results.get("group_subtasks", {}).items())},
        "num_fewshot": dict(sorted(results.get("n-shot", {}).items())),
        "samples": dict(sorted(results.get("n-samples", {}).items())),
        "versions": {k: str(v) for k, v in sorted(results.get("versions", {}).items())},
    }


def headline(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The metrics of the listed names: a task's own, a group's aggregate (or, for a group
    without one, its members'); subtasks of a group are left to the results file."""
    groups = summary["groups"]
    members = {kid for kids in groups.values() for kid in kids}
    out: dict[str, dict[str, float]] = {}

    def add(name: str) -> None:
        metrics = summary["results"].get(name, {})
        if metrics or name not in groups:
            out[name] = metrics
        else:
            for kid in groups[name]:
                add(kid)

    for name in summary["results"]:
        if name not in members:
            add(name)
    return out


def _place(model, settings: LmEvalParams):
    import torch

    device = settings.device
    if device == "auto":  # where the stage placed it (spinflow.devices)
        device = str(next(model.parameters()).device)
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    return model.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Benchmarks:
    """The listed tasks, loaded with their data, ready to run on a model."""

    settings: LmEvalParams
    manager: Any
    tasks: list


def prepare(settings: LmEvalParams) -> Benchmarks | None:
    """Check the names and load every task's data (None when ``eval.lm_eval.tasks`` is empty):
    done before the model is loaded, so a bad name or missing data costs no evaluation."""
    if not enabled(settings):
        return None
    manager = task_manager(settings)
    return Benchmarks(settings, manager, load_tasks(manager, settings))


def run(model, tokenizer, benchmarks: Benchmarks) -> dict[str, Any]:
    """Run the harness on ``model``: the summary of :func:`summarize`.

    The model may be moved to ``eval.lm_eval.device`` and cast to its dtype: run this last.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    settings = benchmarks.settings
    model = _place(model, settings).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    log.info("lm-evaluation-harness: %s", ", ".join(settings.tasks))
    results = simple_evaluate(
        lm,
        tasks=benchmarks.tasks,
        task_manager=benchmarks.manager,
        limit=settings.limit,
        log_samples=False,
    )
    return summarize(results)

"""The stage runner: what every ``stages/*.py`` script calls.

``python stages/<script>.py <stage>`` runs one stage of the graph: it loads the validated
params, checks that dvc.yaml still matches them (under DVC), calls the recipe function with the
keyword arguments the graph declares for that stage, and hands the stage to tracking (the one
place MLflow is called from) around and after its work: a training stage's per-step metrics
reach MLflow while it runs. A SpinflowError ends the process with one line on stderr, and
so does a write that fails for want of space or permission (naming the path); when the file at
fault is an output of another stage (a truncated pairs.jsonl, a corrupt checkpoint), the line
says how to restore it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from spinflow.config import PARAMS_FILE, Params, load_params
from spinflow.errors import ConfigError, OutputError, SpinflowError, cannot_write
from spinflow.graph import Graph, build
from spinflow.nodes import VALIDATE_STAGE

StageFunction = Callable[..., Any]


def execute(params: Params, stage_name: str, fn: StageFunction, graph: Graph | None = None) -> Any:
    """Run ``fn`` as the graph's stage ``stage_name``, then log it to MLflow when tracking is on.

    Tracking is checked before the stage starts, so an unreachable server fails at once rather
    than after hours of training. While ``fn`` runs, a training stage's run is open and its
    steps are logged as they are written; a stage that raises leaves its run FAILED
    (:func:`spinflow.tracking.running`).
    """
    graph = graph or build(params)
    stage = graph.stage(stage_name)
    # launched in several processes, the main one alone talks to MLflow; tracking writes
    # nothing DVC hashes, so it is no stage's code dependency (spinflow.pipeline.switched_off)
    if not (stage.track and params.tracking.enabled and is_main_process()):
        return fn(params, **stage.args)
    from spinflow import tracking

    tracking.preflight(params)
    with tracking.running(params, graph, stage):
        result = fn(params, **stage.args)
    tracking.after_stage(params, graph, stage)
    return result


def is_main_process() -> bool:
    """Whether this is the main (rank 0) process of its launch, or the only one; read from the
    launcher's environment so that no distributed state needs to exist yet."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def run_stage(script: str, fn: StageFunction, argv: Sequence[str] | None = None) -> None:
    """Entry point of ``stages/<script>.py``: parse the stage name, run it, one-line errors."""
    parser = argparse.ArgumentParser(prog=f"stages/{script}.py")
    parser.add_argument("stage", help="the DVC stage to run, as named in dvc.yaml")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY",
        help="a key the stage was rendered with that only some params list: a "
        "spin.per_iteration entry, autoif.with_spin (dvc.yaml names it)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    params = None
    try:
        params = load_params(args.params)
        if script != VALIDATE_STAGE:  # it checks the files params.yaml names first, then this
            check_pipeline_file(params)
        graph = build(params)
        stage = graph.stage(args.stage)
        if stage.script != script:
            raise ConfigError(
                f"stage {stage.name!r} is run by stages/{stage.script}.py, not stages/{script}.py"
            )
        expected = stage.overrides
        if sorted(args.override) != expected:
            raise ConfigError(
                f"the command names overrides {sorted(args.override)} but params.yaml gives "
                f"{expected}; run `spinflow pipeline write`"
            )
        result = execute(params, stage.name, fn, graph)
    except SpinflowError as exc:
        hint = _restore_hint(params, exc.path) if not isinstance(exc, OutputError) else ""
        print(f"error: {args.stage}: {exc}{hint}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        error = cannot_write(exc.filename, exc)
        if error is None:
            raise
        print(f"error: {args.stage}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if result is not None:
        logging.getLogger("spinflow").info("%s done: %s", args.stage, result)


def _restore_hint(params: Params | None, path: str | os.PathLike | None) -> str:
    """How to get back a damaged output of another stage, or "" when ``path`` is none."""
    if params is None or path is None:
        return ""
    try:
        stage = build(params).producer(path)
    except SpinflowError:
        return ""
    return (
        f"; it is an output of stage '{stage}': `dvc checkout --force {stage}` restores it "
        f"from the cache, `dvc repro --force --single-item {stage}` makes it again"
    )


def check_pipeline_file(params: Params) -> None:
    """A stage run by DVC stops when dvc.yaml no longer matches params.yaml (for example after
    `dvc exp run -S spin.iterations=5`): the stage list itself would be stale."""
    from spinflow import pipeline

    if os.environ.get("DVC_ROOT") and os.path.exists(pipeline.DVC_FILE):
        problem = pipeline.check(params, pipeline.DVC_FILE)
        if problem:
            raise ConfigError(problem)


def configure_logging() -> None:
    # the other processes of a launch say only what goes wrong: the main one logs the stage
    level = os.environ.get("SPINFLOW_LOG_LEVEL", "INFO") if is_main_process() else "WARNING"
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""MLflow tracking: every stage's results as runs, every SPIN iteration as a registered model.

The stage runner (:func:`spinflow.runner.execute`) calls :func:`preflight` before and
:func:`after_stage` after every stage whose graph node has ``track`` set; what is logged is read
from the pipeline graph (:mod:`spinflow.graph`): each model node with a ``run_name`` has a run,
each evaluation node logs into its model's run. Nothing here knows the recipes.

- :mod:`~spinflow.tracking.store`: where runs go (tracking URI, artifacts, reachability);
- :mod:`~spinflow.tracking.lineage`: the Git commit, ``dvc.lock`` hashes, provenance inputs;
- :mod:`~spinflow.tracking.runs`: the run tree and its metrics, charts and sample tables;
- :mod:`~spinflow.tracking.registry`: registered versions, aliases, cleanup, LoRA adapter info.

Layout of one pipeline in the experiment ``tracking.experiment`` (tagged
``mlflow.experimentKind=finetuning``, so MLflow's UI opens it as model training, not GenAI)::

    spin-<key> / <dvc exp name>     role=pipeline   all params; eval/* stepped by θ index
    ├── theta_0 (sft)               role=baseline   sft + eval_sft
    ├── iter_0 … iter_{N-1}         role=iteration  generate_iter_k + train_iter_k + eval_iter_k
    └── sft_extra                   role=sft_extra  sft_extra + eval_sft_extra

A child run is the graph's model node: its ``run_name``, its ``role`` and its ``iteration``
(θk+1 was made by iteration k). The parent (pipeline) run holds ``eval/<metric>`` at step k for
θk (the model's ``index`` on the SPIN chain: step 0 for θ0, k+1 for θk+1), so one chart shows a
metric against the iteration; ``sft_extra/<metric>`` sits at step N (the baseline trained for
as many steps as all N iterations). Children are nested through the ``mlflow.parentRunId`` tag.
Training metrics are ``train/<key>`` stepped by optimizer step (from the training stage's steps
CSV), evaluation metrics ``eval/<key>``, run summaries ``train_summary/<key>``; ``samples/*.json``
are tables of (prompt, real, generated, task).

Stages are separate processes (and may run in a temporary DVC workspace), so nothing is kept
between them: runs are found again with ``search_runs`` by their tags, ``spinflow.pipeline_key``
(a hash of every parameter except ``tracking``), ``spinflow.role`` and ``spinflow.iteration``.

Tags on a run, per DVC stage ``<stage>`` that logged into it:

- ``dvc.stages``: the stages that logged into the run; ``mlflow.source.git.commit``,
  ``stage.<stage>.git_commit``: ``git rev-parse HEAD`` (or ``DVC_EXP_BASELINE_REV``);
  ``dvc.exp_name`` inside ``dvc exp run``;
- ``stage.<stage>.input.<name>``: sha256 (16 hex) of each input, from the ``provenance.json`` the
  stage wrote (evaluation stages: hashed here). Available as soon as the stage ends; the stage
  that generated an iteration's pairs (the graph's producer of ``generated/iter_k/pairs.jsonl``)
  is tagged on that iteration's run;
- ``stage.<stage>.dvc_lock.<path>``: the hash DVC records for each dependency in ``dvc.lock``.
  While a stage runs, its own ``dvc.lock`` entry is the previous run's, so for the running stage
  only the dependencies that other stages produce are tagged (their entries are current); the
  full entry is tagged by the next stage that logs into the same run and by ``report``.

Idempotence:

- A run is tied to the checkpoint it describes (``spinflow.model_hash``, the hash
  :func:`spinflow.provenance.tree_hash` gives). A stage re-run that yields the same checkpoint
  logs nothing twice (``spinflow.logged.<stage>`` markers); one that yields a different checkpoint
  (or finds a run whose earlier logging broke off) replaces the run: the old run is tagged
  ``spinflow.superseded_by`` and deleted (MLflow keeps it in the trash until ``mlflow gc``).
- Registered versions are reused by ``spinflow.model_hash``. A version is deleted only when it
  was created by this pipeline for that iteration (``spinflow.managed``), no alias points to it,
  the run that created it has been superseded, and no active run of the experiment refers to it.
- The parent's stepped history is compared with the evaluation files on disk; when a value at
  a step changed (a re-run with other results), a new parent run replaces the old one so the
  chart never shows two values for one iteration.

Registered versions are the saved checkpoints, logged with the transformers flavor (pyfunc too)
and explicit pip requirements. LoRA runs save θ with the adapter merged, so the version is the
merged model; ``lora/adapter_config.json`` in the run and the ``spinflow.lora.base`` tag record
the adapter settings and its base (``models:/<name>/<version>`` of θk when registered, else the
checkpoint path; its hash in the config).

``iter_k`` and ``champion`` aliases describe the pipeline that ran last. The champion is the
iteration of that pipeline with the best ``tracking.champion_metric`` (ties: the later one).

Where: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<root>/mlflow.db`` with artifacts in
``<root>/mlartifacts``, where ``<root>`` is the DVC repository root (``DVC_ROOT``; a temporary
workspace under ``.dvc/tmp/exps`` resolves to the repository that holds it). ``python -m
spinflow.tracking uri`` prints it; ``python -m spinflow.tracking sync`` replays the outputs on
disk into MLflow (for example after changing ``tracking.*`` or pointing at a team server).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.graph import EVALUATION, REPORT, TRAINING, Graph, Stage, build
from spinflow.tracking.runs import Tracker
from spinflow.tracking.store import (
    TrackingError,
    artifact_location,
    check_reachable,
    is_main_process,
    pipeline_key,
    project_root,
    require_mlflow,
    tracking_uri,
)

__all__ = [
    "TrackingError",
    "after_stage",
    "artifact_location",
    "check_reachable",
    "pipeline_key",
    "preflight",
    "project_root",
    "sync",
    "tracking_uri",
]

log = logging.getLogger(__name__)


def preflight(params: Params) -> None:
    """Fail fast, before a long stage, when tracking is on but MLflow cannot be used."""
    if params.tracking.enabled and is_main_process():
        require_mlflow()
        check_reachable(tracking_uri())


def after_stage(params: Params, graph: Graph, stage: Stage) -> None:
    """Log what ``stage`` made, by its ``track``:

    - TRAINING: the training of model ``stage.subject`` (params, per-step metrics, samples
      table; an iteration's θk+1 registered as ``iter_k``);
    - EVALUATION: evaluation ``stage.subject`` into the evaluated model's run and, stepped, into
      the pipeline run's charts;
    - REPORT: replay anything missing, settle the champion, attach the report, finish the
      pipeline run.
    """
    if stage.track == TRAINING:
        model = graph.model(stage.subject)
        _track(params, graph, stage.name, lambda t: t.training(model))
    elif stage.track == EVALUATION:
        evaluation = graph.evaluation(stage.subject)
        _track(params, graph, stage.name, lambda t: t.evaluation(evaluation))
    elif stage.track == REPORT:
        _track(params, graph, stage.name, lambda t: t.report())
    elif stage.track is not None:
        raise TrackingError(f"stage {stage.name!r}: nothing is tracked for {stage.track!r}")


def sync(params: Params) -> None:
    """Log every output present on disk (idempotent): for a new key, tracking or server."""
    _track(params, build(params), "sync", lambda t: t.sync_all())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _track(params: Params, graph: Graph, stage: str, action: Callable[[Tracker], Any]) -> None:
    if not params.tracking.enabled or not is_main_process():
        return
    require_mlflow()
    uri = tracking_uri()
    check_reachable(uri)
    try:
        action(Tracker(params, graph, uri, stage))
    except SpinflowError:
        raise
    except Exception as exc:
        log.debug("MLflow tracking failed", exc_info=True)
        raise TrackingError(
            f"MLflow tracking at {uri} failed in {stage}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc

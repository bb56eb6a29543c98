"""The run tree of one pipeline and the metrics in it.

One :class:`Tracker` per stage process: it finds the experiment, the pipeline (parent) run and
the child run of each model again by their tags, logs a stage's outputs into them, keeps the
parent's stepped charts equal to the evaluation files on disk, and settles the registry.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spinflow.config import Params
from spinflow.graph import Graph
from spinflow.io import read_json, read_rows_csv
from spinflow.nodes import BASE, DATA_DIR, ITERATION, REPORT, Evaluation, Model
from spinflow.provenance import tree_hash
from spinflow.timings import read_timings
from spinflow.tracking.lineage import (
    context_tags,
    file_hash,
    git_commit,
    lock_hashes,
    optional_hash,
    provenance_inputs,
    provenance_params,
)
from spinflow.tracking.recovery import fail_interrupted_runs, remove_orphaned_models
from spinflow.tracking.registry import CHAMPION, VALIDATION_PREFIX, Registry
from spinflow.tracking.store import (
    TAG_CANDIDATE,
    TAG_ITERATION,
    TAG_KEY,
    TAG_MODEL_HASH,
    TAG_NOTE,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STAGES,
    TAG_SUPERSEDED,
    TAG_VERSION,
    TAG_WRITER,
    artifact_location,
    pipeline_key,
    writer_alive,
    writer_id,
)

log = logging.getLogger(__name__)

PIPELINE = "pipeline"  # role of the parent run; child runs take their model's role
# MLflow 3's UI opens an experiment as GenAI ("Evaluations") unless it is tagged as model training
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "finetuning"
EXPERIMENT_NOTE = (
    "spinflow SPIN pipelines. Each pipeline run (role=pipeline) nests theta_0, iter_k and "
    "sft_extra runs; its eval/* charts show each metric against the iteration. Select the "
    "iter_k runs and press Compare to put iterations side by side."
)
SAMPLE_COLUMNS = ("prompt", "real", "generated", "task")
# A samples table is an artifact the UI loads whole: each text is cut to CELL_BYTES and rows stop
# at TABLE_BYTES (as stored: JSON, non-ASCII characters escaped), whatever the answers' length.
CELL_BYTES = 8 * 1024
TABLE_BYTES = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Params and metrics as MLflow takes them


def _param_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists and empty mappings become JSON text."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = _param_value(value)
    return out


_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_name(name: str) -> str:
    return _METRIC_NAME.sub("_", name)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric evaluation metrics; ``per_task_pass_rate`` becomes ``pass_rate/<task>``, the
    lm-evaluation-harness metrics ``lm_eval/<task>/<metric>`` and the validation split's
    metrics ``val/<metric>``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            if key == "validation":
                for name, number in eval_scalars(value).items():
                    out[f"{VALIDATION_PREFIX}{name}"] = number
            elif key == "per_task_pass_rate":
                for task, rate in value.items():
                    if (number := _number(rate)) is not None:
                        out[_metric_name(f"pass_rate/{task}")] = number
            elif key == "lm_eval":
                for task, values in value.items():
                    for metric, result in values.items():
                        if (number := _number(result)) is not None:
                            out[_metric_name(f"lm_eval/{task}/{metric}")] = number
            continue
        if (number := _number(value)) is not None:
            out[_metric_name(key)] = number
    return out


def _numbers(data: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric leaves of ``data`` as ``<prefix><key>/<key>…``."""
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif (number := _number(value)) is not None:
            out[_metric_name(f"{prefix}{key}")] = number
    return out


def report_scalars(comparisons: dict[str, Any], diagnostics: dict[str, Any]):
    """The report's own metrics as the pipeline run's stepped charts: ``paired/vs_<model>/
    <metric>`` (with ``_low`` and ``_high``, the 95% paired interval) at θk's step k;
    ``verdict/vs_<model>/…`` and ``verdict/chosen_step`` at step 0; ``diagnostics/<group>/<key>``
    at iteration k's step k. Returns {key: {step: value}}."""
    charts: dict[str, dict[int, float]] = {}
    for entry in (comparisons.get("differences") or {}).values():
        for versus, metrics in entry.items():
            if not versus.startswith("vs_"):
                continue
            for metric, result in metrics.items():
                key = _metric_name(f"paired/{versus}/{metric}")
                for suffix, field in (("", "difference"), ("_low", "low"), ("_high", "high")):
                    if (number := _number(result.get(field))) is not None:
                        charts.setdefault(key + suffix, {})[entry["step"]] = number
    chosen = comparisons.get("chosen") or {}
    if (step := _number(chosen.get("step"))) is not None:
        charts["verdict/chosen_step"] = {0: step}
    for key, number in _numbers(comparisons.get("verdict") or {}, "verdict/").items():
        charts[key] = {0: number}
    for entry in diagnostics.values():
        step = entry["iteration"]
        for key, number in _numbers(entry, "diagnostics/").items():
            if key != "diagnostics/iteration":
                charts.setdefault(key, {})[step] = number
    return charts


def step_metrics(rows: Iterable[dict[str, float]]) -> list[tuple[str, float, int]]:
    """``train/<column>`` at each row's ``step`` (its position, from 1, when it has none)."""
    out = []
    for i, row in enumerate(rows, start=1):
        step = int(row.get("step", i))
        for key, value in row.items():
            if key != "step" and (number := _number(value)) is not None:
                out.append((_metric_name(f"train/{key}"), number, step))
    return out


TRAINING_PREFIXES = ("train/", "train_summary/")


def logged_metrics(client, run_id: str, prefixes: tuple[str, ...]) -> dict[tuple[str, int], float]:
    """(key, step) → value of the run's metrics whose key starts with one of ``prefixes``."""
    run = client.get_run(run_id)
    logged: dict[tuple[str, int], float] = {}
    for key in run.data.metrics:
        if key.startswith(prefixes):
            for metric in client.get_metric_history(run_id, key):
                logged[(key, metric.step)] = metric.value
    return logged


def stored_size(text: str) -> int:
    """Bytes ``text`` takes in a table artifact (pandas' JSON: non-ASCII and ``/`` escaped)."""
    return len(json.dumps(text)) + text.count("/")


def clip(text: str, limit: int = CELL_BYTES) -> str:
    """``text`` within ``limit`` stored bytes: its start and a marker saying how long it was."""
    if len(text) <= limit and stored_size(text) <= limit:
        return text
    marker = f" [… cut: {len(text)} characters in all]"
    budget = limit - stored_size(marker)
    keep = min(len(text), budget)
    while keep > 0 and (size := stored_size(text[:keep])) > budget:
        keep = min(keep - 1, keep * budget // size)
    return text[: max(keep, 0)] + marker


def sample_table(rows: Iterable[dict], limit: int = TABLE_BYTES) -> dict[str, list[str]]:
    """The samples table of ``rows``: every cell clipped, rows kept while the table stays
    within ``limit`` stored bytes."""
    table: dict[str, list[str]] = {c: [] for c in SAMPLE_COLUMNS}
    used = 0
    for row in rows:
        cells = [clip(str(row.get(c, ""))) for c in SAMPLE_COLUMNS]
        size = sum(map(stored_size, cells))
        if used + size > limit:
            break
        used += size
        for column, cell in zip(SAMPLE_COLUMNS, cells, strict=True):
            table[column].append(cell)
    return table


def training_stage(model: Model) -> str | None:
    """The stage that trained ``model``; None for a model no stage trained (θ0 without SFT)."""
    return model.stage if model.train_metrics is not None else None


# ---------------------------------------------------------------------------------------------
# The tracker: one per stage process


class Tracker:
    def __init__(self, params: Params, graph: Graph, uri: str, stage: str):
        import mlflow
        from mlflow import MlflowClient

        self.params = params
        self.graph = graph
        self.uri = uri
        self.stage = stage
        self.key = pipeline_key(params)
        mlflow.set_tracking_uri(uri)  # mlflow.<flavor>.log_model reads the global URI
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment()
        self.commit = git_commit()
        self.registry = Registry(self.client, params, self.key, self.experiment_id, self.commit)
        self._parent_id: str | None = None
        self._model_hashes: dict[Path, str] = {}
        self.writer = writer_id()

    # -- experiment and runs ------------------------------------------------------------------

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.params.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    name,
                    artifact_location=artifact_location(self.uri),
                    tags={TAG_NOTE: EXPERIMENT_NOTE, TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                )
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # a kind someone chose is kept
            self.client.set_experiment_tag(
                experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND
            )
        return experiment.experiment_id

    def _context_tags(self) -> dict[str, str]:
        return context_tags(self.key, self.commit)

    def _find(self, role: str, iteration: int | None = None, tag: str = TAG_ROLE) -> list:
        """Active runs of this pipeline whose ``tag`` (the role, or the candidate role) is
        ``role``, oldest first."""
        query = f"tags.`{TAG_KEY}` = '{self.key}' and tags.`{tag}` = '{role}'"
        if iteration is not None:
            query += f" and tags.`{TAG_ITERATION}` = '{iteration}'"
        runs = self.client.search_runs([self.experiment_id], query, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _create(
        self,
        role: str,
        name: str,
        iteration: int | None,
        tags: dict[str, str],
        tag: str = TAG_ROLE,
    ):
        tags = {**self._context_tags(), tag: role, TAG_WRITER: self.writer, **tags}
        if iteration is not None:
            tags[TAG_ITERATION] = str(iteration)
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name)

    def _find_or_create(self, role: str, name: str, iteration: int | None, tags: dict[str, str]):
        found = self._find(role, iteration)
        if found:
            return found[0]
        run = self._create(role, name, iteration, tags)
        found = self._find(role, iteration)
        if found and found[0].info.run_id != run.info.run_id:  # another process won the race
            self.client.delete_run(run.info.run_id)
            return found[0]
        return run

    def parent_id(self) -> str:
        if self._parent_id is None:
            run = self._find_or_create(PIPELINE, self._parent_name(), None, self._parent_tags())
            self._claim(run, finished=True)
            self._log_params(run, flatten(self.params.model_dump(mode="json")))
            self._parent_id = run.info.run_id
        return self._parent_id

    # -- crashes: who writes a run ---------------------------------------------------------------

    def _claim(self, run, *, finished: bool = False) -> None:
        """Tag ``run`` as written by this process; a run a crash left FAILED is resumed, and so
        is a FINISHED one when ``finished`` (the pipeline run, which :meth:`release` finishes)."""
        run_id = run.info.run_id
        if run.data.tags.get(TAG_WRITER) != self.writer:
            self.client.set_tag(run_id, TAG_WRITER, self.writer)
        if run.info.status in ("FAILED", "KILLED"):
            self.client.update_run(run_id, status="RUNNING")
            log.info("MLflow run %s (%s) resumed", run_id, run.info.run_name)
        elif finished and run.info.status == "FINISHED":
            self.client.update_run(run_id, status="RUNNING")

    def release(self) -> None:
        """The stage's logging is complete: the pipeline run is no longer being written, and is
        FINISHED until a later stage writes into it again (child runs were finished as they were
        logged).

        A pipeline run is RUNNING only while a stage process writes into it: DVC skips the
        report stage when its inputs are unchanged (a re-run whose stages all reproduced the
        same outputs), so no later stage may come to finish it.
        """
        if self._parent_id is not None:
            run = self.client.get_run(self._parent_id)
            if run.data.tags.get(TAG_WRITER) == self.writer:
                self.client.delete_tag(self._parent_id, TAG_WRITER)
            if run.info.status == "RUNNING":
                self.client.set_terminated(self._parent_id)

    def recover(self) -> None:
        """Runs left RUNNING by a stage process that has ended become FAILED; logged models
        no version refers to (checkpoint copies a crash orphaned) are deleted."""
        fail_interrupted_runs(self.client, self.experiment_id, self.writer, self.stage)
        remove_orphaned_models(self.client, self.experiment_id, self.writer, self.uri)

    def _parent_name(self) -> str:
        return os.environ.get("DVC_EXP_NAME") or f"spin-{self.key[:8]}"

    def _parent_tags(self) -> dict[str, str]:
        tracking = self.params.tracking
        return {
            "spinflow.iterations": str(self.params.spin.iterations),
            TAG_NOTE: (
                f"SPIN pipeline `{self.key}` ({self.params.spin.iterations} iterations). "
                f"Charts `eval/*`: step 0 = θ0, step k+1 = θk+1 (SPIN iteration k); "
                f"`sft_extra/*` at step {self.params.spin.iterations}. Registered model "
                f"`{tracking.registered_model}`, aliases `iter_k` and `{CHAMPION}` "
                f"(best validation `{tracking.champion_metric}`, {tracking.champion_mode}; ties "
                "to the earlier iteration)."
            ),
        }

    def _child(self, model: Model, model_hash: str | None):
        """The run describing ``model``; a run describing another checkpoint is replaced."""
        found = self._find(model.role, model.iteration)
        run = found[0] if found else None
        if run is not None and model_hash is not None:
            recorded = run.data.tags.get(TAG_MODEL_HASH)
            if recorded is not None and recorded != model_hash:
                why = f"its checkpoint changed ({recorded} → {model_hash})"
                run = self._supersede(run, model, why)
        if run is None:
            run = self._find_or_create(
                model.role, model.run_name, model.iteration, {TAG_PARENT: self.parent_id()}
            )
        if run.data.tags.get(TAG_PARENT) != self.parent_id():
            self.client.set_tag(run.info.run_id, TAG_PARENT, self.parent_id())
        if model_hash is not None and run.data.tags.get(TAG_MODEL_HASH) != model_hash:
            self.client.set_tag(run.info.run_id, TAG_MODEL_HASH, model_hash)
        self._claim(run)
        return self.client.get_run(run.info.run_id)

    def _supersede(self, run, model: Model, why: str):
        new = self._create(
            model.role, model.run_name, model.iteration, {TAG_PARENT: self.parent_id()}
        )
        old = run.info.run_id
        self.client.set_tag(old, TAG_SUPERSEDED, new.info.run_id)
        self.client.delete_run(old)
        log.info("MLflow run %s (%s) replaced by %s: %s", old, model.run_name, new.info.run_id, why)
        return new

    # -- a training stage's run while it runs ------------------------------------------------------

    def _writable(self, run) -> bool:
        """Whether this process may write into ``run``: its writer is this process or has ended."""
        writer = run.data.tags.get(TAG_WRITER)
        return not writer or writer == self.writer or not writer_alive(writer)

    def begin_training(self, model: Model):
        """The run that ``model``'s training stage writes its per-step metrics into while it runs,
        RUNNING and claimed by this process.

        - none yet: the model's run, created as :meth:`training` would create it;
        - the model's run exists but no training was logged into it to the end (a killed or
          failed attempt): that run, continued; steps it holds are not logged again;
        - the model's run holds a finished training: a re-run, which may make the same
          checkpoint or another. A candidate run (tagged ``spinflow.candidate`` with the
          model's role, no ``spinflow.role``) takes its metrics; when the stage ends,
          :meth:`training` deletes it if the checkpoint is the same (the earlier run stays) or
          puts it in the earlier run's place if not. A candidate left by a killed re-run is
          continued.
        """
        candidates = [
            r for r in self._find(model.role, model.iteration, TAG_CANDIDATE) if self._writable(r)
        ]
        found = self._find(model.role, model.iteration)
        if candidates:
            run = candidates[0]
        elif found and found[0].data.tags.get(f"spinflow.logged.{training_stage(model)}"):
            run = self._create(
                model.role,
                model.run_name,
                model.iteration,
                {TAG_PARENT: self.parent_id()},
                tag=TAG_CANDIDATE,
            )
            log.info(
                "MLflow run %s (%s) holds an earlier training; this one goes to run %s until "
                "it ends",
                found[0].info.run_id,
                model.run_name,
                run.info.run_id,
            )
        else:
            return self._child(model, None)
        if run.data.tags.get(TAG_PARENT) != self.parent_id():
            self.client.set_tag(run.info.run_id, TAG_PARENT, self.parent_id())
        self._claim(run)
        return self.client.get_run(run.info.run_id)

    def _settle_candidate(self, model: Model, model_hash: str) -> None:
        """A re-run's candidate run (:meth:`begin_training`) once its checkpoint is known:
        deleted when the model's run already describes that checkpoint, else the model's run,
        the earlier one superseded."""
        marker = f"spinflow.logged.{training_stage(model)}"
        for candidate in self._find(model.role, model.iteration, TAG_CANDIDATE):
            if not self._writable(candidate):
                continue  # a re-run still at work
            found = self._find(model.role, model.iteration)
            current = found[0] if found else None
            candidate_id = candidate.info.run_id
            if current is not None and current.data.tags.get(marker) == model_hash:
                self.client.delete_run(candidate_id)
                log.info(
                    "MLflow run %s (%s) kept: the re-run made the same checkpoint; run %s deleted",
                    current.info.run_id,
                    model.run_name,
                    candidate_id,
                )
                continue
            self.client.set_tag(candidate_id, TAG_ROLE, model.role)
            self.client.delete_tag(candidate_id, TAG_CANDIDATE)
            if current is not None:
                self.client.set_tag(current.info.run_id, TAG_SUPERSEDED, candidate_id)
                self.client.delete_run(current.info.run_id)
                log.info(
                    "MLflow run %s (%s) replaced by %s: the re-run made another checkpoint",
                    current.info.run_id,
                    model.run_name,
                    candidate_id,
                )

    # -- logging primitives ---------------------------------------------------------------------

    def _log_params(self, run, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        have = run.data.params
        new = {}
        for key, value in values.items():
            value = value[:6000]
            if key not in have:
                new[key] = value
            elif have[key] != value:
                log.debug("param %s already logged as %r, not %r", key, have[key], value)
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in new.items()])

    def _log_metrics(self, run_id: str, rows: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in rows]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def _stage_tags(self, run, stage: str, inputs: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = dict(self._context_tags())
        if self.commit:
            tags[f"stage.{stage}.git_commit"] = self.commit
        tags.update({f"stage.{stage}.input.{name}": h for name, h in inputs.items()})
        for path, h in lock_hashes(stage, running=self.stage).items():
            tags[f"stage.{stage}.dvc_lock.{path}"] = h
        current = self.client.get_run(run.info.run_id).data.tags
        stages = [s for s in current.get(TAG_STAGES, "").split(",") if s]
        if stage not in stages:
            tags[TAG_STAGES] = ",".join([*stages, stage])
        tags = {k: v for k, v in tags.items() if current.get(k) != v}
        self.client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _table(self, run_id: str, source: Path, artifact_file: str) -> None:
        """The first ``tracking.table_rows`` records of a JSONL file as an MLflow table, once;
        long texts cut (:func:`sample_table`)."""
        limit = self.params.tracking.table_rows
        if limit == 0 or not source.is_file():
            return
        folder, _, _ = artifact_file.rpartition("/")
        if any(f.path == artifact_file for f in self.client.list_artifacts(run_id, folder or None)):
            return
        rows = []
        with open(source, encoding="utf-8") as f:
            for line in f:
                if len(rows) >= limit:
                    break
                if line.strip():
                    rows.append(json.loads(line))
        data = sample_table(rows)
        if len(data[SAMPLE_COLUMNS[0]]) < len(rows):
            log.info(
                "%s: %d of %d rows fit in %d bytes",
                artifact_file,
                len(data[SAMPLE_COLUMNS[0]]),
                len(rows),
                TABLE_BYTES,
            )
        if data[SAMPLE_COLUMNS[0]]:
            self.client.log_table(run_id, data=data, artifact_file=artifact_file)

    def _model_hash(self, directory: Path) -> str | None:
        if directory not in self._model_hashes:
            if not (directory / "config.json").is_file():
                return None
            self._model_hashes[directory] = tree_hash(directory)
        return self._model_hashes[directory]

    def chart_step(self, model: Model) -> int:
        """x of ``model``'s evaluation in the parent's charts (the graph says): k for θk; the
        SFT-extra baseline at ``spin.iterations``, the steps of all iterations it matches."""
        return model.step

    # -- stages ----------------------------------------------------------------------------------

    def training(self, model: Model, *, settle: bool = True):
        """Log a training stage's outputs into ``model``'s run (nothing twice for one checkpoint).

        ``settle``: also move the champion alias and delete superseded versions.
        """
        stage = training_stage(model)
        model_hash = self._model_hash(model.path)
        if model_hash is None or stage is None:
            return None
        self._settle_candidate(model, model_hash)
        run = self._child(model, model_hash)
        marker = f"spinflow.logged.{stage}"
        if run.data.tags.get(marker) != model_hash:
            # the stage's live metrics, or an attempt that broke off half-way, may be there
            wanted = {(key, step): value for key, value, step in self._training_metrics(model)}
            logged = logged_metrics(self.client, run.info.run_id, TRAINING_PREFIXES)
            if any(k not in wanted or not _same(v, wanted[k]) for k, v in logged.items()):
                # one value per step: start clean rather than mix two trainings
                run = self._supersede(run, model, "its training metrics differ from the stage's")
                self.client.set_tag(run.info.run_id, TAG_MODEL_HASH, model_hash)
                run = self.client.get_run(run.info.run_id)
                logged = {}
            missing = [(k, v, step) for (k, step), v in wanted.items() if (k, step) not in logged]
            self._log_training(run, model, missing)
            self.client.set_tag(run.info.run_id, marker, model_hash)
            run = self.client.get_run(run.info.run_id)
        if model.role == ITERATION:
            pairs = model.pairs[-1]  # its own iteration's (those mixed in come before)
            self._stage_tags(run, self.graph.producer(pairs), provenance_inputs(pairs.parent))
        self._stage_tags(run, stage, provenance_inputs(model.path))
        if model.role == ITERATION and self.params.tracking.log_models:
            self.registry.register(run, model, model_hash)
            if settle:
                self._settle_registry()
        self.client.set_terminated(run.info.run_id)
        return run

    def _training_metrics(self, model: Model) -> list[tuple[str, float, int]]:
        """What a training stage's outputs put in its run: ``train/*`` per step, from its steps
        CSV, and ``train_summary/*`` at step 0, from its summary and timings."""
        metrics = step_metrics(read_rows_csv(model.steps_csv))
        summary = {}
        if model.train_metrics is not None and model.train_metrics.is_file():
            skip = {"iteration", "beta", "learning_rate"}
            summary = {
                key: value
                for key, value in read_json(model.train_metrics).items()
                if not key.startswith("final_") and key not in skip
            }
        summary.update(read_timings(model.timings, model.path))
        for key, value in summary.items():
            if (number := _number(value)) is not None:
                metrics.append((_metric_name(f"train_summary/{key}"), number, 0))
        return metrics

    def _log_training(self, run, model: Model, metrics: list[tuple[str, float, int]]) -> None:
        run_id = run.info.run_id
        params = flatten(provenance_params(model.path))
        if model.iteration is not None:
            params["iteration"] = str(model.iteration)
        self._log_params(run, params)
        self._log_metrics(run_id, metrics)
        if model.role == ITERATION:
            self._table(run_id, model.pairs[-1], f"samples/{model.stage}.json")
        lora = self.registry.lora(model)
        if lora is not None:
            self.client.log_dict(run_id, lora, "lora/adapter_config.json")
            self.client.set_tag(run_id, "spinflow.lora.base", lora["base_model_name_or_path"])

    def evaluation(self, evaluation: Evaluation, *, sync_parent: bool = True):
        """Log ``evaluation`` into its model's run (after its training) and into the parent."""
        path = evaluation.metrics
        if not path.is_file():
            return None
        model = self.graph.model(evaluation.model)
        model_hash = self._model_hash(model.path)
        trained = training_stage(model) and model.train_metrics.is_file()
        run = self.training(model, settle=False) if trained else None
        if run is None:
            run = self._child(model, model_hash)
        else:
            run = self.client.get_run(run.info.run_id)
        run_id = run.info.run_id
        metrics_hash = file_hash(path)
        marker = f"spinflow.logged.{evaluation.stage}"
        scalars = eval_scalars(read_json(path))
        if run.data.tags.get(marker) != metrics_hash:
            params = {
                **flatten(self.params.eval.model_dump(mode="json"), "eval."),
                **flatten(self.params.prompt.model_dump(mode="json"), "prompt."),
            }
            self._log_params(run, params)
            step = self.chart_step(model)
            self._log_metrics(run_id, ((f"eval/{k}", v, step) for k, v in scalars.items()))
            self.client.set_tag(run_id, marker, metrics_hash)
        self._table(run_id, evaluation.generations, f"samples/{evaluation.stage}.json")
        inputs = {"model": model_hash, "test": optional_hash(DATA_DIR / "test.jsonl")}
        self._stage_tags(run, evaluation.stage, {k: v for k, v in inputs.items() if v})
        version = run.data.tags.get(TAG_VERSION)
        if version and self.params.tracking.log_models:
            self.registry.tag_version(
                version, {f"eval.{k}": str(v) for k, v in scalars.items() if "/" not in k}
            )
        self.client.set_terminated(run_id)
        if sync_parent:
            self._sync_parent(upto=model)
            if model.role == ITERATION:
                self._settle_registry()
        return run

    def sync_all(self) -> None:
        """Log every output on disk: each evaluated model's training and evaluation, the charts."""
        for model, evaluation in self.graph.evaluated():
            if evaluation.metrics.is_file():
                self.evaluation(evaluation, sync_parent=False)
            elif model.train_metrics is not None and model.train_metrics.is_file():
                self.training(model, settle=False)
        self._sync_parent(upto=None)
        self._settle_registry()

    def report(self) -> None:
        """Replay anything missing, attach the report, tag the pipeline's own stages, finish."""
        self.sync_all()
        parent = self.parent_id()
        report = self.graph.stage("report")
        for path in (*report.uncached_outs, *(plot.path for plot in report.plots)):
            if Path(path).is_file():
                self.client.log_artifact(parent, str(path), "report")
        for stage in self._pipeline_stages():
            self._stage_tags(self.client.get_run(parent), stage, {})
        self._verdict_tags(parent)
        self.client.set_terminated(parent)

    def _verdict_tags(self, parent: str) -> None:
        """The report's verdict on the pipeline run: the iteration chosen on the validation
        split (``spinflow.chosen_model``) and one sentence per baseline
        (``spinflow.verdict.vs_<model>``)."""
        comparisons_file = self._report_metrics().get("comparisons")
        if comparisons_file is None or not comparisons_file.is_file():
            return
        comparisons = read_json(comparisons_file)
        tags = {"spinflow.chosen_model": str((comparisons.get("chosen") or {}).get("model"))}
        for versus, verdict in (comparisons.get("verdict") or {}).items():
            tags[f"spinflow.verdict.{versus}"] = str(verdict.get("sentence", ""))
        current = self.client.get_run(parent).data.tags
        for key, value in tags.items():
            if current.get(key) != value:
                self.client.set_tag(parent, key, value)

    def _pipeline_stages(self) -> list[str]:
        """Stages that no child run describes: the base model's, the data's and the report."""
        base = [m.stage for m in self.graph.models.values() if m.role == BASE]
        report = [s.name for s in self.graph.stages.values() if s.track == REPORT]
        return [*base, self.graph.producer(DATA_DIR), *report]

    # -- the pipeline run's charts -----------------------------------------------------------------

    def _desired_parent_history(self, upto: Model | None) -> dict[str, dict[int, float]]:
        """Stepped metrics the parent should hold, from the evaluation files on disk.

        During the evaluation of ``upto`` only that evaluation and those upstream of it are
        current: θ0's and the iterations' up to it (each evaluation uses the previous one's
        answers); for the SFT-extra baseline, θ0's and its own.
        """
        desired: dict[str, dict[int, float]] = {}
        for model, evaluation in self.graph.evaluated():
            step = self.chart_step(model)
            if upto is None:
                current = True
            elif upto.index is None:  # off the chain: its own evaluation and θ0's
                current = model.name == upto.name or model.index == 0
            else:
                current = model.index is not None and model.index <= upto.index
            if not current or not evaluation.metrics.is_file():
                continue
            prefix = model.chart
            for key, value in eval_scalars(read_json(evaluation.metrics)).items():
                desired.setdefault(f"{prefix}/{key}", {})[step] = value
        report = self._report_metrics()
        found = [report.get(name) for name in ("comparisons", "diagnostics")]
        if upto is None and all(path is not None and path.is_file() for path in found):
            desired.update(report_scalars(*(read_json(path) for path in found)))
        return desired

    def _report_metrics(self) -> dict[str, Path]:
        """The report stage's metric files by name (SPIN's report writes comparisons.json, the
        paired differences and the verdict, and diagnostics.json)."""
        return {Path(path).stem: Path(path) for path in self.graph.stage("report").metrics}

    def _sync_parent(self, upto: Model | None) -> None:
        desired = self._desired_parent_history(upto)
        parent = self.client.get_run(self.parent_id())
        existing: dict[str, dict[int, float]] = {}
        for key in desired:
            if key in parent.data.metrics:
                latest: dict[int, float] = {}
                history = self.client.get_metric_history(parent.info.run_id, key)
                for m in sorted(history, key=lambda m: m.timestamp):
                    latest[m.step] = m.value
                existing[key] = latest
        changed = any(
            step in existing.get(key, {}) and not _same(existing[key][step], value)
            for key, steps in desired.items()
            for step, value in steps.items()
        )
        if changed:
            self._replace_parent(parent)
            existing = {}
        self._log_metrics(
            self.parent_id(),
            (
                (key, value, step)
                for key, steps in desired.items()
                for step, value in sorted(steps.items())
                if step not in existing.get(key, {})
            ),
        )

    def _replace_parent(self, old) -> None:
        """A fresh pipeline run for a re-run whose evaluations changed; children move over."""
        old_id = old.info.run_id
        new = self._create(PIPELINE, old.info.run_name, None, self._parent_tags())
        new_id = new.info.run_id
        self._log_params(new, flatten(self.params.model_dump(mode="json")))
        children = self.client.search_runs(
            [self.experiment_id], f"tags.`{TAG_PARENT}` = '{old_id}'", max_results=1000
        )
        for child in children:
            self.client.set_tag(child.info.run_id, TAG_PARENT, new_id)
        for key in (TAG_STAGES, *[k for k in old.data.tags if k.startswith("stage.")]):
            if key in old.data.tags:
                self.client.set_tag(new_id, key, old.data.tags[key])
        self.client.set_tag(old_id, TAG_SUPERSEDED, new_id)
        self.client.delete_run(old_id)
        self._parent_id = new_id
        log.info("MLflow pipeline run %s replaced by %s: evaluations changed", old_id, new_id)

    # -- registry ----------------------------------------------------------------------------------

    def _settle_registry(self) -> None:
        """Move the champion alias (tagged on the parent) and delete superseded versions."""
        if not self.params.tracking.log_models:
            return
        runs = {}
        for model in self.graph.models.values():
            if model.role == ITERATION and (found := self._find(ITERATION, model.iteration)):
                runs[model.iteration] = found[0]
        champion = self.registry.update_champion(runs)
        if champion is not None:
            k, version = champion
            parent = self.parent_id()
            self.client.set_tag(parent, "spinflow.champion_iteration", str(k))
            self.client.set_tag(parent, "spinflow.champion_version", version)
        self.registry.cleanup()

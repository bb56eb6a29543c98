"""What a crashed stage leaves in MLflow, put right by the next stage that logs.

A stage process killed while it logs (``kill -9``, out of memory, a power cut) leaves its runs
RUNNING and, when it was logging a model, a logged model (a whole checkpoint copy) that no
registered version refers to. Every stage process tags the runs it writes with its
``spinflow.writer`` (host, pid, start time: :func:`~spinflow.tracking.store.writer_id`), so the
next stage can tell a run whose writer is still at work from one whose writer is gone:

- a run of this experiment still RUNNING whose writer has ended becomes FAILED, with a
  ``spinflow.interrupted`` tag saying which process left it; a later stage of the same pipeline
  that logs into it again sets it RUNNING and finishes it (resumed);
- a logged model of a spinflow run that no model version (of any registered model) refers to,
  whose run no live process is writing, is deleted with its artifacts.

Writers on another host cannot be checked from here and are left alone.
"""

from __future__ import annotations

import logging
import time

from spinflow.tracking.store import TAG_INTERRUPTED, TAG_KEY, TAG_WRITER, writer_alive

log = logging.getLogger(__name__)

PAGE = 1000


def _pages(search, **kwargs) -> list:
    items, token = [], None
    while True:
        page = search(max_results=PAGE, page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _left_by_dead_writer(run, me: str) -> bool:
    writer = run.data.tags.get(TAG_WRITER)
    return bool(writer) and writer != me and not writer_alive(writer)


def fail_interrupted_runs(client, experiment_id: str, me: str, stage: str) -> list[str]:
    """Mark FAILED the spinflow runs still RUNNING whose writer process has ended."""
    runs = _pages(
        client.search_runs,
        experiment_ids=[experiment_id],
        filter_string="attributes.status = 'RUNNING'",
    )
    failed = []
    for run in runs:
        if TAG_KEY not in run.data.tags or not _left_by_dead_writer(run, me):
            continue
        run_id = run.info.run_id
        writer = run.data.tags[TAG_WRITER]
        client.set_tag(
            run_id,
            TAG_INTERRUPTED,
            f"its stage process ({writer}) ended without finishing it; marked FAILED by {stage}",
        )
        client.set_terminated(run_id, status="FAILED", end_time=int(time.time() * 1000))
        log.warning(
            "MLflow run %s (%s) was left RUNNING by a stage process that ended (%s): marked FAILED",
            run_id,
            run.info.run_name,
            writer,
        )
        failed.append(run_id)
    return failed


def referenced_models(client) -> set[str]:
    """Logged model ids that a version of any registered model refers to."""
    ids = set()
    for version in _pages(client.search_model_versions):
        if version.model_id:
            ids.add(version.model_id)
        source = version.source or ""
        if source.startswith("models:/"):
            ids.add(source.removeprefix("models:/").split("/", 1)[0])
    return ids


def remove_orphaned_models(client, experiment_id: str, me: str, tracking_uri: str) -> list[str]:
    """Delete, with their artifacts, the logged models of spinflow runs that no version refers
    to and that no live stage process is writing."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    models = _pages(client.search_logged_models, experiment_ids=[experiment_id])
    if not models:
        return []
    referenced = referenced_models(client)
    removed = []
    for model in models:
        if model.model_id in referenced or not model.source_run_id:
            continue
        try:
            run = client.get_run(model.source_run_id)
        except MlflowException:
            continue
        writer = run.data.tags.get(TAG_WRITER)
        if TAG_KEY not in run.data.tags or (writer and writer != me and writer_alive(writer)):
            continue
        try:
            repository = get_artifact_repository(model.artifact_location, tracking_uri=tracking_uri)
            repository.delete_artifacts()
        except Exception as exc:  # the store cannot delete: keep the record that points at them
            log.warning(
                "orphaned logged model %s kept: its artifacts at %s could not be deleted (%s)",
                model.model_id,
                model.artifact_location,
                exc,
            )
            continue
        client.delete_logged_model(model.model_id)
        log.warning(
            "deleted logged model %s (%s) of run %s: no registered version refers to it",
            model.model_id,
            model.name,
            model.source_run_id,
        )
        removed.append(model.model_id)
    return removed

"""MLflow tracking: every stage's results as runs, every SPIN iteration as a registered model.

The stage runner (:func:`spinflow.runner.execute`) calls :func:`preflight` before, runs the
stage inside :func:`running` (a training stage's steps logged while it runs, a failure marked on
its run) and calls :func:`after_stage` after every stage whose graph node has ``track`` set;
what is logged is read from the pipeline graph (:mod:`spinflow.graph`): each model node with a
``run_name`` has a run, each evaluation node logs into its model's run. Nothing here knows the
recipes.

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
are tables of (prompt, real, generated, task), each text cut to 8 KiB and each table to 1 MiB.

A run is RUNNING while a stage process writes into it and FINISHED once that stage has logged,
the pipeline run too: DVC skips the report stage when its inputs are unchanged, so no stage may
come after to finish it. The report stage, and ``sync``, attach the report on disk to it.

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
  (or finds training metrics in the run that differ from its own) replaces the run: the old run
  is tagged ``spinflow.superseded_by`` and deleted (MLflow keeps it in the trash until ``mlflow
  gc``). A run whose earlier logging broke off, or that holds the steps logged while the stage
  ran, gets only the (metric, step) pairs it lacks. A re-run of a finished training writes into
  a candidate run until it ends (:meth:`~spinflow.tracking.runs.Tracker.begin_training`).
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
iteration of that pipeline with the best ``tracking.champion_metric`` on the validation split
(``eval/val/<metric>``; ties: the earlier one), the rule the report's verdict uses; the test
split plays no part in it. The report stage adds its paired differences, verdict and
per-iteration diagnostics to the pipeline run (:func:`~spinflow.tracking.runs.report_scalars`).

Where: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<root>/mlflow.db`` with artifacts in
``<root>/mlartifacts``, where ``<root>`` is the DVC repository root (``DVC_ROOT``; a temporary
workspace under ``.dvc/tmp/exps`` resolves to the repository that holds it). ``python -m
spinflow.tracking uri`` prints it; ``python -m spinflow.tracking sync`` replays the outputs on
disk into MLflow (for example after changing ``tracking.*`` or pointing at a team server).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.graph import Graph, build
from spinflow.nodes import EVALUATION, REPORT, TRAINING, Stage
from spinflow.tracking import live, pending
from spinflow.tracking.runs import Tracker
from spinflow.tracking.store import (
    TAG_FAILED,
    TrackingError,
    artifact_location,
    check_reachable,
    is_main_process,
    pipeline_key,
    project_root,
    redact,
    require_mlflow,
    tracking_uri,
)

__all__ = [
    "TrackingError",
    "after_stage",
    "artifact_location",
    "check_reachable",
    "permanent",
    "pipeline_key",
    "preflight",
    "project_root",
    "redact",
    "running",
    "sync",
    "tracking_uri",
]

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
SYNC = "sync"  # the stage name :func:`sync` logs under


def preflight(params: Params) -> None:
    """Fail fast, before a long stage, when tracking is on but MLflow cannot be used: the server
    does not answer, or its API keeps failing for ``tracking.retry_seconds``."""
    if not params.tracking.enabled or not is_main_process():
        return
    require_mlflow()
    uri = tracking_uri()
    check_reachable(uri)
    if not uri.startswith(("http://", "https://")):
        return
    budget = params.tracking.retry_seconds

    def probe() -> None:
        from mlflow import MlflowClient

        check_reachable(uri)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)

    try:
        _with_retries(probe, budget)
    except Exception as exc:
        if permanent(exc):
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} refused the request "
                f"({_first_line(exc)}) before the stage started, so nothing was computed; it "
                "will refuse it again: check the credentials (in the URI or "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN) and "
                "the server's address, or set tracking.enabled: false"
            ) from None
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} failed ({_first_line(exc)}) for {budget:g} s "
            "(tracking.retry_seconds) before the stage started, so nothing was computed; fix "
            "the server or set tracking.enabled: false"
        ) from None


def after_stage(params: Params, graph: Graph, stage: Stage) -> None:
    """Log what ``stage`` made, by its ``track``:

    - TRAINING: the training of model ``stage.subject`` (params, per-step metrics, samples
      table; an iteration's θk+1 registered as ``iter_k``);
    - EVALUATION: evaluation ``stage.subject`` into the evaluated model's run and, stepped, into
      the pipeline run's charts;
    - REPORT: replay anything missing, settle the champion, attach the report, finish the
      pipeline run.

    When MLflow keeps failing, the stage's results stay: one warning, and the stage is recorded
    as pending (replayed by the next tracked stage or by :func:`sync`). When MLflow refuses what
    it will refuse every time (:func:`permanent`), the warning says so and only :func:`sync`
    replays the stage.
    """
    if stage.track is None:
        return
    action = _action(graph, stage)
    if not params.tracking.enabled or not is_main_process():
        return
    require_mlflow()
    uri, key = tracking_uri(), pipeline_key(params)
    try:
        _track(params, graph, stage.name, action)
    except Exception as exc:
        _log_traceback()
        error = _first_line(exc)
        if permanent(exc):
            pending.add(stage.name, key, uri, error, replay=False)
            log.warning(
                "%s: its results are kept, but MLflow at %s refused them (%s) and will every "
                "time; it is recorded in %s and not replayed by later stages: fix the cause, "
                "then run `python -m spinflow.tracking sync`",
                stage.name,
                redact(uri),
                error,
                pending.PENDING_FILE,
            )
            return
        pending.add(stage.name, key, uri, error)
        log.warning(
            "%s: its results are kept, but MLflow tracking at %s failed (%s); it is recorded in "
            "%s and logged by the next tracked stage or `python -m spinflow.tracking sync`",
            stage.name,
            redact(uri),
            error,
            pending.PENDING_FILE,
        )


class _OpenRun:
    """A training stage's run, opened as the stage starts, and the thread following its steps."""

    def __init__(self, tracker: Tracker, run_id: str, follower: live.LiveMetrics | None):
        self.tracker = tracker
        self.run_id = run_id
        self.follower = follower

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()

    def fail(self, stage: str, error: BaseException) -> None:
        """The stage raised ``error``: its steps so far logged, its run FAILED (KILLED on
        Ctrl-C); a failure of MLflow here is one warning, never in place of ``error``."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        client = self.tracker.client
        try:
            self.stop()
            client.set_tag(self.run_id, TAG_FAILED, f"{stage}: {_first_line(error)}")
            client.set_terminated(self.run_id, status=status)
            self.tracker.release()
        except Exception as exc:
            _log_traceback()
            log.warning(
                "%s: its MLflow run %s could not be marked %s (%s); the next tracked stage or "
                "`python -m spinflow.tracking sync` marks it FAILED",
                stage,
                self.run_id,
                status,
                _first_line(exc),
            )


def _open(params: Params, graph: Graph, stage: Stage) -> _OpenRun | None:
    """Open ``stage``'s run when it is a training stage that writes a steps file, and follow the
    file; None for other stages, or when MLflow fails now (then one warning: the stage still
    logs everything when it ends)."""
    if stage.track != TRAINING or not params.tracking.enabled or not is_main_process():
        return None
    model = graph.model(stage.subject)
    if model.steps_csv is None:
        return None
    every = live.interval()
    uri = tracking_uri()

    def attempt() -> tuple[Tracker, str]:
        check_reachable(uri)
        tracker = Tracker(params, graph, uri, stage.name)
        tracker.recover()
        return tracker, tracker.begin_training(model).info.run_id

    try:
        tracker, run_id = _with_retries(attempt, params.tracking.retry_seconds)
    except Exception as exc:
        _log_traceback()
        log.warning(
            "%s: its MLflow run could not be opened at %s (%s); its metrics are logged when it "
            "ends",
            stage.name,
            redact(uri),
            _first_line(exc),
        )
        return None
    follower = None
    if every > 0:
        follower = live.LiveMetrics(tracker.client, run_id, model.steps_csv, every).start()
    return _OpenRun(tracker, run_id, follower)


@contextlib.contextmanager
def running(params: Params, graph: Graph, stage: Stage) -> Iterator[None]:
    """Around the work of a tracked stage (the stage runner's ``with``), before
    :func:`after_stage`.

    A training stage's run is opened (found or created as :func:`after_stage` finds it) when
    the stage starts, and a thread logs the steps its steps CSV gains (:mod:`.live`); when the
    stage returns, the thread stops after logging the file's last steps, and
    :func:`after_stage` completes the same run, logging no step twice. When the stage raises,
    the run is marked FAILED (KILLED on Ctrl-C), with ``spinflow.failed`` saying why. A stage
    killed outright leaves its run RUNNING: the next tracked stage, or sync, marks it FAILED
    (:mod:`.recovery`).

    While the run is open, MLflow's client does not retry a failed request for minutes
    (:func:`_mlflow_http`): the thread tries again at its next look, and the stage's end is
    not held up by a server that is down."""
    opened = _open(params, graph, stage)
    if opened is None:
        yield
        return
    with _mlflow_http(params.tracking.retry_seconds):
        try:
            yield
        except BaseException as error:
            opened.fail(stage.name, error)
            raise
        opened.stop()


def sync(params: Params) -> None:
    """Log every output present on disk (idempotent): for a new key, tracking or server; the
    report too when it is on disk. Everything pending for these params is then logged, what
    MLflow refused before included; raises TrackingError when MLflow fails."""
    if not params.tracking.enabled or not is_main_process():
        return
    require_mlflow()
    uri = tracking_uri()
    try:
        _track(params, build(params), SYNC, lambda t: t.report())
    except SpinflowError:
        raise
    except Exception as exc:
        _log_traceback()
        raise TrackingError(
            f"MLflow tracking at {redact(uri)} failed in sync: {_first_line(exc)}"
        ) from None


def _action(graph: Graph, stage: Stage) -> Callable[[Tracker], Any]:
    if stage.track == TRAINING:
        model = graph.model(stage.subject)
        return lambda t: t.training(model)
    if stage.track == EVALUATION:
        evaluation = graph.evaluation(stage.subject)
        return lambda t: t.evaluation(evaluation)
    if stage.track == REPORT:
        return lambda t: t.report()
    raise TrackingError(f"stage {stage.name!r}: nothing is tracked for {stage.track!r}")


_HTTP_STATUS = re.compile(r"too many (\d{3}) error responses|error code (\d{3})")
_ENDPOINT = re.compile(r"(/api/[\w./-]+)")


def _first_line(exc: BaseException) -> str:
    """The error in one short line, without secrets; an HTTP failure as its status and
    endpoint."""
    message = redact(str(exc))
    lines = message.strip().splitlines()
    text = lines[0][:300] if lines else ""
    status = _HTTP_STATUS.search(message)
    if status:
        endpoint = _ENDPOINT.search(message)
        where = f" from {endpoint.group(1)}" if endpoint else ""
        return f"HTTP {status.group(1) or status.group(2)}{where}"
    if isinstance(exc, SpinflowError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _log_traceback() -> None:
    """The traceback being handled, at debug level, without secrets."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("MLflow tracking failed: %s", redact(traceback.format_exc()))


# MLflow's error codes for a request the server refuses as it stands: it will refuse it again,
# so retrying only repeats the work (a checkpoint upload) and the failure. BAD_REQUEST and
# RESOURCE_ALREADY_EXISTS are not among them: MLflow's database stores also give those when two
# writers race, and then looking again succeeds.
PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "ENDPOINT_NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
    }
)


# HTTP statuses of 4xx that a later request may not get: a timeout, a conflict, too many requests
_PASSING_STATUS = frozenset({408, 409, 425, 429})


def permanent(exc: BaseException) -> bool:
    """Whether MLflow refused a request that it will refuse every time (HTTP 401, 403, 404, an
    invalid value; any other 4xx answer without MLflow's error code, from a proxy say):
    retrying cannot help."""
    code = getattr(exc, "error_code", None)
    if isinstance(code, str) and code in PERMANENT_ERRORS:
        return True
    status = _HTTP_STATUS.search(str(exc))
    if status is None:
        return False
    number = int(status.group(1) or status.group(2))
    return 400 <= number < 500 and number not in _PASSING_STATUS


@contextlib.contextmanager
def _mlflow_http(budget: float) -> Iterator[None]:
    """MLflow's own HTTP retries off (they wait about 4 minutes), so ``budget`` bounds the time;
    a request may wait for an answer as long as the budget, at least 30 s, at most 120 s."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ:
        settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(min(120, max(30, math.ceil(budget))))
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _with_retries(attempt: Callable[[], Any], budget: float) -> Any:
    """Call ``attempt`` until it succeeds or ``budget`` seconds have passed (then re-raise)."""
    deadline = time.monotonic() + budget
    delay = 1.0
    with _mlflow_http(budget):
        while True:
            try:
                return attempt()
            except Exception as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or permanent(exc):
                    raise
                log.info(
                    "MLflow tracking failed (%s); retrying for %.0f s more",
                    _first_line(exc),
                    remaining,
                )
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, MAX_BACKOFF_S)


def _track(
    params: Params,
    graph: Graph,
    stage: str,
    action: Callable[[Tracker], Any],
) -> None:
    """Recover from crashes, log what is pending for these params, then ``action``; retried
    for ``tracking.retry_seconds``, unless MLflow refuses what it will refuse every time.

    A pending stage that MLflow refuses that way is not replayed again by later stages (it would
    fail each of them): it says so once and waits for :func:`sync`, which replays everything."""
    uri, key = tracking_uri(), pipeline_key(params)
    earlier = pending.read()
    current = [e for e in earlier if e.pipeline_key == key and e.stage in graph.stages]
    stale = [e for e in earlier if e not in current]
    replay = current if stage == SYNC else [e for e in current if e.replay]
    refused: dict[pending.Entry, str] = {}

    def attempt() -> None:
        check_reachable(uri)
        tracker = Tracker(params, graph, uri, stage)
        tracker.recover()
        for entry in replay:
            if entry in refused:
                continue
            try:
                _action(graph, graph.stage(entry.stage))(tracker)
            except Exception as exc:
                if stage == SYNC or not permanent(exc):
                    raise
                refused[entry] = _first_line(exc)
        action(tracker)
        tracker.release()

    _with_retries(attempt, params.tracking.retry_seconds)
    for entry in stale:
        log.warning(
            "%s of pipeline %s was never logged to MLflow and params.yaml has changed since; "
            "to log it, restore those params and run `python -m spinflow.tracking sync`",
            entry.stage,
            entry.pipeline_key,
        )
    for entry, error in refused.items():
        pending.add(entry.stage, key, uri, error, replay=False)
        log.warning(
            "%s: MLflow at %s refused its pending logging (%s) and will every time; it is no "
            "longer replayed by later stages: fix the cause, then run "
            "`python -m spinflow.tracking sync`",
            entry.stage,
            redact(uri),
            error,
        )
    done = [e for e in (*replay, *stale) if e not in refused]
    if done:
        pending.remove(done)

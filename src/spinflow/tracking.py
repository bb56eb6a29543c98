"""MLflow tracking: every stage's results as runs, every SPIN iteration as a registered model.

Layout of one pipeline in the experiment ``tracking.experiment``::

    spin-<key> / <dvc exp name>     role=pipeline   all params; eval/* stepped by θ index
    ├── theta_0 (sft)               role=baseline   sft + eval_sft
    ├── iter_0 … iter_{N-1}         role=iteration  generate_iter_k + train_iter_k + eval_iter_k
    └── sft_extra                   role=sft_extra  sft_extra + eval_sft_extra

The parent (pipeline) run holds ``eval/<metric>`` at step 0 for θ0 and step k+1 for θk+1, so one
chart shows a metric against the iteration; ``sft_extra/<metric>`` sits at step N (the baseline
trained for as many steps as all N iterations). Children are nested through the
``mlflow.parentRunId`` tag. Training metrics are ``train/<key>`` stepped by optimizer step,
evaluation metrics ``eval/<key>``, run summaries ``train_summary/<key>``; ``samples/*.json`` are
tables of (prompt, real, generated, task).

Stages are separate processes (and may run in a temporary DVC workspace), so nothing is kept
between them: runs are found again with ``search_runs`` by their tags, ``spinflow.pipeline_key``
(a hash of every parameter except ``tracking``), ``spinflow.role`` and ``spinflow.iteration``.

Tags on a run, per DVC stage ``<stage>`` that logged into it:

- ``dvc.stages``: the stages that logged into the run; ``mlflow.source.git.commit``,
  ``stage.<stage>.git_commit``: ``git rev-parse HEAD`` (or ``DVC_EXP_BASELINE_REV``);
  ``dvc.exp_name`` inside ``dvc exp run``;
- ``stage.<stage>.input.<name>``: sha256 (16 hex) of each input, from the ``provenance.json`` the
  stage wrote (evaluation stages: hashed here). Available as soon as the stage ends;
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

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from spinflow import layout
from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.io import read_json
from spinflow.provenance import PROVENANCE_FILE, tree_hash

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOCK_FILE = "dvc.lock"
DVC_FILE = "dvc.yaml"

TAG_KEY = "spinflow.pipeline_key"
TAG_ROLE = "spinflow.role"
TAG_ITERATION = "spinflow.iteration"
TAG_MODEL_HASH = "spinflow.model_hash"
TAG_VERSION = "spinflow.model_version"
TAG_MANAGED = "spinflow.managed"
TAG_SUPERSEDED = "spinflow.superseded_by"
TAG_STAGES = "dvc.stages"
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"

PIPELINE, BASELINE, ITERATION, SFT_EXTRA = "pipeline", "baseline", "iteration", "sft_extra"
CHAMPION = "champion"
REQUIREMENTS = ("torch", "transformers", "accelerate", "safetensors", "tokenizers")
EXPERIMENT_NOTE = (
    "spinflow SPIN pipelines. Each pipeline run (role=pipeline) nests theta_0, iter_k and "
    "sft_extra runs; its eval/* charts show each metric against the iteration. Select the "
    "iter_k runs and press Compare to put iterations side by side."
)


class TrackingError(SpinflowError):
    """MLflow cannot be reached or refused what a stage logged."""


# ---------------------------------------------------------------------------------------------
# Where runs go


def project_root() -> Path:
    """The DVC repository root that owns the tracking database.

    ``DVC_ROOT`` when DVC runs the stage (for queued and temporary experiments DVC points it at
    the original repository), else the nearest directory above the working directory holding a
    ``.dvc`` folder, else the working directory. A path inside ``<repo>/.dvc/tmp/exps/`` (a
    temporary experiment workspace) resolves to ``<repo>``.
    """
    env = os.environ.get("DVC_ROOT")
    if env:
        base = Path(env).resolve()
    else:
        cwd = Path.cwd().resolve()
        base = next((d for d in (cwd, *cwd.parents) if (d / ".dvc").is_dir()), cwd)
    parts = base.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return base


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` (a relative SQLite path made absolute against the project root),
    else ``sqlite:///<root>/mlflow.db``."""
    root = project_root()
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not env:
        return f"sqlite:///{root / DB_FILE}"
    prefix = "sqlite:///"
    if env.startswith(prefix):
        rest = env[len(prefix) :]
        if rest and not rest.startswith(("/", ":memory:")):
            return prefix + str(root / rest)
    return env


def artifact_location(uri: str) -> str | None:
    """For a SQLite store: ``mlartifacts/`` beside the database file; else the server decides."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(uri[len(prefix) :].split("?", 1)[0])
    if not db.is_absolute():
        return None
    return (db.parent / ARTIFACTS_DIR).as_uri()


def pipeline_key(params: Params) -> str:
    """12 hex digits identifying a pipeline: a hash of every parameter except ``tracking``."""
    data = params.model_dump(mode="json")
    data.pop("tracking", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingError when an http(s) tracking server does not answer at all."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # something answered; authentication or routing is MLflow's business
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, point "
            "MLFLOW_TRACKING_URI at a running server, or set tracking.enabled: false"
        ) from None


# ---------------------------------------------------------------------------------------------
# Stage hooks (called at the end of the stage functions in spinflow.steps)


def log_sft(params: Params) -> None:
    """θ0's training (stage ``sft``) into the baseline run."""
    _hook(params, "sft", lambda t: t.training(t.target("sft")))


def log_train(params: Params, k: int, history: list[dict[str, float]] | None = None) -> None:
    """``train_iter_k``: params, per-step metrics, samples table, registered θk+1 (``iter_k``)."""
    _hook(params, f"train_iter_{k}", lambda t: t.training(t.target(f"iter_{k}"), history))


def log_eval(params: Params, name: str) -> None:
    """``eval_<name>``: metrics into the model's run and, stepped, into the pipeline run."""
    _hook(params, f"eval_{name}", lambda t: t.evaluation(t.target(name)))


def log_sft_extra(params: Params) -> None:
    """The SFT-extra baseline's training into its own run."""
    _hook(params, "sft_extra", lambda t: t.training(t.target("sft_extra")))


def log_report(params: Params) -> None:
    """Replay anything missing, settle the champion, attach the report, finish the pipeline run."""
    _hook(params, "report", lambda t: t.report())


def sync(params: Params) -> None:
    """Log every output present on disk (idempotent): for a new key, tracking or server."""
    _hook(params, "sync", lambda t: t.sync_all())


def preflight(params: Params) -> None:
    """Fail fast, before a long stage, when tracking is on but MLflow cannot be used."""
    if params.tracking.enabled and _is_main_process():
        _require_mlflow()
        check_reachable(tracking_uri())


def _require_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TrackingError(
            "tracking.enabled is true but mlflow is not installed; install it "
            "(pip install mlflow) or set tracking.enabled: false"
        ) from None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _hook(params: Params, stage: str, action: Callable[[_Tracker], Any]) -> None:
    if not params.tracking.enabled or not _is_main_process():
        return
    _require_mlflow()
    uri = tracking_uri()
    check_reachable(uri)
    try:
        action(_Tracker(params, uri, stage))
    except SpinflowError:
        raise
    except Exception as exc:
        log.debug("MLflow tracking failed", exc_info=True)
        raise TrackingError(
            f"MLflow tracking at {uri} failed in {stage}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Small helpers


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


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric evaluation metrics; ``per_task_pass_rate`` becomes ``pass_rate/<task>``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            if key == "per_task_pass_rate":
                for task, rate in value.items():
                    if (number := _number(rate)) is not None:
                        out[_metric_name(f"pass_rate/{task}")] = number
            continue
        if (number := _number(value)) is not None:
            out[_metric_name(key)] = number
    return out


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


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


def _provenance_inputs(directory: Path) -> dict[str, str]:
    path = directory / PROVENANCE_FILE
    if not path.is_file():
        return {}
    inputs = read_json(path).get("inputs") or {}
    return {name: str(v.get("sha256_16")) for name, v in inputs.items() if isinstance(v, dict)}


def _provenance_path(directory: Path, name: str) -> str | None:
    path = directory / PROVENANCE_FILE
    if not path.is_file():
        return None
    entry = (read_json(path).get("inputs") or {}).get(name) or {}
    return entry.get("path")


def _optional_hash(path: Path) -> str | None:
    return tree_hash(path) if path.exists() else None


def _provenance_params(directory: Path) -> dict[str, Any]:
    path = directory / PROVENANCE_FILE
    return (read_json(path).get("params") or {}) if path.is_file() else {}


def _steps_from_csv(path: Path) -> list[dict[str, float]]:
    import csv

    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows


def pip_requirements() -> list[str]:
    """Pinned requirements of a registered model; no torchvision (no CPU wheel exists here)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    return pins


# ---------------------------------------------------------------------------------------------
# What a run describes


@dataclass(frozen=True)
class Target:
    """One model of the pipeline and the run that describes it."""

    role: str
    iteration: int | None
    run_name: str
    eval_name: str
    step: int  # x of its evaluation in the parent's charts
    model_dir: Path
    train_stage: str | None
    steps_csv: Path | None
    summary: Path | None

    @property
    def eval_stage(self) -> str:
        return f"eval_{self.eval_name}"


def targets(params: Params) -> list[Target]:
    sft_on = params.sft.enabled
    out = [
        Target(
            BASELINE,
            None,
            "theta_0 (sft)" if sft_on else "theta_0 (base)",
            "sft",
            0,
            layout.theta(0, sft_enabled=sft_on),
            "sft" if sft_on else None,
            layout.train_steps("sft") if sft_on else None,
            layout.METRICS_DIR / "sft.json" if sft_on else None,
        )
    ]
    for k in range(params.spin.iterations):
        out.append(
            Target(
                ITERATION,
                k,
                f"iter_{k}",
                f"iter_{k}",
                k + 1,
                layout.theta(k + 1, sft_enabled=sft_on),
                f"train_iter_{k}",
                layout.train_steps(f"train_iter_{k}"),
                layout.train_metrics(k),
            )
        )
    if params.sft_extra.enabled:
        out.append(
            Target(
                SFT_EXTRA,
                None,
                "sft_extra",
                "sft_extra",
                params.spin.iterations,
                layout.SFT_EXTRA_MODEL,
                "sft_extra",
                layout.train_steps("sft_extra"),
                layout.METRICS_DIR / "sft_extra.json",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# The tracker: one per stage process


class _Tracker:
    def __init__(self, params: Params, uri: str, stage: str):
        import mlflow
        from mlflow import MlflowClient

        self.params = params
        self.uri = uri
        self.stage = stage
        self.key = pipeline_key(params)
        self.model_name = params.tracking.registered_model
        mlflow.set_tracking_uri(uri)  # mlflow.<flavor>.log_model reads the global URI
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment()
        self.commit = git_commit()
        self._parent_id: str | None = None
        self._model_hashes: dict[Path, str] = {}

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
                    tags={TAG_NOTE: EXPERIMENT_NOTE},
                )
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def target(self, name: str) -> Target:
        for t in targets(self.params):
            if t.eval_name == name:
                return t
        raise TrackingError(f"no model named {name!r} in this pipeline")

    def _context_tags(self) -> dict[str, str]:
        tags = {TAG_KEY: self.key}
        if self.commit:
            tags["mlflow.source.git.commit"] = self.commit
        for env, tag in (
            ("DVC_EXP_NAME", "dvc.exp_name"),
            ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
        ):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        return tags

    def _find(self, role: str, iteration: int | None = None) -> list:
        query = f"tags.`{TAG_KEY}` = '{self.key}' and tags.`{TAG_ROLE}` = '{role}'"
        if iteration is not None:
            query += f" and tags.`{TAG_ITERATION}` = '{iteration}'"
        runs = self.client.search_runs([self.experiment_id], query, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _create(self, role: str, name: str, iteration: int | None, tags: dict[str, str]):
        tags = {**self._context_tags(), TAG_ROLE: role, **tags}
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
            self._log_params(run, flatten(self.params.model_dump(mode="json")))
            self._parent_id = run.info.run_id
        return self._parent_id

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
                f"(best `{tracking.champion_metric}`, {tracking.champion_mode})."
            ),
        }

    def _child(self, t: Target, model_hash: str | None):
        """The run describing ``t``'s model; a run describing another checkpoint is replaced."""
        found = self._find(t.role, t.iteration)
        run = found[0] if found else None
        if run is not None and model_hash is not None:
            recorded = run.data.tags.get(TAG_MODEL_HASH)
            if recorded is not None and recorded != model_hash:
                run = self._supersede(run, t, f"its checkpoint changed ({recorded} → {model_hash})")
        if run is None:
            run = self._find_or_create(
                t.role, t.run_name, t.iteration, {TAG_PARENT: self.parent_id()}
            )
        if run.data.tags.get(TAG_PARENT) != self.parent_id():
            self.client.set_tag(run.info.run_id, TAG_PARENT, self.parent_id())
        if model_hash is not None and run.data.tags.get(TAG_MODEL_HASH) != model_hash:
            self.client.set_tag(run.info.run_id, TAG_MODEL_HASH, model_hash)
        return self.client.get_run(run.info.run_id)

    def _supersede(self, run, t: Target, why: str):
        new = self._create(t.role, t.run_name, t.iteration, {TAG_PARENT: self.parent_id()})
        old = run.info.run_id
        self.client.set_tag(old, TAG_SUPERSEDED, new.info.run_id)
        self.client.delete_run(old)
        log.info("MLflow run %s (%s) replaced by %s: %s", old, t.run_name, new.info.run_id, why)
        return new

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
        if rows:
            columns = ("prompt", "real", "generated", "task")
            data = {c: [str(r.get(c, "")) for r in rows] for c in columns}
            self.client.log_table(run_id, data=data, artifact_file=artifact_file)

    def _model_hash(self, directory: Path) -> str | None:
        if directory not in self._model_hashes:
            if not (directory / "config.json").is_file():
                return None
            self._model_hashes[directory] = tree_hash(directory)
        return self._model_hashes[directory]

    # -- stages ----------------------------------------------------------------------------------

    def training(
        self, t: Target, history: list[dict[str, float]] | None = None, *, settle: bool = True
    ):
        """Log a training stage's outputs into ``t``'s run (nothing twice for one checkpoint).

        ``settle``: also move the champion alias and delete superseded versions.
        """
        model_hash = self._model_hash(t.model_dir)
        if model_hash is None or t.train_stage is None:
            return None
        run = self._child(t, model_hash)
        marker = f"spinflow.logged.{t.train_stage}"
        if run.data.tags.get(marker) != model_hash:
            if any(key.startswith("train/") for key in run.data.metrics):
                # an earlier attempt broke off half-way: start clean rather than double metrics
                run = self._supersede(run, t, "its training metrics were incomplete")
                self.client.set_tag(run.info.run_id, TAG_MODEL_HASH, model_hash)
                run = self.client.get_run(run.info.run_id)
            self._log_training(run, t, history)
            self.client.set_tag(run.info.run_id, marker, model_hash)
            run = self.client.get_run(run.info.run_id)
        if t.role == ITERATION:
            generated = layout.generated_dir(t.iteration)
            self._stage_tags(run, f"generate_iter_{t.iteration}", _provenance_inputs(generated))
        self._stage_tags(run, t.train_stage, _provenance_inputs(t.model_dir))
        if t.role == ITERATION and self.params.tracking.log_models:
            self._register(run, t, model_hash)
            if settle:
                self._settle_registry()
        self.client.set_terminated(run.info.run_id)
        return run

    def _log_training(self, run, t: Target, history: list[dict[str, float]] | None) -> None:
        run_id = run.info.run_id
        params = flatten(_provenance_params(t.model_dir))
        if t.iteration is not None:
            params["iteration"] = str(t.iteration)
        self._log_params(run, params)
        rows = history if history is not None else _steps_from_csv(t.steps_csv)
        per_step = []
        for i, row in enumerate(rows, start=1):
            step = int(row.get("step", i))
            for key, value in row.items():
                if key != "step" and (number := _number(value)) is not None:
                    per_step.append((_metric_name(f"train/{key}"), number, step))
        self._log_metrics(run_id, per_step)
        if t.summary is not None and t.summary.is_file():
            summary = read_json(t.summary)
            skip = {"iteration", "beta", "learning_rate"}
            self._log_metrics(
                run_id,
                (
                    (_metric_name(f"train_summary/{key}"), number, 0)
                    for key, value in summary.items()
                    if not key.startswith("final_")
                    and key not in skip
                    and (number := _number(value)) is not None
                ),
            )
        if t.role == ITERATION:
            pairs = layout.generated_dir(t.iteration) / "pairs.jsonl"
            self._table(run_id, pairs, f"samples/train_iter_{t.iteration}.json")
        lora = self._lora(t)
        if lora is not None:
            self.client.log_dict(run_id, lora, "lora/adapter_config.json")
            self.client.set_tag(run_id, "spinflow.lora.base", lora["base_model_name_or_path"])

    def _lora(self, t: Target) -> dict[str, Any] | None:
        """θ is saved with its LoRA adapter merged; record the adapter's config and its base."""
        optim = self.params.train_for(t.iteration)[0] if t.role == ITERATION else self.params.sft
        if not optim.lora.enabled:
            return None
        inputs = _provenance_inputs(t.model_dir)
        base_hash = inputs.get("model")
        base = str(_provenance_path(t.model_dir, "model") or "")
        version = self._version_by_hash(base_hash) if base_hash else None
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": (
                f"models:/{self.model_name}/{version.version}" if version else base
            ),
            "base_model_path": base,
            "base_model_hash": base_hash,
            "r": optim.lora.r,
            "lora_alpha": optim.lora.alpha,
            "lora_dropout": optim.lora.dropout,
            "target_modules": list(optim.lora.target_modules),
            "merged": True,
        }

    def evaluation(self, t: Target, *, sync_parent: bool = True):
        """Log ``eval_<name>`` into ``t``'s run (after its training) and into the parent."""
        path = layout.eval_metrics(t.eval_name)
        if not path.is_file():
            return None
        model_hash = self._model_hash(t.model_dir)
        trained = t.train_stage and t.summary and t.summary.is_file()
        run = self.training(t, settle=False) if trained else None
        run = self._child(t, model_hash) if run is None else self.client.get_run(run.info.run_id)
        run_id = run.info.run_id
        metrics_hash = _file_hash(path)
        marker = f"spinflow.logged.{t.eval_stage}"
        scalars = eval_scalars(read_json(path))
        if run.data.tags.get(marker) != metrics_hash:
            params = {
                **flatten(self.params.eval.model_dump(mode="json"), "eval."),
                **flatten(self.params.prompt.model_dump(mode="json"), "prompt."),
            }
            self._log_params(run, params)
            self._log_metrics(run_id, ((f"eval/{k}", v, t.step) for k, v in scalars.items()))
            self.client.set_tag(run_id, marker, metrics_hash)
        self._table(run_id, layout.eval_generations(t.eval_name), f"samples/{t.eval_stage}.json")
        inputs = {"model": model_hash, "test": _optional_hash(layout.DATA_DIR / "test.jsonl")}
        self._stage_tags(run, t.eval_stage, {k: v for k, v in inputs.items() if v})
        version = run.data.tags.get(TAG_VERSION)
        if version and self.params.tracking.log_models:
            self._tag_version(
                version, {f"eval.{k}": str(v) for k, v in scalars.items() if "/" not in k}
            )
        self.client.set_terminated(run_id)
        if sync_parent:
            self._sync_parent(upto=t)
            if t.role == ITERATION:
                self._settle_registry()
        return run

    def sync_all(self) -> None:
        for t in targets(self.params):
            if layout.eval_metrics(t.eval_name).is_file():
                self.evaluation(t, sync_parent=False)
            elif t.summary is not None and t.summary.is_file():
                self.training(t, settle=False)
        self._sync_parent(upto=None)
        self._settle_registry()

    def report(self) -> None:
        self.sync_all()
        parent = self.parent_id()
        for name in ("results.md", "metrics.png", "by_iteration.csv"):
            path = layout.REPORT_DIR / name
            if path.is_file():
                self.client.log_artifact(parent, str(path), "report")
        for stage in ("prepare_model", "prepare_data", "report"):
            self._stage_tags(self.client.get_run(parent), stage, {})
        self.client.set_terminated(parent)

    # -- the pipeline run's charts -----------------------------------------------------------------

    def _desired_parent_history(self, upto: Target | None) -> dict[str, dict[int, float]]:
        """Stepped metrics the parent should hold, from the evaluation files on disk.

        During ``eval_<name>`` only that evaluation and those upstream of it are current: θ0's
        and the iterations' up to it (each evaluation uses the previous one's answers).
        """
        desired: dict[str, dict[int, float]] = {}
        for t in targets(self.params):
            if upto is None:
                current = True
            elif upto.role == SFT_EXTRA:
                current = t.role in (SFT_EXTRA, BASELINE)
            else:
                current = t.role != SFT_EXTRA and t.step <= upto.step
            if not current:
                continue
            path = layout.eval_metrics(t.eval_name)
            if not path.is_file():
                continue
            prefix = "sft_extra" if t.role == SFT_EXTRA else "eval"
            for key, value in eval_scalars(read_json(path)).items():
                desired.setdefault(f"{prefix}/{key}", {})[t.step] = value
        return desired

    def _sync_parent(self, upto: Target | None) -> None:
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

    def _versions(self) -> list:
        from mlflow.exceptions import MlflowException

        name = self.model_name.replace("'", "\\'")
        versions, token = [], None
        try:
            while True:
                page = self.client.search_model_versions(
                    f"name = '{name}'", max_results=1000, page_token=token
                )
                versions.extend(page)
                token = page.token
                if not token:
                    return versions
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise

    def _version_by_hash(self, model_hash: str):
        matches = [v for v in self._versions() if v.tags.get(TAG_MODEL_HASH) == model_hash]
        return min(matches, key=lambda v: int(v.version)) if matches else None

    def _tag_version(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, value)

    def _register(self, run, t: Target, model_hash: str):
        version = self._version_by_hash(model_hash)
        if version is None:
            version = self._log_model(run, t, model_hash)
        number = str(version.version)
        self.client.set_registered_model_alias(self.model_name, f"iter_{t.iteration}", number)
        if run.data.tags.get(TAG_VERSION) != number:
            self.client.set_tag(run.info.run_id, TAG_VERSION, number)
        return version

    def _log_model(self, run, t: Target, model_hash: str):
        import mlflow.transformers
        from mlflow.exceptions import MlflowException

        from spinflow.models import load_model, load_tokenizer

        directory = t.model_dir.resolve()  # an absolute path is never taken for a hub repo id
        model, tokenizer = load_model(directory), load_tokenizer(directory)
        tags = {
            **self._context_tags(),
            TAG_MANAGED: "true",
            TAG_ITERATION: str(t.iteration),
            TAG_MODEL_HASH: model_hash,
            "dvc.stage": t.train_stage or "",
            "spinflow.run_name": t.run_name,
        }
        lora = self._lora(t)
        if lora is not None:
            tags["spinflow.lora.base"] = lora["base_model_name_or_path"]
        # log_model files the model under the active experiment, not under its run's
        mlflow.set_experiment(experiment_id=self.experiment_id)
        quiet = logging.getLogger("mlflow.transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # hub model card and license lookups for a local checkpoint
        try:
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name=f"theta_{t.iteration + 1}",
                task="text-generation",
                pip_requirements=pip_requirements(),
                model_config={"max_new_tokens": self.params.eval.max_new_tokens},
                metadata={"spinflow": {k: v for k, v in tags.items() if k.startswith("spinflow")}},
                run_id=run.info.run_id,
            )
        finally:
            quiet.setLevel(level)
        try:
            self.client.create_registered_model(
                self.model_name,
                description="SPIN iterations logged by spinflow; aliases iter_k and champion.",
            )
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        return self.client.create_model_version(
            self.model_name,
            source=info.model_uri,
            run_id=run.info.run_id,
            model_id=info.model_id,
            tags=tags,
            description=(
                f"θ{t.iteration + 1}: result of SPIN iteration {t.iteration} "
                f"(pipeline {self.key}, stage train_iter_{t.iteration})"
            ),
        )

    def _settle_registry(self) -> None:
        if self.params.tracking.log_models:
            self._update_champion()
            self._cleanup_versions()

    def _update_champion(self) -> None:
        tracking = self.params.tracking
        metric = f"eval/{tracking.champion_metric}"
        best: tuple[float, int, str] | None = None
        evaluated: set[str] = set()
        for k in range(self.params.spin.iterations):
            found = self._find(ITERATION, k)
            if not found:
                continue
            run = found[0]
            version, value = run.data.tags.get(TAG_VERSION), run.data.metrics.get(metric)
            evaluated.update(key for key in run.data.metrics if key.startswith("eval/"))
            if version is None or value is None or not math.isfinite(value):
                continue
            if (
                best is None
                or (tracking.champion_mode == "max" and value >= best[0])
                or (tracking.champion_mode == "min" and value <= best[0])
            ):
                best = (value, k, version)
        if best is None:
            if evaluated:
                log.warning(
                    "no iteration has %s, so no %s alias; tracking.champion_metric can be: %s",
                    metric,
                    CHAMPION,
                    ", ".join(sorted(m.removeprefix("eval/") for m in evaluated)),
                )
            return
        value, k, version = best
        aliases = self.client.get_registered_model(self.model_name).aliases or {}
        if str(aliases.get(CHAMPION)) != version:
            self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
            log.info("champion: iter_%d (version %s, %s = %s)", k, version, metric, value)
        parent = self.parent_id()
        self.client.set_tag(parent, "spinflow.champion_iteration", str(k))
        self.client.set_tag(parent, "spinflow.champion_version", version)

    def _cleanup_versions(self) -> None:
        """Delete this pipeline's versions that a re-run replaced and nothing refers to."""
        from mlflow.exceptions import MlflowException

        versions = self._versions()
        if not versions:
            return
        aliases = self.client.get_registered_model(self.model_name).aliases or {}
        aliased = {str(v) for v in aliases.values()}
        for version in versions:
            tags = version.tags
            if (
                tags.get(TAG_MANAGED) != "true"
                or tags.get(TAG_KEY) != self.key
                or str(version.version) in aliased
            ):
                continue
            try:
                source_run = self.client.get_run(version.run_id) if version.run_id else None
            except MlflowException:
                source_run = None
            if source_run is not None and source_run.info.lifecycle_stage != "deleted":
                continue
            referring = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{TAG_VERSION}` = '{version.version}'",
                max_results=1,
            )
            if referring:
                continue
            self.client.delete_model_version(self.model_name, version.version)
            log.info("deleted superseded version %s of %s", version.version, self.model_name)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from spinflow.config import PARAMS_FILE, load_params

    parser = argparse.ArgumentParser(
        prog="python -m spinflow.tracking",
        description="uri: print the tracking URI; sync: log every pipeline output on disk.",
    )
    parser.add_argument("action", choices=["uri", "sync"])
    parser.add_argument("--params", default=PARAMS_FILE)
    args = parser.parse_args(argv)
    if args.action == "uri":
        print(tracking_uri())
        return 0
    logging.basicConfig(level=os.environ.get("SPINFLOW_LOG_LEVEL", "INFO"))
    try:
        sync(load_params(args.params))
    except SpinflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"synced to {tracking_uri()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Where runs go and whether MLflow is used at all (spinflow.tracking.store and the CLI)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from spinflow import tracking
from spinflow.graph import build
from spinflow.runner import execute
from spinflow.tracking import pending
from spinflow.tracking.__main__ import main
from test_tracking import tiny_params


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    workspace = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (workspace / ".dvc").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(workspace)
    assert tracking.project_root() == repo.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert tracking.project_root() == repo.resolve()
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/m.db")
    assert tracking.tracking_uri() == f"sqlite:///{repo.resolve() / 'runs/m.db'}"
    assert (
        tracking.artifact_location(tracking.tracking_uri()) == (repo / "runs/mlartifacts").as_uri()
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_unreachable_server_fails_with_one_line(tiny_checkpoint_session, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tiny_params(tiny_checkpoint_session, tracking={"retry_seconds": 0})
    graph = build(params)
    ran = []
    for call in (
        lambda: tracking.preflight(params),
        lambda: execute(params, "eval_sft", lambda p, name: ran.append(name)),
    ):
        with pytest.raises(tracking.TrackingError) as err:
            call()
        assert uri in str(err.value) and "\n" not in str(err.value)
    assert ran == []  # the stage never started: the server is checked first
    # after a stage's work, its results stay: the stage is recorded as still to be logged
    tracking.after_stage(params, graph, graph.stage("eval_sft"))
    assert [(e.stage, e.uri) for e in pending.read()] == [("eval_sft", uri)]


def test_disabled_tracking_touches_nothing(tiny_checkpoint_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # would fail if used
    params = tiny_params(tiny_checkpoint_session, tracking={"enabled": False})
    graph = build(params)
    tracking.preflight(params)
    for stage in ("train_iter_0", "eval_sft", "report"):
        tracking.after_stage(params, graph, graph.stage(stage))
    tracking.sync(params)
    assert list(tmp_path.iterdir()) == []


def test_pipeline_key_ignores_tracking_params(tiny_checkpoint_session):
    params = tiny_params(tiny_checkpoint_session)
    renamed = tiny_params(tiny_checkpoint_session, tracking={"experiment": "other"})
    other_beta = tiny_params(tiny_checkpoint_session, spin={"beta": 0.2})
    assert tracking.pipeline_key(params) == tracking.pipeline_key(renamed)
    assert tracking.pipeline_key(params) != tracking.pipeline_key(other_beta)


def test_cli_prints_the_uri_and_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/m.db")
    expected = f"sqlite:///{tmp_path.resolve() / 'runs/m.db'}"
    assert main(["uri"]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert main(["sync", "--params", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    out = subprocess.run(
        [sys.executable, "-m", "spinflow.tracking", "uri"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("value", [-1, 3601, float("inf"), float("nan"), "a minute"])
def test_retry_seconds_is_validated(value, tiny_checkpoint_session):
    from spinflow.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_params(tiny_checkpoint_session, tracking={"retry_seconds": value})
    assert "tracking.retry_seconds" in str(err.value) and "\n" not in str(err.value)


PASSWORD = "S3cretPassw0rd"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"http://alice:{PASSWORD}@127.0.0.1:5077", "http://alice:***@127.0.0.1:5077"),
        (
            f"API request to http://alice:{PASSWORD}@h:1/api/2.0/mlflow/runs/get failed",
            "API request to http://alice:***@h:1/api/2.0/mlflow/runs/get failed",
        ),
        (f"https://alice:p@{PASSWORD}@h/mlflow", "https://alice:***@h/mlflow"),
        ("https://tok3n@h", "https://***@h"),  # a user name alone may be a token
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
    ],
)
def test_redact_hides_passwords(text, shown):
    assert tracking.redact(text) == shown


def test_redact_hides_the_secret_variables(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0kenvalue")
    assert tracking.redact(f"refused {PASSWORD} and t0kenvalue") == "refused *** and ***"


@pytest.fixture
def health_server():
    """An HTTP server on 127.0.0.1 whose /health answers 200 (what it was asked is kept)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()
        server.server_close()


def test_a_uri_with_credentials_is_reachable(health_server):
    port, asked = health_server
    tracking.check_reachable(f"http://alice:{PASSWORD}@127.0.0.1:{port}/")
    tracking.check_reachable(f"http://alice:{PASSWORD}@127.0.0.1:{port}/mlflow")
    assert asked == ["/health", "/mlflow/health"]


def test_no_password_in_messages_the_pending_file_or_the_cli(
    tiny_checkpoint_session, tmp_path, monkeypatch, capsys, caplog
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    shown = f"http://alice:***@127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tiny_params(tiny_checkpoint_session, tracking={"retry_seconds": 0})
    with pytest.raises(tracking.TrackingError) as err:
        tracking.preflight(params)
    assert shown in str(err.value) and PASSWORD not in str(err.value)
    graph = build(params)
    tracking.after_stage(params, graph, graph.stage("eval_sft"))
    assert [(e.stage, e.uri) for e in pending.read()] == [("eval_sft", shown)]
    assert PASSWORD not in pending.PENDING_FILE.read_text(encoding="utf-8")
    assert caplog.records and all(PASSWORD not in r.getMessage() for r in caplog.records)
    assert main(["uri"]) == 0
    assert capsys.readouterr().out.strip() == shown


# -- a SQLite store made crash-safe ------------------------------------------------------------

# MLflow creating its store in a process whose files may not grow past a limit: a disk that fills.
FULL_DISK_CREATION = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
from mlflow import MlflowClient
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
MlflowClient(tracking_uri=sys.argv[1]).search_experiments()
"""


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )


def schema_revision(db) -> str | None:
    import sqlite3

    with sqlite3.connect(db) as connection:
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
        if "alembic_version" not in tables:
            return None
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None


def half_made_store(db) -> bytes:
    """A store MLflow began on a disk that filled: tables without the schema they belong to."""
    created = run_python(FULL_DISK_CREATION, f"sqlite:///{db}", "200000")
    assert created.returncode != 0 and "disk I/O error" in created.stderr
    assert schema_revision(db) not in (None, tracking.store._schema_head())
    return db.read_bytes()


def store_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "spinflow.tracking.store"]


def test_a_half_made_store_is_made_again_by_the_next_stage_and_by_sync(
    tiny_checkpoint_session, tmp_path, monkeypatch, caplog, capsys
):
    import yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    broken = half_made_store(db)
    # as it was: MLflow itself fails on it every time
    again = run_python(FULL_DISK_CREATION, f"sqlite:///{db}", str(2**40))
    assert "already exists" in again.stderr

    params = tiny_params(tiny_checkpoint_session, tracking={"retry_seconds": 0})
    tracking.preflight(params)  # what every tracked stage runs first
    assert schema_revision(db) == tracking.store._schema_head()
    (aside,) = tmp_path.glob("mlflow.db.broken-*")
    assert aside.read_bytes() == broken  # moved, not deleted
    (line,) = store_warnings(caplog)
    assert f"MLflow store {db} was not at the installed MLflow's schema" in line
    assert f"moved it to {aside.name} and made it again" in line and "\n" not in line

    caplog.clear()
    db.unlink()
    broken = half_made_store(db)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    assert main(["sync", "--params", "params.yaml"]) == 0
    assert capsys.readouterr().out.startswith("synced to sqlite:///")
    assert schema_revision(db) == tracking.store._schema_head()
    assert len(store_warnings(caplog)) == 1
    assert sorted(p.read_bytes() == broken for p in tmp_path.glob("mlflow.db.broken-*")) == [
        False,
        True,
    ]
    from mlflow import MlflowClient

    experiment = MlflowClient(f"sqlite:///{db}").get_experiment_by_name("spinflow-test")
    assert experiment is not None  # sync logged into the store it made


def test_store_creation_leaves_nothing_half_made(tmp_path, caplog):
    db = tmp_path / "runs" / "mlflow.db"
    uri = f"sqlite:///{db}"
    # a disk that fills while the store is created: one line, and no store in its place
    full = run_python(
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from spinflow.tracking.store import TrackingError, prepare_store\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))\n"
        "try:\n    prepare_store(sys.argv[1])\n"
        "except TrackingError as exc:\n    print(exc)\n",
        uri,
    )
    assert full.stdout.startswith(f"cannot create the MLflow store {db} (OperationalError")
    assert full.stdout.count("\n") == 1 and not db.exists()
    assert list(db.parent.iterdir()) == []
    # killed while MLflow migrates the new tables: only a hidden temporary file is left
    killed = run_python(
        "import os, sys\nimport mlflow.store.db.utils as utils\n"
        "utils._upgrade_db = lambda engine: os.kill(os.getpid(), 9)\n"
        "from spinflow.tracking.store import prepare_store\nprepare_store(sys.argv[1])\n",
        uri,
    )
    assert killed.returncode == -9 and not db.exists()
    (leftover,) = db.parent.iterdir()
    assert leftover.name.startswith(".mlflow.db.tmp-")
    tracking.check_reachable(uri)  # the next stage
    assert schema_revision(db) == tracking.store._schema_head()
    assert [p.name for p in db.parent.iterdir()] == ["mlflow.db"]  # the leftover is gone too
    assert store_warnings(caplog) == []  # nothing to report: there was no store


def test_a_store_with_runs_is_never_moved(tmp_path, caplog):
    import sqlite3

    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("kept"))
    client.log_metric(run.info.run_id, "loss", 0.5)
    with sqlite3.connect(db) as connection:  # its schema version lost, its runs still there
        connection.execute("DELETE FROM alembic_version")
    before = db.read_bytes()
    tracking.check_reachable(uri)
    assert db.read_bytes() == before and list(tmp_path.glob("mlflow.db.broken-*")) == []
    assert store_warnings(caplog) == []


def test_a_file_that_is_not_a_store_stops_in_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database at all\n" * 100)
    with pytest.raises(tracking.TrackingError) as err:
        tracking.check_reachable(f"sqlite:///{db}")
    message = str(err.value)
    assert message.startswith(f"MLflow store {db} is not a readable SQLite database (")
    assert "move it aside" in message and "\n" not in message
    assert db.read_bytes() == b"not a database at all\n" * 100

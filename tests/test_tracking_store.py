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

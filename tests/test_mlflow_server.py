"""A real ``mlflow server`` on 127.0.0.1: the tiny pipeline logs and registers through it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_tracking import (
    ITERATIONS,
    MODEL_NAME,
    pipeline_runs,
    prepare_inputs,
    run_tiny_pipeline,
    tiny_params,
)

STARTUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self, tmp_path: Path, *, app: tuple[str, ...] = (), env: dict[str, str] | None = None
    ):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "server.log"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(env or {}),
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    str(mlflow_cli),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination",
                    str(tmp_path / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    *app,
                ],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers share a process group we can end at once
            )

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(
            f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


@pytest.fixture
def mlflow_server(tmp_path):
    server = Server(tmp_path / "server")  # starting; the test waits for it when it needs it
    try:
        yield server
    finally:
        server.stop()


def test_pipeline_through_tracking_server(
    mlflow_server, tiny_checkpoint_session, tmp_path, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # θ0 = the base model; the baseline is tested in test_tracking.py
    params = tiny_params(
        tiny_checkpoint_session, sft={"enabled": False}, sft_extra={"enabled": False}
    )
    prepare_inputs(params)  # these two stages log nothing: run them while the server starts
    mlflow_server.wait_until_healthy()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    run_tiny_pipeline(params, prepare=False)
    assert not {"mlflow.db", "mlartifacts", "mlruns"} & {p.name for p in project.iterdir()}

    client = MlflowClient(mlflow_server.url)
    runs = pipeline_runs(client, params)
    assert set(runs) == {"pipeline", "baseline", *[f"iter_{k}" for k in range(ITERATIONS)]}
    baseline = runs["baseline"].data
    assert baseline.tags["dvc.stages"] == "eval_sft"  # θ0 is the base model: no training stage
    assert not any(key.startswith("train") for key in baseline.metrics)
    parent = runs["pipeline"].info.run_id
    history = client.get_metric_history(parent, "eval/answer_logprob_per_token")
    assert sorted(m.step for m in history) == list(range(ITERATIONS + 1))
    loss = client.get_metric_history(runs["iter_0"].info.run_id, "train/loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == list(range(1, len(loss) + 1))
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == ITERATIONS
    aliases = {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}
    assert {f"iter_{k}" for k in range(ITERATIONS)} | {"champion"} == set(aliases)
    assert aliases["champion"] in {aliases[f"iter_{k}"] for k in range(ITERATIONS)}
    assert any((tmp_path / "server" / "artifacts").rglob("model.safetensors"))

    mlflow.set_tracking_uri(mlflow_server.url)
    generator = mlflow.transformers.load_model(f"models:/{MODEL_NAME}@champion")
    prompt = "Hello"
    out = generator(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith(prompt) and len(generator.tokenizer(text)["input_ids"]) > len(
        generator.tokenizer(prompt)["input_ids"]
    )


ADMIN, PASSWORD = "admin", "S3cretPassw0rd"


def test_a_server_with_basic_auth_takes_credentials_in_the_uri_or_the_environment(
    tmp_path, monkeypatch, caplog
):
    """MLflow's basic-auth app (``mlflow[auth]``): runs go through ``http://user:password@host``
    or through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; the password is never shown."""
    pytest.importorskip("flask_wtf")  # mlflow[auth]
    from mlflow import MlflowClient

    from spinflow import tracking
    from spinflow.config import validate_params

    config = tmp_path / "auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    server = Server(
        tmp_path / "server",
        app=("--app-name", "basic-auth"),
        env={"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"},
    )
    try:
        project = tmp_path / "project"
        project.mkdir()
        monkeypatch.chdir(project)
        monkeypatch.delenv("DVC_ROOT", raising=False)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        params = validate_params({"tracking": {"experiment": "auth", "retry_seconds": 60}})
        host = f"127.0.0.1:{server.port}"
        server.wait_until_healthy()

        # a wrong password: refused at once, not retried for tracking.retry_seconds
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{ADMIN}:wrong-{PASSWORD}@{host}")
        started = time.monotonic()
        with pytest.raises(tracking.TrackingError) as err:
            tracking.preflight(params)
        assert time.monotonic() - started < 30
        assert "HTTP 401" in str(err.value) and f"{ADMIN}:***@{host}" in str(err.value)

        # the password in the URI
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{ADMIN}:{PASSWORD}@{host}")
        tracking.preflight(params)
        tracking.sync(params)
        # the credentials in the environment
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{host}")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        tracking.preflight(params)
        tracking.sync(params)

        client = MlflowClient(f"http://{host}")
        experiment = client.get_experiment_by_name("auth").experiment_id
        (run,) = client.search_runs([experiment])
        assert run.data.tags["spinflow.role"] == "pipeline" and run.info.status == "FINISHED"
        shown = [str(v) for v in (*run.data.tags.values(), *run.data.params.values())]
        assert not [v for v in shown if PASSWORD in v]
        assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    finally:
        server.stop()

"""Tracking faults on real servers: an MLflow API that answers 503, a stage killed while it logs.

A small HTTP server in a thread stands in front of a real ``mlflow server``: its ``/health``
always answers, and it forwards the API, answers it with 503 while ``failing``, or holds the
answer to the upload of one file (so a stage can be killed with ``kill -9`` in the middle of
logging its model).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from spinflow import tracking
from spinflow.graph import build
from spinflow.methods.spin import generate
from spinflow.methods.spin import train as spin
from spinflow.recipes import evaluate
from spinflow.report import report as report_stage
from spinflow.runner import execute
from spinflow.tracking import pending
from spinflow.tracking.__main__ import main
from test_mlflow_server import Server
from test_tracking import pipeline_runs, prepare_inputs, tiny_params

RETRY_SECONDS = 2
UNAVAILABLE = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down for maintenance"}'
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FaultyServer:
    """``/health`` answers 200; the API is forwarded to ``backend``, or answered 503 while
    ``failing``; the response to a PUT whose path ends with ``hold`` waits for ``release``."""

    def __init__(self, backend: str):
        self.backend = urlsplit(backend)
        self.failing = False
        self.refused = 0
        self.hold: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # its sender may have been killed while the answer was held
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                if self.path == "/health":
                    return self._reply(200, b"OK", [("Content-Type", "text/plain")])
                if proxy.failing:
                    proxy.refused += 1
                    return self._reply(503, UNAVAILABLE, [("Content-Type", "application/json")])
                connection = http.client.HTTPConnection(
                    proxy.backend.hostname, proxy.backend.port, timeout=120
                )
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "accept-encoding"
                }
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                connection.close()
                if proxy.hold and self.command == "PUT" and self.path.endswith(proxy.hold):
                    proxy.held.set()  # the file is stored; its sender never hears so
                    proxy.release.wait(timeout=600)
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                self._reply(response.status, data, kept)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A real MLflow server and the faulty server in front of it."""
    server = Server(tmp_path_factory.mktemp("faults") / "server")
    proxy = FaultyServer(server.url)
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture
def proxy(servers):
    server, proxy = servers
    server.wait_until_healthy()
    proxy.failing, proxy.hold, proxy.refused = False, None, 0
    proxy.held.clear()
    proxy.release.clear()
    return proxy


def test_an_api_failing_before_the_work_stops_the_stage_in_time(
    proxy, tiny_checkpoint_session, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    params = tiny_params(tiny_checkpoint_session, tracking={"retry_seconds": RETRY_SECONDS})
    proxy.failing = True
    ran = []
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError) as err:
        execute(params, "eval_sft", lambda p, name: ran.append(name))
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert "503" in message and proxy.url in message and "\n" not in message, message
    assert "tracking.retry_seconds" in message and "nothing was computed" in message
    assert ran == []  # stopped before the work
    assert RETRY_SECONDS <= elapsed < RETRY_SECONDS + 15, elapsed
    assert proxy.refused >= 2  # retried, not given up at once


def test_an_api_failing_after_the_work_keeps_the_results_and_replays_them(
    proxy, tiny_checkpoint_session, tmp_path, monkeypatch, caplog
):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    params = tiny_params(
        tiny_checkpoint_session,
        sft={"enabled": False},
        sft_extra={"enabled": False},
        spin={"iterations": 1},
        tracking={
            "experiment": "spinflow-faults",
            "registered_model": "spinflow-faults",
            "retry_seconds": RETRY_SECONDS,
        },
    )
    graph = build(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    prepare_inputs(params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    execute(params, "eval_sft", evaluate.evaluate)
    execute(params, "generate_iter_0", generate.generate)

    def then_fail(work):
        def stage(p, **kwargs):
            result = work(p, **kwargs)
            proxy.failing = True  # the server breaks while the stage works
            stage.finished = time.monotonic()
            return result

        return stage

    train = then_fail(spin.train)
    with caplog.at_level(logging.WARNING, logger="spinflow.tracking"):
        execute(params, "train_iter_0", train)  # returns: the stage succeeds
    waited = time.monotonic() - train.finished
    assert RETRY_SECONDS <= waited < RETRY_SECONDS + 15, waited
    theta_1 = graph.theta(1)
    assert (theta_1.path / "model.safetensors").is_file()  # the checkpoint stays
    assert json.loads(theta_1.train_metrics.read_text())["optimizer_steps"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "train_iter_0" in warnings[0] and "kept" in warnings[0] and "503" in warnings[0]
    assert "python -m spinflow.tracking sync" in warnings[0]
    assert [(e.stage, e.uri) for e in pending.read()] == [("train_iter_0", proxy.url)]

    # the next stage while the API still fails: it stops before its work
    with pytest.raises(tracking.TrackingError):
        execute(params, "eval_iter_0", evaluate.evaluate)
    assert not graph.evaluation("iter_0").metrics.exists()

    # the server is back: the next stage logs what was pending, then itself
    proxy.failing = False
    execute(params, "eval_iter_0", evaluate.evaluate)
    assert pending.read() == []
    client = MlflowClient(proxy.url)
    run = pipeline_runs(client, params)["iter_0"]
    assert run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == [1, 2]  # logged once
    assert run.data.metrics["train_summary/train_seconds"] > 0  # timings reach MLflow
    assert "eval/exact_match" in run.data.metrics
    version = client.get_model_version_by_alias("spinflow-faults", "iter_0")
    assert version.run_id == run.info.run_id

    # the report's logging fails; `python -m spinflow.tracking sync` replays it
    report = then_fail(report_stage)
    execute(params, "report", report)
    assert [e.stage for e in pending.read()] == ["report"]
    proxy.failing = False
    parent = pipeline_runs(client, params)["pipeline"]
    assert not client.list_artifacts(parent.info.run_id, "report")  # nothing reached MLflow
    assert main(["sync", "--params", "params.yaml"]) == 0
    assert pending.read() == []
    parent = pipeline_runs(client, params)["pipeline"]
    assert parent.info.status == "FINISHED"
    report_files = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/results.md" in report_files
    assert len(client.search_model_versions("name = 'spinflow-faults'")) == 1


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_a_stage_killed_while_logging_its_model_is_failed_and_its_copy_removed(
    servers, proxy, tiny_dvc_repo, tmp_path
):
    """kill -9 of train_iter_0 during the model upload, then another β and `dvc repro`."""
    from mlflow import MlflowClient

    server, _ = servers
    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    raw = yaml.safe_load((repo.root / "params.yaml").read_text(encoding="utf-8"))
    raw["tracking"].update(enabled=True, experiment="spinflow-crash", registered_model="crash")
    (repo.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**repo.env, "MLFLOW_TRACKING_URI": proxy.url, "PYTHONPATH": str(repo.root / "src")}

    proxy.hold = "model.safetensors"
    dvc = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train_iter_0"],
        cwd=repo.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proxy.held.wait(timeout=300), "the model upload never started"
        # dvc runs the command through /bin/sh, which may exec it or fork it: the
        # stage is the python process, the one running train.py with no such child
        running = [p for p in _descendants(dvc.pid) if "stages/train.py" in _cmdline(p)]
        stage = [p for p in running if not set(_descendants(p)) & set(running)]
        assert len(stage) == 1, [_cmdline(p) for p in _descendants(dvc.pid)]
        os.kill(stage[0], signal.SIGKILL)
        output, _ = dvc.communicate(timeout=120)
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()
    assert dvc.returncode != 0, output
    proxy.hold = None
    proxy.release.set()

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("spinflow-crash").experiment_id
    left = client.search_runs([experiment])
    assert {r.info.run_name: r.info.status for r in left} == {
        "spin-" + left[0].data.tags["spinflow.pipeline_key"][:8]: "RUNNING",
        "iter_0": "RUNNING",
    }
    (orphan,) = client.search_logged_models([experiment])
    stored = server.log.parent / "artifacts"
    assert [p for p in stored.rglob("model.safetensors") if orphan.model_id in str(p)]

    # the next run, with another β: its first stage that logs puts MLflow right
    raw["spin"]["beta"] = 0.2
    (repo.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    output = repo.run("dvc", "repro", "train_iter_0", env={"MLFLOW_TRACKING_URI": proxy.url})
    assert repo.ran(output) == {"train_iter_0"}, output

    for run in left:
        after = client.get_run(run.info.run_id)
        assert after.info.status == "FAILED", run.info.run_name
        assert "ended without finishing" in after.data.tags["spinflow.interrupted"]
    models = client.search_logged_models([experiment])
    assert orphan.model_id not in {m.model_id for m in models}
    assert not [p for p in stored.rglob("*") if orphan.model_id in str(p) and p.is_file()]
    versions = client.search_model_versions("name = 'crash'")
    assert len(versions) == 1  # and its logged model is the only one left
    assert [m.model_id for m in models] == [versions[0].source.removeprefix("models:/")]
    (now,) = client.search_runs(
        [experiment], "attributes.run_name = 'iter_0' and attributes.status != 'FAILED'"
    )
    assert now.info.status == "FINISHED" and now.info.run_id == versions[0].run_id


# ---------------------------------------------------------------------------------------------
# What MLflow refuses every time is not retried, and not replayed by every later stage


def _refused(message: str = "Invalid model name 'a/b:c'. Names cannot contain '/' or ':'."):
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def test_only_errors_that_may_pass_are_retried():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    calls = []

    def refused():
        calls.append("refused")
        raise _refused()

    def unavailable():
        calls.append("unavailable")
        raise MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE)

    def too_large():  # a proxy's answer, without MLflow's error code
        calls.append("too large")
        raise MlflowException(
            "API request to endpoint /api/2.0/mlflow-artifacts/artifacts/model.safetensors "
            "failed with error code 413 != 200. Response body: 'Request Entity Too Large'"
        )

    for fails in (refused, too_large):
        with pytest.raises(MlflowException):
            tracking._with_retries(fails, 30)
    with pytest.raises(MlflowException):
        tracking._with_retries(unavailable, 0.5)
    assert calls.count("refused") == 1 and calls.count("too large") == 1
    assert calls.count("unavailable") >= 2


class RefusingTracker:
    """Stands in for the Tracker: MLflow refuses the stages in ``refuse``, as it will every
    time; ``logged`` lists every stage it was asked to log."""

    refuse: set[str] = set()
    logged: list[str] = []

    def __init__(self, params, graph, uri, stage):
        pass

    def recover(self) -> None:
        pass

    def release(self) -> None:
        pass

    def _log(self, stage: str) -> None:
        self.logged.append(stage)
        if stage in self.refuse:
            raise _refused()

    def training(self, model) -> None:
        self._log(model.stage)

    def evaluation(self, evaluation) -> None:
        self._log(evaluation.stage)

    def report(self) -> None:
        self._log("report")


def test_a_refused_stage_says_so_once_and_waits_for_sync(
    tiny_checkpoint_session, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "Tracker", RefusingTracker)
    monkeypatch.setattr(RefusingTracker, "logged", [])
    monkeypatch.setattr(RefusingTracker, "refuse", {"train_iter_0", "eval_sft"})
    params = tiny_params(tiny_checkpoint_session, tracking={"retry_seconds": 60})
    graph = build(params)
    key = tracking.pipeline_key(params)

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        caplog.clear()
        return found

    def replayed() -> dict[str, bool]:
        return {e.stage: e.replay for e in pending.read()}

    # refused after its work: not retried for 60 s, one warning, left to sync
    started = time.monotonic()
    tracking.after_stage(params, graph, graph.stage("train_iter_0"))
    assert time.monotonic() - started < 30
    assert RefusingTracker.logged == ["train_iter_0"]
    (warning,) = warnings()
    assert "refused" in warning and "python -m spinflow.tracking sync" in warning
    assert "\n" not in warning and replayed() == {"train_iter_0": False}

    # a stage pending after a failure that may pass, then refused when replayed: said once
    pending.add("eval_sft", key, "sqlite:///elsewhere", "HTTP 503 from /api/2.0/mlflow/runs/get")
    tracking.after_stage(params, graph, graph.stage("eval_iter_0"))
    assert RefusingTracker.logged[1:] == ["eval_sft", "eval_iter_0"]
    (warning,) = warnings()
    assert "eval_sft" in warning and "no longer replayed" in warning
    assert replayed() == {"train_iter_0": False, "eval_sft": False}

    # later stages log themselves and nothing refused
    tracking.after_stage(params, graph, graph.stage("eval_iter_1"))
    assert RefusingTracker.logged[3:] == ["eval_iter_1"] and warnings() == []

    # sync tries everything again: refused, it fails in one line; fixed, nothing is pending
    with pytest.raises(tracking.TrackingError) as err:
        tracking.sync(params)
    assert "\n" not in str(err.value)
    assert set(replayed()) == {"train_iter_0", "eval_sft"}
    RefusingTracker.refuse = set()
    tracking.sync(params)
    assert pending.read() == []
    assert RefusingTracker.logged[-3:] == ["train_iter_0", "eval_sft", "report"]

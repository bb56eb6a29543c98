"""Sharing synthetic data and checkpoints through a DVC remote.

Repository A (the session's tiny pipeline, already reproduced) pushes its cache and run cache;
fresh clones get the same bytes without running a stage: through a local-directory remote,
through an S3 server on the loopback interface, and with ``dvc repro --pull``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from spinflow.provenance import PROVENANCE_FILE, tree_hash

pytestmark = pytest.mark.slow

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def torch_device() -> str:
    """The device kind torch reports here, which the stage processes also see."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _publish(origin, dest: Path, remote_args: list[list[str]], env: dict[str, str] | None = None):
    """A copy of ``origin`` whose committed DVC config names a default remote, pushed to it."""
    repo = origin.copy(dest)
    repo.env.update(env or {})
    for name in AWS_UNSET:
        repo.env.pop(name, None)
    for args in remote_args:
        repo.run("dvc", "remote", *args)
    repo.run("git", "commit", "-q", "-am", "DVC remote")
    output = repo.run("dvc", "push", "--run-cache")
    assert "pushed" in output, output
    return repo


def _assert_same_outputs(clone, origin) -> None:
    theirs, ours = origin.output_digests(), clone.output_digests()
    assert any(path.startswith("models/theta_1/") for path in theirs), sorted(theirs)
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    different = [path for path in theirs if ours[path] != theirs[path]]
    assert not different, f"files differ from the origin's: {different}"


def _assert_nothing_to_do(clone) -> None:
    status = clone.run("dvc", "status")
    assert "Data and pipelines are up to date" in status, status
    output = clone.run("dvc", "repro")
    assert not clone.ran(output), output
    assert "Data and pipelines are up to date" in output, output


@pytest.fixture(scope="module")
def local_origin(tiny_dvc_repo, tmp_path_factory):
    """Repository A with a local-directory remote, pushed with its run cache."""
    base = tmp_path_factory.mktemp("local-remote")
    storage = base / "storage"
    return _publish(tiny_dvc_repo, base / "A", [["add", "-d", "storage", str(storage)]])


def test_clone_pulls_the_same_bytes_and_has_nothing_to_run(local_origin, tmp_path):
    clone = local_origin.clone(tmp_path / "B")
    assert not (clone.root / "models" / "theta_1").exists()
    clone.run("dvc", "pull")
    in_sync = clone.run("dvc", "status", "--cloud")
    assert "are in sync" in in_sync, in_sync
    _assert_nothing_to_do(clone)
    _assert_same_outputs(clone, local_origin)


def test_repro_pull_fetches_outputs_instead_of_running(local_origin, tmp_path):
    clone = local_origin.clone(tmp_path / "C")
    output = clone.run("dvc", "repro", "--pull")
    assert not clone.ran(output), output
    _assert_nothing_to_do(clone)
    _assert_same_outputs(clone, local_origin)


def test_recomputing_on_another_checkout_gives_the_same_bytes(local_origin, tmp_path):
    """Sampling and training on CPU are deterministic: a teammate who re-runs generation and
    training (forced) gets the origin's exact synthetic pairs and checkpoint."""
    clone = local_origin.clone(tmp_path / "D")
    clone.run("dvc", "pull")
    output = clone.run(
        "dvc", "repro", "--force", "--single-item", "generate_iter_0", "train_iter_0"
    )
    assert clone.ran(output) == {"generate_iter_0", "train_iter_0"}, output
    dirs = ("generated", "models/theta_1")
    assert clone.output_digests(dirs) == local_origin.output_digests(dirs)


def test_outputs_record_what_produced_them(local_origin):
    """provenance.json beside every cached output: stage, params, input hashes, versions."""
    expected = {
        "models/base": "prepare_model",
        "data/prepared": "prepare_data",
        "models/theta_0": "sft",
        "eval/sft": "eval_sft",
        "generated/iter_0": "generate_iter_0",
        "models/theta_1": "train_iter_0",
        "eval/iter_0": "eval_iter_0",
    }
    for folder, stage in expected.items():
        record = local_origin.json(f"{folder}/{PROVENANCE_FILE}")
        assert record["stage"] == stage
        assert record["params"] and record["device"] == torch_device()
        assert {"spinflow", "torch", "transformers"} <= set(record["libraries"])
        for name, entry in record["inputs"].items():
            actual = tree_hash(local_origin.root / entry["path"])
            assert entry["sha256_16"] == actual, f"{folder}: input {name} ({entry['path']})"
    trained = local_origin.json(f"models/theta_1/{PROVENANCE_FILE}")
    assert trained["inputs"]["model"]["path"] == "models/theta_0"
    assert trained["params"]["beta"] == 0.1


# ---------------------------------------------------------------------------------------------
# S3 protocol: a moto server on 127.0.0.1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answers(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"moto_server exited {server.returncode}: {log.read_text()[-3000:]}")
        try:
            opener.open(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"moto_server did not answer at {url} within {timeout:.0f}s: {log.read_text()}")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """An S3-compatible server (moto) on a free loopback port, with bucket ``spinflow``."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("dvc_s3", reason="dvc-s3 (pip install 'dvc[s3]') is not installed")
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("moto")
    log = home / "moto.log"
    for name in ("config", "credentials"):
        (home / name).write_text("")
    env = {
        **S3_ENV,
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
    }
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_answers(endpoint, server, log, timeout=60)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="spinflow")
        yield endpoint, client, env
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


def test_round_trip_through_an_s3_remote(tiny_dvc_repo, s3_endpoint, tmp_path):
    endpoint, client, env = s3_endpoint
    origin = _publish(
        tiny_dvc_repo,
        tmp_path / "A",
        [
            ["add", "-d", "s3store", "s3://spinflow/cache"],
            ["modify", "s3store", "endpointurl", endpoint],
        ],
        env=env,
    )
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="spinflow")
        for item in page.get("Contents", [])
    ]
    assert any(key.startswith("cache/files/md5/") for key in keys), keys[:20]
    assert any(key.startswith("cache/runs/") for key in keys), keys[:20]

    clone = origin.clone(tmp_path / "B")
    clone.run("dvc", "pull")
    _assert_nothing_to_do(clone)
    _assert_same_outputs(clone, origin)

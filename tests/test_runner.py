"""Tests for spinflow.runner: one stage of the graph, its arguments, its tracking hook, its errors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml

from spinflow import pipeline, runner, tracking
from spinflow.config import default_params_dict, validate_params

REPO = Path(__file__).resolve().parents[1]


def _write_params(tmp_path, **spin) -> str:
    raw = default_params_dict()
    raw["spin"].update(iterations=2, **spin)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


@pytest.fixture
def hooks(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def running(params, graph, stage):
        calls.append(("running", stage.name))
        try:
            yield
        except BaseException as error:
            calls.append(("failed", stage.name, type(error).__name__))
            raise

    monkeypatch.setattr(tracking, "preflight", lambda params: calls.append(("preflight",)))
    monkeypatch.setattr(tracking, "running", running)
    monkeypatch.setattr(
        tracking,
        "after_stage",
        lambda params, graph, stage: calls.append(("after", stage.name)),
        raising=False,
    )
    return calls


def test_execute_passes_the_graph_arguments_and_logs_afterwards(hooks):
    params = validate_params(default_params_dict())
    seen = []
    result = runner.execute(params, "train_iter_1", lambda p, k: seen.append(k) or "done")
    assert result == "done" and seen == [1]
    assert hooks == [("preflight",), ("running", "train_iter_1"), ("after", "train_iter_1")]


def test_only_the_main_process_of_a_launch_tracks(hooks, monkeypatch):
    params = validate_params(default_params_dict())
    monkeypatch.setenv("RANK", "1")
    assert runner.execute(params, "train_iter_1", lambda p, k: k) == 1
    assert hooks == []


def test_untracked_stage_calls_no_tracking(hooks):
    params = validate_params(default_params_dict())
    assert runner.execute(params, "generate_iter_0", lambda p, k: k) == 0
    assert hooks == []


def test_a_failing_stage_is_not_logged(hooks):
    params = validate_params(default_params_dict())

    def broken(p, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        runner.execute(params, "eval_sft", broken)
    assert hooks == [
        ("preflight",),
        ("running", "eval_sft"),
        ("failed", "eval_sft", "RuntimeError"),
    ]


def test_run_stage_unknown_stage_is_one_line(tmp_path, capsys, hooks):
    params = _write_params(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        runner.run_stage("train", lambda p, k: None, ["train_iter_7", "--params", params])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: train_iter_7: no stage 'train_iter_7' in the pipeline")


def test_run_stage_refuses_a_stage_of_another_script(tmp_path, capsys, hooks):
    params = _write_params(tmp_path)
    with pytest.raises(SystemExit):
        runner.run_stage("train", lambda p, k: None, ["generate_iter_0", "--params", params])
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: generate_iter_0: stage 'generate_iter_0' is run by stages/generate.py, "
        "not stages/train.py"
    )


def test_run_stage_under_dvc_stops_on_a_stale_dvc_yaml(tmp_path, capsys, monkeypatch, hooks):
    params_file = _write_params(tmp_path)
    for folder in ("src", "stages"):  # dvc.yaml lists the scripts and the modules they import
        (tmp_path / folder).symlink_to(REPO / folder)
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["spin"]["iterations"] = 3
    pipeline.write(validate_params(raw), tmp_path / "dvc.yaml")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    called = []
    with pytest.raises(SystemExit):
        runner.run_stage(
            "generate", lambda p, k: called.append(k), ["generate_iter_0", "--params", params_file]
        )
    assert called == []
    err = capsys.readouterr().err
    assert "does not match params.yaml" in err and "run `spinflow pipeline write`" in err


def test_run_stage_checks_the_overrides_its_command_names(tmp_path, capsys, hooks):
    params = _write_params(tmp_path, per_iteration={"iter_1": {"learning_rate": 1e-6}})
    ran = []
    runner.run_stage(
        "train",
        lambda p, k: ran.append(k),
        ["train_iter_1", "--params", params, "--override", "spin.per_iteration.iter_1"],
    )
    assert ran == [1]
    with pytest.raises(SystemExit):  # rendered before the override was added
        runner.run_stage("train", lambda p, k: ran.append(k), ["train_iter_1", "--params", params])
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: train_iter_1: the command names overrides [] but params.yaml gives "
        "['spin.per_iteration.iter_1']; run `spinflow pipeline write`"
    )
    assert ran == [1]


def test_a_damaged_output_of_another_stage_says_how_to_restore_it(tmp_path, capsys, hooks):
    from spinflow.errors import DataError

    params = _write_params(tmp_path)

    def reads_truncated_pairs(p, k):
        raise DataError(
            "generated/iter_0/pairs.jsonl: line 8: not valid JSON (...)",
            path=Path("generated/iter_0/pairs.jsonl"),
        )

    with pytest.raises(SystemExit):
        runner.run_stage("train", reads_truncated_pairs, ["train_iter_0", "--params", params])
    assert capsys.readouterr().err.strip() == (
        "error: train_iter_0: generated/iter_0/pairs.jsonl: line 8: not valid JSON (...); it is "
        "an output of stage 'generate_iter_0': `dvc checkout --force generate_iter_0` restores "
        "it from the cache, `dvc repro --force --single-item generate_iter_0` makes it again"
    )


@pytest.mark.parametrize(
    ("code", "words"),
    [(28, "no space left on device"), (30, "read-only file system"), (13, "permission denied")],
)
def test_a_write_failure_outside_an_atomic_output_is_one_line(tmp_path, capsys, hooks, code, words):
    import os

    params = _write_params(tmp_path)

    def fails(p, k):
        raise OSError(code, os.strerror(code), "mlflow.db")

    with pytest.raises(SystemExit) as info:
        runner.run_stage("generate", fails, ["generate_iter_0", "--params", params])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: generate_iter_0: cannot write mlflow.db: {words}")
    assert len(err.splitlines()) == 1


def test_other_os_errors_keep_their_traceback(tmp_path, hooks):
    params = _write_params(tmp_path)

    def fails(p, k):
        raise FileNotFoundError(2, "No such file or directory", "somewhere")

    with pytest.raises(FileNotFoundError):
        runner.run_stage("generate", fails, ["generate_iter_0", "--params", params])

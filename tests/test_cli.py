"""Tests for the `spinflow` command: help, params, options in either place, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spinflow import cli
from spinflow.config import default_params_dict, describe_schema

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _spinflow(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "spinflow.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )


def test_help_is_written_for_users_not_a_docstring(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":mod:" not in out
    assert "dvc repro" in out
    for command in ("validate", "params", "pipeline", "benchmark", "evaluate"):
        assert command in out
    assert "spinflow validate --params x.yaml" in out  # examples


@pytest.mark.parametrize("before", [True, False])
def test_params_option_before_or_after_the_command(tmp_path, capsys, before):
    raw = default_params_dict()
    raw["spin"]["train"]["learning_rate"] = -1.0
    path = _write(tmp_path / "x.yaml", raw)
    argv = ["--params", str(path), "validate"] if before else ["validate", "--params", str(path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == f"error: {path}: 'spin.train.learning_rate' = -1.0: Input should be greater than 0"
    )


def test_params_after_the_command_wins(tmp_path, capsys):
    good = _write(tmp_path / "good.yaml", default_params_dict())
    assert cli.main(["--params", "missing.yaml", "validate", "--params", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: valid"


def test_params_shows_current_values_allowed_values_and_defaults(tmp_path, capsys):
    raw = default_params_dict()
    raw["spin"]["beta"] = 0.25
    raw["spin"]["loss"] = "hinge"
    raw["spin"]["per_iteration"] = {"iter_2": {"learning_rate": 1e-7}}
    raw["model"]["gguf_file"] = None
    path = _write(tmp_path / "params.yaml", raw)
    assert cli.main(["params", "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert "['" not in out and "{'" not in out  # no Python reprs
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert set(lines) == {key for key, _, _ in describe_schema()}
    beta = lines["spin.beta"].split()
    assert beta[1] == "0.25" and "(default: 0.1)" in lines["spin.beta"]
    assert "number > 0" in lines["spin.beta"]
    assert lines["spin.loss"].split()[1] == "hinge"
    assert "sigmoid | hinge" in lines["spin.loss"] and "(default: sigmoid)" in lines["spin.loss"]
    assert "{iter_2: {learning_rate: 1.0e-07}}" in lines["spin.per_iteration"]
    assert lines["model.gguf_file"].split()[1] == "null"
    assert "None" not in out and "True" not in out and "False" not in out
    assert "true | false" in lines["sft.enabled"]
    assert "number in (0, 1]" in lines["generate.top_p"]
    assert "(default" not in lines["spin.iterations"]  # unchanged keys show no default


def test_params_of_a_broken_file_shows_the_defaults_and_says_why(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("spin:\n  betaa: 1\n", encoding="utf-8")
    assert cli.main(["params", "--params", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "unknown key 'spin.betaa'" in err and "showing the defaults" in err
    assert out.startswith("# defaults")


def test_params_piped_into_head_ends_quietly():
    """`spinflow params | head -1`: the reader goes away before spinflow writes."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spinflow.cli", "params", "--defaults"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert err == "", err


def test_params_piped_into_head_in_a_shell():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        f"{sys.executable} -m spinflow.cli params --defaults | head -n 1",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.startswith("# defaults"), proc.stdout
    assert proc.stderr == "", proc.stderr


def test_validate_checks_the_files_params_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = default_params_dict()
    raw["spin"]["accelerate_config"] = "configs/accelerate/missing.yaml"
    path = _write(tmp_path / "params.yaml", raw)
    assert cli.main(["validate", "--params", str(path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: spin.accelerate_config: configs/accelerate/missing.yaml: file not found "
        "(ready-made ones are in configs/accelerate/; null runs training in one process)"
    )


def test_pipeline_write_refuses_a_missing_accelerate_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = default_params_dict()
    raw["spin"]["accelerate_config"] = "nowhere.yaml"
    path = _write(tmp_path / "params.yaml", raw)
    assert cli.main(["pipeline", "write", "--params", str(path)]) == 1
    assert "spin.accelerate_config: nowhere.yaml: file not found" in capsys.readouterr().err
    assert not (tmp_path / "dvc.yaml").exists()


def test_pipeline_write_on_a_read_only_directory_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from spinflow import io

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "params.yaml", default_params_dict())
    for folder in ("src", "stages"):
        (tmp_path / folder).symlink_to(REPO / folder)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".dvc.yaml.tmp-1-x"))

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    assert cli.main(["pipeline", "write", "--params", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write dvc.yaml: read-only file system"), err
    assert len(err.splitlines()) == 1


def test_evaluate_scores_checkpoints_on_the_validation_split(tmp_path, tiny_checkpoint, capsys):
    from spinflow.io import read_json, write_jsonl
    from spinflow.tasks import generate_examples

    data = tmp_path / "prepared"
    data.mkdir()
    records = generate_examples(5, seed=3)
    write_jsonl(data / "val.jsonl", records)
    raw = default_params_dict()
    raw["eval"]["max_new_tokens"] = 4
    params = _write(tmp_path / "params.yaml", raw)
    out = tmp_path / "val.json"
    argv = ["evaluate", str(tiny_checkpoint), "--params", str(params), "--data", str(data)]
    assert cli.main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"| {tiny_checkpoint} | 5 | " in table
    [result] = read_json(out)
    assert result["split"] == "val" and result["num_examples"] == 5
    passed = result["verifier_pass_rate"]
    assert result["verifier_pass_rate_ci"].startswith(f"{passed:.3f} [")
    # no test split prepared: one line naming the file, and no checkpoint that is not one
    assert cli.main([*argv, "--split", "test"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {data / 'test.jsonl'}: file not found; "
        "run `dvc repro prepare_data` to prepare the data"
    )
    assert cli.main(["evaluate", str(tmp_path), "--params", str(params)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path}: not a checkpoint directory (no config.json in it)"
    )


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_validates_with_every_key_dvc_reads(preset, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the files presets name are relative to the project root
    assert cli.main(["validate", "--params", f"configs/{preset}"]) == 0, capsys.readouterr().err


def test_validate_names_a_key_a_stage_reads_that_the_file_lacks(tmp_path, capsys):
    raw = default_params_dict()
    del raw["spin"]["feedback_filter"]
    path = _write(tmp_path / "x.yaml", raw)
    assert cli.main(["validate", "--params", str(path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {path}: missing key 'spin.feedback_filter' (stage 'train_iter_0' depends on it "
        "and DVC reads it from the file; `spinflow params` shows its default)"
    )

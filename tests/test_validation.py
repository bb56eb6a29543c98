"""Tests for spinflow.validation: the files params.yaml names, the keys DVC reads, and the
validate_params stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spinflow.config import default_params_dict, validate_params
from spinflow.errors import ConfigError
from spinflow.graph import build
from spinflow.validation import check_dvc_keys, check_references, validate_stage

REPO = Path(__file__).resolve().parents[1]


def _params(**sections):
    raw = default_params_dict()
    for section, changes in sections.items():
        raw[section].update(changes)
    return validate_params(raw)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_defaults_name_no_file(project):
    check_references(_params())


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"spin": {"accelerate_config": "configs/none.yaml"}},
            "spin.accelerate_config: configs/none.yaml: file not found (ready-made ones are in "
            "configs/accelerate/; null runs training in one process)",
        ),
        (
            {"spin": {"accelerate_config": "configs"}},
            "spin.accelerate_config: configs: is a directory, not a file (ready-made ones are in "
            "configs/accelerate/; null runs training in one process)",
        ),
        (
            {"data": {"source": "corpus"}},
            "data.source: corpus is a directory; name one .jsonl, .parquet or .csv file inside it "
            "(or a Hub dataset id such as HuggingFaceH4/ultrachat_200k)",
        ),
        (
            {"data": {"source": "corpus/chat.jsonl"}},
            "data.source: corpus/chat.jsonl: file not found (nor is it a Hub dataset id org/name)",
        ),
        (
            {"data": {"source": "corpus/notes.txt"}},
            "data.source: corpus/notes.txt: unsupported file type '.txt'; use .jsonl, .parquet "
            "or .csv",
        ),
        (
            {"model": {"source": "corpus/my-sft"}},
            "model.source: model path corpus/my-sft does not exist (read as a local path, not a "
            "hub id, because corpus/ exists here)",
        ),
        (
            {"model": {"source": "corpus"}},
            "model.source: {root}/corpus is not a model checkpoint: config.json is missing",
        ),
    ],
)
def test_each_file_problem_is_one_line(project, sections, message):
    (project / "configs").mkdir()
    (project / "corpus").mkdir()
    (project / "corpus" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError) as info:
        check_references(_params(**sections))
    assert str(info.value) == message.format(root=project.resolve())


@pytest.mark.parametrize("key", ["spin.accelerate_config", "generate.accelerate_config"])
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "file not found"),
        ("# SPIN\n\nA README, not a config.\n", "not an accelerate config (a YAML mapping with"),
        ("compute_environment: LOCAL_MACHINE\n", "not an accelerate config (a YAML mapping with"),
        ("a: [1\n", "not an accelerate config (invalid YAML: "),
        (b"\xff\xfe", "not an accelerate config (not UTF-8 text)"),
    ],
)
def test_an_accelerate_config_must_be_one(project, key, text, problem):
    path = project / "launch.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text, encoding="utf-8")
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        check_references(_params(**{section: {name: "launch.yaml"}}))
    message = str(info.value)
    assert message.startswith(f"{key}: launch.yaml: {problem}"), message
    assert "\n" not in message and "configs/accelerate/" in message


def test_hub_ids_and_existing_files_pass(project):
    (project / "configs").mkdir()
    (project / "configs" / "ddp.yaml").write_text("distributed_type: MULTI_GPU\n")
    (project / "chat.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    check_references(
        _params(
            spin={"accelerate_config": "configs/ddp.yaml"},
            generate={"accelerate_config": str(REPO / "configs/accelerate/cpu_2proc.yaml")},
            data={"source": "chat.jsonl"},
            model={"source": "alignment-handbook/zephyr-7b-sft-full"},
        )
    )
    check_references(_params(data={"source": "HuggingFaceH4/ultrachat_200k"}))


def test_every_key_a_stage_lists_must_be_in_the_file():
    params = _params()
    graph = build(params)
    raw = default_params_dict()
    check_dvc_keys(raw, graph)
    del raw["prompt"]["system_prompt"]  # generate_iter_k lists prompt.system_prompt
    with pytest.raises(ConfigError) as info:
        check_dvc_keys(raw, graph)
    assert str(info.value) == (
        "params.yaml: missing key 'prompt.system_prompt' (stage 'generate_iter_0' depends on it "
        "and DVC reads it from the file; `spinflow params` shows its default)"
    )


def test_the_stage_checks_the_file_in_the_working_directory(project):
    raw = default_params_dict()
    (project / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert validate_stage(validate_params(raw)) == {"params": "params.yaml", "valid": True}
    del raw["eval"]
    (project / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError, match="missing key 'eval'"):
        validate_stage(validate_params(raw))

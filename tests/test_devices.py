"""Every stage runs its models on the device decided for it (spinflow.devices), nowhere else.

The stage processes of the test pipelines load tests/device_hook/sitecustomize.py, which records
each forward pass (and each continuous engine) with the device decided, the device the model was
placed on when loaded, and the device its weights were on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spinflow import devices, precision
from spinflow.errors import ConfigError


def device_records(root: Path) -> list[dict]:
    folder = root / ".spinflow" / "test-devices"
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.open()]


def assert_on_decided_device(records: list[dict], stages: set[str]) -> None:
    assert stages <= {r["stage"] for r in records}, sorted({r["stage"] for r in records})
    for record in records:
        assert len(record["decided"]) == 1, record  # one decision per stage process
        decided = record["decided"][0]
        assert record["placed"] == decided, record  # loaded onto it
        assert record["ran_on"] == decided, record  # and run there


def test_every_stage_of_the_pipeline_runs_its_models_where_decided(tiny_dvc_repo):
    records = device_records(tiny_dvc_repo.root)
    stages = {"sft", "generate_iter_0", "train_iter_0", "eval_sft", "eval_iter_0"}
    assert_on_decided_device(records, stages)
    # generation ran through the continuous engine, evaluation through forward passes too
    assert {r["what"] for r in records if r["stage"] == "generate_iter_0"} == {"continuous engine"}
    assert {"continuous engine", "forward"} <= {
        r["what"] for r in records if r["stage"] == "eval_sft"
    }


def test_the_decision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.stage_device("auto") == torch.device("cpu")
    assert devices.stage_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device: cuda, but torch sees no CUDA GPU"):
        devices.stage_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.stage_device("auto") == torch.device("cuda", 1)  # one GPU a process
    assert devices.stage_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"process 2 of this machine has no GPU of its own"):
        devices.stage_device("auto")


def test_inference_stays_float32_on_cpus():
    assert precision.inference_dtype(torch.device("cpu")) == torch.float32
    with precision.autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")

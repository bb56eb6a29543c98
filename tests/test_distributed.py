"""Training in several processes, as GPU users run it: `accelerate launch` with the configs of
configs/accelerate/, here with 2 CPU processes talking over gloo.

One process with gradient accumulation 2 takes the same optimizer steps as 2 processes with
accumulation 1 (the same batches, each process holding one): DDP and FSDP2 must give its weights
and its logged metrics (reduced over both processes, not one process's share)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PROJECT_ROOT, DvcRepo, free_port

pytestmark = pytest.mark.slow

DDP = PROJECT_ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
FSDP = PROJECT_ROOT / "configs" / "accelerate" / "fsdp.yaml"
# one SPIN iteration and θ0's SFT: (script, stage, params section, checkpoint, metrics name)
STAGES = {
    "spin": ("train", "train_iter_0", ("spin", "train"), "models/theta_1", "train_iter_0"),
    "sft": ("sft", "sft", ("sft",), "models/theta_0", "sft"),
}


def set_params(repo: DvcRepo, section: tuple[str, ...], **values) -> None:
    path = repo.root / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    node = params
    for key in section:
        node = node[key]
    node.update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def launch(repo: DvcRepo, config: Path | None, script: str, stage: str, *extra: str) -> str:
    """The stage's command as dvc.yaml has it with an accelerate config (or plain python)."""
    if config is None:
        return repo.run("python", f"stages/{script}.py", stage, timeout=120)
    return repo.run(
        "accelerate",
        "launch",
        "--config_file",
        str(config),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        *extra,
        f"stages/{script}.py",
        stage,
        timeout=120,
    )


def outputs(repo: DvcRepo, checkpoint: str, metrics: str) -> dict:
    root = repo.root
    with open(root / "plots" / f"{metrics}_steps.csv", encoding="utf-8") as f:
        steps = list(csv.DictReader(f))
    return {
        "weights": load_file(root / checkpoint / "model.safetensors"),
        "steps": steps,
        "summary": json.loads((root / "metrics" / f"{metrics}.json").read_text(encoding="utf-8")),
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module", params=sorted(STAGES))
def trained(request, tiny_dvc_repo, tmp_path_factory):
    """The stage run 3 times in a copy of the tiny pipeline: one process (accumulation 2), then
    DDP and FSDP2 in 2 processes (accumulation 1); the outputs of each and what they printed."""
    script, stage, section, checkpoint, metrics = STAGES[request.param]
    repo = tiny_dvc_repo.copy(tmp_path_factory.mktemp(f"distributed-{stage}") / "repo")
    results = {}
    set_params(repo, section, batch_size=2, gradient_accumulation_steps=2, bf16=False)
    results["one"] = (launch(repo, None, script, stage), outputs(repo, checkpoint, metrics))
    set_params(repo, section, gradient_accumulation_steps=1)
    results["ddp"] = (launch(repo, DDP, script, stage), outputs(repo, checkpoint, metrics))
    results["fsdp"] = (
        # the 8-GPU bf16 config, on 2 CPU processes in float32 as the other runs
        launch(repo, FSDP, script, stage, "--num_processes", "2", "--mixed_precision", "no"),
        outputs(repo, checkpoint, metrics),
    )
    return request.param, results


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_give_the_one_process_weights(trained, kind):
    _, results = trained
    one, other = results["one"][1], results[kind][1]
    assert len(one["steps"]) >= 2
    assert max_difference(one["weights"], other["weights"]) < 1e-5


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_logged_metrics_are_reduced_over_both_processes(trained, kind):
    """Each process holds half of a step's batches: its own loss differs from the step's (as a
    different batch's would); the logged one equals the single process's over both."""
    _, results = trained
    one, other = results["one"][1], results[kind][1]
    assert len(one["steps"]) == len(other["steps"])
    for expected, got in zip(one["steps"], other["steps"], strict=True):
        assert expected.keys() == got.keys()
        for key in expected:
            assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-4, abs=1e-6), key
    summary = other["summary"]
    assert summary["examples_seen"] == one["summary"]["examples_seen"]
    assert summary["tokens_seen"] == one["summary"]["tokens_seen"]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_only_the_main_process_reports(trained, kind):
    stage_kind, results = trained
    stage = STAGES[stage_kind][1]
    printed = results[kind][0]
    assert printed.count(f"{stage} done:") == 1, printed

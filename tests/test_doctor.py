"""`spinflow doctor` on this CPU: every line, the exit status, and checks that fail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spinflow import doctor
from spinflow.cli import main
from spinflow.config import load_params
from spinflow.doctor import FAIL, PASS, SKIP
from spinflow.sandbox import active_layers, confinement_problem

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = PROJECT_ROOT / "configs" / "accelerate"
# what the doctor must run without: neither is installed on the GPU machines it is meant for
BLOCKED = ("mlflow", "dvc", "datasets", "trl", "lm_eval")
LINE = re.compile(r"^(PASS|FAIL|SKIP)  ([^:]+): (\S.*)$")
SUMMARY = re.compile(r"^doctor \((.+)\): (\d+) passed, (\d+) failed, (\d+) skipped in [\d.]+ s$")


def _params_file(tmp_path: Path, spin_accelerate_config: str) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["spin"]["accelerate_config"] = spin_accelerate_config
    raw["generate"]["accelerate_config"] = None
    # float32 engines (the strict tolerance); auto would first time bf16 decoding here, which
    # tests/test_engines.py covers
    raw["generate"]["dtype"] = "float32"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _expected(spin_accelerate: str) -> dict[str, str]:
    """Every check the doctor prints on this machine, with the status it must have."""
    layers = active_layers()
    return {
        "device cpu": PASS,
        "engine torch": PASS,
        "engine continuous (generate.engine)": PASS,
        "engine vllm": SKIP,  # not installed, or no GPU to run it
        **{f"sandbox {layer.name}": PASS if layer.active else SKIP for layer in layers},
        "sandbox call": PASS,
        # autoif.enabled is false in params.yaml: a weak sandbox is no failure
        "sandbox confinement": SKIP if confinement_problem(layers) else PASS,
        "accelerate spin.accelerate_config": spin_accelerate,
        "accelerate generate.accelerate_config": SKIP,
        "generate cpu torch": PASS,
        "generate cpu continuous": PASS,
        "train cpu": PASS,
    }


def test_doctor_passes_on_this_cpu_without_dvc_or_mlflow(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("cpu_2proc.yaml needs 2 cores")
    params = _params_file(tmp_path, "configs/accelerate/cpu_2proc.yaml")
    # None in sys.modules: `import mlflow` raises ImportError, as where it is not installed
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None\n"
        "from spinflow.cli import main\n"
        f"raise SystemExit(main(['doctor', '--params', {str(params)!r}]))\n"
    )
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    *lines, summary = proc.stdout.strip().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = {m[2]: m[1] for m in parsed}
    assert len(got) == len(lines)  # no check twice
    expected = _expected(PASS)
    assert got == expected
    reasons = {m[2]: m[3] for m in parsed}
    assert "bf16" in reasons["device cpu"] and "float64" in reasons["device cpu"]
    assert reasons["accelerate spin.accelerate_config"].startswith(
        "configs/accelerate/cpu_2proc.yaml: MULTI_GPU"
    )
    assert "2 processes a machine on the CPU" in reasons["accelerate spin.accelerate_config"]
    for engine in ("torch", "continuous"):
        assert "32 tokens for 2 prompts" in reasons[f"generate cpu {engine}"]
        assert "tolerance 1e-04" in reasons[f"generate cpu {engine}"]
    assert "1 SPIN step" in reasons["train cpu"]
    assert "spin.train.bf16: auto -> " in reasons["train cpu"]
    assert "loss 0.693147 = 0.693147 at equal policy and reference" in reasons["train cpu"]
    counts = SUMMARY.match(summary)
    assert counts, summary
    statuses = list(expected.values())
    assert counts.groups() == (
        str(params),
        str(statuses.count(PASS)),
        "0",
        str(statuses.count(SKIP)),
    )


def test_a_broken_accelerate_config_fails_naming_the_file(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: MULTI_GPU\nnum_processes: [2\n", encoding="utf-8")
    params = _params_file(tmp_path, str(broken))
    monkeypatch.chdir(PROJECT_ROOT)
    # the smoke test is the run above's; here every other line, in JSON
    monkeypatch.setattr(doctor, "smoke_test", lambda *args: iter(()))
    assert main(["doctor", "--params", str(params), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["params"] == str(params)
    got = {c["name"]: c["status"] for c in report["checks"]}
    smoke = ("generate ", "train ")
    assert got == {k: v for k, v in _expected(FAIL).items() if not k.startswith(smoke)}
    reason = next(c["reason"] for c in report["checks"] if c["status"] == FAIL)
    assert reason.startswith(f"{broken}: not an accelerate config (invalid YAML")
    assert "\n" not in reason


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs (for the accelerate checks only)."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_accelerate_processes_against_the_gpus_here(gpus):
    multi_gpu = str(CONFIGS / "multi_gpu.yaml")
    gpus(8)
    check = doctor.check_accelerate_config("spin.accelerate_config", multi_gpu, "auto")
    assert check.status == PASS, check
    assert "8 processes a machine on 8 GPUs, 1 machine" in check.reason
    gpus(1)
    check = doctor.check_accelerate_config("spin.accelerate_config", multi_gpu, "auto")
    assert check.status == FAIL
    assert check.reason == (
        f"{multi_gpu}: 8 processes a machine but 1 GPU here for them; a stage runs one process a GPU"
    )
    gpus(16)
    check = doctor.check_accelerate_config(
        "spin.accelerate_config", str(CONFIGS / "multi_node.yaml"), "auto"
    )
    assert check.status == PASS
    assert "8 processes a machine on 16 GPUs, 8 left idle, 2 machines, this one rank 0" in (
        check.reason
    )


def test_accelerate_configs_that_cannot_run(tmp_path, gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(doctor, "_cpu_cores", lambda: 2)
    fsdp = str(CONFIGS / "fsdp.yaml")
    check = doctor.check_accelerate_config("spin.accelerate_config", fsdp, "auto")
    assert (check.status, check.reason) == (
        FAIL,
        f"{fsdp}: 8 processes a machine on the CPU, more than its 2 cores (no GPU here)",
    )
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nbogus: 1\n")
    check = doctor.check_accelerate_config("generate.accelerate_config", str(unknown), "auto")
    assert check.status == FAIL
    assert check.reason.startswith(f"{unknown}: accelerate cannot read it: ValueError: ")
    assert "unknown keys (['bogus'])" in check.reason
    gpus(16)
    rank = tmp_path / "rank.yaml"
    config = yaml.safe_load((CONFIGS / "multi_node.yaml").read_text())
    rank.write_text(yaml.safe_dump({**config, "machine_rank": 1}))
    check = doctor.check_accelerate_config("spin.accelerate_config", str(rank), "auto")
    assert check.status == FAIL and "machine_rank 1; keep 0 in the file" in check.reason
    missing = doctor.check_accelerate_config("spin.accelerate_config", "nowhere.yaml", "auto")
    assert missing.status == FAIL and missing.reason.startswith("nowhere.yaml: file not found")


def test_the_chosen_engine_fails_where_it_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("vllm may run here")
    checks, usable = doctor.check_engines("vllm")
    assert usable == ["torch", "continuous"]
    chosen = checks[-1]
    assert (chosen.status, chosen.name) == (FAIL, "engine vllm (generate.engine)")
    assert "vllm" in chosen.reason


def test_a_device_that_computes_wrong_fails(monkeypatch):
    monkeypatch.setattr(doctor, "_product_error", lambda device: 2e-3)
    check = doctor.check_device(torch.device("cpu"))
    assert check.status == FAIL
    assert "differs from float64's by 2.0e-03 (relative), more than 1e-04" in check.reason


def test_log_probs_that_disagree_with_training_fail(tiny_checkpoint_session, monkeypatch):
    params = load_params(PROJECT_ROOT / "params.yaml")
    smoke = doctor.prepare_smoke(params, tiny_checkpoint_session)
    scored = doctor.scored_logps
    check, completions = doctor.check_generation(params, torch.device("cpu"), "torch", smoke)
    assert check.status == PASS and completions is not None
    monkeypatch.setattr(doctor, "scored_logps", lambda *a: [v + 1e-3 for v in scored(*a)])
    check, completions = doctor.check_generation(params, torch.device("cpu"), "torch", smoke)
    assert check.status == FAIL and completions is None
    assert "log-probs differ from the training's by 1.0e-03 an answer (float32)" in check.reason

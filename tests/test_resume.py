"""A training stage killed with SIGKILL resumes from its last saved state when it runs again,
and ends with the weights of a run that was never interrupted; in one and in two processes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DvcRepo, free_port
from test_distributed import DDP, set_params

pytestmark = pytest.mark.slow

HOOK = Path(__file__).parent / "kill_hook"
STAGE = "train_iter_0"
CHECKPOINT = "models/theta_1/model.safetensors"


def command(processes: int) -> list[str]:
    if processes == 1:
        return ["python", "stages/train.py", STAGE]
    return [
        "accelerate", "launch", "--config_file", str(DDP), "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()), "stages/train.py", STAGE,
    ]  # fmt: skip


def run(repo: DvcRepo, processes: int, env: dict[str, str] | None = None, check: bool = True):
    full = {**repo.env, **(env or {})}
    full["PYTHONPATH"] = f"{repo.root / 'src'}:{HOOK}"
    proc = subprocess.run(
        command(processes), cwd=repo.root, env=full, capture_output=True, text=True, timeout=180
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("processes", [1, 2])
def test_killed_training_resumes_to_the_uninterrupted_weights(processes, tiny_dvc_repo, tmp_path):
    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    state = repo.root / ".spinflow" / "resume" / STAGE
    if processes == 2:
        # 8 pairs, 2 a batch in each process: 2 optimizer steps, run once uninterrupted
        set_params(repo, ("spin", "train"), batch_size=2, bf16=False)
        set_params(repo, ("resume",), every_steps=1)
        run(repo, processes)
        assert not state.exists()  # a finished stage leaves no state behind
    else:
        # the tiny pipeline's own θ1 is the uninterrupted run (8 pairs, 4 a batch: 2 optimizer
        # steps): a forced re-run gives its bytes (test_e2e_hardening), so it is not re-trained
        set_params(repo, ("resume",), every_steps=1)
    uninterrupted = load_file(repo.root / CHECKPOINT)
    steps_file = repo.root / "plots" / f"{STAGE}_steps.csv"
    uninterrupted_steps = steps_file.read_text(encoding="utf-8")

    shutil.rmtree(repo.root / "models" / "theta_1")  # as DVC does before it runs the stage
    marker = tmp_path / "killed"
    killed = run(
        repo,
        processes,
        {"SPINFLOW_TEST_KILL_AT_STEP": "1", "SPINFLOW_TEST_KILL_MARKER": str(marker)},
        check=False,
    )
    assert killed.returncode != 0 and marker.read_text() == "1"
    assert not (repo.root / CHECKPOINT).exists()  # nothing that looks complete
    assert [p.name for p in state.iterdir()] == ["step-000000001"]

    resumed = run(repo, processes)
    assert "resumed from .spinflow/resume/train_iter_0/step-000000001 (step 1 of" in (
        resumed.stdout + resumed.stderr
    )
    weights = load_file(repo.root / CHECKPOINT)
    assert weights.keys() == uninterrupted.keys()
    for key, value in weights.items():
        assert torch.equal(value, uninterrupted[key]), key
    assert steps_file.read_text(encoding="utf-8") == uninterrupted_steps
    assert not state.exists()


def test_a_state_of_other_inputs_is_not_resumed(tmp_path, monkeypatch):
    from spinflow.io import write_json
    from spinflow.training import Resume

    monkeypatch.chdir(tmp_path)
    saved = Resume(Path(".spinflow/resume/train_iter_0"), 1, "a" * 64)
    folder = saved.directory / "step-000000003"
    folder.mkdir(parents=True)
    (saved.directory / "step-000000004").mkdir()  # no loop.json: an interrupted save
    write_json(folder / "loop.json", {"fingerprint": saved.fingerprint, "steps": 3})
    assert saved.latest() == folder
    assert Resume(saved.directory, 1, "b" * 64).latest() is None

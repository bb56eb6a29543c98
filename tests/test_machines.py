"""Several machines: DVC's command on the first (`spinflow launch`, machine rank 0) and
`spinflow worker` on a second, here two "machines" on 127.0.0.1 in one project folder (the
shared filesystem), one CPU process each, joined by torch's rendezvous."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import cpu_launch_config, free_port
from test_distributed import max_difference, outputs, set_params

pytestmark = pytest.mark.slow

STAGE = "train_iter_0"


def two_machines(repo_root: Path) -> Path:
    return cpu_launch_config(repo_root / "two_machines.yaml", free_port(), machines=2)


def dvc_command(repo) -> str:
    """The stage's command as `spinflow pipeline write` rendered it into dvc.yaml."""
    repo.run("spinflow", "pipeline", "write")
    stages = yaml.safe_load((repo.root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return stages[STAGE]["cmd"]


def start(repo, command: str | list[str], **env) -> subprocess.Popen:
    full = {**repo.env, "PYTHONPATH": str(repo.root / "src"), **env}
    return subprocess.Popen(
        command,
        shell=isinstance(command, str),
        cwd=repo.root,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_stage_on_two_machines_equals_one_process(tiny_dvc_repo, tmp_path):
    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    set_params(repo, ("spin", "train"), batch_size=2, gradient_accumulation_steps=2, bf16=False)
    repo.run("python", "stages/train.py", STAGE, timeout=120)
    one = outputs(repo, "models/theta_1", STAGE)

    set_params(repo, ("spin", "train"), gradient_accumulation_steps=1)
    config = two_machines(repo.root)
    set_params(repo, ("spin",), accelerate_config=config.name)
    command = dvc_command(repo)
    assert command.startswith(f"spinflow launch --config_file {config.name} stages/train.py")
    first = start(repo, command)
    second = start(repo, ["spinflow", "worker", STAGE, "--machine-rank", "1"])
    try:
        results = [p.communicate(timeout=180) for p in (first, second)]
    finally:  # neither machine may wait on after a failure
        for process in (first, second):
            process.kill()
    assert first.returncode == 0 and second.returncode == 0, results
    assert results[0][1].count(f"{STAGE} done:") == 1  # the main process of the first machine
    assert f"{STAGE} done:" not in results[1][1]  # the second one writes and reports nothing
    two = outputs(repo, "models/theta_1", STAGE)
    assert max_difference(one["weights"], two["weights"]) < 1e-5
    assert [float(r["loss"]) for r in two["steps"]] == pytest.approx(
        [float(r["loss"]) for r in one["steps"]], rel=1e-4
    )


def test_a_machine_that_never_joins_fails_the_stage_in_one_line(tiny_dvc_repo, tmp_path):
    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    config = two_machines(repo.root)
    set_params(repo, ("spin",), accelerate_config=config.name)
    first = start(repo, dvc_command(repo), SPINFLOW_JOIN_TIMEOUT="3")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        f"error: {STAGE}: 1 of 2 machines joined within 3 s; start `spinflow worker {STAGE} "
        "--machine-rank <rank>` on each other machine (or raise SPINFLOW_JOIN_TIMEOUT)"
    )
    assert "Traceback" not in stderr
    # and a worker whose first machine is not there
    alone = start(
        repo, ["spinflow", "worker", STAGE, "--machine-rank", "1"], SPINFLOW_JOIN_TIMEOUT="3"
    )
    _, stderr = alone.communicate(timeout=120)
    assert alone.returncode == 1
    assert stderr.strip() == (
        f"error: {STAGE}: machine 1 could not reach the first machine within 3 s; is `dvc repro` "
        "running this stage there, and is main_process_ip:main_process_port of the accelerate "
        "config reachable?"
    )
    # a stage of one machine has no worker to start
    other = start(repo, ["spinflow", "worker", "eval_sft", "--machine-rank", "1"])
    _, stderr = other.communicate(timeout=60)
    assert other.returncode == 1
    assert stderr.strip().startswith("error: stage 'eval_sft' is not launched on several machines")

"""Bad inputs and faults in a real tiny pipeline (issue 15, items 1, 2 and 6): each ends in one
line naming the file and the problem, with nothing half-written, or is recovered from.

Every test works on a copy of the session's tiny DVC repository (``tiny_dvc_repo``).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import DvcRepo, can_mount_tmpfs

pytestmark = pytest.mark.slow


def _attempt(repo: DvcRepo, *cmd: str) -> tuple[int, str]:
    env = {**repo.env, "PYTHONPATH": str(repo.root / "src")}
    proc = subprocess.run(
        cmd, cwd=repo.root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def _fails(repo: DvcRepo, *cmd: str) -> tuple[str, str]:
    """Run a command that must fail without a traceback; returns (its one error line, output)."""
    code, output = _attempt(repo, *cmd)
    assert code != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0], output


def _up_to_date(repo: DvcRepo) -> None:
    output = repo.run("dvc", "repro")
    assert not repo.ran(output) and not repo.restored(output), output
    assert "Data and pipelines are up to date" in output, output


def _replace(path: Path, data: bytes) -> None:
    """New bytes in a new file: the DVC cache is never written through a link."""
    path.unlink()
    path.write_bytes(data)


@pytest.fixture
def repo(tiny_dvc_repo, tmp_path) -> DvcRepo:
    return tiny_dvc_repo.copy(tmp_path / "repo")


# ---------------------------------------------------------------------------------------------
# Item 1: every `dvc repro` validates all of params.yaml first


def _set(text: str, section: str, key: str, value: str) -> str:
    """params.yaml text with ``section.key`` set to the YAML ``value`` (the file is flat YAML)."""
    lines = text.splitlines(keepends=True)
    start = lines.index(f"{section}:\n")
    for i in range(start + 1, len(lines)):
        if lines[i].startswith(f"  {key}:"):
            lines[i] = f"  {key}: {value}\n"
            return "".join(lines)
    raise AssertionError(f"{section}.{key} not in params.yaml")


EDITS = {
    "misspelt key": (
        lambda t: t.replace("spin:\n", "spin:\n  betaa: 0.2\n", 1),
        "error: validate_params: params.yaml: unknown key 'spin.betaa' (allowed here: "
        "accelerate_config, beta, feedback_filter, iterations, loss, mix_previous, per_iteration, start, "
        "train)",
    ),
    "infinite beta": (
        lambda t: _set(t, "spin", "beta", ".inf"),
        "error: validate_params: params.yaml: 'spin.beta' = inf: Input should be a finite number",
    ),
    "empty file": (
        lambda t: "",
        "error: validate_params: params.yaml: no parameters (the file is empty); DVC reads every "
        "key the stages list from it, so write them all: `spinflow params --defaults --yaml > "
        "params.yaml` writes the defaults",
    ),
    "missing local model": (
        lambda t: _set(t, "model", "source", "models/my-sft"),
        "error: validate_params: model.source: model path models/my-sft does not exist (read as "
        "a local path, not a hub id, because models/ exists here)",
    ),
    "data source overlapping an output": (
        lambda t: _set(t, "data", "source", "data"),
        "error: validate_params: data.source: data overlaps data/prepared, an output of stage "
        "'prepare_data'; DVC cannot track a path that is both an input and an output: copy what "
        "you need outside the pipeline's outputs and point to the copy",
    ),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_dvc_repro_validates_params_before_any_stage(repo, case):
    edit, expected = EDITS[case]
    params = repo.root / "params.yaml"
    good = params.read_text(encoding="utf-8")
    params.write_text(edit(good), encoding="utf-8")
    line, output = _fails(repo, "dvc", "repro")
    assert line == expected
    assert repo.ran(output) == {"validate_params"}, output
    params.write_text(good, encoding="utf-8")
    _up_to_date(repo)  # the failed validation recorded nothing


def test_a_duplicated_key_is_refused(repo):
    params = repo.root / "params.yaml"
    good = params.read_text(encoding="utf-8")
    params.write_text(good.replace("spin:\n", "spin:\n  beta: 0.5\n", 1), encoding="utf-8")
    # DVC reads params.yaml itself and refuses the duplicate before any stage
    code, output = _attempt(repo, "dvc", "repro")
    assert code != 0 and not repo.ran(output), output
    assert 'found duplicate key "beta"' in output
    line, _ = _fails(repo, "spinflow", "validate")
    assert line.startswith("error: params.yaml: line ")
    assert "invalid YAML: duplicate key 'beta' (first given on line" in line


# ---------------------------------------------------------------------------------------------
# Item 2: damaged inputs, missing files, full and read-only disks: one line each


RESTORE = (
    "; it is an output of stage '{stage}': `dvc checkout --force {stage}` restores it from the "
    "cache, `dvc repro --force --single-item {stage}` makes it again"
)


def test_a_truncated_pairs_file_is_one_line_and_checkout_recovers(repo):
    before = repo.output_digests()
    pairs = repo.root / "generated" / "iter_0" / "pairs.jsonl"
    data = pairs.read_bytes()
    _replace(pairs, data[: len(data) - 40])
    lines = data[: len(data) - 40].count(b"\n") + 1
    line, _ = _fails(repo, "dvc", "repro", "--single-item", "train_iter_0")
    assert line.startswith(
        f"error: train_iter_0: generated/iter_0/pairs.jsonl: line {lines}: not valid JSON ("
    )
    assert "the line is cut off: the file is truncated)" in line
    assert line.endswith(RESTORE.format(stage="generate_iter_0"))
    # the fix the line gives
    repo.run("dvc", "checkout", "--force", "generate_iter_0")
    output = repo.run("dvc", "repro")
    assert repo.ran(output) | repo.restored(output) <= {"train_iter_0"}, output
    assert repo.output_digests() == before
    assert "Data and pipelines are up to date" in repo.run("dvc", "status")


def test_pairs_without_the_generated_key_are_one_line(repo):
    import json

    pairs = repo.root / "generated" / "iter_0" / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()]
    rows[2].pop("generated")
    _replace(pairs, "".join(json.dumps(r) + "\n" for r in rows).encode())
    line, _ = _fails(repo, "dvc", "repro", "--single-item", "train_iter_0")
    assert line == (
        "error: train_iter_0: generated/iter_0/pairs.jsonl: line 3: no 'generated' key (each "
        "record needs id, prompt, real, generated)" + RESTORE.format(stage="generate_iter_0")
    )


def test_a_truncated_checkpoint_is_one_line(repo):
    weights = repo.root / "models" / "theta_0" / "model.safetensors"
    data = weights.read_bytes()
    _replace(weights, data[: len(data) // 2])
    line, _ = _fails(repo, "dvc", "repro", "--single-item", "generate_iter_0")
    assert line.startswith(
        "error: generate_iter_0: models/theta_0: the weights (model.safetensors) are truncated "
        "or corrupt (Error while deserializing header"
    )
    assert line.endswith(RESTORE.format(stage="sft"))


def test_a_missing_accelerate_config_is_one_line(repo):
    params = repo.root / "params.yaml"
    good = params.read_text(encoding="utf-8")
    params.write_text(_set(good, "spin", "accelerate_config", "configs/ddp.yaml"), encoding="utf-8")
    expected = (
        "spin.accelerate_config: configs/ddp.yaml: file not found (ready-made ones are in "
        "configs/accelerate/; null runs training in one process)"
    )
    line, _ = _fails(repo, "spinflow", "pipeline", "write")
    assert line == f"error: {expected}"
    line, output = _fails(repo, "dvc", "repro")  # dvc.yaml not re-rendered: the cause first
    assert line == f"error: validate_params: {expected}"
    assert repo.ran(output) == {"validate_params"}
    # written while the file existed, deleted afterwards: DVC stops at validate_params
    (repo.root / "configs").mkdir()
    shutil.copy(
        Path(__file__).parents[1] / "configs/accelerate/multi_gpu.yaml",
        repo.root / "configs/ddp.yaml",
    )
    repo.run("spinflow", "pipeline", "write")
    (repo.root / "configs" / "ddp.yaml").unlink()
    code, output = _attempt(repo, "dvc", "repro")
    assert code != 0 and not repo.ran(output), output
    assert (
        "failed to reproduce 'validate_params': dependency 'configs/ddp.yaml' does not exist"
        in output
    )


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -rm` with mounts")
@pytest.mark.parametrize(
    ("stage", "folder", "mount", "problem"),
    [
        (
            "prepare_model",
            "models",
            "mount -t tmpfs -o size=256k tmpfs models",
            "cannot write models/base: no space left on device (the disk is full); free some "
            "space, then run it again",
        ),
        (
            "prepare_data",
            "data",
            "mount -t tmpfs -o size=8k tmpfs data",
            "cannot write data/prepared (data/prepared/",
        ),
        (
            "prepare_model",
            "models",
            "mount --bind models models && mount -o remount,ro,bind models",
            "cannot write models/base: read-only file system; make it writable, then run it again",
        ),
    ],
)
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(
    repo, stage, folder, mount, problem
):
    """The stage process on a tiny tmpfs or a read-only bind mount of its output folder, in a
    private mount namespace (the repository's own folder is untouched)."""
    script = (
        f"{mount} && python stages/{stage}.py {stage}; echo rc=$?; echo listing: $(ls -A {folder})"
    )
    code, output = _attempt(repo, "unshare", "-rm", "sh", "-c", script)
    assert code == 0, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith(f"error: {stage}: {problem}"), output
    assert errors[0].endswith("; nothing half-written was left in its place")
    assert "rc=1" in output
    listing = next(line for line in output.splitlines() if line.startswith("listing:"))
    listing = listing.split()[1:]
    if "tmpfs" in mount:
        assert listing == [], output  # not even a .base.tmp-* on the full disk
    else:
        assert not [name for name in listing if ".tmp-" in name], output
    _up_to_date(repo)


# ---------------------------------------------------------------------------------------------
# Item 6: leftovers of a killed save, permissions


WRITER = textwrap.dedent(
    """
    import sys, time
    from spinflow.io import atomic_path
    with atomic_path(sys.argv[1], directory=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
        print(tmp, flush=True)
        time.sleep(600)
    """
)


def test_a_killed_checkpoint_save_is_cleaned_by_the_next_run(repo):
    theta_1 = repo.root / "models" / "theta_1"
    before = repo.output_digests(("models/theta_1",))
    env = {**repo.env, "PYTHONPATH": str(repo.root / "src")}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(theta_1)],
        cwd=repo.root,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    left = Path(writer.stdout.readline().strip())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    writer.stdout.close()
    assert left.parent == theta_1.parent and left.is_dir()
    output = repo.run("dvc", "repro", "--force", "--single-item", "train_iter_0")
    assert repo.ran(output) == {"train_iter_0"}, output
    assert not left.exists()
    assert not [p.name for p in theta_1.parent.iterdir() if ".tmp-" in p.name]
    assert repo.output_digests(("models/theta_1",)) == before


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [("022", 0o644, 0o755), ("002", 0o664, 0o775)]
)
def test_outputs_follow_the_umask(repo, mask, file_mode, dir_mode):
    repo.run(
        "sh", "-c", f"umask {mask} && dvc repro --force --single-item prepare_model prepare_data"
    )
    for folder in ("models/base", "data/prepared"):
        root = repo.root / folder
        assert stat.S_IMODE(root.stat().st_mode) == dir_mode, folder
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.iterdir()}
        assert set(modes.values()) == {file_mode}, (folder, modes)  # model.safetensors too

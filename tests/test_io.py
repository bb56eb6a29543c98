"""Tests for spinflow.io: atomic outputs, their permissions, leftovers of killed writers, write
failures as one line, and reading spinflow's own JSONL files back."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import can_mount_tmpfs
from spinflow import io
from spinflow.errors import DataError, OutputError

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------
# Permissions


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)],
)
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, mask, file_mode, dir_mode):
    before = os.umask(mask)
    try:
        assert io.current_umask() == mask
        io.write_json(tmp_path / "metrics.json", {"a": 1})
        io.write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
        with io.atomic_path(tmp_path / "model", directory=True) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "sub").mkdir()
            # as safetensors writes its files, whatever the umask
            fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(tmp / "model.safetensors", 0o600)
    finally:
        os.umask(before)
    assert _mode(tmp_path / "metrics.json") == file_mode  # tempfile alone gives 0600
    assert _mode(tmp_path / "rows.jsonl") == file_mode
    assert _mode(tmp_path / "model") == dir_mode  # tempfile alone gives 0700
    assert _mode(tmp_path / "model" / "config.json") == file_mode
    assert _mode(tmp_path / "model" / "sub") == dir_mode
    assert _mode(tmp_path / "model" / "model.safetensors") == file_mode


def test_a_real_checkpoint_gets_the_umask_permissions_too(tmp_path, tiny_model_session):
    before = os.umask(0o022)
    try:
        with io.atomic_path(tmp_path / "theta_1", directory=True) as tmp:
            tiny_model_session.save_pretrained(tmp)
    finally:
        os.umask(before)
    modes = {p.name: _mode(p) for p in (tmp_path / "theta_1").iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}


# ---------------------------------------------------------------------------------------------
# Leftovers of a writer that was killed

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


def _killed_writer(target: Path) -> Path:
    """Start a process saving ``target``, kill -9 it mid-save; returns what it left behind."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    left = Path(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert left.is_dir() and left.name.startswith(f".{target.name}.tmp-{proc.pid}-")
    return left


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    target = tmp_path / "models" / "theta_1"
    left = _killed_writer(target)
    assert not target.exists()  # never looked complete
    assert io.stale_siblings(target) == [left]
    with io.atomic_path(target, directory=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"a whole checkpoint")
    assert not left.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["theta_1"]
    assert (target / "model.safetensors").read_bytes() == b"a whole checkpoint"


def test_temporaries_of_older_versions_are_stale_and_a_live_writers_are_not(tmp_path):
    target = tmp_path / "theta_1"
    old = tmp_path / ".theta_1.tmp-k2j4_x9q"  # tempfile name without a pid
    old.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = tmp_path / f".theta_1.tmp-{writer.pid}-abc123"  # a writer still at work
        live.mkdir()
        other = tmp_path / ".theta_10.tmp-1-abc"  # another output's
        other.mkdir()
        assert io.stale_siblings(target) == [old]
        io.write_text(target, "x")
        assert not old.exists() and live.exists() and other.exists()
    finally:
        writer.kill()
        writer.wait()


# ---------------------------------------------------------------------------------------------
# Write failures: one line naming the output, nothing half-written left


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_a_write_failure_names_the_output_and_removes_the_partial_copy(tmp_path, code, words):
    target = tmp_path / "models" / "theta_1"
    with pytest.raises(OutputError) as info, io.atomic_path(target, directory=True) as tmp:
        (tmp / "config.json").write_text("{}")
        _fail_with(code)()
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: {words}"), message
    assert "nothing half-written was left in its place" in message
    assert info.value.code == code
    assert list(target.parent.iterdir()) == []


def test_a_failure_inside_a_directory_names_the_file_too(tmp_path):
    target = tmp_path / "data" / "prepared"
    with pytest.raises(OutputError) as info, io.atomic_path(target, directory=True) as tmp:
        io.write_text(tmp / "sft.jsonl", "{}\n")
        with open(tmp / "pool.jsonl", "w") as f:
            f.write("{}")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "pool.jsonl"))
    assert str(info.value).startswith(
        f"cannot write {target} ({target / 'pool.jsonl'}): no space left on device"
    )
    assert list(target.parent.iterdir()) == []


def test_a_rust_library_reporting_a_full_disk_is_recognised(tmp_path):
    class SafetensorError(Exception):
        pass

    target = tmp_path / "theta_1"
    with (
        pytest.raises(OutputError, match="no space left on device"),
        io.atomic_path(target, directory=True),
    ):
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_and_the_old_output_stays(tmp_path):
    target = tmp_path / "metrics.json"
    io.write_json(target, {"old": True})
    with pytest.raises(KeyError), io.atomic_path(target) as tmp:
        tmp.write_text("new")
        raise KeyError("bug")
    assert io.read_json(target) == {"old": True}
    assert list(tmp_path.iterdir()) == [target]


needs_mount = pytest.mark.skipif(
    not can_mount_tmpfs(), reason="needs `unshare -rm` with tmpfs mounts (user namespaces)"
)

SAVE = textwrap.dedent(
    """
    import sys
    from spinflow.errors import OutputError
    from spinflow.io import atomic_path
    try:
        with atomic_path(sys.argv[1] + "/theta_1", directory=True) as tmp:
            with open(tmp / "model.safetensors", "wb") as f:
                f.write(b"x" * 400_000)
    except OutputError as exc:
        print(exc)
    """
)


@needs_mount
@pytest.mark.parametrize(
    ("mount", "words"),
    [
        ("mount -t tmpfs -o size=128k tmpfs {d}", "no space left on device"),
        ("mount --bind {d} {d} && mount -o remount,ro,bind {d}", "read-only file system"),
    ],
)
def test_a_real_full_or_read_only_disk(tmp_path, mount, words):
    """A 128 KiB tmpfs and a read-only bind mount, in a private mount namespace."""
    models = tmp_path / "models"
    models.mkdir()
    script = f"{mount.format(d=models)} && {sys.executable} -c '{SAVE}' {models} && ls -A {models}"
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    message, *listing = proc.stdout.splitlines()
    assert message.startswith(f"cannot write {models / 'theta_1'}"), proc.stdout
    assert words in message
    assert listing == []  # no .theta_1.tmp-* left on the full or read-only disk


# ---------------------------------------------------------------------------------------------
# Reading spinflow's own JSONL files


def test_a_truncated_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    io.write_jsonl(path, [{"id": str(i), "generated": "an answer " * 5} for i in range(3)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(DataError) as info:
        io.read_jsonl(path)
    assert str(info.value).startswith(f"{path}: line 3: not valid JSON (Unterminated string")
    assert str(info.value).endswith("the line is cut off: the file is truncated)")
    assert info.value.path == path


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"id": "a", "prompt": "p", "real": "r"}, "no 'generated' key"),
        ({"id": "a", "prompt": "p", "real": "r", "generated": None}, "'generated' holds null"),
        ({"id": "a", "prompt": "p", "real": 3, "generated": "g"}, "'real' holds a number"),
    ],
)
def test_records_without_a_required_text_key_name_the_line(tmp_path, record, problem):
    path = tmp_path / "pairs.jsonl"
    good = {"id": "0", "prompt": "p", "real": "r", "generated": "g"}
    io.write_jsonl(path, [good, record])
    with pytest.raises(DataError) as info:
        io.read_jsonl(path, ("id", "prompt", "real", "generated"))
    assert str(info.value).startswith(f"{path}: line 2: {problem}")
    assert io.read_jsonl(path)[1] == record  # nothing required: read as it is


def test_a_file_size_limit_is_named_in_one_line(tmp_path):
    """Beyond RLIMIT_FSIZE a write fails with EFBIG (Python ignores SIGXFSZ): the line names
    the process's limit as well as the file system's."""
    import errno

    from spinflow.errors import cannot_write

    error = cannot_write(tmp_path / "model.safetensors", OSError(errno.EFBIG, "File too large"))
    assert error is not None and "\n" not in str(error)
    assert "file-size limit of this process (ulimit -f)" in str(error)

"""Atomic file and directory writes, JSON/JSONL helpers.

Every stage output is first written next to its final place (``.<name>.tmp-<pid>-<random>``)
and renamed into it at the end, so an interrupted stage never leaves an output that looks
complete (a training's steps CSV also grows in its place while training runs,
:class:`RowsCsvStream`, before the stage writes it so). A temporary sibling left by a process
that was killed (``kill -9``, power loss) is removed the next time that output is written.
Outputs get the permissions the umask gives (not the 0600/0700 of :mod:`tempfile` or of
safetensors), so teammates sharing a cache or a directory can read them. A full disk, a
read-only file system or a permission problem stops with one line naming the output
(:class:`~spinflow.errors.OutputError`), with the partial copy removed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from spinflow.errors import DataError, OutputError, cannot_write

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def names_local_folder(source: str) -> bool:
    """Whether a relative ``org/name`` path starts with a folder that exists here.

    Such a source is a local path that is missing (``models/my-sft`` where ``models/`` exists),
    not a Hugging Face hub id: reading it as a hub id would only fail later with a download
    error that hides the typo.
    """
    path = Path(source).expanduser()
    return not path.is_absolute() and len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a pid we cannot judge: leave its file alone
    return True


def stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Temporary siblings of ``path`` whose writer is gone (killed before it could clean up).

    A sibling is ``.<name>.tmp-<pid>-<random>``; it is stale when no process ``pid`` runs on this
    machine. Siblings without a pid (written by older versions) are stale too.
    """
    final = Path(path)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.tmp-(?:(\d+)-)?[A-Za-z0-9_]+$")
    stale = []
    for candidate in final.parent.iterdir():
        match = pattern.match(candidate.name)
        if match and not (match.group(1) and _pid_alive(int(match.group(1)))):
            stale.append(candidate)
    return sorted(stale)


def _tmp_sibling(path: Path, *, directory: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_siblings(path):
        log.info("removing %s, left by a writer that was killed", stale)
        with contextlib.suppress(FileNotFoundError):
            _remove(stale)
    prefix = f".{path.name}{TMP_MARK}{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _apply_umask(path: Path) -> None:
    """Give ``path`` (and everything below it) the permissions the umask gives new files:
    libraries such as safetensors write 0600 whatever the umask, tempfile 0600 and 0700."""
    mask = current_umask()

    def fix(item: str | Path) -> None:
        mode = os.lstat(item).st_mode
        if stat.S_ISLNK(mode):
            return
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        if stat.S_IMODE(mode) != full & ~mask:
            os.chmod(item, full & ~mask)

    fix(path)
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                fix(os.path.join(folder, name))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_failure(final: Path, tmp: Path | None, exc: BaseException) -> OutputError | None:
    """A write failure while making ``final`` as one line naming it (and the file, if inside)."""
    detail = ""
    inner = getattr(exc, "path", None) if isinstance(exc, OutputError) else None
    inner = inner or getattr(exc, "filename", None)
    if inner and tmp is not None:
        with contextlib.suppress(ValueError):
            relative = Path(inner).relative_to(tmp)
            detail = str(final / relative) if str(relative) != "." else ""
    return cannot_write(final, exc, detail=detail, atomic=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on error it is removed.

    A write failure (disk full, read-only, no permission) becomes an
    :class:`~spinflow.errors.OutputError` naming ``path``.
    """
    final = Path(path)
    try:
        tmp = _tmp_sibling(final, directory=directory)
    except OSError as exc:
        error = _write_failure(final, None, exc)
        if error is None:
            raise
        raise error from None
    try:
        yield tmp
        _apply_umask(tmp)
        if final.exists() or final.is_symlink():
            _remove(final)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        error = _write_failure(final, tmp, exc)
        if error is None:
            raise
        raise error from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSON lines atomically; returns the number of records."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict]:
    """Read a JSONL file written by spinflow (see data.py for user files).

    A line that is not a JSON object (a truncated or edited file), or an object without one of
    the ``required`` keys or whose value there is not text, stops with a
    :class:`~spinflow.errors.DataError` naming the file and the line.
    """
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except UnicodeDecodeError:
                raise DataError(
                    f"{path}: line {number}: not valid UTF-8 (the file is corrupt)", path=path
                ) from None
            except json.JSONDecodeError as exc:
                cut = "" if raw.endswith(b"\n") else ", the line is cut off: the file is truncated"
                problem = exc.msg.removesuffix(" at")  # "Unterminated string starting at"
                raise DataError(
                    f"{path}: line {number}: not valid JSON ({problem} at column {exc.colno}{cut})",
                    path=path,
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number}: not a JSON object", path=path)
            missing = [key for key in required if key not in record]
            if missing:
                raise DataError(
                    f"{path}: line {number}: no {', '.join(map(repr, missing))} key "
                    f"(each record needs {', '.join(required)})",
                    path=path,
                )
            wrong = next((key for key in required if not isinstance(record[key], str)), None)
            if wrong is not None:
                raise DataError(
                    f"{path}: line {number}: {wrong!r} holds {_json_kind(record[wrong])}, "
                    "expected text",
                    path=path,
                )
            records.append(record)
    return records


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", list: "an array", dict: "an object"}.get(type(value), "a number")


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    return keys


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()}


def write_rows_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV atomically; columns in order of first appearance, floats to 8 digits."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        for row in rows:
            writer.writerow(_cells(row))


class RowsCsvStream:
    """A CSV that gains its rows one at a time, each flushed as it comes, holding at every row
    the bytes :func:`write_rows_csv` writes for the rows so far.

    Made with ``rows`` (those restored by a resumed training), the file is written anew from
    them; made with none, a file left at ``path`` by an earlier run is removed and the first row
    writes the header. A row is appended under the header when its columns are known; a row
    bringing a column not seen before makes the file written again, atomically, under the wider
    header (a reader following the file then sees a new file and reads it from its start).
    """

    def __init__(self, path: str | os.PathLike, rows: Iterable[dict[str, Any]] = ()):
        self.path = Path(path)
        self._rows = list(rows)
        self._columns = _columns(self._rows)
        self._file = None
        self._writer: csv.DictWriter | None = None
        if self._rows:
            self._rewrite()
        else:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                raise cannot_write(self.path, exc) or exc from None

    def append(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        new = [k for k in row if k not in self._columns]
        if self._writer is None or new:
            self._columns.extend(new)
            self._rewrite()
            return
        try:
            self._writer.writerow(_cells(row))
            self._file.flush()
        except OSError as exc:
            raise cannot_write(self.path, exc) or exc from None

    def _rewrite(self) -> None:
        self.close()
        write_rows_csv(self.path, self._rows)
        try:
            self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise cannot_write(self.path, exc) or exc from None
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None

    def __enter__(self) -> RowsCsvStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_rows_csv(path: str | os.PathLike | None) -> list[dict[str, float]]:
    """The numeric cells of a CSV written by :func:`write_rows_csv` (a training stage's steps),
    one dict a row; [] when ``path`` is None or missing."""
    if path is None or not Path(path).is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows

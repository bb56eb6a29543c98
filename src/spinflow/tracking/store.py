"""Where runs go: the tracking URI, the artifact location, and whether MLflow can be used."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from spinflow.config import Params
from spinflow.errors import SpinflowError

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
SQLITE = "sqlite:///"

# Tags by which runs and registered versions are found again: stages are separate processes
TAG_KEY = "spinflow.pipeline_key"
TAG_ROLE = "spinflow.role"
TAG_ITERATION = "spinflow.iteration"
TAG_MODEL_HASH = "spinflow.model_hash"
TAG_VERSION = "spinflow.model_version"
TAG_MANAGED = "spinflow.managed"
TAG_SUPERSEDED = "spinflow.superseded_by"
TAG_STAGES = "dvc.stages"
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
# host:pid:start of the stage process writing into a run (see writer_id); a run still RUNNING
# whose writer has died was interrupted by a crash
TAG_WRITER = "spinflow.writer"
TAG_INTERRUPTED = "spinflow.interrupted"
# on a run a re-run of a training stage writes while the model's earlier run stays: the role the
# run takes if the stage makes another checkpoint (it is deleted if it makes the same one)
TAG_CANDIDATE = "spinflow.candidate"
TAG_FAILED = "spinflow.failed"  # the error that ended the stage whose run is FAILED


class TrackingError(SpinflowError):
    """MLflow cannot be reached or refused what a stage logged."""


def project_root() -> Path:
    """The DVC repository root that owns the tracking database.

    ``DVC_ROOT`` when DVC runs the stage (for queued and temporary experiments DVC points it at
    the original repository), else the nearest directory above the working directory holding a
    ``.dvc`` folder, else the working directory. A path inside ``<repo>/.dvc/tmp/exps/`` (a
    temporary experiment workspace) resolves to ``<repo>``.
    """
    env = os.environ.get("DVC_ROOT")
    if env:
        base = Path(env).resolve()
    else:
        cwd = Path.cwd().resolve()
        base = next((d for d in (cwd, *cwd.parents) if (d / ".dvc").is_dir()), cwd)
    parts = base.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return base


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` (a relative SQLite path made absolute against the project root),
    else ``sqlite:///<root>/mlflow.db``."""
    root = project_root()
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not env:
        return f"{SQLITE}{root / DB_FILE}"
    if env.startswith(SQLITE):
        rest = env[len(SQLITE) :]
        if rest and not rest.startswith(("/", ":memory:")):
            return SQLITE + str(root / rest)
    return env


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI with an absolute path; else None."""
    if not uri.startswith(SQLITE):
        return None
    db = Path(uri[len(SQLITE) :].split("?", 1)[0])
    return db if db.is_absolute() else None


def artifact_location(uri: str) -> str | None:
    """For a SQLite store: ``mlartifacts/`` beside the database file; else the server decides."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / ARTIFACTS_DIR).as_uri()


# ---------------------------------------------------------------------------------------------
# A SQLite store, created crash-safe
#
# MLflow creates its tables and then runs its schema migrations one by one, each committed on its
# own: a disk that fills or a kill in between leaves tables without the schema version they
# belong to, and every later attempt fails (``table ... already exists``). So the store is made
# under a temporary name beside its place and linked into place once MLflow is done; a store
# found half-made (schema not at MLflow's head) with nothing logged in it is moved aside and made
# again. A store with anything logged in it is left to MLflow, whatever its state.

# Tables whose rows a fresh store has without anything logged: MLflow's bookkeeping. The
# experiments table holds the Default experiment (id 0) too.
_BOOKKEEPING_TABLES = ("alembic_version", "workspaces")


@functools.cache
def _schema_head() -> str:
    """The schema revision the installed MLflow creates (its migrations' head)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _store_state(db: Path) -> tuple[str | None, int]:
    """(schema revision or None, rows logged in it) of the SQLite store ``db``; TrackingError
    when the file is not a database. Reads only."""
    try:
        connection = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise TrackingError(f"MLflow store {db} cannot be opened ({exc})") from None
    try:
        query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        tables = {row[0] for row in connection.execute(query)}
        revision = None
        if "alembic_version" in tables:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        logged = 0
        for table in tables - set(_BOOKKEEPING_TABLES):
            where = " WHERE experiment_id != 0" if table == "experiments" else ""
            logged += connection.execute(f'SELECT COUNT(*) FROM "{table}"{where}').fetchone()[0]
        return revision, logged
    except sqlite3.DatabaseError as exc:
        raise TrackingError(
            f"MLflow store {db} is not a readable SQLite database ({exc}); move it aside or "
            "point MLFLOW_TRACKING_URI at another store"
        ) from None
    finally:
        connection.close()


@contextlib.contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """One process at a time checks, makes or repairs the store ``db`` (other stages may start
    together in ``dvc exp run --queue``)."""
    import fcntl

    name = hashlib.sha256(str(db).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"spinflow-mlflow-store-{name}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_with_journal(db: Path) -> None:
    for path in (db, *(db.with_name(db.name + suffix) for suffix in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _create_store(db: Path, uri: str) -> None:
    """Make the store under a temporary name beside ``db`` with MLflow's own code, then link it
    into place: ``db`` is complete or absent, never half-made. A store another process put there
    meanwhile is kept."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    for stale in db.parent.glob(f".{db.name}.tmp-*"):  # left by a process that was killed
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove_with_journal(stale)
    temporary = db.with_name(f".{db.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    temporary_uri = SQLITE + str(temporary)
    try:
        try:
            SqlAlchemyStore(temporary_uri, artifact_location(uri) or str(db.parent))
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise TrackingError(
                f"cannot create the MLflow store {db} ({type(exc).__name__}: "
                f"{text[0][:200] if text else ''}); nothing was left in its place"
            ) from None
        finally:  # MLflow keeps an engine per URI: this one's file is about to go
            engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(temporary_uri, None)
            if engine is not None:
                engine.dispose()
        _fsync(temporary)
        try:
            os.link(temporary, db)  # never replaces a store another process made meanwhile
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links; the lock is held
            if not db.exists():
                os.rename(temporary, db)
        _fsync(db.parent, directory=True)
    finally:
        _remove_with_journal(temporary)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_store(uri: str) -> None:
    """A ``sqlite:///`` store ready for MLflow: made crash-safe when missing; when found half-made
    (its schema not at the installed MLflow's head) with nothing logged in it, moved aside to
    ``<name>.broken-<time>`` and made again, with one warning line saying so. A store with
    anything logged in it is never moved. Other URIs: nothing to do."""
    db = sqlite_path(uri)
    if db is None:
        return
    if db.is_file() and db.stat().st_size and _store_state(db)[0] == _schema_head():
        return  # the usual case: complete
    require_mlflow()
    with _store_lock(db):
        if not db.exists():
            _create_store(db, uri)
            return
        revision, logged = _store_state(db) if db.stat().st_size else (None, 0)
        if revision == _schema_head() or logged:
            return  # complete, or holds what was logged: MLflow's to upgrade or to refuse
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = db.with_name(f"{db.name}.broken-{stamp}")
        for number in range(2, 1000):
            if not aside.exists():
                break
            aside = db.with_name(f"{db.name}.broken-{stamp}-{number}")
        for suffix in ("", "-journal", "-wal", "-shm"):
            source = db.with_name(db.name + suffix)
            if source.exists():
                os.rename(source, aside.with_name(aside.name + suffix))
        _create_store(db, uri)
        log.warning(
            "MLflow store %s was not at the installed MLflow's schema (%s, not %s) and held "
            "nothing logged, as a disk that fills or a kill while MLflow creates it leaves it: "
            "moved it to %s and made it again",
            db,
            revision or "no version",
            _schema_head(),
            aside.name,
        )


def pipeline_key(params: Params) -> str:
    """12 hex digits identifying a pipeline: a hash of every parameter except ``tracking``."""
    data = params.model_dump(mode="json")
    data.pop("tracking", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# a URL's scheme and authority: the user information, if any, ends at the authority's last @
_AUTHORITY = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/\s?#'\"]+)")
# environment variables through which MLflow's client reads credentials
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
HIDDEN = "***"


def _hide_user_info(match: re.Match[str]) -> str:
    user_info, at, host = match.group("authority").rpartition("@")
    if not at:
        return match.group(0)
    user, colon, _ = user_info.partition(":")
    # a user name alone may be a token (https://<token>@host)
    shown = f"{user}:{HIDDEN}" if colon else HIDDEN
    return f"{match.group('scheme')}{shown}@{host}"


def redact(text: str) -> str:
    """``text`` without secrets: the password in every URL (``http://alice:***@host:port``),
    a user name alone in a URL (it may be a token), and the values of MLFLOW_TRACKING_PASSWORD
    and MLFLOW_TRACKING_TOKEN. Whatever tracking prints, logs or writes goes through it."""
    text = _AUTHORITY.sub(_hide_user_info, text)
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name, "")
        if len(secret) >= 4:  # a shorter value would hide ordinary text
            text = text.replace(secret, HIDDEN)
    return text


def health_url(uri: str) -> str:
    """The server's ``/health`` endpoint: ``uri`` without its user information (which Python's
    HTTP client would take for part of the host name) and without a query."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingError when an http(s) tracking server does not answer at all; a SQLite store
    is made ready first (:func:`prepare_store`: created crash-safe, repaired when half-made).

    ``/health`` needs no credentials; MLflow's client sends those of the URI or of
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN."""
    if uri.startswith(SQLITE):
        prepare_store(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(health_url(uri), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # something answered; authentication or routing is MLflow's business
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is unreachable ({redact(str(reason))}); start "
            "it, point MLFLOW_TRACKING_URI at a running server, or set tracking.enabled: false"
        ) from None


def require_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TrackingError(
            "tracking.enabled is true but mlflow is not installed; install it "
            "(pip install mlflow) or set tracking.enabled: false"
        ) from None


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (the only process that logs), or a plain process."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc); "" where /proc
    cannot tell; None when no such process runs (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        fields = []
    except OSError:
        fields = []
    if fields:
        return None if fields[0] in ("Z", "X") else fields[19]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def writer_id() -> str:
    """``host:pid:start`` of this process, the value of ``spinflow.writer`` on runs it writes."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid) or ''}"


def writer_alive(writer: str) -> bool:
    """Whether the process a ``spinflow.writer`` tag names may still be running.

    Only processes of this host can be checked: one of another host counts as alive.
    """
    parts = writer.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid, start = parts
    if host != socket.gethostname():
        return True
    now = _process_start(int(pid))
    return now is not None and (not start or not now or now == start)

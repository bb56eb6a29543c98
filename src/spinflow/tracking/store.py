"""Where runs go: the tracking URI, the artifact location, and whether MLflow can be used."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path

from spinflow.config import Params
from spinflow.errors import SpinflowError

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


def artifact_location(uri: str) -> str | None:
    """For a SQLite store: ``mlartifacts/`` beside the database file; else the server decides."""
    if not uri.startswith(SQLITE):
        return None
    db = Path(uri[len(SQLITE) :].split("?", 1)[0])
    if not db.is_absolute():
        return None
    return (db.parent / ARTIFACTS_DIR).as_uri()


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
    """Raise TrackingError when an http(s) tracking server does not answer at all.

    ``/health`` needs no credentials; MLflow's client sends those of the URI or of
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN."""
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

"""What is still to be logged: stages whose results are on disk but not in MLflow.

When MLflow keeps failing after a stage has done its work, the stage keeps its results (DVC
commits them) and adds itself here, in ``.spinflow/tracking-pending.json`` in the workspace (a
folder Git ignores; DVC does not know it). The next tracked stage, or ``python -m
spinflow.tracking sync``, logs them and removes them from the list.

An entry names the stage and the pipeline key of the params it ran with. Outputs on disk belong
to the params in params.yaml now, so an entry of other params cannot be replayed from them: it is
dropped with a warning saying how to log it (restore those params, then sync). An entry that
MLflow refused as it will every time (``replay`` false) is left to sync: later stages do not
replay it. The URI and the error are stored without passwords.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spinflow.io import read_json, write_json, write_text
from spinflow.tracking.store import redact

log = logging.getLogger(__name__)

PENDING_FILE = Path(".spinflow") / "tracking-pending.json"


@dataclass(frozen=True)
class Entry:
    stage: str
    pipeline_key: str
    uri: str  # where it failed to go
    error: str  # the first line of the last error
    since: str  # when it was recorded (UTC)
    replay: bool = True  # false: MLflow refuses it every time; only sync tries again


def read(path: Path = PENDING_FILE) -> list[Entry]:
    if not path.is_file():
        return []
    try:
        data = read_json(path)
        return [Entry(**item) for item in data["pending"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable (%s); nothing is replayed from it", path, exc)
        return []


def _write(entries: list[Entry], path: Path) -> None:
    if not entries:
        path.unlink(missing_ok=True)
        return
    ignore = path.parent / ".gitignore"
    if not ignore.is_file():
        write_text(ignore, "# spinflow's local state; not versioned\n*\n")
    write_json(path, {"pending": [asdict(e) for e in entries]})


def add(
    stage: str,
    pipeline_key: str,
    uri: str,
    error: str,
    path: Path = PENDING_FILE,
    *,
    replay: bool = True,
) -> None:
    """Record that ``stage`` of pipeline ``pipeline_key`` is still to be logged (``replay``:
    by the next tracked stage; else only by sync)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kept = [e for e in read(path) if (e.stage, e.pipeline_key) != (stage, pipeline_key)]
    entry = Entry(stage, pipeline_key, redact(uri), redact(error), since, replay)
    _write([*kept, entry], path)


def remove(done: list[Entry], path: Path = PENDING_FILE) -> None:
    """Forget ``done`` (logged, or dropped); entries recorded meanwhile stay."""
    gone = {(e.stage, e.pipeline_key) for e in done}
    _write([e for e in read(path) if (e.stage, e.pipeline_key) not in gone], path)

"""A training stage's per-step metrics in MLflow while it runs.

:class:`StepsTail` reads the rows a steps CSV gains; :class:`LiveMetrics` follows it from a
background thread and logs the new steps into the stage's run every
``SPINFLOW_LIVE_METRICS_INTERVAL`` seconds (default 10; 0 turns following off). Each (metric,
step) goes to the run once: steps the run already holds (from an earlier, interrupted attempt)
are skipped, so a resumed training that writes its file again adds only what is new.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from pathlib import Path

from spinflow.tracking.runs import logged_metrics, step_metrics
from spinflow.tracking.store import TrackingError, redact

log = logging.getLogger(__name__)

INTERVAL_ENV = "SPINFLOW_LIVE_METRICS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def interval() -> float:
    """Seconds between two looks at the steps file; 0: no live metrics."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise TrackingError(
            f"{INTERVAL_ENV}={text!r} is not a number of seconds >= 0 (0 turns live metrics off)"
        )
    return seconds


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


class StepsTail:
    """The complete rows a steps CSV (header first, one row a line) gains between calls.

    The file may not exist yet; its last line may be half-written (kept for the next call,
    unless ``final``). A file replaced (renamed over), cut shorter or written again from its
    start is read again from its first row; rows carry their ``step``, so the caller tells
    rows read twice apart. A file already there when the tail is made is an earlier run's: it
    is read only once it has changed.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._earlier = _identity(self.path)
        self._restart(None)

    def _restart(self, inode: tuple[int, int] | None) -> None:
        self._inode = inode
        self._offset = 0
        self._header: list[str] | None = None
        self._header_line = b""
        self._rows = 0

    def read(self, *, final: bool = False) -> list[dict[str, float]]:
        identity = _identity(self.path)
        if identity is None or identity == self._earlier:
            return []
        self._earlier = None
        inode = identity[:2]
        if inode != self._inode or identity[3] < self._offset:
            self._restart(inode)
        try:
            with open(self.path, "rb") as f:
                if self._offset:
                    f.seek(0)
                    start = f.read(len(self._header_line))
                    f.seek(self._offset - 1)
                    if start != self._header_line or f.read(1) != b"\n":
                        self._restart(inode)  # written again from its start
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:  # replaced between stat and open: the next call reads it
            return []
        end = len(data) if final else data.rfind(b"\n") + 1
        rows = []
        for line in data[:end].splitlines(keepends=True):
            self._offset += len(line)
            text = line.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            cells = next(csv.reader([text]))
            if self._header is None:
                self._header, self._header_line = cells, line
                continue
            self._rows += 1
            row: dict[str, float] = {}
            for key, value in zip(self._header, cells, strict=False):
                try:
                    row[key] = float(value)
                except ValueError:
                    continue
            row.setdefault("step", float(self._rows))
            rows.append(row)
        return rows


class LiveMetrics:
    """Logs the steps a training stage writes to ``steps_csv`` into MLflow run ``run_id`` from a
    background thread, every ``every`` seconds, until :meth:`stop`."""

    def __init__(self, client, run_id: str, steps_csv: Path, every: float):
        self.client = client
        self.run_id = run_id
        self.every = every
        self.tail = StepsTail(steps_csv)
        self._waiting: list[tuple[str, float, int]] = []
        self._logged: dict[tuple[str, int], float] | None = None  # None: ask MLflow
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="spinflow-live-metrics")
        self._thread.daemon = True  # a stage that ends without stop() is not held up

    def start(self) -> LiveMetrics:
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self, *, final: bool = False) -> None:
        """Read the file's new rows and log the steps the run does not hold yet."""
        try:
            self._waiting.extend(step_metrics(self.tail.read(final=final)))
            if not self._waiting:
                return
            if self._logged is None:
                self._logged = logged_metrics(self.client, self.run_id, ("train/",))
            new = {}
            for key, value, step in self._waiting:
                if (key, step) not in self._logged:
                    new.setdefault((key, step), value)
            if new:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                metrics = [Metric(key, value, now, step) for (key, step), value in new.items()]
                self.client.log_batch(self.run_id, metrics=metrics)
                self._logged.update(new)
            self._waiting = []
            if self._failing:
                log.info("live metrics of MLflow run %s: logging again", self.run_id)
                self._failing = False
        except Exception as exc:
            # a batch may have been stored in part: ask MLflow what it holds before the next
            self._logged = None
            text = redact(str(exc)).strip().splitlines()
            error = f"{type(exc).__name__}: {text[0][:200] if text else ''}"
            if final:  # the stage's own logging follows, and says so if MLflow still fails
                log.info(
                    "live metrics of MLflow run %s: last steps not logged (%s)", self.run_id, error
                )
            elif not self._failing:
                log.warning(
                    "live metrics of MLflow run %s failed (%s); trying again every %g s, and "
                    "the stage logs every step when it ends",
                    self.run_id,
                    error,
                    self.every,
                )
                self._failing = True

    def stop(self) -> None:
        """Stop following and log what the file holds now, its last line included."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll(final=True)

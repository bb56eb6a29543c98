"""Run model-written verification functions safely: out of process, in layers, many calls a second.

A call is a pair (function source, response). The source must define ``evaluate(response)``; the
call passes when it returns exactly ``True`` (the ``bool``), fails on ``False``, and anything else
is an error of one :class:`ErrorKind`. A bad function never raises here and never spoils other
calls::

    with Sandbox(call_timeout=2.0) as sandbox:
        results = sandbox.run([Call(source, response) for response in responses])

Layers (see :func:`active_layers` for what this machine has):

- ``process``: a worker started as ``python -I -B`` (isolated mode) with an empty environment, in
  its own session. It is a fork server: each call runs in a fresh fork of it, so a call cannot
  change what later calls see, and a crash costs a fork, not a new interpreter. The parent talks to
  the worker over two dedicated pipes with length-prefixed JSON messages; the call's process closes
  them before running any untrusted code, and its stdin/stdout/stderr are /dev/null.
- ``scratch_dir``: a fresh temporary directory holds each call's own working directory; removed
  on close.
- ``rlimits``: in each call's process, before untrusted code runs: CPU seconds, address space,
  number of processes (0; Linux does not enforce this limit for root), file size, open files,
  no core files.
- ``timeouts``: a wall-clock limit per call (the call's process is killed) and per batch; if the
  worker itself stops answering, its whole process group is killed and a fresh worker continues.
- ``seccomp`` (when ``pyseccomp`` and libseccomp are installed): a system-call filter loaded in
  each call's process after everything it needs is imported and its pipes are set up. It refuses
  with EPERM: sockets of every family; process creation (fork, vfork, clone without CLONE_THREAD,
  execve); signals to any other process; opening files for writing, creating or truncating; and
  unlink, rename, mkdir, rmdir, link, symlink, chmod, chown, truncate, utime, xattr changes and
  mount. Seccomp cannot see paths, so these are refused everywhere, the scratch directory
  included. Reading files stays allowed (imports need it). ``clone3`` and ``openat2`` answer
  ENOSYS so that the C library falls back to calls whose flags the filter can read.
- ``landlock`` (Linux 5.13 or later, unprivileged): each call's process restricts its own file
  access before untrusted code runs. It may read the Python installation (its prefixes, the
  standard library, site-packages), the system's shared libraries and /dev/urandom; read and
  write only its own directory and /dev/null; execute nothing. Everything else, the user's home,
  /etc and the project included, is refused (EACCES). From Landlock ABI 4, TCP bind and connect
  are refused too; from ABI 6, signals and abstract UNIX sockets reach no process outside the
  call.
- ``unprivileged``: a call's process is not root. Running as root, calls run as ``nobody`` when
  that user can read the Python installation (the process limit is then enforced too), else they
  keep uid 0 but give up every capability (the layer is then inactive: files owned by root stay
  root's to the call, and only ``landlock`` or ``bwrap`` keep them away).
- ``bwrap`` (when bubblewrap is installed and works here): the worker sees only the system
  directories, the Python installation (read-only) and the scratch directory (writable), in new
  user, PID, network, IPC and UTS namespaces, in a new session (no writing into the caller's
  terminal), and dies with its parent.

Every call gets a fresh, empty directory in the scratch directory as its working directory, and
after it every process it left behind is killed (the worker is their subreaper) and its directory
removed: no call can change what another call sees. :func:`confinement_problem` says whether the
active layers keep calls from the user's files (``landlock`` or ``bwrap``).

None of this is a virtual machine: a kernel exploit, or a bug in any of the layers, escapes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import functools
import importlib.util
import json
import os
import platform
import pwd
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spinflow.errors import SpinflowError

WORKER_SCRIPT = Path(__file__).with_name("sandbox_worker.py")
HEADER = struct.Struct(">I")
MAX_RESPONSE_BYTES = 1024 * 1024
STARTUP_SECONDS = 30.0
# How much longer than a call's own limit the parent waits before it gives up on the worker.
WATCHDOG_GRACE_SECONDS = 2.0
MiB = 1024 * 1024


class SandboxError(SpinflowError):
    """The sandbox itself cannot run (never raised for a bad function)."""


class Outcome(str, enum.Enum):
    """How a call ended."""

    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"


class ErrorKind(str, enum.Enum):
    """Why a call is an error."""

    TIMEOUT = "timeout"  # wall clock or CPU time limit reached
    MEMORY = "memory"  # MemoryError: the address-space limit
    CRASH = "crash"  # the call's process died or tried to exit (signal, os._exit, sys.exit)
    FORBIDDEN = "forbidden"  # a layer refused an operation (EPERM, EACCES, EROFS, EAGAIN)
    SYNTAX = "syntax"  # the source does not compile
    WRONG_RETURN_TYPE = "wrong_return_type"  # evaluate returned something other than a bool
    MISSING_EVALUATE = "missing_evaluate"  # the source defines no callable evaluate
    EXCEPTION = "exception"  # any other exception from the module code or evaluate


@dataclass(frozen=True)
class Call:
    """One call: ``evaluate(response)`` of the function defined by ``source``."""

    source: str
    response: str


@dataclass(frozen=True)
class Result:
    """The result of one call; ``kind`` and ``message`` are set for errors only."""

    outcome: Outcome
    kind: ErrorKind | None = None
    message: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


@dataclass(frozen=True)
class Layer:
    """One layer of the sandbox, whether it is active here, and what it does or why it is not."""

    name: str
    active: bool
    detail: str


class Sandbox:
    """Workers that run calls in confinement; use as a context manager, or call :meth:`close`.

    ``seccomp``, ``landlock``, ``unprivileged`` and ``bwrap``: None uses the layer when this
    machine has it, True requires it (:class:`SandboxError` otherwise), False leaves it out.
    ``workers`` calls run side by side.
    """

    def __init__(
        self,
        *,
        call_timeout: float = 2.0,
        batch_timeout: float | None = None,
        memory_bytes: int = 512 * MiB,
        file_size_bytes: int = 1 * MiB,
        open_files: int = 64,
        workers: int = 1,
        seccomp: bool | None = None,
        landlock: bool | None = None,
        unprivileged: bool | None = None,
        bwrap: bool | None = None,
    ) -> None:
        if call_timeout <= 0 or (batch_timeout is not None and batch_timeout <= 0):
            raise ValueError("timeouts must be positive")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.call_timeout = float(call_timeout)
        self.batch_timeout = batch_timeout
        self.workers = workers
        self.limits = {
            "cpu_seconds": int(call_timeout) + 1,
            "address_space_bytes": int(memory_bytes),
            "processes": 0,
            "file_size_bytes": int(file_size_bytes),
            "open_files": int(open_files),
        }
        self._seccomp_module, self._seccomp_reason = _choose_seccomp(seccomp)
        self._landlock_abi, self._landlock_reason = _choose_landlock(landlock)
        self._unprivileged = unprivileged
        self._bwrap, self._bwrap_reason = _choose_bwrap(bwrap, self._seccomp_module)
        self.scratch_dir = Path(tempfile.mkdtemp(prefix="spinflow-sandbox-"))
        self._slots: list[_Worker | None] = [None] * workers
        self._handshake: dict | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (its whole process group) and remove the scratch directory."""
        if self._closed:
            return
        self._closed = True
        for index, worker in enumerate(self._slots):
            if worker is not None:
                worker.stop()
                self._slots[index] = None
        _remove_tree(self.scratch_dir)

    def __del__(self) -> None:  # a forgotten close still stops the workers
        if not getattr(self, "_closed", True):
            self.close()

    # -- layers ----------------------------------------------------------------------------

    def layers(self) -> tuple[Layer, ...]:
        """The layers of this sandbox, as measured inside a call's process (starts a worker)."""
        self._worker(0)
        handshake = self._handshake or {}
        probe = handshake.get("probe", {})
        limits = probe.get("limits", {})
        rlimits_active = limits.get("RLIMIT_NPROC") == 0 and limits.get("RLIMIT_CPU", -1) >= 0
        calls_as_root = probe.get("uid") == 0
        seccomp_active = probe.get("seccomp_mode") == 2
        if seccomp_active:
            seccomp_detail = "refuses sockets, process creation, signals to other processes, "
            seccomp_detail += "opening files for writing and changes to the file system"
        elif self._seccomp_module is None:
            seccomp_detail = self._seccomp_reason
        else:
            seccomp_detail = str(handshake.get("seccomp", "not loaded"))
        return (
            Layer(
                "process",
                probe.get("environment") == {},
                "python -I -B worker with an empty environment in its own session; "
                "one fork per call; dedicated length-prefixed pipes",
            ),
            Layer(
                "scratch_dir",
                Path(probe.get("cwd", "/")).parent == self.scratch_dir.resolve(),
                f"{self.scratch_dir}: a fresh directory per call, removed after it, with any "
                "process the call left",
            ),
            Layer(
                "rlimits",
                rlimits_active,
                f"CPU {self.limits['cpu_seconds']} s, address space "
                f"{self.limits['address_space_bytes'] // MiB} MiB, processes 0"
                + (" (not enforced: calls run as root)" if calls_as_root else "")
                + f", file size {self.limits['file_size_bytes'] // MiB} MiB, "
                f"open files {self.limits['open_files']}",
            ),
            Layer(
                "timeouts",
                True,
                f"{self.call_timeout:g} s wall clock per call"
                + (f", {self.batch_timeout:g} s per batch" if self.batch_timeout else ""),
            ),
            Layer("seccomp", seccomp_active, seccomp_detail),
            self._landlock_layer(probe),
            self._unprivileged_layer(probe, handshake),
            Layer(
                "bwrap",
                self._bwrap is not None,
                "only system directories, Python (read-only) and the scratch directory; "
                "new user, PID, network, IPC and UTS namespaces"
                if self._bwrap is not None
                else self._bwrap_reason,
            ),
        )

    def _landlock_layer(self, probe: dict) -> Layer:
        abi = self._landlock_abi
        if not abi:
            return Layer("landlock", False, self._landlock_reason)
        if probe.get("landlock") != "active":
            return Layer("landlock", False, f"not in effect: {probe.get('landlock')}")
        detail = (
            f"ABI {abi}: reads only Python and the system's libraries, writes only the call's "
            "own directory, executes nothing"
        )
        if abi >= 4:
            detail += "; TCP bind and connect refused"
        if abi >= 6:
            detail += "; signals and abstract sockets stay inside the call"
        return Layer("landlock", True, detail)

    def _unprivileged_layer(self, probe: dict, handshake: dict) -> Layer:
        uid, capabilities = probe.get("uid"), probe.get("capabilities")
        if uid != 0 and capabilities == 0:
            name = _user_name(uid)
            return Layer("unprivileged", True, f"calls run as {name} (uid {uid}), no capabilities")
        if self._unprivileged is False:
            return Layer("unprivileged", False, "turned off")
        why = handshake.get("privileges") or "not dropped"
        if uid == 0 and capabilities == 0:
            return Layer("unprivileged", False, f"calls keep uid 0 without capabilities: {why}")
        return Layer("unprivileged", False, f"calls run as uid {uid} with capabilities: {why}")

    # -- running calls ---------------------------------------------------------------------

    def run(self, calls: Iterable[Call | tuple[str, str]]) -> list[Result]:
        """Run every call; one result per call, in order. Raises only if the sandbox cannot run."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        pending = deque(enumerate(_as_call(call) for call in calls))
        results: list[Result | None] = [None] * len(pending)
        batch_deadline = (
            time.monotonic() + self.batch_timeout if self.batch_timeout is not None else None
        )
        busy: dict[int, tuple[int, float]] = {}  # slot -> (call index, watchdog deadline)
        try:
            self._run_loop(pending, results, busy, batch_deadline)
        except BaseException:
            for slot in busy:  # their answers must not be read as answers to a later batch
                self._discard(slot)
            raise
        missing = [index for index, result in enumerate(results) if result is None]
        if missing:
            raise SandboxError(f"internal error: calls {missing[:5]} got no result")
        return results

    def _run_loop(
        self,
        pending: deque,
        results: list[Result | None],
        busy: dict[int, tuple[int, float]],
        batch_deadline: float | None,
    ) -> None:
        """Hand calls to free workers and collect answers until every call has a result."""
        while pending or busy:
            now = time.monotonic()
            if batch_deadline is not None and now >= batch_deadline:
                self._end_batch(busy, pending, results)
                break
            for slot in range(self.workers):
                if slot in busy or not pending:
                    continue
                index, call = pending.popleft()
                timeout = self.call_timeout
                if batch_deadline is not None:
                    timeout = min(timeout, max(batch_deadline - now, 0.01))
                self._send(slot, index, call, timeout)
                busy[slot] = (index, time.monotonic() + timeout + WATCHDOG_GRACE_SECONDS)
            wake = min(deadline for _, deadline in busy.values())
            if batch_deadline is not None:
                wake = min(wake, batch_deadline)
            fds = {self._slots[slot].response_fd: slot for slot in busy}
            ready, _, _ = select.select(list(fds), [], [], max(wake - time.monotonic(), 0))
            for fd in ready:
                slot = fds[fd]
                index, _ = busy[slot]
                result = self._receive(slot, index)
                if result is not None:
                    results[index] = result
                    del busy[slot]
            now = time.monotonic()
            for slot, (index, deadline) in list(busy.items()):
                if now >= deadline:
                    self._discard(slot)
                    results[index] = Result(
                        Outcome.ERROR, ErrorKind.TIMEOUT, "the worker stopped answering"
                    )
                    del busy[slot]

    def _end_batch(self, busy: dict, pending: deque, results: list) -> None:
        """The batch limit is reached: kill the running calls, give up on the waiting ones."""
        for slot, (index, _) in busy.items():
            self._discard(slot)
            results[index] = Result(
                Outcome.ERROR, ErrorKind.TIMEOUT, "the batch time limit was reached"
            )
        busy.clear()
        while pending:
            index, _ = pending.popleft()
            results[index] = Result(
                Outcome.ERROR, ErrorKind.TIMEOUT, "the batch time limit was reached before it ran"
            )

    def _send(self, slot: int, index: int, call: Call, timeout: float) -> None:
        request = {
            "id": index,
            "source": call.source,
            "response": call.response,
            "timeout": timeout,
        }
        for attempt in range(2):
            worker = self._worker(slot)
            try:
                worker.send(request)
                return
            except OSError:  # the idle worker is gone; not this call's doing
                self._discard(slot)
                if attempt:
                    raise SandboxError("the sandbox worker dies before it takes a call") from None

    def _receive(self, slot: int, index: int) -> Result | None:
        """Read what the worker sent; a result once its answer is complete, else None."""
        worker = self._slots[slot]
        try:
            message = worker.read_available()
        except _WorkerLost as exc:
            self._discard(slot)
            return Result(Outcome.ERROR, ErrorKind.CRASH, f"the worker was lost: {exc}")
        if message is None:
            return None
        result = _result_from_message(message, index)
        if result is None:
            self._discard(slot)
            return Result(Outcome.ERROR, ErrorKind.CRASH, "the worker sent an invalid answer")
        return result

    def _worker(self, slot: int) -> _Worker:
        worker = self._slots[slot]
        if worker is None:
            worker = _Worker.start(self._command(), self.scratch_dir, self._worker_config())
            if self._handshake is None:
                self._handshake = worker.handshake
            self._slots[slot] = worker
        return worker

    def _discard(self, slot: int) -> None:
        worker = self._slots[slot]
        if worker is not None:
            worker.kill()
            self._slots[slot] = None

    def _worker_config(self) -> dict:
        """What the worker needs besides its pipes: limits and the layers to set up."""
        return {
            "limits": self.limits,
            "seccomp_module": self._seccomp_module,
            "landlock_abi": self._landlock_abi,
            "unprivileged": self._unprivileged,
            "unprivileged_user": _nobody(),
            "own_pid_namespace": self._bwrap is not None,
        }

    def _command(self) -> list[str]:
        python = [sys.executable, "-I", "-B", "-c", WORKER_SCRIPT.read_text(encoding="utf-8")]
        if self._bwrap is None:
            return python
        return [*_bwrap_arguments(self._bwrap, self.scratch_dir, self._seccomp_module), *python]


class _WorkerLost(Exception):
    """The worker's pipe closed or carried garbage."""


class _Worker:
    """The parent's handle on one worker process: its pipes and process group."""

    def __init__(self, process: subprocess.Popen, request_fd: int, response_fd: int) -> None:
        self.process = process
        self.request_fd = request_fd
        self.response_fd = response_fd
        self.buffer = bytearray()
        self.handshake: dict = {}

    @classmethod
    def start(cls, command: list[str], scratch: Path, settings: dict) -> _Worker:
        """Start a worker and wait for its handshake; SandboxError if it does not come."""
        request_r, request_w = os.pipe()
        response_r, response_w = os.pipe()
        config = {"request_fd": request_r, "response_fd": response_w, **settings}
        try:
            process = subprocess.Popen(
                [*command, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={},
                cwd=scratch,
                start_new_session=True,
                pass_fds=(request_r, response_w),
            )
        except OSError as exc:
            for fd in (request_r, request_w, response_r, response_w):
                os.close(fd)
            raise SandboxError(f"cannot start the sandbox worker: {exc}") from exc
        os.close(request_r)
        os.close(response_w)
        worker = cls(process, request_w, response_r)
        deadline = time.monotonic() + STARTUP_SECONDS
        message = None
        try:
            while message is None:
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([response_r], [], [], max(remaining, 0))
                if not ready:
                    raise SandboxError("the sandbox worker did not start in time")
                message = worker.read_available()
        except _WorkerLost as exc:
            worker.kill()
            raise SandboxError(f"the sandbox worker did not start: {exc}") from None
        except BaseException:
            worker.kill()
            raise
        if not message.get("ready"):
            worker.kill()
            raise SandboxError(f"the sandbox worker failed to start: {message.get('error')}")
        worker.handshake = message
        return worker

    def send(self, request: dict) -> None:
        payload = json.dumps(request).encode("utf-8")
        view = memoryview(HEADER.pack(len(payload)) + payload)
        while view:
            view = view[os.write(self.request_fd, view) :]

    def read_available(self) -> dict | None:
        """Read what the pipe holds; the next complete message, or None if it is not complete."""
        chunk = os.read(self.response_fd, 65536)
        if not chunk:
            raise _WorkerLost(f"it exited ({self._exit_description()})")
        self.buffer += chunk
        if len(self.buffer) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self.buffer)
        if size > MAX_RESPONSE_BYTES:
            raise _WorkerLost("oversized message")
        if len(self.buffer) < HEADER.size + size:
            return None
        payload = bytes(self.buffer[HEADER.size : HEADER.size + size])
        del self.buffer[: HEADER.size + size]
        try:
            message = json.loads(payload.decode("utf-8"))
        except ValueError:
            raise _WorkerLost("unreadable message") from None
        if not isinstance(message, dict):
            raise _WorkerLost("unreadable message")
        return message

    def _exit_description(self) -> str:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"status {code}"

    def stop(self) -> None:
        """Close the request pipe (the worker exits on end of file), then kill what remains."""
        try:
            os.close(self.request_fd)
            self.request_fd = -1
            self.process.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        """Kill the worker's whole process group and release its pipes."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for fd in (self.request_fd, self.response_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.request_fd = self.response_fd = -1


def _as_call(call: Call | tuple[str, str]) -> Call:
    if not isinstance(call, Call):
        source, response = call
        call = Call(source, response)
    if not isinstance(call.source, str) or not isinstance(call.response, str):
        raise TypeError("a call's source and response must be str")
    return call


def _result_from_message(message: dict, index: int) -> Result | None:
    """A result from the worker's answer to call ``index``; None if the answer is malformed."""
    try:
        if message.get("id") != index:
            return None
        outcome = Outcome(message["outcome"])
        kind = ErrorKind(message["kind"]) if outcome is Outcome.ERROR else None
        text = message.get("message", "")
        seconds = float(message.get("seconds", 0.0))
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(text, str):
        return None
    return Result(outcome, kind, text, seconds)


def _choose_seccomp(wanted: bool | None) -> tuple[str | None, str]:
    """The path of pyseccomp's module file to give the worker, or None and why not."""
    if wanted is False:
        return None, "turned off"
    spec = importlib.util.find_spec("pyseccomp")
    if spec is None or not spec.origin:
        if wanted:
            raise SandboxError("seccomp was required but pyseccomp is not installed")
        return None, "pyseccomp is not installed"
    return spec.origin, ""


# Landlock's first system call; the number is the same on every architecture but alpha.
SYS_LANDLOCK_CREATE_RULESET = 444
LANDLOCK_CREATE_RULESET_VERSION = 1


@functools.cache
def landlock_abi() -> tuple[int, str]:
    """The Landlock ABI version this kernel offers (0 when none) and, when none, why not."""
    release = platform.release()
    if sys.platform != "linux":
        return 0, f"Landlock is a Linux feature, not on {sys.platform}"
    if platform.machine().startswith("alpha"):
        return 0, "Landlock's system call numbers differ on alpha"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    if abi > 0:
        return int(abi), ""
    code = ctypes.get_errno()
    if code == errno.ENOSYS:
        return 0, f"Linux {release} has no Landlock (it needs 5.13 or later)"
    if code == errno.EOPNOTSUPP:
        return 0, (
            f"Landlock is built into Linux {release} but not enabled: add landlock to the "
            "kernel's lsm= boot parameter"
        )
    return 0, f"Landlock does not answer on Linux {release}: {os.strerror(code)}"


def _choose_landlock(wanted: bool | None) -> tuple[int, str]:
    """The Landlock ABI to use (0: none) and, when none, why not."""
    if wanted is False:
        return 0, "turned off"
    abi, reason = landlock_abi()
    if not abi and wanted:
        raise SandboxError(f"landlock was required but is not available: {reason}")
    return abi, reason


def _nobody() -> tuple[int, int] | None:
    """uid and gid of the unprivileged user calls run as when spinflow runs as root."""
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _choose_bwrap(wanted: bool | None, seccomp_module: str | None) -> tuple[str | None, str]:
    """The bwrap executable to use, or None and why not."""
    if wanted is False:
        return None, "turned off"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if wanted:
            raise SandboxError("bwrap was required but is not installed")
        return None, "bwrap is not installed"
    problem = _bwrap_problem(bwrap, seccomp_module)
    if problem:
        if wanted:
            raise SandboxError(f"bwrap was required but does not work here: {problem}")
        return None, f"bwrap does not work here: {problem}"
    return bwrap, ""


@functools.cache
def _bwrap_problem(bwrap: str, seccomp_module: str | None) -> str:
    """Empty if bwrap can run this Python in the sandbox's view here, else bwrap's complaint."""
    scratch = Path(tempfile.mkdtemp(prefix="spinflow-sandbox-probe-"))
    try:
        command = [
            *_bwrap_arguments(bwrap, scratch, seccomp_module),
            sys.executable,
            "-I",
            "-B",
            "-c",
            "pass",
        ]
        completed = subprocess.run(
            command, capture_output=True, text=True, env={}, timeout=STARTUP_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        _remove_tree(scratch)
    if completed.returncode != 0:
        return completed.stderr.strip()[-300:] or f"exit status {completed.returncode}"
    return ""


def _bwrap_arguments(bwrap: str, scratch: Path, seccomp_module: str | None) -> list[str]:
    """bwrap and its options: system directories and Python read-only, the scratch dir writable."""
    arguments = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--dev", "/dev"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            arguments += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            arguments += ["--ro-bind", top, top]
    bound = ["/usr"]
    wanted = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    wanted += [os.path.dirname(os.path.realpath(sys.executable))]
    wanted += [os.path.realpath(path) for path in list(wanted)]
    wanted += ["/etc/ld.so.cache"]  # where the dynamic loader finds libseccomp
    if seccomp_module:
        wanted.append(seccomp_module)
    for path in sorted(set(wanted), key=len):
        covered = any(path == top or path.startswith(top.rstrip("/") + "/") for top in bound)
        if not covered and os.path.exists(path):
            arguments += ["--ro-bind", path, path]
            bound.append(path)
    arguments += ["--bind", str(scratch), str(scratch), "--chdir", str(scratch), "--"]
    return arguments


def _remove_tree(path: Path) -> None:
    """Remove a directory tree, first giving back permissions untrusted code may have taken away."""

    def restore_permissions(directory: str) -> None:
        try:
            os.chmod(directory, stat.S_IRWXU)
            with os.scandir(directory) as entries:
                subdirectories = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for subdirectory in subdirectories:
            restore_permissions(subdirectory)

    if path.is_dir():
        restore_permissions(str(path))
        shutil.rmtree(path, ignore_errors=True)


# Layers that keep a call from the user's files: either is enough.
CONFINING_LAYERS = ("landlock", "bwrap")


def confinement_problem(layers: Iterable[Layer]) -> str:
    """ "" when ``layers`` keep calls from reading or writing files outside their own directory
    and the Python installation (``landlock`` or ``bwrap`` is active); else one line naming what
    is missing and how to get it."""
    found = {layer.name: layer for layer in layers}
    if any(found[name].active for name in CONFINING_LAYERS if name in found):
        return ""
    why = "; ".join(
        f"{name}: {found[name].detail}" if name in found else f"{name}: not measured"
        for name in CONFINING_LAYERS
    )
    return (
        f"no layer keeps model-written code from reading this user's files ({why}): run on "
        "Linux 5.13 or later with Landlock enabled, or install bubblewrap (apt-get install "
        "bubblewrap) where unprivileged user namespaces are allowed"
    )


def run_calls(calls: Iterable[Call | tuple[str, str]], **options) -> list[Result]:
    """Run calls in a fresh :class:`Sandbox` (``options`` as for it) and close it."""
    with Sandbox(**options) as sandbox:
        return sandbox.run(calls)


@functools.lru_cache(maxsize=1)
def active_layers() -> tuple[Layer, ...]:
    """The layers a default :class:`Sandbox` has on this machine, measured once per process."""
    with Sandbox() as sandbox:
        return sandbox.layers()


def benchmark_sandbox(n: int = 1000, workers: Sequence[int] | None = None) -> float:
    """Time ``n`` cheap calls in a default sandbox; print and return the calls per second.

    Also prints the figure for as many workers as this machine has cores, and the active layers.
    """
    source = "def evaluate(response):\n    return response.count('a') % 2 == 0\n"
    calls = [Call(source, "a" * (index % 7)) for index in range(n)]
    figures = {}
    for count in workers or sorted({1, os.cpu_count() or 1}):
        with Sandbox(workers=count) as sandbox:
            sandbox.run(calls[:4])  # start the workers outside the timed part
            start = time.perf_counter()
            results = sandbox.run(calls)
            elapsed = time.perf_counter() - start
        if not all(r.outcome in (Outcome.PASS, Outcome.FAIL) for r in results):
            raise SandboxError("the benchmark calls did not all run")
        figures[count] = n / elapsed
    first = next(iter(figures))
    print(f"sandbox_calls_per_second  {figures[first]:.1f}")
    for count, figure in figures.items():
        print(f"sandbox_calls_per_second_workers_{count}  {figure:.1f}")
    active = [layer.name for layer in active_layers() if layer.active]
    inactive = [f"{layer.name} ({layer.detail})" for layer in active_layers() if not layer.active]
    print(f"sandbox_layers_active  {', '.join(active)}")
    if inactive:
        print(f"sandbox_layers_inactive  {', '.join(inactive)}")
    return figures[first]

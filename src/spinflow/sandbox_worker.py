"""The worker process of :mod:`spinflow.sandbox`; never imported, run as a script.

``spinflow.sandbox`` starts it as ``python -I -B -c <source of this file> <config JSON>`` with an
empty environment, in its own session, possibly inside a bubblewrap view where spinflow itself is
not visible. It therefore uses the standard library only (plus ``pyseccomp``, loaded from the file
named in the config) and imports nothing from spinflow.

The worker is a fork server. It talks to its parent over two dedicated pipes (never stdin, stdout
or stderr, which point at /dev/null), with messages framed as a 4-byte big-endian length followed
by UTF-8 JSON. For every request it forks a child; the child closes the worker's pipes, lowers its
resource limits, loads the system-call filter, and only then compiles and runs the model-written
code. The child sends its result over a fresh pipe and exits; the worker enforces the wall-clock
limit by killing the child, classifies how the child ended and answers the parent. A call therefore
starts from the same clean interpreter state as every other call, and nothing it does can change
what later calls see.
"""

import builtins
import ctypes
import errno
import functools
import importlib
import json
import os
import resource
import select
import signal
import struct
import sys
import time

# Modules that verification functions commonly use, imported once in the worker so that each call
# gets them from the fork instead of reading them from disk.
PRELOADED_MODULES = ("collections", "itertools", "math", "re", "string", "unicodedata")

HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_RESULT_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 500

# Builtins the worker uses after untrusted code ran, taken before it could replace them.
BOOL, TYPE = bool, type

PR_SET_PDEATHSIG = 1
PR_GET_SECCOMP = 21
CLONE_THREAD = 0x00010000

# Errors that mean "a sandbox layer refused this": seccomp answers EPERM, file permissions EACCES,
# the read-only bubblewrap view EROFS, and the process limit EAGAIN on fork.
FORBIDDEN_ERRNOS = frozenset({errno.EPERM, errno.EACCES, errno.EROFS, errno.EAGAIN})

# System calls the filter refuses with EPERM, whatever their arguments.
DENIED_SYSCALLS = (
    # process creation and control of other processes
    "fork",
    "vfork",
    "execve",
    "execveat",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
    "setsid",
    "setpgid",
    "unshare",
    "setns",
    # network
    "socket",
    "socketpair",
    # changes to the file system (seccomp cannot see paths: these are refused everywhere)
    "creat",
    "unlink",
    "unlinkat",
    "rmdir",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "mknod",
    "mknodat",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "truncate",
    "ftruncate",
    "fallocate",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "open_by_handle_at",
    "name_to_handle_at",
    "mount",
    "umount2",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "pivot_root",
    "chroot",
    "swapon",
    "swapoff",
    # interfaces that bypass seccomp or reach into the kernel
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "acct",
    "quotactl",
    "sethostname",
    "setdomainname",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "syslog",
    "personality",
)

# System calls that send a signal, their first argument the target: allowed only to the caller.
SIGNAL_SYSCALLS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")

# System calls refused with ENOSYS, so that the C library falls back to a call the filter can read
# (clone3 passes its flags in memory, where seccomp cannot look; openat2 likewise).
UNSUPPORTED_SYSCALLS = ("clone3", "openat2")


def write_message(fd, obj):
    """Write one framed JSON message to ``fd``, all of it."""
    payload = json.dumps(obj).encode("utf-8")
    view = memoryview(HEADER.pack(len(payload)) + payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exactly(fd, size):
    """Read ``size`` bytes from a blocking ``fd``; None at end of file."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_message(fd, max_bytes):
    """Read one framed JSON message; None at end of file or for an oversized or broken frame."""
    header = read_exactly(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > max_bytes:
        return None
    payload = read_exactly(fd, size)
    if payload is None:
        return None
    return json.loads(payload.decode("utf-8"))


def short(text):
    """A message cut to a length the parent accepts."""
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def describe(exc):
    """``Type: message`` for an exception raised by untrusted code, never raising itself."""
    try:
        return short(f"{type(exc).__name__}: {exc}")
    except BaseException:  # a hostile __str__
        return short(type(exc).__name__)


def error(kind, message):
    return {"outcome": "error", "kind": kind, "message": short(message)}


def classify_exception(exc, stage):
    """The result for an exception raised while running untrusted code at ``stage``."""
    if isinstance(exc, MemoryError):
        return error("memory", f"{stage}: {describe(exc)}")
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return error("crash", f"{stage} tried to end the process: {describe(exc)}")
    if isinstance(exc, OSError) and exc.errno in FORBIDDEN_ERRNOS:
        return error("forbidden", f"{stage}: {describe(exc)}")
    return error("exception", f"{stage}: {describe(exc)}")


def evaluate_call(source, response):
    """Compile ``source``, run it, call its ``evaluate(response)``; the result as a dict."""
    try:
        code = compile(source, "<evaluate>", "exec")
    except MemoryError as exc:
        return error("memory", f"compiling: {describe(exc)}")
    except (SyntaxError, ValueError, RecursionError) as exc:
        return error("syntax", describe(exc))
    namespace = {"__name__": "__sandboxed__", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except BaseException as exc:
        return classify_exception(exc, "module code")
    function = namespace.get("evaluate")
    if function is None:
        return error("missing_evaluate", "the source defines no function named evaluate")
    if not callable(function):
        return error("missing_evaluate", "evaluate is not callable")
    try:
        value = function(response)
    except BaseException as exc:
        return classify_exception(exc, "evaluate")
    if TYPE(value) is not BOOL:
        return error("wrong_return_type", f"evaluate returned {TYPE(value).__name__}, not bool")
    return {"outcome": "pass" if value else "fail", "kind": None, "message": ""}


def syscall_numbers(pyseccomp, names):
    """Numbers of the named system calls on this machine; calls it does not know are left out."""
    numbers = {}
    for name in names:
        number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
        if number >= 0:
            numbers[name] = number
    return numbers


def build_filter(pyseccomp):
    """The system-call filter, not loaded yet: allow by default, refuse the calls listed above.

    Built once in the worker; each child adds the rules that need its own pid, then loads it.
    """
    deny = pyseccomp.ERRNO(errno.EPERM)
    known = syscall_numbers(
        pyseccomp, (*DENIED_SYSCALLS, *UNSUPPORTED_SYSCALLS, "clone", "open", "openat", "prlimit64")
    )
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        if name in known:
            syscall_filter.add_rule(deny, known[name])
    for name in UNSUPPORTED_SYSCALLS:
        if name in known:
            syscall_filter.add_rule(pyseccomp.ERRNO(errno.ENOSYS), known[name])
    # prlimit64 on another process (pid 0 is the caller: setrlimit and getrlimit use that).
    if "prlimit64" in known:
        syscall_filter.add_rule(deny, known["prlimit64"], pyseccomp.Arg(0, pyseccomp.NE, 0))
    # clone without CLONE_THREAD creates a process; with it, a thread (allowed).
    if "clone" in known:
        syscall_filter.add_rule(
            deny, known["clone"], pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_THREAD, 0)
        )
    # Opening a file for writing, creating or truncating it (flags are argument 1 of open and
    # argument 2 of openat). Read-only opens stay allowed: imports need them.
    for name, flags_arg in (("open", 1), ("openat", 2)):
        if name not in known:
            continue
        for mask, value in (
            (os.O_ACCMODE, os.O_WRONLY),
            (os.O_ACCMODE, os.O_RDWR),
            (os.O_CREAT, os.O_CREAT),
            (os.O_TRUNC, os.O_TRUNC),
        ):
            syscall_filter.add_rule(
                deny, known[name], pyseccomp.Arg(flags_arg, pyseccomp.MASKED_EQ, mask, value)
            )
    return syscall_filter


def restrict_signals(syscall_filter, pyseccomp, numbers, pid):
    """Allow signals only to the calling process itself: sending one to another pid (or to a
    group: 0 or a negative pid) is refused."""
    deny = pyseccomp.ERRNO(errno.EPERM)
    for number in numbers.values():
        syscall_filter.add_rule(deny, number, pyseccomp.Arg(0, pyseccomp.NE, pid))


def set_limits(limits):
    """Lower the resource limits of the current process (soft and hard: they cannot be raised)."""
    for name, value in (
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_AS", limits["address_space_bytes"]),
        ("RLIMIT_NPROC", limits["processes"]),
        ("RLIMIT_FSIZE", limits["file_size_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


class Worker:
    """The fork server: reads requests, runs each in a fresh child, writes results."""

    def __init__(self, config):
        self.request_fd = config["request_fd"]
        self.response_fd = config["response_fd"]
        self.limits = config["limits"]
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.pyseccomp = None
        self.syscall_filter = None
        self.signal_syscalls = {}
        self.seccomp_status = "off"
        self.unreaped = None
        if config["seccomp_module"]:
            self.seccomp_status = self.prepare_filter(config["seccomp_module"])
        for name in PRELOADED_MODULES:
            importlib.import_module(name)
        os.environ.clear()  # the parent passes none; Python itself may have set LC_CTYPE
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def serve(self):
        """Answer requests until the parent closes the request pipe."""
        write_message(
            self.response_fd,
            {"ready": True, "seccomp": self.seccomp_status, "probe": self.run_probe()},
        )
        while True:
            request = read_message(self.request_fd, MAX_REQUEST_BYTES)
            if request is None:
                return
            call = functools.partial(evaluate_call, request["source"], request["response"])
            result = self.run_child(request["timeout"], call)
            result["id"] = request["id"]
            write_message(self.response_fd, result)
            self.reap()

    def run_probe(self):
        """What a call's process looks like from inside: limits, filter mode, environment."""

        def probe():
            return {
                "outcome": "probe",
                "seccomp_mode": self.libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0),
                "environment": dict(os.environ),
                "cwd": os.getcwd(),
                "uid": os.getuid(),
                "limits": {
                    name: resource.getrlimit(getattr(resource, name))[0]
                    for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE")
                    + ("RLIMIT_NOFILE",)
                },
            }

        result = self.run_child(10.0, probe)
        self.reap()
        return result

    def run_child(self, timeout, body):
        """Fork, confine the child, run ``body`` there; the child's answer, or how it ended."""
        result_r, result_w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                os.close(result_r)
                os.close(self.request_fd)
                os.close(self.response_fd)
                self.confine()
            except BaseException as exc:
                try:
                    write_message(result_w, error("crash", f"sandbox setup failed: {exc!r}"))
                finally:
                    os._exit(71)
            try:
                outcome = body()
                write_message(result_w, outcome)
            finally:
                os._exit(0)
        os.close(result_w)
        try:
            payload, timed_out = collect(result_r, start + timeout)
        finally:
            os.close(result_r)
        os.kill(pid, signal.SIGKILL)  # it may have answered and kept running; not reaped yet
        elapsed = time.monotonic() - start
        if payload:  # answered: reap it after the parent has the answer
            self.unreaped = pid
            result = judge(payload, False, 0, None, timeout, self.limits["cpu_seconds"])
        else:  # how it ended is the answer
            _, status, usage = os.wait4(pid, 0)
            result = judge(payload, timed_out, status, usage, timeout, self.limits["cpu_seconds"])
        result["seconds"] = elapsed
        return result

    def reap(self):
        """Wait for the child of the last call, killed already, if it was not waited for."""
        if self.unreaped is not None:
            os.waitpid(self.unreaped, 0)
            self.unreaped = None

    def confine(self):
        """In the child: die with the worker, lower the limits, load the filter."""
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the worker died before the line above took effect
            os._exit(72)
        set_limits(self.limits)
        if self.syscall_filter is not None:
            restrict_signals(self.syscall_filter, self.pyseccomp, self.signal_syscalls, os.getpid())
            self.syscall_filter.load()

    def prepare_filter(self, path):
        """Load pyseccomp from its file and build the filter; "active" or "unavailable: why"."""
        import importlib.util

        try:
            spec = importlib.util.spec_from_file_location("pyseccomp", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.syscall_filter = build_filter(module)
            self.signal_syscalls = syscall_numbers(module, SIGNAL_SYSCALLS)
        except Exception as exc:  # a missing libseccomp raises RuntimeError, others OSError
            self.syscall_filter = None
            return f"unavailable: {describe(exc)}"
        self.pyseccomp = module
        return "active"


def collect(fd, deadline):
    """Read one framed message from the child: (payload bytes or None, whether time ran out)."""
    buffer = bytearray()
    while True:
        if len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if size > MAX_RESULT_BYTES:
                return b"", False
            if len(buffer) >= HEADER.size + size:
                return bytes(buffer[HEADER.size : HEADER.size + size]), False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, True
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, False
        buffer += chunk


def judge(payload, timed_out, status, usage, timeout, cpu_seconds):
    """Turn what came back from a child, and how it ended, into a result."""
    if payload:
        try:
            result = json.loads(payload.decode("utf-8"))
        except ValueError:
            result = None
        if isinstance(result, dict) and result.get("outcome") in {"pass", "fail", "error", "probe"}:
            return result
        return error("crash", "the call sent an unreadable result")
    if payload == b"":
        return error("crash", "the call sent an oversized result")
    if timed_out:
        return error("timeout", f"no answer within {timeout:g} s (wall clock)")
    cpu_used = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu_used >= cpu_seconds - 0.5):
            return error("timeout", f"CPU time limit of {cpu_seconds} s reached")
        if number == signal.SIGSYS:
            return error("forbidden", "killed by the system-call filter")
        return error("crash", f"the call's process was killed by {signal.Signals(number).name}")
    return error(
        "crash",
        f"the call's process exited with status {os.waitstatus_to_exitcode(status)} without answering",
    )


def main():
    config = json.loads(sys.argv[1])
    worker = None
    try:
        worker = Worker(config)
    except BaseException as exc:
        write_message(config["response_fd"], {"ready": False, "error": describe(exc)})
        return
    worker.serve()


if __name__ == "__main__":
    main()

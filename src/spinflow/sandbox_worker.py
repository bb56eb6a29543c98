"""The worker process of :mod:`spinflow.sandbox`; never imported, run as a script.

``spinflow.sandbox`` starts it as ``python -I -B -c <source of this file> <config JSON>`` with an
empty environment, in its own session, possibly inside a bubblewrap view where spinflow itself is
not visible. It therefore uses the standard library only (plus ``pyseccomp``, loaded from the file
named in the config) and imports nothing from spinflow.

The worker is a fork server. It talks to its parent over two dedicated pipes (never stdin, stdout
or stderr, which point at /dev/null), with messages framed as a 4-byte big-endian length followed
by UTF-8 JSON. For every request it makes a fresh directory in the scratch directory and forks a
child; the child closes the worker's pipes, moves into that directory, lowers its resource limits,
restricts its file access with Landlock, gives up root, loads the system-call filter, and only
then compiles and runs the model-written code. The child sends its result over a fresh pipe and
exits; the worker enforces the wall-clock limit by killing the child, classifies how the child
ended and answers the parent. Then it kills every process the call left behind (the worker is
their subreaper) and removes the call's directory. A call therefore starts from the same clean
interpreter state and an empty directory, and nothing it does can change what later calls see.
"""

import builtins
import contextlib
import ctypes
import errno
import functools
import importlib
import json
import os
import resource
import select
import shutil
import signal
import stat
import struct
import sys
import sysconfig
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
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
CLONE_THREAD = 0x00010000
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Landlock (Linux 5.13 and later, <linux/landlock.h>); these system call numbers are the same on
# every architecture but alpha.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_MAKE_CHAR, FS_MAKE_BLOCK = 1 << 6, 1 << 11
FS_ABI_1 = (1 << 13) - 1  # execute, read, write, remove, make (char, dir, reg, sock, fifo, ...)
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3 and 5
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
# Shared libraries (C extensions, ctypes) and files the C library reads; none holds a secret.
SYSTEM_READ_PATHS = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/dev/urandom",
)

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


class RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def python_read_paths():
    """Where this interpreter reads its code: its prefixes, the standard library and the
    site-packages directories (never ``/``, and not other entries of sys.path, such as a
    project's source tree installed in development mode)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(sysconfig.get_paths().get(key) for key in ("stdlib", "platstdlib"))
    paths.update(sysconfig.get_paths().get(key) for key in ("purelib", "platlib"))
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    paths.update([os.path.realpath(path) for path in paths if path])
    return sorted(path for path in paths if path and path != "/" and os.path.exists(path))


def outermost(paths):
    """The existing ``paths``, resolved, without those beneath another (one rule covers them)."""
    resolved = sorted({os.path.realpath(path) for path in paths if os.path.exists(path)})
    kept = []
    for path in resolved:
        if not any(path.startswith(top.rstrip("/") + "/") for top in kept):
            kept.append(path)
    return kept


class Landlock:
    """File access of a call's process, restricted with Landlock: read the Python installation
    and the system's shared libraries, read and write its own directory and /dev/null; nothing
    else, executing nothing. From ABI 4, TCP bind and connect are refused; from ABI 6, signals
    and abstract UNIX sockets reach no process outside the call."""

    def __init__(self, libc, abi):
        self.libc = libc
        self.abi = abi
        fs = FS_ABI_1
        if abi >= 2:
            fs |= FS_REFER
        if abi >= 3:
            fs |= FS_TRUNCATE
        if abi >= 5:
            fs |= FS_IOCTL_DEV
        self.attr = RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0, 0)
        if abi >= 6:
            self.attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        self.attr_size = 8 if abi < 4 else 16 if abi < 6 else 24
        self.writable = fs & ~(FS_EXECUTE | FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV)
        self.read_paths = outermost([*python_read_paths(), *SYSTEM_READ_PATHS])
        self.device = FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)

    def syscall(self, number, *arguments):
        result = self.libc.syscall(ctypes.c_long(number), *arguments)
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    def allow(self, ruleset, path, access):
        """Allow ``access`` beneath ``path`` (file rights only, for a file); skip a missing path."""
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
            rule = PathBeneathAttr(access & self.attr.handled_access_fs, fd)
            self.syscall(
                SYS_LANDLOCK_ADD_RULE,
                ctypes.c_long(ruleset),
                ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
        finally:
            os.close(fd)

    def restrict(self, call_dir):
        """Restrict the calling process (no_new_privs must be set): for good, and its children."""
        ruleset = self.syscall(
            SYS_LANDLOCK_CREATE_RULESET,
            ctypes.byref(self.attr),
            ctypes.c_size_t(self.attr_size),
            ctypes.c_uint32(0),
        )
        try:
            for path in self.read_paths:
                self.allow(ruleset, path, FS_READ_FILE | FS_READ_DIR)
            self.allow(ruleset, "/dev/null", self.device)
            self.allow(ruleset, call_dir, self.writable)
            self.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_long(ruleset), ctypes.c_uint32(0))
        finally:
            os.close(ruleset)


def effective_capabilities(libc):
    """The calling process's effective capabilities as one number (-1 if they cannot be read)."""
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return -1
    return data[0].effective | data[1].effective << 32


def drop_bounding_capabilities(libc, last_capability):
    """Empty the bounding and ambient capability sets: no program can bring a capability back."""
    for number in range(last_capability + 1):
        libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def drop_capabilities(libc):
    """Give up every capability still held (effective, permitted, inheritable)."""
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"capset: {os.strerror(code)}")


def become_user(uid, gid):
    """Become ``uid``/``gid`` (real, effective and saved) with no supplementary groups."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def unprivileged_problem(uid, gid, paths):
    """Why a process of ``uid`` could not run the calls (it cannot become that user, or cannot
    read one of ``paths``), tried in a forked child; "" when it can."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            try:
                become_user(uid, gid)
            except OSError as exc:
                os.write(write_fd, f"cannot become uid {uid} ({exc.strerror})".encode())
                raise
            for path in paths:
                if os.path.isdir(path):
                    os.listdir(path)
                else:
                    os.close(os.open(path, os.O_RDONLY))
        except OSError as exc:
            if exc.filename:
                os.write(write_fd, f"uid {uid} cannot read {exc.filename}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        answer = b"".join(iter(functools.partial(os.read, read_fd, 4096), b""))
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return answer.decode("utf-8", "replace")


def child_pids():
    """Processes whose parent is this one (the worker is a subreaper: orphans come to it); None
    where /proc cannot tell (inside bubblewrap's view)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(n) for n in f.read().split()]
    except OSError:
        pass
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    children = []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return children


def kill_strays(own_pid_namespace, rounds=1000):
    """Kill and reap every process a call left behind; False if they outlast ``rounds`` sweeps.

    Without /proc, in a PID namespace of its own (bubblewrap), the worker signals every process
    of the namespace but itself and the namespace's first process: kill(-1)."""
    for _ in range(rounds):
        strays = child_pids()
        if strays is None:
            if not own_pid_namespace:
                return True  # nothing to list them with, nor a namespace to sweep
            with contextlib.suppress(ProcessLookupError):  # none left to signal
                os.kill(-1, signal.SIGKILL)
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                return True
            time.sleep(0.001)
            continue
        if not strays:
            return True
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in strays:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return False


def remove_tree(path):
    """Remove a call's directory, giving back permissions the call may have taken away."""
    try:
        os.rmdir(path)  # the usual case: the call wrote nothing
        return
    except OSError:
        pass
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    for directory, subdirectories, _ in os.walk(path):
        for name in subdirectories:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(directory, name), stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


class Worker:
    """The fork server: reads requests, runs each in a fresh child, writes results."""

    def __init__(self, config):
        self.request_fd = config["request_fd"]
        self.response_fd = config["response_fd"]
        self.limits = config["limits"]
        self.scratch = os.getcwd()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.pyseccomp = None
        self.syscall_filter = None
        self.signal_syscalls = {}
        self.seccomp_status = "off"
        self.unreaped = None
        self.call_dir = None
        if config["seccomp_module"]:
            self.seccomp_status = self.prepare_filter(config["seccomp_module"])
        self.landlock = (
            Landlock(self.libc, config["landlock_abi"]) if config["landlock_abi"] else None
        )
        self.own_pid_namespace = config["own_pid_namespace"] and os.getpid() < 10
        self.user = None  # (uid, gid) calls run as
        self.privileges = "kept"  # or "user", "capabilities"
        self.privileges_detail = ""
        self.last_capability = 40
        if os.geteuid() == 0 and config["unprivileged"] is not False:
            self.prepare_privileges(config["unprivileged_user"], config["unprivileged"])
            # the worker runs no program: its calls inherit sets no program can draw from
            drop_bounding_capabilities(self.libc, self.last_capability)
        # Processes a call leaves behind, if it can make any: not through the filter, nor past
        # the process limit, which holds for every user but root.
        self.strays_possible = self.syscall_filter is None and self.user is None
        self.strays_possible = self.strays_possible and os.geteuid() == 0
        self.call_prefix = f"call-{os.getpid()}-{os.urandom(4).hex()}-"  # unique across workers
        self.calls = 0
        for name in PRELOADED_MODULES:
            importlib.import_module(name)
        os.environ.clear()  # the parent passes none; Python itself may have set LC_CTYPE
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        self.libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def prepare_privileges(self, user, required):
        """Running as root: calls run as ``user`` (uid, gid) when it can read the Python
        installation, else keep uid 0 without capabilities (refused when ``required``)."""
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                self.last_capability = int(f.read())
        except (OSError, ValueError):
            pass
        self.privileges = "capabilities"
        if user is None:
            self.privileges_detail = "no unprivileged user (nobody) on this system"
        else:
            problem = unprivileged_problem(*user, [*python_read_paths(), os.__file__])
            if not problem:
                self.privileges, self.user = "user", tuple(user)
                return
            self.privileges_detail = problem
        if required:
            raise RuntimeError(f"calls cannot run unprivileged: {self.privileges_detail}")

    def serve(self):
        """Answer requests until the parent closes the request pipe."""
        write_message(
            self.response_fd,
            {
                "ready": True,
                "seccomp": self.seccomp_status,
                "privileges": self.privileges_detail,
                "probe": self.run_probe(),
            },
        )
        while True:
            request = read_message(self.request_fd, MAX_REQUEST_BYTES)
            if request is None:
                self.clean_up()
                return
            call = functools.partial(evaluate_call, request["source"], request["response"])
            result = self.run_child(request["timeout"], call)
            result["id"] = request["id"]
            write_message(self.response_fd, result)
            self.clean_up()

    def run_probe(self):
        """What a call's process looks like from inside: limits, filter mode, environment,
        user, capabilities, and whether Landlock refuses to open the root directory."""

        def probe():
            try:
                os.close(os.open("/", os.O_RDONLY | os.O_DIRECTORY))
                landlock = "root directory readable"
            except OSError as exc:
                landlock = "active" if exc.errno == errno.EACCES else describe(exc)
            return {
                "outcome": "probe",
                "seccomp_mode": self.libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0),
                "landlock": landlock,
                "environment": dict(os.environ),
                "cwd": os.getcwd(),
                "uid": os.getuid(),
                "capabilities": effective_capabilities(self.libc),
                "limits": {
                    name: resource.getrlimit(getattr(resource, name))[0]
                    for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE")
                    + ("RLIMIT_NOFILE",)
                },
            }

        result = self.run_child(10.0, probe)
        self.clean_up()
        return result

    def new_call_dir(self):
        """A fresh, empty working directory for the next call, owned by the user it runs as."""
        self.calls += 1
        path = os.path.join(self.scratch, f"{self.call_prefix}{self.calls}")
        os.mkdir(path, 0o700)
        if self.user is not None:
            os.chown(path, *self.user)
        self.call_dir = path
        return path

    def run_child(self, timeout, body):
        """Fork, confine the child, run ``body`` there; the child's answer, or how it ended."""
        call_dir = self.new_call_dir()
        result_r, result_w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                os.close(result_r)
                os.close(self.request_fd)
                os.close(self.response_fd)
                self.confine(call_dir)
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

    def clean_up(self):
        """After a call: reap its process, kill whatever it left running, remove its directory."""
        if self.unreaped is not None:
            os.waitpid(self.unreaped, 0)
            self.unreaped = None
        if self.strays_possible and not kill_strays(self.own_pid_namespace):
            raise RuntimeError("a call's processes kept multiplying")
        if self.call_dir is not None:
            remove_tree(self.call_dir)
            self.call_dir = None

    def confine(self, call_dir):
        """In the child: die with the worker, move into the call's directory, lower the limits,
        restrict file access, give up root, load the filter."""
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the worker died before the line above took effect
            os._exit(72)
        os.chdir(call_dir)
        set_limits(self.limits)
        if self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if self.landlock is not None:
            self.landlock.restrict(call_dir)
        if self.privileges != "kept":
            if self.user is not None:
                become_user(*self.user)
            drop_capabilities(self.libc)
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

"""The sandbox for model-written code: its layers, its error kinds, and an attack suite.

Every attack runs in a batch followed by a well-behaved function called twice (it must pass, then
fail), so a contained attack is one that got the right result and spoiled nothing after it. Where
a layer is absent on this machine, an attack it alone would stop is skipped with the reason.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from spinflow import sandbox as sandbox_module
from spinflow.sandbox import (
    Call,
    ErrorKind,
    Outcome,
    Result,
    Sandbox,
    SandboxError,
    active_layers,
    run_calls,
)

CALL_TIMEOUT = 1.0
GOOD = "def evaluate(response):\n    return response == 'ok'\n"
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def layers() -> dict[str, bool]:
    return {layer.name: layer.active for layer in active_layers()}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(call_timeout=CALL_TIMEOUT) as box:
        yield box


@pytest.fixture
def canary(tmp_path) -> Path:
    """A file outside the scratch directory that no call may change."""
    path = tmp_path / "canary.txt"
    path.write_text("original")
    path.chmod(0o644)
    return path


def run_then_good(box: Sandbox, source: str) -> Result:
    """Run ``source`` and then the good function twice; check those two, return the first."""
    attack, good_pass, good_fail = box.run([(source, "x"), (GOOD, "ok"), (GOOD, "no")])
    assert good_pass.outcome is Outcome.PASS, good_pass
    assert good_fail.outcome is Outcome.FAIL, good_fail
    return attack


def assert_result(result: Result, expected: Outcome | ErrorKind) -> None:
    if isinstance(expected, Outcome):
        assert result.outcome is expected, result
    else:
        assert result.outcome is Outcome.ERROR and result.kind is expected, result


# -- the attack suite ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """An attack: its source, and what it must give on a machine with the given layers (an
    Outcome or ErrorKind, or a string: the reason it cannot be contained here, to skip)."""

    name: str
    source: str
    expect: object  # Outcome | ErrorKind | callable(layers) -> Outcome | ErrorKind | str


def process_creation(layers: dict[str, bool], when_refused: object, when_allowed: object):
    """Process creation is refused by seccomp, or by the process limit when not root."""
    if layers["seccomp"]:
        return when_refused
    if not ROOT:
        return when_refused  # RLIMIT_NPROC=0: fork fails with EAGAIN
    return when_allowed


ATTACKS = [
    Attack(
        "fork_bomb",
        "import os\ndef evaluate(response):\n    while True:\n        os.fork()\n",
        lambda layers: process_creation(
            layers,
            ErrorKind.FORBIDDEN,
            "running as root without seccomp: RLIMIT_NPROC is not enforced for root",
        ),
    ),
    Attack(
        "infinite_loop",
        "def evaluate(response):\n    while True:\n        pass\n",
        ErrorKind.TIMEOUT,
    ),
    Attack(
        "sleep_forever",
        "import time\ndef evaluate(response):\n    time.sleep(3600)\n",
        ErrorKind.TIMEOUT,
    ),
    Attack(
        "memory_bomb",
        "def evaluate(response):\n    return len(bytearray(16 * 1024 ** 3)) > 0\n",
        ErrorKind.MEMORY,
    ),
    Attack(
        "memory_bomb_growing",
        "def evaluate(response):\n    hoard = []\n    while True:\n"
        "        hoard.append(bytes(10 ** 7))\n",
        ErrorKind.MEMORY,
    ),
    Attack(
        "recursion_bomb",
        "def evaluate(response):\n    return evaluate(response)\n",
        ErrorKind.EXCEPTION,  # RecursionError
    ),
    Attack(
        "recursion_bomb_through_c",
        "import sys\nsys.setrecursionlimit(10 ** 9)\nclass Nested:\n"
        "    def __repr__(self):\n        return repr(Nested())\n"
        "def evaluate(response):\n    return repr(Nested()) == ''\n",
        ErrorKind.CRASH,  # the C stack overflows: SIGSEGV
    ),
    Attack(
        "os_system",
        "import os\ndef evaluate(response):\n    return os.system('true') == 0\n",
        lambda layers: process_creation(
            layers, Outcome.FAIL, "running as root without seccomp: os.system can run"
        ),
    ),
    Attack(
        "subprocess",
        "import subprocess\ndef evaluate(response):\n"
        "    return subprocess.run(['true']).returncode == 0\n",
        lambda layers: process_creation(
            layers, ErrorKind.FORBIDDEN, "running as root without seccomp: subprocess can run"
        ),
    ),
    Attack(
        "os_exec",
        "import os\ndef evaluate(response):\n    os.execv('/bin/true', ['true'])\n",
        # without seccomp the call's process becomes `true`, which never answers
        lambda layers: ErrorKind.FORBIDDEN if layers["seccomp"] else ErrorKind.CRASH,
    ),
    Attack(
        "ctypes_kill_worker",
        "import ctypes, os\ndef evaluate(response):\n"
        "    return ctypes.CDLL(None).kill(os.getppid(), 9) == 0\n",
        # seccomp: kill fails, evaluate returns False; otherwise the worker dies and is replaced
        lambda layers: Outcome.FAIL if layers["seccomp"] else ErrorKind.CRASH,
    ),
    Attack(
        "kill_process_group",
        "import os\ndef evaluate(response):\n    os.killpg(0, 9)\n",
        lambda layers: ErrorKind.FORBIDDEN if layers["seccomp"] else ErrorKind.CRASH,
    ),
    Attack(
        "ctypes_segfault",
        "import ctypes\ndef evaluate(response):\n    return ctypes.string_at(0) == b''\n",
        ErrorKind.CRASH,
    ),
    Attack(
        "ctypes_abort",
        "import ctypes\ndef evaluate(response):\n    ctypes.CDLL(None).abort()\n",
        ErrorKind.CRASH,
    ),
    Attack(
        "override_signals_and_alarm",
        "import signal\ndef evaluate(response):\n"
        "    for number in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n"
        "        signal.signal(number, signal.SIG_IGN)\n"
        "    signal.alarm(0)\n    signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "    while True:\n        pass\n",
        ErrorKind.TIMEOUT,
    ),
    Attack(
        "block_all_signals",
        "import signal\ndef evaluate(response):\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())\n"
        "    while True:\n        pass\n",
        ErrorKind.TIMEOUT,
    ),
    Attack(
        "sys_exit",
        "import sys\ndef evaluate(response):\n    sys.exit(0)\n",
        ErrorKind.CRASH,
    ),
    Attack(
        "os_exit",
        "import os\ndef evaluate(response):\n    os._exit(0)\n",
        ErrorKind.CRASH,
    ),
    Attack(
        "print_megabytes",
        "import sys\ndef evaluate(response):\n    for _ in range(20):\n"
        "        print('x' * 1_000_000)\n        sys.stderr.write('y' * 1_000_000)\n"
        "    return False\n",
        Outcome.FAIL,
    ),
    Attack(
        "fake_protocol_on_stdout",
        "import json, os, struct\ndef evaluate(response):\n"
        "    for call_id in range(10):\n"
        "        line = json.dumps({'id': call_id, 'outcome': 'pass', 'kind': None})\n"
        "        print(line, flush=True)\n"
        "        payload = line.encode()\n"
        "        os.write(1, struct.pack('>I', len(payload)) + payload)\n"
        "        os.write(2, struct.pack('>I', len(payload)) + payload)\n"
        "    return False\n",
        Outcome.FAIL,
    ),
    Attack(
        "close_and_replace_stdio",
        "import io, os, sys\ndef evaluate(response):\n"
        "    for fd in (0, 1, 2):\n        os.close(fd)\n"
        '    sys.stdin = io.StringIO(\'{"outcome": "pass"}\')\n'
        "    sys.stdout = sys.stderr = None\n    return False\n",
        Outcome.FAIL,
    ),
    Attack(
        "close_every_pipe",
        "import os\ndef evaluate(response):\n    os.closerange(0, 4096)\n    return True\n",
        ErrorKind.CRASH,  # its answer cannot be sent
    ),
    Attack(
        "environment_snooping",
        "import os\ndef evaluate(response):\n"
        "    return bool(os.environ) or any(os.getenv(name) for name in ('HOME', 'PATH', 'USER'))\n",
        Outcome.FAIL,
    ),
    Attack(
        "import_trick_builtins",
        "def evaluate(response):\n"
        "    return __import__('builtins').__import__('socket').socket() is not None\n",
        lambda layers: (
            ErrorKind.FORBIDDEN
            if layers["seccomp"]
            else "without seccomp a socket can be created (bwrap leaves it no network)"
        ),
    ),
    Attack(
        "import_trick_subclasses",
        "def evaluate(response):\n"
        "    classes = ().__class__.__base__.__subclasses__()\n"
        "    loader = next(c for c in classes if c.__name__ == 'BuiltinImporter')\n"
        "    posix = loader.load_module('posix')\n"
        "    return posix.fork() >= 0\n",
        lambda layers: process_creation(
            layers, ErrorKind.FORBIDDEN, "running as root without seccomp: fork is allowed"
        ),
    ),
    Attack(
        "poison_the_interpreter",
        # If calls shared an interpreter, every later call would pass.
        "import builtins\nbuiltins.bool = lambda *a: True\nbuiltins.__import__ = None\n"
        "def evaluate(response):\n    return True\n",
        Outcome.PASS,
    ),
    Attack(
        "non_bool_return",
        "def evaluate(response):\n    return 1\n",
        ErrorKind.WRONG_RETURN_TYPE,
    ),
    Attack(
        "truthy_string_return",
        "def evaluate(response):\n    return 'True'\n",
        ErrorKind.WRONG_RETURN_TYPE,
    ),
    Attack(
        "object_posing_as_bool",
        # claims to be a bool through __class__; its __bool__ and __eq__ would hang if called
        "class Liar(int):\n    __class__ = property(lambda self: bool)\n"
        "    def __bool__(self):\n        while True:\n            pass\n"
        "    def __eq__(self, other):\n        while True:\n            pass\n"
        "    __hash__ = int.__hash__\n"
        "def evaluate(response):\n    return Liar(1)\n",
        ErrorKind.WRONG_RETURN_TYPE,
    ),
    Attack(
        "bool_subclass",
        # bool cannot be subclassed: the attempt is an exception inside evaluate
        "def evaluate(response):\n    return type('B', (bool,), {})(1)\n",
        ErrorKind.EXCEPTION,
    ),
    Attack(
        "del_never_returns",
        "class Hang:\n    def __del__(self):\n        while True:\n            pass\n"
        "def evaluate(response):\n    keep = Hang()\n    return True\n",
        ErrorKind.TIMEOUT,
    ),
    Attack(
        "thread_left_running",
        "import threading\ndef evaluate(response):\n"
        "    threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=False).start()\n"
        "    return True\n",
        # A thread is not a process: it ends with the call's process. Unless running as root,
        # RLIMIT_NPROC=0 also refuses threads: "RuntimeError: can't start new thread".
        ErrorKind.EXCEPTION if not ROOT else Outcome.PASS,
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_attack_is_contained(attack, sandbox, layers):
    expected = attack.expect(layers) if callable(attack.expect) else attack.expect
    if not isinstance(expected, (Outcome, ErrorKind)):
        pytest.skip(expected)  # the reason this machine cannot contain it
    start = time.monotonic()
    result = run_then_good(sandbox, attack.source)
    assert_result(result, expected)
    assert time.monotonic() - start < CALL_TIMEOUT + 5


def test_attack_suite_is_large_enough():
    assert len({attack.name for attack in ATTACKS}) == len(ATTACKS) >= 25


def test_recursion_bomb_reports_recursion_error(sandbox):
    result = run_then_good(sandbox, "def evaluate(response):\n    return evaluate(response)\n")
    assert "RecursionError" in result.message


def test_socket_to_loopback_never_connects(sandbox, layers):
    if not (layers["seccomp"] or layers["bwrap"]):
        pytest.skip("without seccomp or bwrap, loopback connections are not blocked")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        source = (
            "import socket\ndef evaluate(response):\n"
            f"    connection = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
            "    connection.sendall(b'leak')\n    return True\n"
        )
        result = run_then_good(sandbox, source)
        # seccomp refuses the socket; bwrap alone gives a network namespace where it is refused
        assert_result(result, ErrorKind.FORBIDDEN if layers["seccomp"] else ErrorKind.EXCEPTION)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


FILE_ATTACKS = {
    "write": "open({path!r}, 'w').write('changed')",
    "append": "open({path!r}, 'a').write('changed')",
    "create": "open({path!r} + '.new', 'x').close()",
    "rename": "os.rename({path!r}, {path!r} + '.moved')",
    "delete": "os.remove({path!r})",
    "chmod": "os.chmod({path!r}, 0o777)",
    "mkdir": "os.mkdir({path!r} + '.dir')",
    "symlink": "os.symlink('/etc/passwd', {path!r} + '.link')",
    "utime": "os.utime({path!r}, (0, 0))",
}


@pytest.mark.parametrize("operation", list(FILE_ATTACKS))
def test_files_outside_scratch_are_not_changed(operation, canary, sandbox, layers):
    if layers["seccomp"]:
        expected = ErrorKind.FORBIDDEN
    elif layers["bwrap"]:
        expected = ErrorKind.EXCEPTION  # the path does not exist in the view: FileNotFoundError
    else:
        pytest.skip("without seccomp or bwrap, files outside the scratch dir are writable")
    before = (canary.read_text(), stat.S_IMODE(canary.stat().st_mode), canary.stat().st_mtime)
    statement = FILE_ATTACKS[operation].format(path=str(canary))
    source = f"import os\ndef evaluate(response):\n    {statement}\n    return True\n"
    result = run_then_good(sandbox, source)
    assert_result(result, expected)
    after = (canary.read_text(), stat.S_IMODE(canary.stat().st_mode), canary.stat().st_mtime)
    assert after == before
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary.txt"]


def test_reading_a_file_outside_scratch(canary, sandbox, layers):
    source = f"def evaluate(response):\n    return open({str(canary)!r}).read() == 'original'\n"
    result = run_then_good(sandbox, source)
    if layers["bwrap"]:
        assert_result(result, ErrorKind.EXCEPTION)  # not in the view
        assert "FileNotFoundError" in result.message
    else:
        # Documented: without bwrap, reading files the user can read is not prevented.
        assert_result(result, Outcome.PASS)


# -- error kinds for bad sources ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("def evaluate(response) return True", ErrorKind.SYNTAX),
        ("def evaluate(response):\nreturn True\n", ErrorKind.SYNTAX),  # IndentationError
        ("def evaluate(response):\n    return True\x00\n", ErrorKind.SYNTAX),  # null byte
        ("def check(response):\n    return True\n", ErrorKind.MISSING_EVALUATE),
        ("evaluate = 42\n", ErrorKind.MISSING_EVALUATE),
        ("raise ValueError('at import')\n", ErrorKind.EXCEPTION),
        ("def evaluate(response):\n    return response['key']\n", ErrorKind.EXCEPTION),
        ("import no_such_module_here\n", ErrorKind.EXCEPTION),
    ],
)
def test_bad_sources_have_clear_kinds(source, kind, sandbox):
    assert_result(run_then_good(sandbox, source), kind)


def test_pass_requires_exactly_true(sandbox):
    results = sandbox.run(
        [
            ("def evaluate(response):\n    return True\n", ""),
            ("def evaluate(response):\n    return False\n", ""),
            ("def evaluate(response):\n    return None\n", ""),
            ("def evaluate(response):\n    return 0\n", ""),
        ]
    )
    assert [r.outcome for r in results] == [Outcome.PASS, Outcome.FAIL] + [Outcome.ERROR] * 2
    assert all(r.kind is ErrorKind.WRONG_RETURN_TYPE for r in results[2:])
    assert results[0].passed and not results[1].passed


def test_response_arrives_unchanged(sandbox):
    response = "line one\nünïcödé ✓ \x00 \ud800 " + "long " * 100_000
    source = f"def evaluate(response):\n    return response == {response!r}\n"
    assert sandbox.run([Call(source, response)])[0].outcome is Outcome.PASS


def test_calls_must_be_strings(sandbox):
    with pytest.raises(TypeError):
        sandbox.run([(GOOD, b"ok")])


# -- the layers --------------------------------------------------------------------------------


def test_active_layers_are_reported(layers):
    assert list(layers) == ["process", "scratch_dir", "rlimits", "timeouts", "seccomp", "bwrap"]
    assert layers["process"] and layers["scratch_dir"] and layers["rlimits"] and layers["timeouts"]
    details = {layer.name: layer.detail for layer in active_layers()}
    assert all(details.values())


def test_worker_is_isolated_python_with_an_empty_environment(sandbox):
    source = (
        "import os, sys\ndef evaluate(response):\n"
        "    return dict(os.environ) == {} and sys.flags.isolated == 1 "
        "and sys.flags.dont_write_bytecode == 1\n"
    )
    assert sandbox.run([(source, "")])[0].outcome is Outcome.PASS


def test_worker_runs_in_its_own_session(sandbox, layers):
    # The call reports its session and its parent (the worker) as an error message.
    source = (
        "import os\ndef evaluate(response):\n"
        "    raise ValueError(f'{os.getsid(0)} {os.getppid()}')\n"
    )
    message = sandbox.run([(source, "")])[0].message
    session, worker = (int(n) for n in message.rsplit(": ", 1)[1].split())
    if layers["bwrap"]:
        # In bwrap's PID namespace a session led from outside reads as 0. The session must be
        # led inside: by the worker or by bwrap's own process above it (pid 1 there).
        assert 0 < session <= worker
    else:
        assert session == worker != os.getsid(0)


def test_resource_limits_are_set(sandbox):
    source = (
        "import resource\ndef evaluate(response):\n"
        "    limits = {name: resource.getrlimit(getattr(resource, name)) for name in "
        "('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', "
        "'RLIMIT_CORE')}\n"
        f"    return limits == {{'RLIMIT_CPU': (2, 2), 'RLIMIT_AS': ({512 * 2**20}, {512 * 2**20}),"
        f" 'RLIMIT_NPROC': (0, 0), 'RLIMIT_FSIZE': ({2**20}, {2**20}),"
        " 'RLIMIT_NOFILE': (64, 64), 'RLIMIT_CORE': (0, 0)}\n"
    )
    assert sandbox.run([(source, "")])[0].outcome is Outcome.PASS


CAP_SYS_RESOURCE = 24


def _has_capability(bit: int) -> bool:
    """Whether this process holds a capability (containers often drop some, even for root)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def test_limits_cannot_be_raised(sandbox, layers):
    source = (
        "import resource\ndef evaluate(response):\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (2**40, 2**40))\n    return True\n"
    )
    result = sandbox.run([(source, "")])[0]
    # raising a hard limit needs CAP_SYS_RESOURCE, which bwrap's user namespace never grants
    if _has_capability(CAP_SYS_RESOURCE) and not layers["bwrap"]:
        assert_result(result, Outcome.PASS)
    else:
        assert_result(result, ErrorKind.EXCEPTION)  # ValueError: not allowed to raise maximum limit


def test_scratch_dir_is_the_working_directory_and_is_removed_on_close():
    box = Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False)
    scratch = box.scratch_dir
    source = (
        "import os\ndef evaluate(response):\n"
        "    open('note.txt', 'w').write('scratch')\n"
        f"    return os.getcwd() == {str(scratch)!r}\n"
    )
    with box:
        assert box.run([(source, "")])[0].outcome is Outcome.PASS
        assert (scratch / "note.txt").read_text() == "scratch"
    assert not scratch.exists()


def test_scratch_dir_is_removed_even_after_permissions_are_taken_away():
    box = Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False)
    source = (
        "import os\ndef evaluate(response):\n"
        "    os.makedirs('a/b')\n    open('a/b/f', 'w').close()\n"
        "    os.chmod('a/b', 0)\n    os.chmod('a', 0)\n    return True\n"
    )
    with box:
        assert box.run([(source, "")])[0].outcome is Outcome.PASS
    assert not box.scratch_dir.exists()


def test_seccomp_filter_is_loaded(sandbox, layers):
    if not layers["seccomp"]:
        pytest.skip("pyseccomp or libseccomp is not installed")
    source = (
        "import ctypes\ndef evaluate(response):\n"
        "    return ctypes.CDLL(None).prctl(21, 0, 0, 0, 0) == 2\n"  # PR_GET_SECCOMP: filter
    )
    assert sandbox.run([(source, "")])[0].outcome is Outcome.PASS


def test_seccomp_guards_other_processes(sandbox, layers):
    if not layers["seccomp"]:
        pytest.skip("pyseccomp or libseccomp is not installed")
    source = (
        "import os, resource, signal\ndef evaluate(response):\n    refused = 0\n"
        "    for attempt in (lambda: resource.prlimit(os.getppid(), resource.RLIMIT_CPU, (1, 1)),\n"
        "                    lambda: signal.sigqueue(os.getppid(), signal.SIGKILL, 0)\n"
        "                    if hasattr(signal, 'sigqueue') else os.kill(os.getppid(), 9)):\n"
        "        try:\n            attempt()\n        except PermissionError:\n"
        "            refused += 1\n"
        "    return refused == 2 and resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)\n"
    )
    assert run_then_good(sandbox, source).outcome is Outcome.PASS


def test_seccomp_refuses_writes_in_scratch_too(sandbox, layers):
    if not layers["seccomp"]:
        pytest.skip("pyseccomp or libseccomp is not installed")
    source = "def evaluate(response):\n    open('note.txt', 'w')\n    return True\n"
    assert_result(sandbox.run([(source, "")])[0], ErrorKind.FORBIDDEN)


def test_seccomp_allows_threads_and_reads(sandbox, layers):
    if not layers["seccomp"]:
        pytest.skip("pyseccomp or libseccomp is not installed")
    if not ROOT:
        pytest.skip("RLIMIT_NPROC=0 refuses threads when not running as root")
    source = (
        "import threading, json\ndef evaluate(response):\n    box = []\n"
        "    thread = threading.Thread(target=box.append, args=(1,))\n"
        "    thread.start()\n    thread.join()\n"
        "    import email.parser\n    return box == [1]\n"
    )
    assert sandbox.run([(source, "")])[0].outcome is Outcome.PASS


def test_required_seccomp_fails_clearly_when_missing(monkeypatch):
    monkeypatch.setattr(sandbox_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SandboxError, match="pyseccomp"):
        Sandbox(seccomp=True)


def test_bwrap_view_holds_only_python_and_scratch(sandbox, layers, tmp_path):
    if not layers["bwrap"]:
        pytest.skip("bwrap is not installed or cannot create namespaces here")
    scratch = sandbox.scratch_dir
    hidden = [str(tmp_path), __file__, "/home", "/etc/passwd", "/proc/1", "/var"]
    source = (
        "import os, socket\ndef evaluate(response):\n"
        f"    if any(os.path.exists(path) for path in {hidden!r}):\n        return False\n"
        "    try:\n        names = [name for _, name in socket.if_nameindex()]\n"
        "    except OSError:  # seccomp refuses the netlink socket\n        names = []\n"
        f"    return os.getcwd() == {str(scratch)!r} and names in ([], ['lo'])\n"
    )
    assert sandbox.run([(source, "")])[0].outcome is Outcome.PASS


def test_bwrap_view_is_read_only_outside_scratch():
    box = Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False)
    with box:
        if not any(layer.name == "bwrap" and layer.active for layer in box.layers()):
            pytest.skip("bwrap is not installed or cannot create namespaces here")
        source = "def evaluate(response):\n    open('/usr/sandbox-was-here', 'w')\n"
        assert_result(box.run([(source, "")])[0], ErrorKind.FORBIDDEN)  # EROFS


def test_required_bwrap_fails_clearly_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no other test's scratch dirs
    with pytest.raises(SandboxError, match="bwrap"):
        Sandbox(bwrap=True)
    assert not list(tmp_path.glob("spinflow-sandbox-*"))


def test_layers_can_be_turned_off():
    with Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False, bwrap=False) as box:
        found = {layer.name: layer for layer in box.layers()}
        assert not found["seccomp"].active and found["seccomp"].detail == "turned off"
        assert not found["bwrap"].active and found["bwrap"].detail == "turned off"
        results = box.run(
            [
                ("def evaluate(response):\n    while True:\n        pass\n", ""),
                ("def evaluate(response):\n    return len(bytearray(2**34)) > 0\n", ""),
                (GOOD, "ok"),
            ]
        )
    assert [r.kind for r in results] == [ErrorKind.TIMEOUT, ErrorKind.MEMORY, None]


# -- timeouts, workers, protocol ---------------------------------------------------------------


def test_batch_timeout_stops_the_rest_of_the_batch():
    loop = "def evaluate(response):\n    while True:\n        pass\n"
    start = time.monotonic()
    with Sandbox(call_timeout=1.0, batch_timeout=1.5) as box:
        results = box.run([(loop, ""), (loop, ""), (GOOD, "ok")])
    assert time.monotonic() - start < 4.0
    assert [r.kind for r in results] == [ErrorKind.TIMEOUT] * 3
    assert "batch" in results[1].message and "batch" in results[2].message


def test_a_lost_worker_is_replaced_and_the_batch_goes_on():
    with Sandbox(call_timeout=2.0) as box:
        box.run([(GOOD, "ok")])
        worker = box._slots[0]
        timer = threading.Timer(0.3, os.killpg, (worker.process.pid, 9))
        timer.start()
        sleeper = "import time\ndef evaluate(response):\n    time.sleep(1.5)\n    return True\n"
        results = box.run([(sleeper, ""), (GOOD, "ok")])
        timer.join()
    assert_result(results[0], ErrorKind.CRASH)
    assert "worker was lost" in results[0].message
    assert results[1].outcome is Outcome.PASS


def test_an_idle_worker_that_died_is_replaced():
    with Sandbox(call_timeout=CALL_TIMEOUT) as box:
        box.run([(GOOD, "ok")])
        os.killpg(box._slots[0].process.pid, 9)
        time.sleep(0.1)
        assert box.run([(GOOD, "ok")])[0].outcome is Outcome.PASS


def test_close_kills_the_whole_process_group():
    box = Sandbox(call_timeout=CALL_TIMEOUT)
    box.run([(GOOD, "ok")])
    pgid = box._slots[0].process.pid
    assert living_processes_in_group(pgid)
    box.close()
    deadline = time.monotonic() + 5.0  # SIGKILL is delivered to the group's members in parallel
    while living_processes_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert living_processes_in_group(pgid) == []
    with pytest.raises(SandboxError):
        box.run([(GOOD, "ok")])


def living_processes_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (a zombie is dead, but is listed until
    its new parent reaps it, which a container's first process may never do)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def test_several_workers_keep_the_order_of_results():
    sources = [
        (GOOD, "ok"),
        ("import os\ndef evaluate(response):\n    os._exit(1)\n", ""),
        ("import time\ndef evaluate(response):\n    time.sleep(0.3)\n    return True\n", ""),
        (GOOD, "no"),
    ] * 3
    with Sandbox(call_timeout=CALL_TIMEOUT, workers=2) as box:
        results = box.run(sources)
    expected = [Outcome.PASS, Outcome.ERROR, Outcome.PASS, Outcome.FAIL] * 3
    assert [r.outcome for r in results] == expected


def test_run_calls_convenience():
    results = run_calls([Call(GOOD, "ok"), Call(GOOD, "no")], call_timeout=CALL_TIMEOUT)
    assert [r.outcome for r in results] == [Outcome.PASS, Outcome.FAIL]
    assert all(r.seconds > 0 for r in results)


def test_benchmark_prints_calls_per_second(capsys):
    figure = sandbox_module.benchmark_sandbox(n=40, workers=[1])
    printed = capsys.readouterr().out
    assert figure > 0
    assert f"sandbox_calls_per_second  {figure:.1f}" in printed
    assert "sandbox_layers_active  process, scratch_dir, rlimits, timeouts" in printed


def test_cli_benchmark_sandbox_runs_only_the_sandbox_benchmark(monkeypatch, tmp_path):
    from spinflow import cli

    called = []
    monkeypatch.setattr(sandbox_module, "benchmark_sandbox", lambda: called.append(True) or 1.0)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the sandbox benchmark does not need one
    assert cli.main(["benchmark", "--sandbox"]) == 0
    assert called == [True]

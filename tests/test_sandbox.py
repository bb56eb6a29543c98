"""The sandbox for model-written code: its layers, its error kinds, and an attack suite.

Every attack runs in a batch followed by a well-behaved function called twice (it must pass, then
fail), so a contained attack is one that got the right result and spoiled nothing after it. The
attacks run in the default sandbox, without seccomp (the other layers must hold them) and without
bubblewrap. Where a layer is absent on this machine, an attack it alone would stop is skipped
with the reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import subprocess
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
    confinement_problem,
    landlock_abi,
    run_calls,
)

CALL_TIMEOUT = 1.0
GOOD = "def evaluate(response):\n    return response == 'ok'\n"
PROJECT_FILE = Path(__file__).resolve().parents[1] / "pyproject.toml"


def layer_flags(layers) -> dict[str, bool]:
    """Layer name → active, and ``landlock_signals``: Landlock keeps signals inside the call."""
    flags = {layer.name: layer.active for layer in layers}
    landlock = next(layer for layer in layers if layer.name == "landlock")
    flags["landlock_signals"] = landlock.active and "signals" in landlock.detail
    return flags


@pytest.fixture(scope="module")
def layers() -> dict[str, bool]:
    return layer_flags(active_layers())


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(call_timeout=CALL_TIMEOUT) as box:
        yield box


# The sandboxes the attack suite runs in: every layer this machine has, and without seccomp and
# bubblewrap (Landlock and the unprivileged user must hold what they can); where bubblewrap is
# installed, also without it, and with it but without seccomp.
CONFIGS = {"default": {}, "without_seccomp": {"seccomp": False, "bwrap": False}}
if shutil.which("bwrap"):
    CONFIGS["without_bwrap"] = {"bwrap": False}
    CONFIGS["bwrap_without_seccomp"] = {"seccomp": False}


@pytest.fixture(scope="module", params=list(CONFIGS))
def box(request, layers):
    """(sandbox, its layers) for each configuration of :data:`CONFIGS`."""
    if "bwrap" in request.param and not layers["bwrap"]:
        pytest.skip("bwrap does not work here: the default sandbox is already without it")
    with Sandbox(call_timeout=CALL_TIMEOUT, **CONFIGS[request.param]) as sandbox:
        yield sandbox, layer_flags(sandbox.layers())


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
    """Process creation is refused by seccomp, or by the process limit when calls are not root."""
    if layers["seccomp"] or layers["unprivileged"]:
        return when_refused  # EPERM, or RLIMIT_NPROC=0: fork fails with EAGAIN
    return when_allowed


def execution(layers: dict[str, bool], when_refused: object, when_allowed: object):
    """Running a program is refused by seccomp (execve) and by Landlock (nothing executable)."""
    return when_refused if layers["seccomp"] or layers["landlock"] else when_allowed


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
        # no new process, or a child that cannot run the shell: not 0 either way
        lambda layers: process_creation(
            layers,
            Outcome.FAIL,
            execution(layers, Outcome.FAIL, "calls run as root without seccomp or landlock"),
        ),
    ),
    Attack(
        "subprocess",
        "import subprocess\ndef evaluate(response):\n"
        "    return subprocess.run(['true']).returncode == 0\n",
        lambda layers: process_creation(
            layers,
            ErrorKind.FORBIDDEN,
            execution(layers, ErrorKind.FORBIDDEN, "calls run as root without seccomp or landlock"),
        ),
    ),
    Attack(
        "os_exec",
        "import os\ndef evaluate(response):\n    os.execv('/bin/true', ['true'])\n",
        # without seccomp or Landlock the call's process becomes `true`, which never answers
        lambda layers: execution(layers, ErrorKind.FORBIDDEN, ErrorKind.CRASH),
    ),
    Attack(
        "ctypes_kill_worker",
        "import ctypes, os\ndef evaluate(response):\n"
        "    return ctypes.CDLL(None).kill(os.getppid(), 9) == 0\n",
        # refused (seccomp, Landlock's signal scope, or not root): kill fails, evaluate returns
        # False; otherwise the worker dies and is replaced
        lambda layers: (
            Outcome.FAIL
            if layers["seccomp"] or layers["landlock_signals"] or layers["unprivileged"]
            else ErrorKind.CRASH
        ),
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
        "read_etc_shadow",
        "def evaluate(response):\n    raise ValueError(open('/etc/shadow').read())\n",
        lambda layers: (
            ErrorKind.EXCEPTION  # FileNotFoundError: not in bwrap's view
            if layers["bwrap"]
            else ErrorKind.FORBIDDEN  # EACCES
            if layers["landlock"] or layers["unprivileged"]
            else "calls run as root without landlock or bwrap: /etc/shadow is readable"
        ),
    ),
    Attack(
        "read_the_parents_memory_map",
        "import os\ndef evaluate(response):\n"
        "    raise ValueError(open(f'/proc/{os.getppid()}/maps').read())\n",
        lambda layers: (
            ErrorKind.EXCEPTION  # no /proc in bwrap's view
            if layers["bwrap"]
            else ErrorKind.FORBIDDEN
            if layers["landlock"]
            else "without landlock or bwrap, /proc of the worker is readable"
        ),
    ),
    Attack(
        "thread_left_running",
        "import threading\ndef evaluate(response):\n"
        "    threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=False).start()\n"
        "    return True\n",
        # A thread is not a process: it ends with the call's process. Unless calls run as root,
        # RLIMIT_NPROC=0 also refuses threads: "RuntimeError: can't start new thread".
        lambda layers: ErrorKind.EXCEPTION if layers["unprivileged"] else Outcome.PASS,
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_attack_is_contained(attack, box):
    sandbox, layers = box
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


def test_socket_to_loopback_never_connects(box):
    sandbox, layers = box
    landlock_tcp = layers["landlock"] and "TCP" in next(
        layer.detail for layer in sandbox.layers() if layer.name == "landlock"
    )
    if layers["seccomp"] or landlock_tcp:
        expected = ErrorKind.FORBIDDEN  # seccomp refuses the socket, Landlock the connection
    elif layers["bwrap"]:
        expected = ErrorKind.EXCEPTION  # a network namespace of its own: nothing to connect to
    else:
        pytest.skip("without seccomp, bwrap or Landlock ABI 4, loopback connections are allowed")
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
        assert_result(run_then_good(sandbox, source), expected)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


# Ways to change a file outside the call's directory (the path is the canary). The last four
# reach it through another process, a program or a link made in the call's own directory.
FILE_ATTACKS = {
    "write": "open({path!r}, 'w').write('changed')",
    "append": "open({path!r}, 'a').write('changed')",
    "create": "open({path!r} + '.new', 'x').close()",
    "rename": "os.rename({path!r}, {path!r} + '.moved')",
    "rename_into_scratch": "os.rename({path!r}, 'stolen')",
    "delete": "os.remove({path!r})",
    "chmod": "os.chmod({path!r}, 0o777)",
    "mkdir": "os.mkdir({path!r} + '.dir')",
    "symlink": "os.symlink('/etc/passwd', {path!r} + '.link')",
    "utime": "os.utime({path!r}, (0, 0))",
    "double_fork": (
        # the grandchild, orphaned, writes; the call waits until it has tried
        "done, tried = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        try:\n"
        "            if os.fork() == 0:\n"
        "                try:\n"
        "                    open({path!r}, 'w').write('changed')\n"
        "                finally:\n"
        "                    os.write(tried, b'x')\n"
        "                    os._exit(0)\n"
        "        finally:\n"
        "            os._exit(0)\n"
        "    os.read(done, 1)"
    ),
    "exec": "os.execv('/bin/sh', ['sh', '-c', 'echo changed > ' + {path!r}])",
    "symlink_then_write": "os.symlink({path!r}, 'link')\n    open('link', 'a').write('changed')",
    "hard_link_then_write": "os.link({path!r}, 'hard')\n    open('hard', 'a').write('changed')",
}
METADATA_ATTACKS = ("chmod", "utime")  # Landlock does not cover a file's mode or times


def file_attack_expected(operation: str, layers: dict[str, bool]) -> object:
    """What a file attack gives with these layers, or why it cannot be held here."""
    if layers["seccomp"]:
        return ErrorKind.FORBIDDEN  # EPERM: writes, links, fork and execve are refused
    if operation == "double_fork":
        return process_creation(layers, ErrorKind.FORBIDDEN, Outcome.PASS)  # the call returns
    if operation == "exec" and layers["landlock"]:
        return ErrorKind.FORBIDDEN  # EACCES: nothing is executable
    if layers["bwrap"]:
        # the path does not exist in the view: FileNotFoundError; the shell cannot write there
        # either, and a call's process that became the shell never answers
        return ErrorKind.CRASH if operation == "exec" else ErrorKind.EXCEPTION
    if layers["landlock"]:
        if operation in METADATA_ATTACKS and not layers["unprivileged"]:
            return (
                "Landlock does not cover chmod and utime, and calls run as root (uid 0 owns the "
                "canary): seccomp, bwrap or running calls as nobody holds them"
            )
        # EACCES from Landlock, or EPERM as nobody; a link across directories is EXDEV
        return ErrorKind.EXCEPTION if operation == "hard_link_then_write" else ErrorKind.FORBIDDEN
    return "without seccomp, landlock or bwrap, files outside the scratch dir are writable"


@pytest.mark.parametrize("operation", list(FILE_ATTACKS))
def test_files_outside_scratch_are_not_changed(operation, canary, box):
    sandbox, layers = box
    expected = file_attack_expected(operation, layers)
    if not isinstance(expected, (Outcome, ErrorKind)):
        pytest.skip(expected)
    before = (canary.read_text(), stat.S_IMODE(canary.stat().st_mode), canary.stat().st_mtime)
    statement = FILE_ATTACKS[operation].format(path=str(canary))
    source = f"import os\ndef evaluate(response):\n    {statement}\n    return True\n"
    result = run_then_good(sandbox, source)
    assert_result(result, expected)
    after = (canary.read_text(), stat.S_IMODE(canary.stat().st_mode), canary.stat().st_mtime)
    assert after == before
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary.txt"]


def secret_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files a call must not read: name → (path, text that must not come back)."""
    created = tmp_path / "secret.txt"
    created.write_text("s3cret-in-tmp")
    files = {
        "created_outside_scratch": (created, "s3cret-in-tmp"),
        "under_the_project_root": (PROJECT_FILE, PROJECT_FILE.read_text().splitlines()[0]),
    }
    bashrc = Path.home() / ".bashrc"
    if bashrc.is_file() and os.access(bashrc, os.R_OK) and bashrc.read_text().strip():
        files["home_bashrc"] = (bashrc, bashrc.read_text().strip().splitlines()[0])
    return files


@pytest.mark.parametrize("target", ["created_outside_scratch", "under_the_project_root", "home"])
def test_files_outside_scratch_and_python_are_not_readable(target, box, tmp_path):
    """The /etc/shadow attack on files this user can read: the text never comes back."""
    sandbox, layers = box
    if not (layers["landlock"] or layers["bwrap"]):
        pytest.skip(confinement_problem(sandbox.layers()))
    files = secret_files(tmp_path)
    if target == "home":
        if "home_bashrc" not in files:
            pytest.skip("no readable, non-empty ~/.bashrc here")
        target = "home_bashrc"
    path, text = files[target]
    source = f"def evaluate(response):\n    raise ValueError(open({str(path)!r}).read())\n"
    result = run_then_good(sandbox, source)
    assert text not in result.message
    if layers["bwrap"]:
        assert_result(result, ErrorKind.EXCEPTION)  # not in bwrap's view
        assert "FileNotFoundError" in result.message
    else:
        assert_result(result, ErrorKind.FORBIDDEN)  # EACCES from Landlock
    listing = (
        f"import os\ndef evaluate(response):\n    return bool(os.listdir({str(path.parent)!r}))\n"
    )
    assert run_then_good(sandbox, listing).outcome is Outcome.ERROR


def test_reading_a_file_outside_scratch_without_confinement(canary):
    """Without landlock and bwrap, reading what the user can read is not prevented (so AutoIF's
    stages refuse such a sandbox unless autoif.allow_weak_sandbox says otherwise)."""
    with Sandbox(call_timeout=CALL_TIMEOUT, landlock=False, bwrap=False) as weak:
        source = f"def evaluate(response):\n    return open({str(canary)!r}).read() == 'original'\n"
        assert_result(run_then_good(weak, source), Outcome.PASS)
        problem = confinement_problem(weak.layers())
    assert "landlock: turned off" in problem and "bwrap: turned off" in problem
    assert "apt-get install bubblewrap" in problem and "\n" not in problem


def test_the_python_installation_stays_readable(box):
    sandbox, _ = box
    source = (
        "import email.parser, json, sqlite3, decimal, zoneinfo\n"
        "def evaluate(response):\n    return json.loads(response) == [1]\n"
    )
    assert sandbox.run([(source, "[1]")])[0].outcome is Outcome.PASS


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
    names = [layer.name for layer in active_layers()]
    assert names == [
        "process",
        "scratch_dir",
        "rlimits",
        "timeouts",
        "seccomp",
        "landlock",
        "unprivileged",
        "bwrap",
    ]
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


def test_limits_cannot_be_raised(sandbox):
    source = (
        "import resource\ndef evaluate(response):\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (2**40, 2**40))\n    return True\n"
    )
    result = sandbox.run([(source, "")])[0]
    # raising a hard limit needs CAP_SYS_RESOURCE, which a call never holds, even as root
    assert_result(result, ErrorKind.EXCEPTION)  # ValueError: not allowed to raise maximum limit


def test_root_keeps_its_capabilities_only_when_told(tmp_path):
    if not (os.geteuid() == 0 and _has_capability(CAP_SYS_RESOURCE)):
        pytest.skip("not running as root with CAP_SYS_RESOURCE")
    source = (
        "import resource\ndef evaluate(response):\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (2**40, 2**40))\n    return True\n"
    )
    with Sandbox(call_timeout=CALL_TIMEOUT, unprivileged=False) as box:
        found = {layer.name: layer for layer in box.layers()}
        assert not found["unprivileged"].active and found["unprivileged"].detail == "turned off"
        assert_result(box.run([(source, "")])[0], Outcome.PASS)


def test_calls_hold_no_capabilities():
    """Without seccomp and Landlock a call could chown and chmod what its uid owns; it cannot
    chown to another user (CAP_CHOWN) nor hold any capability, root or not."""
    source = (
        "import ctypes, os\ndef evaluate(response):\n"
        "    header = (ctypes.c_uint32 * 2)(0x20080522, 0)\n"
        "    data = (ctypes.c_uint32 * 6)()\n"
        "    assert ctypes.CDLL(None).capget(header, data) == 0\n"
        "    assert not any(data), list(data)\n"
        "    os.chown('.', 1, 1)\n    return True\n"
    )
    # outside bubblewrap: in its user namespace uid 1 does not exist (EINVAL)
    with Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False, landlock=False, bwrap=False) as box:
        assert_result(run_then_good(box, source), ErrorKind.FORBIDDEN)  # EPERM


def test_each_call_works_in_its_own_directory_removed_after_it():
    box = Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False)
    scratch = box.scratch_dir
    source = (
        "import os\ndef evaluate(response):\n"
        "    open('note.txt', 'w').write('scratch')\n"
        "    raise ValueError(os.getcwd())\n"
    )
    with box:
        first, second = box.run([(source, ""), (source, "")])
        directories = [Path(r.message.rsplit(": ", 1)[1]) for r in (first, second)]
        assert all(d.parent == scratch for d in directories) and len(set(directories)) == 2
        deadline = time.monotonic() + 5.0  # the worker removes it after answering
        while list(scratch.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(scratch.iterdir()) == []
    assert not scratch.exists()


def test_no_call_sees_the_files_of_another():
    write = "def evaluate(response):\n    open('verdict.txt', 'w').write('pass')\n    return True\n"
    look = "import os\ndef evaluate(response):\n    return os.listdir('.') == []\n"
    with Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False, workers=1) as box:
        results = box.run([(write, ""), (look, ""), (write, ""), (look, "")])
    assert [r.outcome for r in results] == [Outcome.PASS] * 4


# A call that leaves a process behind, out of its process group, which keeps planting a file in
# every other call's directory; it reports the process's pid.
STRAY = (
    "import glob, os\ndef evaluate(response):\n"
    "    ready, started = os.pipe()\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        if os.fork() == 0:\n"
    "            os.write(started, str(os.getpid()).encode())\n"
    "            while True:\n"
    "                for directory in glob.glob('../call-*'):\n"
    "                    try:\n"
    "                        open(directory + '/planted', 'w').close()\n"
    "                    except OSError:\n"
    "                        pass\n"
    "        os._exit(0)\n"
    "    raise ValueError(os.read(ready, 20).decode())\n"
)


@pytest.mark.parametrize("bwrap", [False, None], ids=["without_bwrap", "with_bwrap"])
def test_processes_a_call_leaves_are_killed_before_the_next_call(bwrap):
    # Without seccomp and Landlock, as root, a call can fork and write beside its directory.
    with Sandbox(call_timeout=2.0, seccomp=False, landlock=False, bwrap=bwrap, workers=1) as box:
        layers = layer_flags(box.layers())
        if bwrap is None and not layers["bwrap"]:
            pytest.skip("bwrap is not installed or cannot create namespaces here")
        if not process_creation(layers, False, True):
            pytest.skip("calls cannot create processes here (seccomp or the process limit)")
        look = (
            "import os, time\ndef evaluate(response):\n"
            "    time.sleep(0.5)\n    return os.listdir('.') == []\n"
        )
        stray, clean = box.run([(STRAY, ""), (look, "")])
    pid = int(stray.message.rsplit(": ", 1)[1])  # in bwrap, a pid of its own PID namespace
    try:
        assert_result(stray, ErrorKind.EXCEPTION)
        assert_result(clean, Outcome.PASS)  # the stray would have planted a file by then
        assert layers["bwrap"] or not living_processes([pid])
    finally:
        if not layers["bwrap"] and living_processes([pid]):
            os.kill(pid, 9)


def living_processes(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


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
    if layers["unprivileged"]:
        pytest.skip("RLIMIT_NPROC=0 refuses threads when calls do not run as root")
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
    hidden = [str(tmp_path), __file__, "/home", "/etc/passwd", "/proc/1", "/var"]
    source = (
        "import os, socket\ndef evaluate(response):\n"
        f"    if any(os.path.exists(path) for path in {hidden!r}):\n        return False\n"
        "    try:\n        names = [name for _, name in socket.if_nameindex()]\n"
        "    except OSError:  # seccomp refuses the netlink socket\n        names = []\n"
        f"    return os.path.dirname(os.getcwd()) == {str(sandbox.scratch_dir)!r} "
        "and names in ([], ['lo'])\n"
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


def test_landlock_is_active_where_the_kernel_has_it(layers):
    abi, reason = landlock_abi()
    if not abi:
        assert reason and "\n" not in reason
        pytest.skip(f"this kernel has no Landlock: {reason}")
    assert layers["landlock"]


def test_landlock_confines_a_call_without_seccomp(tmp_path):
    if not landlock_abi()[0]:
        pytest.skip(f"this kernel has no Landlock: {landlock_abi()[1]}")
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    sources = [
        # its own directory: read and write
        "def evaluate(response):\n    open('a', 'w').write('x')\n    return open('a').read() == 'x'\n",
        # the standard library and /dev/null
        "import os\ndef evaluate(response):\n"
        "    open(os.devnull, 'w').write('x')\n    return len(open(os.__file__).read()) > 0\n",
        f"def evaluate(response):\n    return open({str(outside)!r}).read() == 'outside'\n",
        "import os\ndef evaluate(response):\n    return bool(os.listdir('/'))\n",
        "import os\ndef evaluate(response):\n    os.execv('/bin/true', ['true'])\n",
    ]
    with Sandbox(call_timeout=CALL_TIMEOUT, seccomp=False, bwrap=False) as box:
        assert layer_flags(box.layers())["landlock"]
        results = box.run([(source, "") for source in sources])
    kinds = [r.kind or r.outcome for r in results]
    assert kinds == [Outcome.PASS, Outcome.PASS] + [ErrorKind.FORBIDDEN] * 3, results


def test_required_landlock_fails_clearly_when_missing(monkeypatch):
    reason = "Linux 5.10.0 has no Landlock (it needs 5.13 or later)"
    monkeypatch.setattr(sandbox_module, "landlock_abi", lambda: (0, reason))
    with pytest.raises(SandboxError, match="landlock was required but is not available: Linux"):
        Sandbox(landlock=True)
    with Sandbox(call_timeout=CALL_TIMEOUT, bwrap=False) as box:
        found = {layer.name: layer for layer in box.layers()}
        assert not found["landlock"].active and found["landlock"].detail == reason
        problem = confinement_problem(box.layers())
    assert reason in problem and "Linux 5.13 or later" in problem


SYSTEM_PYTHON = Path("/usr/bin/python3")


def test_root_runs_calls_as_nobody_when_nobody_can_read_python():
    """The system's Python is readable by everyone: calls of a sandbox run by it as root run as
    nobody, where the process limit holds even without seccomp."""
    if os.geteuid() != 0 or not SYSTEM_PYTHON.is_file():
        pytest.skip("needs root and a system Python at /usr/bin/python3")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(sandbox_module.__file__).parents[1])!r})\n"
        "from spinflow.sandbox import Sandbox\n"
        "source = 'import os\\ndef evaluate(response):\\n    os.fork()\\n'\n"
        "with Sandbox(call_timeout=2.0, seccomp=False, bwrap=False) as box:\n"
        "    layers = {layer.name: layer for layer in box.layers()}\n"
        "    print(layers['unprivileged'].active, layers['unprivileged'].detail)\n"
        "    print(box.run([(source, '')])[0].message)\n"
    )
    completed = subprocess.run(
        [str(SYSTEM_PYTHON), "-I", "-c", script], capture_output=True, text=True, timeout=60
    )
    if completed.returncode and "cannot read" in completed.stdout + completed.stderr:
        pytest.skip("nobody cannot read the system Python here")
    assert completed.returncode == 0, completed.stderr
    active, fork = completed.stdout.splitlines()
    assert active.startswith("True calls run as nobody (uid 65534)"), active
    assert "BlockingIOError" in fork  # EAGAIN: RLIMIT_NPROC=0 holds for nobody


def test_layers_can_be_turned_off():
    off = {"seccomp": False, "landlock": False, "bwrap": False}
    with Sandbox(call_timeout=CALL_TIMEOUT, **off) as box:
        found = {layer.name: layer for layer in box.layers()}
        for name in off:
            assert not found[name].active and found[name].detail == "turned off"
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


# -- the AutoIF stages that run model-written code ------------------------------------------------

REFUSED_LANDLOCK = "Linux 5.10.0 has no Landlock (it needs 5.13 or later)"


def verify_stage_params(tmp_path, monkeypatch, **changes):
    """An instruction file for autoif_verify in ``tmp_path`` (the working directory), and params."""
    from spinflow.config import default_params_dict, validate_params
    from spinflow.io import write_jsonl
    from spinflow.methods.autoif.instructions import Case, Instruction

    monkeypatch.chdir(tmp_path)
    short = Instruction(
        "short",
        "Answer in fewer than five characters.",
        ("def evaluate(response):\n    return len(response) < 5\n",),
        (Case("ab", True), Case("abcdefgh", False), Case("a", True)),
    )
    write_jsonl(tmp_path / "autoif/instructions/instructions.jsonl", [short.to_record()])
    raw = default_params_dict()
    raw["autoif"].update(enabled=True, sandbox_workers=1, **changes)
    return validate_params(raw)


def test_autoif_stage_records_its_sandbox_layers(tmp_path, monkeypatch, caplog):
    """The log, the metrics, the provenance; MLflow gets the count (every numeric metric of an
    evaluation is logged into its run as eval/<key>)."""
    from spinflow.io import read_json
    from spinflow.methods.autoif import stages as autoif
    from spinflow.methods.autoif.instructions import SandboxCounter
    from spinflow.tracking.runs import eval_scalars

    params = verify_stage_params(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="spinflow.methods.autoif.stages"):
        autoif.autoif_verify(params)
    active = [layer.name for layer in active_layers() if layer.active]
    metrics = read_json(tmp_path / "metrics/autoif_verify.json")
    assert metrics["sandbox_layers"] == ",".join(active)
    assert metrics["sandbox_layer_count"] == len(active) >= 5
    made_by = read_json(tmp_path / "autoif/verified/provenance.json")
    assert made_by["params"]["sandbox_layers"] == active
    assert f"sandbox layers: {', '.join(active)}" in caplog.text
    evaluation = SandboxCounter(layers=active).summary()
    assert eval_scalars(evaluation)["sandbox_layer_count"] == len(active)


def test_autoif_stage_refuses_a_weak_sandbox_in_one_line(tmp_path, monkeypatch, caplog):
    from spinflow.errors import SpinflowError
    from spinflow.io import read_json
    from spinflow.methods.autoif import stages as autoif

    monkeypatch.setattr(sandbox_module, "landlock_abi", lambda: (0, REFUSED_LANDLOCK))
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)  # no bwrap
    with pytest.raises(SpinflowError) as err:
        autoif.autoif_verify(verify_stage_params(tmp_path, monkeypatch))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("refusing to run model-written code: no layer keeps")
    assert f"landlock: {REFUSED_LANDLOCK}" in message and "bwrap: bwrap is not installed" in message
    assert "apt-get install bubblewrap" in message
    assert "or set autoif.allow_weak_sandbox: true to run it with process, scratch_dir" in message
    assert not (tmp_path / "autoif/verified").exists()

    # said explicitly: it runs, warns, and records the layers it had
    params = verify_stage_params(tmp_path, monkeypatch, allow_weak_sandbox=True)
    with caplog.at_level(logging.INFO, logger="spinflow.methods.autoif.stages"):
        autoif.autoif_verify(params)
    assert "weak sandbox (autoif.allow_weak_sandbox)" in caplog.text
    layers = read_json(tmp_path / "metrics/autoif_verify.json")["sandbox_layers"].split(",")
    assert "landlock" not in layers and "bwrap" not in layers and "process" in layers

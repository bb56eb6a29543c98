"""Stages on several machines: DVC on the first, `spinflow worker` on the others.

DVC runs the pipeline on one machine. A stage whose accelerate config names several machines
(``num_machines`` > 1, for example configs/accelerate/multi_node.yaml) is rendered in dvc.yaml as
``spinflow launch --config_file <config> stages/<script>.py <stage>``: accelerate launch with the
config's ``machine_rank`` (0), which waits for the other machines at torch's rendezvous on
``main_process_ip:main_process_port``. On every other machine, in the same project folder on a
filesystem all machines share, the user starts the same stage with its own rank::

    spinflow worker train_iter_0 --machine-rank 1

which runs the command dvc.yaml holds for that stage with ``--machine_rank 1``. The processes of
all machines then train as one job (DDP or FSDP); the main process alone writes the outputs,
which the other machines see through the shared filesystem.

A machine that does not join within ``SPINFLOW_JOIN_TIMEOUT`` seconds (default 1800) fails the
stage with one line saying how many joined and what to start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence

from spinflow.errors import ConfigError

JOIN_TIMEOUT_ENV = "SPINFLOW_JOIN_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 1800
# torch's static rendezvous, when the other machines do not come (or the first one is not there)
_TIMED_OUT = re.compile(
    r"Timed out after \d+ seconds waiting for clients\. (\d+)/(\d+) clients joined"
)
_NOT_REACHED = re.compile(r"(DistNetworkError|DistStoreError).*(timed out|Timed out|connect)")
# what torch's store client prints while it retries to reach the first machine (C++ frames)
_WAITING = re.compile(
    r"^(\[[EW]\d{4} .*(c10d|TCPStore|socket)|frame #\d+: |Exception raised from |<omitting python "
    r"frames>|\s*$)"
)


def join_timeout() -> int:
    text = os.environ.get(JOIN_TIMEOUT_ENV, str(DEFAULT_JOIN_TIMEOUT))
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{JOIN_TIMEOUT_ENV}={text!r}: must be a whole number of seconds")
    return int(text)


def accelerate_command(args: Sequence[str], machine_rank: int | None = None) -> list[str]:
    """``accelerate launch`` with ``args`` (``--config_file … stages/<script>.py <stage> …``),
    this machine's rank when given, and the join timeout."""
    rank = ["--machine_rank", str(machine_rank)] if machine_rank is not None else []
    timeout = ["--rdzv_conf", f"timeout={join_timeout()}"]
    return ["accelerate", "launch", *rank, *timeout, *args]


def run(args: Sequence[str], stage: str, machine_rank: int | None = None) -> int:
    """Run the stage through accelerate launch; its output passes through as it comes, but
    for the launcher's own traceback when the machines did not meet, which becomes one line."""
    command = accelerate_command(args, machine_rank)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    held: list[str] = []  # the launcher's traceback, shown only if it is not a rendezvous failure
    waiting: list[str] = []  # retries to reach the first machine, the same
    assert process.stderr is not None
    for line in process.stderr:
        if held or line.startswith("Traceback (most recent call last)"):
            held.append(line)
        elif _WAITING.match(line):
            waiting.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    code = process.wait()
    if code == 0:
        return 0
    text = "".join(held)
    timed_out = _TIMED_OUT.search(text)
    if timed_out:
        joined, expected = timed_out.groups()
        print(
            f"error: {stage}: {joined} of {expected} machines joined within {join_timeout()} s; "
            f"start `spinflow worker {stage} --machine-rank <rank>` on each other machine "
            f"(or raise {JOIN_TIMEOUT_ENV})",
            file=sys.stderr,
        )
        return 1
    if machine_rank and _NOT_REACHED.search(text):
        print(
            f"error: {stage}: machine {machine_rank} could not reach the first machine within "
            f"{join_timeout()} s; is `dvc repro` running this stage there, and is "
            "main_process_ip:main_process_port of the accelerate config reachable?",
            file=sys.stderr,
        )
        return 1
    sys.stderr.write("".join(waiting[-20:]) + text)
    return code


def worker(params, stage_name: str, machine_rank: int) -> int:
    """Run ``stage_name`` on this machine as ``machine_rank`` (``spinflow worker``)."""
    from spinflow.graph import build
    from spinflow.pipeline import machines, stage_command

    if machine_rank < 1:
        raise ConfigError("--machine-rank: the first machine (0) is the one DVC runs on")
    stage = build(params).stage(stage_name)
    config = params.value(stage.accelerate) if stage.accelerate else None
    if not config or machines(config) < 2:
        raise ConfigError(
            f"stage {stage_name!r} is not launched on several machines: its accelerate config "
            f"({stage.accelerate or 'none'}: {config}) names one machine"
        )
    command = stage_command(stage, params)
    return run(command[command.index("--config_file") :], stage_name, machine_rank)

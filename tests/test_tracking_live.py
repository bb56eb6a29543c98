"""Live metrics and run states, against a real SQLite MLflow store: a training stage's steps reach
its run while it runs, a failing stage leaves its run FAILED, a killed one is marked FAILED by
sync, re-runs log no step twice.

The stage here is a stand-in for a training stage: it writes the ``sft`` stage's steps CSV a row a
step (as training does), waits for the test where told to, then writes its outputs (the CSV again
in one piece, a checkpoint, the summary), so the tracking code sees what a training stage leaves.
One test runs the real thing instead: the tiny model fine-tuned by the SFT recipe, whose training
writes the steps file itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spinflow import tracking
from spinflow.config import default_params_dict, validate_params
from spinflow.graph import build
from spinflow.io import read_rows_csv, write_rows_csv
from spinflow.runner import execute
from spinflow.tracking import live
from spinflow.tracking.live import StepsTail

STAGE = "sft"  # a training stage with no arguments; its model is θ0
INTERVAL_S = "0.1"
TIMEOUT_S = 30


def stage_params(experiment: str):
    raw = default_params_dict()
    raw["tracking"].update(experiment=experiment, registered_model=experiment, retry_seconds=2)
    return validate_params(raw)


class Training:
    """Writes ``losses`` as the steps of ``sft``, one line a step; after ``pause_after`` steps
    (and half of the next line) it sets ``paused`` and waits for ``proceed``; with ``error`` it
    raises that instead of finishing; ``weights`` makes the checkpoint."""

    def __init__(self, losses, *, pause_after=None, error=None, weights=b"weights"):
        self.losses = losses
        self.pause_after = pause_after
        self.error = error
        self.weights = weights
        self.paused = threading.Event()
        self.proceed = threading.Event()

    def rows(self):
        return [
            {"step": step, "loss": loss, "learning_rate": 0.001}
            for step, loss in enumerate(self.losses, start=1)
        ]

    def __call__(self, params):
        model = build(params).model("theta_0")
        model.steps_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(model.steps_csv, "w", newline="", encoding="utf-8") as f:
            f.write("step,loss,learning_rate\r\n")
            for row in self.rows():
                line = f"{row['step']},{row['loss']:.8g},{row['learning_rate']:.8g}\r\n"
                if self.pause_after is not None and row["step"] == self.pause_after + 1:
                    f.write(line[:3])  # half a line: not a step yet
                    f.flush()
                    self.paused.set()
                    assert self.proceed.wait(TIMEOUT_S), "the test never let the stage go on"
                    line = line[3:]
                f.write(line)
                f.flush()
        if self.error is not None:
            raise self.error
        write_rows_csv(model.steps_csv, self.rows())  # training's own write: one piece
        model.path.mkdir(parents=True, exist_ok=True)
        (model.path / "config.json").write_text("{}", encoding="utf-8")
        (model.path / "model.safetensors").write_bytes(self.weights)
        model.train_metrics.parent.mkdir(parents=True, exist_ok=True)
        summary = {"optimizer_steps": len(self.losses), "final_loss": self.losses[-1]}
        model.train_metrics.write_text(json.dumps(summary), encoding="utf-8")
        return summary


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("live-store")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture
def project(store, tmp_path, monkeypatch, request):
    """A project folder whose tracking goes to the module's store, in an experiment of its own;
    live metrics every 0.1 s."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv(live.INTERVAL_ENV, INTERVAL_S)
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "RANK"):
        monkeypatch.delenv(name, raising=False)
    experiment = f"live-{request.node.name}"
    return stage_params(experiment), MlflowClient(store), experiment


def runs(client, experiment: str, tag: str = "spinflow.role") -> list:
    """Active runs of θ0 (``tag``: its role, or its role as a candidate)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], f"tags.`{tag}` = 'baseline'", max_results=10)


def steps(client, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for(condition, what: str):
    deadline = time.monotonic() + TIMEOUT_S
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT_S} s"
        time.sleep(0.05)
    return found


def in_thread(work):
    """Run ``work`` in a thread; returns the thread and a dict that gets its error."""
    outcome: dict[str, BaseException] = {}

    def target():
        try:
            work()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def run_paused(params, training: Training, client, experiment, tag="spinflow.role"):
    """Start the stage in a thread, wait until MLflow shows the steps written before its pause;
    returns (thread, outcome, run)."""
    thread, outcome = in_thread(lambda: execute(params, STAGE, training))
    assert training.paused.wait(TIMEOUT_S), outcome
    expected = list(range(1, training.pause_after + 1))

    def live_run():
        for run in runs(client, experiment, tag):
            if steps(client, run.info.run_id) == expected:
                return run
        return None

    return thread, outcome, wait_for(live_run, "the steps written so far in MLflow")


def test_steps_reach_mlflow_while_the_stage_runs(project):
    params, client, experiment = project
    training = Training([2.5, 2.0, 1.5, 1.25], pause_after=2)
    thread, outcome, run = run_paused(params, training, client, experiment)
    assert run.info.status == "RUNNING"
    assert steps(client, run.info.run_id, "train/learning_rate") == [1, 2]
    values = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(values) == [2.0, 2.5]
    time.sleep(0.5)  # several looks at the file: the half-written line is not a step
    assert steps(client, run.info.run_id) == [1, 2]

    training.proceed.set()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive() and not outcome, outcome
    (done,) = runs(client, experiment)
    assert done.info.run_id == run.info.run_id  # after_stage completed the same run
    assert done.info.status == "FINISHED"
    for key in ("train/loss", "train/learning_rate"):
        assert steps(client, done.info.run_id, key) == [1, 2, 3, 4], key  # each step once
    assert done.data.metrics["train_summary/optimizer_steps"] == 4
    assert steps(client, done.info.run_id, "train_summary/optimizer_steps") == [0]
    assert done.data.tags["spinflow.logged.sft"] == done.data.tags["spinflow.model_hash"]


def test_a_failing_stage_leaves_its_run_failed_and_a_rerun_completes_it(project):
    params, client, experiment = project
    training = Training([2.5, 2.0, 1.5], error=RuntimeError("CUDA out of memory\nmore"))
    with pytest.raises(RuntimeError):
        execute(params, STAGE, training)
    (failed,) = runs(client, experiment)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["spinflow.failed"] == "sft: RuntimeError: CUDA out of memory"
    assert steps(client, failed.info.run_id) == [1, 2, 3]  # what it wrote before failing
    parent = client.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"  # no stage writes into it now

    execute(params, STAGE, Training([2.5, 2.0, 1.5, 1.25]))
    (run,) = runs(client, experiment)
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id) == [1, 2, 3, 4]


def test_a_rerun_logs_into_a_candidate_run_kept_only_for_another_checkpoint(project):
    params, client, experiment = project
    execute(params, STAGE, Training([2.5, 2.0, 1.5]))
    (first,) = runs(client, experiment)

    # the same training again: its run is the first one's candidate while it runs, then goes
    same = Training([2.5, 2.0, 1.5], pause_after=1)
    thread, outcome, candidate = run_paused(params, same, client, experiment, "spinflow.candidate")
    assert candidate.info.run_id != first.info.run_id
    same.proceed.set()
    thread.join(TIMEOUT_S)
    assert not outcome, outcome
    (kept,) = runs(client, experiment)
    assert kept.info.run_id == first.info.run_id and kept.info.status == "FINISHED"
    assert steps(client, kept.info.run_id) == [1, 2, 3]
    assert client.get_run(candidate.info.run_id).info.lifecycle_stage == "deleted"

    # another training: the candidate becomes θ0's run, the first one is superseded
    other = Training([3.0, 2.75], pause_after=1, weights=b"other weights")
    thread, outcome, candidate = run_paused(params, other, client, experiment, "spinflow.candidate")
    assert [m.value for m in client.get_metric_history(candidate.info.run_id, "train/loss")] == [
        3.0
    ]
    other.proceed.set()
    thread.join(TIMEOUT_S)
    assert not outcome, outcome
    (now,) = runs(client, experiment)
    assert now.info.run_id == candidate.info.run_id and now.info.status == "FINISHED"
    assert "spinflow.candidate" not in now.data.tags
    assert steps(client, now.info.run_id) == [1, 2]
    old = client.get_run(first.info.run_id)
    assert old.info.lifecycle_stage == "deleted"
    assert old.data.tags["spinflow.superseded_by"] == now.info.run_id


def test_steps_that_differ_from_the_file_are_replaced_not_mixed(project):
    """A run continued after a failure whose steps the re-run does not reproduce (other code,
    another machine): after_stage starts a clean run rather than keep two trainings' values."""
    params, client, experiment = project
    with pytest.raises(RuntimeError):
        execute(params, STAGE, Training([9.0, 8.0], error=RuntimeError("boom")))
    (failed,) = runs(client, experiment)
    execute(params, STAGE, Training([2.5, 2.0, 1.5]))
    (run,) = runs(client, experiment)
    assert run.info.run_id != failed.info.run_id and run.info.status == "FINISHED"
    values = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")
    )
    assert values == [(1, 2.5), (2, 2.0), (3, 1.5)]


def test_a_real_trainings_steps_reach_mlflow_before_it_ends(
    project, tiny_checkpoint_session, monkeypatch, torch_single_thread
):
    """The tiny model fine-tuned by the SFT recipe through the runner, held after its step 2:
    the run holds steps 1 and 2 while training has not ended (no checkpoint yet); when it ends,
    every step once, with the values of the steps file."""
    from spinflow import training
    from spinflow.sft_training import supervised

    _, client, experiment = project
    raw = default_params_dict()
    raw["tracking"].update(experiment=experiment, registered_model=experiment, retry_seconds=2)
    raw["sft"].update(batch_size=2, epochs=1, bf16=False, group_by_length=False)
    raw["resume"]["every_steps"] = None
    params = validate_params(raw)
    records = [{"prompt": f"Say {w}.", "answer": f"{w} {w}"} for w in "abcdefgh"]
    paused, proceed = threading.Event(), threading.Event()
    loop = training.train_loop

    def held_after_step_2(*args, **kwargs):
        def on_step(row):
            if row["step"] == 2:
                paused.set()
                assert proceed.wait(TIMEOUT_S), "the test never let training go on"

        return loop(*args, on_step=on_step, **kwargs)

    monkeypatch.setattr(training, "train_loop", held_after_step_2)
    model = build(params).model("theta_0")

    def stage(params):
        return supervised(
            params,
            model,
            source=tiny_checkpoint_session,
            records=records,
            max_steps=None,
            extra_inputs={},
        )

    thread, outcome = in_thread(lambda: execute(params, STAGE, stage))
    try:
        assert paused.wait(TIMEOUT_S), outcome

        def live_run():
            found = runs(client, experiment)
            return found[0] if found and steps(client, found[0].info.run_id) == [1, 2] else None

        run = wait_for(live_run, "the real training's first steps in MLflow")
        assert thread.is_alive() and not model.path.exists()
        assert run.info.status == "RUNNING"
    finally:
        proceed.set()
        thread.join(TIMEOUT_S)
    assert not thread.is_alive() and not outcome, outcome
    (done,) = runs(client, experiment)
    assert done.info.run_id == run.info.run_id and done.info.status == "FINISHED"
    file = sorted((int(r["step"]), r["loss"]) for r in read_rows_csv(model.steps_csv))
    assert [step for step, _ in file] == [1, 2, 3, 4]
    logged = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")
    )
    assert logged == file  # each step once, as the file has it


KILLED_STAGE = """
import sys, time
import test_tracking_live as t
from spinflow.runner import execute

training = t.Training([2.5, 2.0, 1.5], pause_after=2)
training.proceed.wait = lambda timeout=None: time.sleep(3600)  # held until killed
execute(t.stage_params(sys.argv[1]), t.STAGE, training)
"""


def test_a_killed_stage_is_marked_failed_by_sync_and_a_rerun_continues_it(project):
    params, client, experiment = project
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    stage = subprocess.Popen(
        [sys.executable, "-c", KILLED_STAGE, experiment],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def killed_run():
            if stage.poll() is not None:
                pytest.fail(f"the stage ended: {stage.stderr.read().decode()[-2000:]}")
            found = runs(client, experiment)
            return found[0] if found and steps(client, found[0].info.run_id) == [1, 2] else None

        run = wait_for(killed_run, "the killed stage's steps in MLflow")
    finally:
        stage.send_signal(signal.SIGKILL)
        stage.wait(TIMEOUT_S)
        stage.stderr.close()
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    tracking.sync(params)
    left = client.get_run(run.info.run_id)
    assert left.info.status == "FAILED"
    assert (
        "ended without finishing it; marked FAILED by sync"
        in left.data.tags["spinflow.interrupted"]
    )

    execute(params, STAGE, Training([2.5, 2.0, 1.5]))
    (rerun,) = runs(client, experiment)
    assert rerun.info.run_id == run.info.run_id and rerun.info.status == "FINISHED"
    assert steps(client, rerun.info.run_id) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# The steps file as it is written


def test_the_tail_reads_complete_rows_once_and_starts_again_on_a_new_file(tmp_path):
    path = tmp_path / "steps.csv"
    tail = StepsTail(path)
    assert tail.read() == []  # not there yet
    path.write_text("step,loss\n1,0.5\n2,0.4", encoding="utf-8")
    assert tail.read() == [{"step": 1.0, "loss": 0.5}]
    with open(path, "a", encoding="utf-8") as f:
        f.write("5\n3,0.3\n")
    assert tail.read() == [{"step": 2.0, "loss": 0.45}, {"step": 3.0, "loss": 0.3}]
    assert tail.read() == []

    write_rows_csv(path, [{"step": 1, "loss": 0.5}])  # renamed over: read from the start
    assert tail.read() == [{"step": 1.0, "loss": 0.5}]
    path.write_text("step,loss\n", encoding="utf-8")  # cut shorter
    assert tail.read() == []
    path.write_text("step,grad_norm,loss\n1,2.0,0.5\n", encoding="utf-8")  # written again
    assert tail.read() == [{"step": 1.0, "grad_norm": 2.0, "loss": 0.5}]
    with open(path, "a", encoding="utf-8") as f:
        f.write("2,1.5,0.25")
    assert tail.read(final=True) == [{"step": 2.0, "grad_norm": 1.5, "loss": 0.25}]


def test_the_tail_skips_an_earlier_runs_file_until_it_changes(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text("loss\n9.0\n", encoding="utf-8")
    tail = StepsTail(path)
    assert tail.read() == []
    write_rows_csv(path, [{"loss": 1.0}])
    assert tail.read() == [{"loss": 1.0, "step": 1.0}]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(live.INTERVAL_ENV, raising=False)
    assert live.interval() == live.DEFAULT_INTERVAL_S
    monkeypatch.setenv(live.INTERVAL_ENV, "2.5")
    assert live.interval() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(live.INTERVAL_ENV, bad)
        with pytest.raises(tracking.TrackingError, match=live.INTERVAL_ENV) as error:
            live.interval()
        assert "\n" not in str(error.value)

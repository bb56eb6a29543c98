"""The whole pipeline under DVC on the tiny model: every output, and what a change re-runs.

One test, in phases that build on each other; each phase's duration is printed in failure
messages (stage processes take seconds each to start on this machine).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import pipeline_env
from spinflow.config import default_params_dict
from test_devices import assert_on_decided_device, device_records

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
IMPORT_TIME = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(spinflow(?:\.\w+)*)\s*$")
RAN = re.compile(r"(?:Running stage '([^']+)'|Stage '([^']+)' is cached - skipping run)")

ITERATIONS = 2
NUM_POOL = 12
NUM_TEST = 12
STAGES = {
    "validate_params",
    "prepare_model",
    "prepare_data",
    "sft",
    "eval_sft",
    *(f"{kind}_iter_{k}" for kind in ("generate", "train", "eval") for k in range(ITERATIONS)),
    "report",
}
EVAL_KEYS = {
    "model",
    "num_examples",
    "answer_logprob_per_token",
    "exact_match",
    "verifier_pass_rate",
    "answer_length",
    "per_task_pass_rate",
}


def _params() -> dict:
    raw = default_params_dict()  # every key: DVC reads the file itself
    raw["model"]["source"] = "tiny"
    raw["data"].update(num_sft=16, num_val=4, num_pool=NUM_POOL, num_test=NUM_TEST)
    raw["sft"].update(batch_size=4, epochs=1)
    raw["generate"]["max_new_tokens"] = 12
    raw["spin"]["iterations"] = ITERATIONS
    raw["spin"]["train"].update(batch_size=4, learning_rate=1e-4)
    # present from the start, so changing it and changing it back are both value changes (DVC
    # does not notice a params key that dvc.yaml no longer lists)
    raw["spin"]["per_iteration"] = {"iter_0": {"learning_rate": 1e-4}}
    raw["sft_extra"]["enabled"] = False
    raw["eval"]["max_new_tokens"] = 12
    raw["tracking"]["enabled"] = False
    return raw


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.timings: list[tuple[str, float]] = []
        self.env = pipeline_env()
        # stages run the code copied into this repository, the code DVC hashes
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(root / "src"), self.env.get("PYTHONPATH")) if p
        )
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.env.pop("VIRTUAL_ENV", None)

    def durations(self) -> str:
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.timings)

    def run(self, *cmd: str, label: str | None = None, env: dict[str, str] | None = None) -> str:
        started = time.perf_counter()
        proc = subprocess.run(
            cmd,
            cwd=self.root,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream, in order: stage markers, then stage output
            text=True,
            timeout=240,
            check=False,
        )
        self.timings.append((label or " ".join(cmd), time.perf_counter() - started))
        output = proc.stdout
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} exited {proc.returncode} [{self.durations()}]\n{output[-6000:]}"
        )
        return output

    def repro(self, label: str, env: dict[str, str] | None = None) -> set[str]:
        self.last_output = self.run("dvc", "repro", label=label, env=env)
        return {a or b for a, b in RAN.findall(self.last_output)}

    def write_params(self, raw: dict) -> None:
        text = yaml.safe_dump(raw, sort_keys=False)
        (self.root / "params.yaml").write_text(text, encoding="utf-8")

    def path(self, relative: str) -> Path:
        return self.root / relative

    def json(self, relative: str) -> dict:
        return json.loads(self.path(relative).read_text(encoding="utf-8"))


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "project"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "stages", root / "stages", ignore=ignore)
    shutil.copytree(REPO / "src" / "spinflow", root / "src" / "spinflow", ignore=ignore)
    ws = Workspace(root)
    ws.run("git", "init", "-q", ".")
    ws.run("dvc", "init", "-q")
    return ws


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _eval_metrics(ws: Workspace) -> dict[str, dict]:
    names = ["sft"] + [f"iter_{k}" for k in range(ITERATIONS)]
    return {name: ws.json(f"metrics/eval_{name}.json") for name in names}


def _imports_by_stage(output: str) -> dict[str, set[str]]:
    """Package modules each stage process imported, from ``-X importtime`` lines in its output."""
    imported: dict[str, set[str]] = {}
    stage = None
    for line in output.splitlines():
        if match := RAN.search(line):
            stage = match.group(1) or match.group(2)
            imported.setdefault(stage, set())
        elif stage and (match := IMPORT_TIME.match(line)):
            imported[stage].add(match.group(1))
    return imported


def _module_path(module: str) -> str:
    path = Path("src", *module.split("."))
    return str(path / "__init__.py") if (REPO / path).is_dir() else f"{path}.py"


# outputs whose bytes depend only on params, inputs and code (timings are in timings/, which
# DVC does not know; the chart is left out)
DETERMINISTIC = ("models", "data", "generated", "eval", "metrics", "plots")
UPSTREAM = ("models/base/", "models/theta_0/", "data/", "eval/sft/", "metrics/eval_sft.json")


def _digests(ws: Workspace) -> dict[str, str]:
    """sha256 of every deterministic output file, by path relative to the project."""
    files = [p for folder in DETERMINISTIC for p in sorted(ws.path(folder).rglob("*"))]
    files += [ws.path("reports/results.md"), ws.path("reports/by_iteration.csv")]
    return {
        p.relative_to(ws.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file()
    }


def _lock_outs(ws: Workspace, stage: str) -> list:
    lock = yaml.safe_load(ws.path("dvc.lock").read_text(encoding="utf-8"))
    return lock["stages"][stage]["outs"]


def test_pipeline_runs_and_reruns_only_what_changed(workspace: Workspace):
    ws = workspace
    raw = _params()
    ws.write_params(raw)
    ws.run("spinflow", "pipeline", "write")
    ws.run("spinflow", "pipeline", "check")

    listed = ws.run("dvc", "stage", "list", "--name-only").split()
    assert set(listed) == STAGES, f"{sorted(listed)} [{ws.durations()}]"

    # ---- first run: every stage, each process printing what it imports
    ran = ws.repro("repro (all)", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert ran == STAGES, f"ran {sorted(ran)} [{ws.durations()}]"
    # every package module a stage process imported is one of that stage's dependencies
    declared = yaml.safe_load(ws.path("dvc.yaml").read_text(encoding="utf-8"))["stages"]
    imports = _imports_by_stage(ws.last_output)
    assert set(imports) == STAGES
    for stage, modules in imports.items():
        assert "spinflow.runner" in modules, stage
        missing = {m for m in modules if _module_path(m) not in declared[stage]["deps"]}
        assert not missing, f"{stage} imports {sorted(missing)}, not in its dvc.yaml deps"

    for k in range(1, ITERATIONS + 1):
        model = ws.path(f"models/theta_{k}")
        assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
        assert (model / "provenance.json").is_file()
    for k in range(ITERATIONS):
        pairs = _lines(ws.path(f"generated/iter_{k}/pairs.jsonl"))
        assert len(pairs) == NUM_POOL
        assert {p["iteration"] for p in pairs} == {k}
        assert set(pairs[0]) >= {"id", "prompt", "real", "generated", "task"}
        assert len({p["id"] for p in pairs}) == NUM_POOL
        train = ws.json(f"metrics/train_iter_{k}.json")
        # iteration 0 trains on its 12 pairs, iteration 1 also on iteration 0's (mix_previous 1)
        assert train["pairs"] == NUM_POOL * (k + 1)
        # batch 4
        assert train["optimizer_steps"] == NUM_POOL * (k + 1) // 4 * raw["spin"]["train"]["epochs"]
        assert ws.json(f"metrics/spin_steps_iter_{k}.json") == {
            "optimizer_steps": train["optimizer_steps"],
            "compute_tokens": train["compute_tokens"],
        }
        epochs = raw["spin"]["train"]["epochs"]
        assert train["compute_tokens"] == (
            train["generation_tokens"] + (1 + 3 * epochs) * train["reference_tokens"]
        )
        with open(ws.path(f"plots/train_iter_{k}_steps.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == train["optimizer_steps"]
        assert {"step", "loss", "reward_margin", "reward_accuracy"} <= set(rows[0])
    # bf16: auto resolved once on this machine (the session's cache), the same for every stage
    # of the model, and recorded beside each model
    chosen = set()
    for metrics_file, model in [("sft", "theta_0")] + [
        (f"train_iter_{k}", f"theta_{k + 1}") for k in range(ITERATIONS)
    ]:
        bf16 = ws.json(f"metrics/{metrics_file}.json")["bf16"]
        precision = ws.json(f"models/{model}/provenance.json")["params"]["precision"]
        assert precision == ("bf16-autocast" if bf16 else "float32"), model
        chosen.add(bf16)
    assert len(chosen) == 1
    for name in ["sft"] + [f"iter_{k}" for k in range(ITERATIONS)]:
        metrics = ws.json(f"metrics/eval_{name}.json")
        expected = EVAL_KEYS | ({"reward_margin", "reward_accuracy"} if name != "sft" else set())
        assert expected <= set(metrics), f"{name}: {sorted(metrics)}"
        assert metrics["model"] == name
        assert metrics["num_examples"] == NUM_TEST
        assert metrics["answer_logprob_per_token"] < 0
        assert len(_lines(ws.path(f"eval/{name}/generations.jsonl"))) == NUM_TEST
    assert ws.path("metrics/sft.json").is_file()
    assert ws.path("plots/sft_steps.csv").is_file()
    results = ws.path("reports/results.md").read_text(encoding="utf-8")
    assert "θ0 (SFT)" in results and f"θ{ITERATIONS} (SPIN iter {ITERATIONS - 1})" in results
    assert ws.path("reports/metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(ws.path("reports/by_iteration.csv"), newline="") as f:
        by_iteration = list(csv.DictReader(f))
    assert [row["iteration"] for row in by_iteration] == [str(k) for k in range(ITERATIONS + 1)]
    assert not ws.path("models/sft_extra").exists()

    # ---- nothing changed: nothing runs
    output = ws.run("dvc", "repro", label="repro (no change)")
    assert not RAN.findall(output), f"{output[-3000:]} [{ws.durations()}]"
    assert "Data and pipelines are up to date" in output

    # ---- a misspelt key: validate_params (it depends on the whole file) stops `dvc repro`
    # before any stage runs; it writes nothing, so fixing the key re-runs nothing
    params_text = ws.path("params.yaml").read_text(encoding="utf-8")
    raw["spin"]["betaa"] = 0.2
    ws.write_params(raw)
    del raw["spin"]["betaa"]
    failed = subprocess.run(
        ["dvc", "repro"], cwd=ws.root, env=ws.env, capture_output=True, text=True, check=False
    )
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Traceback" not in output, output
    assert {a or b for a, b in RAN.findall(output)} == {"validate_params"}, output
    assert "error: validate_params: params.yaml: unknown key 'spin.betaa'" in output
    ws.path("params.yaml").write_text(params_text, encoding="utf-8")
    output = ws.run("dvc", "repro", label="repro (misspelt key fixed)")
    assert not RAN.findall(output) and "Data and pipelines are up to date" in output, output

    # ---- evaluation setting: every evaluation (and the report if their metrics moved), no more
    theta_1_before = _lock_outs(ws, "train_iter_0")
    evaluations = {"eval_sft", *(f"eval_iter_{k}" for k in range(ITERATIONS))}
    raw["eval"]["max_new_tokens"] = 6
    ws.write_params(raw)
    ws.run("spinflow", "pipeline", "check")
    ran = ws.repro("repro (eval.max_new_tokens)")
    # every evaluation's output folder records its params (provenance.json) and is an input of
    # the report, so the report runs again even where the metrics came out the same
    expected = evaluations | {"validate_params", "report"}
    assert ran == expected, f"ran {sorted(ran)} [{ws.durations()}]"

    # ---- one iteration's learning rate: that iteration's training and evaluation, the report
    before = _eval_metrics(ws)
    raw["spin"]["per_iteration"]["iter_1"] = {"learning_rate": 1e-3}
    ws.write_params(raw)
    ws.run("spinflow", "pipeline", "write")
    ran = ws.repro("repro (per_iteration.iter_1)")
    assert ran == {"validate_params", "train_iter_1", "eval_iter_1", "report"}, (
        f"ran {sorted(ran)} [{ws.durations()}]"
    )
    after = _eval_metrics(ws)
    assert after["iter_1"] != before["iter_1"]
    assert {k: v for k, v in after.items() if k != "iter_1"} == {
        k: v for k, v in before.items() if k != "iter_1"
    }
    assert ws.json("metrics/train_iter_1.json")["learning_rate"] == 1e-3
    assert ws.json("metrics/train_iter_0.json")["learning_rate"] == 1e-4
    assert _lock_outs(ws, "train_iter_0") == theta_1_before

    # ---- removing that override: DVC sees the command change and brings θ2 back
    del raw["spin"]["per_iteration"]["iter_1"]
    ws.write_params(raw)
    ws.run("spinflow", "pipeline", "write")
    ran = ws.repro("repro (iter_1 override removed)")
    assert ran == {"validate_params", "train_iter_1", "eval_iter_1", "report"}, (
        f"ran {sorted(ran)} [{ws.durations()}]"
    )
    assert _eval_metrics(ws) == before
    assert ws.json("metrics/train_iter_1.json")["learning_rate"] == 1e-4

    # ---- an early iteration's learning rate: that iteration and every later one, the report
    before = _digests(ws)
    params_before = ws.path("params.yaml").read_text(encoding="utf-8")
    raw["spin"]["per_iteration"]["iter_0"] = {"learning_rate": 1e-3}
    ws.write_params(raw)
    ws.run("spinflow", "pipeline", "write")
    ran = ws.repro("repro (per_iteration.iter_0)")
    downstream = {"train_iter_0", "eval_iter_0", "generate_iter_1", "train_iter_1", "eval_iter_1"}
    assert ran == downstream | {"validate_params", "report"}, (
        f"ran {sorted(ran)} [{ws.durations()}]"
    )
    changed = _digests(ws)
    assert changed["models/theta_1/model.safetensors"] != before["models/theta_1/model.safetensors"]
    assert changed["models/theta_2/model.safetensors"] != before["models/theta_2/model.safetensors"]
    assert {k: v for k, v in changed.items() if k.startswith(UPSTREAM)} == {
        k: v for k, v in before.items() if k.startswith(UPSTREAM)
    }

    # ---- back to the previous params: the same bytes everywhere (run or restored from cache)
    ws.path("params.yaml").write_text(params_before, encoding="utf-8")
    ws.run("spinflow", "pipeline", "write")
    ran = ws.repro("repro (reverted)")
    assert ran == downstream | {"validate_params", "report"}, (
        f"ran or restored {sorted(ran)} [{ws.durations()}]"
    )
    assert _digests(ws) == before

    # ---- recomputing θ0 and its evaluation from scratch gives the same bytes, and dvc.lock
    # stays as it was: timings went to timings/, not to the hashed metrics
    lock = ws.path("dvc.lock").read_bytes()
    timings = ws.json("timings/sft.json")
    for stage in ("sft", "eval_sft"):
        output = ws.run("dvc", "repro", "--force", "--single-item", stage, label=f"force {stage}")
        ran, restored = zip(*RAN.findall(output), strict=True)
        assert set(ran) == {stage} and not any(restored), output[-3000:]  # run, not restored
    assert _digests(ws) == before
    assert ws.path("dvc.lock").read_bytes() == lock
    assert ws.json("timings/sft.json")["train_seconds"] > 0 and timings["train_seconds"] > 0
    assert not {"train_seconds", "peak_memory_mb"} & set(ws.json("metrics/sft.json"))
    assert "Data and pipelines are up to date" in ws.run("dvc", "status", label="status")

    print(f"durations: {ws.durations()}")


def test_lobass_stages_and_what_their_fraction_reruns(tiny_dvc_repo, tmp_path):
    """LoBaSS switched on in the shared tiny pipeline (8 SFT examples, batches of 4): only its
    stages and the report run, the SPIN chain is reused; then its fraction re-runs the
    selection and what is trained on it, nothing upstream."""
    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    params = repo.root / "params.yaml"
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["lobass"].update(enabled=True, fraction=0.25, min_examples=4)
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    repo.run("spinflow", "pipeline", "write")
    lobass_stages = {
        "lobass_score",
        "lobass_select",
        "sft_lobass",
        "sft_random",
        "eval_sft_lobass",
        "eval_sft_random",
    }
    ran = repo.ran(repo.run("dvc", "repro", timeout=600))
    assert ran == lobass_stages | {"validate_params", "report"}, f"ran {sorted(ran)}"
    assert_on_decided_device(device_records(repo.root), {"lobass_score", "sft_lobass"})

    scores = _lines(repo.root / "lobass/scores/scores.jsonl")
    assert len(scores) == 8 and sorted(r["rank"] for r in scores) == list(range(1, 9))
    selected = _lines(repo.root / "lobass/selection/selected.jsonl")
    control = _lines(repo.root / "lobass/selection/random.jsonl")
    best = {r["id"] for r in scores if r["rank"] <= 4}  # 25% of 8 is 2, raised to min_examples
    assert {r["id"] for r in selected} == best and len(control) == 4
    assert repo.json("metrics/sft_lobass.json")["examples"] == 4
    assert repo.json("metrics/sft_random.json")["examples"] == 4
    for name in ("sft_lobass", "sft_random"):
        assert repo.json(f"metrics/eval_{name}.json")["model"] == name
    results = (repo.root / "reports/results.md").read_text(encoding="utf-8")
    assert "SFT on the LoBaSS selection" in results and "## LoBaSS selection" in results
    assert (repo.root / "reports/lobass_scores.png").read_bytes()[:4] == b"\x89PNG"

    # the fraction reaches the selection and what is trained on it, nothing upstream
    raw["lobass"]["fraction"] = 0.75
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    repo.run("spinflow", "pipeline", "check")
    ran = repo.ran(repo.run("dvc", "repro", timeout=600))
    assert ran == lobass_stages - {"lobass_score"} | {"validate_params", "report"}, (
        f"ran {sorted(ran)}"
    )
    assert repo.json("metrics/sft_lobass.json")["examples"] == 6

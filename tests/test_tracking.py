"""MLflow tracking against a temporary SQLite store: a tiny two-iteration pipeline, in-process.

Stages run through :func:`spinflow.runner.execute`, as ``stages/*.py`` run them, so tracking sees
exactly what the stage runner hands it: the run tree, metrics, tables and registry come from real
runs. Where and whether runs go is tested in test_tracking_store.py, dvc.lock in
test_tracking_lineage.py.
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from spinflow import tracking
from spinflow.config import Params, validate_params
from spinflow.graph import build
from spinflow.methods.sft import stages as sft
from spinflow.methods.spin import baselines, generate
from spinflow.methods.spin import train as spin
from spinflow.methods.spin.graph import pairs_file
from spinflow.provenance import tree_hash
from spinflow.recipes import evaluate, prepare
from spinflow.report import report as report_stage
from spinflow.runner import execute

ITERATIONS = 2
MODEL_NAME = "spinflow-test"


def tiny_params(model_source: Path, **overrides) -> Params:
    raw = {
        "model": {"source": str(model_source)},
        "data": {"num_sft": 8, "num_val": 4, "num_pool": 8, "num_test": 8},
        "sft": {"batch_size": 4, "epochs": 2},
        "generate": {"max_new_tokens": 8, "batch_size": 8},
        "spin": {"iterations": ITERATIONS, "train": {"batch_size": 4, "epochs": 1}},
        "sft_extra": {"enabled": True, "compute": False},
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "tracking": {"experiment": "spinflow-test", "registered_model": MODEL_NAME},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return validate_params(raw)


def run_tiny_pipeline(params: Params, *, prepare: bool = True) -> None:
    """Every stage in DVC's order, in this process (the working directory is the project)."""
    if prepare:
        prepare_inputs(params)
    if params.sft.enabled:
        execute(params, "sft", sft.sft)
    execute(params, "eval_sft", evaluate.evaluate)
    for k in range(params.spin.iterations):
        execute(params, f"generate_iter_{k}", generate.generate)
        execute(params, f"train_iter_{k}", spin.train)
        execute(params, f"eval_iter_{k}", evaluate.evaluate)
    if params.sft_extra.enabled:
        execute(params, "sft_extra", baselines.sft_extra)
        execute(params, "eval_sft_extra", evaluate.evaluate)
    if params.sft_extra.enabled and params.sft_extra.compute:
        execute(params, "sft_extra_compute", baselines.sft_extra)
        execute(params, "eval_sft_extra_compute", evaluate.evaluate)
    execute(params, "report", report_stage)


def prepare_inputs(params: Params) -> None:
    """The two stages that log nothing: the base model and the data splits."""
    execute(params, "prepare_model", prepare.prepare_model)
    execute(params, "prepare_data", prepare.prepare_data)


def log_stage(params: Params, stage: str) -> None:
    """Hand a finished stage to tracking again, as the stage runner does after it ran."""
    graph = build(params)
    tracking.after_stage(params, graph, graph.stage(stage))


def pipeline_runs(client, params: Params) -> dict[str, object]:
    """role or iter_<k> → the active run of this pipeline."""
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    key = tracking.pipeline_key(params)
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`spinflow.pipeline_key` = '{key}'", max_results=100
    )
    out: dict[str, object] = {}
    for run in runs:
        role = run.data.tags["spinflow.role"]
        name = f"iter_{run.data.tags['spinflow.iteration']}" if role == "iteration" else role
        assert name not in out, f"two active runs for {name}"
        out[name] = run
    return out


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked(tiny_checkpoint_session, tmp_path_factory):
    """The tiny pipeline with the SFT-extra baseline, run once with tracking into
    ``<tmp>/mlflow.db``."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("DVC_ROOT", raising=False)
        mp.delenv("DVC_EXP_NAME", raising=False)
        params = tiny_params(tiny_checkpoint_session)
        run_tiny_pipeline(params)
        yield SimpleNamespace(root=root, uri=uri, params=params, client=MlflowClient(uri))


def test_runs_are_nested_and_tagged(tracked):
    runs = pipeline_runs(tracked.client, tracked.params)
    assert set(runs) == {"pipeline", "baseline", "iter_0", "iter_1", "sft_extra"}
    assert not (tracked.root / "mlruns").exists()  # every artifact went beside the database
    assert (tracked.root / "mlartifacts").is_dir()
    parent = runs["pipeline"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["spin.iterations"] == str(ITERATIONS)
    for name in ("baseline", "iter_0", "iter_1", "sft_extra"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs["baseline"].data.tags["dvc.stages"] == "sft,eval_sft"
    assert runs["sft_extra"].data.tags["dvc.stages"] == "sft_extra,eval_sft_extra"
    for k in range(ITERATIONS):
        tags = runs[f"iter_{k}"].data.tags
        assert tags["spinflow.iteration"] == str(k)
        assert tags["dvc.stages"] == f"generate_iter_{k},train_iter_{k},eval_iter_{k}"
        theta = build(tracked.params).theta(k + 1).path
        provenance = json.loads((tracked.root / theta / "provenance.json").read_text())
        assert (
            tags[f"stage.train_iter_{k}.input.model"] == provenance["inputs"]["model"]["sha256_16"]
        )
        assert tags["spinflow.model_hash"] == tree_hash(tracked.root / theta)
        assert runs[f"iter_{k}"].data.params["iteration"] == str(k)
        assert runs[f"iter_{k}"].data.params["train.optimizer"] == "rmsprop"
    # each iteration's θk is the previous iteration's result
    assert (
        runs["iter_1"].data.tags["stage.train_iter_1.input.model"]
        == runs["iter_0"].data.tags["spinflow.model_hash"]
    )


def test_metric_histories(tracked):
    client, root = tracked.client, tracked.root
    graph = build(tracked.params)
    runs = pipeline_runs(client, tracked.params)
    for k in range(ITERATIONS):
        run_id = runs[f"iter_{k}"].info.run_id
        summary = json.loads((root / graph.theta(k + 1).train_metrics).read_text())
        optimizer_steps = summary["optimizer_steps"]
        assert steps_of(client, run_id, "train/loss") == list(range(1, optimizer_steps + 1))
        assert steps_of(client, run_id, "train/reward_margin") == list(
            range(1, optimizer_steps + 1)
        )
        assert steps_of(client, run_id, "eval/exact_match") == [k + 1]
        evaluated = json.loads((root / graph.evaluation(f"iter_{k}").metrics).read_text())
        assert runs[f"iter_{k}"].data.metrics["eval/answer_logprob_per_token"] == pytest.approx(
            evaluated["answer_logprob_per_token"]
        )
    sft_steps = json.loads((root / graph.theta(0).train_metrics).read_text())["optimizer_steps"]
    baseline = runs["baseline"].info.run_id
    assert len(client.get_metric_history(baseline, "train/loss")) == sft_steps
    assert steps_of(client, baseline, "eval/exact_match") == [0]
    parent = runs["pipeline"].info.run_id
    for key in ("eval/exact_match", "eval/answer_logprob_per_token"):
        assert steps_of(client, parent, key) == [0, 1, 2]
    assert steps_of(client, parent, "eval/reward_margin") == [1, 2]  # θ0 has no opponent


def test_timings_go_to_mlflow_not_to_the_hashed_metrics(tracked):
    """Seconds, throughput and memory change on every run: in timings/ (unknown to DVC) and
    MLflow, never in metrics/*.json (dvc.lock would change on every identical re-run)."""
    from spinflow.timings import read_timings

    root, graph = tracked.root, build(tracked.params)
    runs = pipeline_runs(tracked.client, tracked.params)
    noise = {"train_seconds", "examples_per_second", "tokens_per_second", "peak_memory_mb"}
    for name, run in (("theta_1", runs["iter_0"]), ("sft_extra", runs["sft_extra"])):
        model = graph.model(name)
        assert not noise & set(json.loads((root / model.train_metrics).read_text()))
        timings = read_timings(root / model.timings, root / model.path)
        assert set(timings) == noise and timings["train_seconds"] > 0
        for key in noise:
            assert run.data.metrics[f"train_summary/{key}"] == pytest.approx(timings[key])
    assert (root / "timings" / ".gitignore").read_text().splitlines()[-1] == "*"
    # timings of another training than the checkpoint's (one DVC restored from its cache)
    model = graph.model("theta_1")
    assert read_timings(root / model.timings, root / graph.model("theta_2").path) == {}


def test_sft_extra_baseline_matches_spin_steps(tracked):
    """The baseline trains θ0 for as many optimizer steps as all SPIN iterations together, is
    evaluated against θ0, has a report row and its own run."""
    client, root = tracked.client, tracked.root
    graph = build(tracked.params)
    baseline = graph.model("sft_extra")
    spin_steps = [
        json.loads((root / graph.theta(k + 1).train_metrics).read_text())["optimizer_steps"]
        for k in range(ITERATIONS)
    ]
    assert spin_steps == [2, 4]  # 8 pairs, then 16 (mixed with the previous iteration's), batch 4
    summary = json.loads((root / baseline.train_metrics).read_text())
    assert summary["optimizer_steps"] == sum(spin_steps)
    provenance = json.loads((root / baseline.path / "provenance.json").read_text())
    assert provenance["params"]["max_steps"] == sum(spin_steps)
    assert provenance["inputs"]["model"]["path"] == str(graph.theta(0).path)
    with open(root / baseline.steps_csv, newline="") as f:
        assert [int(float(r["step"])) for r in csv.DictReader(f)] == list(range(1, 7))

    evaluated = json.loads((root / graph.evaluation("sft_extra").metrics).read_text())
    assert evaluated["model"] == "sft_extra"
    assert {"reward_margin", "reward_accuracy", "exact_match"} <= set(evaluated)  # against θ0
    results = (root / "reports" / "results.md").read_text(encoding="utf-8")
    row = next(line for line in results.splitlines() if line.startswith("| SFT-extra"))
    assert f"{evaluated['exact_match']:.3f}" in row and f"{evaluated['reward_margin']:+.4f}" in row

    run = pipeline_runs(client, tracked.params)["sft_extra"]
    assert run.info.run_name == "sft_extra"
    assert steps_of(client, run.info.run_id, "train/loss") == list(range(1, sum(spin_steps) + 1))
    assert run.data.metrics["eval/exact_match"] == pytest.approx(evaluated["exact_match"])
    assert run.data.metrics["train_summary/optimizer_steps"] == sum(spin_steps)
    assert "spinflow.model_version" not in run.data.tags  # only SPIN iterations are registered
    parent = pipeline_runs(client, tracked.params)["pipeline"].info.run_id
    history = client.get_metric_history(parent, "sft_extra/reward_margin")
    assert [(m.step, m.value) for m in history] == [
        (ITERATIONS, pytest.approx(evaluated["reward_margin"]))
    ]


def test_report_metrics_are_in_the_pipeline_run(tracked):
    """The paired differences, the verdict and the per-iteration diagnostics the report wrote
    (metrics/comparisons.json, metrics/diagnostics.json) are charts of the pipeline run."""
    client, root = tracked.client, tracked.root
    parent = pipeline_runs(client, tracked.params)["pipeline"]
    compared = json.loads((root / "metrics" / "comparisons.json").read_text())
    diagnostics = json.loads((root / "metrics" / "diagnostics.json").read_text())
    for k in range(1, ITERATIONS + 1):
        for versus in ("vs_theta_0", "vs_sft_extra"):
            result = compared["differences"][f"theta_{k}"][versus]["exact_match"]
            for suffix, field in (("", "difference"), ("_low", "low"), ("_high", "high")):
                history = client.get_metric_history(
                    parent.info.run_id, f"paired/{versus}/exact_match{suffix}"
                )
                values = {m.step: m.value for m in history}
                assert values[k] == pytest.approx(result[field])
    for k in range(ITERATIONS):
        history = client.get_metric_history(
            parent.info.run_id, "diagnostics/training/reward_margin"
        )
        assert {m.step: m.value for m in history}[k] == pytest.approx(
            diagnostics[f"iter_{k}"]["training"]["reward_margin"]
        )
        held = diagnostics[f"iter_{k}"]["validation"]
        assert parent.data.metrics["diagnostics/validation/examples"] == held["examples"] == 4
    assert parent.data.metrics["verdict/chosen_step"] == compared["chosen"]["step"]
    sentence = parent.data.tags["spinflow.verdict.vs_sft_extra"]
    assert sentence == compared["verdict"]["vs_sft_extra"]["sentence"]
    assert sentence.startswith(f"SPIN (θ{compared['chosen']['step']}, chosen on validation)")
    # each iteration run has its validation scores beside the test ones
    run = pipeline_runs(client, tracked.params)["iter_0"]
    evaluated = json.loads((root / "metrics" / "eval_iter_0.json").read_text())
    assert run.data.metrics["eval/val/exact_match"] == pytest.approx(
        evaluated["validation"]["exact_match"]
    )


def test_samples_tables_and_report(tracked):
    client = tracked.client
    runs = pipeline_runs(client, tracked.params)
    run = runs["iter_1"]
    table = client.load_table(
        run.info.experiment_id, "samples/train_iter_1.json", run_ids=[run.info.run_id]
    )
    assert {"prompt", "real", "generated"} <= set(table.columns)
    assert len(table) == 8  # the whole (tiny) pool
    pairs = [json.loads(line) for line in (tracked.root / pairs_file(1)).open()]
    assert table["generated"].tolist() == [p["generated"] for p in pairs]
    evaluated = client.load_table(
        run.info.experiment_id, "samples/eval_iter_1.json", run_ids=[run.info.run_id]
    )
    assert len(evaluated) == 8
    report = {f.path for f in tracked.client.list_artifacts(runs["pipeline"].info.run_id, "report")}
    assert {
        "report/results.md",
        "report/metrics.png",
        "report/by_iteration.csv",
        "report/diagnostics.png",
    } <= report


def test_registry_versions_and_aliases(tracked):
    import mlflow

    client, params = tracked.client, tracked.params
    runs = pipeline_runs(client, params)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == ITERATIONS
    aliases = {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}
    assert set(aliases) == {"iter_0", "iter_1", "champion"}
    for k in range(ITERATIONS):
        version = client.get_model_version_by_alias(MODEL_NAME, f"iter_{k}")
        run = runs[f"iter_{k}"]
        assert version.run_id == run.info.run_id
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        assert logged.experiment_id == run.info.experiment_id
        assert version.tags["spinflow.model_hash"] == run.data.tags["spinflow.model_hash"]
        assert run.data.tags["spinflow.model_version"] == str(version.version)
    # chosen on the validation split, ties to the earlier iteration: the report's rule
    metric = f"eval/val/{params.tracking.champion_metric}"
    values = [runs[f"iter_{k}"].data.metrics[metric] for k in range(ITERATIONS)]
    best = min(k for k in range(ITERATIONS) if values[k] == max(values))
    assert aliases["champion"] == aliases[f"iter_{best}"]
    parent = runs["pipeline"].data.tags
    assert parent["spinflow.champion_iteration"] == str(best)
    chosen = json.loads((tracked.root / "metrics" / "comparisons.json").read_text())["chosen"]
    assert chosen["model"] == f"theta_{best + 1}" == parent["spinflow.chosen_model"]
    champion_uri = f"models:/{MODEL_NAME}@champion"
    folder = Path(mlflow.artifacts.download_artifacts(champion_uri, tracking_uri=tracked.uri))
    requirements = (folder / "requirements.txt").read_text()
    assert "transformers==" in requirements and "torchvision" not in requirements
    mlflow.set_tracking_uri(tracked.uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@iter_1")
    answer = model.predict(["Hello"], params={"max_new_tokens": 4})
    assert isinstance(answer[0], str)


def test_rerun_with_same_inputs_is_idempotent(tracked, monkeypatch):
    client, params = tracked.client, tracked.params
    monkeypatch.chdir(tracked.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)

    def snapshot():
        runs = pipeline_runs(client, params)
        aliases = {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}
        parent = runs["pipeline"].info.run_id
        return {
            "runs": {name: run.info.run_id for name, run in runs.items()},
            "versions": sorted(
                str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")
            ),
            "aliases": aliases,
            "train_loss": len(client.get_metric_history(runs["iter_1"].info.run_id, "train/loss")),
            "eval": len(client.get_metric_history(runs["iter_1"].info.run_id, "eval/exact_match")),
            "parent": steps_of(client, parent, "eval/exact_match"),
        }

    before = snapshot()
    execute(params, "train_iter_1", spin.train)
    execute(params, "eval_iter_1", evaluate.evaluate)
    execute(params, "report", report_stage)
    assert snapshot() == before


def test_new_pipeline_key_backfills_from_disk(tracked, monkeypatch):
    """A DVC experiment that changes an evaluation knob skips training; its runs still appear."""
    client = tracked.client
    monkeypatch.chdir(tracked.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    changed = tracked.params.model_copy(
        update={"eval": tracked.params.eval.model_copy(update={"batch_size": 5})}
    )
    assert tracking.pipeline_key(changed) != tracking.pipeline_key(tracked.params)
    versions = len(client.search_model_versions(f"name = '{MODEL_NAME}'"))
    tracking.sync(changed)
    runs = pipeline_runs(client, changed)
    assert set(runs) == {"pipeline", "baseline", "iter_0", "iter_1", "sft_extra"}
    assert steps_of(client, runs["pipeline"].info.run_id, "eval/exact_match") == [0, 1, 2]
    assert len(client.get_metric_history(runs["iter_0"].info.run_id, "train/loss")) > 0
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == versions  # reused


def test_changed_results_replace_runs_and_versions(tracked, monkeypatch):
    """A re-run that yields another θ2 replaces iter_1's run and version, leaving none behind.

    Logged into an experiment and registered model of its own, so the other tests' state stays.
    """
    monkeypatch.chdir(tracked.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    client, name = tracked.client, "spinflow-replaced"
    params = tracked.params.model_copy(
        update={
            "tracking": tracked.params.tracking.model_copy(
                update={"experiment": "spinflow-replaced", "registered_model": name}
            )
        }
    )
    log_stage(params, "train_iter_1")
    log_stage(params, "eval_iter_1")
    before = pipeline_runs(client, params)
    old_version = str(client.get_model_version_by_alias(name, "iter_1").version)
    config = tracked.root / build(params).theta(2).path / "config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))
        log_stage(params, "train_iter_1")
        log_stage(params, "eval_iter_1")
    finally:
        config.write_text(original)
    after = pipeline_runs(client, params)
    assert after["iter_1"].info.run_id != before["iter_1"].info.run_id
    assert client.get_run(before["iter_1"].info.run_id).info.lifecycle_stage == "deleted"
    assert after["iter_1"].data.tags["mlflow.parentRunId"] == after["pipeline"].info.run_id
    versions = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")]
    new_version = str(client.get_model_version_by_alias(name, "iter_1").version)
    assert versions == [new_version] and new_version != old_version
    assert str(client.get_registered_model(name).aliases["champion"]) == new_version
    # the evaluation did not change, so the pipeline run and its chart stay as they were
    assert after["pipeline"].info.run_id == before["pipeline"].info.run_id
    assert steps_of(client, after["pipeline"].info.run_id, "eval/exact_match") == [0, 1, 2]


def test_changed_evaluation_replaces_the_pipeline_run(tracked, monkeypatch):
    """Two values for one iteration never share a chart: the pipeline run is rebuilt instead."""
    monkeypatch.chdir(tracked.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    client = tracked.client
    params = tracked.params.model_copy(
        update={
            "tracking": tracked.params.tracking.model_copy(
                update={"experiment": "spinflow-rebuilt", "log_models": False}
            )
        }
    )
    tracking.sync(params)
    before = pipeline_runs(client, params)
    path = tracked.root / build(params).evaluation("iter_1").metrics
    original = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(original), "exact_match": 0.5}))
        log_stage(params, "eval_iter_1")
    finally:
        path.write_text(original)
    after = pipeline_runs(client, params)
    parent = after["pipeline"].info.run_id
    assert parent != before["pipeline"].info.run_id
    assert client.get_run(before["pipeline"].info.run_id).info.lifecycle_stage == "deleted"
    for name in ("baseline", "iter_0", "iter_1"):
        assert after[name].info.run_id == before[name].info.run_id
        assert after[name].data.tags["mlflow.parentRunId"] == parent
    history = client.get_metric_history(parent, "eval/exact_match")
    assert sorted((m.step, m.value) for m in history)[-1] == (2, 0.5)
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_lora_adapter_config_names_its_base(tracked, monkeypatch):
    monkeypatch.chdir(tracked.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    client, name = tracked.client, "spinflow-lora"
    train = tracked.params.spin.train
    params = tracked.params.model_copy(
        update={
            "spin": tracked.params.spin.model_copy(
                update={
                    "train": train.model_copy(
                        update={"lora": train.lora.model_copy(update={"enabled": True, "r": 4})}
                    )
                }
            ),
            "tracking": tracked.params.tracking.model_copy(
                update={"experiment": "spinflow-lora", "registered_model": name}
            ),
        }
    )
    log_stage(params, "train_iter_0")
    log_stage(params, "train_iter_1")
    runs = pipeline_runs(client, params)
    first = client.get_model_version_by_alias(name, "iter_0")
    adapter = mlflow_dict(client, runs["iter_1"].info.run_id, "lora/adapter_config.json")
    assert adapter["r"] == 4 and adapter["merged"] is True
    assert adapter["base_model_name_or_path"] == f"models:/{name}/{first.version}"
    assert adapter["base_model_hash"] == first.tags["spinflow.model_hash"]
    assert runs["iter_1"].data.tags["spinflow.lora.base"] == f"models:/{name}/{first.version}"
    base = mlflow_dict(client, runs["iter_0"].info.run_id, "lora/adapter_config.json")
    assert base["base_model_name_or_path"] == str(build(params).theta(0).path)


def mlflow_dict(client, run_id: str, path: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path)).read_text())


def test_experiment_is_filed_as_model_training(tracked, monkeypatch):
    """MLflow 3's UI opens an experiment without ``mlflow.experimentKind`` as GenAI."""
    monkeypatch.chdir(tracked.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    client = tracked.client
    created = client.get_experiment_by_name(tracked.params.tracking.experiment)
    assert created.tags["mlflow.experimentKind"] == "finetuning"
    location = tracking.artifact_location(tracked.uri)
    for name, tags, kind in (
        ("spinflow-untagged", {}, "finetuning"),  # made before the tag existed: tagged now
        ("spinflow-chosen", {"mlflow.experimentKind": "custom_model_development"}, None),
    ):
        client.create_experiment(name, artifact_location=location, tags=tags)
        params = tracked.params.model_copy(
            update={
                "tracking": tracked.params.tracking.model_copy(
                    update={"experiment": name, "log_models": False}
                )
            }
        )
        log_stage(params, "eval_sft")
        experiment = client.get_experiment_by_name(name)
        assert experiment.tags["mlflow.experimentKind"] == (kind or tags["mlflow.experimentKind"])
        assert set(pipeline_runs(client, params)) == {"pipeline", "baseline"}


def test_tracking_knows_nothing_of_recipes():
    """The library below the recipes: tracking reads the graph, never a recipe or the runner."""
    package = Path(tracking.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {p.stem for p in modules} >= {"__init__", "store", "lineage", "runs", "registry"}
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                assert not name.startswith(("spinflow.recipes", "spinflow.runner")), (path, name)


def test_samples_tables_are_capped_in_bytes():
    """A huge answer (here 2 MB of two-byte characters) is cut with a marker; rows stop at the
    table's size, as stored."""
    import pandas as pd

    from spinflow.tracking.runs import CELL_BYTES, TABLE_BYTES, sample_table, stored_size

    huge = "é" * 1_000_000
    long = "x/" * 20_000
    rows = [
        {"prompt": "2 + 2?", "real": "4", "generated": huge, "task": "addition"},
        *({"prompt": long, "real": long, "generated": long, "task": "t"} for _ in range(200)),
    ]
    table = sample_table(rows)
    assert table["prompt"][0] == "2 + 2?" and table["real"][0] == "4"
    assert table["generated"][0].startswith("éé")
    assert table["generated"][0].endswith("[… cut: 1000000 characters in all]")
    assert all(stored_size(cell) <= CELL_BYTES for column in table.values() for cell in column)
    assert 1 < len(table["prompt"]) < len(rows)
    stored = pd.DataFrame(table).to_json(orient="split", index=False)  # as log_table writes it
    assert TABLE_BYTES / 2 < len(stored.encode()) <= TABLE_BYTES + 1024
    small = [{"prompt": "p", "real": "r", "generated": "g"}]
    assert sample_table(small) == {"prompt": ["p"], "real": ["r"], "generated": ["g"], "task": [""]}


def test_a_rerun_that_skips_the_report_leaves_no_pipeline_run_running(tracked, monkeypatch):
    """Another generate.batch_size: the generated folders' provenance changes, not their pairs,
    so DVC re-runs generate_iter_k and train_iter_k (the same checkpoints come out) and skips
    every other stage, the report included. The new pipeline's run is not left RUNNING; sync
    attaches the report to it."""
    client, params = tracked.client, tracked.params
    monkeypatch.chdir(tracked.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    generation = params.generate.model_copy(update={"batch_size": 3})
    changed = params.model_copy(update={"generate": generation})
    try:
        for k in range(ITERATIONS):
            execute(changed, f"generate_iter_{k}", generate.generate)
            execute(changed, f"train_iter_{k}", spin.train)
        runs = pipeline_runs(client, changed)
        assert {name: run.info.status for name, run in runs.items()} == {
            "pipeline": "FINISHED",
            "iter_0": "FINISHED",
            "iter_1": "FINISHED",
        }
        parent = runs["pipeline"].info.run_id
        assert not client.list_artifacts(parent, "report")
        tracking.sync(changed)
        runs = pipeline_runs(client, changed)
        assert runs["pipeline"].info.run_id == parent
        assert runs["pipeline"].info.status == "FINISHED"
        assert "report/results.md" in {f.path for f in client.list_artifacts(parent, "report")}
    finally:
        for k in range(ITERATIONS):
            execute(params, f"generate_iter_{k}", generate.generate)


def test_the_champion_rule_is_best_on_validation_ties_to_the_earlier():
    from spinflow.report import choose_iteration
    from spinflow.tracking.runs import eval_scalars

    assert choose_iteration({0: 0.5, 1: 0.75, 2: 0.75}, "max") == 1
    assert choose_iteration({2: 0.75, 1: 0.75, 0: 0.5}, "max") == 1  # by k, not by order
    assert choose_iteration({0: 0.5, 1: 0.25, 2: 0.25}, "min") == 1
    assert choose_iteration({0: None, 1: float("nan"), 2: 0.1}, "max") == 2
    assert choose_iteration({0: None}, "max") is None
    # what the rule reads: the validation split's metrics, logged as eval/val/<metric>
    scalars = eval_scalars({"exact_match": 0.25, "validation": {"exact_match": 0.5, "n": 4}})
    assert scalars == {"exact_match": 0.25, "val/exact_match": 0.5, "val/n": 4.0}

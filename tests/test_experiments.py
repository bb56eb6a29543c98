"""Hyper-parameter sweeps with DVC experiments on the tiny pipeline.

``dvc exp run -S spin.beta=0.2`` re-runs only what β reaches (training, its evaluation, the
report); ``dvc exp show`` lists the experiment with its evaluation metrics; a teammate gets it
with ``dvc exp pull`` and ``dvc exp apply`` without running anything.
"""

from __future__ import annotations

import json
import numbers

import pytest
import yaml

pytestmark = pytest.mark.slow

EXPERIMENT = "beta-0.2"
EVAL_METRICS = "metrics/eval_iter_0.json"
EVAL_KEYS = ("answer_logprob_per_token", "exact_match", "verifier_pass_rate", "reward_margin")


def _rows(node):
    """(name, rev, data) of every row in ``dvc exp show --json``: workspace, baseline and each
    experiment, however deeply the experiments are nested."""
    if isinstance(node, list):
        for item in node:
            yield from _rows(item)
    elif isinstance(node, dict):
        data = node.get("data")
        if "rev" in node and isinstance(data, dict) and ("metrics" in data or "params" in data):
            yield node.get("name"), node["rev"], data
        for key in ("experiments", "revs"):
            yield from _rows(node.get(key) or [])


def _file(data: dict, section: str, path: str) -> dict:
    entry = (data.get(section) or {}).get(path) or {}
    assert "data" in entry, f"{section} of {path} missing: {json.dumps(data)[:2000]}"
    return entry["data"]


def _show(repo) -> dict[str, tuple[str, dict]]:
    """Rows of ``dvc exp show --json`` by name (the baseline under its commit sha too)."""
    rows = {}
    for name, rev, data in _rows(json.loads(repo.run("dvc", "exp", "show", "--json"))):
        rows[rev] = (rev, data)
        if name:
            rows[name] = (rev, data)
    return rows


@pytest.fixture(scope="module")
def sweep(tiny_dvc_repo, tmp_path_factory):
    """A copy of the tiny repository with a Git and a DVC remote, pushed, then
    ``dvc exp run -S spin.beta=0.2``. Returns the repository, the run's output and the Git hub."""
    base = tmp_path_factory.mktemp("experiments")
    hub = base / "hub.git"
    repo = tiny_dvc_repo.copy(base / "E")
    repo.run("git", "init", "-q", "--bare", str(hub))
    repo.run("git", "remote", "add", "origin", str(hub))
    repo.run("dvc", "remote", "add", "-d", "storage", str(base / "storage"))
    (repo.root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n", encoding="utf-8")
    repo.run("git", "add", ".gitignore")
    repo.run("git", "commit", "-q", "-am", "DVC remote")
    repo.run("git", "push", "-q", "origin", "HEAD")
    repo.run("dvc", "push")
    # with tracking on: the stages that re-run log to MLflow from inside `dvc exp run`
    sweep = ("-S", "spin.beta=0.2", "-S", "tracking.enabled=true")
    output = repo.run("dvc", "exp", "run", "-n", EXPERIMENT, *sweep, timeout=600)
    return repo, output, hub


def test_exp_run_reruns_only_what_beta_reaches(sweep):
    repo, output, _ = sweep
    ran = repo.ran(output)
    assert {"train_iter_0", "eval_iter_0"} <= ran, output
    assert not ran & {"prepare_model", "prepare_data", "sft", "eval_sft", "generate_iter_0"}


def _tracked(repo):
    """The MLflow store at the repository root: client, this pipeline's runs, model versions."""
    from mlflow import MlflowClient

    from spinflow.config import load_params
    from spinflow.tracking import pipeline_key

    params = load_params(repo.root / "params.yaml")
    client = MlflowClient(f"sqlite:///{repo.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`spinflow.pipeline_key` = '{pipeline_key(params)}'",
        max_results=100,
    )
    versions = client.search_model_versions(f"name = '{params.tracking.registered_model}'")
    return client, runs, versions


def test_exp_run_tracks_into_the_repository_store_with_dvc_lock_hashes(sweep):
    repo, _, _ = sweep
    assert (repo.root / "mlflow.db").is_file()
    stray = [p for p in (repo.root / ".dvc").rglob("*") if p.name in ("mlflow.db", "mlartifacts")]
    assert not stray, stray  # nothing in DVC's temporary experiment workspaces
    _, runs, versions = _tracked(repo)
    by_role = {}
    for run in runs:
        role = run.data.tags["spinflow.role"]
        assert role not in by_role, f"two active {role} runs"
        by_role[role] = run
    assert set(by_role) == {"pipeline", "baseline", "iteration"}
    assert len(versions) == 1
    assert by_role["pipeline"].data.tags["dvc.exp_name"] == EXPERIMENT
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    tagged = 0
    for role, stages in (("iteration", ("train_iter_0", "eval_iter_0")), ("baseline", ("sft",))):
        tags = by_role[role].data.tags
        for stage in stages:
            for dep in lock[stage]["deps"]:
                assert tags[f"stage.{stage}.dvc_lock.{dep['path']}"] == dep["md5"], (stage, dep)
                tagged += 1
    assert tagged > 10


def test_rerunning_tracked_stages_adds_no_run_or_version(sweep):
    repo, _, _ = sweep
    _, runs, versions = _tracked(repo)
    before = (sorted(r.info.run_id for r in runs), sorted(v.version for v in versions))
    output = repo.run("dvc", "repro", "--force", "--single-item", "train_iter_0", "eval_iter_0")
    assert repo.ran(output) == {"train_iter_0", "eval_iter_0"}, output
    _, runs, versions = _tracked(repo)
    assert (sorted(r.info.run_id for r in runs), sorted(v.version for v in versions)) == before


def test_exp_show_lists_the_experiment_with_its_eval_metrics(sweep):
    repo, _, _ = sweep
    rows = _show(repo)
    assert EXPERIMENT in rows, sorted(rows)
    rev, data = rows[EXPERIMENT]
    assert _file(data, "params", "params.yaml")["spin"]["beta"] == 0.2
    metrics = _file(data, "metrics", EVAL_METRICS)
    committed = json.loads(repo.run("git", "show", f"{rev}:{EVAL_METRICS}"))
    assert json.loads((repo.root / EVAL_METRICS).read_text()) == committed  # applied
    for key in EVAL_KEYS:
        value = metrics[key]
        assert isinstance(value, numbers.Real) and not isinstance(value, bool), (key, value)
        assert value == committed[key], key

    head = repo.run("git", "rev-parse", "HEAD").strip()
    _, baseline = rows[head]
    assert _file(baseline, "params", "params.yaml")["spin"]["beta"] == 0.1
    baseline_metrics = _file(baseline, "metrics", EVAL_METRICS)
    assert baseline_metrics == json.loads(repo.run("git", "show", f"HEAD:{EVAL_METRICS}"))
    # β scales the reward margin, and θ1 was trained with the other β
    assert baseline_metrics["reward_margin"] != metrics["reward_margin"]

    table = repo.run("dvc", "exp", "show", "--only-changed", "--md")
    assert EXPERIMENT in table and "spin.beta" in table and "reward_margin" in table, table


def test_a_teammate_pulls_the_experiment_without_running_it(sweep, tmp_path):
    repo, _, hub = sweep
    repo.run("dvc", "exp", "push", "origin", EXPERIMENT)
    teammate = type(repo)(hub, dict(repo.env)).clone(tmp_path / "F")
    teammate.run("dvc", "exp", "pull", "origin", EXPERIMENT)

    rows = _show(teammate)
    assert EXPERIMENT in rows, sorted(rows)
    assert _file(rows[EXPERIMENT][1], "metrics", EVAL_METRICS) == repo.json(EVAL_METRICS)

    teammate.run("dvc", "exp", "apply", EXPERIMENT)
    teammate.run("dvc", "pull")
    status = teammate.run("dvc", "status")
    assert "Data and pipelines are up to date" in status, status
    assert teammate.json(EVAL_METRICS) == repo.json(EVAL_METRICS)
    assert teammate.output_digests() == repo.output_digests()

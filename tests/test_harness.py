"""Tests for spinflow.harness: lm-evaluation-harness tasks on the tiny model, offline.

The benchmark is a multiple-choice task defined here on a local JSONL file; its metrics are
checked against log-likelihoods computed directly from the model's logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from spinflow.config import LmEvalParams, validate_params
from spinflow.errors import ConfigError, DataError

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (spinflow[lmeval])")

from spinflow import harness  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TASK = "spinflow_colors"
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "dark red"]),
    ("Grass is usually", ["purple", "green", "black"]),
    ("Fresh snow is", ["white", "orange", "brown"]),
    ("A ripe banana is", ["blue", "grey", "bright yellow"]),
    ("Coal is", ["black", "pink", "white"]),
    ("A tomato is", ["sky blue", "red", "silver"]),
]


def continuation_logps(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" choice" | context), summed over the choice's tokens, from the full logits."""
    context_ids = tokenizer.encode(context)
    scores = []
    for choice in choices:
        ids = tokenizer.encode(f"{context} {choice}")
        assert ids[: len(context_ids)] == context_ids
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
        scores.append(sum(logps[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids))))
    return scores


def write_task(folder: Path, root: Path, labels: list[int], name: str = TASK) -> Path:
    """A multiple-choice harness task over a JSONL file in ``folder`` (data path from ``root``,
    where the harness runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "label": label}) + "\n"
            for (q, c), label in zip(QUESTIONS, labels, strict=True)
        ),
        encoding="utf-8",
    )
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.relative_to(root))}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in ("acc", "acc_norm")
        ],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return folder


def expected_metrics(model, tokenizer) -> tuple[list[int], dict[str, float]]:
    """Labels that the model gets right on the first half only, and the metrics they give."""
    labels, correct, correct_norm = [], [], []
    for i, (question, choices) in enumerate(QUESTIONS):
        scores = continuation_logps(model, tokenizer, question, choices)
        best = max(range(len(choices)), key=scores.__getitem__)
        worst = min(range(len(choices)), key=scores.__getitem__)
        label = best if i < len(QUESTIONS) // 2 else worst
        best_norm = max(range(len(choices)), key=lambda j: scores[j] / len(choices[j]))
        labels.append(label)
        correct.append(float(best == label))
        correct_norm.append(float(best_norm == label))

    def mean_stderr(values: list[float]) -> float:
        mean = sum(values) / len(values)
        variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return math.sqrt(variance / len(values))

    return labels, {
        "acc": sum(correct) / len(correct),
        "acc_stderr": mean_stderr(correct),
        "acc_norm": sum(correct_norm) / len(correct_norm),
        "acc_norm_stderr": mean_stderr(correct_norm),
    }


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and a datasets cache of this test's own."""
    import datasets
    import huggingface_hub

    for name in harness.OFFLINE_VARIABLES:
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_local_task_metrics_equal_direct_loglikelihoods(
    offline, tiny_model_session, tiny_tokenizer_session
):
    labels, expected = expected_metrics(tiny_model_session, tiny_tokenizer_session)
    assert expected["acc"] == 0.5  # the labels make half of the answers right
    write_task(offline / "bench", offline, labels)
    settings = LmEvalParams(tasks=[TASK], include_path="bench", batch_size=4)

    summary = harness.run(tiny_model_session, tiny_tokenizer_session, harness.prepare(settings))

    assert summary["results"][TASK] == pytest.approx(expected, rel=1e-9)
    assert summary["samples"][TASK] == {"original": 6, "effective": 6}
    assert summary["num_fewshot"][TASK] == 0
    assert harness.headline(summary) == {TASK: summary["results"][TASK]}
    json.dumps(summary)  # what the evaluation folder gets is plain JSON


def test_groups_report_their_aggregate_and_fewshot_applies(
    offline, tiny_model_session, tiny_tokenizer_session
):
    bench = offline / "bench"
    write_task(bench, offline, [0] * 6, name="colors_a")
    write_task(bench, offline, [1] * 6, name="colors_b")
    group = {
        "group": "colors",
        "task": ["colors_a", "colors_b"],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
    }
    (bench / "colors.yaml").write_text(yaml.safe_dump(group), encoding="utf-8")
    settings = LmEvalParams(
        tasks=["colors"], include_path="bench", num_fewshot={"colors": 2}, limit=3
    )

    summary = harness.run(tiny_model_session, tiny_tokenizer_session, harness.prepare(settings))

    a, b = summary["results"]["colors_a"]["acc"], summary["results"]["colors_b"]["acc"]
    assert summary["results"]["colors"]["acc"] == pytest.approx((a + b) / 2)
    assert set(harness.headline(summary)) == {"colors"}  # the members stay in the results file
    assert summary["num_fewshot"]["colors_a"] == 2 and summary["num_fewshot"]["colors_b"] == 2
    assert summary["samples"]["colors_a"]["effective"] == 3  # limit


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> str:
    """A folder with the local task, shared so that the harness's index of its own tasks (some
    seconds) is built once for the name checks below."""
    root = tmp_path_factory.mktemp("local-tasks")
    return str(write_task(root / "bench", root, [0] * 6))


def test_unknown_task_is_one_line_naming_key_and_task(local_tasks):
    settings = LmEvalParams(tasks=[TASK, "arc_challange"], include_path=local_tasks)
    with pytest.raises(ConfigError) as err:
        harness.check_tasks(settings)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("eval.lm_eval.tasks: unknown task 'arc_challange'")
    assert "arc_challenge" in message  # the close match the harness knows
    # the harness's own tasks and the local one are known (no data is loaded to check a name)
    harness.check_tasks(
        LmEvalParams(tasks=["arc_challenge", "gsm8k", "mmlu", TASK], include_path=local_tasks)
    )


def test_validate_params_checks_the_task_names(local_tasks, tmp_path, monkeypatch):
    from spinflow.validation import check_references

    monkeypatch.chdir(tmp_path)
    unknown = {"tasks": [TASK, "no_such_benchmark"], "include_path": local_tasks}
    with pytest.raises(ConfigError, match=r"^eval\.lm_eval\.tasks: unknown task 'no_such_bench"):
        check_references(validate_params({"eval": {"lm_eval": unknown}}))
    missing = validate_params({"eval": {"lm_eval": {"tasks": ["x"], "include_path": "nope"}}})
    with pytest.raises(ConfigError, match=r"^eval\.lm_eval\.include_path: nope: directory not"):
        check_references(missing)
    check_references(validate_params({}))  # off by default: nothing of the harness is read


def test_a_hub_task_offline_fails_with_one_line(offline):
    bench = offline / "bench"
    bench.mkdir()
    config = {
        "task": "hub_only",
        "dataset_path": "spinflow-tests/not-cached",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
    }
    (bench / "hub_only.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(DataError) as err:
        harness.prepare(LmEvalParams(tasks=["hub_only"], include_path="bench"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("eval.lm_eval.tasks: hub_only: its data could not be loaded")
    assert "spinflow-tests/not-cached" in message and "offline" in message


@pytest.mark.parametrize(
    ("lm_eval", "expected"),
    [
        ({"tasks": ["a", "a"]}, "task 'a' is listed twice"),
        ({"tasks": ["a"], "num_fewshot": {"b": 5}}, "num_fewshot names 'b', which is not in"),
        ({"num_fewshot": -1}, "must be an integer ≥ 0, a mapping"),
        ({"batch_size": "big"}, "'eval.lm_eval.batch_size' = 'big': must be an integer > 0 or"),
        ({"device": "gpu"}, "must be auto, cpu, cuda, cuda:<index> or mps"),
        ({"task": ["a"]}, "unknown key 'eval.lm_eval.task'"),
    ],
)
def test_schema_refuses_bad_settings(lm_eval, expected):
    with pytest.raises(ConfigError, match="^params.yaml: ") as err:
        validate_params({"eval": {"lm_eval": lm_eval}})
    assert expected in str(err.value)


def test_report_table_shows_value_and_stderr_per_model():
    from spinflow.report import benchmark_table

    rows = [
        {
            "label": "θ0",
            "lm_eval": {
                "gsm8k": {
                    "exact_match/strict-match": 0.25,
                    "exact_match_stderr/strict-match": 0.0125,
                }
            },
        },
        {"label": "θ1", "lm_eval": {"gsm8k": {"exact_match/strict-match": 0.5}}},
        {"label": "SFT-extra"},
    ]
    assert benchmark_table(rows).splitlines() == [
        "| task | metric | θ0 | θ1 | SFT-extra |",
        "|---|---|---:|---:|---:|",
        "| gsm8k | exact_match/strict-match | 0.2500 ± 0.0125 | 0.5000 | – |",
    ]
    assert benchmark_table([{"label": "θ0"}]) == ""  # off: no section


def test_metric_names_keep_the_filter_and_drop_what_is_not_a_number():
    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": "N/A",
            }
        },
        "n-shot": {"gsm8k": 5},
    }
    summary = harness.summarize(results)
    assert summary["results"] == {
        "gsm8k": {
            "exact_match/strict-match": 0.25,
            "exact_match_stderr/strict-match": 0.01,
            "exact_match/flexible-extract": 0.5,
        }
    }
    from spinflow.tracking.runs import eval_scalars

    scalars = eval_scalars({"exact_match": 0.1, "lm_eval": harness.headline(summary)})
    assert scalars["lm_eval/gsm8k/exact_match/strict-match"] == 0.25
    assert scalars["exact_match"] == 0.1


@pytest.mark.slow
def test_eval_stage_writes_and_logs_the_benchmark(tiny_dvc_repo, tmp_path):
    """The shared tiny pipeline with a local harness task: eval_sft runs it on θ0 under DVC,
    writes lm_eval.json and the metrics, logs them to MLflow; the task's folder is its input."""
    from mlflow.tracking import MlflowClient

    from spinflow.models import load_model, load_tokenizer

    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    theta_0 = repo.root / "models" / "theta_0"
    labels, expected = expected_metrics(load_model(theta_0).eval(), load_tokenizer(theta_0))
    write_task(repo.root / "bench", repo.root, labels)
    params = repo.root / "params.yaml"
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["eval"]["lm_eval"].update(tasks=[TASK], include_path="bench", batch_size=4)
    raw["tracking"].update(enabled=True, log_models=False)
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    repo.run("spinflow", "pipeline", "write")
    stage = yaml.safe_load((repo.root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert "bench" in stage["eval_sft"]["deps"] and "eval" in stage["eval_sft"]["params"]

    cache = {"HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    ran = repo.ran(repo.run("dvc", "repro", "eval_sft", env=cache))
    assert ran == {"eval_sft"}, f"ran {sorted(ran)}"

    metrics = repo.json("metrics/eval_sft.json")
    assert metrics["lm_eval"][TASK] == pytest.approx(expected, rel=1e-6)
    assert "exact_match" in metrics  # beside the built-in metrics
    written = repo.json(f"eval/sft/{harness.RESULTS_FILE}")
    assert written["results"][TASK] == metrics["lm_eval"][TASK]
    assert written["samples"][TASK]["effective"] == len(QUESTIONS)
    assert repo.json("eval/sft/provenance.json")["inputs"]["lm_eval_tasks"]["path"] == "bench"

    client = MlflowClient(tracking_uri=f"sqlite:///{repo.root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id],
        filter_string="attributes.run_name = 'theta_0 (sft)'",
    )
    assert len(runs) == 1
    logged = runs[0].data.metrics
    assert logged[f"eval/lm_eval/{TASK}/acc"] == pytest.approx(expected["acc"])
    assert logged[f"eval/lm_eval/{TASK}/acc_norm_stderr"] == pytest.approx(
        expected["acc_norm_stderr"]
    )

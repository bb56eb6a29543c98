"""Tests for spinflow.report: the table, the DVC plot and the chart from hand-made metrics."""

from __future__ import annotations

import csv
import json

import pytest

from spinflow.config import validate_params
from spinflow.graph import REPORT_DIR, build
from spinflow.io import write_jsonl
from spinflow.report import bootstrap_interval, collect, write_report

TEST = [
    {
        "id": "t0",
        "task": "addition",
        "answer": "7",
        "verifier": {"name": "equals", "args": {"answer": "7"}},
    },
    {
        "id": "t1",
        "task": "addition",
        "answer": "9",
        "verifier": {"name": "equals", "args": {"answer": "9"}},
    },
    {"id": "t2", "task": "chat", "answer": "hello there"},
    {"id": "t3", "task": "chat", "answer": "bye"},
]
# greedy answers per evaluation, by test id (the rows are written in another order on purpose)
ANSWERS = {
    "sft": {"t0": "7", "t1": "8", "t2": "hello there", "t3": "no"},
    "iter_0": {"t0": "7", "t1": "9", "t2": "hello there", "t3": "bye"},
    "iter_1": {"t0": "1", "t1": "2", "t2": "x", "t3": "y"},
    "sft_extra": {"t0": "7", "t1": "9", "t2": "nope", "t3": "bye"},
}

METRICS = {
    "sft": {
        "model": "sft",
        "verifier_pass_rate": 0.25,
        "exact_match": 0.125,
        "answer_logprob_per_token": -2.5,
        "answer_length": 6.0,
        "per_task_pass_rate": {"addition": 0.5, "no_commas": 0.0},
    },
    "iter_0": {
        "model": "iter_0",
        "verifier_pass_rate": 0.5,
        "exact_match": 0.25,
        "answer_logprob_per_token": -2.0,
        "reward_margin": 0.0123,
        "reward_accuracy": 0.75,
        "answer_length": 5.5,
        "per_task_pass_rate": {"addition": 1.0, "no_commas": 0.0},
    },
    "iter_1": {
        "model": "iter_1",
        "verifier_pass_rate": None,  # data without verifiers
        "exact_match": 0.375,
        "answer_logprob_per_token": -1.75,
        "reward_margin": -0.5,
        "reward_accuracy": 0.25,
        "answer_length": 4.25,
        "per_task_pass_rate": {},
    },
    "sft_extra": {
        "model": "sft_extra",
        "verifier_pass_rate": 0.375,
        "exact_match": 0.5,
        "answer_logprob_per_token": -1.5,
        "reward_margin": 0.25,
        "reward_accuracy": 1.0,
        "answer_length": 7.0,
        "per_task_pass_rate": {"addition": 0.75},
    },
}


@pytest.fixture
def report(tmp_path, monkeypatch):
    """The graph of a two-iteration pipeline with the baseline, its metrics written by hand in
    a temporary project directory, and the report written there."""
    monkeypatch.chdir(tmp_path)
    graph = build(
        validate_params(
            {"spin": {"iterations": 2}, "sft_extra": {"enabled": True, "compute": False}}
        )
    )
    for name, metrics in METRICS.items():
        path = graph.evaluation(name).metrics
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics), encoding="utf-8")
        rows = [{"id": i, "generated": a} for i, a in sorted(ANSWERS[name].items(), reverse=True)]
        write_jsonl(graph.evaluation(name).generations, rows)
    write_jsonl("data/prepared/test.jsonl", TEST)
    result = write_report(graph)
    return graph, result


def test_collect_orders_the_chain_then_the_baseline(report):
    graph, result = report
    rows = collect(graph)
    assert result == {"rows": 4}
    assert [(r["label"], r["iteration"]) for r in rows] == [
        ("θ0 (SFT)", 0),
        ("θ1 (SPIN iter 0)", 1),
        ("θ2 (SPIN iter 1)", 2),
        ("SFT-extra (same steps)", None),
    ]
    assert [r["model"] for r in rows] == ["sft", "iter_0", "iter_1", "sft_extra"]


def test_markdown_tables(report):
    text = (REPORT_DIR / "results.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    # the introduction names the baseline this pipeline has, and only that one
    assert lines[2] == (
        "Held-out test split; θ0 is the SFT model, θk+1 the result of SPIN iteration k. The "
        "SFT-extra baseline keeps training θ0 with plain SFT on the same SFT data, for as many "
        "optimizer steps as all SPIN iterations together (same steps)."
    )
    header = (
        "| model | verifier pass rate | exact match | log-lik / token | reward margin "
        "| reward acc. | answer length |"
    )
    start = lines.index(header)
    assert lines[start + 1] == "|---|---:|---:|---:|---:|---:|---:|"
    assert lines[start + 2 : start + 6] == [
        "| θ0 (SFT) | 0.250 | 0.125 | -2.5000 | – | – | 6.0 |",
        "| θ1 (SPIN iter 0) | 0.500 | 0.250 | -2.0000 | +0.0123 | 0.750 | 5.5 |",
        "| θ2 (SPIN iter 1) | – | 0.375 | -1.7500 | -0.5000 | 0.250 | 4.2 |",
        "| SFT-extra (same steps) | 0.375 | 0.500 | -1.5000 | +0.2500 | 1.000 | 7.0 |",
    ]
    assert lines[start + 6] == ""
    per_task = lines.index("## Verifier pass rate per task")
    assert lines[per_task + 2 : per_task + 6] == [
        "| task | θ0 (SFT) | θ1 (SPIN iter 0) | θ2 (SPIN iter 1) | SFT-extra (same steps) |",
        "|---|---:|---:|---:|---:|",
        "| addition | 0.50 | 1.00 | – | 0.75 |",
        "| no_commas | 0.00 | 0.00 | – | – |",
    ]


def test_csv_holds_the_chain_for_dvc_plots(report):
    with open(REPORT_DIR / "by_iteration.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "iteration",
        "verifier_pass_rate",
        "exact_match",
        "answer_logprob_per_token",
        "reward_margin",
        "reward_accuracy",
        "answer_length",
    ]
    assert rows[1:] == [  # the baseline is off the chain: not a point of this plot
        ["0", "0.25", "0.125", "-2.5", "", "", "6.0"],
        ["1", "0.5", "0.25", "-2.0", "0.0123", "0.75", "5.5"],
        ["2", "", "0.375", "-1.75", "-0.5", "0.25", "4.25"],
    ]


def test_chart_is_a_png(report):
    data = (REPORT_DIR / "metrics.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # three panels drawn, not an empty canvas
    # written atomically: no temporary file is left beside the three
    assert sorted(p.name for p in REPORT_DIR.iterdir()) == [
        "by_iteration.csv",
        "metrics.png",
        "results.md",
    ]


def test_bootstrap_intervals_per_model(report):
    lines = (REPORT_DIR / "results.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("## 95% bootstrap intervals (4 test examples, 2000 resamples)")
    assert lines[start + 2 : start + 4] == [
        "| model | verifier pass rate [95% CI] | exact match [95% CI] |",
        "|---|---:|---:|",
    ]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[start + 4 : start + 8]}
    # every answer right: no spread; every answer wrong: none either
    assert rows["θ1 (SPIN iter 0)"] == (
        "| θ1 (SPIN iter 0) | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |"
    )
    assert rows["θ2 (SPIN iter 1)"] == (
        "| θ2 (SPIN iter 1) | 0.000 [0.000, 0.000] | 0.000 [0.000, 0.000] |"
    )
    # θ0: one of two verified answers passes, two of four match exactly
    assert rows["θ0 (SFT)"].startswith("| θ0 (SFT) | 0.500 [0.000, 1.000] | 0.500 [")


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_interval(values)
    assert low < 0.3 < high
    assert 0.18 < low < 0.24 and 0.36 < high < 0.42  # ±1.96·sqrt(0.21/100) ≈ ±0.09
    assert bootstrap_interval(values) == (low, high)
    assert bootstrap_interval([0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_interval([])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"model": "sft", "exact_', "not valid JSON (Unterminated string starting at line 1"),
        ("", "not valid JSON (Expecting value at line 1, column 1; the file is damaged)"),
        ("[0.25]", "holds JSON list, not an object (the file is damaged)"),
    ],
)
def test_a_damaged_metrics_file_names_itself_and_its_stage(
    report, tmp_path, monkeypatch, capsys, text, problem
):
    import yaml

    from spinflow.recipes.evaluate import report as report_stage
    from spinflow.runner import run_stage

    graph, _ = report
    monkeypatch.delenv("DVC_ROOT", raising=False)
    raw = {
        "spin": {"iterations": 2},
        "sft_extra": {"enabled": True, "compute": False},
        "tracking": {"enabled": False},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    graph.evaluation("sft").metrics.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit):
        run_stage("report", report_stage, ["report"])
    error = capsys.readouterr().err
    assert error.startswith(f"error: report: metrics/eval_sft.json: {problem}"), error
    assert "it is an output of stage 'eval_sft'" in error
    assert "`dvc repro --force --single-item eval_sft`" in error and error.count("\n") == 1

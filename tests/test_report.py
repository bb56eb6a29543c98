"""Tests for spinflow.report: the table, the DVC plot and the chart from hand-made metrics."""

from __future__ import annotations

import csv
import json

import pytest

from spinflow.config import validate_params
from spinflow.graph import build
from spinflow.io import read_json, write_json, write_jsonl
from spinflow.methods.spin.graph import COMPARISONS, DIAGNOSTICS, pairs_file
from spinflow.methods.spin.report import (
    DISTINGUISHABLE,
    INDISTINGUISHABLE,
    REVERSED,
    TRAINING_ONLY,
    paired_interval,
    status,
    verdict,
)
from spinflow.nodes import REPORT_DIR
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


# the validation split: two verified examples; answers per evaluation, and each model's
# validation verifier pass rate (θ1 and θ2 tie: the rule keeps the earlier, θ1)
VALIDATION = [
    {
        "id": "v0",
        "task": "addition",
        "prompt": "3+4",
        "answer": "7",
        "verifier": TEST[0]["verifier"],
    },
    {
        "id": "v1",
        "task": "addition",
        "prompt": "4+5",
        "answer": "9",
        "verifier": TEST[1]["verifier"],
    },
]
VALIDATION_ANSWERS = {
    "sft": {"v0": "7", "v1": "1"},
    "iter_0": {"v0": "7", "v1": "9"},
    "iter_1": {"v0": "7", "v1": "9"},
    "sft_extra": {"v0": "7", "v1": "9"},
}
# per example: summed log-prob of the real answer and its tokens; tokens of the greedy answer
LOGPS = {
    "sft": [(-6.0, 3), (-8.0, 4), (-4.0, 2), (-2.0, 1)],
    "iter_0": [(-5.0, 3), (-7.0, 4), (-4.0, 2), (-1.0, 1)],
    "iter_1": [(-5.5, 3), (-7.5, 4), (-3.5, 2), (-1.5, 1)],
    "sft_extra": [(-4.0, 3), (-6.0, 4), (-2.0, 2), (-1.0, 1)],
}
# θk+1's reward margin against θk on the two validation prompts
MARGINS = {"iter_0": [0.2, 0.4], "iter_1": [-0.1, 0.1]}
STEPS_HEADER = "loss,rewards_real,rewards_generated,reward_margin,reward_accuracy,step"


def _write_fixture(graph) -> None:
    for name, metrics in METRICS.items():
        evaluation = graph.evaluation(name)
        path = evaluation.metrics
        path.parent.mkdir(parents=True, exist_ok=True)
        passed = sum(
            a == r["answer"]
            for r, a in zip(VALIDATION, VALIDATION_ANSWERS[name].values(), strict=True)
        )
        validation = {"num_examples": 2, "verifier_pass_rate": passed / 2, "exact_match": 0.5}
        path.write_text(json.dumps({**metrics, "validation": validation}), encoding="utf-8")
        logps = dict(zip([r["id"] for r in TEST], LOGPS[name], strict=True))
        rows = [
            {
                "id": i,
                "generated": a,
                "real_logps": logps[i][0],
                "real_tokens": logps[i][1],
                "generated_tokens": len(a),
            }
            for i, a in sorted(ANSWERS[name].items(), reverse=True)
        ]
        write_jsonl(evaluation.generations, rows)
        val_rows = []
        for j, (i, a) in enumerate(VALIDATION_ANSWERS[name].items()):
            row = {"id": i, "generated": a, "real_logps": -2.0, "real_tokens": 2}
            if name in MARGINS:
                row.update(
                    opponent_real_logps=-3.0,
                    opponent_generated_logps=-1.0,
                    opponent_answer_logps=-1.5 - j,
                    reward_margin=MARGINS[name][j],
                )
            val_rows.append(row)
        write_jsonl(evaluation.validation, val_rows)
    for k in range(2):
        model = graph.theta(k + 1)
        write_json(model.train_metrics, {"beta": 0.1, "optimizer_steps": 4})
        model.steps_csv.parent.mkdir(parents=True, exist_ok=True)
        steps = [
            "0.6931,0.000,0.000,0.000,0.50,1",
            "0.6900,0.001,-0.001,0.002,0.50,2",
            f"0.6800,0.010,{-0.02 - k},{0.03 + k},1.00,3",
            f"0.6700,0.020,{-0.03 - k},{0.05 + k},0.75,4",
        ]
        model.steps_csv.write_text("\n".join([STEPS_HEADER, *steps]) + "\n", encoding="utf-8")
        pairs = [
            {"id": "p0", "real": "7", "generated": "7", "verifier": TEST[0]["verifier"]},
            {
                "id": "p1",
                "real": "9",
                "generated": " 9 " if k else "8",
                "verifier": TEST[1]["verifier"],
            },
            {"id": "p2", "real": "hi", "generated": "ho"},
            {"id": "p3", "real": "yo", "generated": "yo"},
        ]
        write_jsonl(pairs_file(k), pairs)
    write_jsonl("data/prepared/test.jsonl", TEST)
    write_jsonl("data/prepared/val.jsonl", VALIDATION)


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
    _write_fixture(graph)
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
    assert (
        "Held-out test split; θ0 is the SFT model, θk+1 the result of SPIN iteration k. The "
        "SFT-extra baseline keeps training θ0 with plain SFT on the same SFT data, for as many "
        "optimizer steps as all SPIN iterations together (same steps)."
    ) in lines
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
        "diagnostics.png",
        "metrics.png",
        "results.md",
    ]
    assert (REPORT_DIR / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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

    from spinflow.report import report as report_stage
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


# ---------------------------------------------------------------------------------------------
# Paired intervals


def test_paired_interval_matches_a_hand_computation():
    """θk 1,1,0,0 against θ0 0,1,0,0: per-example differences 1,0,0,0. A resample's mean
    difference is X/4 with X ~ Binomial(4, 1/4): P(X = 0) = 0.32 puts the 2.5th percentile at 0;
    P(X ≥ 3) = 0.051 and P(X = 4) = 0.004 put the 97.5th at 3/4."""
    assert paired_interval([1, 1, 0, 0], [0, 1, 0, 0]) == (0.25, 0.0, 0.75)
    # a ratio per model (log-likelihood per token): θk (2 + 4) / (1 + 3), θ0 2 / 2; a resample
    # of example 0 only gives 2 − 1, of example 1 only 4/3 − 1, of both 3/2 − 1 (p = 1/4, 1/4,
    # 1/2): the extremes are the interval's ends
    difference, low, high = paired_interval([2.0, 4.0], [1.0, 1.0], counts=([1, 3], [1, 1]))
    assert difference == pytest.approx(0.5)
    assert (low, high) == (pytest.approx(1 / 3), pytest.approx(1.0))
    # the same scores: every resample differs by 0
    assert paired_interval([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    assert paired_interval([0.5, 0.7], [0.5, 0.7], seed=3) == paired_interval(
        [0.5, 0.7], [0.5, 0.7], seed=3
    )
    with pytest.raises(ValueError):
        paired_interval([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        paired_interval([], [])


def test_paired_interval_is_narrower_than_unpaired_on_correlated_scores():
    """Two models that pass mostly the same examples (hard examples fail for both): the
    paired interval of the difference is far narrower than either model's own interval
    (report.bootstrap_interval) and than an interval that resamples the models apart."""
    import random

    rng = random.Random(7)
    easy = [rng.random() < 0.5 for _ in range(200)]
    second = [float(e) for e in easy]
    first = [float(e or rng.random() < 0.1) for e in easy]  # also passes a tenth of the rest
    difference, low, high = paired_interval(first, second)
    assert low < difference < high and low >= 0  # first never fails where second passes
    for values in (first, second):
        own_low, own_high = bootstrap_interval(values)
        assert high - low < (own_high - own_low) / 2
    # unpaired: each model resampled on its own draw
    draws = sorted(
        sum(rng.choices(first, k=200)) / 200 - sum(rng.choices(second, k=200)) / 200
        for _ in range(2000)
    )
    assert high - low < (draws[1950] - draws[50]) / 2


# ---------------------------------------------------------------------------------------------
# The verdict, the comparisons file and the diagnostics


def test_report_opens_with_the_verdict_chosen_on_validation(report):
    lines = (REPORT_DIR / "results.md").read_text(encoding="utf-8").splitlines()
    # θ1 and θ2 tie on validation: the earlier is kept, although θ2 is not better on test
    assert lines[2:4] == [
        "- SPIN (θ1, chosen on validation) vs θ0, the model SPIN started from: +0.500 "
        "[+0.000, +1.000] verifier pass rate on 2 test examples: no significant difference.",
        "- SPIN (θ1, chosen on validation) vs continued SFT at equal steps: +0.000 "
        "[+0.000, +0.000] verifier pass rate on 2 test examples: no significant difference.",
    ]
    assert lines[5].startswith(
        "θ1 has the best verifier pass rate on the validation split (2 examples) of the SPIN "
        "iterations θ1 … θ2; ties go to the earlier iteration"
    )
    start = lines.index("## Choosing the iteration on the validation split")
    assert "| θ1 (SPIN iter 0) **(chosen)** | 1.000 [1.000, 1.000] |" in lines[start + 7]


def test_comparisons_file_holds_every_paired_difference(report):
    compared = read_json(COMPARISONS)
    assert compared["resamples"] == 2000 and compared["test_examples"] == 4
    assert compared["chosen"]["model"] == "theta_1" and compared["chosen"]["step"] == 1
    assert set(compared["differences"]) == {"theta_1", "theta_2"}
    theta_2 = compared["differences"]["theta_2"]
    assert theta_2["step"] == 2 and set(theta_2) == {"step", "vs_theta_0", "vs_sft_extra"}
    # log-likelihood per token: θ2 (−5.5 − 7.5 − 3.5 − 1.5) / 10 against θ0 −20 / 10
    assert theta_2["vs_theta_0"]["answer_logprob_per_token"]["difference"] == pytest.approx(0.2)
    # pass rate over the two verified examples only; θ2 fails both, SFT-extra passes both
    assert theta_2["vs_sft_extra"]["verifier_pass_rate"] == {
        "difference": -1.0,
        "low": -1.0,
        "high": -1.0,
        "examples": 2,
    }
    assert compared["verdict"]["vs_theta_0"]["result"] == "no significant difference"
    # the paired table has a row per SPIN model and baseline
    lines = (REPORT_DIR / "results.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("## Paired differences on the test split")
    assert lines[start + 9] == (
        "| θ2 (SPIN iter 1) | SFT-extra (same steps) | -1.000 [-1.000, -1.000] | "
        "-0.750 [-1.000, -0.250] | -0.5000 [-0.6667, -0.3846] | -1.25 [-2.50, +0.00] |"
    )


def test_verdict_says_better_or_worse_only_when_the_interval_excludes_zero(report):
    graph, _ = report
    chosen = {"model": "theta_2", "step": 2, "metric": "exact_match", "mode": "max"}

    def result(low, high):
        exact = {"difference": (low + high) / 2, "low": low, "high": high, "examples": 40}
        entry = {"vs_theta_0": {"exact_match": exact}, "vs_sft_extra": {"exact_match": exact}}
        return verdict(graph, chosen, {"theta_2": entry})["vs_sft_extra"]

    assert result(0.05, 0.25)["result"] == "better"
    assert result(-0.25, -0.05)["result"] == "worse"
    assert result(-0.05, 0.25)["result"] == "no significant difference"
    assert result(0.05, 0.25)["sentence"] == (
        "SPIN (θ2, chosen on validation) vs continued SFT at equal steps: +0.150 [+0.050, "
        "+0.250] exact match on 40 test examples: better."
    )
    # smaller is better: a negative interval is better
    lower = {**chosen, "mode": "min"}
    entry = {"vs_sft_extra": {"exact_match": {"difference": -1, "low": -2, "high": -0.5}}}
    entry["vs_sft_extra"]["exact_match"]["examples"] = 3
    entry["vs_theta_0"] = entry["vs_sft_extra"]
    assert verdict(graph, lower, {"theta_2": entry})["vs_theta_0"]["result"] == "better"
    # a metric without per-example scores has no interval, and says so
    missing = {"theta_2": {"vs_theta_0": {}, "vs_sft_extra": {}}}
    sentence = verdict(graph, {**chosen, "metric": "verifier_pass_rate"}, missing)
    assert sentence["vs_theta_0"]["sentence"].endswith(
        "verifier pass rate is not scored per test example (no test example has a verifier), "
        "so there is no paired interval."
    )


def test_without_a_validation_split_no_iteration_is_chosen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    graph = build(
        validate_params(
            {"spin": {"iterations": 2}, "sft_extra": {"enabled": True, "compute": False}}
        )
    )
    _write_fixture(graph)
    for name in METRICS:
        path = graph.evaluation(name).metrics
        metrics = read_json(path)
        del metrics["validation"]
        write_json(path, metrics)
    write_report(graph)
    compared = read_json(COMPARISONS)
    assert compared["chosen"]["model"] is None and compared["verdict"] == {}
    lines = (REPORT_DIR / "results.md").read_text(encoding="utf-8").splitlines()
    assert lines[2] == (
        "No SPIN iteration is chosen, so there is no verdict: no evaluation scored a validation "
        "split (data.num_val is 0); choosing on the test split would overstate the result."
    )


def test_diagnostics_per_iteration(report):
    diagnostics = read_json(DIAGNOSTICS)
    assert set(diagnostics) == {"iter_0", "iter_1"}
    first = diagnostics["iter_0"]
    # pool: p0 and p3 equal the real answer; of the verified p0, p1 only p0 passes
    assert first["pool"]["pairs"] == 4
    assert first["pool"]["identical_to_real"] == 0.5
    assert first["pool"]["generated_passes"] == 0.5 and first["pool"]["real_passes"] == 1.0
    # training: the last two of four steps
    training = first["training"]
    assert (training["steps"], training["last_steps"]) == (4, 2)
    assert training["reward_accuracy"] == pytest.approx(0.875)
    assert training["reward_margin"] == pytest.approx(0.04)
    assert training["logps_real_change"] == pytest.approx(0.15)  # (0.01 + 0.02) / 2 / β
    # held out: θ1's margins 0.2 and 0.4 on the two validation prompts
    held = first["validation"]
    assert held["examples"] == 2 and held["reward_accuracy"] == 1.0
    assert (held["reward_margin_low"], held["reward_margin_high"]) == (0.2, 0.4)
    assert (held["logps_real_before"], held["logps_real_after"]) == (-3.0, -2.0)
    assert held["logps_generated_after"] == -2.0  # mean of −1.5 and −2.5
    assert first["status"] == DISTINGUISHABLE
    # iteration 1: its held-out margins −0.1 and 0.1 straddle 0, its training margins do not
    assert diagnostics["iter_1"]["status"] == TRAINING_ONLY
    assert diagnostics["iter_1"]["pool"]["identical_to_real"] == 0.75  # " 9 " equals "9"
    lines = (REPORT_DIR / "results.md").read_text(encoding="utf-8").splitlines()
    line = next(x for x in lines if x.startswith("- iteration 0 (θ0 → θ1): "))
    assert "still told apart from the real ones on held-out prompts" in line
    assert "margin +0.300 [+0.200, +0.400]" in line
    assert "θ0's 4 pool answers: 50% equal to the real ones, 50% pass their verifier" in line


@pytest.mark.parametrize(
    ("held_out", "training", "expected"),
    [
        ({"reward_margin_low": 0.01, "reward_margin_high": 0.2}, {}, DISTINGUISHABLE),
        ({"reward_margin_low": -0.3, "reward_margin_high": -0.01}, {}, REVERSED),
        (
            {"reward_margin_low": -0.1, "reward_margin_high": 0.1},
            {"reward_margin_low": 0.02},
            TRAINING_ONLY,
        ),
        (
            {"reward_margin_low": -0.1, "reward_margin_high": 0.1},
            {"reward_margin_low": -0.02},
            INDISTINGUISHABLE,
        ),
        ({}, {"reward_margin_low": 0.02}, DISTINGUISHABLE),  # no validation split
        ({}, {"reward_margin_low": -0.02}, INDISTINGUISHABLE),
    ],
)
def test_status_reads_the_held_out_margin_first(held_out, training, expected):
    assert status(held_out, training) == expected


def test_the_report_stage_declares_its_metrics_and_reads_the_diagnostics_inputs():
    graph = build(validate_params({"spin": {"iterations": 2}}))
    stage = graph.stage("report")
    assert stage.metrics == (str(COMPARISONS), str(DIAGNOSTICS))
    assert "reports/diagnostics.png" in stage.uncached_outs
    for k in range(2):
        assert f"plots/train_iter_{k}_steps.csv" in stage.inputs
        assert f"generated/iter_{k}" in stage.inputs
    assert {"tracking.champion_metric", "tracking.champion_mode"} <= set(stage.params)
    assert graph.evaluation("iter_1").validation.as_posix() == "eval/iter_1/validation.jsonl"

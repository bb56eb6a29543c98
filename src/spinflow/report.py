"""The report stage: every evaluated model in one table (markdown), one DVC plot (CSV) and a
chart (PNG), then each method's section.

Exact match and verifier pass rate come with 95% bootstrap intervals over the test examples, so
a difference of one or two examples is not read as a result. Each method these params run adds
a :class:`Section` (``spinflow.methods.<method>.report``): SPIN opens the report with its verdict
and adds paired intervals and per-iteration diagnostics; LoBaSS the selection's statistics;
AutoIF held-out instruction following and what each filter kept. The shared helpers here
(:func:`read_output`, :func:`bootstrap_interval`, :func:`collect`) are what those sections
build on.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinflow.config import Params
from spinflow.errors import DataError
from spinflow.graph import Graph, build
from spinflow.io import (
    atomic_path,
    read_json,
    read_jsonl,
    write_text,
)
from spinflow.nodes import DATA_DIR, REPORT_DIR, SFT_EXTRA

BOOTSTRAP_RESAMPLES = 2000

COLUMNS = [
    ("verifier_pass_rate", "verifier pass rate", "{:.3f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("answer_logprob_per_token", "log-lik / token", "{:.4f}"),
    ("reward_margin", "reward margin", "{:+.4f}"),
    ("reward_accuracy", "reward acc.", "{:.3f}"),
    ("answer_length", "answer length", "{:.1f}"),
]
CHART_METRICS = ["verifier_pass_rate", "exact_match", "answer_logprob_per_token"]


def read_output(path: Path) -> dict[str, Any]:
    """A JSON object another stage wrote. A damaged file stops with one line naming it (the
    stage runner adds which stage restores or re-makes it)."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing", path=path) from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (the file is damaged)", path=path) from None
    except json.JSONDecodeError as exc:
        problem = exc.msg.removesuffix(" at")  # "Unterminated string starting at"
        raise DataError(
            f"{path}: not valid JSON ({problem} at line {exc.lineno}, column {exc.colno}; the "
            "file is damaged)",
            path=path,
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: holds JSON {type(data).__name__}, not an object (the file is damaged)",
            path=path,
        )
    return data


def collect(graph: Graph) -> list[dict[str, Any]]:
    """One row per evaluated model, in graph order: θ0, θ1 … θN, then the baselines.

    ``iteration`` is k for θk on the SPIN chain and None for a baseline off it.
    """
    return [
        {
            "label": model.label,
            "iteration": model.index,
            "role": model.role,
            "generations": evaluation.generations,
            **read_output(evaluation.metrics),
        }
        for model, evaluation in graph.evaluated()
        if evaluation.kind == "test"
    ]


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``."""
    if not values:
        raise ValueError("no values to resample")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def choose_iteration(values: dict[int, float | None], mode: str) -> int | None:
    """The iteration a user keeps, from each iteration's value of the chosen metric on the
    validation split: the best (``mode`` max or min), ties to the earlier iteration (less
    training, same evidence); None when no iteration has a finite value. The MLflow
    ``champion`` alias follows the same rule."""
    best: tuple[float, int] | None = None
    for k, value in sorted(values.items()):
        if value is None or not math.isfinite(value):
            continue
        if (
            best is None
            or (mode == "max" and value > best[0])
            or (mode == "min" and value < best[0])
        ):
            best = (value, k)
    return None if best is None else best[1]


def per_example_scores(generations: Path, test: Sequence[dict]) -> dict[str, list[float]]:
    """1/0 per test example: exact match, and verifier pass where the example has a verifier."""
    answers = {row["id"]: row["generated"] for row in read_jsonl(generations, ("id", "generated"))}
    return answer_scores(answers, test)


def answer_scores(answers: dict[str, str], test: Sequence[dict]) -> dict[str, list[float]]:
    """1/0 per example of ``test`` for its answer in ``answers`` (by id): exact match, and
    verifier pass where the example has a verifier."""
    from spinflow.verifiers import exact_match, verify

    scores: dict[str, list[float]] = {"exact_match": [], "verifier_pass_rate": []}
    for record in test:
        answer = answers[record["id"]]
        scores["exact_match"].append(float(exact_match(answer, record["answer"])))
        if record.get("verifier"):
            scores["verifier_pass_rate"].append(float(verify(answer, record["verifier"])))
    return scores


def interval_table(rows: list[dict[str, Any]], test: Sequence[dict]) -> str:
    header = "| model | verifier pass rate [95% CI] | exact match [95% CI] |"
    body = [header, "|---|---:|---:|"]
    for row in rows:
        scores = per_example_scores(row["generations"], test)
        body.append(f"| {row['label']} | " + " | ".join(interval_cells(scores)) + " |")
    return "\n".join(body)


def interval_cells(scores: dict[str, list[float]]) -> list[str]:
    """Verifier pass rate and exact match as "mean [low, high]" (95% bootstrap), "–" if none."""
    cells = []
    for key in ("verifier_pass_rate", "exact_match"):
        values = scores[key]
        if not values:
            cells.append("–")
            continue
        low, high = bootstrap_interval(values)
        cells.append(f"{sum(values) / len(values):.3f} [{low:.3f}, {high:.3f}]")
    return cells


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "–" if value is None else fmt.format(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    body = [
        "| " + row["label"] + " | " + " | ".join(_cell(row, k, f) for k, _, f in COLUMNS) + " |"
        for row in rows
    ]
    return "\n".join([header, rule, *body])


def per_task_table(rows: list[dict[str, Any]]) -> str:
    tasks = sorted({t for row in rows for t in row.get("per_task_pass_rate") or {}})
    if not tasks:
        return ""
    header = "| task | " + " | ".join(row["label"] for row in rows) + " |"
    rule = "|---|" + "---:|" * len(rows)
    body = [
        "| "
        + t
        + " | "
        + " | ".join(_cell(row.get("per_task_pass_rate") or {}, t, "{:.2f}") for row in rows)
        + " |"
        for t in tasks
    ]
    return "\n".join([header, rule, *body])


def benchmark_table(rows: list[dict[str, Any]]) -> str:
    """lm-evaluation-harness metrics (``eval.lm_eval``): one row per task and metric, one column
    per model, each value with the harness's standard error."""
    found: dict[tuple[str, str], None] = {}
    for row in rows:
        for task, values in (row.get("lm_eval") or {}).items():
            for metric in values:
                if "_stderr" not in metric:
                    found[(task, metric)] = None
    if not found:
        return ""

    def cell(row: dict[str, Any], task: str, metric: str) -> str:
        values = (row.get("lm_eval") or {}).get(task, {})
        if metric not in values:
            return "–"
        name, _, filter_name = metric.partition("/")
        stderr = values.get(f"{name}_stderr" + (f"/{filter_name}" if filter_name else ""))
        return f"{values[metric]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    header = "| task | metric | " + " | ".join(row["label"] for row in rows) + " |"
    rule = "|---|---|" + "---:|" * len(rows)
    body = [
        f"| {task} | {metric} | " + " | ".join(cell(row, task, metric) for row in rows) + " |"
        for task, metric in found
    ]
    return "\n".join([header, rule, *body])


def write_chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spin_rows = [r for r in rows if r["iteration"] is not None]
    baselines = [r for r in rows if r["role"] == SFT_EXTRA]
    fig, axes = plt.subplots(1, len(CHART_METRICS), figsize=(4.2 * len(CHART_METRICS), 3.4))
    for ax, metric in zip(axes, CHART_METRICS, strict=True):
        xs = [r["iteration"] for r in spin_rows if r.get(metric) is not None]
        ys = [r[metric] for r in spin_rows if r.get(metric) is not None]
        ax.plot(xs, ys, marker="o", label="SPIN θk")
        for baseline, color in zip(baselines, ("tab:red", "tab:purple"), strict=False):
            if baseline.get(metric) is not None:
                ax.axhline(baseline[metric], color=color, linestyle="--", label=baseline["label"])
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("iteration k (θk)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


@dataclass
class Section:
    """What a method adds to reports/results.md (its report module's ``section(graph, rows,
    test)`` returns one, writing any file of its own on the way)."""

    body: list[str]  # after the shared tables
    opening: list[str] = field(default_factory=list)  # under the title, before every table


def method_sections(graph: Graph, rows: list[dict[str, Any]], test: list[dict]) -> list[Section]:
    """The sections of the methods these params run, in registry order. Each report module is
    loaded here alone, and the report stage declares them as its code (``Stage.code``)."""
    return [
        importlib.import_module(module).section(graph, rows, test)
        for module in graph.stage("report").code
    ]


def write_report(graph: Graph) -> dict[str, Any]:
    rows = collect(graph)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(REPORT_DIR / "by_iteration.csv") as tmp,
        open(tmp, "w", newline="") as f,
    ):
        writer = csv.writer(f)
        writer.writerow(["iteration", *[k for k, _, _ in COLUMNS]])
        for row in rows:
            if row["iteration"] is not None:
                writer.writerow([row["iteration"], *[row.get(k) for k, _, _ in COLUMNS]])
    test = read_jsonl(DATA_DIR / "test.jsonl")
    sections = method_sections(graph, rows, test)
    text = [
        "# SPIN results",
        "",
        *(line for section in sections for line in section.opening),
        markdown_table(rows),
        "",
        f"## 95% bootstrap intervals ({len(test)} test examples, {BOOTSTRAP_RESAMPLES} resamples)",
        "",
        interval_table(rows, test),
        "",
        *(line for section in sections for line in section.body),
    ]
    tasks = per_task_table(rows)
    if tasks:
        text += ["## Verifier pass rate per task", "", tasks, ""]
    benchmarks = benchmark_table(rows)
    if benchmarks:
        text += [
            "## Standard benchmarks (lm-evaluation-harness)",
            "",
            "`eval.lm_eval`: value ± standard error; every task's full results are in "
            "`eval/<evaluation>/lm_eval.json`.",
            "",
            benchmarks,
            "",
        ]
    text += training_section(graph)
    write_text(REPORT_DIR / "results.md", "\n".join(text))
    write_chart(rows, REPORT_DIR / "metrics.png")
    return {"rows": len(rows)}


def training_section(graph: Graph) -> list[str]:
    """What each model cost to train, and θ0's validation curve."""
    rows = ["| model | optimizer steps | token passes (compute) |", "|---|---:|---:|"]
    summaries = {
        name: read_output(model.train_metrics)
        for name, model in graph.models.items()
        if model.train_metrics is not None and model.train_metrics.is_file()
    }
    chain_totals: dict[str, int] = {}  # a chain's compute so far (SPIN, AutoIF), by role
    for name, summary in summaries.items():
        model = graph.models[name]
        if "compute_tokens" in summary:  # an iteration: generation and reference included
            chain_totals[model.role] = chain_totals.get(model.role, 0) + summary["compute_tokens"]
            compute = chain_totals[model.role]
        else:
            compute = 3 * int(summary.get("tokens_seen", 0))
        rows.append(f"| {model.label} | {summary.get('optimizer_steps', '–')} | {compute:,} |")
    text = [
        "## Training cost",
        "",
        "Token passes: one token through one forward pass, a backward pass counting as two. A "
        "SPIN row adds up every iteration up to it, θk's generation and the reference passes "
        "included; θ0's row is its own SFT.",
        "",
        *rows,
        "",
    ]
    theta_0 = summaries.get(graph.theta(0).name, {})
    curve = theta_0.get("validation") or []
    if curve:
        best = theta_0.get("best_epoch")
        text += [
            "## θ0 validation loss",
            "",
            "Loss per answer token on the validation split after each SFT epoch"
            + (f"; the weights of epoch {best} are kept." if best else "."),
            "",
            "| epoch | validation loss |",
            "|---:|---:|",
            *(
                f"| {p['epoch']}{' (kept)' if p['epoch'] == best else ''} | {p['val_loss']:.4f} |"
                for p in curve
            ),
            "",
        ]
    return text


def report(params: Params) -> dict[str, Any]:
    """The ``report`` stage: every evaluated model in one table, one DVC plot and one chart
    (reports/)."""
    return write_report(build(params))

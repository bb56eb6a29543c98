"""All iterations in one table (markdown), one DVC plot (CSV) and one chart (PNG)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from spinflow.graph import REPORT_DIR, Graph
from spinflow.io import atomic_path, read_json, write_text

COLUMNS = [
    ("verifier_pass_rate", "verifier pass rate", "{:.3f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("answer_logprob_per_token", "log-lik / token", "{:.4f}"),
    ("reward_margin", "reward margin", "{:+.4f}"),
    ("reward_accuracy", "reward acc.", "{:.3f}"),
    ("answer_length", "answer length", "{:.1f}"),
]
CHART_METRICS = ["verifier_pass_rate", "exact_match", "answer_logprob_per_token"]


def collect(graph: Graph) -> list[dict[str, Any]]:
    """One row per evaluated model, in graph order: θ0, θ1 … θN, then the baselines.

    ``iteration`` is k for θk on the SPIN chain and None for a baseline off it.
    """
    return [
        {"label": model.label, "iteration": model.index, **read_json(evaluation.metrics)}
        for model, evaluation in graph.evaluated()
    ]


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


def write_chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spin_rows = [r for r in rows if r["iteration"] is not None]
    baseline = next((r for r in rows if r["iteration"] is None), None)
    fig, axes = plt.subplots(1, len(CHART_METRICS), figsize=(4.2 * len(CHART_METRICS), 3.4))
    for ax, metric in zip(axes, CHART_METRICS, strict=True):
        xs = [r["iteration"] for r in spin_rows if r.get(metric) is not None]
        ys = [r[metric] for r in spin_rows if r.get(metric) is not None]
        ax.plot(xs, ys, marker="o", label="SPIN θk")
        if baseline is not None and baseline.get(metric) is not None:
            ax.axhline(baseline[metric], color="tab:red", linestyle="--", label="SFT-extra")
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("iteration k (θk)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
    text = [
        "# SPIN results",
        "",
        "Held-out test split; θ0 is the SFT model, θk+1 the result of SPIN "
        "iteration k. SFT-extra keeps training θ0 with plain SFT for as many optimizer steps as all "
        "SPIN iterations together.",
        "",
        markdown_table(rows),
        "",
    ]
    tasks = per_task_table(rows)
    if tasks:
        text += ["## Verifier pass rate per task", "", tasks, ""]
    write_text(REPORT_DIR / "results.md", "\n".join(text))
    write_chart(rows, REPORT_DIR / "metrics.png")
    return {"rows": len(rows)}

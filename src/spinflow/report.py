"""Every evaluated model in one table (markdown), one DVC plot (CSV) and one chart (PNG).

Exact match and verifier pass rate come with 95% bootstrap intervals over the test examples, so
a difference of one or two examples is not read as a result. With LoBaSS on, the report adds the
selection's statistics and a histogram of the learnability scores; with AutoIF on, held-out
instruction-following accuracy (with intervals) and what each AutoIF filter kept.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinflow.errors import DataError
from spinflow.graph import (
    AUTOIF,
    DATA_DIR,
    LOBASS_SCORES,
    METRICS_DIR,
    REPORT_DIR,
    SFT_EXTRA,
    Graph,
    train_metrics,
)
from spinflow.io import atomic_path, read_json, read_jsonl, write_text

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
    budgets = [
        what
        for name, what in (
            (
                "sft_extra",
                "for as many optimizer steps as all SPIN iterations together (same steps)",
            ),
            (
                "sft_extra_compute",
                "for as much compute (same compute: token passes of generation, reference passes "
                "and training)",
            ),
        )
        if name in graph.models
    ]
    baselines = (
        f" The SFT-extra baseline{'s' if len(budgets) > 1 else ''} keep"
        f"{'' if len(budgets) > 1 else 's'} training θ0 with plain SFT on the same SFT data, "
        f"{' or '.join(budgets)}."
        if budgets
        else ""
    )
    text = [
        "# SPIN results",
        "",
        f"Held-out test split; θ0 is the SFT model, θk+1 the result of SPIN iteration k.{baselines}",
        "",
        markdown_table(rows),
        "",
    ]
    test = read_jsonl(DATA_DIR / "test.jsonl")
    text += [
        f"## 95% bootstrap intervals ({len(test)} test examples, {BOOTSTRAP_RESAMPLES} resamples)",
        "",
        interval_table(rows, test),
        "",
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
    if "lobass_select" in graph.stages:
        text += lobass_section()
        write_score_histogram(REPORT_DIR / "lobass_scores.png")
    if "autoif_verify" in graph.stages:
        text += autoif_section(graph)
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


def _lobass_scores() -> list[dict[str, Any]]:
    return read_jsonl(LOBASS_SCORES / "scores.jsonl")


def lobass_section() -> list[str]:
    scored = read_output(METRICS_DIR / "lobass_score.json")
    selected = read_output(METRICS_DIR / "lobass_select.json")
    return [
        "## LoBaSS selection",
        "",
        "Learnability S = 1 − L_after / L_before of each SFT example (mean answer-token loss "
        "under the base model, then under θ0 fine-tuned on all of them).",
        "",
        "| | value |",
        "|---|---:|",
        f"| SFT examples scored | {scored['examples']} |",
        f"| mean loss before / after | {scored['mean_loss_before']:.4f} / "
        f"{scored['mean_loss_after']:.4f} |",
        f"| mean score | {scored['mean_score']:.4f} |",
        f"| examples whose loss rose (S < 0) | {scored['negative_scores']} |",
        f"| selected | {selected['selected']} ({selected['selected_fraction']:.1%}) |",
        f"| mean score: selected / random control | {selected['mean_score_selected']:.4f} / "
        f"{selected['mean_score_random']:.4f} |",
        f"| selected examples also in the random control | {selected['overlap_with_random']} |",
        "",
        "![LoBaSS scores](lobass_scores.png)",
        "",
    ]


def write_score_histogram(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _lobass_scores()
    size = read_output(METRICS_DIR / "lobass_select.json")["selected"]
    chosen = [r["score"] for r in rows if r["rank"] <= size]
    rest = [r["score"] for r in rows if r["rank"] > size]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bins = 20
    ax.hist([rest, chosen], bins=bins, stacked=True, label=["not selected", "selected"])
    ax.set_xlabel("learnability S = 1 − L_after / L_before")
    ax.set_ylabel("SFT examples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def autoif_section(graph: Graph) -> list[str]:
    """Held-out instruction following of θ0 and each AutoIF model (each SPIN model with
    ``autoif.with_spin``), and the filters' counts."""
    rows = []
    for model, evaluation in graph.evaluated():
        if evaluation.kind != AUTOIF:
            continue
        generations = read_jsonl(evaluation.generations, ("id",))
        prompt = [float(all(r["followed"])) for r in generations]
        instruction = [float(f) for r in generations for f in r["followed"]]
        cells = []
        for values in (prompt, instruction):
            low, high = bootstrap_interval(values)
            cells.append(f"{sum(values) / len(values):.3f} [{low:.3f}, {high:.3f}]")
        label = f"{model.label}, before AutoIF" if model.index == 0 else model.label
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {len(prompt)} |")
    made = read_output(train_metrics("autoif_instructions"))
    verified = read_output(train_metrics("autoif_verify"))
    queries = read_output(train_metrics("autoif_queries"))
    text = [
        "## AutoIF: held-out instruction following",
        "",
        f"{queries['eval_queries']} test prompts with {queries['heldout_instructions']} held-out "
        "instructions (never trained on), greedy answers; an instruction is followed when every "
        f"one of its verified functions passes. 95% bootstrap intervals ({BOOTSTRAP_RESAMPLES} "
        "resamples: over queries for prompt level, over (query, instruction) for instruction "
        "level).",
        "",
        "| model | prompt-level strict [95% CI] | instruction-level strict [95% CI] | queries |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "### What each filter kept",
        "",
        "| filter | kept | dropped (reason: count) |",
        "|---|---:|---|",
        *(_supervisor_row() if "autoif_supervise" in graph.stages else []),
        f"| autoif_instructions: library items usable | {made['instructions_kept']} of "
        f"{made['items']} instructions, {made['functions_kept']} of {made['functions_in_file']} "
        f"functions | {_reasons(made['dropped'])} |",
        f"| autoif_verify: functions pass their cases | {verified['instructions_kept']} "
        f"instructions, {verified['functions_kept']} of {verified['functions_checked']} functions "
        f"| {_reasons(verified['dropped'])} |",
        f"| autoif_queries: training / held-out instructions | {queries['train_instructions']} / "
        f"{queries['heldout_instructions']} | – |",
    ]
    calls = [f"autoif_verify {verified['sandbox_calls_per_second']:.0f}"]
    k = 0
    while f"autoif_sample_iter_{k}" in graph.stages:
        sampled = read_output(train_metrics(f"autoif_sample_iter_{k}"))
        text.append(
            f"| autoif_sample_iter_{k}: samples passing all functions (SFT data) / pairs | "
            f"{sampled['samples_passing_all']} of {sampled['samples']} samples / "
            f"{sampled['pairs']} pairs from {sampled['queries_with_pairs']} of "
            f"{sampled['queries']} queries | mean pass rate {sampled['mean_score']:.3f} |"
        )
        calls.append(f"autoif_sample_iter_{k} {sampled['sandbox_calls_per_second']:.0f}")
        k += 1
    if graph.params.autoif.with_spin:
        text += _with_spin_rows(graph)
    text += ["", f"Sandbox calls per second: {', '.join(calls)}.", ""]
    return text


def _with_spin_rows(graph: Graph) -> list[str]:
    """``autoif.with_spin``: per SPIN iteration, SPIN's answers to θ0's verified AutoIF queries
    that pass their instruction's functions (spin.feedback_filter treats them as correct) and
    the pairs trained together."""
    mode = graph.params.spin.feedback_filter
    what = {"drop": "pairs_dropped", "real_only": "pairs_real_only"}[mode]
    rows = []
    for name in graph.chain[1:]:
        model = graph.model(name)
        if not model.train_metrics.is_file():
            continue
        trained = read_output(model.train_metrics)
        rows.append(
            f"| {model.stage}: SPIN answers to AutoIF queries passing their functions / pairs "
            f"trained, SPIN + AutoIF | {trained['instruction_generated_passing']} of "
            f"{trained['instruction_pairs']} / {trained['pairs_spin']} + "
            f"{trained['pairs_autoif']} | spin.feedback_filter {mode}: {what} "
            f"{trained[what]} (all SPIN pairs) |"
        )
    return rows


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "none"


def _supervisor_row() -> list[str]:
    written = read_output(train_metrics("autoif_supervise"))
    return [
        f"| autoif_supervise: supervisor answers parsed | {written['instructions_written']} new "
        f"instructions, {written['functions_parsed']} of {written['function_answers']} function "
        f"answers | {_reasons(written['dropped'])} |"
    ]

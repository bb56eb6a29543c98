"""AutoIF's section of the report: held-out instruction following of θ0 and each AutoIF model
(with intervals), and what each AutoIF filter kept."""

from __future__ import annotations

from typing import Any

from spinflow.graph import Graph
from spinflow.io import read_jsonl
from spinflow.methods.autoif.graph import AUTOIF
from spinflow.nodes import train_metrics
from spinflow.report import BOOTSTRAP_RESAMPLES, Section, bootstrap_interval, read_output


def section(graph: Graph, rows: list[dict[str, Any]], test: list[dict]) -> Section:
    return Section(body=autoif_section(graph))


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
        *_query_scoring_row(queries),
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


def _query_scoring_row(queries: dict) -> list[str]:
    """The supervisor's rating of the training queries (autoif.query_min_score), when it ran."""
    if queries.get("query_scoring") != "on":
        return []
    return [
        f"| autoif_queries: training queries the supervisor rates answerable | "
        f"{queries['train_queries']} of {queries['train_queries_made']} | "
        f"{_reasons(queries['train_queries_dropped'])} |"
    ]


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "none"


def _supervisor_row() -> list[str]:
    written = read_output(train_metrics("autoif_supervise"))
    return [
        f"| autoif_supervise: supervisor answers parsed | {written['instructions_written']} new "
        f"instructions, {written['functions_parsed']} of {written['function_answers']} function "
        f"answers | {_reasons(written['dropped'])} |"
    ]

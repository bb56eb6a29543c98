"""SPIN's section of the report: the verdict, paired differences and per-iteration diagnostics.

The report opens with the verdict: the SPIN iteration chosen on the validation split
(:func:`choose`) against θ0 and each SFT-extra baseline on the test split, with paired bootstrap
intervals (metrics/comparisons.json holds every such difference). Per SPIN iteration, whether
θk's answers are still told apart from the real ones (metrics/diagnostics.json,
diagnostics.png).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinflow.errors import DataError
from spinflow.graph import Graph
from spinflow.io import atomic_path, read_jsonl, read_rows_csv, write_json
from spinflow.methods.spin.graph import COMPARISONS, DIAGNOSTICS, DIAGNOSTICS_CHART, pairs_file
from spinflow.nodes import DATA_DIR, SFT_EXTRA
from spinflow.report import (
    BOOTSTRAP_RESAMPLES,
    Section,
    bootstrap_interval,
    choose_iteration,
    interval_cells,
    per_example_scores,
    read_output,
)


def section(graph: Graph, rows: list[dict[str, Any]], test: list[dict]) -> Section:
    """The verdict and a line on the baselines first, then the paired differences, what the
    validation split chose, and the per-iteration diagnostics; writes comparisons.json,
    diagnostics.json and diagnostics.png."""
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
    compared = comparisons(graph, rows, test)
    diagnostics = iteration_diagnostics(graph)
    write_json(COMPARISONS, compared)
    write_json(DIAGNOSTICS, diagnostics)
    write_diagnostics_chart(diagnostics, DIAGNOSTICS_CHART)
    return Section(
        opening=[
            *verdict_lines(graph, compared),
            "Held-out test split; θ0 is the SFT model, θk+1 the result of SPIN iteration "
            f"k.{baselines}",
            "",
        ],
        body=[
            *paired_section(graph, compared),
            *validation_section(graph, rows, compared),
            *diagnostics_section(diagnostics),
        ],
    )


# ---------------------------------------------------------------------------------------------
# Paired comparisons on the test split, and the verdict

# metrics scored per test example: (key, title, format of a difference)
PAIRED_METRICS = (
    ("verifier_pass_rate", "verifier pass rate", "{:+.3f}"),
    ("exact_match", "exact match", "{:+.3f}"),
    ("answer_logprob_per_token", "log-lik / token", "{:+.4f}"),
    ("answer_length", "answer length", "{:+.2f}"),
)
BASELINE_NAMES = {
    "sft_extra": "continued SFT at equal steps",
    "sft_extra_compute": "continued SFT at equal compute",
}
THETA_0_NAME = "θ0, the model SPIN started from"


def paired_interval(
    first: Sequence[float],
    second: Sequence[float],
    *,
    counts: tuple[Sequence[float], Sequence[float]] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``first − second`` over the same examples (one value each, in the same order) and its 95%
    paired percentile bootstrap interval: every resample draws the examples' indices with
    replacement from one generator seeded with ``seed``, and both models are scored on that
    same draw, so what the two share per example cancels. A model's score is the mean of its
    values, or with ``counts`` the ratio Σ value / Σ count over the drawn examples (log-likelihood
    per token: summed log-probs over the tokens). Returns (difference, low, high)."""
    n = len(first)
    if n == 0 or len(second) != n:
        raise ValueError(f"paired values: {n} and {len(second)} (need as many, at least one)")
    first_counts, second_counts = counts if counts is not None else ([1.0] * n, [1.0] * n)

    def difference(draw: Sequence[int]) -> float:
        return sum(first[i] for i in draw) / sum(first_counts[i] for i in draw) - sum(
            second[i] for i in draw
        ) / sum(second_counts[i] for i in draw)

    rng = random.Random(seed)
    indices = range(n)
    draws = sorted(difference(rng.choices(indices, k=n)) for _ in range(resamples))
    return (
        difference(indices),
        draws[int(0.025 * resamples)],
        draws[min(resamples - 1, int(0.975 * resamples))],
    )


def example_values(path: Path, records: Sequence[dict]) -> dict[str, dict[str, tuple]]:
    """Per metric of :data:`PAIRED_METRICS`, each example's (value, count) by id from an
    evaluation's rows at ``path``; the metric is Σ value / Σ count. Verifier pass rate counts only
    examples with a verifier; log-likelihood and length need the rows' token counts (rows written
    before they were kept have none)."""
    from spinflow.verifiers import exact_match, verify

    rows = {row["id"]: row for row in read_jsonl(path, ("id", "generated"))}
    values: dict[str, dict[str, tuple]] = {key: {} for key, _, _ in PAIRED_METRICS}
    for record in records:
        row = rows.get(record["id"])
        if row is None:
            raise DataError(f"{path}: no row for example {record['id']!r}", path=path)
        answer, key = row["generated"], record["id"]
        values["exact_match"][key] = (float(exact_match(answer, record["answer"])), 1.0)
        if record.get("verifier"):
            values["verifier_pass_rate"][key] = (float(verify(answer, record["verifier"])), 1.0)
        if "real_tokens" in row:
            values["answer_logprob_per_token"][key] = (row["real_logps"], row["real_tokens"])
        if "generated_tokens" in row:
            values["answer_length"][key] = (float(row["generated_tokens"]), 1.0)
    return values


def compare(first: dict[str, tuple], second: dict[str, tuple]) -> dict[str, float] | None:
    """One metric of two models over the examples both have: difference, interval, examples."""
    common = [key for key in first if key in second]
    if not common:
        return None
    difference, low, high = paired_interval(
        [first[k][0] for k in common],
        [second[k][0] for k in common],
        counts=([first[k][1] for k in common], [second[k][1] for k in common]),
    )
    return {
        "difference": round(difference, 6),
        "low": round(low, 6),
        "high": round(high, 6),
        "examples": len(common),
    }


def _test_evaluation(graph: Graph, model: str):
    return next(e for e in graph.evaluations.values() if e.model == model and e.kind == "test")


def baselines(graph: Graph) -> list[str]:
    """What every SPIN iteration is compared with: θ0, then each SFT-extra baseline."""
    extra = [name for name, model in graph.models.items() if model.role == SFT_EXTRA]
    return [graph.theta(0).name, *extra]


def paired_differences(graph: Graph, test: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """θk − θ0 and θk − each SFT-extra baseline for every metric of :data:`PAIRED_METRICS`,
    by θk's model name: {"step": k, "vs_<baseline>": {metric: {difference, low, high,
    examples}}}."""
    values = {}
    for name in [*graph.chain, *baselines(graph)]:
        evaluation = _test_evaluation(graph, name)
        if evaluation.name not in values:
            values[evaluation.name] = example_values(evaluation.generations, test)
    differences: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(graph.chain[1:], start=1):
        mine = values[_test_evaluation(graph, name).name]
        entry: dict[str, Any] = {"step": k}
        for base in baselines(graph):
            theirs = values[_test_evaluation(graph, base).name]
            entry[f"vs_{base}"] = {
                key: result
                for key, _, _ in PAIRED_METRICS
                if (result := compare(mine[key], theirs[key])) is not None
            }
        differences[name] = entry
    return differences


def choose(graph: Graph, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The SPIN iteration a user keeps, chosen on the validation split by the rule the MLflow
    ``champion`` alias follows (:func:`choose_iteration`)."""
    tracking = graph.params.tracking
    metric = tracking.champion_metric
    spin_rows = {r["iteration"]: r for r in rows if r["iteration"]}  # θ1 … θN
    values = {k: (r.get("validation") or {}).get(metric) for k, r in spin_rows.items()}
    k = choose_iteration(values, tracking.champion_mode)
    found = sorted({key for r in spin_rows.values() for key in r.get("validation") or {}})
    if k is None:
        why = (
            f"no SPIN iteration has a validation {metric} (tracking.champion_metric; the "
            f"validation split has: {', '.join(found)})"
            if found
            else "no evaluation scored a validation split (data.num_val is 0)"
        )
        return {"model": None, "metric": metric, "why": why}
    return {
        "model": graph.theta(k).name,
        "step": k,
        "metric": metric,
        "mode": tracking.champion_mode,
        "validation_value": values[k],
        "validation_examples": spin_rows[k]["validation"].get("num_examples"),
        "rule": (
            f"the SPIN iteration with the best validation {_title(metric)} "
            f"(tracking.champion_metric, {tracking.champion_mode}) among θ1 … "
            f"θ{len(graph.chain) - 1}; ties to the earlier iteration"
        ),
    }


def _title(metric: str) -> str:
    return next((title for key, title, _ in PAIRED_METRICS if key == metric), metric)


def verdict(
    graph: Graph, chosen: dict[str, Any], differences: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per baseline, the chosen iteration against it on the test split: the paired difference
    of the chosen metric, and better / no significant difference / worse (by the interval)."""
    if chosen["model"] is None:
        return {}
    metric, mode = chosen["metric"], chosen["mode"]
    form = next((f for key, _, f in PAIRED_METRICS if key == metric), "{:+.4f}")
    out = {}
    for base in baselines(graph):
        what = BASELINE_NAMES.get(base, THETA_0_NAME if base == graph.theta(0).name else base)
        start = f"SPIN (θ{chosen['step']}, chosen on validation) vs {what}"
        result = differences[chosen["model"]][f"vs_{base}"].get(metric)
        if result is None:
            why = "no test example has a verifier" if metric == "verifier_pass_rate" else ""
            out[f"vs_{base}"] = {
                "metric": metric,
                "sentence": f"{start}: {_title(metric)} is not scored per test example"
                + (f" ({why})" if why else "")
                + ", so there is no paired interval.",
            }
            continue
        low, high = result["low"], result["high"]
        if (low > 0 and mode == "max") or (high < 0 and mode == "min"):
            outcome = "better"
        elif (high < 0 and mode == "max") or (low > 0 and mode == "min"):
            outcome = "worse"
        else:
            outcome = "no significant difference"
        numbers = f"{form.format(result['difference'])} [{form.format(low)}, {form.format(high)}]"
        out[f"vs_{base}"] = {
            **result,
            "metric": metric,
            "result": outcome,
            "sentence": f"{start}: {numbers} {_title(metric)} on {result['examples']} test "
            f"examples: {outcome}.",
        }
    return out


def comparisons(graph: Graph, rows: list[dict[str, Any]], test: Sequence[dict]) -> dict:
    """What metrics/comparisons.json holds: the paired differences, the chosen iteration and
    the verdict."""
    differences = paired_differences(graph, test)
    chosen = choose(graph, rows)
    return {
        "resamples": BOOTSTRAP_RESAMPLES,
        "seed": 0,
        "test_examples": len(test),
        "differences": differences,
        "chosen": chosen,
        "verdict": verdict(graph, chosen, differences),
    }


def _difference_cell(result: dict[str, float] | None, form: str) -> str:
    if result is None:
        return "–"
    low, high = form.format(result["low"]), form.format(result["high"])
    return f"{form.format(result['difference'])} [{low}, {high}]"


def verdict_lines(graph: Graph, compared: dict) -> list[str]:
    """The report's opening: one sentence per baseline, then how the iteration was chosen."""
    chosen = compared["chosen"]
    if chosen["model"] is None:
        return [
            f"No SPIN iteration is chosen, so there is no verdict: {chosen['why']}; choosing on "
            "the test split would overstate the result.",
            "",
        ]
    lines = [f"- {v['sentence']}" for v in compared["verdict"].values()]
    return [
        *lines,
        "",
        f"θ{chosen['step']} has the best {_title(chosen['metric'])} on the validation split "
        f"({chosen['validation_examples']} examples) of the SPIN iterations θ1 … "
        f"θ{len(graph.chain) - 1}; ties go to the earlier iteration, and the test split plays "
        "no part in the choice (the MLflow `champion` alias follows the same rule). [a, b]: 95% "
        f"paired bootstrap interval ({compared['resamples']} resamples of the test examples, "
        "both models scored on each); better or worse only when it excludes 0.",
        "",
    ]


def paired_section(graph: Graph, compared: dict) -> list[str]:
    header = "| model | minus | " + " | ".join(t for _, t, _ in PAIRED_METRICS) + " |"
    body = [header, "|---|---|" + "---:|" * len(PAIRED_METRICS)]
    for name, entry in compared["differences"].items():
        for base in baselines(graph):
            results = entry[f"vs_{base}"]
            cells = [_difference_cell(results.get(k), f) for k, _, f in PAIRED_METRICS]
            label, other = graph.model(name).label, graph.model(base).label
            body.append(f"| {label} | {other} | " + " | ".join(cells) + " |")
    return [
        "## Paired differences on the test split",
        "",
        f"Each SPIN model minus each baseline over the same {compared['test_examples']} test "
        f"examples, with a 95% paired percentile bootstrap interval ({compared['resamples']} "
        "resamples of the test examples from one seeded generator; both models are scored on "
        "each resample, so what they share per example cancels). Log-likelihood per token is a "
        "ratio of sums over each resample. Reward margin and accuracy are left out: each model's "
        "is measured against its own opponent, so they are not one quantity across models.",
        "",
        *body,
        "",
    ]


def validation_section(graph: Graph, rows: list[dict[str, Any]], compared: dict) -> list[str]:
    """Every model's validation scores, the chosen one marked."""
    path = DATA_DIR / "val.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    if not records:
        return []
    chosen = compared["chosen"]
    body = [
        "| model | verifier pass rate [95% CI] | exact match [95% CI] | log-lik / token |",
        "|---|---:|---:|---:|",
    ]
    for model, evaluation in graph.evaluated():
        if evaluation.kind != "test" or not evaluation.validation.is_file():
            continue
        scores = per_example_scores(evaluation.validation, records)
        row = next(r for r in rows if r["label"] == model.label)
        loglik = (row.get("validation") or {}).get("answer_logprob_per_token")
        mark = " **(chosen)**" if model.name == chosen.get("model") else ""
        body.append(
            f"| {model.label}{mark} | "
            + " | ".join(interval_cells(scores))
            + f" | {'–' if loglik is None else f'{loglik:.4f}'} |"
        )
    rule = chosen.get("rule") or chosen.get("why")
    return [
        "## Choosing the iteration on the validation split",
        "",
        f"{len(records)} validation examples (carved from the SFT data, never trained on). "
        f"Rule: {rule}. θ0's SFT stopped on this split's loss, so θ0's row is the one least "
        f"held out. 95% bootstrap intervals ({BOOTSTRAP_RESAMPLES} resamples).",
        "",
        *body,
        "",
    ]


# ---------------------------------------------------------------------------------------------
# Per-iteration diagnostics: is another iteration worth it?

LN2 = 0.6931471805599453


def _share(name: str, values: Sequence[float]) -> dict[str, float]:
    """``name``: the mean of ``values``, with ``name_low`` / ``name_high`` (95% bootstrap)."""
    if not values:
        return {}
    low, high = bootstrap_interval(values)
    return {
        name: round(sum(values) / len(values), 6),
        f"{name}_low": round(low, 6),
        f"{name}_high": round(high, 6),
    }


def pool_figures(path: Path) -> dict[str, float]:
    """θk's sampled answers to the SPIN pool (iteration k's pairs): how many equal the real
    answer, how many pass their verifier, and how many of the real answers do."""
    from spinflow.verifiers import verify

    pairs = read_jsonl(path, ("generated", "real"))
    identical = [float(p["generated"].strip() == p["real"].strip()) for p in pairs]
    passing, real_passing = [], []
    for pair in pairs:
        if "generated_passes" in pair:  # an AutoIF query, checked in the sandbox
            passing.append(float(bool(pair["generated_passes"])))
        elif pair.get("verifier"):
            passing.append(float(verify(pair["generated"], pair["verifier"])))
            real_passing.append(float(verify(pair["real"], pair["verifier"])))
    return {
        "pairs": len(pairs),
        **_share("identical_to_real", identical),
        **_share("generated_passes", passing),
        **_share("real_passes", real_passing),
    }


def training_figures(model) -> dict[str, float]:
    """The second half of an iteration's optimizer steps (at least one): the mean reward
    accuracy, margin and loss of the steps' batches with intervals over the steps, and the mean
    change of the log-probs of the real and the generated answers from θk (rewards / β)."""
    if not model.steps_csv.is_file():
        raise DataError(f"{model.steps_csv}: missing", path=model.steps_csv)
    steps = read_rows_csv(model.steps_csv)
    beta = read_output(model.train_metrics).get("beta")
    last = steps[len(steps) // 2 :]
    figures: dict[str, float] = {"steps": len(steps), "last_steps": len(last)}
    for key in ("reward_accuracy", "reward_margin", "loss"):
        figures.update(_share(key, [s[key] for s in last if key in s]))
    if beta:
        for key, column in (
            ("logps_real_change", "rewards_real"),
            ("logps_generated_change", "rewards_generated"),
        ):
            values = [s[column] / beta for s in last if column in s]
            if values:
                figures[key] = round(sum(values) / len(values), 6)
    return figures


def held_out_figures(path: Path) -> dict[str, float]:
    """θk+1 on the validation prompts against θk's greedy answers (rows of its validation
    evaluation): reward accuracy and margin with intervals over the prompts, and the mean
    log-probs of the real answer and of θk's answer under θk (before) and θk+1 (after)."""
    rows = [r for r in read_jsonl(path) if "reward_margin" in r] if path.is_file() else []
    if not rows:
        return {}
    margins = [r["reward_margin"] for r in rows]
    figures: dict[str, float] = {
        "examples": len(rows),
        **_share("reward_accuracy", [float(m > 0) for m in margins]),
        **_share("reward_margin", margins),
    }
    for name, key in (
        ("logps_real_before", "opponent_real_logps"),
        ("logps_real_after", "real_logps"),
        ("logps_generated_before", "opponent_generated_logps"),
        ("logps_generated_after", "opponent_answer_logps"),
    ):
        figures[name] = round(sum(r[key] for r in rows) / len(rows), 6)
    return figures


DISTINGUISHABLE, REVERSED, TRAINING_ONLY, INDISTINGUISHABLE = (
    "distinguishable",
    "reversed",
    "training only",
    "indistinguishable",
)


def status(held_out: dict[str, float], training: dict[str, float]) -> str:
    """Whether θk+1 still tells the real answers from θk's: by the held-out margin's interval
    when there is one, else by the training margin's."""
    trained = training.get("reward_margin_low", 0) > 0
    if held_out:
        if held_out["reward_margin_low"] > 0:
            return DISTINGUISHABLE
        if held_out["reward_margin_high"] < 0:
            return REVERSED
        return TRAINING_ONLY if trained else INDISTINGUISHABLE
    return DISTINGUISHABLE if trained else INDISTINGUISHABLE


def iteration_diagnostics(graph: Graph) -> dict[str, dict[str, Any]]:
    """What metrics/diagnostics.json holds: per SPIN iteration k (θk → θk+1), its pool,
    training and held-out figures and whether the answers are still told apart."""
    out = {}
    for name in graph.chain[1:]:
        model = graph.model(name)
        k = model.iteration
        held_out = held_out_figures(_test_evaluation(graph, name).validation)
        training = training_figures(model)
        entry: dict[str, Any] = {
            "iteration": k,
            "pool": pool_figures(pairs_file(k)),
            "training": training,
        }
        if held_out:
            entry["validation"] = held_out
        entry["status"] = status(held_out, training)
        out[f"iter_{k}"] = entry
    return out


def _pm(figures: dict[str, float], key: str, form: str) -> str:
    if key not in figures:
        return "–"
    value, low, high = (form.format(figures[k]) for k in (key, f"{key}_low", f"{key}_high"))
    return f"{value} [{low}, {high}]"


def diagnostic_line(entry: dict[str, Any]) -> str:
    """One plain line: is θk still told apart from the real answers, and the figures why."""
    k, held_out, training, pool = (
        entry["iteration"],
        entry.get("validation", {}),
        entry["training"],
        entry["pool"],
    )
    old, new = f"θ{k}", f"θ{k + 1}"
    loss = f"training loss {training['loss']:.3f} vs ln 2 = {LN2:.3f}" if "loss" in training else ""
    verdicts = {
        DISTINGUISHABLE: f"{old}'s answers are still told apart from the real ones"
        + (" on held-out prompts" if held_out else " on the training pairs (no validation split)")
        + ": not SPIN's fixed point yet, a further iteration has something to learn",
        REVERSED: f"{new} prefers {old}'s answers to the real ones on held-out prompts: more "
        "training of this kind moves away from the data",
        TRAINING_ONLY: f"{new} tells {old}'s answers from the real ones on its training pairs "
        "only, not on held-out prompts: another iteration is unlikely to help on new prompts",
        INDISTINGUISHABLE: f"{new} no longer tells {old}'s answers from the real ones, in "
        f"training either ({loss}): {old} is at SPIN's fixed point or the step was too small "
        "to move it; try a larger learning rate or β on the validation split before another "
        "iteration",
    }
    parts = []
    if held_out:
        parts.append(
            f"Held out, on {held_out['examples']} validation prompts: accuracy "
            f"{_pm(held_out, 'reward_accuracy', '{:.2f}')}, margin "
            f"{_pm(held_out, 'reward_margin', '{:+.3f}')}"
        )
    parts.append(
        f"{'t' if held_out else 'T'}raining, last {training['last_steps']} of "
        f"{training['steps']} steps: accuracy "
        f"{_pm(training, 'reward_accuracy', '{:.2f}')}, margin "
        f"{_pm(training, 'reward_margin', '{:+.3f}')}"
    )
    answers = (
        f"{old}'s {pool['pairs']} pool answers: {pool.get('identical_to_real', 0):.0%} equal to "
        "the real ones"
    )
    if "generated_passes" in pool:
        answers += f", {pool['generated_passes']:.0%} pass their verifier"
        if "real_passes" in pool:
            answers += f" (the real ones: {pool['real_passes']:.0%})"
    parts.append(answers)
    return (
        f"- iteration {k} ({old} → {new}): {verdicts[entry['status']]}. " + "; ".join(parts) + "."
    )


def diagnostics_section(diagnostics: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| iteration | held-out accuracy | held-out margin | Δ log p real / generated "
        "(held-out) | training accuracy | training margin | Δ log p real / generated "
        "(training) | pool answers equal / pass |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in diagnostics.values():
        held, train, pool = entry.get("validation", {}), entry["training"], entry["pool"]
        held_change = (
            f"{held['logps_real_after'] - held['logps_real_before']:+.3f} / "
            f"{held['logps_generated_after'] - held['logps_generated_before']:+.3f}"
            if held
            else "–"
        )
        train_change = (
            f"{train['logps_real_change']:+.3f} / {train['logps_generated_change']:+.3f}"
            if "logps_real_change" in train
            else "–"
        )
        passing = f"{pool['generated_passes']:.2f}" if "generated_passes" in pool else "–"
        rows.append(
            f"| {entry['iteration']} | {_pm(held, 'reward_accuracy', '{:.2f}')} | "
            f"{_pm(held, 'reward_margin', '{:+.3f}')} | {held_change} | "
            f"{_pm(train, 'reward_accuracy', '{:.2f}')} | "
            f"{_pm(train, 'reward_margin', '{:+.3f}')} | {train_change} | "
            f"{pool.get('identical_to_real', 0):.2f} / {passing} |"
        )
    return [
        "## Is another iteration worth it?",
        "",
        "Iteration k trains θk+1 to tell the real answers from θk's. SPIN's fixed point is "
        "where it cannot: θk's answers are distributed like the real ones, the loss sits at "
        f"ln 2 = {LN2:.3f}, reward margins at 0 and accuracy at chance, and another iteration "
        "has nothing to learn. Held out: θk+1 on the validation prompts against θk's greedy "
        "answers. Training: the second half of the iteration's optimizer steps (batch means). "
        "Pool: θk's sampled answers the iteration trained on. Δ log p: change of the summed "
        "log-prob of an answer from θk to θk+1. [a, b]: 95% bootstrap intervals (over prompts, "
        "steps or pairs). How to read them: docs/spin.md (Is another iteration worth it?).",
        "",
        *(diagnostic_line(entry) for entry in diagnostics.values()),
        "",
        *rows,
        "",
        "![Per-iteration diagnostics](diagnostics.png)",
        "",
    ]


def write_diagnostics_chart(diagnostics: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(diagnostics.values())
    xs = [e["iteration"] for e in entries]
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.4))
    for ax, key, chance, title in (
        (axes[0], "reward_accuracy", 0.5, "reward accuracy (θk+1: real vs θk's)"),
        (axes[1], "reward_margin", 0.0, "reward margin"),
    ):
        for group, label, shift in (
            ("validation", "held out", -0.05),
            ("training", "training", 0.05),
        ):
            points = [(e["iteration"], e.get(group, {})) for e in entries]
            points = [(x, f) for x, f in points if key in f]
            if not points:
                continue
            ax.errorbar(
                [x + shift for x, _ in points],
                [f[key] for _, f in points],
                yerr=[
                    [f[key] - f[f"{key}_low"] for _, f in points],
                    [f[f"{key}_high"] - f[key] for _, f in points],
                ],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
    for key, label in (
        ("identical_to_real", "θk's answers equal to the real"),
        ("generated_passes", "θk's answers passing"),
        ("real_passes", "real answers passing"),
    ):
        points = [(e["iteration"], e["pool"][key]) for e in entries if key in e["pool"]]
        if points:
            axes[2].plot(*zip(*points, strict=True), marker="o", label=label)
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_title("θk's answers to the pool (share)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("iteration k (θk → θk+1)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

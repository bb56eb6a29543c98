"""Held-out evaluation of any model of the pipeline (``eval_<name>``) and the report.

Each model is scored on the test split and, by the same code, on the validation split (under
``validation`` in its metrics, rows in ``eval/<name>/validation.jsonl``): the report and the
MLflow ``champion`` alias choose the SPIN iteration on the validation split alone.

An evaluation whose graph node names an opponent (θk for θk+1, θ0 for the SFT-extra baseline)
reads the opponent's evaluation rows, so the reward margin needs no second model in memory.
With ``eval.lm_eval.tasks`` set, the same loaded model then runs those lm-evaluation-harness
tasks: their metrics join the stage's metrics under ``lm_eval`` and the harness's results are
written to ``eval/<name>/lm_eval.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinflow.config import Params
from spinflow.graph import build
from spinflow.io import atomic_path, read_jsonl, write_json, write_jsonl
from spinflow.nodes import DATA_DIR, Model
from spinflow.provenance import PROVENANCE_FILE, provenance
from spinflow.recipes.common import require


def _beta(params: Params, model: Model) -> float:
    """β of the SPIN iteration that made ``model``; ``spin.beta`` for any other model."""
    if model.iteration is not None:
        return params.train_for(model.iteration)[1]
    return params.spin.beta


def _load(params: Params, source: Path):
    """The checkpoint at ``source`` on the stage's device, its tokenizer and a generation engine
    over it (generate.engine): (model, tokenizer, engine)."""
    from spinflow.devices import stage_device
    from spinflow.engines import open_engine
    from spinflow.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    model = load_model(source, device=stage_device(params.device))
    engine = open_engine(
        params.generate, model, tokenizer, model_dir=source, batch_size=params.eval.batch_size
    )
    return model, tokenizer, engine


def _score(params: Params, loaded, records: list[dict], reference=None, beta: float = 0.1):
    """Evaluate the loaded model on ``records`` (eval.*, prompt.*); returns (metrics, rows), each
    row with its answers' token counts, so that every metric can be recomputed per example."""
    from spinflow.evaluation import evaluate as run_eval
    from spinflow.evaluation import token_counts

    model, tokenizer, engine = loaded
    metrics, rows = run_eval(
        model,
        tokenizer,
        records,
        prompt=params.prompt,
        params=params.eval,
        seed=params.seed,
        reference=reference,
        beta=beta,
        engine=engine,
    )
    counts = token_counts(tokenizer, records, [row["generated"] for row in rows], params.prompt)
    return metrics, [{**row, **count} for row, count in zip(rows, counts, strict=True)]


def _validate(params: Params, loaded, records: list[dict], reference, beta: float):
    """The same evaluation on the validation split, which chooses the SPIN iteration a user
    keeps without reading the test split; against an opponent each row also holds the
    opponent's log-probs and the reward margin (:func:`spinflow.evaluation.opponent_rows`).
    Returns (scalar metrics, rows)."""
    from spinflow.evaluation import opponent_rows

    metrics, rows = _score(params, loaded, records, reference, beta)
    if reference is not None:
        model, tokenizer, _ = loaded
        extra = opponent_rows(
            model,
            tokenizer,
            rows,
            reference,
            prompt=params.prompt,
            batch_size=params.eval.batch_size,
            beta=beta,
        )
        rows = [{**row, **more} for row, more in zip(rows, extra, strict=True)]
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}, rows


def evaluate(params: Params, name: str) -> dict[str, Any]:
    """Evaluate one model on the test split, and on the validation split under ``validation``:
    metrics/eval_<name>.json and eval/<name>/."""
    from spinflow.data import load_split
    from spinflow.engines import check_engine

    check_engine(params.generate.engine)
    benchmarks = None
    if params.eval.lm_eval.tasks:
        from spinflow import harness

        # unknown harness tasks or data that cannot be loaded stop here, before any model loads
        benchmarks = harness.prepare(params.eval.lm_eval)

    graph = build(params)
    evaluation = graph.evaluation(name)
    model_node = graph.model(evaluation.model)
    source = require(graph, model_node.path)
    records = load_split(DATA_DIR, "test")
    validation = load_split(DATA_DIR, "val")
    opponent = graph.evaluation(evaluation.opponent) if evaluation.opponent else None
    reference = (
        read_jsonl(require(graph, opponent.generations), ("id", "generated")) if opponent else None
    )
    val_reference = (
        read_jsonl(require(graph, opponent.validation), ("id", "generated"))
        if opponent and validation
        else None
    )
    beta = _beta(params, model_node)
    loaded = _load(params, source)
    val_rows: list[dict] = []
    with loaded[2]:  # the engine, released before the harness runs the model
        metrics, rows = _score(params, loaded, records, reference, beta)
        if validation:
            metrics["validation"], val_rows = _validate(
                params, loaded, validation, val_reference, beta
            )
    model, tokenizer, _ = loaded
    benchmark_results = None
    if benchmarks is not None:  # last: it may move the model to another device
        benchmark_results = harness.run(model, tokenizer, benchmarks)
        metrics["lm_eval"] = harness.headline(benchmark_results)
    metrics = {"model": name, **metrics}
    inputs = {"model": source, "test": DATA_DIR / "test.jsonl"}
    if validation:
        inputs["validation"] = DATA_DIR / "val.jsonl"
    if opponent:
        inputs["opponent"] = opponent.generations
    if benchmarks is not None and benchmarks.settings.include_path is not None:
        inputs["lm_eval_tasks"] = benchmarks.settings.include_path
    with atomic_path(evaluation.directory, directory=True) as tmp:
        write_jsonl(tmp / evaluation.generations.name, rows)
        if validation:
            write_jsonl(tmp / evaluation.validation.name, val_rows)
        if benchmark_results is not None:
            write_json(tmp / harness.RESULTS_FILE, benchmark_results)
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                evaluation.stage,
                {
                    "eval": params.eval.model_dump(),
                    "engine": params.generate.engine,
                    "prompt": params.prompt.model_dump(),
                    "beta": beta,
                    "seed": params.seed,
                },
                inputs,
            ),
        )
    write_json(evaluation.metrics, metrics)
    return metrics


def evaluate_checkpoints(
    params: Params, models: list[Path], split: str, data_dir: Path = DATA_DIR
) -> list[dict[str, Any]]:
    """Evaluate checkpoints outside the pipeline on one prepared split (``val`` to choose
    settings without looking at the test split): for each, its metrics and the 95% bootstrap
    intervals of verifier pass rate and exact match. Writes nothing."""
    from spinflow.data import SPLITS, load_split
    from spinflow.engines import check_engine
    from spinflow.errors import SpinflowError
    from spinflow.report import answer_scores, interval_cells

    if split not in SPLITS:
        raise SpinflowError(f"--split {split}: not a split (splits: {', '.join(SPLITS)})")
    for path in models:
        if not (path / "config.json").is_file():
            raise SpinflowError(f"{path}: not a checkpoint directory (no config.json in it)")
    check_engine(params.generate.engine)
    records = load_split(data_dir, split)
    if not records:
        raise SpinflowError(f"{data_dir / split}.jsonl is empty: nothing to evaluate")
    results = []
    for path in models:
        loaded = _load(params, path)
        with loaded[2]:  # the engine, released before the next checkpoint loads
            metrics, rows = _score(params, loaded, records)
        scores = answer_scores({row["id"]: row["generated"] for row in rows}, records)
        pass_rate, exact = interval_cells(scores)
        results.append(
            {
                "model": str(path),
                "split": split,
                **metrics,
                "verifier_pass_rate_ci": pass_rate,
                "exact_match_ci": exact,
            }
        )
    return results

"""AutoIF's part of the pipeline graph: autoif_supervise (with a supervisor), autoif_instructions,
autoif_verify, autoif_queries, then per iteration autoif_sample_iter_k and autoif_train_iter_k,
and the held-out instruction-following evaluations (eval_autoif_*)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from spinflow.errors import ConfigError
from spinflow.nodes import (
    DATA_DIR,
    EVALUATION,
    PROMPT_KEYS,
    TRAINING,
    Evaluation,
    Model,
    Stage,
    steps_csv,
    steps_plot,
    timings_file,
    train_metrics,
)

if TYPE_CHECKING:
    from spinflow.nodes import GraphBuilder

AUTOIF = "autoif"  # role of a model of the AutoIF chain, kind of its evaluations
AUTOIF_DIR = Path("autoif")
AUTOIF_INSTRUCTIONS = AUTOIF_DIR / "instructions"  # autoif_instructions: instructions.jsonl, drops
AUTOIF_VERIFIED = AUTOIF_DIR / "verified"  # autoif_verify: instructions.jsonl, drops.jsonl
AUTOIF_QUERIES = AUTOIF_DIR / "queries"  # autoif_queries: train.jsonl, eval.jsonl
AUTOIF_SEED_LIBRARY = "src/spinflow/methods/autoif/seeds.yaml"  # autoif.seeds: builtin
AUTOIF_SUPERVISED = AUTOIF_DIR / "supervised"  # autoif_supervise: instructions.yaml, drops.jsonl
AUTOIF_SANDBOX_KEYS = ("autoif.sandbox_workers", "autoif.call_timeout")


def autoif_samples_dir(k: int) -> Path:
    """autoif_sample_iter_k: samples.jsonl, sft.jsonl, pairs.jsonl."""
    return AUTOIF_DIR / f"iter_{k}"


def declare(graph: GraphBuilder) -> None:
    """AutoIF: instructions with verification functions (autoif_instructions), kept when the
    functions pass their cases in the sandbox (autoif_verify), attached to SFT prompts
    (autoif_queries); iteration k: θk samples responses scored by the functions
    (autoif_sample_iter_k) and DPO against θk on passing vs failing ones makes the AutoIF
    θk+1 (autoif_train_iter_k). θ0 and every AutoIF model are evaluated on queries with
    held-out instructions (eval_autoif_*).

    With ``autoif.with_spin`` the AutoIF chain is the SPIN chain: autoif_sample_iter_k
    samples from SPIN's θk for k < spin.iterations, train_iter_k trains on its pairs
    (:meth:`_spin`), there is no AutoIF model, and every SPIN θk+1 is evaluated on the
    held-out instructions (eval_autoif_iter_k)."""
    p = graph.params
    if not p.autoif.enabled:
        return
    seeds = AUTOIF_SEED_LIBRARY if p.autoif.seeds == "builtin" else p.autoif.seeds
    supervised: tuple[str, ...] = ()
    if p.autoif.supervisor is not None:
        if not Path(p.autoif.supervisor).is_dir():
            raise ConfigError(
                f"autoif.supervisor: {p.autoif.supervisor} is not a directory; it must be "
                "a local model checkpoint (for example models/theta_0)"
            )
        supervised = (str(AUTOIF_SUPERVISED),)
        graph.add(
            Stage(
                "autoif_supervise",
                "autoif_supervise",
                (seeds, p.autoif.supervisor),
                (
                    "autoif.seeds",
                    "autoif.supervisor_rounds",
                    "autoif.supervisor_instructions",
                    "autoif.supervisor_attempts",
                    "autoif.supervisor_max_new_tokens",
                    "autoif.temperature",
                    "autoif.top_p",
                    "generate.engine",
                    "generate.dtype",
                    "generate.batch_size",
                    "generate.vllm",
                    "prompt.system_prompt",
                    "prompt.max_prompt_length",
                    "seed",
                ),
                outs=supervised,
                metrics=(str(train_metrics("autoif_supervise")),),
            )
        )
    graph.add(
        Stage(
            "autoif_instructions",
            "autoif_instructions",
            (seeds, *supervised),
            ("autoif.seeds", "autoif.supervisor", "autoif.min_cases"),
            outs=(str(AUTOIF_INSTRUCTIONS),),
            metrics=(str(train_metrics("autoif_instructions")),),
        )
    )
    sandbox = AUTOIF_SANDBOX_KEYS
    graph.add(
        Stage(
            "autoif_verify",
            "autoif_verify",
            (str(AUTOIF_INSTRUCTIONS),),
            ("autoif.min_function_accuracy", "autoif.min_functions", *sandbox),
            outs=(str(AUTOIF_VERIFIED),),
            metrics=(str(train_metrics("autoif_verify")),),
        )
    )
    engine = ("generate.engine", "generate.dtype", "generate.batch_size", "generate.vllm")
    prompt = ("prompt.system_prompt", "prompt.max_prompt_length", "seed")
    # the supervisor rates the training queries (autoif.query_min_score)
    scoring = p.autoif.supervisor is not None and p.autoif.query_min_score is not None
    graph.add(
        Stage(
            "autoif_queries",
            "autoif_queries",
            (str(AUTOIF_VERIFIED), str(DATA_DIR), *((p.autoif.supervisor,) if scoring else ())),
            (
                "autoif.heldout",
                "autoif.queries",
                "autoif.eval_queries",
                "autoif.eval_instructions_per_query",
                *(
                    ("autoif.query_min_score", "eval.batch_size", *engine, *prompt)
                    if scoring
                    else ("seed",)
                ),
            ),
            outs=(str(AUTOIF_QUERIES),),
            metrics=(str(train_metrics("autoif_queries")),),
        )
    )
    _evaluate_instructions(
        graph, f"{AUTOIF}_theta_0", graph.theta(0).name, sandbox + engine + prompt
    )
    combined = p.autoif.with_spin
    previous = graph.theta(0)
    for k in range(p.spin.iterations if combined else p.autoif.iterations):
        samples = autoif_samples_dir(k)
        graph.add(
            Stage(
                f"autoif_sample_iter_{k}",
                "autoif_sample",
                (str(previous.path), str(AUTOIF_QUERIES)),
                (
                    "autoif.samples",
                    "autoif.temperature",
                    "autoif.top_p",
                    "autoif.max_new_tokens",
                    "autoif.chosen_min",
                    "autoif.pairs_per_query",
                    *sandbox,
                    *engine,
                    *prompt,
                ),
                outs=(str(samples),),
                metrics=(str(train_metrics(f"autoif_sample_iter_{k}")),),
                args={"k": k},
            )
        )
        if combined:  # train_iter_k trains on the pairs; SPIN's θk+1 is evaluated
            previous = graph.theta(k + 1)
            _evaluate_instructions(
                graph, f"{AUTOIF}_iter_{k}", previous.name, sandbox + engine + prompt
            )
            continue
        name, stage = f"{AUTOIF}_theta_{k + 1}", f"autoif_train_iter_{k}"
        graph.models[name] = Model(
            name,
            Path(f"models/{name}"),
            stage,
            f"θ{k + 1} (AutoIF iter {k})",
            AUTOIF,
            iteration=k,
            step=k + 1,
            run_name=f"autoif_iter_{k}",
            train_metrics=train_metrics(stage),
            steps_csv=steps_csv(stage),
            timings=timings_file(stage),
            opponent=previous.name,
            chart=AUTOIF,
        )
        graph.add(
            Stage(
                stage,
                "autoif_train",
                (str(previous.path), str(samples)),
                (
                    "autoif.train",
                    "autoif.beta",
                    "autoif.sft_first",
                    *(("sft",) if p.autoif.sft_first else ()),
                    *PROMPT_KEYS,
                ),
                outs=(f"models/{name}",),
                metrics=(str(train_metrics(stage)),),
                plots=(steps_plot(stage),),
                accelerate="spin.accelerate_config",
                args={"k": k},
                track=TRAINING,
                subject=name,
            )
        )
        _evaluate_instructions(graph, f"{AUTOIF}_iter_{k}", name, sandbox + engine + prompt)
        previous = graph.models[name]
    # the report's table of what each filter kept
    graph.report_inputs += [
        str(train_metrics(s))
        for s in graph.stages
        if s in ("autoif_supervise", "autoif_instructions", "autoif_verify", "autoif_queries")
        or s.startswith("autoif_sample_iter_")
    ]


def _evaluate_instructions(
    graph: GraphBuilder, name: str, model: str, params: tuple[str, ...]
) -> None:
    evaluation = Evaluation(name, model, f"eval_{name}", None, kind=AUTOIF)
    graph.evaluations[name] = evaluation
    graph.add(
        Stage(
            evaluation.stage,
            "autoif_evaluate",
            (str(graph.models[model].path), str(AUTOIF_QUERIES)),
            ("autoif.max_new_tokens", "eval.batch_size", *params),
            outs=(str(evaluation.directory),),
            metrics=(str(evaluation.metrics),),
            args={"name": name},
            track=EVALUATION,
            subject=name,
        )
    )

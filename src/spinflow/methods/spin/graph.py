"""SPIN's part of the pipeline graph: per iteration k, generate_iter_k (θk answers the pool),
train_iter_k (θk+1 learns to tell the real answers from θk's) and eval_iter_k; then the
continued-SFT baselines its verdict compares with (sft_extra, sft_extra_compute)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from spinflow.methods.autoif.graph import (
    AUTOIF_SANDBOX_KEYS,
    AUTOIF_VERIFIED,
    autoif_samples_dir,
)
from spinflow.nodes import (
    DATA_DIR,
    ITERATION,
    METRICS_DIR,
    PROMPT_KEYS,
    REPORT_DIR,
    SFT_EXTRA,
    TRAINING,
    WITH_SPIN,
    Model,
    Stage,
    steps_csv,
    steps_plot,
    timings_file,
    train_metrics,
)

if TYPE_CHECKING:
    from spinflow.config import Params
    from spinflow.nodes import GraphBuilder

# the report's metrics: paired differences and the verdict; per-iteration diagnostics
COMPARISONS = METRICS_DIR / "comparisons.json"
DIAGNOSTICS = METRICS_DIR / "diagnostics.json"
DIAGNOSTICS_CHART = REPORT_DIR / "diagnostics.png"


def generated_dir(k: int) -> Path:
    return Path(f"generated/iter_{k}")


def pairs_file(k: int) -> Path:
    return generated_dir(k) / "pairs.jsonl"


def spin_steps(k: int) -> Path:
    """Optimizer steps of train_iter_k alone, so sft_extra re-runs only when that count changes."""
    return train_metrics(f"spin_steps_iter_{k}")


def mixed_iterations(params: Params, k: int) -> range:
    """Iterations whose pairs train_iter_k trains on: its own and ``spin.mix_previous`` before."""
    return range(max(0, k - params.spin.mix_previous), k + 1)


def declare(graph: GraphBuilder) -> None:
    """The SPIN iterations, then the baselines the verdict compares them with."""
    _iterations(graph)
    _baselines(graph)
    # the report's paired differences and verdict, and per-iteration diagnostics
    graph.report_metrics += [str(COMPARISONS), str(DIAGNOSTICS)]
    graph.report_outs.append(str(DIAGNOSTICS_CHART))


def _iterations(graph: GraphBuilder) -> None:
    """Iteration k: θk answers the pool (generate_iter_k), θk+1 learns to tell the real
    answers from θk's (train_iter_k), θk+1 is evaluated against θk (eval_iter_k).

    With ``autoif.with_spin`` the pool also takes θ0's verified AutoIF answers (autoif/iter_0)
    and the generated ones are checked by the instructions' functions (autoif/verified, in
    the sandbox); train_iter_k also trains on iteration k's AutoIF pairs (autoif/iter_k),
    made by autoif_sample_iter_k from θk (:meth:`_autoif`)."""
    p = graph.params
    combined = p.autoif.with_spin
    for k in range(p.spin.iterations):
        theta_k = graph.theta(k)
        extra_inputs = (str(autoif_samples_dir(0)), str(AUTOIF_VERIFIED)) if combined else ()
        extra_params = (*AUTOIF_SANDBOX_KEYS, WITH_SPIN) if combined else ()
        graph.add(
            Stage(
                f"generate_iter_{k}",
                "generate",
                (str(theta_k.path), str(DATA_DIR), *extra_inputs),
                (
                    "generate",
                    "prompt.system_prompt",
                    "prompt.max_prompt_length",
                    "seed",
                    *extra_params,
                ),
                outs=(str(generated_dir(k)),),
                accelerate="generate.accelerate_config",
                args={"k": k},
            )
        )
        override = (f"spin.per_iteration.iter_{k}",) if f"iter_{k}" in p.spin.per_iteration else ()
        mixed = tuple(generated_dir(j) for j in mixed_iterations(p, k))
        autoif_pairs = (
            (str(autoif_samples_dir(k)), str(train_metrics(f"autoif_sample_iter_{k}")))
            if combined
            else ()
        )
        name = f"theta_{k + 1}"
        stage = f"train_iter_{k}"
        graph.models[name] = Model(
            name,
            Path(f"models/{name}"),
            stage,
            f"θ{k + 1} (SPIN + AutoIF iter {k})" if combined else f"θ{k + 1} (SPIN iter {k})",
            ITERATION,
            index=k + 1,
            iteration=k,
            step=k + 1,
            run_name=f"iter_{k}",
            train_metrics=train_metrics(stage),
            steps_csv=steps_csv(stage),
            timings=timings_file(stage),
            pairs=tuple(pairs_file(j) for j in mixed_iterations(p, k)),
            opponent=theta_k.name,
        )
        graph.add(
            Stage(
                stage,
                "train",
                (str(theta_k.path), *map(str, mixed), *autoif_pairs),
                (
                    "spin.train",
                    "spin.beta",
                    "spin.loss",
                    "spin.mix_previous",
                    "spin.feedback_filter",
                )
                + PROMPT_KEYS
                + override
                + ((WITH_SPIN,) if combined else ()),
                outs=(f"models/{name}",),
                metrics=(str(train_metrics(stage)), str(spin_steps(k))),
                plots=(steps_plot(stage),),
                accelerate="spin.accelerate_config",
                args={"k": k},
                track=TRAINING,
                subject=name,
            )
        )
        opponent = graph.evaluation_of(theta_k.name)
        graph.add_evaluation(f"iter_{k}", name, opponent.name, ("spin.beta", *override))
        # the report's per-iteration diagnostics: the iteration's steps and θk's pool answers
        graph.report_inputs += [str(steps_csv(stage)), str(generated_dir(k))]


def _baselines(graph: GraphBuilder) -> None:
    """Baselines: θ0 trained further with plain SFT on the SFT split, for as many optimizer
    steps as all of SPIN (sft_extra) and for as much compute (sft_extra_compute)."""
    p = graph.params
    if not p.sft_extra.enabled:
        return
    theta_0 = graph.theta(0)
    spin_files = tuple(str(spin_steps(k)) for k in range(p.spin.iterations))
    variants = [("sft_extra", "SFT-extra (same steps)", "steps")]
    if p.sft_extra.compute:
        variants.append(("sft_extra_compute", "SFT-extra (same compute)", "compute"))
    for name, label, budget in variants:
        graph.models[name] = Model(
            name,
            Path(f"models/{name}"),
            name,
            label,
            SFT_EXTRA,
            run_name=name,
            train_metrics=train_metrics(name),
            steps_csv=steps_csv(name),
            timings=timings_file(name),
            opponent=theta_0.name,
            chart=name,
            step=p.spin.iterations,
        )
        graph.add(
            Stage(
                name,
                "sft_extra",
                (str(theta_0.path), str(DATA_DIR), *spin_files),
                ("sft", *PROMPT_KEYS),
                outs=(f"models/{name}",),
                metrics=(str(train_metrics(name)),),
                plots=(steps_plot(name),),
                accelerate="spin.accelerate_config",
                args={"budget": budget},
                track=TRAINING,
                subject=name,
            )
        )
        graph.add_evaluation(name, name, graph.evaluation_of(theta_0.name).name, ("spin.beta",))

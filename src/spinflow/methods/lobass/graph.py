"""LoBaSS's part of the pipeline graph: lobass_score, lobass_select, and the fine-tunings on the
selection and on a random selection of the same size (sft_lobass, sft_random), each evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from spinflow.nodes import (
    BASE_MODEL,
    DATA_DIR,
    PROMPT_KEYS,
    REPORT_DIR,
    TRAINING,
    Model,
    Stage,
    steps_csv,
    steps_plot,
    timings_file,
    train_metrics,
)

if TYPE_CHECKING:
    from spinflow.nodes import GraphBuilder

LOBASS, RANDOM_SELECTION = "lobass", "random_selection"  # roles of its two models
LOBASS_DIR = Path("lobass")
LOBASS_SCORES = LOBASS_DIR / "scores"  # lobass_score: scores.jsonl, provenance.json
LOBASS_SELECTION = LOBASS_DIR / "selection"  # lobass_select: selected.jsonl, random.jsonl
SCORE_HISTOGRAM = REPORT_DIR / "lobass_scores.png"


def declare(graph: GraphBuilder) -> None:
    """LoBaSS: score every SFT example by learnability (base model vs θ0 trained on all of
    them), keep the top fraction, fine-tune the base model on it; the same on a random
    selection of the same size is the control."""
    p = graph.params
    if not p.lobass.enabled:
        return
    scores = LOBASS_SCORES
    graph.add(
        Stage(
            "lobass_score",
            "lobass_score",
            (str(BASE_MODEL), "models/theta_0", str(DATA_DIR)),
            ("prompt", "eval.batch_size"),
            outs=(str(scores),),
            metrics=(str(train_metrics("lobass_score")),),
        )
    )
    selection = LOBASS_SELECTION
    graph.add(
        Stage(
            "lobass_select",
            "lobass_select",
            (str(scores), str(DATA_DIR)),
            ("lobass.fraction", "lobass.min_examples", "sft.batch_size", "seed"),
            outs=(str(selection),),
            metrics=(str(train_metrics("lobass_select")),),
        )
    )
    start = p.spin.start == "lobass"
    for name, role, label in (
        (
            "sft_lobass",
            LOBASS,
            "θ0 (SFT on the LoBaSS selection)" if start else "SFT on the LoBaSS selection",
        ),
        ("sft_random", RANDOM_SELECTION, "SFT on a random selection (control)"),
    ):
        on_chain = start and role == LOBASS
        graph.models[name] = Model(
            name,
            Path(f"models/{name}"),
            name,
            label,
            role,
            index=0 if on_chain else None,
            run_name=name,
            train_metrics=train_metrics(name),
            steps_csv=steps_csv(name),
            timings=timings_file(name),
            chart="eval" if on_chain else name,
        )
        graph.add(
            Stage(
                name,
                "sft_selection",
                (str(BASE_MODEL), str(selection)),
                ("sft", *PROMPT_KEYS),
                outs=(f"models/{name}",),
                metrics=(str(train_metrics(name)),),
                plots=(steps_plot(name),),
                accelerate="spin.accelerate_config",
                args={"role": role},
                track=TRAINING,
                subject=name,
            )
        )
        graph.add_evaluation(name, name, None, ())
    graph.report_inputs += [
        str(scores),
        str(train_metrics("lobass_score")),
        str(train_metrics("lobass_select")),
    ]
    graph.report_outs.append(str(SCORE_HISTOGRAM))

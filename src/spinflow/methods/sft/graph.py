"""SFT's part of the pipeline graph: θ0, the base model fine-tuned on the SFT split (stage
``sft``), and its evaluation (``eval_sft``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from spinflow.nodes import (
    BASE_MODEL,
    BASELINE,
    DATA_DIR,
    PROMPT_KEYS,
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


def declare(graph: GraphBuilder) -> None:
    """θ0: the base model fine-tuned on the SFT split, or the base model itself.

    With ``spin.start: lobass`` the SFT model stays (LoBaSS scores against it) but the SPIN
    chain starts from the model fine-tuned on the LoBaSS selection instead.
    """
    p = graph.params
    on_chain = p.spin.start == "sft"
    if p.sft.enabled:
        graph.models["theta_0"] = Model(
            "theta_0",
            Path("models/theta_0"),
            "sft",
            "θ0 (SFT)" if on_chain else "SFT (all data)",
            BASELINE,
            index=0 if on_chain else None,
            run_name="theta_0 (sft)",
            train_metrics=train_metrics("sft"),
            steps_csv=steps_csv("sft"),
            timings=timings_file("sft"),
            chart="eval" if on_chain else "sft",
        )
        graph.add(
            Stage(
                "sft",
                "sft",
                (str(BASE_MODEL), str(DATA_DIR)),
                ("sft", *PROMPT_KEYS),
                outs=("models/theta_0",),
                metrics=(str(train_metrics("sft")),),
                plots=(steps_plot("sft"),),
                accelerate="spin.accelerate_config",
                track=TRAINING,
                subject="theta_0",
            )
        )
    else:
        graph.models["theta_0"] = Model(
            "theta_0",
            BASE_MODEL,
            "prepare_model",
            "θ0 (base)",
            BASELINE,
            index=0,
            run_name="theta_0 (base)",
        )
    graph.add_evaluation("sft", "theta_0", None, ())

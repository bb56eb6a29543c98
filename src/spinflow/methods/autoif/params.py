"""The ``autoif`` section: instructions verified by code, execution feedback, online DPO."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from spinflow.schema import (
    NewTokens,
    OptimParams,
    PositiveInt,
    Probability,
    Section,
)


class AutoifTrainParams(OptimParams):
    """AutoIF's optimisation defaults: RMSprop at 2e-6, as SPIN."""

    learning_rate: Annotated[float, Field(gt=0.0)] = Field(2e-6, description="Peak learning rate")


class AutoifParams(Section):
    """AutoIF (arXiv 2406.13542): instructions checked by code, execution feedback, online DPO."""

    enabled: bool = Field(
        False,
        description="Verifiable instructions attached to SFT prompts; θk's samples scored by "
        "their functions in the sandbox; DPO on passing vs failing samples (autoif_* stages)",
    )
    seeds: str = Field(
        "builtin",
        description='Instruction library: "builtin" (the seed library shipped with spinflow) '
        "or a YAML file of the same shape",
    )
    iterations: PositiveInt = Field(
        2, description="AutoIF iterations (online DPO rounds); not read with autoif.with_spin"
    )
    with_spin: bool = Field(
        False,
        description="Combine with SPIN: the AutoIF chain is the SPIN chain (θk of SPIN samples, "
        "no AutoIF models, one AutoIF iteration per SPIN iteration); SPIN also answers θ0's "
        "verified AutoIF queries, a generated answer passing its instruction's functions is "
        "filtered like one passing its verifier (spin.feedback_filter), and train_iter_k trains "
        "on SPIN's and iteration k's AutoIF pairs together",
    )
    min_cases: PositiveInt = Field(3, description="Drop an instruction with fewer usable cases")
    min_function_accuracy: Probability = Field(
        0.8,
        description="Keep a function whose accuracy on its cases reaches this (paper 0.5, code 0.8)",
    )
    min_functions: PositiveInt = Field(
        1, description="Keep an instruction that keeps at least this many functions"
    )
    heldout: PositiveInt = Field(
        12, description="Instructions held out for evaluation (never trained on)"
    )
    queries: PositiveInt = Field(
        32, description="Training queries: an SFT prompt with one training instruction"
    )
    eval_queries: PositiveInt = Field(
        32, description="Evaluation queries: a test prompt with held-out instructions"
    )
    eval_instructions_per_query: PositiveInt = Field(
        2, description="Most held-out instructions given together in one evaluation query"
    )
    samples: PositiveInt = Field(4, description="Responses θk samples per query")
    temperature: Annotated[float, Field(ge=0.0)] = Field(
        0.8, description="Sampling temperature (paper: 0.8)"
    )
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1.0, description="Nucleus sampling mass")
    max_new_tokens: NewTokens = Field(
        64, description="Longest sampled and evaluated response, in tokens"
    )
    chosen_min: Probability = Field(
        0.5, description="A sample passing at least this share of its functions may be chosen"
    )
    pairs_per_query: PositiveInt = Field(
        4, description="Most (chosen, rejected) pairs per query (paper: 2×2)"
    )
    beta: Annotated[float, Field(gt=0.0)] = Field(0.1, description="β of the DPO loss")
    sandbox_workers: PositiveInt = Field(2, description="Sandbox calls run side by side")
    call_timeout: Annotated[float, Field(gt=0.0, le=60.0)] = Field(
        2.0, description="Seconds one function call may take in the sandbox"
    )
    allow_weak_sandbox: bool = Field(
        False,
        description="Run model-written functions even where no sandbox layer keeps them from "
        "this user's files (neither Landlock, Linux 5.13+, nor bubblewrap works here); false: "
        "such stages stop with one line naming the missing layer",
    )
    supervisor: str | None = Field(
        None,
        description="A local checkpoint directory that writes new instructions, functions and "
        "cases from the seeds (autoif_supervise; null: the library alone)",
    )
    supervisor_rounds: PositiveInt = Field(
        4, description="Self-instruct prompts to the supervisor, each with 8 seed examples"
    )
    supervisor_instructions: PositiveInt = Field(
        16, description="Most new instructions kept from the supervisor"
    )
    supervisor_attempts: PositiveInt = Field(
        3, description="Functions with cases the supervisor writes per new instruction"
    )
    supervisor_max_new_tokens: NewTokens = Field(
        256, description="Longest supervisor answer, in tokens"
    )
    query_min_score: Annotated[int, Field(ge=1, le=10)] | None = Field(
        8,
        description="Keep a training query the supervisor rates at least this, from 1 to 10, as "
        "answerable while following its instruction (paper: 8); read only with "
        "autoif.supervisor (without one the queries are not scored); null: no scoring",
    )
    sft_first: bool = Field(
        True,
        description="Each AutoIF iteration first fine-tunes θk on the samples passing every "
        "function (sft.jsonl, with the sft settings), then runs DPO from that model, as the "
        "paper does; false: DPO only",
    )
    train: AutoifTrainParams = Field(default_factory=AutoifTrainParams)

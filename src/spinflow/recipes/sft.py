"""Supervised fine-tuning: θ0 (stage ``sft``) and the SFT-extra baseline (stage ``sft_extra``).

The baseline keeps training θ0 with plain SFT on the SPIN pool's real answers for as many
optimizer steps as all SPIN iterations took together, so SPIN is compared at equal steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinflow import graph as pipeline_graph
from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.graph import DATA_DIR, Graph, Model
from spinflow.io import read_json, write_json, write_rows_csv
from spinflow.provenance import PROVENANCE_FILE, provenance
from spinflow.recipes.common import require
from spinflow.seeds import stage_seed
from spinflow.timings import write_timings


def supervised(
    params: Params,
    target: Model,
    *,
    source: Path,
    records: list[dict],
    max_steps: int | None,
    extra_inputs: dict[str, Path],
) -> dict[str, Any]:
    """Fine-tune ``source`` on ``records`` with the ``sft`` settings into ``target``'s path;
    writes its provenance, training summary and per-step CSV."""
    from spinflow.models import load_model, load_tokenizer
    from spinflow.precision import resolve_precision
    from spinflow.training import (
        answer_tokens,
        apply_lora,
        encode_sft,
        make_accelerator,
        save_checkpoint,
        seed_everything,
        sft_collate,
        sft_loss_fn,
        train_loop,
    )

    optim = params.sft
    stage = target.stage
    seed = stage_seed(params.seed, stage)
    seed_everything(seed)
    tokenizer = load_tokenizer(source)
    model = apply_lora(load_model(source), optim)
    examples = encode_sft(tokenizer, records, params.prompt)
    collate_fn = sft_collate(tokenizer.pad_token_id)
    optim, precision = resolve_precision(
        optim, model, collate_fn(examples[: optim.batch_size]), sft_loss_fn, key="sft.bf16"
    )
    accelerator = make_accelerator(optim)
    result = train_loop(
        accelerator,
        model,
        examples,
        collate_fn,
        sft_loss_fn,
        optim,
        seed=seed,
        desc=stage,
        max_steps=max_steps,
        items=answer_tokens,
    )
    # main process only: it hashes the inputs, a whole checkpoint among them
    made_by = accelerator.is_main_process and provenance(
        stage,
        {
            "sft": params.sft.model_dump(),
            "precision": precision.name,
            "prompt": params.prompt.model_dump(),
            "max_steps": max_steps,
            "seed": params.seed,
        },
        {"model": source, **extra_inputs},
    )
    save_checkpoint(
        accelerator, model, tokenizer, target.path, {PROVENANCE_FILE: made_by} if made_by else None
    )
    summary = {"examples": len(examples), **precision.summary(), **result.summary()}
    if accelerator.is_main_process:
        write_json(target.train_metrics, summary)
        write_rows_csv(target.steps_csv, result.history)
        write_timings(target.timings, target.path, result.timings())
    return {**summary, **result.timings()}


def sft(params: Params) -> dict[str, Any]:
    """θ0: the base model fine-tuned on the SFT split."""
    from spinflow.data import load_split

    graph = pipeline_graph.build(params)
    records = load_split(DATA_DIR, "sft")
    if not records:
        raise SpinflowError(
            "data/prepared/sft.jsonl is empty: raise data.num_sft or set sft.enabled: false"
        )
    return supervised(
        params,
        graph.model("theta_0"),  # θ0 of the chain unless spin.start picks another model
        source=require(graph, graph.model("base").path),
        records=records,
        max_steps=None,
        extra_inputs={"data": DATA_DIR / "sft.jsonl"},
    )


def spin_optimizer_steps(params: Params, graph: Graph | None = None) -> int:
    """Optimizer steps that all SPIN iterations took, read from their training metrics."""
    graph = graph or pipeline_graph.build(params)
    total = 0
    for k in range(params.spin.iterations):
        path = require(graph, pipeline_graph.spin_steps(k))
        total += int(read_json(path)["optimizer_steps"])
    return total


def sft_extra(params: Params) -> dict[str, Any]:
    """Baseline: θ0 trained further with plain SFT on the SPIN pool's real answers, for as many
    optimizer steps as all SPIN iterations together."""
    from spinflow.data import load_split

    graph = pipeline_graph.build(params)
    return supervised(
        params,
        graph.model("sft_extra"),
        source=require(graph, graph.theta(0).path),
        records=load_split(DATA_DIR, "pool"),
        max_steps=spin_optimizer_steps(params, graph),
        extra_inputs={"data": DATA_DIR / "pool.jsonl"},
    )

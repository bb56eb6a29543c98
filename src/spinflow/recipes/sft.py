"""Supervised fine-tuning: θ0 (stage ``sft``) and the SFT-extra baselines.

θ0 is trained for at most ``sft.epochs`` epochs; with ``sft.patience`` it stops once its loss on
the validation split has not improved for that many epochs and keeps the best epoch's weights.

The baselines keep training θ0 with plain SFT on the same SFT split: ``sft_extra`` for as many
optimizer steps as all SPIN iterations took together, ``sft_extra_compute`` for as much training
compute (:func:`spin_compute`), so SPIN is compared at equal steps and at equal cost.
"""

from __future__ import annotations

import math
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
    validation: list[dict] | None = None,
    patience: int | None = None,
    budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``source`` on ``records`` with the ``sft`` settings into ``target``'s path;
    writes its provenance, training summary and per-step CSV.

    With ``validation`` records the loss on them is measured after every epoch (the curve goes
    into the summary); with ``patience`` too, training stops after that many epochs without a
    lower loss and the best epoch's weights are the ones saved. ``budget`` (what ``max_steps``
    was derived from) goes into the summary as it is.
    """
    from spinflow.devices import stage_device
    from spinflow.models import load_model, load_tokenizer
    from spinflow.precision import resolve_precision
    from spinflow.training import (
        Resume,
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
    device = stage_device(params.device)
    tokenizer = load_tokenizer(source)
    model = apply_lora(load_model(source, device=device), optim)
    examples = encode_sft(tokenizer, records, params.prompt)
    collate_fn = sft_collate(tokenizer.pad_token_id)
    optim, precision = resolve_precision(
        optim,
        model,
        collate_fn(examples[: optim.batch_size]),
        sft_loss_fn,
        key="sft.bf16",
        device=device,
    )
    accelerator = make_accelerator(optim, device)
    watch = (
        _Validation(accelerator, tokenizer, validation, params, patience) if validation else None
    )
    # main process only: it hashes the inputs, a whole checkpoint among them
    made_by = accelerator.is_main_process and provenance(
        stage,
        {
            "sft": params.sft.model_dump(),
            "precision": precision.name,
            "prompt": params.prompt.model_dump(),
            "max_steps": max_steps,
            "patience": patience,
            "seed": params.seed,
        },
        {"model": source, **extra_inputs},
    )
    resume = Resume.for_stage(stage, params.resume.every_steps, made_by or None)
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
        on_epoch=watch,
        resume=resume,
        steps_csv=target.steps_csv,
    )
    if watch is not None:
        watch.restore_best(model)
    save_checkpoint(
        accelerator, model, tokenizer, target.path, {PROVENANCE_FILE: made_by} if made_by else None
    )
    if resume is not None:
        resume.finish(accelerator)
    summary = {
        "examples": len(examples),
        **precision.summary(),
        **result.summary(),
        **(watch.summary() if watch is not None else {}),
        **(budget or {}),
    }
    if accelerator.is_main_process:
        write_json(target.train_metrics, summary)
        write_rows_csv(target.steps_csv, result.history)  # the streamed file, in one piece
        write_timings(target.timings, target.path, result.timings())
    return {**summary, **result.timings()}


class _Validation:
    """Loss per answer token on the validation split after each epoch; with ``patience``, the
    early-stopping rule and a copy of the best epoch's weights (in CPU memory)."""

    def __init__(self, accelerator, tokenizer, records, params: Params, patience: int | None):
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.records = records
        self.params = params
        self.patience = patience
        self.curve: list[dict[str, float]] = []
        self.best_epoch = 0
        self.best_state: dict | None = None

    def loss(self, model) -> float:
        import torch

        from spinflow.evaluation import answer_logps

        model = self.accelerator.unwrap_model(model)
        with torch.no_grad(), self.accelerator.autocast():
            logps, counts = answer_logps(
                model,
                self.tokenizer,
                self.records,
                [r["answer"] for r in self.records],
                self.params.prompt,
                self.params.sft.batch_size,
                desc="validation loss",
            )
        model.train()
        return -sum(logps) / max(1, sum(counts))

    def __call__(self, epoch: int, model) -> bool:
        loss = round(self.loss(model), 6)
        self.curve.append({"epoch": epoch, "val_loss": loss})
        if loss <= min(point["val_loss"] for point in self.curve):
            self.best_epoch = epoch
            if self.patience is not None:
                state = self.accelerator.unwrap_model(model).state_dict()
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        return self.patience is not None and epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the curve so far and the best epoch's weights."""
        return {"curve": self.curve, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = state["curve"]
        self.best_epoch = state["best_epoch"]
        self.best_state = state["best_state"]

    def restore_best(self, model) -> None:
        """Load the best epoch's weights, when training went on past it."""
        if self.best_state is not None and self.best_epoch != self.curve[-1]["epoch"]:
            self.accelerator.unwrap_model(model).load_state_dict(self.best_state)
        self.best_state = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"validation": self.curve}
        if self.curve:
            out["epochs_trained"] = self.curve[-1]["epoch"]
            if self.patience is not None:
                out["best_epoch"] = self.best_epoch
            kept = self.best_epoch if self.patience is not None else self.curve[-1]["epoch"]
            out["val_loss"] = next(p["val_loss"] for p in self.curve if p["epoch"] == kept)
        return out


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
        extra_inputs={"data": DATA_DIR / "sft.jsonl", "val": DATA_DIR / "val.jsonl"},
        validation=load_split(DATA_DIR, "val"),
        patience=params.sft.patience,
    )


def _spin_totals(params: Params, graph: Graph, key: str) -> int:
    """The sum of ``key`` over every SPIN iteration's step file (train_iter_k writes them)."""
    total = 0
    for k in range(params.spin.iterations):
        path = require(graph, pipeline_graph.spin_steps(k))
        values = read_json(path)
        if key not in values:
            raise SpinflowError(f"{path}: no {key!r}; run `dvc repro train_iter_{k}` again")
        total += int(values[key])
    return total


def spin_optimizer_steps(params: Params, graph: Graph | None = None) -> int:
    """Optimizer steps that all SPIN iterations took, read from their training metrics."""
    return _spin_totals(params, graph or pipeline_graph.build(params), "optimizer_steps")


def spin_compute(params: Params, graph: Graph | None = None) -> int:
    """Token passes that all SPIN iterations cost (see
    :func:`spinflow.recipes.spin.iteration_compute`)."""
    return _spin_totals(params, graph or pipeline_graph.build(params), "compute_tokens")


def steps_for_compute(params: Params, tokenizer, records: list[dict], compute: int) -> int:
    """Optimizer steps of plain SFT on ``records`` that cost ``compute`` token passes (forward
    and backward, three a token), rounded up: a step costs the epoch's share of its tokens."""
    from spinflow.training import encode_sft

    tokens_per_epoch = sum(e.length for e in encode_sft(tokenizer, records, params.prompt))
    optim = params.sft
    steps_per_epoch = math.ceil(
        math.ceil(len(records) / optim.batch_size) / optim.gradient_accumulation_steps
    )
    return max(1, math.ceil(compute / (3 * tokens_per_epoch) * steps_per_epoch))


def sft_extra(params: Params, budget: str = "steps") -> dict[str, Any]:
    """Baseline: θ0 trained further with plain SFT on the SFT split, for as many optimizer steps
    as all SPIN iterations together (``budget="steps"``, stage sft_extra) or for as much compute,
    generation and reference passes included (``"compute"``, stage sft_extra_compute)."""
    from spinflow.data import load_split
    from spinflow.models import load_tokenizer

    graph = pipeline_graph.build(params)
    source = require(graph, graph.theta(0).path)
    records = load_split(DATA_DIR, "sft")
    if budget == "steps":
        name = "sft_extra"
        steps = spin_optimizer_steps(params, graph)
        spent = {"spin_optimizer_steps": steps}
    else:
        name = "sft_extra_compute"
        compute = spin_compute(params, graph)
        steps = steps_for_compute(params, load_tokenizer(source), records, compute)
        spent = {"spin_compute_tokens": compute}
    return supervised(
        params,
        graph.model(name),
        source=source,
        records=records,
        max_steps=steps,
        extra_inputs={"data": DATA_DIR / "sft.jsonl", "val": DATA_DIR / "val.jsonl"},
        validation=load_split(DATA_DIR, "val"),
        budget=spent,
    )

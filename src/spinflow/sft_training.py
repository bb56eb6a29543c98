"""Supervised fine-tuning of one model on a list of records, with the ``sft`` settings: the
training every method that fine-tunes on answers shares (θ0, the SFT-extra baselines, the
LoBaSS selections, AutoIF's SFT step).

With validation records the loss on them is measured after every epoch; with a patience,
training stops once it has not improved for that many epochs and the best epoch's weights are
kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinflow.config import Params
from spinflow.io import write_json, write_rows_csv
from spinflow.nodes import Model
from spinflow.provenance import PROVENANCE_FILE, provenance
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
        # in the precision of every log-likelihood the pipeline scores (precision.autocast):
        # float32 on a CPU, bfloat16 on a GPU that computes it natively; training's own bf16
        # autocast does not carry over, so the curve is that of the weights as evaluated
        with torch.no_grad():
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

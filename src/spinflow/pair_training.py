"""Preference-pair training: a policy learns to prefer the ``real`` answer of each pair to the
``generated`` one, with the SPIN/DPO loss (:mod:`spinflow.losses`) against a frozen reference.

SPIN trains on real answers against θk's (:mod:`spinflow.methods.spin.train`), AutoIF's DPO on answers
that pass their instruction's functions against answers that pass none
(:mod:`spinflow.methods.autoif.stages`); both call :func:`train_on_pairs`. The reference's log-probs of
every pair are computed once, by the policy before its first update (it equals the reference
then), so no second model is held in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spinflow.chat import Encoded, collate_shared, encode_example
from spinflow.config import Params
from spinflow.io import write_json, write_rows_csv
from spinflow.losses import spin_loss
from spinflow.nodes import Model
from spinflow.provenance import PROVENANCE_FILE, provenance
from spinflow.schema import OptimParams, PromptParams
from spinflow.seeds import stage_seed
from spinflow.timings import write_timings
from spinflow.training import LossFn, apply_lora, forward_logps, train_loop

log = logging.getLogger(__name__)

PAIR_KEYS = ("id", "prompt", "real", "generated")  # what training reads from a pairs.jsonl line


@dataclasses.dataclass(frozen=True)
class PairExample:
    """One training pair, tokenised, with θk's summed log-probs once the reference pass ran."""

    index: int
    real: Encoded
    generated: Encoded
    reference_real_logps: float = 0.0
    reference_generated_logps: float = 0.0
    # False: the generated answer passed its verifier and spin.feedback_filter is real_only, so
    # the loss keeps only the real answer's term
    contrast: bool = True

    @property
    def length(self) -> int:
        """Tokens of the pair's row: the prompt once, then both answers."""
        return len(self.real.input_ids) + len(self.generated.input_ids) - self.real.prompt_length


def encode_pairs(tokenizer, pairs: Sequence[dict], prompt: PromptParams) -> list[PairExample]:
    def enc(text: str, record: dict) -> Encoded:
        return encode_example(
            tokenizer,
            record["prompt"],
            text,
            system_prompt=prompt.system_prompt,
            max_prompt_length=prompt.max_prompt_length,
            max_length=prompt.max_length,
        )

    return [PairExample(i, enc(p["real"], p), enc(p["generated"], p)) for i, p in enumerate(pairs)]


def pair_collate(pad_token_id: int):
    """One row per pair: the prompt once, then the real and the generated answer, both scored in
    one forward pass (:func:`spinflow.chat.collate_shared`); real sums first, generated second."""

    def fn(examples: list[PairExample]) -> dict:
        batch = collate_shared([[e.real, e.generated] for e in examples], pad_token_id)
        batch["index"] = torch.tensor([e.index for e in examples])
        batch["reference_real_logps"] = torch.tensor([e.reference_real_logps for e in examples])
        batch["reference_generated_logps"] = torch.tensor(
            [e.reference_generated_logps for e in examples]
        )
        if not all(e.contrast for e in examples):
            batch["contrast"] = torch.tensor([e.contrast for e in examples])
        return batch

    return fn


# ---------------------------------------------------------------------------------------------
# The loss wiring and the reference pass


def spin_loss_fn(beta: float, kind: str) -> LossFn:
    def fn(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logps = forward_logps(model, batch)
        pairs = batch["index"].numel()
        real, generated = logps[:pairs], logps[pairs:]
        reference_generated = batch["reference_generated_logps"].to(real.device)
        if "contrast" in batch:
            # a real-only pair: the generated log-ratio is held at 0 and gets no gradient
            generated = torch.where(
                batch["contrast"].to(real.device), generated, reference_generated.to(logps.dtype)
            )
        out = spin_loss(
            real,
            generated,
            batch["reference_real_logps"].to(real.device),
            reference_generated,
            beta=beta,
            kind=kind,
        )
        return out.loss, {
            "loss": out.loss.item(),
            "rewards_real": out.real_rewards.mean().item(),
            "rewards_generated": out.generated_rewards.mean().item(),
            "reward_margin": out.margins.mean().item(),
            "reward_accuracy": out.accuracy.mean().item(),
            "logps_real": real.detach().mean().item(),
            "logps_generated": generated.detach().mean().item(),
        }

    return fn


@torch.no_grad()
def reference_logps(
    accelerator, model, examples: list[PairExample], batch_size: int, pad_token_id: int
) -> list[PairExample]:
    """Attach θk's summed log-probs of both answers to every pair.

    Runs once, before training, while the policy still equals θk; each process scores its own
    share of the pairs and the results are gathered.
    """
    model.to(accelerator.device).eval()
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    mine = sorted(mine, key=lambda e: e.length)  # similar lengths share a batch: little padding
    loader = DataLoader(
        mine, batch_size=batch_size, shuffle=False, collate_fn=pair_collate(pad_token_id)
    )
    scored: list[tuple[int, float, float]] = []
    for batch in tqdm(
        loader,
        desc="reference log-probs",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    ):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            logps = forward_logps(model, batch).float().cpu()
        pairs = batch["index"].numel()
        scored.extend(
            zip(
                batch["index"].tolist(), logps[:pairs].tolist(), logps[pairs:].tolist(), strict=True
            )
        )
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        scored = gather_object(scored)
    by_index = {index: (real, generated) for index, real, generated in scored}
    return [
        dataclasses.replace(
            e,
            reference_real_logps=by_index[e.index][0],
            reference_generated_logps=by_index[e.index][1],
        )
        for e in examples
    ]


def resolve_optim(
    optim: OptimParams,
    model,
    tokenizer,
    examples,
    beta: float,
    loss: str,
    key: str = "spin.train.bf16",
    device: torch.device | None = None,
):
    """``optim`` with ``bf16: auto`` resolved on ``model`` and the first batch of ``examples``
    under the SPIN loss (see :mod:`spinflow.precision`), and the precision chosen; ``key`` names
    the setting in messages."""
    from spinflow.precision import resolve_precision

    batch = pair_collate(tokenizer.pad_token_id)(examples[: optim.batch_size])
    return resolve_precision(optim, model, batch, spin_loss_fn(beta, loss), key=key, device=device)


def spin_iteration(
    accelerator,
    model,
    tokenizer,
    examples: list[PairExample],
    optim: OptimParams,
    *,
    beta: float,
    loss: str,
    seed: int,
    desc: str,
    resume=None,
    steps_csv: Path | None = None,
):
    """One SPIN training run: θk's reference pass over every pair, then the updates (resumed
    from ``resume``'s saved state where there is one, each step's row written to ``steps_csv``
    as it is made, see :func:`spinflow.training.train_loop`).

    Returns (trained model, TrainResult, seconds of the reference pass, ``examples`` with
    their reference log-probs).
    """
    started = time.perf_counter()
    # θk's log-probs, computed by the policy before its first update (it equals θk then)
    examples = reference_logps(
        accelerator, model, examples, optim.batch_size, tokenizer.pad_token_id
    )
    reference_seconds = time.perf_counter() - started
    model = apply_lora(model, optim)
    result = train_loop(
        accelerator,
        model,
        examples,
        pair_collate(tokenizer.pad_token_id),
        spin_loss_fn(beta, loss),
        optim,
        seed=seed,
        desc=desc,
        resume=resume,
        steps_csv=steps_csv,
    )
    return model, result, reference_seconds, examples


# ---------------------------------------------------------------------------------------------
# Stages


@dataclasses.dataclass
class PairTraining:
    """What :func:`train_on_pairs` did: the pairs encoded, those trained on, the optimisation
    settings with bf16 resolved, the precision chosen, the training result."""

    encoded: list[PairExample]
    examples: list[PairExample]
    optim: OptimParams
    precision: Any
    result: Any
    accelerator: Any


def train_on_pairs(
    params: Params,
    target: Model,
    source: Path,
    pairs: list[dict],
    optim: OptimParams,
    *,
    beta: float,
    loss: str,
    settings: dict[str, Any],
    inputs: dict[str, Path],
    select=None,
    bf16_key: str = "spin.train.bf16",
) -> PairTraining:
    """``target``: ``source`` trained on preference ``pairs`` (``real`` preferred to
    ``generated``) with the SPIN/DPO loss against ``source`` as the frozen reference; saved with
    its provenance (``optim`` as configured, the precision chosen, then ``settings``).

    ``select(encoded) -> examples`` picks the encoded pairs to train on (default: all).
    """
    from spinflow.devices import stage_device
    from spinflow.models import load_model, load_tokenizer
    from spinflow.training import Resume, make_accelerator, save_checkpoint, seed_everything

    configured = optim  # as params.yaml has it (bf16 may be auto)
    seed = stage_seed(params.seed, target.stage)
    seed_everything(seed)
    device = stage_device(params.device)
    tokenizer = load_tokenizer(source)
    model = load_model(source, device=device)
    encoded = encode_pairs(tokenizer, pairs, params.prompt)
    examples = select(encoded) if select is not None else encoded
    optim, precision = resolve_optim(
        optim, model, tokenizer, examples, beta, loss, key=bf16_key, device=device
    )
    accelerator = make_accelerator(optim, device)
    # main process only: it hashes the inputs, a whole checkpoint among them
    made_by = accelerator.is_main_process and provenance(
        target.stage,
        {"train": configured.model_dump(), "precision": precision.name, **settings},
        inputs,
    )
    resume = Resume.for_stage(target.stage, params.resume.every_steps, made_by or None)
    model, result, _, examples = spin_iteration(
        accelerator,
        model,
        tokenizer,
        examples,
        optim,
        beta=beta,
        loss=loss,
        seed=seed,
        desc=target.stage,
        resume=resume,
        steps_csv=target.steps_csv,
    )
    save_checkpoint(
        accelerator, model, tokenizer, target.path, {PROVENANCE_FILE: made_by} if made_by else None
    )
    if resume is not None:
        resume.finish(accelerator)
    return PairTraining(encoded, examples, optim, precision, result, accelerator)


def write_training_outputs(target: Model, summary: dict, trained: PairTraining):
    """The training summary, per-step CSV (the one training streamed, written again in one
    piece) and timings of ``target`` (main process only)."""
    if trained.accelerator.is_main_process:
        write_json(target.train_metrics, summary)
        write_rows_csv(target.steps_csv, trained.result.history)
        write_timings(target.timings, target.path, trained.result.timings())

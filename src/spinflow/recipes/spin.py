"""SPIN (arXiv 2401.01335): self-play fine-tuning, one iteration at a time.

Iteration k:

- ``generate_iter_k`` (:mod:`spinflow.recipes.generate`): θk answers every prompt of the SPIN
  pool; each prompt's real answer and θk's generated one make a pair
  (generated/iter_k/pairs.jsonl);
- ``train_iter_k``: the policy starts from θk and learns to tell real answers from θk's, with the
  SPIN loss (:func:`spinflow.losses.spin_loss`) against θk as the frozen opponent. It trains on its
  own pairs and those of ``spin.mix_previous`` earlier iterations. θk's log-probs of every pair
  are computed once, by the policy before its first update (it equals θk then), so no second
  model is held in memory. The result is θk+1.

Evaluation of θk+1 against θk (``eval_iter_k``) is the shared evaluate stage; the reward margin it
reports is :func:`spinflow.losses.spin_logits` on the test answers.

With ``autoif.with_spin`` (:mod:`spinflow.recipes.autoif`), generate_iter_k also answers θ0's
verified AutoIF queries, whose generated answers the instructions' functions check in the
sandbox (a passing one is treated by ``spin.feedback_filter`` like one passing its verifier),
and train_iter_k also trains on iteration k's AutoIF pairs: one loss, one optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spinflow import graph as pipeline_graph
from spinflow.chat import Encoded, collate_shared, encode_example
from spinflow.config import OptimParams, Params, PromptParams
from spinflow.errors import DataError, SpinflowError
from spinflow.graph import Graph
from spinflow.io import read_jsonl, write_json, write_rows_csv
from spinflow.losses import spin_loss
from spinflow.provenance import PROVENANCE_FILE, provenance
from spinflow.recipes.common import require
from spinflow.seeds import stage_seed
from spinflow.timings import write_timings
from spinflow.training import LossFn, apply_lora, forward_logps, train_loop

log = logging.getLogger(__name__)

PAIR_KEYS = ("id", "prompt", "real", "generated")  # what training reads from a pairs.jsonl line


# ---------------------------------------------------------------------------------------------
# Pairs


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


def training_pairs(params: Params, k: int, graph: Graph | None = None) -> list[dict]:
    """This iteration's pairs plus those of ``spin.mix_previous`` earlier iterations (oldest first)."""
    graph = graph or pipeline_graph.build(params)
    pairs: list[dict] = []
    for path in graph.theta(k + 1).pairs:
        found = read_jsonl(require(graph, path), PAIR_KEYS)
        if not found:  # generate writes one pair per pool prompt: the file was emptied
            raise DataError(f"{path}: empty, no pairs (the file is damaged)", path=path)
        pairs.extend(found)
    return pairs


def generated_passes(pair: dict) -> bool:
    """Whether the generated answer passes the pair's check: ``generated_passes`` when generate
    stored it (an AutoIF instruction's functions, run in the sandbox), else the pair's verifier
    (False when it has none)."""
    from spinflow.verifiers import verify

    if "generated_passes" in pair:
        return bool(pair["generated_passes"])
    verifier = pair.get("verifier")
    return verifier is not None and verify(pair["generated"], verifier)


def feedback_filter(
    examples: Sequence[PairExample], pairs: Sequence[dict], mode: str
) -> tuple[list[PairExample], dict[str, int]]:
    """Apply ``spin.feedback_filter``: a generated answer that passes its verifier is not a wrong
    answer; ``drop`` removes its pair, ``real_only`` keeps the pair without the generated term."""
    passing = [generated_passes(p) for p in pairs]
    counts = {"pairs_generated_correct": sum(passing)}
    if mode == "keep":
        return list(examples), counts
    if mode == "drop":
        kept = [e for e, ok in zip(examples, passing, strict=True) if not ok]
        counts["pairs_dropped"] = len(examples) - len(kept)
        return kept, counts
    kept = [
        dataclasses.replace(e, contrast=not ok) for e, ok in zip(examples, passing, strict=True)
    ]
    counts["pairs_real_only"] = sum(passing)
    return kept, counts


def join_autoif_pairs(
    encoded: Sequence[PairExample], spin_pairs: Sequence[dict], mode: str
) -> tuple[list[PairExample], dict[str, int]]:
    """``autoif.with_spin``: ``encoded`` holds the SPIN pairs, then the AutoIF pairs. The SPIN
    pairs go through :func:`feedback_filter`; the AutoIF pairs follow, never filtered (their
    rejected answer passes no function of its instruction, by construction)."""
    examples, counts = feedback_filter(encoded[: len(spin_pairs)], spin_pairs, mode)
    autoif_examples = list(encoded[len(spin_pairs) :])
    instruction = [p for p in spin_pairs if p.get("instruction") is not None]
    counts.update(
        pairs_spin=len(examples),
        pairs_autoif=len(autoif_examples),
        instruction_pairs=len(instruction),
        instruction_generated_passing=sum(map(generated_passes, instruction)),
    )
    return examples + autoif_examples, counts


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


LOGP_AGREEMENT = 0.5  # nats per answer: within it, generated_logp could stand for the reference


def generated_logp_agreement(k: int, pairs: Sequence[dict], examples: Sequence[PairExample]):
    """How far the generate stage's ``generated_logp`` of θk's answers (the engine's, over the
    tokens it sampled) is from θk's log-prob of them in training's reference pass (over the
    answer's text as training encodes it): the median and the largest absolute difference, in
    nats per answer, and how many answers differ by more than :data:`LOGP_AGREEMENT`. Training
    always runs its reference pass; these figures say whether it could do without it. Left out:
    pairs of earlier iterations (other opponents), pairs without ``generated_logp``, and answers
    cut at ``max_new_tokens`` (training scores an end token after them, the engine did not)."""
    differences = sorted(
        abs(pairs[e.index]["generated_logp"] - e.reference_generated_logps)
        for e in examples
        if e.index < len(pairs)
        and pairs[e.index].get("iteration") == k
        and pairs[e.index].get("generated_ended", True)
        and pairs[e.index].get("generated_logp") is not None
    )
    if not differences:
        return {}
    return {
        "generated_logp_difference_median": round(statistics.median(differences), 4),
        "generated_logp_difference_max": round(differences[-1], 4),
        "generated_logp_far": sum(d > LOGP_AGREEMENT for d in differences),
    }


def iteration_compute(
    encoded: Sequence[PairExample],
    pairs: Sequence[dict],
    trained: Sequence[PairExample],
    epochs: int,
    k: int,
    sampled_tokens: int = 0,
) -> dict[str, int]:
    """What iteration k cost, in token passes (one token through one forward pass; a backward
    pass counts as two): θk's generation of its pairs (each prompt and answer token once; the
    pairs of earlier iterations mixed in were paid for there), the reference pass over every
    trained pair, and ``epochs`` of training (forward and backward) over them. A pair's row is
    its prompt once and both answers (:func:`spinflow.chat.collate_shared`).

    ``encoded`` and ``pairs`` are SPIN's generated pairs; ``sampled_tokens`` is other generation
    the iteration paid for: with ``autoif.with_spin``, the answer tokens θk sampled in
    autoif_sample_iter_k (all samples, not only the paired ones; their prompt tokens are not
    counted), so the same-compute baseline sft_extra_compute gets that budget too."""
    generation = sampled_tokens + sum(
        len(e.generated.input_ids)
        for e, p in zip(encoded, pairs, strict=True)
        if int(p.get("iteration", k)) == k
    )
    reference = sum(e.length for e in trained)
    return {
        "generation_tokens": generation,
        "reference_tokens": reference,
        "compute_tokens": generation + reference + 3 * epochs * reference,
    }


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
    target: pipeline_graph.Model,
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


def write_training_outputs(target: pipeline_graph.Model, summary: dict, trained: PairTraining):
    """The training summary, per-step CSV (the one training streamed, written again in one
    piece) and timings of ``target`` (main process only)."""
    if trained.accelerator.is_main_process:
        write_json(target.train_metrics, summary)
        write_rows_csv(target.steps_csv, trained.result.history)
        write_timings(target.timings, target.path, trained.result.timings())


def train(params: Params, k: int) -> dict[str, Any]:
    """θk+1: start from θk, opponent θk, SPIN loss on real vs generated answers.

    With ``autoif.with_spin`` iteration k's AutoIF pairs (chosen as real, rejected as generated)
    join the SPIN pairs after the feedback filter has judged those: one loss, one optimizer."""
    graph = pipeline_graph.build(params)
    target = graph.theta(k + 1)
    optim, beta = params.train_for(k)
    source = require(graph, graph.theta(k).path)
    pairs = training_pairs(params, k, graph)
    inputs: dict[str, Path] = {"model": source}
    for path in target.pairs:
        inputs[f"pairs_{path.parent.name}"] = path
    autoif_pairs: list[dict] = []
    sampled_tokens = 0
    settings: dict[str, Any] = {}
    if params.autoif.with_spin:
        from spinflow.recipes.autoif import spin_training_pairs

        autoif_pairs, sampled_tokens = spin_training_pairs(graph, k)
        inputs["pairs_autoif"] = pipeline_graph.autoif_samples_dir(k) / "pairs.jsonl"
        settings["autoif_with_spin"] = True
    filtered: dict[str, Any] = {}

    def select(encoded: list[PairExample]) -> list[PairExample]:
        if params.autoif.with_spin:
            examples, counts = join_autoif_pairs(encoded, pairs, params.spin.feedback_filter)
        else:
            examples, counts = feedback_filter(encoded, pairs, params.spin.feedback_filter)
        if not examples:
            raise SpinflowError(
                f"{target.stage}: spin.feedback_filter: drop removed every pair (θ{k}'s answers "
                "all pass their verifiers); use real_only, or keep"
            )
        filtered.update(counts)
        return examples

    trained = train_on_pairs(
        params,
        target,
        source,
        pairs + autoif_pairs,
        optim,
        beta=beta,
        loss=params.spin.loss,
        settings={
            "beta": beta,
            "loss": params.spin.loss,
            "mix_previous": params.spin.mix_previous,
            "feedback_filter": params.spin.feedback_filter,
            **settings,
            "prompt": params.prompt.model_dump(),
            "seed": params.seed,
        },
        inputs=inputs,
        select=select,
    )
    result = trained.result
    cost = iteration_compute(
        trained.encoded[: len(pairs)],
        pairs,
        trained.examples,
        trained.optim.epochs,
        k,
        sampled_tokens,
    )
    summary = {
        "iteration": k,
        "pairs": len(trained.examples),
        **filtered,
        "beta": beta,
        "learning_rate": trained.optim.learning_rate,
        **trained.precision.summary(),
        **result.summary(),
        **cost,
        **generated_logp_agreement(k, pairs, trained.examples),
    }
    write_training_outputs(target, summary, trained)
    if trained.accelerator.is_main_process:
        write_json(
            pipeline_graph.spin_steps(k),
            {"optimizer_steps": result.steps, "compute_tokens": cost["compute_tokens"]},
        )
    return {**summary, **result.timings()}

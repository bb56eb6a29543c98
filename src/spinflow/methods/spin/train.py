"""SPIN (arXiv 2401.01335): self-play fine-tuning, one iteration at a time.

Iteration k:

- ``generate_iter_k`` (:mod:`spinflow.methods.spin.generate`): θk answers every prompt of the SPIN
  pool; each prompt's real answer and θk's generated one make a pair
  (generated/iter_k/pairs.jsonl);
- ``train_iter_k``: the policy starts from θk and learns to tell real answers from θk's, with the
  SPIN loss (:func:`spinflow.losses.spin_loss`) against θk as the frozen opponent. It trains on its
  own pairs and those of ``spin.mix_previous`` earlier iterations. θk's log-probs of every pair
  are computed once, by the policy before its first update (it equals θk then), so no second
  model is held in memory (:mod:`spinflow.pair_training`, which AutoIF's DPO shares). The result
  is θk+1.

Evaluation of θk+1 against θk (``eval_iter_k``) is the shared evaluate stage; the reward margin it
reports is :func:`spinflow.losses.spin_logits` on the test answers.

With ``autoif.with_spin`` (:mod:`spinflow.methods.autoif.stages`), generate_iter_k also answers θ0's
verified AutoIF queries, whose generated answers the instructions' functions check in the
sandbox (a passing one is treated by ``spin.feedback_filter`` like one passing its verifier),
and train_iter_k also trains on iteration k's AutoIF pairs: one loss, one optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinflow.config import Params
from spinflow.errors import DataError, SpinflowError
from spinflow.graph import Graph, build
from spinflow.io import read_jsonl, write_json
from spinflow.methods.autoif.graph import autoif_samples_dir
from spinflow.methods.spin.graph import spin_steps
from spinflow.pair_training import (
    PAIR_KEYS,
    PairExample,
    train_on_pairs,
    write_training_outputs,
)
from spinflow.recipes.common import require

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Pairs


def training_pairs(params: Params, k: int, graph: Graph | None = None) -> list[dict]:
    """This iteration's pairs plus those of ``spin.mix_previous`` earlier iterations (oldest first)."""
    graph = graph or build(params)
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


def train(params: Params, k: int) -> dict[str, Any]:
    """θk+1: start from θk, opponent θk, SPIN loss on real vs generated answers.

    With ``autoif.with_spin`` iteration k's AutoIF pairs (chosen as real, rejected as generated)
    join the SPIN pairs after the feedback filter has judged those: one loss, one optimizer."""
    graph = build(params)
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
        from spinflow.methods.autoif.stages import spin_training_pairs

        autoif_pairs, sampled_tokens = spin_training_pairs(graph, k)
        inputs["pairs_autoif"] = autoif_samples_dir(k) / "pairs.jsonl"
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
            spin_steps(k),
            {"optimizer_steps": result.steps, "compute_tokens": cost["compute_tokens"]},
        )
    return {**summary, **result.timings()}

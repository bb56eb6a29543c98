"""Held-out evaluation of one checkpoint.

Metrics (all on the test split):
- ``answer_logprob_per_token``: mean log-likelihood per token of the ground-truth answers;
- ``exact_match``: greedy answer equals the ground truth after normalisation;
- ``verifier_pass_rate``: greedy answer passes the example's registered verifier (built-in data);
- ``reward_margin`` / ``reward_accuracy``: SPIN's implicit reward of the real answer minus that of
  the opponent's greedy answer (:func:`spinflow.losses.spin_logits`), when the opponent θk's
  evaluation rows are given;
- ``answer_length``: mean number of tokens of the greedy answers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from spinflow import precision
from spinflow.chat import collate, encode_example
from spinflow.config import EvalParams, PromptParams
from spinflow.generation import SamplingParams, generate_answers
from spinflow.logprobs import segment_logps
from spinflow.losses import spin_logits
from spinflow.verifiers import exact_match, verify


@torch.inference_mode()
def answer_logps(
    model,
    tokenizer,
    records: Sequence[dict],
    answers: Sequence[str],
    prompt: PromptParams,
    batch_size: int,
    desc: str = "log-probs",
) -> tuple[list[float], list[int]]:
    """Summed log-prob and token count (end token included) of each answer under ``model``."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [
        encode_example(
            tokenizer,
            r["prompt"],
            a,
            system_prompt=prompt.system_prompt,
            max_prompt_length=prompt.max_prompt_length,
            max_length=prompt.max_length,
        )
        for r, a in zip(records, answers, strict=True)
    ]
    # scored in order of length, so that a batch holds little padding
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    logps = [0.0] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, dynamic_ncols=True):
        rows = order[start : start + batch_size]
        batch = {
            k: v.to(device)
            for k, v in collate([encoded[i] for i in rows], tokenizer.pad_token_id).items()
        }
        with precision.autocast(device):
            values = segment_logps(model, batch).tolist()
        for i, value in zip(rows, values, strict=True):
            logps[i] = value
    counts = [len(e.input_ids) - e.prompt_length for e in encoded]
    return logps, counts


def greedy_answers(
    engine, tokenizer, records: Sequence[dict], prompt: PromptParams, params: EvalParams, seed: int
) -> list[str]:
    completions = generate_answers(
        engine,
        tokenizer,
        records,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=params.max_new_tokens),
        seed=seed,
        system_prompt=prompt.system_prompt,
        max_prompt_length=prompt.max_prompt_length,
        desc="greedy answers",
    )
    return [c.text for c in completions]


def score_answers(tokenizer, records: Sequence[dict], answers: Sequence[str]) -> dict:
    """Exact match, verifier pass rate (overall and per task) and mean answer length."""
    matches = [exact_match(a, r["answer"]) for r, a in zip(records, answers, strict=True)]
    checked = [
        (r["task"], verify(a, r["verifier"]))
        for r, a in zip(records, answers, strict=True)
        if r.get("verifier")
    ]
    per_task: dict[str, list[bool]] = defaultdict(list)
    for task, passed in checked:
        per_task[task].append(passed)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return {
        "exact_match": sum(matches) / len(matches),
        "verifier_pass_rate": sum(p for _, p in checked) / len(checked) if checked else None,
        "answer_length": sum(lengths) / len(lengths),
        "per_task_pass_rate": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
    }


def evaluate(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    prompt: PromptParams,
    params: EvalParams,
    seed: int,
    reference: Sequence[dict] | None = None,
    beta: float = 0.1,
    engine,
) -> tuple[dict, list[dict]]:
    """Evaluate ``model`` on ``records``; returns (metrics, one row per record).

    Greedy answers come from ``engine``, a generation engine over ``model``
    (:func:`spinflow.engines.open_engine`).

    Each row holds the greedy answer and the model's log-probs of the real answer and of its own
    greedy answer, so the next evaluation can use it as the opponent (``reference``) without
    loading this model again.
    """
    real_logps, real_counts = answer_logps(
        model,
        tokenizer,
        records,
        [r["answer"] for r in records],
        prompt,
        params.batch_size,
        desc="real log-probs",
    )
    metrics: dict = {
        "answer_logprob_per_token": sum(real_logps) / sum(real_counts),
        "num_examples": len(records),
    }
    if reference is not None:
        by_id = {row["id"]: row for row in reference}
        opponent = [by_id[r["id"]] for r in records]
        policy_generated, _ = answer_logps(
            model,
            tokenizer,
            records,
            [o["generated"] for o in opponent],
            prompt,
            params.batch_size,
            desc="opponent answers",
        )
        margins = [
            spin_logits(p_real, p_gen, o["real_logps"], o["generated_logps"], beta)
            for p_real, p_gen, o in zip(real_logps, policy_generated, opponent, strict=True)
        ]
        metrics["reward_margin"] = sum(margins) / len(margins)
        metrics["reward_accuracy"] = sum(m > 0 for m in margins) / len(margins)
    answers = greedy_answers(engine, tokenizer, records, prompt, params, seed)
    own_logps, _ = answer_logps(
        model, tokenizer, records, answers, prompt, params.batch_size, desc="own answers"
    )
    metrics.update(score_answers(tokenizer, records, answers))
    rows = [
        {
            "id": r["id"],
            "task": r["task"],
            "prompt": r["prompt"],
            "real": r["answer"],
            "generated": a,
            "real_logps": rl,
            "generated_logps": gl,
        }
        for r, a, rl, gl in zip(records, answers, real_logps, own_logps, strict=True)
    ]
    return metrics, rows


def token_counts(
    tokenizer, records: Sequence[dict], answers: Sequence[str], prompt: PromptParams
) -> list[dict[str, int]]:
    """Per record, the per-example parts of two metrics: ``real_tokens``, its real answer's
    tokens as :func:`answer_logps` counts them (end token included; the denominator of
    ``answer_logprob_per_token``), and ``generated_tokens``, those of its answer in ``answers``
    as :func:`score_answers` counts them (``answer_length``)."""
    counts = []
    for record, answer in zip(records, answers, strict=True):
        encoded = encode_example(
            tokenizer,
            record["prompt"],
            record["answer"],
            system_prompt=prompt.system_prompt,
            max_prompt_length=prompt.max_prompt_length,
            max_length=prompt.max_length,
        )
        generated = tokenizer(answer, add_special_tokens=False)["input_ids"]
        counts.append(
            {
                "real_tokens": len(encoded.input_ids) - encoded.prompt_length,
                "generated_tokens": len(generated),
            }
        )
    return counts


def opponent_rows(
    model,
    tokenizer,
    rows: Sequence[dict],
    reference: Sequence[dict],
    *,
    prompt: PromptParams,
    batch_size: int,
    beta: float,
) -> list[dict]:
    """Per row of :func:`evaluate` (the model's own), what it makes of its opponent's greedy
    answer (``reference``, the opponent's rows, matched by id): the opponent's log-probs of the
    real answer and of its own answer (before SPIN's step), the model's log-prob of that answer
    (after), and the reward margin :func:`evaluate` averages into ``reward_margin``."""
    by_id = {row["id"]: row for row in reference}
    before = [by_id[row["id"]] for row in rows]
    records = [{"prompt": row["prompt"]} for row in rows]
    after, _ = answer_logps(
        model,
        tokenizer,
        records,
        [b["generated"] for b in before],
        prompt,
        batch_size,
        desc="opponent answers",
    )
    return [
        {
            "opponent_real_logps": b["real_logps"],
            "opponent_generated_logps": b["generated_logps"],
            "opponent_answer_logps": a,
            "reward_margin": spin_logits(
                row["real_logps"], a, b["real_logps"], b["generated_logps"], beta
            ),
        }
        for row, b, a in zip(rows, before, after, strict=True)
    ]

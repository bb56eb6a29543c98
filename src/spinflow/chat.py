"""One prompt format for generation, training and evaluation.

Every place that turns a prompt into tokens goes through :func:`prompt_ids`, so θk answers
exactly the text that training later scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def render_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The model's own chat template applied to one user turn, ending where the answer begins."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(
    tokenizer, prompt: str, system_prompt: str | None, max_prompt_length: int
) -> list[int]:
    """Token ids of the rendered prompt, truncated keeping its end (as the paper does)."""
    ids = tokenizer(render_prompt(tokenizer, prompt, system_prompt), add_special_tokens=False)[
        "input_ids"
    ]
    return ids[-max_prompt_length:]


def answer_ids(tokenizer, answer: str, max_answer_length: int) -> list[int]:
    """Token ids of an answer followed by the end-of-turn (eos) token, which is learned too."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max(max_answer_length - 1, 0)]
    return ids + [tokenizer.eos_token_id]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    prompt_length: int


def encode_example(
    tokenizer,
    prompt: str,
    answer: str,
    *,
    system_prompt: str | None,
    max_prompt_length: int,
    max_length: int,
) -> Encoded:
    p = prompt_ids(tokenizer, prompt, system_prompt, max_prompt_length)
    a = answer_ids(tokenizer, answer, max_length - len(p))
    return Encoded(p + a, len(p))


def collate(encoded: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; the loss mask comes from prompt lengths and real lengths, never from
    comparing ids with the pad id (pad = eos for many chat models)."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    loss_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        loss_mask[row, e.prompt_length : n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_shared(groups: list[list[Encoded]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per group of answers to the same prompt: the prompt once, then every answer.

    Answer k of group i (k = 0, 1, …) is scored as sequence ``k·len(groups) + i``: with pairs
    (real, generated) the first half of the sums are the real answers, the second the generated
    ones, as with :func:`collate` over reals then generateds. See :mod:`spinflow.logprobs` for
    the ``branch``/``position_ids`` layout and why it scores each answer exactly as its own
    prompt + answer row would.
    """
    rows = len(groups)
    prompt_lengths = [g[0].prompt_length for g in groups]
    for group, p in zip(groups, prompt_lengths, strict=True):
        if any(e.prompt_length != p or e.input_ids[:p] != group[0].input_ids[:p] for e in group):
            raise ValueError("collate_shared: the answers of a group must share their prompt")
    width = max(
        p + sum(len(e.input_ids) - p for e in g)
        for g, p in zip(groups, prompt_lengths, strict=True)
    )
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    branch = torch.full((rows, width), -1, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    positions: list[int] = []
    targets: list[int] = []
    segments: list[int] = []
    tokens = 0
    for row, (group, p) in enumerate(zip(groups, prompt_lengths, strict=True)):
        input_ids[row, :p] = torch.tensor(group[0].input_ids[:p], dtype=torch.long)
        branch[row, :p] = 0
        position_ids[row, :p] = torch.arange(p)
        start = p
        for k, e in enumerate(group):
            answer = e.input_ids[p:]
            n = len(answer)
            tokens += len(e.input_ids)
            input_ids[row, start : start + n] = torch.tensor(answer, dtype=torch.long)
            branch[row, start : start + n] = k + 1
            position_ids[row, start : start + n] = torch.arange(p, p + n)
            # answer token j is predicted by the prompt's last token (j = 0) or by answer token j−1
            predictors = [p - 1] + list(range(start, start + n - 1))
            for j, (at, target) in enumerate(zip(predictors, answer, strict=True)):
                if j == 0 and p == 0:
                    continue
                positions.append(row * width + at)
                targets.append(target)
                segments.append(k * rows + row)
            start += n
        attention_mask[row, :start] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "branch": branch,
        "position_ids": position_ids,
        "score_positions": torch.tensor(positions, dtype=torch.long),
        "score_targets": torch.tensor(targets, dtype=torch.long),
        "score_segments": torch.tensor(segments, dtype=torch.long),
        "segments": torch.tensor(rows * max(len(g) for g in groups)),
        "tokens": torch.tensor(tokens),
    }

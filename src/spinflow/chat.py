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

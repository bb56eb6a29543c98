"""θk answers prompts: batched, left-padded, length-sorted, reproducible per prompt.

Sampling draws its noise from a generator seeded by (seed, prompt id), so an answer depends on
the prompt and the seed alone, not on which batch the prompt landed in: the same params give the
same file whatever the batch size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from spinflow.chat import prompt_ids
from spinflow.seeds import derive_seed


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48


@dataclass
class GenerationStats:
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _next_tokens(logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator]):
    logits = logits.float()
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    logits = _top_p_filter(logits / sampling.temperature, sampling.top_p)
    # Gumbel-max sampling with each row's own noise stream
    noise = torch.stack(
        [torch.rand(logits.size(-1), generator=g, dtype=torch.float64) for g in generators]
    ).clamp_(min=1e-20)
    gumbel = -torch.log(-torch.log(noise)).to(logits.dtype)
    return (logits + gumbel).argmax(-1)


@torch.inference_mode()
def generate_batch(
    model,
    prompt_token_ids: Sequence[list[int]],
    sampling: SamplingParams,
    generators: list[torch.Generator],
    eos_token_id: int,
    pad_token_id: int,
) -> list[list[int]]:
    """Answer token ids (without the end token) for a batch of prompts, left-padded."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_token_ids)
    batch = len(prompt_token_ids)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(prompt_token_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    answers: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool)
    past = None
    step_ids = input_ids
    for _ in range(sampling.max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,  # only the next token's logits, also for the prompt pass
        )
        past = out.past_key_values
        tokens = _next_tokens(out.logits[:, -1, :].cpu(), sampling, generators)
        for row in range(batch):
            if finished[row]:
                continue
            token = int(tokens[row])
            if token == eos_token_id:
                finished[row] = True
            else:
                answers[row].append(token)
        if bool(finished.all()):
            break
        step_ids = tokens.unsqueeze(-1).to(device)
        attention_mask = torch.cat(
            [attention_mask, torch.ones((batch, 1), dtype=attention_mask.dtype, device=device)],
            dim=-1,
        )
        position_ids = position_ids[:, -1:] + 1
    return answers


def generate_answers(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    sampling: SamplingParams,
    seed: int,
    batch_size: int,
    system_prompt: str | None,
    max_prompt_length: int,
    desc: str = "generate",
    stats: GenerationStats | None = None,
) -> list[str]:
    """Answer every record's prompt; returns answers in the order of ``records``.

    Prompts are sorted by length so batches carry little padding; each prompt's sampling noise
    comes from ``derive_seed(seed, record["id"])``.
    """
    model.eval()
    encoded = [
        prompt_ids(tokenizer, r["prompt"], system_prompt, max_prompt_length) for r in records
    ]
    order = sorted(range(len(records)), key=lambda i: (len(encoded[i]), records[i]["id"]))
    answers: list[str | None] = [None] * len(records)
    started = time.perf_counter()
    new_tokens = 0
    with tqdm(total=len(records), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            generators = [
                torch.Generator().manual_seed(derive_seed(seed, records[i]["id"])) for i in chunk
            ]
            token_lists = generate_batch(
                model,
                [encoded[i] for i in chunk],
                sampling,
                generators,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            )
            for i, tokens in zip(chunk, token_lists, strict=True):
                answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                new_tokens += len(tokens)
            bar.update(len(chunk))
    if stats is not None:
        stats.prompts += len(records)
        stats.new_tokens += new_tokens
        stats.seconds += time.perf_counter() - started
    return answers  # type: ignore[return-value]

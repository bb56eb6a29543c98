"""The ``torch`` engine: the reference. HF forward passes with a growing cache, any model.

Prompts are sorted by length and batched, left-padded; every row of a batch steps until the
batch's last row ends. Slower than the continuous engine on long batches (rows that ended keep
stepping), but it runs any architecture transformers runs, and the other engines are tested
against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from spinflow.generation import (
    Completion,
    Engine,
    Request,
    SamplingParams,
    as_end_tokens,
    next_tokens,
)


@torch.inference_mode()
def generate_batch(
    model,
    prompt_token_ids: Sequence[list[int]],
    sampling: SamplingParams,
    generators: list[torch.Generator],
    eos_token_id: int | Iterable[int],
    pad_token_id: int,
) -> list[Completion]:
    """Completions of a batch of prompts, left-padded, all rows stepped until the last ends
    (``eos_token_id``: the end token, or all of them)."""
    ends = as_end_tokens(eos_token_id)
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
    logps = [0.0] * batch
    end_tokens: list[int | None] = [None] * batch
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
        logits = out.logits[:, -1, :].float().cpu()
        tokens = next_tokens(logits, sampling, generators)
        token_logps = torch.log_softmax(logits, -1).gather(1, tokens.unsqueeze(1))[:, 0]
        for row in range(batch):
            if finished[row]:
                continue
            token = int(tokens[row])
            logps[row] += float(token_logps[row])
            if token in ends:
                finished[row] = True
                end_tokens[row] = token
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
    rows = zip(answers, logps, finished.tolist(), end_tokens, strict=True)
    return [
        Completion(answer, logp, bool(done), end_token_id=end) for answer, logp, done, end in rows
    ]


class TorchEngine(Engine):
    """The reference engine: HF forward passes with a growing cache, prompts sorted by length
    and batched; every row of a batch steps until the batch's last row ends. Any model.
    ``eos_token_id``: the end token, or all of them (:func:`end_token_ids`)."""

    name = "torch"

    def __init__(
        self, model, *, eos_token_id: int | Iterable[int], pad_token_id: int, batch_size: int
    ):
        self.model = model.eval()
        self.eos_token_id, self.pad_token_id = as_end_tokens(eos_token_id), pad_token_id
        self.batch_size = batch_size

    def complete(
        self, requests: Sequence[Request], sampling: SamplingParams, *, desc: str = "generate"
    ) -> list[Completion]:
        order = sorted(range(len(requests)), key=lambda i: (len(requests[i].prompt_ids), i))
        completions: list[Completion | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                generators = [torch.Generator().manual_seed(requests[i].seed) for i in chunk]
                batch = generate_batch(
                    self.model,
                    [requests[i].prompt_ids for i in chunk],
                    sampling,
                    generators,
                    self.eos_token_id,
                    self.pad_token_id,
                )
                for i, completion in zip(chunk, batch, strict=True):
                    completions[i] = completion
                bar.update(len(chunk))
        return completions  # type: ignore[return-value]

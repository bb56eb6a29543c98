"""θk answers prompts, reproducibly per prompt, through a generation engine.

An engine turns :class:`Request` s (prompt token ids and a seed) into :class:`Completion` s
(answer token ids, θk's log-prob of them, whether an end token came); the engines are in
:mod:`spinflow.engines`. This module holds what they share: the end tokens, the sampler and the
engine interface.

Every engine ends an answer on the same tokens, :func:`end_token_ids`: the tokenizer's end token
and each end token of the model's ``generation_config`` (``eos_token_id`` may be a list, as in
chat models whose turns end with another token than the document's). vLLM stops on both sets by
itself; the other engines stop on them because they are given them, and every engine strips the
end token that came from the answer.

Sampling draws its noise from a generator seeded by (seed, prompt id), so an answer depends on
the prompt and the seed alone, not on which batch the prompt landed in: the same params give the
same file whatever the batch size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spinflow.chat import prompt_ids
from spinflow.seeds import derive_seed


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    seed: int


@dataclass
class Completion:
    """An answer: its tokens (without the end token), whether it ended with an end token (and
    which), and θk's log-prob of it, untempered, summed over its tokens and the end token when
    one came."""

    token_ids: list[int]
    logp: float
    ended: bool
    text: str = ""
    end_token_id: int | None = None


def _generation_config(model_or_dir):
    """The model's generation config: a loaded model's own, or, for a checkpoint directory, its
    generation_config.json, else one derived from its config.json (as transformers and vLLM
    read a checkpoint)."""
    if not isinstance(model_or_dir, (str, os.PathLike)):
        return getattr(model_or_dir, "generation_config", None)
    from transformers import AutoConfig, GenerationConfig

    directory = Path(model_or_dir)
    if (directory / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(directory)
    return GenerationConfig.from_model_config(AutoConfig.from_pretrained(directory))


def end_token_ids(tokenizer, model_or_dir) -> tuple[int, ...]:
    """The tokens that end an answer, the same for every engine: the tokenizer's end token first,
    then each ``eos_token_id`` of the model's generation config (one id or a list). ``model_or_dir``
    is a loaded model or its checkpoint directory."""
    ids = [tokenizer.eos_token_id]
    config = _generation_config(model_or_dir)
    configured = getattr(config, "eos_token_id", None)
    ids += [configured] if isinstance(configured, int) else list(configured or [])
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def as_end_tokens(eos_token_id: int | Iterable[int]) -> frozenset[int]:
    """An engine's end tokens from one id or several (:func:`end_token_ids`)."""
    if isinstance(eos_token_id, int):
        return frozenset((eos_token_id,))
    return frozenset(int(i) for i in eos_token_id)


@dataclass
class GenerationStats:
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator]):
    """The next token of each row: argmax at temperature 0, else a draw from the tempered,
    top-p filtered distribution by inverse CDF, with one uniform number from the row's own
    generator (so a row's draw never depends on the other rows)."""
    logits = logits.float()
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    logits = top_p_filter(logits / sampling.temperature, sampling.top_p)
    cdf = logits.softmax(-1).cumsum(-1)
    # CPU generators: the same draws on every device
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device)
    # the first token whose cumulative mass exceeds the draw: tokens of zero mass never are
    chosen = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True)[:, 0]
    return chosen.clamp_(max=logits.size(-1) - 1)


class Engine:
    """What every engine shares: ``with engine:`` releases what it holds when the block ends
    (:meth:`close`), before a stage loads another model."""

    def close(self) -> None:
        """Release what the engine holds; nothing here (the model belongs to the caller)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_answers(
    engine,
    tokenizer,
    records: Sequence[dict],
    *,
    sampling: SamplingParams,
    seed: int,
    system_prompt: str | None,
    max_prompt_length: int,
    desc: str = "generate",
    stats: GenerationStats | None = None,
) -> list[Completion]:
    """Every record's prompt answered by ``engine``, in the order of ``records``, with its text.

    Each prompt's sampling noise comes from ``derive_seed(seed, record["id"])``.
    """
    requests = [
        Request(
            prompt_ids(tokenizer, r["prompt"], system_prompt, max_prompt_length),
            derive_seed(seed, r["id"]),
        )
        for r in records
    ]
    started = time.perf_counter()
    completions = engine.complete(requests, sampling, desc=desc)
    for completion in completions:
        completion.text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
    if stats is not None:
        stats.prompts += len(records)
        stats.new_tokens += sum(len(c.token_ids) for c in completions)
        stats.seconds += time.perf_counter() - started
    return completions

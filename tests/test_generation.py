"""Tests for spinflow.generation: reproducible batched sampling, greedy decoding, top-p."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from spinflow import chat, generation
from spinflow.engines.torch import TorchEngine, generate_batch
from spinflow.generation import (
    GenerationStats,
    SamplingParams,
    generate_answers,
    next_tokens,
    top_p_filter,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MAX_NEW_TOKENS = 10
SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)

# Ten prompts of clearly different lengths, so every batch of several is left-padded.
RECORDS = [
    {"id": f"pool-{i:04d}", "prompt": " ".join(["word"] * (1 + 3 * i)) + f" number {i}?"}
    for i in range(10)
]


def _answers(model, tokenizer, records=RECORDS, *, sampling=SAMPLING, seed=7, batch_size=1, **kw):
    engine = TorchEngine(
        model,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
    )
    completions = generate_answers(
        engine,
        tokenizer,
        records,
        sampling=sampling,
        seed=seed,
        system_prompt=None,
        max_prompt_length=128,
        **kw,
    )
    return [c.text for c in completions]


def _ids(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


@pytest.fixture(scope="module")
def sampled_batch_1(tiny_model_session, tiny_tokenizer_session) -> list[str]:
    return _answers(tiny_model_session, tiny_tokenizer_session, batch_size=1)


def _prompt(tokenizer, text: str) -> list[int]:
    return chat.prompt_ids(tokenizer, text, None, 128)


# ---------------------------------------------------------------------------------------------
# Reproducibility


def test_prompts_have_different_lengths(tiny_tokenizer_session):
    lengths = {len(_prompt(tiny_tokenizer_session, r["prompt"])) for r in RECORDS}
    assert len(lengths) == len(RECORDS)


def test_sampling_gives_nonempty_answers(sampled_batch_1):
    assert len(sampled_batch_1) == len(RECORDS)
    assert all(isinstance(a, str) for a in sampled_batch_1)
    assert sum(bool(a) for a in sampled_batch_1) >= 8
    assert len(set(sampled_batch_1)) >= 8


@pytest.mark.parametrize("batch_size", [3, 8])
def test_sampled_answers_do_not_depend_on_batch_size(
    tiny_model_session, tiny_tokenizer_session, sampled_batch_1, batch_size
):
    batched = _answers(tiny_model_session, tiny_tokenizer_session, batch_size=batch_size)
    assert batched == sampled_batch_1


def test_sampled_answers_do_not_depend_on_record_order(
    tiny_model_session, tiny_tokenizer_session, sampled_batch_1
):
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
    shuffled = _answers(
        tiny_model_session, tiny_tokenizer_session, [RECORDS[i] for i in order], batch_size=4
    )
    assert shuffled == [sampled_batch_1[i] for i in order]


def test_same_seed_repeats(tiny_model_session, tiny_tokenizer_session, sampled_batch_1):
    assert _answers(tiny_model_session, tiny_tokenizer_session, batch_size=1) == sampled_batch_1


def test_different_seeds_give_different_answers(
    tiny_model_session, tiny_tokenizer_session, sampled_batch_1
):
    other = _answers(tiny_model_session, tiny_tokenizer_session, seed=8, batch_size=8)
    differing = sum(a != b for a, b in zip(other, sampled_batch_1, strict=True))
    assert differing >= 8, (other, sampled_batch_1)


def test_answer_depends_on_prompt_id(tiny_model_session, tiny_tokenizer_session, sampled_batch_1):
    renamed = [{**r, "id": r["id"] + "-b"} for r in RECORDS]
    answers = _answers(tiny_model_session, tiny_tokenizer_session, renamed, batch_size=8)
    assert sum(a != b for a, b in zip(answers, sampled_batch_1, strict=True)) >= 8


def test_stats_count_prompts_and_tokens(tiny_model_session, tiny_tokenizer_session):
    stats = GenerationStats()
    records = RECORDS[:3]
    _answers(tiny_model_session, tiny_tokenizer_session, records, batch_size=3, stats=stats)
    assert stats.prompts == 3
    assert 0 < stats.new_tokens <= 3 * MAX_NEW_TOKENS
    assert stats.seconds > 0
    assert stats.tokens_per_second == pytest.approx(stats.new_tokens / stats.seconds)


# ---------------------------------------------------------------------------------------------
# Greedy decoding and left padding


def _manual_greedy(model, prompt: list[int], eos: int, steps: int) -> list[int]:
    ids = list(prompt)
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            answer.append(token)
            ids.append(token)
    return answer


def test_greedy_equals_manual_argmax(tiny_model_session, tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    prompt = _prompt(tok, RECORDS[3]["prompt"])
    expected = _manual_greedy(tiny_model_session, prompt, tok.eos_token_id, MAX_NEW_TOKENS)
    assert expected, "the tiny model should not end its answer at once"
    got = generate_batch(
        tiny_model_session,
        [prompt],
        GREEDY,
        [torch.Generator()],
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert _ids(got) == [expected]
    text = _answers(tiny_model_session, tok, [RECORDS[3]], sampling=GREEDY)
    assert text == [tok.decode(expected, skip_special_tokens=True).strip()]


def test_left_padding_does_not_change_greedy_answers(tiny_model_session, tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    prompts = [_prompt(tok, RECORDS[i]["prompt"]) for i in (0, 9, 4)]
    alone = [
        generate_batch(
            tiny_model_session, [p], GREEDY, [torch.Generator()], tok.eos_token_id, tok.pad_token_id
        )[0].token_ids
        for p in prompts
    ]
    together = _ids(
        generate_batch(
            tiny_model_session,
            prompts,
            GREEDY,
            [torch.Generator() for _ in prompts],
            tok.eos_token_id,
            tok.pad_token_id,
        )
    )
    assert len(prompts[0]) < len(prompts[2]) < len(prompts[1])
    assert together == alone
    manual = _manual_greedy(tiny_model_session, prompts[0], tok.eos_token_id, MAX_NEW_TOKENS)
    assert together[0] == manual


def test_greedy_ignores_the_seed(tiny_model_session, tiny_tokenizer_session):
    a = _answers(tiny_model_session, tiny_tokenizer_session, RECORDS[:4], sampling=GREEDY, seed=1)
    b = _answers(tiny_model_session, tiny_tokenizer_session, RECORDS[:4], sampling=GREEDY, seed=2)
    assert a == b


class _CountingModel(torch.nn.Module):
    """A stand-in LM: the next token is always (last token + 1) mod vocab.

    Records what ``generate_batch`` passes in, so the padding and position bookkeeping can be
    checked.
    """

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(
        self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep=0
    ):
        self.calls.append(
            {
                "input_ids": input_ids.tolist(),
                "attention_mask": attention_mask.tolist(),
                "position_ids": position_ids.tolist(),
                "past": past_key_values,
            }
        )
        step = len(self.calls)
        logits = F.one_hot((input_ids[:, -1] + 1) % self.vocab, self.vocab).float() * 10
        return SimpleNamespace(logits=logits[:, None, :], past_key_values=step)


def test_generate_batch_stops_each_row_at_eos_and_drops_it():
    model = _CountingModel(vocab=10)
    eos, pad = 9, 0
    prompts = [[6, 7], [1, 2, 3], [5]]
    completions = generate_batch(
        model, prompts, GREEDY, [torch.Generator() for _ in prompts], eos, pad
    )
    answers = _ids(completions)
    assert [c.ended for c in completions] == [True, True, True]
    # row 0: 8, then eos; row 1: 4..8 then eos at step 6; row 2: 6, 7, 8, eos
    assert answers == [[8], [4, 5, 6, 7, 8], [6, 7, 8]]
    # all rows finished after 6 steps: no forward pass beyond that
    assert len(model.calls) == 6


def test_generate_batch_left_pads_and_tracks_positions():
    model = _CountingModel(vocab=50)
    prompts = [[7], [1, 2, 3]]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=3)
    completions = generate_batch(model, prompts, sampling, [torch.Generator()] * 2, 49, 0)
    assert _ids(completions) == [[8, 9, 10], [4, 5, 6]]
    assert [c.ended for c in completions] == [False, False]  # stopped at max_new_tokens
    first, second, third = model.calls
    assert first["input_ids"] == [[0, 0, 7], [1, 2, 3]]
    assert first["attention_mask"] == [[0, 0, 1], [1, 1, 1]]
    assert first["position_ids"] == [[0, 0, 0], [0, 1, 2]]
    assert first["past"] is None
    assert second["input_ids"] == [[8], [4]]
    assert second["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert second["position_ids"] == [[1], [3]]
    assert second["past"] == 1
    assert third["position_ids"] == [[2], [4]]
    assert third["attention_mask"] == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_generate_uses_the_chat_prompt_ids():
    assert generation.prompt_ids is chat.prompt_ids


# ---------------------------------------------------------------------------------------------
# top-p


def test_top_p_one_keeps_everything():
    logits = torch.tensor([[0.3, -1.0, 2.0]])
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05, given in a shuffled order
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.51) == [False, True, False, True]
    assert kept(0.8) == [False, True, False, True]
    assert kept(0.81) == [True, True, False, True]
    assert kept(0.99) == [True, True, True, True]
    assert kept(1e-9) == [False, True, False, False]


def testtop_p_filters_each_row_separately():
    logits = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]]).log()
    filtered = top_p_filter(logits, 0.7)
    assert torch.isfinite(filtered).tolist() == [[True, True, False], [False, True, True]]
    kept = torch.isfinite(filtered)
    assert torch.equal(filtered[kept], logits[kept])


def _sample_frequencies(
    probs: list[float], top_p: float, draws: int = 3000, temperature: float = 1.0
) -> list[float]:
    logits = torch.tensor([probs]).log().expand(draws, -1)
    generators = [torch.Generator().manual_seed(i) for i in range(draws)]
    tokens = next_tokens(logits, SamplingParams(temperature, top_p, 1), generators)
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    return (counts / draws).tolist()


def test_sampling_follows_the_distribution():
    assert _sample_frequencies([0.6, 0.3, 0.1], 1.0) == pytest.approx([0.6, 0.3, 0.1], abs=0.03)


def test_temperature_sharpens_the_distribution():
    """At temperature 0.5 the draws follow softmax(2·log p) = p² / Σp², not p.

    3000 seeded draws: the binomial standard deviation is at most 0.009, so 0.03 is over 3σ;
    the untempered 0.6 is 0.18 away from the expected 0.78."""
    probs = [0.6, 0.3, 0.1]
    squared = [p * p for p in probs]
    expected = [q / sum(squared) for q in squared]  # 0.783, 0.196, 0.022
    freq = _sample_frequencies(probs, 1.0, temperature=0.5)
    assert freq == pytest.approx(expected, abs=0.03)
    assert freq[0] > probs[0] + 0.1


def test_top_p_sampling_renormalises_over_the_kept_tokens():
    freq = _sample_frequencies([0.6, 0.3, 0.1], 0.7)
    assert freq[2] == 0.0
    assert freq[:2] == pytest.approx([2 / 3, 1 / 3], abs=0.03)


def test_tiny_top_p_is_greedy(tiny_model_session, tiny_tokenizer_session):
    records = RECORDS[:4]
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=MAX_NEW_TOKENS)
    sampled = _answers(tiny_model_session, tiny_tokenizer_session, records, sampling=nucleus)
    greedy = _answers(tiny_model_session, tiny_tokenizer_session, records, sampling=GREEDY)
    assert sampled == greedy

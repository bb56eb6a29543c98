"""Tests for spinflow.chat: one prompt format for generation, training and evaluation; masks."""

from __future__ import annotations

import pytest

from spinflow import chat, evaluation, pair_training, training
from spinflow.chat import Encoded, answer_ids, collate, encode_example, prompt_ids, render_prompt

ASSISTANT_PREFIX = "<|im_start|>assistant\n"


@pytest.mark.parametrize("system_prompt", [None, "You are terse."])
def test_training_prompt_equals_generation_prompt(tiny_tokenizer_session, system_prompt):
    tok = tiny_tokenizer_session
    encoded = encode_example(
        tok,
        "What is 2 + 2?",
        "4",
        system_prompt=system_prompt,
        max_prompt_length=128,
        max_length=256,
    )
    generation_ids = prompt_ids(tok, "What is 2 + 2?", system_prompt, 128)
    assert encoded.input_ids[: encoded.prompt_length] == generation_ids
    assert encoded.input_ids[encoded.prompt_length :] == answer_ids(tok, "4", 256)
    rendered = render_prompt(tok, "What is 2 + 2?", system_prompt)
    assert rendered.endswith(ASSISTANT_PREFIX)
    assert tok.decode(generation_ids) == rendered
    if system_prompt:
        assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    else:
        assert rendered.startswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>")


def test_every_stage_encodes_through_chat():
    from spinflow import generation

    assert generation.prompt_ids is chat.prompt_ids
    assert training.encode_example is chat.encode_example
    assert evaluation.encode_example is chat.encode_example
    assert pair_training.encode_example is chat.encode_example


def test_prompt_truncation_keeps_the_end(tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    text = "one two three four five six seven eight nine ten eleven twelve"
    full = prompt_ids(tok, text, None, 1000)
    short = prompt_ids(tok, text, None, 8)
    assert len(full) > 8
    assert short == full[-8:]
    assert tok.decode(short).endswith(ASSISTANT_PREFIX)
    encoded = encode_example(
        tok, text, "ok", system_prompt=None, max_prompt_length=8, max_length=64
    )
    assert encoded.prompt_length == 8
    assert encoded.input_ids[:8] == full[-8:]


def test_answer_truncation_keeps_the_eos(tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    answer = " ".join(["lengthy"] * 80)
    encoded = encode_example(
        tok, "Talk.", answer, system_prompt=None, max_prompt_length=16, max_length=32
    )
    assert len(encoded.input_ids) == 32
    assert encoded.input_ids[-1] == tok.eos_token_id
    full_answer = tok(answer, add_special_tokens=False)["input_ids"]
    assert (
        encoded.input_ids[encoded.prompt_length : -1] == full_answer[: 31 - encoded.prompt_length]
    )


def test_loss_mask_covers_exactly_answer_and_eos(tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    assert tok.pad_token_id == tok.eos_token_id
    short = encode_example(
        tok, "Hi?", "yes", system_prompt=None, max_prompt_length=64, max_length=128
    )
    long = encode_example(
        tok, "Please say a longer thing?", "a much longer answer here", system_prompt=None,
        max_prompt_length=64, max_length=128,
    )  # fmt: skip
    batch = collate([short, long], tok.pad_token_id)
    for row, encoded in enumerate((short, long)):
        n = len(encoded.input_ids)
        answer_len = len(
            tok(["yes", "a much longer answer here"][row], add_special_tokens=False)["input_ids"]
        )
        mask = batch["loss_mask"][row].tolist()
        assert mask == [0] * encoded.prompt_length + [1] * (n - encoded.prompt_length) + [0] * (
            batch["input_ids"].size(1) - n
        )
        assert sum(mask) == answer_len + 1
        assert batch["input_ids"][row, n - 1].item() == tok.eos_token_id
        assert batch["attention_mask"][row].sum().item() == n
    # the short row is padded with the eos id, and the padding is outside the mask
    pad_positions = batch["attention_mask"][0] == 0
    assert pad_positions.any()
    assert (batch["input_ids"][0][pad_positions] == tok.eos_token_id).all()
    assert (batch["loss_mask"][0][pad_positions] == 0).all()


def test_collate_masks_the_final_eos_even_when_pad_is_eos():
    pad = eos = 2
    encoded = [
        Encoded([1, 5, 6, 3, 4, eos], prompt_length=3),  # answer 3 4 <eos>
        Encoded([1, 6, 3, eos], prompt_length=2),  # answer 3 <eos>, then two pads
    ]
    batch = collate(encoded, pad_token_id=pad)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 3, 4, 2], [1, 6, 3, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]

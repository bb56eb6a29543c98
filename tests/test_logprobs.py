"""Tests for spinflow.logprobs: answer-only log-probs equal those read from the full logits."""

from __future__ import annotations

import pytest
import torch

from spinflow import logprobs
from spinflow.chat import collate, collate_shared, encode_example
from spinflow.losses import masked_nll, sequence_logps

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PAIRS = [
    ("What is 2 plus 2?", "2 plus 2 is 4.", "five"),
    ("Name a fruit in one word.", "Apple", "I would say that a banana is a fruit, yes."),
    ("Say hi.", "hi", "hello there, how are you today?"),
]


def _encoded(tok, prompt, answer):
    return encode_example(
        tok, prompt, answer, system_prompt=None, max_prompt_length=128, max_length=256
    )


def _rows(tok):
    """Reals then generateds as plain rows (the unshared layout)."""
    reals = [_encoded(tok, p, r) for p, r, _ in PAIRS]
    generateds = [_encoded(tok, p, g) for p, _, g in PAIRS]
    return reals, generateds


def _full_logits_logps(model, batch):
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])


def test_rows_equal_the_full_logits_path(tiny_tokenizer_session, tiny_model_session):
    reals, generateds = _rows(tiny_tokenizer_session)
    batch = collate(reals + generateds, tiny_tokenizer_session.pad_token_id)
    with torch.no_grad():
        expected = _full_logits_logps(tiny_model_session, batch)
        got = logprobs.segment_logps(tiny_model_session, batch)
        via_model = logprobs.segment_logps(tiny_model_session, batch, full_logits=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_model, expected, atol=1e-5, rtol=1e-5)


def test_mean_nll_equals_masked_nll(tiny_tokenizer_session, tiny_model_session):
    reals, _ = _rows(tiny_tokenizer_session)
    batch = collate(reals, tiny_tokenizer_session.pad_token_id)
    with torch.no_grad():
        logits = tiny_model_session(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        expected = masked_nll(logits, batch["input_ids"], batch["loss_mask"])
        got = logprobs.mean_nll(tiny_model_session, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_small_chunks_give_the_same_numbers(
    tiny_tokenizer_session, tiny_model_session, monkeypatch
):
    reals, generateds = _rows(tiny_tokenizer_session)
    batch = collate(reals + generateds, tiny_tokenizer_session.pad_token_id)
    with torch.no_grad():
        expected = logprobs.segment_logps(tiny_model_session, batch)
        monkeypatch.setattr(logprobs, "CHUNK_SIZE", 5)
        got = logprobs.segment_logps(tiny_model_session, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_output_layer_sees_only_scored_positions(tiny_tokenizer_session, tiny_model_session):
    reals, generateds = _rows(tiny_tokenizer_session)
    batch = collate(reals + generateds, tiny_tokenizer_session.pad_token_id)
    shapes = []
    head = tiny_model_session.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            logprobs.segment_logps(tiny_model_session, batch)
    finally:
        handle.remove()
    scored = int(batch["loss_mask"][:, 1:].sum())
    assert sum(s[0] for s in shapes) == scored
    assert all(len(s) == 2 for s in shapes)  # [positions, vocab]: never [batch, length, vocab]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_equals_separate_rows_with_gradients(
    tiny_tokenizer_session, tiny_model, attention
):
    """Prompt once, both answers after it: log-probs and gradients as with one row per answer.

    In float64, except that llama's RMSNorm computes in float32: the prompt's gradient, summed
    over both answers before it, passes one float32 rounding that separate rows do not."""
    tok = tiny_tokenizer_session
    model = tiny_model.to(torch.float64)
    model.config._attn_implementation = attention
    reals, generateds = _rows(tok)
    rows = collate(reals + generateds, tok.pad_token_id)
    shared = collate_shared(
        [[r, g] for r, g in zip(reals, generateds, strict=True)], tok.pad_token_id
    )
    assert shared["input_ids"].numel() < rows["input_ids"].numel()
    weights = torch.arange(1, 2 * len(PAIRS) + 1, dtype=torch.float64)

    def run(batch, full_logits):
        model.zero_grad()
        logps = logprobs.segment_logps(model, batch, full_logits=full_logits)
        (logps * weights).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = run(rows, True)
    got, grads = run(shared, False)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_shared_prompt_batch_layout(tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    reals, generateds = _rows(tok)
    batch = collate_shared([[reals[0], generateds[0]]], tok.pad_token_id)
    p = reals[0].prompt_length
    r = len(reals[0].input_ids) - p
    g = len(generateds[0].input_ids) - p
    assert batch["input_ids"][0].tolist() == reals[0].input_ids + generateds[0].input_ids[p:]
    assert batch["position_ids"][0].tolist() == list(range(p + r)) + list(range(p, p + g))
    assert batch["branch"][0].tolist() == [0] * p + [1] * r + [2] * g
    assert batch["score_segments"].tolist() == [0] * r + [1] * g
    # the first token of each answer is predicted by the prompt's last token
    assert batch["score_positions"][0].item() == p - 1
    assert batch["score_positions"][r].item() == p - 1
    assert int(batch["tokens"]) == len(reals[0].input_ids) + len(generateds[0].input_ids)
    mask = logprobs.shared_prompt_mask(batch["branch"])[0, 0]
    assert not mask[p + r, p : p + r].any()  # the generated answer never sees the real one
    assert mask[p + r, :p].all()


def test_shared_prompt_padding_rows_are_never_empty():
    branch = torch.tensor([[0, 0, 1, 2, -1, -1]])
    mask = logprobs.shared_prompt_mask(branch)
    assert mask[0, 0].any(-1).all()


def test_lora_wrapped_model_equals_full_logits(tiny_tokenizer_session, tiny_model):
    from spinflow.schema import LoraParams, OptimParams
    from spinflow.training import apply_lora

    model = apply_lora(
        tiny_model,
        OptimParams(lora=LoraParams(enabled=True, r=4, alpha=8, target_modules=["q_proj"])),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    reals, generateds = _rows(tiny_tokenizer_session)
    batch = collate(reals + generateds, tiny_tokenizer_session.pad_token_id)
    with torch.no_grad():
        expected = _full_logits_logps(model, batch)
        got = logprobs.segment_logps(model, batch)
    assert logprobs.split_model(model) is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

"""Tests for spinflow.training and spinflow.chat: one prompt format, masks, the training loop."""

from __future__ import annotations

import math

import pytest
import torch

from spinflow import chat, evaluation, training
from spinflow.chat import answer_ids, collate, encode_example, prompt_ids, render_prompt
from spinflow.config import LoraParams, OptimParams, PromptParams
from spinflow.errors import TrainingError
from spinflow.losses import masked_nll
from spinflow.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ASSISTANT_PREFIX = "<|im_start|>assistant\n"
PROMPT = PromptParams(system_prompt=None, max_prompt_length=128, max_length=256)

PAIRS = [
    {"prompt": f"What is {i} plus {i}?", "real": f"{i} plus {i} is {2 * i}.", "generated": g}
    for i, g in enumerate(["zq xx", "banana yes", "no idea at all", "7", "well, maybe 3", "qq"])
]
SFT_RECORDS = [
    {"prompt": f"Repeat the word {w}.", "answer": f"{w} {w}"}
    for w in ["apple", "pear", "plum", "fig", "lime", "kiwi", "date"]
]


def _optim(**changes) -> OptimParams:
    base = {
        "learning_rate": 1e-3,
        "epochs": 1,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "optimizer": "adamw",
        "scheduler": "constant",
        "warmup_ratio": 0.0,
    }
    return OptimParams(**{**base, **changes})


def _pair_examples(tokenizer, accelerator, model, pairs=PAIRS):
    examples = training.encode_pairs(tokenizer, pairs, PROMPT)
    return training.reference_logps(accelerator, model, examples, 4, tokenizer.pad_token_id)


def _policy_logps(model, tokenizer, examples) -> tuple[list[float], list[float]]:
    batch = training.pair_collate(tokenizer.pad_token_id)(examples)
    model.eval()
    with torch.no_grad():
        logps = training.forward_logps(model, batch)
    n = len(examples)
    return logps[:n].tolist(), logps[n:].tolist()


# ---------------------------------------------------------------------------------------------
# One prompt format


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


def test_encode_pairs_share_the_prompt(tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    (example,) = training.encode_pairs(tok, PAIRS[:1], PROMPT)
    expected_prompt = prompt_ids(tok, PAIRS[0]["prompt"], None, 128)
    for encoded, text in ((example.real, PAIRS[0]["real"]), (example.generated, "zq xx")):
        assert encoded.prompt_length == len(expected_prompt)
        assert encoded.input_ids == expected_prompt + answer_ids(tok, text, 256)


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


# ---------------------------------------------------------------------------------------------
# Reference log-probs and one SPIN step


def test_reference_logps_equal_one_pair_at_a_time(tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    accelerator = training.make_accelerator(_optim())
    examples = _pair_examples(tok, accelerator, tiny_model)
    assert [e.index for e in examples] == list(range(len(PAIRS)))
    for example in examples:
        real, generated = _policy_logps(tiny_model, tok, [example])
        assert example.reference_real_logps == pytest.approx(real[0], abs=1e-4)
        assert example.reference_generated_logps == pytest.approx(generated[0], abs=1e-4)
        assert example.reference_real_logps < 0 and example.reference_generated_logps < 0


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_one_spin_step_raises_real_over_generated(tiny_tokenizer_session, tiny_model, kind):
    tok = tiny_tokenizer_session
    optim = _optim(learning_rate=1e-3, batch_size=len(PAIRS), optimizer="adamw")
    accelerator = training.make_accelerator(optim)
    examples = _pair_examples(tok, accelerator, tiny_model)
    before = [e.reference_real_logps - e.reference_generated_logps for e in examples]

    result = training.train_loop(
        accelerator,
        tiny_model,
        examples,
        training.pair_collate(tok.pad_token_id),
        training.spin_loss_fn(0.1, kind),
        optim,
        seed=0,
        desc="spin",
    )

    assert result.steps == 1
    (row,) = result.history
    # the policy equals the opponent θk at the first step: zero margin, loss log 2 (or 1)
    assert row["loss"] == pytest.approx(math.log(2.0) if kind == "sigmoid" else 1.0, abs=1e-4)
    assert row["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    real, generated = _policy_logps(tiny_model, tok, examples)
    after = [r - g for r, g in zip(real, generated, strict=True)]
    gain = sum(after) - sum(before)
    assert gain > 1.0, f"margin before {before}, after {after}"
    assert sum(a > b for a, b in zip(after, before, strict=True)) >= len(PAIRS) - 1


def test_spin_training_rewards_grow_over_steps(tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    optim = _optim(learning_rate=1e-3, batch_size=3, epochs=3, optimizer="rmsprop")
    accelerator = training.make_accelerator(optim)
    examples = _pair_examples(tok, accelerator, tiny_model)
    result = training.train_loop(
        accelerator,
        tiny_model,
        examples,
        training.pair_collate(tok.pad_token_id),
        training.spin_loss_fn(0.1, "sigmoid"),
        optim,
        seed=0,
        desc="spin",
    )
    assert result.steps == 6
    assert result.history[-1]["reward_margin"] > result.history[0]["reward_margin"]
    assert result.history[-1]["loss"] < math.log(2.0)
    assert result.history[-1]["reward_accuracy"] > 0.5
    summary = result.summary()
    assert summary["optimizer_steps"] == 6
    assert summary["examples_seen"] == 18
    assert summary["final_loss"] == result.history[-1]["loss"]


def test_training_is_reproducible(tiny_checkpoint_session, tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    optim = _optim(batch_size=2, epochs=1)

    def run():
        model = load_model(tiny_checkpoint_session)
        accelerator = training.make_accelerator(optim)
        examples = training.encode_sft(tok, SFT_RECORDS, PROMPT)
        result = training.train_loop(
            accelerator,
            model,
            examples,
            training.sft_collate(tok.pad_token_id),
            training.sft_loss_fn,
            optim,
            seed=3,
            desc="sft",
        )
        return [row["loss"] for row in result.history], model.state_dict()

    losses_a, state_a = run()
    losses_b, state_b = run()
    assert losses_a == losses_b
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_sft_steps_lower_the_answer_nll(tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    examples = training.encode_sft(tok, SFT_RECORDS, PROMPT)
    batch = training.sft_collate(tok.pad_token_id)(examples)

    def nll() -> float:
        with torch.no_grad():
            logits = tiny_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        return masked_nll(logits, batch["input_ids"], batch["loss_mask"]).item()

    before = nll()
    optim = _optim(learning_rate=3e-3, batch_size=4, epochs=3)
    _train_sft(tok, tiny_model, optim, examples=examples)
    tiny_model.eval()
    assert nll() < before - 0.5


# ---------------------------------------------------------------------------------------------
# Failures, step counting


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_training_error(tiny_tokenizer_session, tiny_model, bad):
    tok = tiny_tokenizer_session
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = out.logits.sum() * 0 + (bad if len(calls) == 3 else 1.0)
        return loss, {"loss": loss.item()}

    optim = _optim(batch_size=2)
    with pytest.raises(TrainingError, match=r"mysft: loss is (nan|inf) at optimizer step 3"):
        training.train_loop(
            training.make_accelerator(optim),
            tiny_model,
            training.encode_sft(tok, SFT_RECORDS, PROMPT),
            training.sft_collate(tok.pad_token_id),
            loss_fn,
            optim,
            seed=0,
            desc="mysft",
        )
    assert len(calls) == 3


def test_no_examples_raises_training_error(tiny_tokenizer_session, tiny_model):
    optim = _optim()
    with pytest.raises(TrainingError, match="no training examples"):
        training.train_loop(
            training.make_accelerator(optim),
            tiny_model,
            [],
            training.sft_collate(tiny_tokenizer_session.pad_token_id),
            training.sft_loss_fn,
            optim,
            seed=0,
            desc="empty",
        )


def _train_sft(tok, model, optim, *, accelerator=None, examples=None, desc="sft"):
    """Plain SFT on the fixture records with ``optim``; returns the accelerator it used."""
    accelerator = accelerator or training.make_accelerator(optim)
    training.train_loop(
        accelerator,
        model,
        training.encode_sft(tok, SFT_RECORDS, PROMPT) if examples is None else examples,
        training.sft_collate(tok.pad_token_id),
        training.sft_loss_fn,
        optim,
        seed=0,
        desc=desc,
    )
    return accelerator


def _sft_run(tok, model, n_examples: int, max_steps: int | None = None, **optim_changes):
    optim = _optim(learning_rate=1e-4, optimizer="sgd", **optim_changes)
    records = [SFT_RECORDS[i % len(SFT_RECORDS)] for i in range(n_examples)]
    return training.train_loop(
        training.make_accelerator(optim),
        model,
        training.encode_sft(tok, records, PROMPT),
        training.sft_collate(tok.pad_token_id),
        training.sft_loss_fn,
        optim,
        seed=0,
        desc="sft",
        max_steps=max_steps,
    )


@pytest.mark.parametrize(
    ("n_examples", "batch_size", "accumulation", "epochs"),
    [(5, 2, 2, 2), (6, 2, 1, 1), (7, 1, 3, 1), (4, 4, 3, 2), (9, 2, 4, 1)],
)
def test_optimizer_steps_with_gradient_accumulation(
    tiny_tokenizer_session, tiny_model, n_examples, batch_size, accumulation, epochs
):
    result = _sft_run(
        tiny_tokenizer_session,
        tiny_model,
        n_examples,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        epochs=epochs,
    )
    micro = math.ceil(n_examples / batch_size)
    expected = math.ceil(micro / accumulation) * epochs
    assert result.steps == expected
    assert [row["step"] for row in result.history] == list(range(1, expected + 1))
    assert result.examples_seen == n_examples * epochs
    assert result.history[-1]["epoch"] == pytest.approx(epochs)


def test_accumulated_step_epochs(tiny_tokenizer_session, tiny_model):
    # 5 examples, batch 2: micro-batches of 2, 2, 1; accumulating 2: steps close after 2 and 3
    result = _sft_run(
        tiny_tokenizer_session,
        tiny_model,
        5,
        batch_size=2,
        gradient_accumulation_steps=2,
        epochs=2,
    )
    epochs = [row["epoch"] for row in result.history]
    assert epochs == pytest.approx([2 / 3, 1.0, 5 / 3, 2.0])


def test_max_steps_cycles_beyond_one_epoch(tiny_tokenizer_session, tiny_model):
    result = _sft_run(tiny_tokenizer_session, tiny_model, 4, max_steps=5, batch_size=2, epochs=1)
    assert result.steps == 5
    assert [row["epoch"] for row in result.history] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])
    assert result.examples_seen == 10


def test_max_steps_shorter_than_an_epoch(tiny_tokenizer_session, tiny_model):
    result = _sft_run(tiny_tokenizer_session, tiny_model, 7, max_steps=2, batch_size=2, epochs=3)
    assert result.steps == 2
    assert result.examples_seen == 4


def test_accumulation_after_an_interrupted_epoch(tiny_tokenizer_session, tiny_checkpoint_session):
    tok = tiny_tokenizer_session
    _sft_run(tok, load_model(tiny_checkpoint_session), 7, max_steps=1, batch_size=2)
    result = _sft_run(
        tok,
        load_model(tiny_checkpoint_session),
        5,
        batch_size=2,
        gradient_accumulation_steps=2,
        epochs=1,
    )
    assert result.steps == 2
    assert [row["epoch"] for row in result.history] == pytest.approx([2 / 3, 1.0])


def test_linear_schedule_with_warmup(tiny_tokenizer_session, tiny_model):
    result = _sft_run(
        tiny_tokenizer_session,
        tiny_model,
        8,
        batch_size=1,
        epochs=1,
        scheduler="linear",
        warmup_ratio=0.25,
    )
    # each row holds the rate its own update used: 2 warmup steps from 0, then linear decay
    rates = [row["learning_rate"] for row in result.history]
    assert len(rates) == 8
    assert rates[0] == pytest.approx(0.0, abs=1e-12)
    assert rates[1] == pytest.approx(0.5e-4)
    assert max(rates) == pytest.approx(1e-4)
    assert rates.index(max(rates)) == 2
    assert rates[-1] == pytest.approx(1e-4 / 6)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:], strict=False))


# ---------------------------------------------------------------------------------------------
# LoRA and checkpoints


LORA_TARGETS = ["q_proj", "v_proj"]


def _lora_optim() -> OptimParams:
    return _optim(
        learning_rate=1e-2,
        batch_size=4,
        lora=LoraParams(enabled=True, r=4, alpha=8, target_modules=LORA_TARGETS),
    )


def test_apply_lora_is_a_no_op_when_disabled(tiny_model):
    assert training.apply_lora(tiny_model, _optim()) is tiny_model
    assert training.merge_lora(tiny_model) is tiny_model


def test_lora_trains_adapters_and_merges_into_a_plain_model(tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    optim = _lora_optim()
    model = training.apply_lora(tiny_model, optim)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    assert {n.split(".")[-4] for n in trainable} == set(LORA_TARGETS)

    _train_sft(tok, model, optim, desc="lora")
    plain = training.merge_lora(model)
    assert type(plain).__name__ == "LlamaForCausalLM"
    merged = plain.state_dict()
    assert set(merged) == set(original)
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert changed
    assert all(k.split(".")[-2] in LORA_TARGETS for k in changed), changed


def test_save_checkpoint_reloads(tiny_tokenizer_session, tiny_model, tmp_path):
    tok = tiny_tokenizer_session
    optim = _optim(batch_size=4)
    accelerator = _train_sft(tok, tiny_model, optim)
    out = tmp_path / "models" / "theta_1"
    training.save_checkpoint(accelerator, tiny_model, tok, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["theta_1"]
    reloaded = load_model(out)
    expected = tiny_model.state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    reloaded_tok = load_tokenizer(out)
    assert reloaded_tok.chat_template == tok.chat_template
    assert prompt_ids(reloaded_tok, "Hi?", None, 64) == prompt_ids(tok, "Hi?", None, 64)


def test_save_checkpoint_merges_lora(
    tiny_tokenizer_session, tiny_model, tiny_checkpoint_session, tmp_path
):
    tok = tiny_tokenizer_session
    optim = _lora_optim()
    model = training.apply_lora(tiny_model, optim)
    accelerator = _train_sft(tok, model, optim, desc="lora")
    model.eval()
    ids = torch.tensor([prompt_ids(tok, "Repeat the word fig.", None, 64)])
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits

    out = tmp_path / "theta_1"
    training.save_checkpoint(accelerator, model, tok, out)
    assert not (out / "adapter_config.json").exists()
    reloaded = load_model(out).eval()
    original_keys = set(load_model(tiny_checkpoint_session).state_dict())
    assert set(reloaded.state_dict()) == original_keys
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted_logits)

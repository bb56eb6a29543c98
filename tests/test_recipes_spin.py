"""Tests for spinflow.methods.spin.train: pairs, mixing, the reference pass and the loss wiring."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_optim
from spinflow import pair_training, training
from spinflow.chat import answer_ids, prompt_ids
from spinflow.config import PromptParams
from spinflow.methods.spin import generate
from spinflow.methods.spin import train as spin

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = PromptParams(system_prompt=None, max_prompt_length=128, max_length=256)

PAIRS = [
    {"prompt": f"What is {i} plus {i}?", "real": f"{i} plus {i} is {2 * i}.", "generated": g}
    for i, g in enumerate(["zq xx", "banana yes", "no idea at all", "7", "well, maybe 3", "qq"])
]


def _pair_examples(tokenizer, accelerator, model, pairs=PAIRS):
    examples = pair_training.encode_pairs(tokenizer, pairs, PROMPT)
    return pair_training.reference_logps(accelerator, model, examples, 4, tokenizer.pad_token_id)


def _policy_logps(model, tokenizer, examples) -> tuple[list[float], list[float]]:
    batch = pair_training.pair_collate(tokenizer.pad_token_id)(examples)
    model.eval()
    with torch.no_grad():
        logps = training.forward_logps(model, batch)
    n = len(examples)
    return logps[:n].tolist(), logps[n:].tolist()


def test_encode_pairs_share_the_prompt(tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    (example,) = pair_training.encode_pairs(tok, PAIRS[:1], PROMPT)
    expected_prompt = prompt_ids(tok, PAIRS[0]["prompt"], None, 128)
    for encoded, text in ((example.real, PAIRS[0]["real"]), (example.generated, "zq xx")):
        assert encoded.prompt_length == len(expected_prompt)
        assert encoded.input_ids == expected_prompt + answer_ids(tok, text, 256)


# ---------------------------------------------------------------------------------------------
# Reference log-probs and one SPIN step


def test_reference_logps_equal_one_pair_at_a_time(tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    accelerator = training.make_accelerator(make_optim())
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
    optim = make_optim(learning_rate=1e-3, batch_size=len(PAIRS), optimizer="adamw")
    accelerator = training.make_accelerator(optim)
    examples = _pair_examples(tok, accelerator, tiny_model)
    before = [e.reference_real_logps - e.reference_generated_logps for e in examples]

    result = training.train_loop(
        accelerator,
        tiny_model,
        examples,
        pair_training.pair_collate(tok.pad_token_id),
        pair_training.spin_loss_fn(0.1, kind),
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
    optim = make_optim(learning_rate=1e-3, batch_size=3, epochs=3, optimizer="rmsprop")
    accelerator = training.make_accelerator(optim)
    examples = _pair_examples(tok, accelerator, tiny_model)
    result = training.train_loop(
        accelerator,
        tiny_model,
        examples,
        pair_training.pair_collate(tok.pad_token_id),
        pair_training.spin_loss_fn(0.1, "sigmoid"),
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


# ---------------------------------------------------------------------------------------------
# Pairs on disk and mixing


def _params(iterations=3, mix_previous=1):
    from spinflow.config import default_params_dict, validate_params

    raw = default_params_dict()
    raw["spin"].update(iterations=iterations, mix_previous=mix_previous)
    return validate_params(raw)


def _write_pairs(k: int, count: int = 2) -> None:
    from spinflow.io import write_jsonl
    from spinflow.methods.spin.graph import pairs_file

    pool = [
        {"id": f"p{i}", "task": "t", "prompt": f"q{i}", "answer": f"a{i}"} for i in range(count)
    ]
    write_jsonl(pairs_file(k), generate.make_pairs(pool, [f"g{k}-{i}" for i in range(count)], k))


def test_make_pairs_keeps_real_and_generated_apart():
    pool = [{"id": "x", "task": "sum", "prompt": "1+1?", "answer": "2"}]
    assert generate.make_pairs(pool, ["3"], 4) == [
        {"id": "x", "iteration": 4, "task": "sum", "prompt": "1+1?", "real": "2", "generated": "3"}
    ]
    with pytest.raises(ValueError):
        generate.make_pairs(pool, ["3", "4"], 0)


@pytest.mark.parametrize("mix_previous", [0, 1, 2])
def test_training_pairs_mix_previous_iterations_oldest_first(tmp_path, monkeypatch, mix_previous):
    monkeypatch.chdir(tmp_path)
    for k in range(3):
        _write_pairs(k)
    pairs = spin.training_pairs(_params(mix_previous=mix_previous), 2)
    first = max(0, 2 - mix_previous)
    assert [p["iteration"] for p in pairs] == [j for j in range(first, 3) for _ in range(2)]
    assert pairs[-1]["generated"] == "g2-1"


def test_training_pairs_name_the_stage_that_makes_missing_pairs(tmp_path, monkeypatch):
    from spinflow.errors import SpinflowError

    monkeypatch.chdir(tmp_path)
    _write_pairs(1)
    with pytest.raises(SpinflowError) as err:
        spin.training_pairs(_params(mix_previous=1), 1)
    assert str(err.value) == (
        "generated/iter_0/pairs.jsonl: missing; it is made by stage 'generate_iter_0' "
        "(run `dvc repro generate_iter_0`)"
    )


@pytest.mark.parametrize("mix_previous", [0, 1])
def test_training_pairs_call_an_empty_pairs_file_empty(tmp_path, monkeypatch, mix_previous):
    """Not blamed on spin.feedback_filter, and not trained on the earlier iteration's alone."""
    from spinflow.errors import DataError
    from spinflow.methods.spin.graph import pairs_file

    monkeypatch.chdir(tmp_path)
    _write_pairs(0)
    pairs_file(1).parent.mkdir(parents=True)
    pairs_file(1).write_bytes(b"")
    with pytest.raises(DataError) as err:
        spin.training_pairs(_params(mix_previous=mix_previous), 1)
    assert str(err.value) == "generated/iter_1/pairs.jsonl: empty, no pairs (the file is damaged)"
    assert err.value.path == pairs_file(1)  # the stage runner adds which stage makes it again


# ---------------------------------------------------------------------------------------------
# The feedback filter and the cost of an iteration

VERIFIED = [
    {**PAIRS[3], "verifier": {"name": "final_number", "args": {"value": 6}}},  # "7": wrong
    {
        **PAIRS[4],
        "verifier": {"name": "final_number", "args": {"value": 3}},
    },  # "well, maybe 3": passes
    PAIRS[0],  # no verifier: never filtered
]


def test_feedback_filter_drops_or_keeps_only_the_real_term(tiny_tokenizer_session):
    examples = pair_training.encode_pairs(tiny_tokenizer_session, VERIFIED, PROMPT)
    assert [spin.generated_passes(p) for p in VERIFIED] == [False, True, False]

    kept, counts = spin.feedback_filter(examples, VERIFIED, "keep")
    assert kept == examples and counts == {"pairs_generated_correct": 1}
    kept, counts = spin.feedback_filter(examples, VERIFIED, "drop")
    assert [e.index for e in kept] == [0, 2] and counts["pairs_dropped"] == 1
    kept, counts = spin.feedback_filter(examples, VERIFIED, "real_only")
    assert [e.contrast for e in kept] == [True, False, True] and counts["pairs_real_only"] == 1


def test_a_real_only_pair_has_no_generated_term(tiny_tokenizer_session, tiny_model):
    """Its loss is −log σ(β · real log-ratio) and no gradient reaches the generated answer."""
    tok = tiny_tokenizer_session
    accelerator = training.make_accelerator(make_optim())
    examples = _pair_examples(tok, accelerator, tiny_model, VERIFIED[:2])
    examples, _ = spin.feedback_filter(examples, VERIFIED[:2], "real_only")
    # a reference that differs from the policy, so that the log-ratios are not zero
    shifted = [
        spin.dataclasses.replace(
            e,
            reference_real_logps=e.reference_real_logps - 0.5,
            reference_generated_logps=e.reference_generated_logps + 0.7,
        )
        for e in examples
    ]
    batch = pair_training.pair_collate(tok.pad_token_id)(shifted)
    tiny_model.train()
    loss, _ = pair_training.spin_loss_fn(0.1, "sigmoid")(tiny_model, batch)
    real_term = torch.nn.functional.logsigmoid(torch.tensor(0.1 * 0.5))
    both_terms = torch.nn.functional.logsigmoid(torch.tensor(0.1 * (0.5 + 0.7)))
    assert loss.item() == pytest.approx(-(real_term + both_terms).item() / 2, abs=1e-4)

    without = pair_training.pair_collate(tok.pad_token_id)(
        [spin.dataclasses.replace(e, contrast=True) for e in shifted]
    )
    assert "contrast" not in without
    full, _ = pair_training.spin_loss_fn(0.1, "sigmoid")(tiny_model, without)
    assert full.item() == pytest.approx(-both_terms.item(), abs=1e-4)


def test_iteration_compute_counts_generation_of_this_iteration_only(tiny_tokenizer_session):
    pairs = [{**PAIRS[0], "iteration": 0}, {**PAIRS[1], "iteration": 1}]
    examples = pair_training.encode_pairs(tiny_tokenizer_session, pairs, PROMPT)
    cost = spin.iteration_compute(examples, pairs, examples[1:], epochs=2, k=1)
    generated = len(examples[1].generated.input_ids)
    row = examples[1].length  # the prompt once and both answers
    assert row == len(examples[1].real.input_ids) + generated - examples[1].real.prompt_length
    assert cost == {
        "generation_tokens": generated,
        "reference_tokens": row,
        "compute_tokens": generated + row + 2 * 3 * row,
    }


def test_generated_logp_agreement_compares_this_iterations_answers_with_the_reference(
    tiny_tokenizer_session, tiny_model
):
    accelerator = training.make_accelerator(make_optim())
    pairs = [dict(p, iteration=1) for p in PAIRS]
    examples = _pair_examples(tiny_tokenizer_session, accelerator, tiny_model, pairs)
    for pair, example, off in zip(pairs, examples, [0.0, 0.0, -0.2, 0.3, 2.0, 0.0], strict=True):
        pair["generated_logp"] = example.reference_generated_logps + off
    pairs[5].update(iteration=0, generated_logp=-1e3)  # an earlier opponent's answer: left out
    pairs.append(dict(pairs[0], iteration=1, generated_ended=False))  # cut short: left out
    examples.append(pair_training.PairExample(6, examples[0].real, examples[0].generated))
    figures = spin.generated_logp_agreement(1, pairs, examples)
    assert figures["generated_logp_difference_median"] == pytest.approx(0.2, abs=1e-3)
    assert figures["generated_logp_difference_max"] == pytest.approx(2.0, abs=1e-3)
    assert figures["generated_logp_far"] == 1
    assert spin.generated_logp_agreement(2, pairs, examples) == {}  # none of iteration 2


def test_spin_iteration_returns_the_pairs_with_their_reference_log_probs(
    tiny_tokenizer_session, tiny_model
):
    tok = tiny_tokenizer_session
    accelerator = training.make_accelerator(make_optim())
    expected = _pair_examples(tok, accelerator, tiny_model, PAIRS[:4])
    encoded = pair_training.encode_pairs(tok, PAIRS[:4], PROMPT)
    *_, scored = pair_training.spin_iteration(
        accelerator,
        tiny_model,
        tok,
        encoded,
        make_optim(batch_size=4),
        beta=0.1,
        loss="sigmoid",
        seed=0,
        desc="test",
    )
    for got, want in zip(scored, expected, strict=True):
        assert got.reference_generated_logps == pytest.approx(
            want.reference_generated_logps, abs=1e-4
        )
        assert got.reference_real_logps == pytest.approx(want.reference_real_logps, abs=1e-4)

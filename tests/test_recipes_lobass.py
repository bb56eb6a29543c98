"""Tests for spinflow.methods.lobass.stages: learnability scores, the selection, their errors."""

from __future__ import annotations

import math

import pytest
import torch

from spinflow.config import PromptParams, default_params_dict, validate_params
from spinflow.errors import ConfigError, DataError, SpinflowError
from spinflow.io import read_jsonl, write_jsonl
from spinflow.methods.lobass import stages as lobass

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = PromptParams(system_prompt=None, max_prompt_length=64, max_length=128)
RECORDS = [
    {"id": f"sft-{i}", "prompt": f"Repeat the word {w}.", "answer": f"{w} {w} {w}"}
    for i, w in enumerate(["apple", "pear", "plum", "fig", "lime"])
]


def _hand_mean_losses(model, tokenizer, records, prompt) -> list[float]:
    """The mean answer-token loss, one example at a time, from the full logits."""
    from spinflow.chat import encode_example

    losses = []
    for record in records:
        encoded = encode_example(
            tokenizer,
            record["prompt"],
            record["answer"],
            system_prompt=prompt.system_prompt,
            max_prompt_length=prompt.max_prompt_length,
            max_length=prompt.max_length,
        )
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        total = 0.0
        answer_positions = range(encoded.prompt_length, len(encoded.input_ids))
        for t in answer_positions:  # token t is predicted at position t - 1
            total -= torch.log_softmax(logits[t - 1], -1)[encoded.input_ids[t]].item()
        losses.append(total / len(answer_positions))
    return losses


def test_scores_match_a_hand_computation(tiny_model_session, tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    with torch.no_grad():  # "after": the same model with its output layer nudged
        for p in tiny_model.lm_head.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    tiny_model.eval()
    before = lobass.mean_answer_losses(tiny_model_session, tok, RECORDS, PROMPT, 2, "before")
    after = lobass.mean_answer_losses(tiny_model, tok, RECORDS, PROMPT, 3, "after")
    hand_before = _hand_mean_losses(tiny_model_session, tok, RECORDS, PROMPT)
    hand_after = _hand_mean_losses(tiny_model, tok, RECORDS, PROMPT)
    assert before == pytest.approx(hand_before, rel=1e-5)
    assert after == pytest.approx(hand_after, rel=1e-5)
    assert before != pytest.approx(after, rel=1e-6)
    rows = lobass.score_examples([r["id"] for r in RECORDS], before, after)
    for row, b, a in zip(rows, hand_before, hand_after, strict=True):
        assert row["score"] == pytest.approx((b - a) / b, rel=1e-5)
    assert sorted(r["rank"] for r in rows) == [1, 2, 3, 4, 5]
    best = max(rows, key=lambda r: r["score"])
    assert best["rank"] == 1


def test_learnability_formula():
    assert lobass.learnability(2.0, 0.5) == pytest.approx(0.75)
    assert lobass.learnability(2.0, 3.0) == pytest.approx(-0.5)  # the loss rose
    assert lobass.learnability(4.0, 4.0) == 0.0


def test_ranks_break_ties_by_id():
    rows = lobass.score_examples(["b", "a", "c"], [2.0, 2.0, 2.0], [1.0, 1.0, 1.5])
    assert {r["id"]: r["rank"] for r in rows} == {"a": 1, "b": 2, "c": 3}
    assert [r["id"] for r in rows] == ["b", "a", "c"]  # written in the split's order


@pytest.mark.parametrize("before, after", [(0.0, 1.0), (float("nan"), 1.0), (1.0, float("inf"))])
def test_unscorable_example_is_named(before, after):
    with pytest.raises(DataError, match="SFT example x: cannot score it"):
        lobass.score_examples(["x"], [before], [after])


def test_an_answer_truncated_away_is_named(tiny_model_session, tiny_tokenizer_session):
    prompt = PromptParams(system_prompt=None, max_prompt_length=15, max_length=16)
    records = [{"id": "long-1", "prompt": "word " * 40, "answer": "a real answer"}]
    with pytest.raises(DataError) as err:
        lobass.mean_answer_losses(
            tiny_model_session, tiny_tokenizer_session, records, prompt, 1, "x"
        )
    message = str(err.value)
    assert "\n" not in message
    assert "SFT example long-1 keeps no answer token" in message
    assert "prompt.max_length=16" in message


@pytest.mark.parametrize(
    "total, fraction, minimum, expected",
    [(96, 0.06, 8, 8), (96, 0.06, 1, 6), (96, 0.17, 8, 17), (100, 0.06, 1, 6), (5, 0.5, 8, 5)],
)
def test_selection_size(total, fraction, minimum, expected):
    assert lobass.selection_size(total, fraction, minimum) == expected


def test_selections_are_deterministic():
    rows = lobass.score_examples(
        [f"e{i}" for i in range(20)], [2.0] * 20, [2.0 - 0.05 * (i % 7) for i in range(20)]
    )
    top = lobass.select_top(rows, 5)
    assert top == lobass.select_top(list(reversed(rows)), 5)
    assert top == {r["id"] for r in rows if r["rank"] <= 5}
    ids = [r["id"] for r in rows]
    drawn = lobass.select_random(ids, 5, seed=42)
    assert len(drawn) == 5 and drawn <= set(ids)
    assert drawn == lobass.select_random(list(reversed(ids)), 5, seed=42)
    assert drawn != lobass.select_random(ids, 5, seed=43)


def _params(**lobass_keys):
    raw = default_params_dict()
    raw["lobass"].update(enabled=True, **lobass_keys)
    return validate_params(raw)


def _write_scores(tmp_path, count: int) -> None:
    from spinflow.io import write_json

    records = [{"id": f"sft-{i:02d}", "prompt": "q", "answer": "a"} for i in range(count)]
    write_jsonl(tmp_path / "data/prepared/sft.jsonl", records)
    rows = lobass.score_examples(
        [r["id"] for r in records], [2.0] * count, [2.0 - 0.01 * i for i in range(count)]
    )
    write_jsonl(tmp_path / lobass.SCORES, rows)
    write_json(tmp_path / "lobass/scores/provenance.json", {})


def test_lobass_select_writes_both_selections(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_scores(tmp_path, 40)
    summary = lobass.lobass_select(_params(fraction=0.25, min_examples=1))
    assert summary["selected"] == 10 and summary["examples"] == 40
    selected = [r["id"] for r in read_jsonl(lobass.SELECTIONS["lobass"])]
    control = [r["id"] for r in read_jsonl(lobass.SELECTIONS["random_selection"])]
    assert selected == [f"sft-{i:02d}" for i in range(30, 40)]  # the largest loss drops
    assert len(control) == 10 and len(set(control)) == 10
    assert summary["mean_score_selected"] > summary["mean_score_random"]
    assert (tmp_path / "lobass/selection/provenance.json").is_file()


def test_a_selection_smaller_than_a_batch_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_scores(tmp_path, 40)
    with pytest.raises(SpinflowError) as err:
        lobass.lobass_select(_params(fraction=0.1, min_examples=1))
    assert str(err.value) == (
        "lobass_select: the selection holds 4 of 40 SFT examples, fewer than one batch "
        "(sft.batch_size: 8); raise lobass.fraction (0.1) or lobass.min_examples (1)"
    )
    assert not (tmp_path / "lobass/selection").exists()


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ConfigError, match=r"'lobass.fraction' = "):
        _params(fraction=fraction)
    assert _params(fraction=1.0).lobass.fraction == 1.0


def test_lobass_needs_sft_and_spin_start_needs_lobass():
    raw = default_params_dict()
    raw["spin"]["start"] = "lobass"
    with pytest.raises(ConfigError, match="spin.start: lobass needs lobass.enabled: true"):
        validate_params(raw)
    raw = default_params_dict()
    raw["lobass"]["enabled"] = True
    raw["sft"]["enabled"] = False
    with pytest.raises(ConfigError, match="lobass.enabled needs sft.enabled: true"):
        validate_params(raw)


def test_math_of_the_default_fraction():
    # the default keeps 6% of 96 built-in SFT examples, raised to one batch of 8
    assert math.ceil(0.06 * 96) == 6
    assert lobass.selection_size(96, 0.06, 8) == 8

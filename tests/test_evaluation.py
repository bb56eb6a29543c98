"""Tests for spinflow.evaluation: the metrics, checked against numbers known in advance."""

from __future__ import annotations

import pytest

from spinflow.config import EvalParams, PromptParams
from spinflow.engines.torch import TorchEngine
from spinflow.evaluation import (
    answer_logps,
    evaluate,
    opponent_rows,
    score_answers,
    token_counts,
)
from spinflow.tasks import generate_examples

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = PromptParams()
PARAMS = EvalParams(batch_size=4, max_new_tokens=6)
BETA = 0.3
RECORDS = generate_examples(6, seed=1)


@pytest.fixture(scope="module")
def own_evaluation(tiny_model_session, tiny_tokenizer_session):
    """The tiny model evaluated alone: (metrics, rows); its rows are the opponent below."""
    return evaluate(
        tiny_model_session,
        tiny_tokenizer_session,
        RECORDS,
        prompt=PROMPT,
        params=PARAMS,
        seed=0,
        engine=_engine(tiny_model_session, tiny_tokenizer_session),
    )


def _engine(model, tokenizer) -> TorchEngine:
    return TorchEngine(
        model,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=PARAMS.batch_size,
    )


def _against(model, tokenizer, reference: list[dict]) -> dict:
    metrics, _ = evaluate(
        model,
        tokenizer,
        RECORDS,
        prompt=PROMPT,
        params=PARAMS,
        seed=0,
        reference=reference,
        beta=BETA,
        engine=_engine(model, tokenizer),
    )
    return metrics


# ---------------------------------------------------------------------------------------------
# Log-likelihood and rows


def test_rows_and_log_likelihood(own_evaluation, tiny_model_session, tiny_tokenizer_session):
    metrics, rows = own_evaluation
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS]
    assert [r["real"] for r in rows] == [r["answer"] for r in RECORDS]
    assert metrics["num_examples"] == len(RECORDS)
    assert "reward_margin" not in metrics and "reward_accuracy" not in metrics  # no opponent
    # one example at a time (no padding): the same log-probs; per token = sum over sum of counts
    logps, counts = answer_logps(
        tiny_model_session,
        tiny_tokenizer_session,
        RECORDS,
        [r["answer"] for r in RECORDS],
        PROMPT,
        batch_size=1,
    )
    assert [r["real_logps"] for r in rows] == pytest.approx(logps, rel=1e-5)
    assert all(c >= 2 for c in counts)  # at least one answer token and the end token
    assert metrics["answer_logprob_per_token"] == pytest.approx(sum(logps) / sum(counts), rel=1e-5)
    own, _ = answer_logps(
        tiny_model_session,
        tiny_tokenizer_session,
        RECORDS,
        [r["generated"] for r in rows],
        PROMPT,
        batch_size=1,
    )
    assert [r["generated_logps"] for r in rows] == pytest.approx(own, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Reward margin and accuracy against an opponent


def test_the_model_as_its_own_opponent_has_margin_and_accuracy_zero(
    own_evaluation, tiny_model_session, tiny_tokenizer_session
):
    _, rows = own_evaluation
    # given in reverse order: the opponent's rows are matched by id, not by position
    metrics = _against(tiny_model_session, tiny_tokenizer_session, rows[::-1])
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["reward_accuracy"] == 0.0


def test_shifted_opponent_log_probs_move_the_margin_by_beta_times_the_shift(
    own_evaluation, tiny_model_session, tiny_tokenizer_session
):
    """Raising the opponent's log-prob of the real answer by a lowers the margin by β·a; raising
    that of its generated answer by b raises it by β·b. Per row, so the accuracy is the share
    of rows with b > a, which also catches an opponent row paired with the wrong example."""
    _, rows = own_evaluation
    real_shift = [0.0, 2.0, 0.0, 1.0, 5.0, 0.5]
    generated_shift = [1.0, 0.0, 3.0, 0.0, 0.0, 2.5]
    shifted = [
        {**row, "real_logps": row["real_logps"] + a, "generated_logps": row["generated_logps"] + b}
        for row, a, b in zip(rows, real_shift, generated_shift, strict=True)
    ]
    metrics = _against(tiny_model_session, tiny_tokenizer_session, shifted[::-1])
    differences = [b - a for a, b in zip(real_shift, generated_shift, strict=True)]
    expected = BETA * sum(differences) / len(differences)  # 0.3 × (−1/6): negative on purpose
    assert metrics["reward_margin"] == pytest.approx(expected, abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(3 / 6)  # rows 0, 2 and 5


def test_opponent_rows_give_the_margin_evaluate_averages(
    own_evaluation, tiny_model_session, tiny_tokenizer_session
):
    """Per example, what evaluate() averages into reward_margin: the mean of the rows' margins
    equals it, and a row's margin is β·[(real after − before) − (answer after − before)]."""
    _, rows = own_evaluation
    real_shift = [0.0, 2.0, 0.0, 1.0, 5.0, 0.5]
    shifted = [
        {**row, "real_logps": row["real_logps"] + a, "generated_logps": row["generated_logps"]}
        for row, a in zip(rows, real_shift, strict=True)
    ]
    metrics = _against(tiny_model_session, tiny_tokenizer_session, shifted[::-1])
    extra = opponent_rows(
        tiny_model_session,
        tiny_tokenizer_session,
        rows,
        shifted[::-1],
        prompt=PROMPT,
        batch_size=3,
        beta=BETA,
    )
    margins = [e["reward_margin"] for e in extra]
    assert sum(margins) / len(margins) == pytest.approx(metrics["reward_margin"], abs=1e-5)
    assert sum(m > 0 for m in margins) / len(margins) == pytest.approx(metrics["reward_accuracy"])
    for row, e, a in zip(rows, extra, real_shift, strict=True):
        # the model is its own opponent here: its answer's log-prob is the same before and after
        assert e["opponent_answer_logps"] == pytest.approx(row["generated_logps"], abs=1e-4)
        assert e["opponent_real_logps"] == pytest.approx(row["real_logps"] + a)
        assert e["reward_margin"] == pytest.approx(-BETA * a, abs=1e-4)


def test_token_counts_are_the_per_example_parts_of_two_metrics(
    own_evaluation, tiny_model_session, tiny_tokenizer_session
):
    metrics, rows = own_evaluation
    answers = [r["generated"] for r in rows]
    counts = token_counts(tiny_tokenizer_session, RECORDS, answers, PROMPT)
    _, real_counts = answer_logps(
        tiny_model_session,
        tiny_tokenizer_session,
        RECORDS,
        [r["answer"] for r in RECORDS],
        PROMPT,
        4,
    )
    assert [c["real_tokens"] for c in counts] == real_counts
    total = sum(r["real_logps"] for r in rows) / sum(c["real_tokens"] for c in counts)
    assert total == pytest.approx(metrics["answer_logprob_per_token"], rel=1e-6)
    lengths = [c["generated_tokens"] for c in counts]
    assert sum(lengths) / len(lengths) == pytest.approx(metrics["answer_length"])


# ---------------------------------------------------------------------------------------------
# Scoring greedy answers


def _record(i: int, task: str, answer: str, verifier: dict | None) -> dict:
    record = {"id": f"{task}-{i}", "prompt": f"question {i}", "answer": answer, "task": task}
    if verifier is not None:
        record["verifier"] = verifier
    return record


def test_score_answers_per_task(tiny_tokenizer_session):
    equals = lambda answer: {"name": "equals", "args": {"answer": answer}}  # noqa: E731
    no_commas = {"name": "no_commas", "args": {}}
    records = [
        _record(0, "addition", "4", equals("4")),
        _record(1, "addition", "9", equals("9")),
        _record(2, "addition", "12", equals("12")),
        _record(3, "no_commas", "red and blue", no_commas),
        _record(4, "no_commas", "green and gold", no_commas),
        _record(5, "free_text", "anything", None),  # no verifier: in no pass rate
    ]
    answers = ["4", "8", "13", "red and blue", "green, gold", "anything"]
    scores = score_answers(tiny_tokenizer_session, records, answers)
    assert scores["per_task_pass_rate"] == {
        "addition": pytest.approx(1 / 3),
        "no_commas": pytest.approx(1 / 2),
    }
    assert scores["verifier_pass_rate"] == pytest.approx(2 / 5)
    assert scores["exact_match"] == pytest.approx(3 / 6)  # records 0, 3 and 5
    lengths = [
        len(tiny_tokenizer_session(a, add_special_tokens=False)["input_ids"]) for a in answers
    ]
    assert scores["answer_length"] == pytest.approx(sum(lengths) / len(lengths))


def test_score_answers_without_verifiers_gives_no_pass_rate(tiny_tokenizer_session):
    records = [_record(0, "free_text", "yes", None), _record(1, "chat", "no", {})]
    scores = score_answers(tiny_tokenizer_session, records, ["yes", "maybe"])
    assert scores["verifier_pass_rate"] is None
    assert scores["per_task_pass_rate"] == {}
    assert scores["exact_match"] == pytest.approx(1 / 2)

"""Tests for θ0 (spinflow.methods.sft), the SFT training it shares and the SFT-extra baseline's step budget."""

from __future__ import annotations

import pytest

from spinflow import sft_training
from spinflow.config import default_params_dict, validate_params
from spinflow.errors import SpinflowError
from spinflow.io import write_json, write_jsonl
from spinflow.methods.sft import stages as sft_stages
from spinflow.methods.spin import baselines
from spinflow.methods.spin.graph import spin_steps


def _params(iterations=3):
    raw = default_params_dict()
    raw["spin"]["iterations"] = iterations
    return validate_params(raw)


def test_sft_extra_budget_is_the_sum_of_every_iterations_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k, steps in enumerate((4, 7, 2)):
        write_json(spin_steps(k), {"optimizer_steps": steps})
    assert baselines.spin_optimizer_steps(_params(3)) == 13


def test_sft_extra_budget_names_the_missing_iteration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json(spin_steps(0), {"optimizer_steps": 4})
    with pytest.raises(SpinflowError, match=r"spin_steps_iter_1.json: missing.*'train_iter_1'"):
        baselines.spin_optimizer_steps(_params(2))


def test_sft_refuses_an_empty_sft_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data/prepared/sft.jsonl", [])
    with pytest.raises(SpinflowError, match="sft.jsonl is empty: raise data.num_sft"):
        sft_stages.sft(_params(1))


def test_sft_extra_compute_budget_sums_every_iterations_token_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k, compute in enumerate((1000, 2500, 10)):
        write_json(spin_steps(k), {"optimizer_steps": 1, "compute_tokens": compute})
    assert baselines.spin_compute(_params(3)) == 3510
    write_json(spin_steps(2), {"optimizer_steps": 1})
    with pytest.raises(SpinflowError, match=r"spin_steps_iter_2.json: no 'compute_tokens'"):
        baselines.spin_compute(_params(3))


def test_steps_for_compute_pays_three_passes_per_trained_token(tiny_tokenizer_session):
    from spinflow.training import encode_sft

    params = _params(1)  # sft.batch_size 8, no accumulation
    records = [{"prompt": f"Say {i}.", "answer": f"{i} " * (i + 1)} for i in range(16)]
    tokens = sum(e.length for e in encode_sft(tiny_tokenizer_session, records, params.prompt))
    one_epoch = 3 * tokens  # two optimizer steps of 8 examples
    steps = baselines.steps_for_compute
    assert steps(params, tiny_tokenizer_session, records, one_epoch) == 2
    assert steps(params, tiny_tokenizer_session, records, 3 * one_epoch) == 6
    assert steps(params, tiny_tokenizer_session, records, one_epoch + 1) == 3  # rounded up
    assert steps(params, tiny_tokenizer_session, records, 1) == 1


class _Scripted(sft_training._Validation):
    """The early-stopping rule on a scripted validation curve."""

    def __init__(self, losses, patience):
        from conftest import make_optim
        from spinflow.training import make_accelerator

        super().__init__(make_accelerator(make_optim()), None, [], _params(1), patience)
        self.losses = list(losses)

    def loss(self, model) -> float:
        return self.losses.pop(0)


@pytest.mark.parametrize(
    ("losses", "patience", "stops_at", "kept"),
    [
        ([3.0, 2.0, 2.5, 1.0], 1, 3, 2),  # one epoch without a lower loss: stop, keep epoch 2
        ([3.0, 2.0, 2.5, 2.1, 1.0], 2, 4, 2),
        ([3.0, 2.0, 1.5, 1.0], 1, None, 4),  # never worse: all epochs, the last kept
        ([3.0, 2.0, 2.5, 1.0], None, None, 4),  # no patience: the curve only, the last kept
    ],
)
def test_early_stopping_keeps_the_best_epochs_weights(losses, patience, stops_at, kept):
    import torch

    model = torch.nn.Linear(2, 1)
    watch = _Scripted(losses, patience)
    weights = {}
    stopped = None
    for epoch in range(1, len(losses) + 1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))  # the weights "after epoch e" are all e
        weights[epoch] = model.weight.clone()
        if watch(epoch, model):
            stopped = epoch
            break
    assert stopped == stops_at
    watch.restore_best(model)
    summary = watch.summary()
    assert summary["val_loss"] == losses[kept - 1]
    assert [p["val_loss"] for p in summary["validation"]] == losses[: stopped or len(losses)]
    if patience is not None:
        assert summary["best_epoch"] == kept
        assert torch.equal(model.weight, weights[kept])
    else:
        assert "best_epoch" not in summary

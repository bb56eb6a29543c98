"""Tests for spinflow.recipes.sft: θ0 and the SFT-extra baseline's step budget."""

from __future__ import annotations

import pytest

from spinflow.config import default_params_dict, validate_params
from spinflow.errors import SpinflowError
from spinflow.graph import spin_steps
from spinflow.io import write_json, write_jsonl
from spinflow.recipes import sft


def _params(iterations=3):
    raw = default_params_dict()
    raw["spin"]["iterations"] = iterations
    return validate_params(raw)


def test_sft_extra_budget_is_the_sum_of_every_iterations_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k, steps in enumerate((4, 7, 2)):
        write_json(spin_steps(k), {"optimizer_steps": steps})
    assert sft.spin_optimizer_steps(_params(3)) == 13


def test_sft_extra_budget_names_the_missing_iteration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json(spin_steps(0), {"optimizer_steps": 4})
    with pytest.raises(SpinflowError, match=r"spin_steps_iter_1.json: missing.*'train_iter_1'"):
        sft.spin_optimizer_steps(_params(2))


def test_sft_refuses_an_empty_sft_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data/prepared/sft.jsonl", [])
    with pytest.raises(SpinflowError, match="sft.jsonl is empty: raise data.num_sft"):
        sft.sft(_params(1))

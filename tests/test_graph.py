"""Tests for spinflow.graph: the models, evaluations and stages a params file describes."""

from __future__ import annotations

from pathlib import Path

import pytest

from spinflow.config import default_params_dict, validate_params
from spinflow.errors import SpinflowError
from spinflow.graph import build
from spinflow.nodes import BASELINE, EVALUATION, ITERATION, REPORT, SFT_EXTRA, TRAINING


def _graph(iterations=3, sft=True, sft_extra=True, mix_previous=1, per_iteration=None):
    raw = default_params_dict()
    raw["sft"]["enabled"] = sft
    raw["sft_extra"].update(enabled=sft_extra, compute=sft_extra)  # both baselines
    raw["spin"].update(
        iterations=iterations, mix_previous=mix_previous, per_iteration=per_iteration or {}
    )
    return build(validate_params(raw))


def test_chain_of_models_and_their_opponents():
    g = _graph(iterations=3)
    assert g.chain == ["theta_0", "theta_1", "theta_2", "theta_3"]
    assert g.theta(0).path == Path("models/theta_0") and g.theta(0).stage == "sft"
    assert g.theta(0).role == BASELINE and g.theta(0).opponent is None
    for k in range(3):
        model = g.theta(k + 1)
        assert model.path == Path(f"models/theta_{k + 1}")
        assert model.stage == f"train_iter_{k}"
        assert model.role == ITERATION and model.iteration == k and model.index == k + 1
        assert model.opponent == f"theta_{k}"
        assert model.label == f"θ{k + 1} (SPIN iter {k})"
        assert model.run_name == f"iter_{k}"
    extra = g.model("sft_extra")
    assert extra.role == SFT_EXTRA and extra.index is None and extra.opponent == "theta_0"


def test_without_sft_theta_0_is_the_base_model():
    g = _graph(iterations=2, sft=False)
    theta_0 = g.theta(0)
    assert theta_0.path == Path("models/base") and theta_0.stage == "prepare_model"
    assert theta_0.label == "θ0 (base)" and theta_0.train_metrics is None
    assert "sft" not in g.stages
    assert g.stage("generate_iter_0").inputs[0] == "models/base"
    assert g.stage("sft_extra").inputs[0] == "models/base"


def test_evaluations_follow_the_chain_and_name_their_opponent():
    g = _graph(iterations=2)
    names = [(m.name, e.name, e.opponent) for m, e in g.evaluated()]
    assert names == [
        ("theta_0", "sft", None),
        ("theta_1", "iter_0", "sft"),
        ("theta_2", "iter_1", "iter_0"),
        ("sft_extra", "sft_extra", "sft"),
        ("sft_extra_compute", "sft_extra_compute", "sft"),
    ]
    assert g.evaluation("iter_1").metrics == Path("metrics/eval_iter_1.json")
    assert g.evaluation("iter_1").generations == Path("eval/iter_1/generations.jsonl")
    assert g.stage("eval_iter_1").inputs == ("models/theta_2", "data/prepared", "eval/iter_0")


@pytest.mark.parametrize("mix_previous", [0, 1, 2])
def test_mixing_sets_the_pairs_each_model_is_trained_on(mix_previous):
    g = _graph(iterations=3, mix_previous=mix_previous)
    for k in range(3):
        first = max(0, k - mix_previous)
        expected = tuple(Path(f"generated/iter_{j}/pairs.jsonl") for j in range(first, k + 1))
        assert g.theta(k + 1).pairs == expected


def test_stages_say_what_tracking_logs():
    g = _graph(iterations=1)
    tracked = {s.name: (s.track, s.subject) for s in g.stages.values() if s.track}
    assert tracked == {
        "sft": (TRAINING, "theta_0"),
        "eval_sft": (EVALUATION, "sft"),
        "train_iter_0": (TRAINING, "theta_1"),
        "eval_iter_0": (EVALUATION, "iter_0"),
        "sft_extra": (TRAINING, "sft_extra"),
        "eval_sft_extra": (EVALUATION, "sft_extra"),
        "sft_extra_compute": (TRAINING, "sft_extra_compute"),
        "eval_sft_extra_compute": (EVALUATION, "sft_extra_compute"),
        "report": (REPORT, None),
    }
    assert g.stage("generate_iter_0").args == {"k": 0}
    assert g.stage("eval_iter_0").args == {"name": "iter_0"}


def test_producer_finds_the_stage_of_any_output():
    g = _graph(iterations=2)
    assert g.producer("models/theta_2") == "train_iter_1"
    assert g.producer(Path("models/theta_2/config.json")) == "train_iter_1"
    assert g.producer("generated/iter_1/pairs.jsonl") == "generate_iter_1"
    assert g.producer("metrics/spin_steps_iter_0.json") == "train_iter_0"
    assert g.producer("eval/sft/generations.jsonl") == "eval_sft"
    assert g.producer("reports/results.md") == "report"
    with pytest.raises(SpinflowError, match="no stage of this pipeline makes it"):
        g.producer("models/theta_9")


def test_unknown_names_fail_with_one_line():
    g = _graph(iterations=1)
    with pytest.raises(
        SpinflowError, match=r"no stage 'train_iter_5' .*stages: validate_params, prepare_model"
    ):
        g.stage("train_iter_5")
    with pytest.raises(SpinflowError, match="no model 'theta_7'"):
        g.model("theta_7")
    with pytest.raises(SpinflowError, match="no evaluation 'iter_3'"):
        g.evaluation("iter_3")


def test_per_iteration_override_is_read_only_by_its_iteration():
    g = _graph(iterations=3, per_iteration={"iter_1": {"beta": 0.3}})
    readers = {s.name for s in g.stages.values() if "spin.per_iteration.iter_1" in s.params}
    assert readers == {"train_iter_1", "eval_iter_1"}


def _lobass_graph(start="sft"):
    raw = default_params_dict()
    raw["lobass"]["enabled"] = True
    raw["sft_extra"]["compute"] = True
    raw["spin"].update(iterations=2, start=start)
    return build(validate_params(raw))


def test_lobass_stages_and_models_beside_theta_0():
    g = _lobass_graph()
    assert g.stage("lobass_score").inputs == ("models/base", "models/theta_0", "data/prepared")
    assert g.stage("lobass_select").outs == ("lobass/selection",)
    for name in ("sft_lobass", "sft_random"):
        stage = g.stage(name)
        assert stage.script == "sft_selection" and stage.inputs[0] == "models/base"
        assert "lobass/selection" in stage.inputs
        model = g.model(name)
        assert model.index is None and model.chart == name and model.step == 0
        assert g.evaluation(name).opponent is None
    assert g.chain[0] == "theta_0"
    assert [m.name for m, _ in g.evaluated()][-4:] == [
        "sft_lobass",
        "sft_random",
        "sft_extra",
        "sft_extra_compute",
    ]
    assert "lobass/scores" in g.stage("report").inputs


def test_spin_can_start_from_the_lobass_model():
    g = _lobass_graph(start="lobass")
    assert g.chain == ["sft_lobass", "theta_1", "theta_2"]
    assert g.theta(0).chart == "eval" and g.theta(0).label.startswith("θ0")
    assert g.model("theta_0").index is None and g.model("theta_0").chart == "sft"
    assert g.stage("generate_iter_0").inputs[0] == "models/sft_lobass"
    assert g.evaluation("iter_0").opponent == "sft_lobass"
    assert g.model("sft_extra").opponent == "sft_lobass"

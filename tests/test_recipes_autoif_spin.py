"""AutoIF combined with SPIN (autoif.with_spin): validation, the graph, the pool's AutoIF
records, the feedback rule on them, the union of the pairs and the report. The stages run end
to end under DVC in tests/test_recipes_autoif.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from spinflow import pair_training, pipeline
from spinflow.chat import Encoded
from spinflow.config import default_params_dict, validate_params
from spinflow.errors import ConfigError, DataError
from spinflow.graph import build
from spinflow.io import write_json, write_jsonl
from spinflow.methods.autoif import stages as autoif
from spinflow.methods.autoif.graph import AUTOIF, AUTOIF_VERIFIED, autoif_samples_dir
from spinflow.methods.spin import generate
from spinflow.methods.spin import train as spin
from spinflow.nodes import train_metrics
from test_recipes_autoif import REPORT_METRICS


def _raw(**autoif_changes):
    raw = default_params_dict()
    raw["spin"].update(iterations=2, feedback_filter="drop")
    raw["autoif"].update({"enabled": True, "with_spin": True, "iterations": 5, **autoif_changes})
    return raw


def _graph(raw=None):
    return build(validate_params(raw or _raw()))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"autoif": {"enabled": False}},
            "params.yaml: autoif.with_spin: true needs autoif.enabled: true",
        ),
        (
            {"spin": {"feedback_filter": "keep"}},
            "params.yaml: autoif.with_spin: true needs spin.feedback_filter: drop or real_only; "
            "keep would use generated answers that pass their instruction's functions as "
            "rejected answers",
        ),
        ({"spin": {"iterations": 0}}, "params.yaml: 'spin.iterations' = 0: Input should be"),
    ],
)
def test_bad_combinations_fail_in_one_line_naming_the_key(change, message):
    raw = _raw()
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(ConfigError) as err:
        validate_params(raw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    raw["spin"].update(iterations=2, feedback_filter="real_only")
    raw["autoif"].update(enabled=True)
    assert validate_params(raw).autoif.with_spin


def test_the_autoif_chain_is_the_spin_chain():
    g = _graph()
    sampling = sorted(s for s in g.stages if s.startswith("autoif_sample_iter_"))
    assert sampling == ["autoif_sample_iter_0", "autoif_sample_iter_1"]  # spin.iterations
    assert not [s for s in g.stages if s.startswith("autoif_train")]
    assert not [m for m in g.models.values() if m.role == AUTOIF]
    for k in range(2):
        assert g.stage(f"autoif_sample_iter_{k}").inputs[0] == f"models/theta_{k}"
        assert g.evaluation(f"autoif_iter_{k}").model == f"theta_{k + 1}"
        assert g.theta(k + 1).label == f"θ{k + 1} (SPIN + AutoIF iter {k})"
        generate, train = g.stage(f"generate_iter_{k}"), g.stage(f"train_iter_{k}")
        assert {"autoif/iter_0", "autoif/verified"} <= set(generate.inputs)
        assert {"autoif.sandbox_workers", "autoif.call_timeout"} <= set(generate.params)
        assert {f"autoif/iter_{k}", f"metrics/autoif_sample_iter_{k}.json"} <= set(train.inputs)
        assert g.producer(f"autoif/iter_{k}") == f"autoif_sample_iter_{k}"
    assert g.evaluation("autoif_theta_0").model == "theta_0"
    # the report shows instruction following per SPIN iteration
    names = [(m.name, e.name) for m, e in g.evaluated() if m.index is not None]
    assert names == [
        ("theta_0", "sft"),
        ("theta_0", "autoif_theta_0"),
        ("theta_1", "iter_0"),
        ("theta_1", "autoif_iter_0"),
        ("theta_2", "iter_1"),
        ("theta_2", "autoif_iter_1"),
    ]


def test_switching_the_combination_off_changes_the_commands_dvc_compares():
    """DVC does not re-run a stage whose dependencies merely shrank: the key is named in the
    commands of the SPIN stages that read AutoIF's outputs, so switching it off re-runs them."""
    code: dict[str, list[str]] = {}  # the scripts' code dependencies, computed once
    rendered = {}
    for with_spin in (True, False):
        params = validate_params(_raw(with_spin=with_spin))
        g = build(params)
        rendered[with_spin] = {
            name: pipeline.render_stage(g.stage(name), params, code)
            for name in ("generate_iter_1", "train_iter_0")
        }
    on, off = rendered[True], rendered[False]
    for name in ("generate_iter_1", "train_iter_0"):
        assert on[name]["cmd"] == off[name]["cmd"] + " --override autoif.with_spin"
        assert "autoif.with_spin" in on[name]["params"]
        assert not any(p.startswith("autoif") for p in off[name]["params"])
        assert not any(d.startswith("autoif/") for d in off[name]["deps"])
    assert "autoif_train_iter_4" in g.stages and "autoif_sample_iter_4" in g.stages


def _sft_records():
    return [
        {"id": "q1/s0", "query": "q1", "instruction": "even", "prompt": "P1", "answer": "ab"},
        {"id": "q1/s2", "query": "q1", "instruction": "even", "prompt": "P1", "answer": "abcd"},
        {"id": "q0/s3", "query": "q0", "instruction": "short", "prompt": "P0", "answer": "x"},
    ]


def test_the_pool_takes_one_verified_answer_per_query_in_file_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(autoif_samples_dir(0) / autoif.SFT_DATA, _sft_records())
    records = autoif.spin_pool_records(_graph())
    assert records == [
        {
            "id": "autoif/q1",
            "task": "autoif",
            "prompt": "P1",
            "answer": "ab",
            "instruction": "even",
        },
        {
            "id": "autoif/q0",
            "task": "autoif",
            "prompt": "P0",
            "answer": "x",
            "instruction": "short",
        },
    ]
    pairs = generate.make_pairs(records, ["abc", "y"], 1)
    assert [(p["id"], p["instruction"], p["real"], p["generated"]) for p in pairs] == [
        ("autoif/q1", "even", "ab", "abc"),
        ("autoif/q0", "short", "x", "y"),
    ]


def test_an_instruction_the_verified_library_lacks_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(AUTOIF_VERIFIED / autoif.INSTRUCTIONS_FILE, [])
    params = validate_params(_raw())
    pairs = [{"id": "autoif/q1", "instruction": "even", "generated": "abc"}]
    with pytest.raises(
        DataError, match="autoif/verified/instructions.jsonl: no instruction 'even'"
    ):
        autoif.check_generated(params, _graph(), pairs, autoif.SandboxCounter())
    assert "generated_passes" not in pairs[0]


def _encoded(n: int) -> list[pair_training.PairExample]:
    return [pair_training.PairExample(i, Encoded([1, 2], 1), Encoded([1, 3], 1)) for i in range(n)]


SPIN_PAIRS = [
    # an AutoIF query whose generated answer passed its functions: stored, not re-checked
    {"id": "autoif/q1", "generated": "x", "instruction": "even", "generated_passes": True},
    {"id": "autoif/q0", "generated": "7", "instruction": "short", "generated_passes": False},
    # a stored value wins over the verifier ("7" is the right number)
    {
        "id": "p0",
        "generated": "7",
        "verifier": {"name": "final_number", "args": {"value": 7}},
        "generated_passes": False,
    },
    {"id": "p1", "generated": "7", "verifier": {"name": "final_number", "args": {"value": 7}}},
]


def test_generated_passes_reads_the_stored_check_before_the_verifier():
    assert [spin.generated_passes(p) for p in SPIN_PAIRS] == [True, False, False, True]


@pytest.mark.parametrize("mode", ["drop", "real_only"])
def test_spin_pairs_are_filtered_and_autoif_pairs_join_unfiltered(mode):
    encoded = _encoded(len(SPIN_PAIRS) + 2)  # then two AutoIF pairs
    examples, counts = spin.join_autoif_pairs(encoded, SPIN_PAIRS, mode)
    if mode == "drop":
        assert [e.index for e in examples] == [1, 2, 4, 5]
        assert counts["pairs_dropped"] == 2 and counts["pairs_spin"] == 2
    else:
        assert [(e.index, e.contrast) for e in examples] == [
            (0, False),
            (1, True),
            (2, True),
            (3, False),
            (4, True),
            (5, True),
        ]
        assert counts["pairs_real_only"] == 2 and counts["pairs_spin"] == 4
    assert counts["pairs_autoif"] == 2 and counts["pairs_generated_correct"] == 2
    assert counts["instruction_pairs"] == 2 and counts["instruction_generated_passing"] == 1


def test_autoif_pairs_in_spin_layout_with_prefixed_ids_and_their_compute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(
        autoif_samples_dir(1) / autoif.PAIRS,
        [{"id": "q1/0-2", "prompt": "P", "chosen": "ab", "rejected": "abc", "chosen_score": 1.0}],
    )
    write_json(train_metrics("autoif_sample_iter_1"), {"answer_tokens": 37})
    pairs, tokens = autoif.spin_training_pairs(_graph(), 1)
    assert pairs == [
        {
            "id": "autoif/q1/0-2",
            "iteration": 1,
            "task": "autoif",
            "prompt": "P",
            "real": "ab",
            "generated": "abc",
        }
    ]
    assert tokens == 37
    encoded = _encoded(1)
    plain = spin.iteration_compute(encoded, [{"iteration": 1}], encoded, epochs=1, k=1)
    cost = spin.iteration_compute(encoded, [{"iteration": 1}], encoded, 1, 1, sampled_tokens=37)
    assert cost["generation_tokens"] == plain["generation_tokens"] + 37
    assert cost["compute_tokens"] == plain["compute_tokens"] + 37


def test_the_report_shows_each_spin_model_and_the_pairs_it_trained_on(tmp_path, monkeypatch):
    from spinflow.methods.autoif.report import autoif_section

    monkeypatch.chdir(tmp_path)
    raw = _raw()
    raw["spin"]["iterations"] = 1
    g = _graph(raw)
    metrics = {
        **{k: v for k, v in REPORT_METRICS.items() if k != "autoif_supervise"},
        "train_iter_0": {
            "instruction_generated_passing": 1,
            "instruction_pairs": 3,
            "pairs_spin": 9,
            "pairs_autoif": 3,
            "pairs_dropped": 2,
        },
    }
    for stage, values in metrics.items():
        write_json(train_metrics(stage), values)
    for name, followed in (("autoif_theta_0", [[False], [True]]), ("autoif_iter_0", [[True]] * 2)):
        write_jsonl(
            g.evaluation(name).generations,
            [{"id": f"q{i}", "followed": f} for i, f in enumerate(followed)],
        )
    text = "\n".join(autoif_section(g))
    assert "| θ0 (SFT), before AutoIF | 0.500 [" in text
    assert "| θ1 (SPIN + AutoIF iter 0) | 1.000 [" in text
    assert (
        "| train_iter_0: SPIN answers to AutoIF queries passing their functions / pairs trained, "
        "SPIN + AutoIF | 1 of 3 / 9 + 3 | spin.feedback_filter drop: pairs_dropped 2" in text
    )
    assert not Path("models").exists()

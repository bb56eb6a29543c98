"""AutoIF: queries, pairs, accuracy, the stages' failures, and its stages end to end under DVC."""

from __future__ import annotations

import json
import random
import re

import pytest
import yaml

from spinflow.config import default_params_dict, validate_params
from spinflow.errors import SpinflowError
from spinflow.io import read_jsonl, write_jsonl
from spinflow.methods.autoif import stages as autoif
from spinflow.methods.autoif.instructions import Case, Instruction
from test_devices import assert_on_decided_device, device_records


def _instruction(i: int, group: str = "", conflicts=()) -> Instruction:
    return Instruction(f"i{i}", f"Do thing {i}.", ("",), (Case("", True),), group, conflicts)


def test_heldout_split_and_queries_are_deterministic_and_disjoint():
    pool = [_instruction(i, group=f"g{i % 4}") for i in range(10)]
    train, heldout = autoif.split_heldout(pool, 3, seed=42)
    assert len(heldout) == 3 and len(train) == 7
    assert not {i.id for i in train} & {i.id for i in heldout}
    assert autoif.split_heldout(list(reversed(pool)), 3, seed=42) == (train, heldout)
    assert autoif.split_heldout(pool, 3, seed=43)[1] != heldout
    prompts = [{"id": f"p{i}", "prompt": f"Question {i}?"} for i in range(5)]
    queries = autoif.make_queries(prompts, pool, 12, 3, random.Random(1), "q")
    again = autoif.make_queries(prompts, pool, 12, 3, random.Random(1), "q")
    assert queries == again and len(queries) == 12
    by_id = {i.id: i for i in pool}
    for q in queries:
        chosen = [by_id[i] for i in q["instructions"]]
        assert 1 <= len(chosen) <= 3
        assert all(a.compatible(b) for a in chosen for b in chosen if a is not b)
        assert q["prompt"].startswith(f"Question {q['source_id'][1:]}?\n\n")
        assert q["prompt"].endswith(" ".join(c.text for c in chosen))
    # every instruction leads some query: they are cycled, not drawn with replacement
    assert {q["instructions"][0] for q in queries[:10]} == set(by_id)
    with pytest.raises(SpinflowError, match="not more than autoif.heldout"):
        autoif.split_heldout(pool, 10, seed=42)


def _scored(scores):
    return [
        {"query": "q", "sample": j, "prompt": "p", "response": f"r{j}", "score": s}
        for j, s in enumerate(scores)
    ]


@pytest.mark.parametrize(
    "scores, limit, expected",
    [
        ([1.0, 0.0, 0.5, 0.0], 4, [(0, 1), (0, 3), (2, 1), (2, 3)]),
        ([1.0, 0.0, 0.5, 0.0], 1, [(0, 1)]),
        ([0.25, 0.0, 0.4, 0.0], 4, []),  # nothing reaches chosen_min
        ([1.0, 0.5, 0.75, 1.0], 4, []),  # nothing fails every function
        ([0.5, 1.0, 1.0, 0.0, 0.0, 0.0], 4, [(1, 3), (1, 4), (2, 3), (2, 4)]),
    ],
)
def test_pairs_chosen_against_rejected(scores, limit, expected):
    pairs = autoif.make_pairs(_scored(scores), 0.5, limit)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (f"r{c}", f"r{r}") for c, r in expected
    ]


def test_strict_accuracy_prompt_and_instruction_level():
    rows = [{"followed": [True, True]}, {"followed": [True, False]}, {"followed": [False]}]
    assert autoif.strict_accuracy(rows) == {
        "autoif_prompt_strict": pytest.approx(1 / 3),
        "autoif_instruction_strict": pytest.approx(3 / 5),
    }


def _params(tmp_path, **changes):
    raw = default_params_dict()
    raw["autoif"].update(enabled=True, **changes)
    return validate_params(raw)


def test_a_library_with_nothing_usable_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seeds.yaml").write_text(
        "- id: broken\n  instruction: x\n  functions: ['def evaluate(r) return 1']\n"
        "  cases: [{response: a, verdict: true}, {response: b, verdict: true}, {response: c}]\n",
        encoding="utf-8",
    )
    with pytest.raises(SpinflowError) as err:
        autoif.autoif_instructions(_params(tmp_path, seeds="seeds.yaml"))
    assert str(err.value) == (
        "autoif_instructions: no usable instruction in seeds.yaml (3 items dropped: "
        "{'case_without_verdict': 1, 'function_syntax': 1, 'no_function': 1})"
    )
    assert not (tmp_path / "autoif").exists()


def test_verify_fails_in_one_line_when_no_function_survives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrong = Instruction(
        "upper",
        "Shout.",
        ("def evaluate(response):\n    return response.islower()\n",),
        (Case("A", True), Case("b", False), Case("C", True)),
    )
    write_jsonl(tmp_path / "autoif/instructions/instructions.jsonl", [wrong.to_record()])
    with pytest.raises(SpinflowError) as err:
        autoif.autoif_verify(_params(tmp_path, sandbox_workers=1))
    assert str(err.value) == (
        "autoif_verify: no instruction kept 1 function(s) with accuracy ≥ 0.8 on its cases "
        "(1 checked: {'low_accuracy': 1, 'too_few_functions': 1})"
    )
    assert not (tmp_path / "autoif/verified").exists()


# A library for the tiny model, whose answers are noise: functions on the length of an answer
# pass some samples and fail others, so pairs form. Two items are bad on purpose.
TINY_SEEDS = [
    {
        "id": "even_length",
        "instruction": "Answer with an even number of characters.",
        "functions": ["def evaluate(response):\n    return len(response) % 2 == 0\n"],
        "cases": [
            {"response": "ab", "verdict": True},
            {"response": "abc", "verdict": False},
            {"response": "abcd", "verdict": True},
        ],
    },
    {
        "id": "short",
        "instruction": "Answer in fewer than 20 characters.",
        "functions": [
            "def evaluate(response):\n    return len(response) < 20\n",
            "def evaluate(response):\n    return len(response) > 20\n",  # wrong: dropped
        ],
        "cases": [
            {"response": "short", "verdict": True},
            {"response": "x" * 30, "verdict": False},
            {"response": "", "verdict": True},
            {"response": "no verdict"},
        ],
    },
    {
        "id": "odd_words",
        "instruction": "Use an odd number of words.",
        "functions": ["def evaluate(response):\n    return len(response.split()) % 2 == 1\n"],
        "cases": [
            {"response": "one", "verdict": True},
            {"response": "one two", "verdict": False},
            {"response": "a b c", "verdict": True},
        ],
    },
    {
        "id": "broken",
        "instruction": "Anything.",
        "functions": ["def evaluate(response) return True\n"],
        "cases": [{"response": "a", "verdict": True}] * 3,
    },
]
AUTOIF_STAGES = {
    "autoif_instructions",
    "autoif_verify",
    "autoif_queries",
    "autoif_sample_iter_0",
    "autoif_train_iter_0",
    "eval_autoif_iter_0",
}


@pytest.mark.slow
def test_autoif_stages_end_to_end(tiny_dvc_repo, tmp_path):
    """AutoIF switched on in the shared tiny pipeline, one iteration: DVC runs the AutoIF stages
    up to θ1's held-out evaluation and nothing of the SPIN chain; the filters' counts, pairs, a
    DPO iteration and the evaluation come out. (θ0's evaluation runs the same code, and the
    report's section is tested on written metrics above: both are left out to keep this short.)

    Then autoif.with_spin: SPIN's generate_iter_0 also answers θ0's verified queries (the pool's
    own answers unchanged) and checks them by their functions, train_iter_0 trains on SPIN's
    and AutoIF's pairs together, and θ1 of SPIN is the one evaluated on held-out instructions."""
    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    (repo.root / "seeds.yaml").write_text(yaml.safe_dump(TINY_SEEDS), encoding="utf-8")
    params = repo.root / "params.yaml"
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["autoif"].update(
        enabled=True,
        iterations=1,
        seeds="seeds.yaml",
        heldout=1,
        queries=4,
        eval_queries=4,
        samples=4,
        max_new_tokens=8,
        sandbox_workers=1,
        train={**raw["autoif"]["train"], "batch_size": 4},
    )
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    repo.run("spinflow", "pipeline", "write")
    ran = repo.ran(repo.run("dvc", "repro", "eval_autoif_iter_0", timeout=600))
    assert ran == AUTOIF_STAGES, f"ran {sorted(ran)}"
    assert_on_decided_device(
        device_records(repo.root),
        {"autoif_sample_iter_0", "autoif_train_iter_0", "eval_autoif_iter_0"},
    )

    made = repo.json("metrics/autoif_instructions.json")
    assert made["instructions_kept"] == 3
    assert made["dropped"] == {"case_without_verdict": 1, "function_syntax": 1, "no_function": 1}
    drops = read_jsonl(repo.root / "autoif/instructions/drops.jsonl")
    assert {d["id"] for d in drops} == {"short#c3", "broken#f0", "broken"}
    verified = repo.json("metrics/autoif_verify.json")
    assert verified["instructions_kept"] == 3 and verified["functions_kept"] == 3
    assert verified["dropped"] == {"low_accuracy": 1}
    assert verified["sandbox_calls"] == 12 and verified["sandbox_calls_per_second"] > 0
    queries = repo.json("metrics/autoif_queries.json")
    assert queries["train_instructions"] == 2 and queries["heldout_instructions"] == 1
    sampled = repo.json("metrics/autoif_sample_iter_0.json")
    assert sampled["samples"] == 16 and sampled["sandbox_calls"] == 16 and sampled["pairs"] > 0
    pairs = read_jsonl(repo.root / "autoif/iter_0/pairs.jsonl")
    assert len(pairs) == sampled["pairs"] and all(p["chosen_score"] >= 0.5 for p in pairs)
    trained = repo.json("metrics/autoif_train_iter_0.json")
    assert trained["pairs"] == sampled["pairs"] and trained["optimizer_steps"] >= 1
    assert (repo.root / "models/autoif_theta_1/config.json").is_file()
    metrics = repo.json("metrics/eval_autoif_iter_0.json")
    assert metrics["queries"] == 4 and metrics["instructions"] >= 4
    rows = read_jsonl(repo.root / "eval/autoif_iter_0/generations.jsonl")
    followed = [f for r in rows for f in r["followed"]]
    assert metrics["autoif_instruction_strict"] == sum(followed) / len(followed)
    assert metrics["autoif_prompt_strict"] == sum(all(r["followed"]) for r in rows) / 4

    # ---- combined with SPIN: the same repository, autoif.with_spin switched on
    spin_pairs = repo.root / "generated/iter_0/pairs.jsonl"
    plain = spin_pairs.read_text(encoding="utf-8").splitlines()  # θ0's answers, the fixture's run
    raw["autoif"]["with_spin"] = True
    raw["spin"]["feedback_filter"] = "drop"
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    repo.run("spinflow", "pipeline", "write")
    ran = repo.ran(repo.run("dvc", "repro", "eval_autoif_iter_0", timeout=600))
    # autoif_sample_iter_0 sampled θ0 already; no AutoIF model is trained
    assert ran == {"generate_iter_0", "train_iter_0", "eval_autoif_iter_0"}, f"ran {sorted(ran)}"
    lines = spin_pairs.read_text(encoding="utf-8").splitlines()
    assert lines[: len(plain)] == plain  # the ordinary pool's pairs, byte for byte
    added = [json.loads(line) for line in lines[len(plain) :]]
    verified = read_jsonl(repo.root / "autoif/iter_0/sft.jsonl")
    assert [p["id"] for p in added] == list(dict.fromkeys(f"autoif/{r['query']}" for r in verified))
    assert 0 < len(added) <= queries["train_queries"]
    functions = {
        i["id"]: i["functions"]
        for i in read_jsonl(repo.root / "autoif/verified/instructions.jsonl")
    }
    for pair in added:  # the library's own functions, run here in-process (they are ours)
        expected = all(_run_function(f, pair["generated"]) for f in functions[pair["instruction"]])
        assert pair["task"] == "autoif" and pair["generated_passes"] is expected
    passing = sum(p["generated_passes"] for p in added)
    trained = repo.json("metrics/train_iter_0.json")
    autoif_pairs = read_jsonl(repo.root / "autoif/iter_0/pairs.jsonl")
    assert trained["pairs_autoif"] == len(autoif_pairs) > 0
    assert trained["instruction_pairs"] == len(added)
    assert trained["instruction_generated_passing"] == passing
    assert trained["pairs_dropped"] == trained["pairs_generated_correct"] >= passing
    assert trained["pairs_spin"] == len(lines) - trained["pairs_dropped"]
    assert trained["pairs"] == trained["pairs_spin"] + trained["pairs_autoif"]
    assert trained["generation_tokens"] > sampled["answer_tokens"]
    made_by = repo.json("eval/autoif_iter_0/provenance.json")
    assert made_by["inputs"]["model"]["path"] == "models/theta_1"
    followed_by_theta_1 = repo.json("metrics/eval_autoif_iter_0.json")
    assert followed_by_theta_1["queries"] == 4
    # both evaluations of θ1 log into its MLflow run as eval/<key>: no name may be shared
    tested = repo.json("metrics/eval_iter_0.json")  # the fixture's run; its keys are the same
    assert set(tested) & set(followed_by_theta_1) == {"model"}


def _run_function(source: str, response: str) -> bool:
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - the test's own library above, not model output
    return bool(namespace["evaluate"](response))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("Sure! Here is a function.", "no JSON object in the answer"),
        ('{"func": "def evaluate(r):", "cases": [', "invalid JSON (Expecting value at"),
        ('{"function": "x", "cases": []}', 'the JSON object has no "func" text'),
        ('{"func": "x", "cases": "none"}', 'the JSON object has no "cases" list of objects'),
    ],
)
def test_unparseable_supervisor_answers_say_why(text, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        autoif.parse_function_answer(text)


def test_supervisor_answers_parse_into_library_items():
    text = (
        'Here you go: {"func": "def evaluate(response):\\n    return \',\' not in response", '
        '"cases": [{"input": "a b", "output": "true"}, {"input": "a, b", "output": false}, '
        '{"input": "c", "output": "maybe"}]} Hope it helps.'
    )
    source, cases = autoif.parse_function_answer(text)
    assert source == "def evaluate(response):\n    return ',' not in response"
    # a verdict that is not true/false stays as given: loading drops that case, counted
    assert cases == [
        {"response": "a b", "verdict": True},
        {"response": "a, b", "verdict": False},
        {"response": "c", "verdict": "maybe"},
    ]
    assert autoif.parse_instruction_lines("ok\n- Use no commas.\n-x\n  - End with a dot.\n") == [
        "Use no commas.",
        "End with a dot.",
    ]


def test_a_supervisor_writing_noise_is_counted_and_the_seeds_go_on(
    tmp_path, monkeypatch, tiny_checkpoint_session
):
    """The tiny model writes no instruction line: each self-instruct answer is dropped with its
    id and counted, and autoif_instructions goes on with the seed library alone."""
    monkeypatch.chdir(tmp_path)
    params = _params(
        tmp_path,
        supervisor=str(tiny_checkpoint_session),
        supervisor_rounds=2,
        supervisor_max_new_tokens=8,
    )
    params.generate.engine = "torch"
    summary = autoif.autoif_supervise(params)
    assert summary["instructions_written"] == 0 and summary["function_answers"] == 0
    assert summary["dropped"] == {"unparseable_supervisor_output": 2}
    drops = read_jsonl(tmp_path / "autoif/supervised/drops.jsonl")
    assert [d["id"] for d in drops] == ["self-instruct-0", "self-instruct-1"]
    written = tmp_path / "autoif/supervised/instructions.yaml"
    assert yaml.safe_load(written.read_text(encoding="utf-8")) == []
    made = autoif.autoif_instructions(params)
    assert made["instructions_kept"] == 49 and made["dropped"] == {}


# what the AutoIF stages wrote, for the report's section (one iteration, with a supervisor)
REPORT_METRICS = {
    "autoif_supervise": {
        "instructions_written": 3,
        "function_answers": 9,
        "functions_parsed": 4,
        "dropped": {"unparseable_supervisor_output": 5},
    },
    "autoif_instructions": {
        "items": 52,
        "instructions_kept": 50,
        "functions_in_file": 61,
        "functions_kept": 59,
        "dropped": {"function_syntax": 2, "too_few_cases": 2},
    },
    "autoif_verify": {
        "instructions_kept": 48,
        "functions_kept": 55,
        "functions_checked": 59,
        "dropped": {"low_accuracy": 4},
        "sandbox_calls_per_second": 250.4,
    },
    "autoif_queries": {"eval_queries": 4, "heldout_instructions": 12, "train_instructions": 36},
    "autoif_sample_iter_0": {
        "samples_passing_all": 5,
        "samples": 16,
        "pairs": 3,
        "queries_with_pairs": 2,
        "queries": 4,
        "mean_score": 0.4,
        "sandbox_calls_per_second": 120.0,
    },
}


def test_the_report_section_shows_accuracy_intervals_and_every_filter(tmp_path, monkeypatch):
    from spinflow.graph import build
    from spinflow.io import write_json
    from spinflow.methods.autoif.report import autoif_section
    from spinflow.nodes import train_metrics

    monkeypatch.chdir(tmp_path)
    (tmp_path / "supervisor").mkdir()
    params = _params(tmp_path, supervisor="supervisor", iterations=1)
    graph = build(params)
    metrics = REPORT_METRICS
    for stage, values in metrics.items():
        write_json(train_metrics(stage), values)
    followed = {
        "autoif_theta_0": [[True, False], [False], [True], [False, False]],
        "autoif_iter_0": [[True, True], [True], [True], [False, True]],
    }
    for name, rows in followed.items():
        write_jsonl(
            graph.evaluation(name).generations,
            [{"id": f"q{i}", "followed": f} for i, f in enumerate(rows)],
        )
    text = "\n".join(autoif_section(graph))
    assert "| θ0 (SFT), before AutoIF | 0.250 [" in text  # 1 of 4 queries, 3 of 6 instructions
    assert "| θ1 (AutoIF iter 0) | 0.750 [" in text and "| 0.833 [" in text
    assert "3 new instructions, 4 of 9 function answers | unparseable_supervisor_output: 5" in text
    assert "function_syntax: 2, too_few_cases: 2" in text and "low_accuracy: 4" in text
    assert "5 of 16 samples / 3 pairs from 2 of 4 queries" in text
    assert "Sandbox calls per second: autoif_verify 250, autoif_sample_iter_0 120." in text

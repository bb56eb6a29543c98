"""The AutoIF instruction library: the built-in seeds, loading bad items, cross-validation."""

from __future__ import annotations

import json

import pytest

from spinflow.methods.autoif import instructions as ins
from spinflow.errors import DataError
from spinflow.sandbox import Sandbox

GOOD_FN = "def evaluate(response):\n    return response.islower()\n"
GOOD_JSON = json.dumps(GOOD_FN)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(call_timeout=2.0, workers=2) as box:
        yield box


def test_the_seed_library_is_complete_and_every_function_passes_its_cases(sandbox):
    library = ins.load_library()
    assert library.drops == []
    seeds = library.instructions
    assert len(seeds) >= 40
    assert len({s.id for s in seeds}) == len(seeds)
    assert all(len(s.cases) >= 3 and s.functions for s in seeds)
    # every case set has both verdicts, so a constant function cannot pass it
    assert all({c.verdict for c in s.cases} == {True, False} for s in seeds)
    kept, drops, accuracies = ins.cross_validate(seeds, sandbox, min_accuracy=1.0, min_functions=1)
    wrong = [a for a in accuracies if a.accuracy < 1.0]
    assert wrong == [] and drops == []
    assert [k.id for k in kept] == [s.id for s in seeds]


def _write(tmp_path, text: str):
    path = tmp_path / "seeds.yaml"
    path.write_text(text, encoding="utf-8")
    return path


BAD_LIBRARY = f"""
- id: good
  instruction: Write in lowercase.
  functions:
    - {GOOD_JSON}
    - "def evaluate(response):\\n    return (\\n"
  cases:
    - {{response: "ok", verdict: true}}
    - {{response: "NO", verdict: false}}
    - {{response: "fine"}}
    - {{response: "yes", verdict: true}}
- id: unparsable
  instruction: Anything.
  functions: ["def evaluate(response) return True"]
  cases: [{{response: a, verdict: true}}, {{response: b, verdict: true}}, {{response: c, verdict: false}}]
- id: few_cases
  instruction: Anything.
  functions: [{GOOD_JSON}]
  cases: [{{response: a, verdict: true}}, {{response: b, verdict: maybe}}]
- just a string
- id: good
  instruction: Again.
  functions: [{GOOD_JSON}]
  cases: [{{response: a, verdict: true}}, {{response: b, verdict: true}}, {{response: C, verdict: false}}]
"""


def test_bad_items_are_dropped_with_their_id_and_counted(tmp_path):
    library = ins.load_library(_write(tmp_path, BAD_LIBRARY))
    assert [i.id for i in library.instructions] == ["good"]
    assert library.instructions[0].functions == (GOOD_FN,)
    assert len(library.instructions[0].cases) == 3
    lines = [d.line() for d in library.drops]
    assert lines == [
        "good#f1: dropped (function_syntax): line 2: '(' was never closed",
        "good#c2: dropped (case_without_verdict): no verdict",
        "unparsable#f0: dropped (function_syntax): line 1: expected ':'",
        "unparsable: dropped (no_function): none of its 1 functions parses",
        "few_cases#c1: dropped (case_without_verdict): verdict 'maybe' is not true/false",
        "few_cases: dropped (too_few_cases): 1 usable cases, fewer than 3",
        "seeds.yaml:20: dropped (malformed): an item must be a mapping, not str",
        "good: dropped (duplicate_id): seeds.yaml:21: id already used on line 2",
    ]
    assert library.summary()["dropped"] == {
        "case_without_verdict": 2,
        "duplicate_id": 1,
        "function_syntax": 2,
        "malformed": 1,
        "no_function": 1,
        "too_few_cases": 1,
    }
    assert library.summary()["items"] == 5


@pytest.mark.parametrize(
    "text, message",
    [
        ("id: x\n", "must be a YAML list of instructions, got dict"),
        ("- [unclosed\n", "invalid YAML"),
    ],
)
def test_a_library_that_is_not_a_list_is_one_line_error(tmp_path, text, message):
    with pytest.raises(DataError, match=message) as err:
        ins.load_library(_write(tmp_path, text))
    assert "\n" not in str(err.value) and "seeds.yaml" in str(err.value)


def test_cross_validation_keeps_accurate_functions_only(sandbox):
    cases = (
        ins.Case("abc", True),
        ins.Case("ABC", False),
        ins.Case("xyz", True),
        ins.Case("Hello", False),
        ins.Case("ok", True),
    )
    half_right = "def evaluate(response):\n    return response.startswith(('a', 'H'))\n"
    crashes = "def evaluate(response):\n    raise ValueError(response)\n"
    good = ins.Instruction("lower", "Write in lowercase.", (GOOD_FN, half_right, crashes), cases)
    lonely = ins.Instruction("lonely", "Anything.", (crashes,), cases)
    kept, drops, accuracies = ins.cross_validate(
        [good, lonely], sandbox, min_accuracy=0.8, min_functions=1
    )
    assert [k.id for k in kept] == ["lower"] and kept[0].functions == (GOOD_FN,)
    assert [(a.instruction, a.index, a.accuracy, a.errors) for a in accuracies] == [
        ("lower", 0, 1.0, 0),
        ("lower", 1, 0.4, 0),
        ("lower", 2, 0.0, 5),
        ("lonely", 0, 0.0, 5),
    ]
    assert [(d.id, d.reason) for d in drops] == [
        ("lower#f1", "low_accuracy"),
        ("lower#f2", "low_accuracy"),
        ("lonely#f0", "low_accuracy"),
        ("lonely", "too_few_functions"),
    ]
    # two functions required: the instruction with one good function goes too
    kept, drops, _ = ins.cross_validate([good], sandbox, min_accuracy=0.4, min_functions=3)
    assert kept == [] and drops[-1].line() == (
        "lower: dropped (too_few_functions): 2 of 3 functions kept, fewer than 3"
    )


def test_check_responses_and_compatibility(sandbox):
    counter = ins.SandboxCounter()
    lower = ins.Instruction(
        "lower", "x", (GOOD_FN, "def evaluate(r):\n    return len(r) < 4\n"), ()
    )
    scores = ins.check_responses(
        [(lower, "abc"), (lower, "abcdef"), (lower, "ABC")], sandbox, counter
    )
    assert scores == [[True, True], [True, False], [False, True]]
    assert counter.calls == 6 and counter.summary()["sandbox_calls_per_second"] > 0
    a = ins.Instruction("a", "x", (), (), group="case")
    b = ins.Instruction("b", "x", (), (), group="case")
    c = ins.Instruction("c", "x", (), (), group="start", conflicts=("case",))
    d = ins.Instruction("d", "x", (), (), group="format")
    e = ins.Instruction("e", "x", (), (), group="one", conflicts=("*",))
    assert not a.compatible(b) and not a.compatible(c) and not c.compatible(a)
    assert a.compatible(d) and c.compatible(d) and not d.compatible(e)

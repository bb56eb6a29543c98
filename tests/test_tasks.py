from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from spinflow.tasks import FAMILIES, TaskFamily, describe_families, generate_examples
from spinflow.verifiers import verify

SEEDS_PER_FAMILY = 500

REQUIRED_FAMILIES = {
    "addition",
    "multiplication",
    "reverse_word",
    "sort_numbers",
    "sort_words",
    "count_letter",
    "unit_conversion",
    "uppercase_sentence",
    "lowercase_sentence",
    "no_commas",
    "json_field",
    "bullets",
    "quoted_answer",
    "title_format",
    "closing_phrase",
}


def _bump_last_digit(text: str) -> str:
    match = list(re.finditer(r"\d", text))[-1]
    digit = str((int(match.group()) + 1) % 10)
    return text[: match.start()] + digit + text[match.end() :]


def _change_word(text: str) -> str:
    inner = text.strip('"')
    return text.replace(inner, inner + "x") if inner else "x"


def _drop_last_json_key(text: str) -> str:
    obj = json.loads(text)
    obj.pop(list(obj)[-1])
    return json.dumps(obj)


# One way per family to turn the right answer into a wrong one.
MUTATIONS = {
    "addition": _bump_last_digit,
    "multiplication": _bump_last_digit,
    "count_letter": _bump_last_digit,
    "unit_conversion": lambda a: str(int(a) + 1),
    "reverse_word": lambda a: a + "s",
    "sort_numbers": lambda a: ", ".join(reversed(a.split(", "))),
    "sort_words": lambda a: ", ".join(reversed(a.split(", "))),
    "uppercase_sentence": str.lower,
    "lowercase_sentence": str.upper,
    "no_commas": lambda a: a.replace(" and ", ", ", 1),
    "json_field": _drop_last_json_key,
    "bullets": lambda a: "\n".join(a.splitlines()[:-1]),
    "quoted_answer": lambda a: a.strip('"'),
    "title_format": lambda a: a.strip("<>"),
    "closing_phrase": lambda a: a + " Bye.",
}

# Second, content-level mutations for format families that also check the content.
CONTENT_MUTATIONS = {
    "uppercase_sentence": lambda a: a.replace("THE ", "A ", 1),
    "lowercase_sentence": lambda a: a.replace("the ", "a ", 1),
    "quoted_answer": _change_word,
    "no_commas": lambda a: "Nothing to see here.",
    "bullets": lambda a: "\n".join("* item" for _ in a.splitlines()),
    "title_format": lambda a: "<<Untitled>>",
    "closing_phrase": lambda a: "Something. " + a.split(". ", 1)[1],
    "json_field": lambda a: json.dumps({k: "zzz" for k in json.loads(a)}),
}


def test_required_families_registered() -> None:
    assert set(FAMILIES) >= REQUIRED_FAMILIES
    assert len(FAMILIES) >= 10
    for name, family in FAMILIES.items():
        assert isinstance(family, TaskFamily)
        assert family.name == name


def test_every_family_has_a_mutation() -> None:
    assert set(MUTATIONS) == set(FAMILIES)


def test_describe_families() -> None:
    described = describe_families()
    assert list(described) == list(FAMILIES)
    for text in described.values():
        assert text and "\n" not in text and len(text) < 100


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_answers_pass_and_mutations_fail(name: str) -> None:
    family = FAMILIES[name]
    mutate = MUTATIONS[name]
    mutate_content = CONTENT_MUTATIONS.get(name)
    for seed in range(SEEDS_PER_FAMILY):
        prompt, answer, verifier = family.generate(random.Random(seed))
        assert isinstance(prompt, str) and isinstance(answer, str)
        assert verify(answer, verifier), (seed, prompt, answer, verifier)
        wrong = mutate(answer)
        assert wrong != answer
        assert not verify(wrong, verifier), (seed, prompt, wrong, verifier)
        if mutate_content is not None:
            wrong = mutate_content(answer)
            assert not verify(wrong, verifier), (seed, prompt, wrong, verifier)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lengths_and_serialisable(name: str) -> None:
    family = FAMILIES[name]
    for seed in range(SEEDS_PER_FAMILY):
        prompt, answer, verifier = family(random.Random(seed))
        assert len(prompt.split()) < 40, prompt
        assert len(answer.split()) < 25, answer
        assert prompt == prompt.strip() and answer == answer.strip()
        assert json.loads(json.dumps(verifier)) == verifier
        assert set(verifier) == {"name", "args"}


def test_arithmetic_answers_are_bare_numbers() -> None:
    records = generate_examples(200, seed=3, families=["addition", "multiplication"])
    for record in records:
        assert record["answer"].isdigit()
        assert "number only" in record["prompt"] or "just the number" in record["prompt"]


def test_known_values() -> None:
    for record in generate_examples(300, seed=11, families=["addition", "sort_numbers"]):
        numbers = [int(x) for x in re.findall(r"\d+", record["prompt"])]
        if record["task"] == "addition":
            assert record["answer"] == str(sum(numbers))
        else:
            assert record["answer"] == ", ".join(str(x) for x in sorted(numbers))


def test_record_shape_and_json_round_trip() -> None:
    records = generate_examples(60, seed=0)
    assert len(records) == 60
    for index, record in enumerate(records):
        assert set(record) == {"id", "prompt", "answer", "task", "verifier"}
        assert record["id"] == f"{record['task']}-{index}"
        assert record["task"] in FAMILIES
        assert verify(record["answer"], record["verifier"])
    assert json.loads(json.dumps(records)) == records
    assert len({r["id"] for r in records}) == len(records)


def test_deterministic() -> None:
    first = generate_examples(200, seed=42)
    second = generate_examples(200, seed=42)
    assert first == second
    assert generate_examples(200, seed=43) != first
    subset = ["addition", "bullets"]
    assert generate_examples(50, seed=1, families=subset) == generate_examples(
        50, seed=1, families=subset
    )


def test_does_not_touch_global_random() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_examples(50, seed=5)
    assert random.random() == expected


def test_prompts_unique() -> None:
    records = generate_examples(3000, seed=7)
    prompts = [r["prompt"] for r in records]
    assert len(set(prompts)) == len(prompts)


def test_all_families_present_and_balanced() -> None:
    n = len(FAMILIES)
    records = generate_examples(n, seed=0)
    assert {r["task"] for r in records} == set(FAMILIES)
    counts = Counter(r["task"] for r in generate_examples(10 * n, seed=0))
    assert set(counts.values()) == {10}


def test_family_subset_and_order() -> None:
    records = generate_examples(9, seed=2, families=["sort_words", "json_field", "sort_words"])
    assert [r["task"] for r in records] == ["sort_words", "json_field"] * 4 + ["sort_words"]
    single = generate_examples(5, seed=2, families="count_letter")  # type: ignore[arg-type]
    assert {r["task"] for r in single} == {"count_letter"}


def test_zero_examples() -> None:
    assert generate_examples(0, seed=0) == []


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_bad_n(n: object) -> None:
    with pytest.raises(ValueError):
        generate_examples(n, seed=0)  # type: ignore[arg-type]


def test_unknown_family() -> None:
    with pytest.raises(ValueError) as info:
        generate_examples(5, seed=0, families=["addition", "astrology"])
    message = str(info.value)
    assert "astrology" in message
    assert "addition" in message and "closing_phrase" in message


def test_empty_family_list() -> None:
    with pytest.raises(ValueError):
        generate_examples(5, seed=0, families=[])


def test_exhausted_family_raises() -> None:
    with pytest.raises(ValueError, match="unique prompts"):
        generate_examples(5000, seed=0, families=["reverse_word"], max_tries=200)


def test_exhausted_family_is_dropped_from_rotation() -> None:
    records = generate_examples(2000, seed=0, families=["reverse_word", "addition"])
    prompts = [r["prompt"] for r in records]
    assert len(set(prompts)) == 2000
    counts = Counter(r["task"] for r in records)
    assert counts["reverse_word"] < 1000 < counts["addition"]

from __future__ import annotations

import json

import pytest

from spinflow.verifiers import (
    VERIFIERS,
    UnknownVerifierError,
    exact_match,
    normalize_answer,
    register,
    verify,
)


def v(name: str, **args: object) -> dict:
    return {"name": name, "args": args}


# --- registry and dispatch -------------------------------------------------


def test_registry_has_required_checks() -> None:
    required = {
        "equals",
        "final_number",
        "lowercase",
        "uppercase",
        "no_commas",
        "json_object",
        "bullet_count",
        "quoted",
        "title",
        "ends_with",
        "contains_all",
        "word_count_range",
        "sorted_list",
        "all_of",
    }
    assert required <= set(VERIFIERS)
    assert all(callable(f) for f in VERIFIERS.values())


def test_unknown_verifier_error() -> None:
    with pytest.raises(UnknownVerifierError) as info:
        verify("x", v("no_such_check"))
    err = info.value
    assert isinstance(err, KeyError)
    assert isinstance(err, ValueError)
    message = str(err)
    assert "no_such_check" in message
    assert "equals" in message and "json_object" in message
    assert "\n" not in message


def test_unknown_verifier_nested_in_all_of() -> None:
    with pytest.raises(UnknownVerifierError, match="bogus"):
        verify("hello", v("all_of", checks=[v("lowercase"), v("bogus")]))


@pytest.mark.parametrize(
    "spec",
    [
        "equals",
        {"args": {}},
        {"name": 3, "args": {}},
        {"name": "equals", "args": ["x"]},
        {"name": "equals", "args": {}},
        {"name": "equals", "args": {"answer": "a", "nope": 1}},
    ],
)
def test_malformed_verifier(spec: object) -> None:
    with pytest.raises(ValueError):
        verify("a", spec)  # type: ignore[arg-type]


def test_args_optional() -> None:
    assert verify("hello", {"name": "lowercase"})
    assert verify("hello", {"name": "lowercase", "args": None})


def test_register_duplicate_name_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("equals")(lambda response: True)


def test_register_new_check() -> None:
    name = "_test_starts_with_x"
    try:

        @register(name)
        def _check(response: str, prefix: str = "x") -> bool:
            return response.startswith(prefix)

        assert verify("xyz", v(name))
        assert not verify("xyz", v(name, prefix="y"))
    finally:
        VERIFIERS.pop(name, None)


# --- normalisation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  579 ", "579"),
        ("Paris.", "paris"),
        ('"Paris"', "paris"),
        ('"Paris."', "paris"),
        ('"Paris".', "paris"),
        ("'Blue'", "blue"),
        ("\u201cNew   Delhi\u201d", "new delhi"),
        ("the  quick\n brown\tfox", "the quick brown fox"),
        ("2.5", "2.5"),
        ("Wait...", "wait..."),
        ('"', '"'),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match() -> None:
    assert exact_match(" TORRAP. ", "torrap")
    assert exact_match('"Buenos Aires"', "buenos aires")
    assert not exact_match("5790", "579")
    assert not exact_match("The answer is 579", "579")


# --- individual checks -------------------------------------------------------


def test_equals() -> None:
    assert verify("579", v("equals", answer="579"))
    assert verify("579.", v("equals", answer="579"))
    assert verify(" Regit ", v("equals", answer="regit"))
    assert not verify("578", v("equals", answer="579"))
    assert not verify("The sum is 579.", v("equals", answer="579"))


def test_final_number() -> None:
    spec = v("final_number", value=3500)
    assert verify("3500", spec)
    assert verify("That is 3500 meters.", spec)
    assert verify("3,500", spec)
    assert verify("3500.0", spec)
    assert verify("3.5 km is 3500 m", spec)
    assert not verify("3500 m, not 3.5", spec)
    assert not verify("3501", spec)
    assert not verify("no number here", spec)
    assert verify("-4", v("final_number", value=-4))
    assert verify("about 2.5", v("final_number", value="2.5"))
    assert verify("0.333", v("final_number", value=1 / 3, tol=0.001))
    assert not verify("0.3", v("final_number", value=1 / 3, tol=0.001))


def test_lowercase() -> None:
    assert verify("the lazy fox lives in france.", v("lowercase"))
    assert not verify("the lazy fox lives in France.", v("lowercase"))
    assert not verify("123 !", v("lowercase"))
    assert not verify("", v("lowercase"))


def test_uppercase() -> None:
    assert verify("THE LAZY FOX, 3 TIMES!", v("uppercase"))
    assert not verify("THE LAZY Fox", v("uppercase"))
    assert not verify("123", v("uppercase"))


def test_no_commas() -> None:
    assert verify("Lion and tiger and zebra are all animals.", v("no_commas"))
    assert not verify("Lion, tiger and zebra.", v("no_commas"))


def test_json_object_plain_and_fenced() -> None:
    spec = v("json_object")
    assert verify('{"a": 1}', spec)
    assert verify('```json\n{"a": 1}\n```', spec)
    assert verify('```JSON\n{"a": 1}\n```', spec)
    assert verify('```\n{"a": 1}\n```', spec)
    assert verify('  ```json {"a": 1}```  ', spec)
    assert not verify("[1, 2]", spec)
    assert not verify('"a"', spec)
    assert not verify("{'a': 1}", spec)
    assert not verify('Here you go: {"a": 1}', spec)
    assert not verify("", spec)


def test_json_object_keys_and_values() -> None:
    spec = v("json_object", required_keys=["name", "age"], values={"name": "Alice", "age": 30})
    assert verify('{"name": "Alice", "age": 30}', spec)
    assert verify('{"age": 30.0, "name": "alice", "extra": true}', spec)
    assert verify('{"name": "Alice", "age": "30"}', spec)
    assert not verify('{"name": "Alice"}', spec)
    assert not verify('{"name": "Bob", "age": 30}', spec)
    assert not verify('{"name": "Alice", "age": 31}', spec)
    assert not verify('{"name": "Alice", "age": true}', v("json_object", values={"age": 1}))


def test_bullet_count() -> None:
    star = "* apple\n* pear\n* plum"
    dash = "- apple\n- pear\n- plum"
    mixed = "Here:\n* apple\n  - pear\n* plum\nDone."
    for text in (star, dash, mixed):
        assert verify(text, v("bullet_count", n=3))
        assert not verify(text, v("bullet_count", n=2))
        assert not verify(text, v("bullet_count", n=4))
    assert not verify("**bold**\n*\n-", v("bullet_count", n=1))
    assert verify("no bullets", v("bullet_count", n=0))
    assert not verify("1. apple\n2. pear", v("bullet_count", n=2))


def test_quoted() -> None:
    assert verify('"Paris"', v("quoted"))
    assert verify('  "Paris is the capital."\n', v("quoted"))
    assert not verify("Paris", v("quoted"))
    assert not verify('"Paris', v("quoted"))
    assert not verify('"', v("quoted"))
    assert not verify("'Paris'", v("quoted"))


def test_title() -> None:
    assert verify("<<Ode to the Tiger>>", v("title"))
    assert verify("Sure!\n<<A Title>>\nMore text", v("title"))
    assert not verify("<<>>", v("title"))
    assert not verify("<<   >>", v("title"))
    assert not verify("<<split\ntitle>>", v("title"))
    assert not verify("Ode to the Tiger", v("title"))


def test_ends_with() -> None:
    spec = v("ends_with", phrase="Have a nice day.")
    assert verify("A cat is an animal. Have a nice day.", spec)
    assert verify("A cat is an animal. have a nice day.  \n", spec)
    assert not verify("Have a nice day. A cat is an animal.", spec)
    assert not verify("A cat is an animal. Have a nice day", spec)


def test_contains_all() -> None:
    spec = v("contains_all", words=["lion", "South Korea"])
    assert verify("The LION lives far from south korea.", spec)
    assert not verify("The lion is here.", spec)
    assert not verify("The lions are in South Korea.", spec)
    assert verify("anything", v("contains_all", words=[]))


def test_word_count_range() -> None:
    assert verify("one two three", v("word_count_range", min=1, max=3))
    assert not verify("one two three four", v("word_count_range", min=1, max=3))
    assert not verify("one", v("word_count_range", min=2, max=3))
    assert verify("one two", v("word_count_range", min=2))
    assert not verify("", v("word_count_range", min=1))


def test_sorted_list() -> None:
    spec = v("sorted_list", items=["7", "19", "42"])
    assert verify("7, 19, 42", spec)
    assert verify("7,19,42.", spec)
    assert verify("7, 19, and 42", spec)
    assert not verify("19, 7, 42", spec)
    assert not verify("7, 19", spec)
    assert not verify("7 19 42", spec)
    assert not verify("", spec)
    words = v("sorted_list", items=["apple", "Fig", "pear"])
    assert verify("Apple, fig, pear", words)
    assert not verify("pear, fig, apple", words)
    assert verify("1, 2", v("sorted_list", items=[1, 2]))


def test_all_of_and_any_of() -> None:
    spec = v("all_of", checks=[v("quoted"), v("equals", answer="Paris")])
    assert verify('"Paris"', spec)
    assert not verify("Paris", spec)
    assert not verify('"Rome"', spec)
    assert verify("anything", v("all_of", checks=[]))
    either = v("any_of", checks=[v("equals", answer="7"), v("equals", answer="seven")])
    assert verify("Seven", either)
    assert not verify("eight", either)


def test_verifiers_are_json_round_trippable() -> None:
    spec = v(
        "all_of",
        checks=[v("bullet_count", n=2), v("contains_all", words=["a", "b"])],
    )
    again = json.loads(json.dumps(spec))
    assert again == spec
    assert verify("* a\n* b", again)

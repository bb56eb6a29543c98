"""Machine-checkable verifiers for the synthetic instruction data set.

A verifier is stored in the data as plain JSON, ``{"name": str, "args": dict}``, where
``name`` refers to a check registered in :data:`VERIFIERS`.  A check is a function
``check(response: str, **args) -> bool``.

The format checks follow the semantics of the matching IFEval instructions where one
exists:

=================  ============================================
check              IFEval instruction
=================  ============================================
``lowercase``      ``change_case:english_lowercase``
``uppercase``      ``change_case:english_capital``
``no_commas``      ``punctuation:no_comma``
``json_object``    ``detectable_format:json_format``
``bullet_count``   ``detectable_format:number_bullet_lists``
``quoted``         ``startend:quotation``
``title``          ``detectable_format:title``
``ends_with``      ``startend:end_checker``
=================  ============================================
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "VERIFIERS",
    "UnknownVerifierError",
    "exact_match",
    "normalize_answer",
    "register",
    "verify",
]

Check = Callable[..., bool]

VERIFIERS: dict[str, Check] = {}


class UnknownVerifierError(KeyError, ValueError):
    """Raised when a verifier names a check that is not registered."""

    def __init__(self, name: object) -> None:
        known = ", ".join(sorted(VERIFIERS)) or "(none)"
        self.name = name
        self.message = f"unknown verifier {name!r}; known verifiers: {known}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def register(name: str) -> Callable[[Check], Check]:
    """Register ``check(response, **args) -> bool`` under ``name``."""

    def decorator(func: Check) -> Check:
        if name in VERIFIERS:
            raise ValueError(f"verifier {name!r} is already registered")
        VERIFIERS[name] = func
        return func

    return decorator


def _resolve(verifier: Any) -> tuple[str, Check, dict[str, Any]]:
    """Validate a verifier spec and return its name, check function and arguments."""
    if not isinstance(verifier, Mapping):
        raise ValueError(
            f"a verifier must be a mapping with 'name' and 'args', got {type(verifier).__name__}"
        )
    name = verifier.get("name")
    if not isinstance(name, str):
        raise ValueError(f"a verifier needs a string 'name', got {name!r}")
    args = verifier.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ValueError(f"verifier {name!r}: 'args' must be a mapping, got {type(args).__name__}")
    func = VERIFIERS.get(name)
    if func is None:
        raise UnknownVerifierError(name)
    args = dict(args)
    try:
        inspect.signature(func).bind("", **args)
    except TypeError as exc:
        raise ValueError(f"verifier {name!r}: bad arguments {sorted(args)}: {exc}") from None
    return name, func, args


def verify(response: str, verifier: Mapping[str, Any]) -> bool:
    """Return whether ``response`` passes ``verifier`` (``{"name": ..., "args": {...}}``).

    Raises :class:`UnknownVerifierError` for an unregistered name and ``ValueError`` for a
    malformed verifier or arguments the check does not accept.
    """
    _, func, args = _resolve(verifier)
    return bool(func(response, **args))


# ---------------------------------------------------------------------------
# Normalisation helpers

_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"))


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer for exact matching.

    Strips surrounding whitespace, collapses inner whitespace, removes surrounding quotes
    and a trailing period (repeatedly, so ``'"Paris."'`` becomes ``paris``) and casefolds.
    """
    text = " ".join(str(text).split())
    while True:
        before = text
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
        for left, right in _QUOTE_PAIRS:
            if len(text) >= 2 and text.startswith(left) and text.endswith(right):
                text = text[len(left) : -len(right)].strip()
                break
        if text == before:
            break
    return text.casefold()


def exact_match(response: str, answer: str) -> bool:
    """Whether ``response`` and ``answer`` are equal after :func:`normalize_answer`."""
    return normalize_answer(response) == normalize_answer(answer)


_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def _numbers(text: str) -> list[float]:
    return [float(m.group().replace(",", "")) for m in _NUMBER_RE.finditer(text)]


def _word_pattern(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE)


def _strip_json_fence(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^```[ \t]*(?:json)?[ \t]*\n?", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\n?[ \t]*```$", "", text)
    return text.strip()


def _values_match(actual: Any, expected: Any) -> bool:
    if actual == expected and type(actual) is type(expected):
        return True
    numbers = (int, float)
    if (
        isinstance(actual, numbers)
        and isinstance(expected, numbers)
        and not isinstance(actual, bool)
        and not isinstance(expected, bool)
    ):
        return math.isclose(actual, expected, rel_tol=0.0, abs_tol=1e-9)
    if isinstance(actual, (dict, list)) or isinstance(expected, (dict, list)):
        return actual == expected
    return exact_match(str(actual), str(expected))


_BULLET_RE = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)


# ---------------------------------------------------------------------------
# Checks


@register("equals")
def check_equals(response: str, answer: str) -> bool:
    """Normalised exact match with ``answer``."""
    return exact_match(response, answer)


@register("final_number")
def check_final_number(response: str, value: float | int | str, tol: float = 1e-6) -> bool:
    """The last number in the response equals ``value`` within ``tol``."""
    found = _numbers(response)
    if not found:
        return False
    return abs(found[-1] - float(value)) <= float(tol)


@register("lowercase")
def check_lowercase(response: str) -> bool:
    """No uppercase letters, and at least one letter."""
    return response == response.lower() and any(ch.isalpha() for ch in response)


@register("uppercase")
def check_uppercase(response: str) -> bool:
    """All cased letters are uppercase, and there is at least one."""
    return response.isupper()


@register("no_commas")
def check_no_commas(response: str) -> bool:
    """The response contains no comma."""
    return "," not in response


@register("json_object")
def check_json_object(
    response: str,
    required_keys: list[str] | None = None,
    values: Mapping[str, Any] | None = None,
) -> bool:
    """The response (optionally in a ```json fence) parses as a JSON object.

    ``required_keys`` must all be present; ``values`` maps keys to expected values
    (strings compare after :func:`normalize_answer`, numbers numerically).
    """
    try:
        parsed = json.loads(_strip_json_fence(response))
    except ValueError:
        return False
    if not isinstance(parsed, dict):
        return False
    if required_keys and any(key not in parsed for key in required_keys):
        return False
    if values:
        for key, expected in values.items():
            if key not in parsed or not _values_match(parsed[key], expected):
                return False
    return True


@register("bullet_count")
def check_bullet_count(response: str, n: int) -> bool:
    """Exactly ``n`` lines are markdown bullets starting with ``* `` or ``- ``."""
    return len(_BULLET_RE.findall(response)) == int(n)


@register("quoted")
def check_quoted(response: str) -> bool:
    """The whole (stripped) response is wrapped in double quotes."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@register("title")
def check_title(response: str) -> bool:
    """The response contains a non-empty title wrapped in ``<<`` and ``>>``."""
    for match in re.findall(r"<<[^\n]+>>", response):
        if match.lstrip("<").rstrip(">").strip():
            return True
    return False


@register("ends_with")
def check_ends_with(response: str, phrase: str) -> bool:
    """The stripped response ends with ``phrase`` (case-insensitive, as in IFEval)."""
    return response.strip().lower().endswith(phrase.strip().lower())


@register("contains_all")
def check_contains_all(response: str, words: list[str]) -> bool:
    """Every entry of ``words`` occurs as a whole word or phrase (case-insensitive)."""
    return all(_word_pattern(word).search(response) for word in words)


@register("word_count_range")
def check_word_count_range(response: str, min: int = 0, max: int | None = None) -> bool:
    """The number of words (runs of word characters) is within ``[min, max]``."""
    count = len(re.findall(r"\w+", response))
    if count < int(min):
        return False
    return max is None or count <= int(max)


@register("sorted_list")
def check_sorted_list(response: str, items: list[Any]) -> bool:
    """The response is a comma-separated list equal to ``items`` in that order.

    Items compare after :func:`normalize_answer`; an ``and`` before the last item and a
    final period are tolerated.
    """
    text = " ".join(response.split())
    if not text:
        return False
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and parts[-1].lower().startswith("and "):
        parts[-1] = parts[-1][4:]
    got = [normalize_answer(part) for part in parts]
    want = [normalize_answer(str(item)) for item in items]
    return got == want


@register("all_of")
def check_all_of(response: str, checks: list[Mapping[str, Any]]) -> bool:
    """Every verifier in ``checks`` passes."""
    resolved = [_resolve(spec) for spec in checks]
    return all(func(response, **args) for _, func, args in resolved)


@register("any_of")
def check_any_of(response: str, checks: list[Mapping[str, Any]]) -> bool:
    """At least one verifier in ``checks`` passes."""
    resolved = [_resolve(spec) for spec in checks]
    return any(func(response, **args) for _, func, args in resolved)

"""Built-in synthetic instruction data set with verifiable answers.

Every task family turns a :class:`random.Random` into ``(prompt, answer, verifier)``:
a short instruction, the concise answer a good assistant would give, and a JSON
verifier (``{"name": ..., "args": {...}}``, see :mod:`spinflow.verifiers`) that the
answer passes.  :func:`generate_examples` draws a deterministic, duplicate-free data set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spinflow.verifiers import verify

__all__ = [
    "FAMILIES",
    "Example",
    "TaskFamily",
    "describe_families",
    "generate_examples",
]

Example = tuple[str, str, dict[str, Any]]
Generator = Callable[[random.Random], Example]


@dataclass(frozen=True)
class TaskFamily:
    """A named generator of verifiable examples."""

    name: str
    description: str
    generator: Generator

    def generate(self, rng: random.Random) -> Example:
        return self.generator(rng)

    def __call__(self, rng: random.Random) -> Example:
        return self.generator(rng)


FAMILIES: dict[str, TaskFamily] = {}


def _family(name: str, description: str) -> Callable[[Generator], Generator]:
    def decorator(func: Generator) -> Generator:
        if name in FAMILIES:
            raise ValueError(f"task family {name!r} is already registered")
        FAMILIES[name] = TaskFamily(name=name, description=description, generator=func)
        return func

    return decorator


def _v(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args}


# ---------------------------------------------------------------------------
# Word lists

ANIMALS = [
    "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "rabbit", "mouse", "tiger",
    "lion", "zebra", "giraffe", "elephant", "monkey", "bear", "wolf", "fox", "deer",
    "camel", "kangaroo", "koala", "panda", "otter", "beaver", "squirrel", "dolphin",
    "whale", "shark", "octopus", "turtle", "frog", "snake", "lizard", "eagle", "owl",
    "parrot", "penguin", "swan", "duck", "goose", "chicken", "bee", "ant", "butterfly",
    "spider", "hedgehog", "badger", "moose", "leopard", "cheetah", "rhino", "donkey",
    "falcon", "crab", "salmon", "seal", "hamster", "llama", "raccoon",
]  # fmt: skip

FRUITS = [
    "apple", "banana", "cherry", "grape", "lemon", "lime", "mango", "orange", "peach",
    "pear", "plum", "kiwi", "melon", "papaya", "apricot", "fig", "coconut", "pineapple",
    "strawberry", "blueberry", "raspberry", "watermelon", "guava", "lychee", "avocado",
    "pomegranate", "nectarine", "tangerine", "grapefruit", "blackberry", "cranberry",
]  # fmt: skip

VEGETABLES = [
    "carrot", "potato", "onion", "cabbage", "spinach", "broccoli", "lettuce", "cucumber",
    "celery", "garlic", "radish", "turnip", "pumpkin", "beet", "leek", "kale", "pea",
    "zucchini", "eggplant", "cauliflower", "asparagus", "artichoke",
]  # fmt: skip

COLORS = [
    "red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray",
    "violet", "indigo", "turquoise", "beige", "maroon", "teal", "crimson", "silver",
    "gold", "lavender", "cyan", "magenta", "orange",
]  # fmt: skip

INSTRUMENTS = [
    "piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello",
    "saxophone", "clarinet", "banjo", "trombone", "ukulele", "organ", "harmonica",
    "tuba", "oboe", "accordion", "xylophone", "bagpipe",
]  # fmt: skip

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Canada": "Ottawa", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Russia": "Moscow",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Cuba": "Havana", "Turkey": "Ankara", "Iran": "Tehran",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels",
    "Switzerland": "Bern", "Australia": "Canberra", "South Korea": "Seoul",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ukraine": "Kyiv", "Iceland": "Reykjavik",
    "Czechia": "Prague", "Romania": "Bucharest", "New Zealand": "Wellington",
}  # fmt: skip

COUNTRIES = list(CAPITALS)

NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
    "Kate", "Liam", "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor",
]  # fmt: skip

ADJECTIVES = [
    "small", "big", "happy", "sleepy", "quick", "lazy", "brave", "quiet", "old", "young",
    "clever", "hungry", "tiny", "friendly", "curious", "gentle", "noisy", "shy",
]  # fmt: skip

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
    "light": "dark", "open": "closed", "early": "late", "full": "empty", "wet": "dry",
    "hard": "soft", "high": "low", "left": "right", "day": "night", "push": "pull",
    "true": "false", "inside": "outside", "above": "below", "strong": "weak",
    "rich": "poor", "loud": "quiet", "thick": "thin", "north": "south", "east": "west",
    "win": "lose", "buy": "sell", "first": "last", "clean": "dirty", "long": "short",
    "question": "answer",
}  # fmt: skip

THING_COLORS = {
    "a banana": "yellow", "the sky on a clear day": "blue", "grass": "green",
    "snow": "white", "coal": "black", "a ripe tomato": "red", "a lemon": "yellow",
    "a carrot": "orange", "milk": "white", "a lime": "green", "chocolate": "brown",
    "a flamingo": "pink",
}  # fmt: skip

# (category key, singular noun, plural noun, items)
CATEGORIES: list[tuple[str, str, str, list[str]]] = [
    ("animal", "animal", "animals", ANIMALS),
    ("fruit", "fruit", "fruits", FRUITS),
    ("vegetable", "vegetable", "vegetables", VEGETABLES),
    ("color", "color", "colors", COLORS),
    ("country", "country", "countries", COUNTRIES),
    ("instrument", "musical instrument", "musical instruments", INSTRUMENTS),
]

WORDS = sorted({w for _, _, _, items in CATEGORIES[:4] + CATEGORIES[5:] for w in items})

MASS_NOUNS = {
    "spinach", "broccoli", "lettuce", "celery", "garlic", "kale", "asparagus", "cauliflower",
}  # fmt: skip

_SMALL_WORDS = {"a", "an", "the", "of", "to", "on", "for", "and", "in", "about"}


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _with_article(word: str) -> str:
    """``a cat``, ``an owl``; mass nouns such as ``spinach`` stay bare."""
    if word in MASS_NOUNS:
        return word
    return f"{_article(word)} {word}"


def _title_case(text: str, *, inner: bool = False) -> str:
    """Capitalise words except small ones; ``inner`` keeps a leading small word lowercase."""
    words = text.split()
    return " ".join(
        w if ((inner or i > 0) and w in _SMALL_WORDS) else w[:1].upper() + w[1:]
        for i, w in enumerate(words)
    )


def _capitalize_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    """``a, b and c`` for prompts."""
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _category(rng: random.Random) -> tuple[str, str, str, list[str]]:
    return rng.choice(CATEGORIES)


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---------------------------------------------------------------------------
# Exact-answer families


@_family("addition", "Add two 2-3 digit numbers; answer with the number only.")
def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    template = rng.choice(
        [
            "What is {a} + {b}? Answer with the number only.",
            "Add {a} and {b}. Reply with just the number.",
            "Compute the sum of {a} and {b}. Answer with the number only.",
        ]
    )
    answer = str(a + b)
    return template.format(a=a, b=b), answer, _v("equals", answer=answer)


@_family("multiplication", "Multiply two small numbers; answer with the number only.")
def _multiplication(rng: random.Random) -> Example:
    a, b = rng.randint(2, 12), rng.randint(2, 30)
    if rng.random() < 0.5:
        a, b = b, a
    template = rng.choice(
        [
            "What is {a} times {b}? Answer with the number only.",
            "Multiply {a} by {b}. Reply with just the number.",
            "What is {a} x {b}? Answer with the number only.",
        ]
    )
    answer = str(a * b)
    return template.format(a=a, b=b), answer, _v("equals", answer=answer)


@_family("reverse_word", "Spell a given word backwards; answer with the reversed word only.")
def _reverse_word(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    template = rng.choice(
        [
            'Reverse the letters of the word "{w}". Answer with the reversed word only.',
            'Spell the word "{w}" backwards. Reply with only the result.',
            'Write "{w}" with its letters in reverse order. Give only the reversed word.',
        ]
    )
    answer = word[::-1]
    return template.format(w=word), answer, _v("equals", answer=answer)


@_family("sort_numbers", "Sort 4-6 numbers in ascending order, comma-separated.")
def _sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.randint(4, 6))
    template = rng.choice(
        [
            "Sort these numbers from smallest to largest: {xs}. "
            "Reply with the numbers separated by commas.",
            "Put these numbers in ascending order: {xs}. "
            "Answer with the sorted numbers separated by commas.",
        ]
    )
    items = [str(x) for x in sorted(numbers)]
    prompt = template.format(xs=", ".join(str(x) for x in numbers))
    return prompt, ", ".join(items), _v("sorted_list", items=items)


@_family("sort_words", "Sort 4-5 words alphabetically, comma-separated.")
def _sort_words(rng: random.Random) -> Example:
    _, _, _, pool = _category(rng)
    words = rng.sample(pool, rng.randint(4, 5))
    template = rng.choice(
        [
            "Sort these words in alphabetical order: {xs}. "
            "Reply with the words separated by commas.",
            "Put these words in alphabetical order: {xs}. "
            "Answer with the sorted words separated by commas.",
        ]
    )
    items = sorted(words, key=str.casefold)
    prompt = template.format(xs=", ".join(words))
    return prompt, ", ".join(items), _v("sorted_list", items=items)


@_family("count_letter", "Count how often a letter occurs in a word; answer with the number.")
def _count_letter(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    if rng.random() < 0.8:
        letter = rng.choice(sorted(set(word)))
    else:
        letter = rng.choice(sorted(set("abcdefghijklmnopqrstuvwxyz") - set(word)))
    template = rng.choice(
        [
            'How many times does the letter "{c}" appear in the word "{w}"? '
            "Answer with the number only.",
            'Count the letter "{c}" in the word "{w}". Reply with just the number.',
        ]
    )
    answer = str(word.count(letter))
    return template.format(c=letter, w=word), answer, _v("equals", answer=answer)


_CONVERSIONS = [
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("years", "months", 12),
]


@_family("unit_conversion", "Convert a quantity between units; answer with the number only.")
def _unit_conversion(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(_CONVERSIONS)
    amount: float = rng.randint(2, 60)
    if factor % 2 == 0 and rng.random() < 0.25:
        amount = rng.randint(1, 20) + 0.5
    template = rng.choice(
        [
            "How many {dst} are in {x} {src}? Answer with the number only.",
            "Convert {x} {src} to {dst}. Reply with just the number.",
        ]
    )
    value = round(amount * factor)
    prompt = template.format(dst=dst, src=src, x=_fmt_number(amount))
    return prompt, str(value), _v("final_number", value=value)


@_family("quoted_answer", "Answer a simple question, wrapping the whole reply in double quotes.")
def _quoted_answer(rng: random.Random) -> Example:
    kind = rng.randrange(5)
    if kind == 0:
        country = rng.choice(COUNTRIES)
        question, reply = f"What is the capital of {country}?", CAPITALS[country]
    elif kind == 1:
        word = rng.choice(sorted(OPPOSITES))
        question, reply = f'What is the opposite of "{word}"?', OPPOSITES[word]
    elif kind == 2:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        question, reply = f"What is {a} plus {b}?", str(a + b)
    elif kind == 3:
        word = rng.choice(WORDS)
        question, reply = f'What is the first letter of the word "{word}"?', word[0]
    else:
        thing = rng.choice(sorted(THING_COLORS))
        question, reply = f"What color is {thing}?", THING_COLORS[thing]
    suffix = rng.choice(
        [
            "Wrap your entire answer in double quotes.",
            "Reply with the answer only, wrapped in double quotes.",
        ]
    )
    answer = f'"{reply}"'
    verifier = _v("all_of", checks=[_v("quoted"), _v("equals", answer=reply)])
    return f"{question} {suffix}", answer, verifier


# ---------------------------------------------------------------------------
# Format families (IFEval-style constraints, plus the required content)


def _sentence(rng: random.Random) -> str:
    animal = rng.choice(ANIMALS)
    adjective = rng.choice(ADJECTIVES)
    predicate = rng.choice(
        [
            lambda: f"eats {_with_article(rng.choice(FRUITS))}",
            lambda: f"likes the color {rng.choice(COLORS)}",
            lambda: f"lives in {rng.choice(COUNTRIES)}",
            lambda: f"plays the {rng.choice(INSTRUMENTS)}",
            lambda: f"grows {_with_article(rng.choice(VEGETABLES))}",
        ]
    )()
    return f"The {adjective} {animal} {predicate}."


@_family("uppercase_sentence", "Rewrite a short sentence in all capital letters.")
def _uppercase_sentence(rng: random.Random) -> Example:
    sentence = _sentence(rng)
    template = rng.choice(
        [
            'Rewrite this sentence in all capital letters: "{s}" '
            "Reply with the rewritten sentence only.",
            'Repeat this sentence using only uppercase letters: "{s}"',
        ]
    )
    answer = sentence.upper()
    verifier = _v("all_of", checks=[_v("uppercase"), _v("equals", answer=answer)])
    return template.format(s=sentence), answer, verifier


@_family("lowercase_sentence", "Rewrite a short sentence using only lowercase letters.")
def _lowercase_sentence(rng: random.Random) -> Example:
    sentence = _sentence(rng)
    shown = sentence.upper() if rng.random() < 0.5 else _title_case(sentence)
    template = rng.choice(
        [
            'Rewrite this sentence using only lowercase letters: "{s}" '
            "Reply with the rewritten sentence only.",
            'Repeat this sentence in all lowercase letters, with no capitals: "{s}"',
        ]
    )
    answer = sentence.lower()
    verifier = _v("all_of", checks=[_v("lowercase"), _v("equals", answer=answer)])
    return template.format(s=shown), answer, verifier


@_family("no_commas", "Name three given items in one sentence without using any commas.")
def _no_commas(rng: random.Random) -> Example:
    _, _, plural, pool = _category(rng)
    items = rng.sample(pool, 3)
    template = rng.choice(
        [
            "Write one short sentence that mentions {xs}. Do not use any commas in your response.",
            "In one sentence and without using any commas, name these {p}: {xs}.",
        ]
    )
    answer = f"{_capitalize_first(items[0])} and {items[1]} and {items[2]} are all {plural}."
    verifier = _v("all_of", checks=[_v("no_commas"), _v("contains_all", words=items)])
    return template.format(xs=_join(items), p=plural), answer, verifier


_JSON_FIELDS: list[tuple[str, Callable[[random.Random], Any]]] = [
    ("name", lambda rng: rng.choice(NAMES)),
    ("age", lambda rng: rng.randint(5, 90)),
    ("animal", lambda rng: rng.choice(ANIMALS)),
    ("fruit", lambda rng: rng.choice(FRUITS)),
    ("vegetable", lambda rng: rng.choice(VEGETABLES)),
    ("color", lambda rng: rng.choice(COLORS)),
    ("country", lambda rng: rng.choice(COUNTRIES)),
    ("city", lambda rng: rng.choice(sorted(CAPITALS.values()))),
    ("instrument", lambda rng: rng.choice(INSTRUMENTS)),
    ("count", lambda rng: rng.randint(1, 20)),
    ("year", lambda rng: rng.randint(1950, 2024)),
]


@_family("json_field", "Output a JSON object with the given keys and values.")
def _json_field(rng: random.Random) -> Example:
    fields = rng.sample(_JSON_FIELDS, rng.randint(2, 3))
    obj = {key: make(rng) for key, make in fields}
    parts = [f'"{key}" is {json.dumps(value)}' for key, value in obj.items()]
    template = rng.choice(
        [
            "Reply with a JSON object where {fields}. Output only the JSON.",
            "Return only a JSON object in which {fields}.",
        ]
    )
    answer = json.dumps(obj)
    verifier = _v("json_object", required_keys=list(obj), values=obj)
    return template.format(fields=_join(parts)), answer, verifier


@_family("bullets", "Write exactly N markdown bullet points, one per given item.")
def _bullets(rng: random.Random) -> Example:
    _, _, plural, pool = _category(rng)
    n = rng.randint(2, 5)
    items = rng.sample(pool, n)
    template = rng.choice(
        [
            "Write exactly {n} bullet points, one for each of these {p}: {xs}. "
            'Use markdown bullets like "* item".',
            'List these {p} as exactly {n} markdown bullet points ("* item"): {xs}.',
        ]
    )
    answer = "\n".join(f"* {item}" for item in items)
    verifier = _v("all_of", checks=[_v("bullet_count", n=n), _v("contains_all", words=items)])
    return template.format(n=n, p=plural, xs=", ".join(items)), answer, verifier


_TITLE_TEMPLATES = {
    "poem": "Ode to {t}",
    "story": "The Tale of {t}",
    "blog post": "All About {t}",
    "essay": "Reflections on {t}",
    "song": "A Song for {t}",
    "report": "A Report on {t}",
    "speech": "In Praise of {t}",
}


@_family("title_format", "Write a one-line title about a topic, wrapped in <<...>>.")
def _title_format(rng: random.Random) -> Example:
    key, _, _, pool = _category(rng)
    item = rng.choice(pool)
    if key == "country":
        topic = item
    elif key == "color":
        topic = f"the color {item}"
    else:
        topic = f"the {item}"
    kind = rng.choice(sorted(_TITLE_TEMPLATES))
    template = rng.choice(
        [
            "Write a title for a {k} about {t}. Wrap it in double angular brackets, "
            "like <<title>>, and reply with the title only.",
            "Suggest a one-line title for a {k} about {t}, wrapped in double angular "
            "brackets such as <<title>>.",
        ]
    )
    answer = "<<" + _TITLE_TEMPLATES[kind].format(t=_title_case(topic, inner=True)) + ">>"
    verifier = _v("all_of", checks=[_v("title"), _v("contains_all", words=[item])])
    return template.format(k=kind, t=topic), answer, verifier


_CLOSING_PHRASES = [
    "Is there anything else I can help with?",
    "Have a nice day.",
    "Thank you for reading.",
    "I hope this helps.",
    "That is all.",
    "Let me know if you have other questions.",
]


@_family("closing_phrase", "Say what kind of thing an item is, ending with a fixed phrase.")
def _closing_phrase(rng: random.Random) -> Example:
    key, singular, _, pool = _category(rng)
    item = rng.choice(pool)
    phrase = rng.choice(_CLOSING_PHRASES)
    template = rng.choice(
        [
            'In one sentence, say what kind of thing "{x}" is. '
            'End your response with the exact phrase "{end}"',
            'Tell me in one sentence what "{x}" is, then finish your response with '
            'the exact phrase "{end}"',
        ]
    )
    if key == "country":
        sentence = f"{item} is a country."
    elif key == "color":
        sentence = f"{_capitalize_first(item)} is a color."
    else:
        sentence = f"{_capitalize_first(_with_article(item))} is {_with_article(singular)}."
    answer = f"{sentence} {phrase}"
    checks = [_v("ends_with", phrase=phrase), _v("contains_all", words=[item])]
    verifier = _v("all_of", checks=checks)
    return template.format(x=item, end=phrase), answer, verifier


# ---------------------------------------------------------------------------
# Public API


def describe_families() -> dict[str, str]:
    """One-line description of every registered task family, in registry order."""
    return {name: family.description for name, family in FAMILIES.items()}


def _resolve_families(families: Sequence[str] | None) -> list[str]:
    if families is None:
        return list(FAMILIES)
    if isinstance(families, str):
        families = [families]
    names = list(dict.fromkeys(families))
    if not names:
        raise ValueError("families must name at least one task family")
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(
            f"unknown task famil{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(repr(u) for u in unknown)}; known families: {', '.join(FAMILIES)}"
        )
    return names


def generate_examples(
    n: int,
    seed: int,
    families: Sequence[str] | None = None,
    *,
    max_tries: int = 1000,
) -> list[dict[str, Any]]:
    """Generate ``n`` examples with unique prompts, deterministically from ``seed``.

    Families are visited round-robin in the given (or registry) order, so every family
    appears once ``n`` reaches the number of families.  A family that cannot produce a
    new prompt within ``max_tries`` draws is dropped from the rotation; if all are
    dropped before ``n`` examples exist, ``ValueError`` is raised.

    Each record is ``{"id", "prompt", "answer", "task", "verifier"}`` and JSON-serialisable.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries!r}")
    active = _resolve_families(families)
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    position = 0
    while len(records) < n:
        if not active:
            wanted = ", ".join(_resolve_families(families))
            raise ValueError(
                f"could not generate {n} unique prompts from families [{wanted}]: "
                f"only {len(records)} distinct prompts found after {max_tries} tries per slot"
            )
        position %= len(active)
        name = active[position]
        family = FAMILIES[name]
        for _ in range(max_tries):
            prompt, answer, verifier = family.generate(rng)
            if prompt not in seen:
                break
        else:
            del active[position]
            continue
        if not verify(answer, verifier):
            raise RuntimeError(f"task family {name!r} produced an answer that fails its verifier")
        seen.add(prompt)
        records.append(
            {
                "id": f"{name}-{len(records)}",
                "prompt": prompt,
                "answer": answer,
                "task": name,
                "verifier": verifier,
            }
        )
        position += 1
    return records

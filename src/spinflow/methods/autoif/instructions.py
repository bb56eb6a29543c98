"""Verifiable instructions: an instruction, ``evaluate(response) -> bool`` functions that check it,
and test cases with the expected verdict (AutoIF, arXiv 2406.13542).

- :func:`load_library` reads a library file (the built-in seed library ``seeds.yaml``, or
  one of the same shape): an item that cannot be used is dropped with its id and the reason, and
  the rest go on: a function that does not parse, a case without a verdict, an instruction left
  with no function or too few cases, a malformed or duplicated item. Only a file that cannot be
  read as a list at all is an error.
- :func:`cross_validate` runs every function on its instruction's cases in the sandbox
  (:mod:`spinflow.sandbox`); a function is kept when its accuracy on the cases reaches a
  threshold, an instruction when it keeps enough functions.
- :func:`check_responses` runs an instruction's functions on responses: the execution feedback.

Functions are only ever compiled here (to find syntax errors), never run: running them is the
sandbox's job.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinflow.errors import DataError

SEED_LIBRARY = Path(__file__).with_name("seeds.yaml")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
ANY_GROUP = "*"

# why an item was dropped
MALFORMED = "malformed"  # not a mapping, a key missing or of the wrong type
DUPLICATE_ID = "duplicate_id"
FUNCTION_SYNTAX = "function_syntax"  # a function that does not compile
CASE_WITHOUT_VERDICT = "case_without_verdict"  # a case whose verdict is missing or not a bool
NO_FUNCTION = "no_function"  # an instruction left with no function that parses
TOO_FEW_CASES = "too_few_cases"
LOW_ACCURACY = "low_accuracy"  # a function whose accuracy on the cases is below the threshold
TOO_FEW_FUNCTIONS = "too_few_functions"  # an instruction that kept fewer functions than required


@dataclass(frozen=True)
class Case:
    response: str
    verdict: bool


@dataclass(frozen=True)
class Instruction:
    id: str
    text: str
    functions: tuple[str, ...]
    cases: tuple[Case, ...]
    group: str = ""
    conflicts: tuple[str, ...] = ()

    def compatible(self, other: Instruction) -> bool:
        """Whether the two can be given together in one query (different groups, no conflict)."""
        if self.id == other.id or (self.group and self.group == other.group):
            return False
        for a, b in ((self, other), (other, self)):
            if ANY_GROUP in a.conflicts or b.group in a.conflicts:
                return False
        return True

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "conflicts": list(self.conflicts),
            "instruction": self.text,
            "functions": list(self.functions),
            "cases": [{"response": c.response, "verdict": c.verdict} for c in self.cases],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Instruction:
        return cls(
            id=record["id"],
            text=record["instruction"],
            functions=tuple(record["functions"]),
            cases=tuple(Case(c["response"], c["verdict"]) for c in record["cases"]),
            group=record.get("group") or "",
            conflicts=tuple(record.get("conflicts") or ()),
        )


@dataclass(frozen=True)
class Drop:
    """One dropped item: ``id`` is the instruction's, with ``#f<j>`` for its j-th function or
    ``#c<j>`` for its j-th case (from 0)."""

    id: str
    reason: str
    detail: str

    def to_record(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}

    def line(self) -> str:
        return f"{self.id}: dropped ({self.reason}): {self.detail}"


def count_drops(drops: Sequence[Drop]) -> dict[str, int]:
    return dict(sorted(Counter(d.reason for d in drops).items()))


# ---------------------------------------------------------------------------------------------
# Loading a library file


def syntax_problem(source: str) -> str | None:
    """Why ``source`` does not compile (``line N: message``), or None. Nothing is run."""
    try:
        compile(source, "<function>", "exec", dont_inherit=True)
    except SyntaxError as exc:
        return f"line {exc.lineno}: {exc.msg}"
    except (ValueError, OverflowError) as exc:  # null bytes, absurd literals
        return str(exc)
    return None


def _item_lines(text: str) -> list[int]:
    """The line of each top-level item, for messages (empty when the file is not a list)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def _parse_item(item: Any, where: str, min_cases: int) -> tuple[Instruction | None, list[Drop]]:
    """One library item as an Instruction (None when it is dropped) and what was dropped."""
    if not isinstance(item, dict):
        return None, [
            Drop(where, MALFORMED, f"an item must be a mapping, not {type(item).__name__}")
        ]
    item_id = item.get("id")
    if not isinstance(item_id, str) or not ID_PATTERN.match(item_id):
        return None, [
            Drop(where, MALFORMED, f"'id' must be letters, digits, _ . - (got {item_id!r})")
        ]
    text = item.get("instruction")
    if not isinstance(text, str) or not text.strip():
        return None, [Drop(item_id, MALFORMED, "'instruction' must be non-empty text")]
    group = item.get("group", "")
    conflicts = item.get("conflicts", [])
    if not isinstance(group, str) or not (
        isinstance(conflicts, list) and all(isinstance(c, str) for c in conflicts)
    ):
        return None, [Drop(item_id, MALFORMED, "'group' must be text, 'conflicts' a list of text")]
    functions_raw, cases_raw = item.get("functions"), item.get("cases")
    if not isinstance(functions_raw, list) or not isinstance(cases_raw, list):
        return None, [Drop(item_id, MALFORMED, "'functions' and 'cases' must be lists")]
    unknown = sorted(set(item) - {"id", "instruction", "group", "conflicts", "functions", "cases"})
    if unknown:
        return None, [Drop(item_id, MALFORMED, f"unknown keys {unknown}")]
    drops: list[Drop] = []
    functions = []
    for j, source in enumerate(functions_raw):
        problem = (
            syntax_problem(source)
            if isinstance(source, str)
            else f"a function must be source text, not {type(source).__name__}"
        )
        if problem is None:
            functions.append(source)
        else:
            drops.append(Drop(f"{item_id}#f{j}", FUNCTION_SYNTAX, problem))
    cases = []
    for j, case in enumerate(cases_raw):
        verdict = case.get("verdict") if isinstance(case, dict) else None
        response = case.get("response") if isinstance(case, dict) else None
        if not isinstance(response, str):
            drops.append(Drop(f"{item_id}#c{j}", MALFORMED, "a case needs 'response' text"))
        elif not isinstance(verdict, bool):
            got = "no verdict" if verdict is None else f"verdict {verdict!r} is not true/false"
            drops.append(Drop(f"{item_id}#c{j}", CASE_WITHOUT_VERDICT, got))
        else:
            cases.append(Case(response, verdict))
    if not functions:
        drops.append(
            Drop(item_id, NO_FUNCTION, f"none of its {len(functions_raw)} functions parses")
        )
        return None, drops
    if len(cases) < min_cases:
        drops.append(
            Drop(item_id, TOO_FEW_CASES, f"{len(cases)} usable cases, fewer than {min_cases}")
        )
        return None, drops
    instruction = Instruction(
        item_id, text.strip(), tuple(functions), tuple(cases), group, tuple(conflicts)
    )
    return instruction, drops


@dataclass
class Library:
    """What :func:`load_library` read: the usable instructions and every dropped item."""

    instructions: list[Instruction]
    drops: list[Drop]
    items: int  # items in the file
    functions: int  # functions in the file
    cases: int  # cases in the file

    def summary(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "functions_in_file": self.functions,
            "cases_in_file": self.cases,
            "instructions_kept": len(self.instructions),
            "functions_kept": sum(len(i.functions) for i in self.instructions),
            "cases_kept": sum(len(i.cases) for i in self.instructions),
            "dropped": count_drops(self.drops),
        }

    def merge(self, other: Library) -> Library:
        """Both libraries; an instruction of ``other`` whose id is taken is dropped."""
        taken = {i.id for i in self.instructions}
        clashes = [i for i in other.instructions if i.id in taken]
        return Library(
            self.instructions + [i for i in other.instructions if i.id not in taken],
            self.drops
            + other.drops
            + [Drop(i.id, DUPLICATE_ID, "id already used by the first library") for i in clashes],
            self.items + other.items,
            self.functions + other.functions,
            self.cases + other.cases,
        )


def load_library(path: str | Path = SEED_LIBRARY, *, min_cases: int = 3) -> Library:
    """Every usable instruction of a library file, and every dropped item with its reason.

    Raises :class:`DataError` (one line naming the file) only when the file cannot be read as a
    YAML list.
    """
    from spinflow.config import parse_yaml
    from spinflow.errors import ConfigError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: instruction library not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    try:
        raw = parse_yaml(text, path)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    if not isinstance(raw, list):
        raise DataError(
            f"{path}: an instruction library must be a YAML list of instructions, "
            f"got {type(raw).__name__}"
        )
    lines = _item_lines(text)
    instructions: list[Instruction] = []
    drops: list[Drop] = []
    seen: dict[str, int] = {}
    functions = cases = 0
    for index, item in enumerate(raw):
        line = lines[index] if index < len(lines) else index + 1
        where = f"{path.name}:{line}"
        if isinstance(item, dict):
            functions += len(item["functions"]) if isinstance(item.get("functions"), list) else 0
            cases += len(item["cases"]) if isinstance(item.get("cases"), list) else 0
        instruction, problems = _parse_item(item, where, min_cases)
        drops.extend(problems)
        if instruction is None:
            continue
        if instruction.id in seen:
            drops.append(
                Drop(
                    instruction.id,
                    DUPLICATE_ID,
                    f"{where}: id already used on line {seen[instruction.id]}",
                )
            )
            continue
        seen[instruction.id] = line
        instructions.append(instruction)
    return Library(instructions, drops, len(raw), functions, cases)


# ---------------------------------------------------------------------------------------------
# Running functions in the sandbox


@dataclass
class SandboxCounter:
    """Calls run in the sandbox, the seconds they took (for calls per second), their errors by
    kind, and the sandbox's active layers (set by whoever opens the sandbox)."""

    calls: int = 0
    seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)
    layers: list[str] = field(default_factory=list)  # the sandbox's active layers

    def run(self, sandbox, calls: list) -> list:
        started = time.perf_counter()
        results = sandbox.run(calls)
        self.seconds += time.perf_counter() - started
        self.calls += len(calls)
        for result in results:
            if result.kind is not None:
                self.errors[result.kind.value] += 1
        return results

    def summary(self) -> dict[str, Any]:
        return {
            "sandbox_calls": self.calls,
            "sandbox_seconds": round(self.seconds, 3),
            "sandbox_calls_per_second": round(self.calls / self.seconds, 1)
            if self.seconds
            else 0.0,
            "sandbox_errors": dict(sorted(self.errors.items())),
            "sandbox_layers": ",".join(self.layers),
            "sandbox_layer_count": len(self.layers),
        }


@dataclass(frozen=True)
class FunctionAccuracy:
    instruction: str
    index: int
    accuracy: float
    errors: int


def cross_validate(
    instructions: Sequence[Instruction],
    sandbox,
    *,
    min_accuracy: float,
    min_functions: int,
    counter: SandboxCounter | None = None,
) -> tuple[list[Instruction], list[Drop], list[FunctionAccuracy]]:
    """Each instruction with only the functions whose accuracy on its cases reaches
    ``min_accuracy`` (an error counts as a wrong verdict); instructions keeping fewer than
    ``min_functions`` functions are dropped. One sandbox batch for all calls."""
    from spinflow.sandbox import Call

    counter = counter or SandboxCounter()
    calls, owners = [], []
    for i, instruction in enumerate(instructions):
        for j, source in enumerate(instruction.functions):
            for case in instruction.cases:
                calls.append(Call(source, case.response))
                owners.append((i, j, case.verdict))
    results = counter.run(sandbox, calls)
    right: Counter = Counter()
    errors: Counter = Counter()
    for (i, j, verdict), result in zip(owners, results, strict=True):
        right[i, j] += result.passed == verdict and result.kind is None
        errors[i, j] += result.kind is not None
    kept: list[Instruction] = []
    drops: list[Drop] = []
    accuracies: list[FunctionAccuracy] = []
    for i, instruction in enumerate(instructions):
        functions = []
        for j, source in enumerate(instruction.functions):
            accuracy = right[i, j] / len(instruction.cases)
            accuracies.append(FunctionAccuracy(instruction.id, j, accuracy, errors[i, j]))
            if accuracy + 1e-12 >= min_accuracy:
                functions.append(source)
            else:
                detail = (
                    f"accuracy {accuracy:.2f} on {len(instruction.cases)} cases < {min_accuracy:g}"
                )
                if errors[i, j]:
                    detail += f" ({errors[i, j]} calls raised or were refused)"
                drops.append(Drop(f"{instruction.id}#f{j}", LOW_ACCURACY, detail))
        if len(functions) < min_functions:
            drops.append(
                Drop(
                    instruction.id,
                    TOO_FEW_FUNCTIONS,
                    f"{len(functions)} of {len(instruction.functions)} functions kept, "
                    f"fewer than {min_functions}",
                )
            )
            continue
        kept.append(
            Instruction(
                instruction.id,
                instruction.text,
                tuple(functions),
                instruction.cases,
                instruction.group,
                instruction.conflicts,
            )
        )
    return kept, drops, accuracies


def check_responses(
    checks: Sequence[tuple[Instruction, str]], sandbox, counter: SandboxCounter | None = None
) -> list[list[bool]]:
    """For each (instruction, response): whether each of the instruction's functions passes it
    (an error is a fail). One sandbox batch for all calls."""
    from spinflow.sandbox import Call

    counter = counter or SandboxCounter()
    calls = [Call(source, response) for ins, response in checks for source in ins.functions]
    results = iter(counter.run(sandbox, calls))
    return [[next(results).passed for _ in ins.functions] for ins, _ in checks]

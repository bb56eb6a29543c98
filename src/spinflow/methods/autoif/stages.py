"""AutoIF (arXiv 2406.13542): instruction following learned from execution feedback.

Stages (``autoif.enabled``):

- ``autoif_instructions``: the instruction library (``autoif.seeds``; built in: 49 verifiable
  instructions, each with ``evaluate(response)`` functions and test cases). Items that cannot be
  used are dropped with their id and reason (autoif/instructions/drops.jsonl);
- ``autoif_verify``: every function run on its instruction's cases in the sandbox; functions
  below ``autoif.min_function_accuracy`` are dropped, then instructions keeping fewer than
  ``autoif.min_functions``;
- ``autoif_queries``: ``autoif.heldout`` instructions are set aside for evaluation (seeded); the
  others are attached to SFT prompts (``autoif.queries`` training queries), the held-out ones,
  up to ``autoif.eval_instructions_per_query`` compatible ones together, to test prompts;
- ``autoif_sample_iter_k``: θk samples ``autoif.samples`` responses per training query; each is
  scored by the share of its instruction's functions it passes. Responses passing all are the
  SFT data (sft.jsonl); pairs are a response passing at least ``autoif.chosen_min`` (chosen)
  against one passing none (rejected), at most ``autoif.pairs_per_query`` per query;
- ``autoif_train_iter_k``: DPO against θk (the SPIN trainer and loss, chosen in place of the
  real answer, rejected in place of the generated one) makes the AutoIF θk+1: iterations k = 0,
  1, … are the paper's online DPO;
- ``eval_autoif_*``: θ0 and every AutoIF model answer the evaluation queries greedily;
  instruction-level strict accuracy is the share of (query, instruction) followed (every
  function of the instruction passes), prompt-level strict the share of queries whose every
  instruction is followed.

Combined with SPIN (``autoif.with_spin``) the AutoIF chain is the SPIN chain: there is no
``autoif_train_iter_k``; ``autoif_sample_iter_k`` samples from SPIN's θk, SPIN's
``generate_iter_k`` also answers θ0's verified queries (:func:`spin_pool_records`, checked by
:func:`check_generated`) and ``train_iter_k`` also trains on the pairs of ``autoif_sample_iter_k``
(:func:`spin_training_pairs`); ``eval_autoif_iter_k`` evaluates SPIN's θk+1.

A stage fails only when nothing survives its filter, with one line saying so.
"""

from __future__ import annotations

import logging
import math
import random
import re
import shutil
from pathlib import Path
from typing import Any

from spinflow.config import Params
from spinflow.errors import DataError, SpinflowError
from spinflow.graph import build
from spinflow.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from spinflow.methods.autoif.graph import (
    AUTOIF,
    AUTOIF_INSTRUCTIONS,
    AUTOIF_QUERIES,
    AUTOIF_SEED_LIBRARY,
    AUTOIF_SUPERVISED,
    AUTOIF_VERIFIED,
    autoif_samples_dir,
)
from spinflow.methods.autoif.instructions import (
    SEED_LIBRARY,
    Drop,
    Instruction,
    SandboxCounter,
    check_responses,
    count_drops,
    cross_validate,
    load_library,
)
from spinflow.nodes import DATA_DIR, Model, train_metrics
from spinflow.provenance import PROVENANCE_FILE, provenance
from spinflow.recipes.common import require
from spinflow.seeds import derive_seed, stage_seed

log = logging.getLogger(__name__)

INSTRUCTIONS_FILE = "instructions.jsonl"
DROPS_FILE = "drops.jsonl"
TRAIN_QUERIES, EVAL_QUERIES = "train.jsonl", "eval.jsonl"
TRAIN_INSTRUCTIONS, EVAL_INSTRUCTIONS = "train_instructions.jsonl", "eval_instructions.jsonl"
SAMPLES, SFT_DATA, PAIRS = "samples.jsonl", "sft.jsonl", "pairs.jsonl"
QUERY_SCORES = "scores.jsonl"
SUPERVISED_FILE = "instructions.yaml"


def _sandbox(params: Params, counter: SandboxCounter):
    """The sandbox for model-written code. Refused, in one line, when no layer keeps that code
    from the user's files, unless ``autoif.allow_weak_sandbox``; its active layers are logged and
    kept in ``counter`` (the stage's metrics and provenance)."""
    from spinflow.sandbox import Sandbox, confinement_problem

    sandbox = Sandbox(
        call_timeout=params.autoif.call_timeout, workers=params.autoif.sandbox_workers
    )
    try:
        layers = sandbox.layers()
        active = [layer.name for layer in layers if layer.active]
        problem = confinement_problem(layers)
        if problem and not params.autoif.allow_weak_sandbox:
            raise SpinflowError(
                f"refusing to run model-written code: {problem}; or set "
                f"autoif.allow_weak_sandbox: true to run it with {', '.join(active)} only"
            )
    except BaseException:
        sandbox.close()
        raise
    if problem:
        log.warning(
            "running model-written code in a weak sandbox (autoif.allow_weak_sandbox): %s", problem
        )
    inactive = [f"{layer.name} ({layer.detail})" for layer in layers if not layer.active]
    log.info(
        "sandbox layers: %s%s",
        ", ".join(active),
        f"; inactive: {', '.join(inactive)}" if inactive else "",
    )
    counter.layers = active
    return sandbox


def _read_instructions(path: Path) -> list[Instruction]:
    return [Instruction.from_record(r) for r in read_jsonl(path, ("id", "instruction"))]


def _report_drops(stage: str, drops: list[Drop]) -> None:
    for drop in drops:
        log.warning("%s: %s", stage, drop.line())


def _write_instruction_dir(
    directory: Path, kept: list[Instruction], drops: list[Drop], made_by: dict
) -> None:
    with atomic_path(directory, directory=True) as tmp:
        write_jsonl(tmp / INSTRUCTIONS_FILE, [i.to_record() for i in kept])
        write_jsonl(tmp / DROPS_FILE, [d.to_record() for d in drops])
        write_json(tmp / PROVENANCE_FILE, made_by)


# ---------------------------------------------------------------------------------------------
# Instructions and their verification


def seeds_path(params: Params) -> Path:
    """``autoif.seeds``; builtin: the seed library as the pipeline's dependency (relative to
    the project root), or the installed package's copy outside a project."""
    if params.autoif.seeds != "builtin":
        return Path(params.autoif.seeds)
    local = Path(AUTOIF_SEED_LIBRARY)
    return local if local.is_file() else SEED_LIBRARY


def autoif_instructions(params: Params) -> dict[str, Any]:
    """The instruction library, its unusable items dropped: autoif/instructions/."""
    source = seeds_path(params)
    library = load_library(source, min_cases=params.autoif.min_cases)
    inputs = {"seeds": source}
    if params.autoif.supervisor is not None:
        graph = build(params)
        written = require(graph, AUTOIF_SUPERVISED / SUPERVISED_FILE)
        library = library.merge(load_library(written, min_cases=params.autoif.min_cases))
        inputs["supervised"] = written
    _report_drops("autoif_instructions", library.drops)
    if not library.instructions:
        raise DataError(
            f"autoif_instructions: no usable instruction in {source} "
            f"({len(library.drops)} items dropped: {count_drops(library.drops)})"
        )
    made_by = provenance(
        "autoif_instructions",
        {
            "seeds": params.autoif.seeds,
            "supervisor": params.autoif.supervisor,
            "min_cases": params.autoif.min_cases,
        },
        inputs,
    )
    _write_instruction_dir(AUTOIF_INSTRUCTIONS, library.instructions, library.drops, made_by)
    summary = library.summary()
    write_json(train_metrics("autoif_instructions"), summary)
    return summary


def autoif_verify(params: Params) -> dict[str, Any]:
    """Functions cross-validated on their cases in the sandbox: autoif/verified/."""
    graph = build(params)
    source = require(graph, AUTOIF_INSTRUCTIONS / INSTRUCTIONS_FILE)
    instructions = _read_instructions(source)
    a = params.autoif
    counter = SandboxCounter()
    with _sandbox(params, counter) as sandbox:
        kept, drops, accuracies = cross_validate(
            instructions,
            sandbox,
            min_accuracy=a.min_function_accuracy,
            min_functions=a.min_functions,
            counter=counter,
        )
    _report_drops("autoif_verify", drops)
    if not kept:
        raise SpinflowError(
            f"autoif_verify: no instruction kept {a.min_functions} function(s) with accuracy "
            f"≥ {a.min_function_accuracy:g} on its cases ({len(instructions)} checked: "
            f"{count_drops(drops)})"
        )
    settings = {
        k: getattr(a, k) for k in ("min_function_accuracy", "min_functions", "call_timeout")
    }
    made_by = provenance(
        "autoif_verify", {**settings, "sandbox_layers": counter.layers}, {"instructions": source}
    )
    _write_instruction_dir(AUTOIF_VERIFIED, kept, drops, made_by)
    summary = {
        "instructions_checked": len(instructions),
        "functions_checked": len(accuracies),
        "instructions_kept": len(kept),
        "functions_kept": sum(len(i.functions) for i in kept),
        "mean_function_accuracy": round(sum(x.accuracy for x in accuracies) / len(accuracies), 4),
        "dropped": count_drops(drops),
        **counter.summary(),
    }
    write_json(train_metrics("autoif_verify"), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# The supervision model

SELF_INSTRUCT_PROMPT = (
    "You write instructions that constrain the form of a response, not its content or style, "
    "such that a short Python function can check whether a response follows them. Examples of "
    "such instructions:\n{examples}\nWrite {count} new instructions of this kind, different from "
    "the examples. Do not write instructions about tone, metaphors or translation. Give one "
    'instruction per line, each line starting with "- ".'
)
FUNCTION_PROMPT = (
    "Write a Python function named `evaluate` that takes a string `response` and returns True "
    "if the response strictly follows the instruction below, and False otherwise. Also write "
    "three test cases: a response and whether it follows the instruction.\n"
    "Instruction: {instruction}\n"
    "Answer with a single JSON object and nothing else, in this format:\n"
    '{{"func": "def evaluate(response):\\n    ...", "cases": [{{"input": "...", "output": true}}, '
    '{{"input": "...", "output": false}}, {{"input": "...", "output": true}}]}}'
)
UNPARSEABLE = "unparseable_supervisor_output"


def parse_instruction_lines(text: str) -> list[str]:
    """The instructions of a self-instruct answer: its lines starting with "- "."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- ") and len(line) > 6:
            found.append(line[2:].strip())
    return found


def parse_function_answer(text: str) -> tuple[str, list[dict]]:
    """(function source, cases in the library's shape) from a supervisor answer holding one JSON
    object with "func" and "cases"; ValueError saying why when it does not."""
    import json

    start = text.find("{")
    if start == -1:
        raise ValueError("no JSON object in the answer")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("func"), str):
        raise ValueError('the JSON object has no "func" text')
    cases = obj.get("cases")
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise ValueError('the JSON object has no "cases" list of objects')
    verdicts = {"true": True, "false": False}
    converted = []
    for case in cases:
        output = case.get("output")
        if isinstance(output, str):
            output = verdicts.get(output.strip().lower(), output)
        converted.append({"response": case.get("input"), "verdict": output})
    return obj["func"], converted


def self_instruct_requests(params: Params, seeds: list[Instruction]) -> list[dict]:
    """The ``autoif.supervisor_rounds`` self-instruct prompts: each shows up to 8 seed
    instructions (drawn by seed) and asks for new ones."""
    a = params.autoif
    rng = random.Random(derive_seed(params.seed, "autoif_supervise"))
    count = max(1, math.ceil(a.supervisor_instructions / a.supervisor_rounds))
    return [
        {
            "id": f"self-instruct-{r}",
            "prompt": SELF_INSTRUCT_PROMPT.format(
                examples="\n".join(f"- {i.text}" for i in rng.sample(seeds, min(8, len(seeds)))),
                count=count,
            ),
        }
        for r in range(a.supervisor_rounds)
    ]


def function_requests(instructions: list[str], attempts: int) -> list[dict]:
    """``attempts`` prompts per new instruction, each asking for a function with cases."""
    return [
        {"id": f"sup_{i:04d}#r{j}", "prompt": FUNCTION_PROMPT.format(instruction=text), "at": i}
        for i, text in enumerate(instructions)
        for j in range(attempts)
    ]


def _new_instructions(a, seeds, rounds: list[dict], answers: list[str], drops: list[Drop]):
    """The instructions the self-instruct answers propose that no seed (or earlier answer) has,
    at most ``autoif.supervisor_instructions``; an answer with no "- " line is dropped."""
    known = {i.text.lower() for i in seeds}
    new: list[str] = []
    for record, text in zip(rounds, answers, strict=True):
        lines = parse_instruction_lines(text)
        if not lines:
            drops.append(Drop(record["id"], UNPARSEABLE, 'no line starting with "- "'))
        for line in lines:
            if line.lower() not in known and len(new) < a.supervisor_instructions:
                known.add(line.lower())
                new.append(line)
    return new


def autoif_supervise(params: Params) -> dict[str, Any]:
    """New instructions, functions and cases written by ``autoif.supervisor``: self-instruct
    from the seeds, then a function with cases per new instruction, as the paper prompts.
    Writes autoif/supervised/instructions.yaml (the library's shape; autoif_instructions checks
    it like the seeds) and every answer that could not be parsed, with its id."""
    import yaml

    a = params.autoif
    stage = "autoif_supervise"
    model_dir = Path(a.supervisor)
    seeds = load_library(seeds_path(params), min_cases=a.min_cases).instructions
    if not seeds:
        raise DataError(f"{stage}: no usable seed instruction in {seeds_path(params)}")
    rounds = self_instruct_requests(params, seeds)
    sampling = {"temperature": a.temperature, "max_new_tokens": a.supervisor_max_new_tokens}
    drops: list[Drop] = []
    # one load of the supervisor for both rounds of questions
    with _Answering(params, model_dir, greedy=a.temperature == 0) as answer:
        answers, stats = answer(rounds, stage=stage, **sampling)
        new = _new_instructions(a, seeds, rounds, answers, drops)
        requests = function_requests(new, a.supervisor_attempts)
        written = answer(requests, stage=stage, **sampling)[0] if requests else []
    items = [
        {"id": f"sup_{i:04d}", "group": f"sup_{i:04d}", "instruction": text}
        | {"functions": [], "cases": []}
        for i, text in enumerate(new)
    ]
    for request, text in zip(requests, written, strict=True):
        try:
            source, cases = parse_function_answer(text)
        except ValueError as exc:
            drops.append(Drop(request["id"], UNPARSEABLE, str(exc)))
            continue
        items[request["at"]]["functions"].append(source)
        items[request["at"]]["cases"].extend(cases)
    _report_drops(stage, drops)
    settings = {
        "seeds",
        "supervisor_rounds",
        "supervisor_instructions",
        "supervisor_attempts",
        "supervisor_max_new_tokens",
        "temperature",
        "top_p",
    }
    with atomic_path(AUTOIF_SUPERVISED, directory=True) as tmp:
        (tmp / SUPERVISED_FILE).write_text(
            yaml.safe_dump(items, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        write_jsonl(tmp / DROPS_FILE, [d.to_record() for d in drops])
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                stage,
                {
                    "autoif": a.model_dump(include=settings),
                    "engine": params.generate.engine,
                    "seed": params.seed,
                },
                {"supervisor": model_dir, "seeds": seeds_path(params)},
            ),
        )
    summary = {
        "self_instruct_answers": len(rounds),
        "instructions_written": len(new),
        "function_answers": len(requests),
        "functions_parsed": sum(len(i["functions"]) for i in items),
        "dropped": count_drops(drops),
        "self_instruct_tokens": stats.new_tokens,
    }
    write_json(train_metrics(stage), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Queries


def split_heldout(
    instructions: list[Instruction], heldout: int, seed: int
) -> tuple[list[Instruction], list[Instruction]]:
    """(training, held-out): ``heldout`` instructions drawn by seed, each list in id order."""
    if heldout >= len(instructions):
        raise SpinflowError(
            f"autoif_queries: {len(instructions)} instructions survived verification, not more "
            f"than autoif.heldout ({heldout}); lower autoif.heldout so some are left to train on"
        )
    ids = sorted(i.id for i in instructions)
    chosen = set(random.Random(derive_seed(seed, "autoif_heldout")).sample(ids, heldout))
    ordered = sorted(instructions, key=lambda i: i.id)
    return [i for i in ordered if i.id not in chosen], [i for i in ordered if i.id in chosen]


def attach(prompt: str, instructions: list[Instruction]) -> str:
    """The query: the prompt, then the instructions, as the paper concatenates them."""
    return prompt.rstrip() + "\n\n" + " ".join(i.text for i in instructions)


def make_queries(
    prompts: list[dict],
    instructions: list[Instruction],
    count: int,
    per_query: int,
    rng: random.Random,
    prefix: str,
) -> list[dict]:
    """``count`` queries: prompts drawn in a seeded order (cycling), the instructions cycled
    through a seeded order so each is used about equally; each query takes 1..``per_query``
    mutually compatible instructions."""
    if not prompts:
        raise SpinflowError(f"autoif_queries: no prompts to attach {prefix} instructions to")
    prompt_order = rng.sample(range(len(prompts)), len(prompts))
    order = rng.sample(instructions, len(instructions))
    queries = []
    for q in range(count):
        first = order[q % len(order)]
        chosen = [first]
        wanted = rng.randint(1, per_query)
        for candidate in rng.sample(instructions, len(instructions)):
            if len(chosen) >= wanted:
                break
            if all(candidate.compatible(c) for c in chosen):
                chosen.append(candidate)
        record = prompts[prompt_order[q % len(prompts)]]
        queries.append(
            {
                "id": f"{prefix}-{q:04d}",
                "source_id": record["id"],
                "prompt": attach(record["prompt"], chosen),
                "instructions": [c.id for c in chosen],
            }
        )
    return queries


QUERY_SCORE_PROMPT = (
    "Rate from 1 to 10 how well the query below can be answered while following the "
    "instruction after it: 10 when a good answer to the query can follow the instruction fully, "
    "1 when the instruction makes no sense for the query or contradicts it.\n"
    "Query: {query}\nInstruction: {instruction}\n"
    'Answer with "Score: " and the number only.'
)
LOW_QUERY_SCORE = "low_query_score"
UNPARSEABLE_SCORE = "unparseable_query_score"
_SCORE = re.compile(r"score\s*[:=]?\s*(10|[1-9])(?![0-9])", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![0-9.])(10|[1-9])(?![0-9.])")


def query_scoring(params: Params) -> str | None:
    """Why the supervisor does not score the training queries, or None when it does."""
    if params.autoif.query_min_score is None:
        return "autoif.query_min_score is null"
    if params.autoif.supervisor is None:
        return "no autoif.supervisor to rate them"
    return None


def query_score_request(query_id: str, prompt: str, instruction: str) -> dict:
    """The prompt asking the supervisor to rate a training query (its SFT prompt, then its
    instruction) on 1-10."""
    return {
        "id": query_id,
        "prompt": QUERY_SCORE_PROMPT.format(query=prompt.strip(), instruction=instruction),
    }


def parse_query_score(text: str) -> int:
    """The 1-10 rating of a supervisor answer: the number after "Score", else the first whole
    number from 1 to 10; ValueError when there is none."""
    found = _SCORE.search(text) or _NUMBER.search(text)
    if found is None:
        raise ValueError("no score from 1 to 10 in the answer")
    return int(found.group(1))


def score_queries(
    params: Params, queries: list[dict], prompts: dict[str, str], texts: dict[str, str]
) -> tuple[list[dict], list[Drop], list[dict]]:
    """(kept queries, drops, every rating) of the training queries the supervisor rates, greedily,
    at least ``autoif.query_min_score``; ``prompts`` and ``texts`` map source and instruction ids
    to their text."""
    threshold = params.autoif.query_min_score
    requests = [
        query_score_request(
            q["id"], prompts[q["source_id"]], " ".join(texts[i] for i in q["instructions"])
        )
        for q in queries
    ]
    answers, _ = _answer(
        params,
        Path(params.autoif.supervisor),
        requests,
        temperature=0.0,
        stage="autoif_queries",
        max_new_tokens=8,
    )
    kept, drops, ratings = [], [], []
    for query, text in zip(queries, answers, strict=True):
        try:
            score = parse_query_score(text)
        except ValueError as exc:
            drops.append(Drop(query["id"], UNPARSEABLE_SCORE, f"{exc}: {text[:60]!r}"))
            ratings.append({"id": query["id"], "score": None, "answer": text})
            continue
        ratings.append({"id": query["id"], "score": score, "answer": text})
        if score >= threshold:
            kept.append(query)
        else:
            drops.append(Drop(query["id"], LOW_QUERY_SCORE, f"rated {score} < {threshold}"))
    return kept, drops, ratings


def autoif_queries(params: Params) -> dict[str, Any]:
    """Training queries (SFT prompts, training instructions) and evaluation queries (test
    prompts, held-out instructions): autoif/queries/. With ``autoif.supervisor`` and
    ``autoif.query_min_score`` the supervisor rates each training query and those rated below
    are dropped (autoif/queries/drops.jsonl)."""
    from spinflow.data import load_split

    graph = build(params)
    source = require(graph, AUTOIF_VERIFIED / INSTRUCTIONS_FILE)
    a = params.autoif
    train_set, heldout = split_heldout(_read_instructions(source), a.heldout, params.seed)
    rng = random.Random(derive_seed(params.seed, "autoif_queries"))
    sft_prompts = load_split(DATA_DIR, "sft")
    train = make_queries(sft_prompts, train_set, a.queries, 1, rng, "autoif-train")
    evaluation = make_queries(
        load_split(DATA_DIR, "test"),
        heldout,
        a.eval_queries,
        a.eval_instructions_per_query,
        rng,
        "autoif-eval",
    )
    made = len(train)
    drops: list[Drop] = []
    ratings: list[dict] = []
    skipped = query_scoring(params)
    if skipped is None:
        train, drops, ratings = score_queries(
            params,
            train,
            {r["id"]: r["prompt"] for r in sft_prompts},
            {i.id: i.text for i in train_set},
        )
        _report_drops("autoif_queries", drops)
        if not train:
            raise SpinflowError(
                f"autoif_queries: the supervisor rated no training query ≥ "
                f"{a.query_min_score} ({made} rated: {count_drops(drops)}); lower "
                "autoif.query_min_score or set it to null"
            )
    else:
        log.info("autoif_queries: queries not scored: %s", skipped)
    with atomic_path(AUTOIF_QUERIES, directory=True) as tmp:
        write_jsonl(tmp / TRAIN_QUERIES, train)
        write_jsonl(tmp / DROPS_FILE, [d.to_record() for d in drops])
        write_jsonl(tmp / QUERY_SCORES, ratings)
        write_jsonl(tmp / EVAL_QUERIES, evaluation)
        write_jsonl(tmp / TRAIN_INSTRUCTIONS, [i.to_record() for i in train_set])
        write_jsonl(tmp / EVAL_INSTRUCTIONS, [i.to_record() for i in heldout])
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                "autoif_queries",
                {
                    "heldout": a.heldout,
                    "queries": a.queries,
                    "eval_queries": a.eval_queries,
                    "eval_instructions_per_query": a.eval_instructions_per_query,
                    "seed": params.seed,
                    **(
                        {"query_min_score": a.query_min_score, "engine": params.generate.engine}
                        if skipped is None
                        else {}
                    ),
                },
                {
                    "instructions": source,
                    "sft": DATA_DIR / "sft.jsonl",
                    "test": DATA_DIR / "test.jsonl",
                    **({"supervisor": Path(a.supervisor)} if skipped is None else {}),
                },
            ),
        )
    summary = {
        "train_instructions": len(train_set),
        "heldout_instructions": len(heldout),
        "query_scoring": "on" if skipped is None else f"off: {skipped}",
        "train_queries_made": made,
        "train_queries_dropped": count_drops(drops),
        "train_queries": len(train),
        "eval_queries": len(evaluation),
        "eval_instructions": sum(len(q["instructions"]) for q in evaluation),
    }
    write_json(train_metrics("autoif_queries"), summary)
    return summary


def _queries(graph, which: str) -> tuple[list[dict], dict[str, Instruction]]:
    queries_file, instructions_file = {
        "train": (TRAIN_QUERIES, TRAIN_INSTRUCTIONS),
        "eval": (EVAL_QUERIES, EVAL_INSTRUCTIONS),
    }[which]
    queries = read_jsonl(require(graph, AUTOIF_QUERIES / queries_file), ("id", "prompt"))
    by_id = {i.id: i for i in _read_instructions(AUTOIF_QUERIES / instructions_file)}
    return queries, by_id


# ---------------------------------------------------------------------------------------------
# Sampling with execution feedback


def make_pairs(scored: list[dict], chosen_min: float, limit: int) -> list[dict]:
    """Pairs of one query's scored samples: chosen (score ≥ ``chosen_min``, best first) against
    rejected (score 0), the first ⌈√limit⌉ of each crossed, at most ``limit``."""
    chosen = sorted(
        (s for s in scored if s["score"] >= chosen_min and s["score"] > 0),
        key=lambda s: (-s["score"], s["sample"]),
    )
    rejected = [s for s in scored if s["score"] == 0]
    side = math.ceil(math.sqrt(limit))
    pairs = []
    for c in chosen[:side]:
        for r in rejected[:side]:
            if len(pairs) < limit:
                pairs.append(
                    {
                        "id": f"{c['query']}/{c['sample']}-{r['sample']}",
                        "prompt": c["prompt"],
                        "chosen": c["response"],
                        "rejected": r["response"],
                        "chosen_score": c["score"],
                    }
                )
    return pairs


class _Answering:
    """The model at ``model_dir`` and one generation engine over it, loaded once for every
    answer call of a stage and released when the ``with`` block ends (before another model
    loads). ``greedy``: the engine's batch is ``eval.batch_size``, else ``generate.batch_size``."""

    def __init__(self, params: Params, model_dir: Path, *, greedy: bool):
        self.params, self.model_dir, self.greedy = params, model_dir, greedy

    def __enter__(self):
        from spinflow.devices import stage_device
        from spinflow.engines import check_engine, open_engine
        from spinflow.models import load_model, load_tokenizer

        params = self.params
        check_engine(params.generate.engine)
        self.tokenizer = load_tokenizer(self.model_dir)
        device = stage_device(params.device)
        model = (
            load_model(self.model_dir, device=device) if params.generate.engine != "vllm" else None
        )
        self.engine = open_engine(
            params.generate,
            model,
            self.tokenizer,
            model_dir=self.model_dir,
            batch_size=params.eval.batch_size if self.greedy else None,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.engine.close()

    def __call__(
        self,
        records: list[dict],
        *,
        temperature: float,
        stage: str,
        max_new_tokens: int | None = None,
    ):
        """Answers to ``records`` (``autoif.max_new_tokens`` unless given) and their stats."""
        from spinflow.generation import GenerationStats, SamplingParams, generate_answers

        params = self.params
        stats = GenerationStats()
        completions = generate_answers(
            self.engine,
            self.tokenizer,
            records,
            sampling=SamplingParams(
                temperature, params.autoif.top_p, max_new_tokens or params.autoif.max_new_tokens
            ),
            seed=stage_seed(params.seed, stage),
            system_prompt=params.prompt.system_prompt,
            max_prompt_length=params.prompt.max_prompt_length,
            desc=stage,
            stats=stats,
        )
        return [c.text for c in completions], stats


def _answer(
    params: Params,
    model_dir: Path,
    records: list[dict],
    *,
    temperature: float,
    stage: str,
    max_new_tokens: int | None = None,
):
    """Answers of the model at ``model_dir`` to ``records``, in one load of it."""
    with _Answering(params, model_dir, greedy=temperature == 0) as answer:
        return answer(records, temperature=temperature, stage=stage, max_new_tokens=max_new_tokens)


def _model_k(graph, k: int):
    """θk of the AutoIF chain: θ0 of the pipeline, then the AutoIF models (SPIN's θk when
    combined with SPIN)."""
    if k == 0 or graph.params.autoif.with_spin:
        return graph.theta(k)
    return graph.model(f"{AUTOIF}_theta_{k}")


def autoif_sample(params: Params, k: int) -> dict[str, Any]:
    """θk's samples scored by execution feedback, the SFT data and the DPO pairs: autoif/iter_k/."""
    graph = build(params)
    stage = f"autoif_sample_iter_{k}"
    a = params.autoif
    source = require(graph, _model_k(graph, k).path)
    queries, instructions = _queries(graph, "train")
    records = [
        {"id": f"{q['id']}/s{j}", "prompt": q["prompt"], "query": q, "sample": j}
        for q in queries
        for j in range(a.samples)
    ]
    responses, stats = _answer(params, source, records, temperature=a.temperature, stage=stage)
    checks = [
        (instructions[r["query"]["instructions"][0]], text)
        for r, text in zip(records, responses, strict=True)
    ]
    counter = SandboxCounter()
    with _sandbox(params, counter) as sandbox:
        passes = check_responses(checks, sandbox, counter)
    scored = [
        {
            "query": r["query"]["id"],
            "sample": r["sample"],
            "instruction": r["query"]["instructions"][0],
            "prompt": r["prompt"],
            "response": text,
            "passes": passed,
            "score": sum(passed) / len(passed),
        }
        for r, text, passed in zip(records, responses, passes, strict=True)
    ]
    pairs: list[dict] = []
    for start in range(0, len(scored), a.samples):
        pairs.extend(make_pairs(scored[start : start + a.samples], a.chosen_min, a.pairs_per_query))
    sft = [
        {
            "id": f"{s['query']}/s{s['sample']}",
            "query": s["query"],
            "instruction": s["instruction"],
            "prompt": s["prompt"],
            "answer": s["response"],
        }
        for s in scored
        if all(s["passes"])
    ]
    out = autoif_samples_dir(k)
    with atomic_path(out, directory=True) as tmp:
        write_jsonl(tmp / SAMPLES, scored)
        write_jsonl(tmp / SFT_DATA, sft)
        write_jsonl(tmp / PAIRS, pairs)
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                stage,
                {
                    "autoif": a.model_dump(
                        include={
                            "samples",
                            "temperature",
                            "top_p",
                            "max_new_tokens",
                            "chosen_min",
                            "pairs_per_query",
                        }
                    ),
                    "engine": params.generate.engine,
                    "prompt": params.prompt.model_dump(),
                    "seed": params.seed,
                    "sandbox_layers": counter.layers,
                },
                {"model": source, "queries": AUTOIF_QUERIES / TRAIN_QUERIES},
            ),
        )
    summary = {
        "iteration": k,
        "queries": len(queries),
        "samples": len(scored),
        "mean_score": round(sum(s["score"] for s in scored) / len(scored), 4),
        "samples_passing_all": len(sft),
        "samples_chosen_eligible": sum(
            s["score"] >= a.chosen_min and s["score"] > 0 for s in scored
        ),
        "samples_failing_all": sum(s["score"] == 0 for s in scored),
        "queries_with_pairs": len({p["id"].split("/")[0] for p in pairs}),
        "pairs": len(pairs),
        "answer_tokens": stats.new_tokens,
        "tokens_per_second": round(stats.tokens_per_second, 2),
        **counter.summary(),
    }
    write_json(train_metrics(stage), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Training


def autoif_train(params: Params, k: int) -> dict[str, Any]:
    """The AutoIF θk+1: DPO on iteration k's pairs against θk, with SPIN's trainer and loss."""
    from spinflow.pair_training import train_on_pairs, write_training_outputs

    graph = build(params)
    target = graph.model(f"{AUTOIF}_theta_{k + 1}")
    source = require(graph, _model_k(graph, k).path)
    pairs_path = require(graph, autoif_samples_dir(k) / PAIRS)
    pairs = preference_pairs(pairs_path, k)
    if not pairs:
        sampled = read_json(train_metrics(f"autoif_sample_iter_{k}"))
        raise SpinflowError(
            f"autoif_train_iter_{k}: no preference pair survived: of {sampled['samples']} "
            f"samples {sampled['samples_chosen_eligible']} pass ≥ {params.autoif.chosen_min:g} "
            f"of their functions and {sampled['samples_failing_all']} pass none, and no query "
            "has both; raise autoif.samples or autoif.queries, or lower autoif.chosen_min"
        )
    a = params.autoif
    settings = {"beta": a.beta, "prompt": params.prompt.model_dump(), "seed": params.seed}
    inputs = {"model": source, "pairs": pairs_path}
    sft_dir = target.path.with_name(f".{target.path.name}.sft")  # the SFT step's model, removed
    shutil.rmtree(sft_dir, ignore_errors=True)
    try:
        sft_summary: dict[str, Any] = {}
        if a.sft_first:
            sft_path = require(graph, autoif_samples_dir(k) / SFT_DATA)
            sft_summary, start = _sft_step(params, k, source, sft_path, sft_dir)
            settings["sft_first"] = {"sft": params.sft.model_dump(), **sft_summary}
            inputs["sft"] = sft_path
        else:
            start = source
        trained = train_on_pairs(
            params,
            target,
            start,
            pairs,
            a.train,
            beta=a.beta,
            loss="sigmoid",
            settings=settings,
            inputs=inputs,
            bf16_key="autoif.train.bf16",
        )
    finally:
        shutil.rmtree(sft_dir, ignore_errors=True)
    result = trained.result
    summary = {
        "iteration": k,
        **sft_summary,
        "pairs": len(trained.examples),
        "beta": a.beta,
        "learning_rate": trained.optim.learning_rate,
        **trained.precision.summary(),
        **result.summary(),
    }
    write_training_outputs(target, summary, trained)
    return {**summary, **result.timings()}


def _sft_step(
    params: Params, k: int, source: Path, sft_path: Path, folder: Path
) -> tuple[dict[str, Any], Path]:
    """``autoif.sft_first``: θk fine-tuned on iteration k's samples that pass every function
    (``sft.jsonl``) with the project's SFT training and the ``sft`` settings, into ``folder``;
    (its counts, the model DPO starts from). No sample passing: θk itself, with a warning."""
    from spinflow.sft_training import supervised

    records = [
        {"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]}
        for r in read_jsonl(sft_path, ("id", "prompt", "answer"))
    ]
    if not records:
        log.warning(
            "autoif_train_iter_%d: no sample passes every function (%s is empty): the SFT step "
            "is skipped, DPO starts from θ%d",
            k,
            sft_path,
            k,
        )
        return {"sft_examples": 0, "sft_optimizer_steps": 0}, source
    stage = f"autoif_train_iter_{k}"
    step = Model(
        f"{AUTOIF}_sft_{k}",
        folder / "model",
        f"{stage}_sft",
        f"θ{k} + SFT (AutoIF iter {k})",
        AUTOIF,
        train_metrics=folder / "metrics.json",
        steps_csv=folder / "steps.csv",
        timings=folder / "timings.json",
    )
    done = supervised(params, step, source=source, records=records, max_steps=None, extra_inputs={})
    counts = {
        "sft_examples": done["examples"],
        "sft_optimizer_steps": done["optimizer_steps"],
    }
    if "final_loss" in done:
        counts["sft_final_loss"] = done["final_loss"]
    return counts, step.path


def preference_pairs(path: Path, k: int, id_prefix: str = "") -> list[dict]:
    """Iteration k's AutoIF pairs (``path``) in SPIN's layout: the chosen answer where SPIN has
    the real one, the rejected where it has the generated one."""
    return [
        {
            "id": f"{id_prefix}{r['id']}",
            "iteration": k,
            "task": AUTOIF,
            "prompt": r["prompt"],
            "real": r["chosen"],
            "generated": r["rejected"],
        }
        for r in read_jsonl(path, ("id", "prompt", "chosen", "rejected"))
    ]


# ---------------------------------------------------------------------------------------------
# Combined with SPIN (autoif.with_spin)

SPIN_ID_PREFIX = "autoif/"  # AutoIF records among SPIN's: ids that cannot be a pool record's


def spin_pool_records(graph) -> list[dict]:
    """θ0's verified AutoIF answers as SPIN pool records, one per training query: the first
    answer of the query in autoif/iter_0/sft.jsonl (it passes every function of its instruction)
    is the real answer, the query (prompt and instruction) the prompt."""
    path = require(graph, autoif_samples_dir(0) / SFT_DATA)
    records: dict[str, dict] = {}
    for r in read_jsonl(path, ("query", "instruction", "prompt", "answer")):
        records.setdefault(
            r["query"],
            {
                "id": f"{SPIN_ID_PREFIX}{r['query']}",
                "task": AUTOIF,
                "prompt": r["prompt"],
                "answer": r["answer"],
                "instruction": r["instruction"],
            },
        )
    return list(records.values())


def check_generated(params: Params, graph, pairs: list[dict], counter: SandboxCounter) -> None:
    """Execution feedback on SPIN's generated answers: every pair with an ``instruction`` gets
    ``generated_passes``, whether its generated answer passes every function of that instruction
    (autoif/verified, run in the sandbox)."""
    source = require(graph, AUTOIF_VERIFIED / INSTRUCTIONS_FILE)
    instructions = {i.id: i for i in _read_instructions(source)}
    checked = [p for p in pairs if p.get("instruction") is not None]
    unknown = sorted({p["instruction"] for p in checked} - set(instructions))
    if unknown:
        raise DataError(
            f"{source}: no instruction {unknown[0]!r}, which autoif/iter_0/{SFT_DATA} names; "
            "the two come from different runs: `dvc repro` makes them again",
            path=source,
        )
    if not checked:
        return
    with _sandbox(params, counter) as sandbox:
        passes = check_responses(
            [(instructions[p["instruction"]], p["generated"]) for p in checked], sandbox, counter
        )
    for pair, passed in zip(checked, passes, strict=True):
        pair["generated_passes"] = all(passed)


def spin_training_pairs(graph, k: int) -> tuple[list[dict], int]:
    """Iteration k's AutoIF pairs for train_iter_k (ids prefixed so they cannot collide with
    SPIN's), and the answer tokens autoif_sample_iter_k generated (its compute)."""
    pairs = preference_pairs(require(graph, autoif_samples_dir(k) / PAIRS), k, SPIN_ID_PREFIX)
    sampled = read_json(require(graph, train_metrics(f"autoif_sample_iter_{k}")))
    return pairs, int(sampled["answer_tokens"])


# ---------------------------------------------------------------------------------------------
# Evaluation


def strict_accuracy(rows: list[dict]) -> dict[str, float]:
    """Prompt-level strict (every instruction of a query followed) and instruction-level strict
    (share of all (query, instruction) followed) accuracy of evaluation rows."""
    followed = [f for r in rows for f in r["followed"]]
    return {
        "autoif_prompt_strict": sum(all(r["followed"]) for r in rows) / len(rows),
        "autoif_instruction_strict": sum(followed) / len(followed),
    }


def autoif_evaluate(params: Params, name: str) -> dict[str, Any]:
    """Greedy answers to the evaluation queries, checked by the held-out instructions'
    functions: eval/<name>/generations.jsonl and metrics/eval_<name>.json."""
    graph = build(params)
    evaluation = graph.evaluation(name)
    source = require(graph, graph.model(evaluation.model).path)
    queries, instructions = _queries(graph, "eval")
    responses, stats = _answer(params, source, queries, temperature=0.0, stage=evaluation.stage)
    checks = [
        (instructions[i], text)
        for q, text in zip(queries, responses, strict=True)
        for i in q["instructions"]
    ]
    counter = SandboxCounter()
    with _sandbox(params, counter) as sandbox:
        passes = iter(check_responses(checks, sandbox, counter))
    rows = []
    for q, text in zip(queries, responses, strict=True):
        followed = [all(next(passes)) for _ in q["instructions"]]
        rows.append(
            {
                "id": q["id"],
                "prompt": q["prompt"],
                "generated": text,
                "instructions": q["instructions"],
                "followed": followed,
            }
        )
    metrics = {
        "model": name,
        **strict_accuracy(rows),
        "queries": len(rows),
        "instructions": sum(len(r["followed"]) for r in rows),
        "answer_tokens": stats.new_tokens,
        **counter.summary(),
    }
    metrics.pop("sandbox_errors")
    with atomic_path(evaluation.directory, directory=True) as tmp:
        write_jsonl(tmp / evaluation.generations.name, rows)
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                evaluation.stage,
                {
                    "max_new_tokens": params.autoif.max_new_tokens,
                    "engine": params.generate.engine,
                    "prompt": params.prompt.model_dump(),
                    "seed": params.seed,
                    "sandbox_layers": counter.layers,
                },
                {"model": source, "queries": AUTOIF_QUERIES / EVAL_QUERIES},
            ),
        )
    write_json(evaluation.metrics, metrics)
    return metrics

"""SPIN's ``generate_iter_k``: θk answers every prompt of the SPIN pool, with the engine
``generate.engine`` names; each prompt's real answer and θk's generated one make a pair
(generated/iter_k/pairs.jsonl). Training on the pairs is :mod:`spinflow.methods.spin.train`.

With ``autoif.with_spin`` (:mod:`spinflow.methods.autoif.stages`) θ0's verified AutoIF queries join the
pool, and their generated answers are checked by the instructions' functions in the sandbox.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.graph import build
from spinflow.io import atomic_path, write_json, write_jsonl
from spinflow.methods.autoif.graph import AUTOIF_VERIFIED, autoif_samples_dir
from spinflow.methods.spin.graph import generated_dir, pairs_file
from spinflow.nodes import DATA_DIR
from spinflow.provenance import PROVENANCE_FILE, provenance
from spinflow.recipes.common import require
from spinflow.seeds import stage_seed

log = logging.getLogger(__name__)


def make_pairs(pool: Sequence[dict], answers: Sequence, k: int) -> list[dict]:
    """Pool records and θk's answers as pair records (real = the human answer).

    ``answers`` are :class:`spinflow.generation.Completion` s (their text, θk's log-prob of the
    answer and whether it ended are kept) or plain strings.
    """
    pairs = []
    for r, a in zip(pool, answers, strict=True):
        pair = {
            "id": r["id"],
            "iteration": k,
            "task": r["task"],
            "prompt": r["prompt"],
            "real": r["answer"],
            "generated": a if isinstance(a, str) else a.text,
        }
        for key in ("verifier", "instruction"):  # what checks the generated answer
            if r.get(key) is not None:
                pair[key] = r[key]
        if not isinstance(a, str):
            pair["generated_logp"] = round(a.logp, 4)
            pair["generated_ended"] = a.ended
        pairs.append(pair)
    return pairs


def generate(params: Params, k: int) -> dict[str, Any] | None:
    """θk answers every prompt of the SPIN pool; writes generated/iter_k/pairs.jsonl.

    Launched in several processes (``generate.accelerate_config``), each answers every n-th
    prompt and the main process writes the one file, in pool order: answers depend on the
    prompt's seed only, so the file is the one a single process writes.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from spinflow.data import load_split
    from spinflow.devices import stage_device
    from spinflow.engines import check_engine, open_engine
    from spinflow.generation import GenerationStats, SamplingParams, generate_answers
    from spinflow.models import load_model, load_tokenizer

    g = params.generate
    check_engine(g.engine)
    graph = build(params)
    stage = f"generate_iter_{k}"
    source = require(graph, graph.theta(k).path)
    pool = load_split(DATA_DIR, "pool")
    combined = params.autoif.with_spin
    instruction_pool: list[dict] = []
    if combined:
        from spinflow.methods.autoif.stages import spin_pool_records

        instruction_pool = spin_pool_records(graph)
    clash = {r["id"] for r in pool} & {r["id"] for r in instruction_pool}
    if clash:
        raise SpinflowError(
            f"{DATA_DIR / 'pool.jsonl'}: record id {sorted(clash)[0]!r} is also the id of an "
            "AutoIF query in the SPIN pool (autoif.with_spin); give the data other ids"
        )
    state = PartialState(cpu=stage_device(params.device).type == "cpu")
    tokenizer = load_tokenizer(source)
    device = stage_device(params.device)
    model = load_model(source, device=device) if g.engine != "vllm" else None
    engine = open_engine(g, model, tokenizer, model_dir=source)
    stats = GenerationStats()

    def answer(records: list[dict]) -> list | None:
        """θk's answers to ``records`` in their order (None off the main process)."""
        shard = list(range(state.process_index, len(records), state.num_processes))
        tokens_before = stats.new_tokens
        completions = generate_answers(
            engine,
            tokenizer,
            [records[i] for i in shard],
            sampling=SamplingParams(g.temperature, g.top_p, g.max_new_tokens),
            seed=stage_seed(params.seed, stage),
            system_prompt=params.prompt.system_prompt,
            max_prompt_length=params.prompt.max_prompt_length,
            desc=stage if state.num_processes == 1 else f"{stage} [{state.process_index}]",
            stats=stats,
        )
        if state.num_processes == 1:
            return completions
        answers: list = [None] * len(records)
        shares = gather_object([(shard, completions, stats.new_tokens - tokens_before)])
        for indices, share, _ in shares:
            for i, completion in zip(indices, share, strict=True):
                answers[i] = completion
        stats.new_tokens = tokens_before + sum(tokens for _, _, tokens in shares)
        return answers if state.is_main_process else None

    # the ordinary pool first and on its own, so its answers are those of a run without AutoIF
    with engine:  # released when both pools are answered
        answers = answer(pool)
        instruction_answers = answer(instruction_pool) if instruction_pool else []
    if not state.is_main_process:
        return None
    stats.prompts = len(pool) + len(instruction_pool)
    pairs = make_pairs(pool + instruction_pool, answers + instruction_answers, k)
    counter = None
    settings: dict[str, Any] = {
        "generate": g.model_dump(exclude={"accelerate_config"}),
        "prompt": params.prompt.model_dump(),
        "seed": params.seed,
    }
    inputs: dict[str, Path] = {"model": source, "pool": DATA_DIR / "pool.jsonl"}
    if combined:
        from spinflow.methods.autoif.instructions import SandboxCounter
        from spinflow.methods.autoif.stages import INSTRUCTIONS_FILE, SFT_DATA, check_generated

        counter = SandboxCounter()
        check_generated(params, graph, pairs, counter)
        settings["autoif"] = params.autoif.model_dump(
            include={"with_spin", "sandbox_workers", "call_timeout"}
        )
        inputs["autoif_sft"] = autoif_samples_dir(0) / SFT_DATA
        inputs["instructions"] = AUTOIF_VERIFIED / INSTRUCTIONS_FILE
    out = generated_dir(k)
    with atomic_path(out, directory=True) as tmp:
        write_jsonl(tmp / pairs_file(k).name, pairs)
        write_json(tmp / PROVENANCE_FILE, provenance(stage, settings, inputs))
    summary = {
        "engine": g.engine,
        "processes": state.num_processes,
        "prompts": stats.prompts,
        "answer_tokens": stats.new_tokens,
        "seconds": round(stats.seconds, 3),
        "tokens_per_second": round(stats.new_tokens / stats.seconds, 2) if stats.seconds else 0.0,
        "identical_to_real": sum(p["generated"].strip() == p["real"].strip() for p in pairs),
    }
    if counter is not None:
        checked = [p for p in pairs if "generated_passes" in p]
        summary["instruction_prompts"] = len(checked)
        summary["instruction_generated_passing"] = sum(p["generated_passes"] for p in checked)
        summary.update(counter.summary())
    log.info("%s: %s", stage, summary)
    return summary

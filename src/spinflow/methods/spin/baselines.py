"""The baselines SPIN is judged against: θ0 trained further with plain SFT on the same SFT split,
``sft_extra`` for as many optimizer steps as all SPIN iterations took together,
``sft_extra_compute`` for as much training compute (:func:`spin_compute`), so SPIN is compared at
equal steps and at equal cost.
"""

from __future__ import annotations

import math
from typing import Any

from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.graph import Graph, build
from spinflow.io import read_json
from spinflow.methods.spin.graph import spin_steps
from spinflow.nodes import DATA_DIR
from spinflow.recipes.common import require
from spinflow.sft_training import supervised


def _spin_totals(params: Params, graph: Graph, key: str) -> int:
    """The sum of ``key`` over every SPIN iteration's step file (train_iter_k writes them)."""
    total = 0
    for k in range(params.spin.iterations):
        path = require(graph, spin_steps(k))
        values = read_json(path)
        if key not in values:
            raise SpinflowError(f"{path}: no {key!r}; run `dvc repro train_iter_{k}` again")
        total += int(values[key])
    return total


def spin_optimizer_steps(params: Params, graph: Graph | None = None) -> int:
    """Optimizer steps that all SPIN iterations took, read from their training metrics."""
    return _spin_totals(params, graph or build(params), "optimizer_steps")


def spin_compute(params: Params, graph: Graph | None = None) -> int:
    """Token passes that all SPIN iterations cost (see
    :func:`spinflow.methods.spin.train.iteration_compute`)."""
    return _spin_totals(params, graph or build(params), "compute_tokens")


def steps_for_compute(params: Params, tokenizer, records: list[dict], compute: int) -> int:
    """Optimizer steps of plain SFT on ``records`` that cost ``compute`` token passes (forward
    and backward, three a token), rounded up: a step costs the epoch's share of its tokens."""
    from spinflow.training import encode_sft

    tokens_per_epoch = sum(e.length for e in encode_sft(tokenizer, records, params.prompt))
    optim = params.sft
    steps_per_epoch = math.ceil(
        math.ceil(len(records) / optim.batch_size) / optim.gradient_accumulation_steps
    )
    return max(1, math.ceil(compute / (3 * tokens_per_epoch) * steps_per_epoch))


def sft_extra(params: Params, budget: str = "steps") -> dict[str, Any]:
    """Baseline: θ0 trained further with plain SFT on the SFT split, for as many optimizer steps
    as all SPIN iterations together (``budget="steps"``, stage sft_extra) or for as much compute,
    generation and reference passes included (``"compute"``, stage sft_extra_compute)."""
    from spinflow.data import load_split
    from spinflow.models import load_tokenizer

    graph = build(params)
    source = require(graph, graph.theta(0).path)
    records = load_split(DATA_DIR, "sft")
    if budget == "steps":
        name = "sft_extra"
        steps = spin_optimizer_steps(params, graph)
        spent = {"spin_optimizer_steps": steps}
    else:
        name = "sft_extra_compute"
        compute = spin_compute(params, graph)
        steps = steps_for_compute(params, load_tokenizer(source), records, compute)
        spent = {"spin_compute_tokens": compute}
    return supervised(
        params,
        graph.model(name),
        source=source,
        records=records,
        max_steps=steps,
        extra_inputs={"data": DATA_DIR / "sft.jsonl", "val": DATA_DIR / "val.jsonl"},
        validation=load_split(DATA_DIR, "val"),
        budget=spent,
    )

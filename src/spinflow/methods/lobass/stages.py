"""LoBaSS (arXiv 2310.13008): fine-tune on the SFT examples the model can learn from.

The learnability of an SFT example is how much fine-tuning lowered its loss, relative to where
it started::

    S = (L_before − L_after) / L_before = 1 − L_after / L_before

with L the mean loss per answer token (dividing by L_before removes the bias towards long or
hard answers). "Before" is the base model, "after" θ0, the base model fine-tuned on the whole
SFT split. Stages:

- ``lobass_score``: both losses and the score of every SFT example (lobass/scores.jsonl);
- ``lobass_select``: the top ``lobass.fraction`` by score (at least ``lobass.min_examples``; ties
  broken by id) and, as the control, a seeded random selection of the same size;
- ``sft_lobass`` / ``sft_random``: the base model fine-tuned on each selection with the SFT recipe
  (``sft`` settings), then evaluated like every other model.

With ``spin.start: lobass`` the SPIN chain starts from the LoBaSS model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from spinflow.config import Params, PromptParams
from spinflow.errors import DataError, SpinflowError
from spinflow.graph import build
from spinflow.io import atomic_path, read_jsonl, write_json, write_jsonl
from spinflow.methods.lobass.graph import LOBASS, LOBASS_SCORES, LOBASS_SELECTION, RANDOM_SELECTION
from spinflow.nodes import BASE_MODEL, DATA_DIR, train_metrics
from spinflow.provenance import PROVENANCE_FILE, provenance
from spinflow.recipes.common import require
from spinflow.seeds import derive_seed

SCORES_DIR = LOBASS_SCORES
SCORES = SCORES_DIR / "scores.jsonl"
SELECTION_DIR = LOBASS_SELECTION
SELECTIONS = {
    LOBASS: SELECTION_DIR / "selected.jsonl",
    RANDOM_SELECTION: SELECTION_DIR / "random.jsonl",
}


# ---------------------------------------------------------------------------------------------
# Scores


def mean_answer_losses(
    model, tokenizer, records: Sequence[dict], prompt: PromptParams, batch_size: int, desc: str
) -> list[float]:
    """Mean negative log-likelihood per answer token (end token included) of each record.

    A record whose answer keeps no token of its own after truncation to ``prompt.max_length``
    (only the end token is left) stops with a one-line error naming it.
    """
    from spinflow.evaluation import answer_logps

    logps, counts = answer_logps(
        model, tokenizer, records, [r["answer"] for r in records], prompt, batch_size, desc=desc
    )
    for record, count in zip(records, counts, strict=True):
        if count <= 1 and record["answer"].strip():
            raise DataError(
                f"lobass_score: SFT example {record['id']} keeps no answer token after "
                f"truncation to prompt.max_length={prompt.max_length} (its prompt fills it); "
                "raise prompt.max_length or lower prompt.max_prompt_length"
            )
    return [-logp / count for logp, count in zip(logps, counts, strict=True)]


def learnability(loss_before: float, loss_after: float) -> float:
    """S = 1 − L_after / L_before: the share of the loss that fine-tuning removed."""
    return 1.0 - loss_after / loss_before


def score_examples(
    ids: Sequence[str], losses_before: Sequence[float], losses_after: Sequence[float]
) -> list[dict]:
    """One row per example (in the given order): both losses, the score and its rank (1 = most
    learnable; equal scores ranked by id)."""
    rows = []
    for example_id, before, after in zip(ids, losses_before, losses_after, strict=True):
        if not (math.isfinite(before) and before > 0 and math.isfinite(after)):
            raise DataError(
                f"lobass_score: SFT example {example_id}: cannot score it (loss before "
                f"{before!r}, after {after!r})"
            )
        rows.append(
            {
                "id": example_id,
                "loss_before": before,
                "loss_after": after,
                "score": learnability(before, after),
            }
        )
    for rank, row in enumerate(sorted(rows, key=lambda r: (-r["score"], r["id"])), start=1):
        row["rank"] = rank
    return rows


def lobass_score(params: Params) -> dict[str, Any]:
    """Both losses and the learnability score of every SFT example: lobass/scores.jsonl."""
    from spinflow.data import load_split
    from spinflow.devices import stage_device
    from spinflow.models import load_model, load_tokenizer

    graph = build(params)
    before_dir = require(graph, BASE_MODEL)
    after_dir = require(graph, graph.model("theta_0").path)
    records = load_split(DATA_DIR, "sft")
    if not records:
        raise SpinflowError("lobass_score: data/prepared/sft.jsonl is empty: raise data.num_sft")
    batch_size = params.eval.batch_size
    losses = {}
    for name, directory in (("before", before_dir), ("after", after_dir)):
        # both models read the answers through one tokenizer: θ0 saved the base model's
        losses[name] = mean_answer_losses(
            load_model(directory, device=stage_device(params.device)),
            load_tokenizer(directory),
            records,
            params.prompt,
            batch_size,
            desc=f"loss {name} fine-tuning",
        )
    rows = score_examples([r["id"] for r in records], losses["before"], losses["after"])
    with atomic_path(SCORES_DIR, directory=True) as tmp:
        write_jsonl(tmp / SCORES.name, rows)
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                "lobass_score",
                {"prompt": params.prompt.model_dump(), "batch_size": batch_size},
                {"before": before_dir, "after": after_dir, "sft": DATA_DIR / "sft.jsonl"},
            ),
        )
    scores = [r["score"] for r in rows]
    summary = {
        "examples": len(rows),
        "mean_loss_before": sum(losses["before"]) / len(rows),
        "mean_loss_after": sum(losses["after"]) / len(rows),
        "mean_score": sum(scores) / len(scores),
        "negative_scores": sum(s < 0 for s in scores),
    }
    write_json(train_metrics("lobass_score"), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Selection


def selection_size(total: int, fraction: float, min_examples: int) -> int:
    """The top ``fraction`` of ``total`` (rounded up), at least ``min_examples``, at most all."""
    return min(total, max(min_examples, math.ceil(fraction * total - 1e-9)))


def select_top(rows: Sequence[dict], size: int) -> set[str]:
    """Ids of the ``size`` best-ranked rows."""
    return {r["id"] for r in sorted(rows, key=lambda r: r["rank"])[:size]}


def select_random(ids: Sequence[str], size: int, seed: int) -> set[str]:
    """A seeded random choice of ``size`` ids, the control selection."""
    return set(random.Random(derive_seed(seed, "lobass_random")).sample(sorted(ids), size))


def lobass_select(params: Params) -> dict[str, Any]:
    """The LoBaSS selection and the random control of the same size, as SFT records."""
    from spinflow.data import load_split

    graph = build(params)
    rows = read_jsonl(require(graph, SCORES))
    records = load_split(DATA_DIR, "sft")
    by_id = {r["id"]: r for r in records}
    if set(by_id) != {r["id"] for r in rows}:
        raise DataError(
            f"{SCORES} does not score data/prepared/sft.jsonl (ids differ); "
            "run `dvc repro lobass_score`"
        )
    lob = params.lobass
    size = selection_size(len(records), lob.fraction, lob.min_examples)
    if size < params.sft.batch_size:
        raise SpinflowError(
            f"lobass_select: the selection holds {size} of {len(records)} SFT examples, fewer "
            f"than one batch (sft.batch_size: {params.sft.batch_size}); raise lobass.fraction "
            f"({lob.fraction}) or lobass.min_examples ({lob.min_examples})"
        )
    chosen = {
        LOBASS: select_top(rows, size),
        RANDOM_SELECTION: select_random(list(by_id), size, params.seed),
    }
    with atomic_path(SELECTION_DIR, directory=True) as tmp:
        for role, ids in chosen.items():
            write_jsonl(tmp / SELECTIONS[role].name, [r for r in records if r["id"] in ids])
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                "lobass_select",
                {"lobass": lob.model_dump(), "seed": params.seed},
                {"scores": SCORES, "sft": DATA_DIR / "sft.jsonl"},
            ),
        )
    score = {r["id"]: r["score"] for r in rows}
    summary = {
        "examples": len(records),
        "selected": size,
        "selected_fraction": size / len(records),
        "lowest_selected_score": min(score[i] for i in chosen[LOBASS]),
        "mean_score_selected": sum(score[i] for i in chosen[LOBASS]) / size,
        "mean_score_random": sum(score[i] for i in chosen[RANDOM_SELECTION]) / size,
        "overlap_with_random": len(chosen[LOBASS] & chosen[RANDOM_SELECTION]),
    }
    write_json(train_metrics("lobass_select"), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Fine-tuning on a selection


def sft_selection(params: Params, role: str) -> dict[str, Any]:
    """The base model fine-tuned on one selection (``lobass`` or the random control)."""
    from spinflow.sft_training import supervised

    graph = build(params)
    target = next(m for m in graph.models.values() if m.role == role)
    selection = require(graph, SELECTIONS[role])
    return supervised(
        params,
        target,
        source=require(graph, BASE_MODEL),
        records=read_jsonl(selection, ("id", "prompt", "answer")),
        max_steps=None,
        extra_inputs={"data": selection},
    )

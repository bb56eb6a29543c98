"""One function per pipeline stage; ``stages/*.py`` only parse arguments and call these.

Paths come from :mod:`spinflow.layout`; every output is written atomically.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from spinflow import layout, tracking
from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from spinflow.provenance import PROVENANCE_FILE, provenance

log = logging.getLogger(__name__)


def _write_steps_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow(
                {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def _stage_seed(params: Params, stage: str) -> int:
    from spinflow.generation import prompt_seed

    return prompt_seed(params.seed, stage) % (2**31)


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise SpinflowError(
            f"{path}: missing; it is made by stage '{stage}' (run `dvc repro {stage}`)"
        )
    return path


# ---------------------------------------------------------------------------------------------
# prepare_model, prepare_data


def prepare_model(params: Params) -> dict[str, Any]:
    from spinflow.models import prepare_base_model

    info = prepare_base_model(
        params.model.source,
        layout.BASE_MODEL,
        gguf_file=params.model.gguf_file,
        revision=params.model.revision,
        dtype=params.model.dtype,
        seed=params.seed,
    )
    write_json(
        layout.BASE_MODEL / PROVENANCE_FILE,
        {**provenance("prepare_model", params.model.model_dump(), {}), "model": info},
    )
    return info


def prepare_data(params: Params) -> dict[str, Any]:
    from spinflow.data import prepare_data as build

    summary = build(params.data, layout.DATA_DIR)
    write_json(
        layout.DATA_DIR / PROVENANCE_FILE, provenance("prepare_data", params.data.model_dump(), {})
    )
    return summary


# ---------------------------------------------------------------------------------------------
# sft and sft_extra: plain supervised fine-tuning


def _supervised(
    params: Params,
    *,
    stage: str,
    source: Path,
    records: list[dict],
    out_dir: Path,
    max_steps: int | None,
    extra_inputs: dict[str, Path],
) -> dict[str, Any]:
    from spinflow.models import load_model, load_tokenizer
    from spinflow.training import (
        apply_lora,
        encode_sft,
        make_accelerator,
        save_checkpoint,
        seed_everything,
        sft_collate,
        sft_loss_fn,
        train_loop,
    )

    optim = params.sft
    seed = _stage_seed(params, stage)
    seed_everything(seed)
    accelerator = make_accelerator(optim)
    tokenizer = load_tokenizer(source)
    model = apply_lora(load_model(source), optim)
    examples = encode_sft(tokenizer, records, params.prompt)
    result = train_loop(
        accelerator,
        model,
        examples,
        sft_collate(tokenizer.pad_token_id),
        sft_loss_fn,
        optim,
        seed=seed,
        desc=stage,
        max_steps=max_steps,
    )
    save_checkpoint(accelerator, model, tokenizer, out_dir)
    summary = {"examples": len(examples), **result.summary()}
    if accelerator.is_main_process:
        write_json(
            out_dir / PROVENANCE_FILE,
            provenance(
                stage,
                {
                    "sft": optim.model_dump(),
                    "prompt": params.prompt.model_dump(),
                    "max_steps": max_steps,
                    "seed": params.seed,
                },
                {"model": source, **extra_inputs},
            ),
        )
        write_json(layout.METRICS_DIR / f"{stage}.json", summary)
        _write_steps_csv(layout.train_steps(stage), result.history)
    return summary


def sft(params: Params) -> dict[str, Any]:
    """θ0: the base model fine-tuned on the SFT split."""
    from spinflow.data import load_split

    records = load_split(layout.DATA_DIR, "sft")
    if not records:
        raise SpinflowError(
            "data/prepared/sft.jsonl is empty: raise data.num_sft or set sft.enabled: false"
        )
    summary = _supervised(
        params,
        stage="sft",
        source=layout.BASE_MODEL,
        records=records,
        out_dir=layout.SFT_MODEL,
        max_steps=None,
        extra_inputs={"data": layout.DATA_DIR / "sft.jsonl"},
    )
    tracking.log_sft(params)
    return summary


def spin_optimizer_steps(params: Params) -> int:
    """Optimizer steps that all SPIN iterations took, read from their training metrics."""
    total = 0
    for k in range(params.spin.iterations):
        path = _require(layout.spin_steps(k), f"train_iter_{k}")
        total += int(read_json(path)["optimizer_steps"])
    return total


def sft_extra(params: Params) -> dict[str, Any]:
    """Baseline: keep training θ0 with plain SFT on the SPIN pool's real answers, for as many
    optimizer steps as all SPIN iterations together."""
    from spinflow.data import load_split

    theta0 = layout.theta(0, sft_enabled=params.sft.enabled)
    summary = _supervised(
        params,
        stage="sft_extra",
        source=theta0,
        records=load_split(layout.DATA_DIR, "pool"),
        out_dir=layout.SFT_EXTRA_MODEL,
        max_steps=spin_optimizer_steps(params),
        extra_inputs={"data": layout.DATA_DIR / "pool.jsonl"},
    )
    tracking.log_sft_extra(params)
    return summary


# ---------------------------------------------------------------------------------------------
# generate_iter_k


def generate(params: Params, k: int) -> dict[str, Any]:
    """θk answers every prompt of the SPIN pool; writes generated/iter_k/pairs.jsonl."""
    from spinflow.data import load_split
    from spinflow.generation import GenerationStats, SamplingParams, generate_answers
    from spinflow.models import load_model, load_tokenizer

    source = _require(
        layout.theta(k, sft_enabled=params.sft.enabled), "sft" if k == 0 else f"train_iter_{k - 1}"
    )
    pool = load_split(layout.DATA_DIR, "pool")
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    g = params.generate
    stats = GenerationStats()
    answers = generate_answers(
        model,
        tokenizer,
        pool,
        sampling=SamplingParams(g.temperature, g.top_p, g.max_new_tokens),
        seed=_stage_seed(params, f"generate_iter_{k}"),
        batch_size=g.batch_size,
        system_prompt=params.prompt.system_prompt,
        max_prompt_length=params.prompt.max_prompt_length,
        desc=f"generate_iter_{k}",
        stats=stats,
    )
    pairs = [
        {
            "id": r["id"],
            "iteration": k,
            "task": r["task"],
            "prompt": r["prompt"],
            "real": r["answer"],
            "generated": a,
        }
        for r, a in zip(pool, answers, strict=True)
    ]
    out = layout.generated_dir(k)
    with atomic_path(out, directory=True) as tmp:
        write_jsonl(tmp / "pairs.jsonl", pairs)
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                f"generate_iter_{k}",
                {
                    "generate": g.model_dump(),
                    "prompt": params.prompt.model_dump(),
                    "seed": params.seed,
                },
                {"model": source, "pool": layout.DATA_DIR / "pool.jsonl"},
            ),
        )
    summary = {
        "prompts": stats.prompts,
        "answer_tokens": stats.new_tokens,
        "seconds": round(stats.seconds, 3),
        "tokens_per_second": round(stats.tokens_per_second, 2),
        "identical_to_real": sum(p["generated"].strip() == p["real"].strip() for p in pairs),
    }
    log.info("generate_iter_%d: %s", k, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# train_iter_k


def training_pairs(params: Params, k: int) -> list[dict]:
    """This iteration's pairs plus those of ``spin.mix_previous`` earlier iterations (oldest first)."""
    pairs: list[dict] = []
    for j in range(max(0, k - params.spin.mix_previous), k + 1):
        path = _require(layout.generated_dir(j) / "pairs.jsonl", f"generate_iter_{j}")
        pairs.extend(read_jsonl(path))
    return pairs


def train(params: Params, k: int) -> dict[str, Any]:
    """θk+1: start from θk, opponent θk, SPIN loss on real vs generated answers."""
    from spinflow.models import load_model, load_tokenizer
    from spinflow.training import (
        encode_pairs,
        make_accelerator,
        save_checkpoint,
        seed_everything,
        spin_iteration,
    )

    optim, beta = params.train_for(k)
    source = _require(
        layout.theta(k, sft_enabled=params.sft.enabled), "sft" if k == 0 else f"train_iter_{k - 1}"
    )
    pairs = training_pairs(params, k)
    seed = _stage_seed(params, f"train_iter_{k}")
    seed_everything(seed)
    accelerator = make_accelerator(optim)
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    examples = encode_pairs(tokenizer, pairs, params.prompt)
    model, result, _ = spin_iteration(
        accelerator,
        model,
        tokenizer,
        examples,
        optim,
        beta=beta,
        loss=params.spin.loss,
        seed=seed,
        desc=f"train_iter_{k}",
    )
    out_dir = layout.theta(k + 1, sft_enabled=params.sft.enabled)
    save_checkpoint(accelerator, model, tokenizer, out_dir)
    summary = {
        "iteration": k,
        "pairs": len(examples),
        "beta": beta,
        "learning_rate": optim.learning_rate,
        **result.summary(),
    }
    if accelerator.is_main_process:
        inputs: dict[str, Path] = {"model": source}
        for j in range(max(0, k - params.spin.mix_previous), k + 1):
            inputs[f"pairs_iter_{j}"] = layout.generated_dir(j) / "pairs.jsonl"
        write_json(
            out_dir / PROVENANCE_FILE,
            provenance(
                f"train_iter_{k}",
                {
                    "train": optim.model_dump(),
                    "beta": beta,
                    "loss": params.spin.loss,
                    "mix_previous": params.spin.mix_previous,
                    "prompt": params.prompt.model_dump(),
                    "seed": params.seed,
                },
                inputs,
            ),
        )
        write_json(layout.train_metrics(k), summary)
        write_json(layout.spin_steps(k), {"optimizer_steps": result.steps})
        _write_steps_csv(layout.train_steps(f"train_iter_{k}"), result.history)
    tracking.log_train(params, k, result.history)
    return summary


# ---------------------------------------------------------------------------------------------
# evaluation and report


def eval_model_dir(params: Params, name: str) -> Path:
    if name == "sft":
        return layout.theta(0, sft_enabled=params.sft.enabled)
    if name == "sft_extra":
        return layout.SFT_EXTRA_MODEL
    k = int(name.removeprefix("iter_"))
    return layout.theta(k + 1, sft_enabled=params.sft.enabled)


def eval_opponent(name: str) -> str | None:
    """Whose evaluation rows serve as the opponent of ``name`` (θk for θk+1; θ0 for sft_extra)."""
    if name == "sft":
        return None
    if name == "sft_extra":
        return "sft"
    k = int(name.removeprefix("iter_"))
    return "sft" if k == 0 else f"iter_{k - 1}"


def evaluate(params: Params, name: str) -> dict[str, Any]:
    """Evaluate θ0 ("sft"), θk+1 ("iter_k") or the SFT-extra baseline on the test split."""
    from spinflow.data import load_split
    from spinflow.evaluation import evaluate as run_eval
    from spinflow.models import load_model, load_tokenizer

    source = _require(eval_model_dir(params, name), name)
    records = load_split(layout.DATA_DIR, "test")
    opponent = eval_opponent(name)
    reference = (
        read_jsonl(_require(layout.eval_generations(opponent), f"eval_{opponent}"))
        if opponent
        else None
    )
    beta = (
        params.train_for(int(name.removeprefix("iter_")))[1]
        if name.startswith("iter_")
        else params.spin.beta
    )
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    metrics, rows = run_eval(
        model,
        tokenizer,
        records,
        prompt=params.prompt,
        params=params.eval,
        seed=params.seed,
        reference=reference,
        beta=beta,
    )
    metrics = {"model": name, **metrics}
    inputs = {"model": source, "test": layout.DATA_DIR / "test.jsonl"}
    if opponent:
        inputs["opponent"] = layout.eval_generations(opponent)
    with atomic_path(layout.eval_generations(name).parent, directory=True) as tmp:
        write_jsonl(tmp / "generations.jsonl", rows)
        write_json(
            tmp / PROVENANCE_FILE,
            provenance(
                f"eval_{name}",
                {
                    "eval": params.eval.model_dump(),
                    "prompt": params.prompt.model_dump(),
                    "beta": beta,
                    "seed": params.seed,
                },
                inputs,
            ),
        )
    write_json(layout.eval_metrics(name), metrics)
    tracking.log_eval(params, name)
    return metrics


def report(params: Params) -> dict[str, Any]:
    from spinflow.report import write_report

    summary = write_report(params)
    tracking.log_report(params)
    return summary

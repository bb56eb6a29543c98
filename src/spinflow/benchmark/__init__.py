"""Speed and memory of the current params on this machine: ``spinflow benchmark``.

Prints generation tokens/s (sampling, as generate_iter_k does), SPIN training pairs/s and
tokens/s (reference pass excluded, as train_iter_k does it once per iteration), and peak memory
of full fine-tuning beside an estimate of what it needs. When TRL is installed (dev extra), it
also runs TRL's DPOTrainer as SPIN on the same pairs and settings, with a reference model and
with precomputed reference log-probs, and prints spinflow's speed over each (setup and reference
log-probs included on both sides; model loading excluded). It first prints the precision training
uses here (``bf16: auto`` resolved by :mod:`spinflow.precision`: the choice, bf16's speed over
float32 and how far the two agree) and runs everything in it.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from spinflow.config import Params
from spinflow.nodes import BASE_MODEL


def _records(params: Params, count: int) -> list[dict]:
    from spinflow.tasks import generate_examples

    return generate_examples(count, seed=params.data.seed)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def memory_estimate_mb(model, optim, batch_tokens: int) -> dict[str, float]:
    """What one full fine-tuning step must hold: weights, gradients, optimizer state, and the
    activations autograd keeps for one batch (llama-style layer: about 9 hidden-size and 5
    intermediate-size values a token, in the weights' dtype; attention scores not counted)."""
    params = sum(p.numel() for p in model.parameters())
    size = next(model.parameters()).element_size()
    states = {"adamw": 2, "rmsprop": 1, "sgd": 0}[optim.optimizer]
    config = model.config
    per_token = config.num_hidden_layers * (
        9 * config.hidden_size + 5 * getattr(config, "intermediate_size", 4 * config.hidden_size)
    )
    mb = 2**20
    parts = {
        "weights": params * size / mb,
        "gradients": params * size / mb,
        "optimizer_state": states * params * 4 / mb,
        "activations": batch_tokens * per_token * size / mb,
    }
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------
# Generation: the configured engine beside HF `generate`, on the same prompts and settings


def hf_generate_answer_tokens(model, tokenizer, requests, sampling, batch_size: int) -> int:
    """HF ``model.generate`` over ``requests`` (length-sorted, left-padded batches); the answer
    tokens it produced, counted up to each row's end token."""
    import torch

    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
    eos = tokenizer.eos_token_id
    produced = 0
    for start in range(0, len(order), batch_size):
        rows = [requests[i].prompt_ids for i in order[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        torch.manual_seed(requests[order[start]].seed)
        sample = sampling.temperature > 0
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=0 if sample else None,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, width:].tolist():
            produced += row.index(eos) if eos in row else len(row)
    return produced


def benchmark_generation(
    params: Params,
    model,
    tokenizer,
    model_dir: str,
    *,
    prompts: int,
    compare_hf: bool = True,
    repeats: int = 3,
) -> tuple[dict[str, float], list[dict]]:
    """Answer tokens/s of ``generate.engine`` and, side by side, of HF ``generate`` on the same
    prompts, seeds and settings (the median of ``repeats`` alternating runs of each); also the
    pairs the engine's answers make."""
    from spinflow.chat import prompt_ids
    from spinflow.engines import open_engine
    from spinflow.generation import Request, SamplingParams
    from spinflow.seeds import derive_seed

    g = params.generate
    sampling = SamplingParams(g.temperature, g.top_p, g.max_new_tokens)
    records = _records(params, prompts)
    requests = [
        Request(
            prompt_ids(
                tokenizer, r["prompt"], params.prompt.system_prompt, params.prompt.max_prompt_length
            ),
            derive_seed(params.seed, r["id"]),
        )
        for r in records
    ]
    print(
        f"generation: {len(requests)} built-in prompts, engine {g.engine} ({g.dtype}), "
        f"batch {g.batch_size}, temperature {g.temperature}, top_p {g.top_p}, "
        f"at most {g.max_new_tokens} new tokens"
    )
    with open_engine(g, model, tokenizer, model_dir=Path(model_dir)) as engine:
        # a warm-up batch on both sides, not timed: it resolves `dtype: auto` (a probe, then cached)
        # and the kernels' first-call work
        warm = requests[: g.batch_size]
        warm_sampling = SamplingParams(g.temperature, g.top_p, min(8, g.max_new_tokens))
        engine.complete(warm, warm_sampling, desc="benchmark warm-up")
        if compare_hf:
            hf_generate_answer_tokens(model, tokenizer, warm, warm_sampling, g.batch_size)
        # the two sides alternate, `repeats` times: a change of load on the machine hits both
        runs: dict[str, list[float]] = {"generate": [], "hf_generate": []}
        seconds = []
        for repeat in range(repeats):
            started = time.perf_counter()
            completions = engine.complete(requests, sampling, desc="benchmark generate")
            seconds.append(time.perf_counter() - started)
            tokens = sum(len(c.token_ids) for c in completions)
            runs["generate"].append(tokens / seconds[-1])
            line = f"repeat {repeat + 1}/{repeats}: generate {runs['generate'][-1]:.2f} tokens/s"
            if compare_hf:
                started = time.perf_counter()
                hf_tokens = hf_generate_answer_tokens(
                    model, tokenizer, requests, sampling, g.batch_size
                )
                runs["hf_generate"].append(hf_tokens / (time.perf_counter() - started))
                line += f", hf_generate {runs['hf_generate'][-1]:.2f} tokens/s"
            print(line)
    results = {
        "generation_tokens_per_second": statistics.median(runs["generate"]),
        "generation_prompts_per_second": len(requests) / statistics.median(seconds),
    }
    if compare_hf:
        results["hf_generate_tokens_per_second"] = statistics.median(runs["hf_generate"])
    for key, value in results.items():
        print(f"{key:<32} {value:10.2f}")
    if compare_hf:
        ratio = results["generation_tokens_per_second"] / results["hf_generate_tokens_per_second"]
        results["ratio_generate_hf"] = ratio
        print(f"ratio generate/hf_generate: {ratio:.2f}")
    return results, [
        {"prompt": r["prompt"], "real": r["answer"], "generated": c.text}
        for r, c in zip(records, completions, strict=True)
    ]


def run_benchmark(
    params: Params,
    *,
    model_dir: str | None = None,
    pairs: int = 16,
    pairs_file: str | None = None,
    compare_trl: bool = True,
    prompts: int = 64,
    compare_hf: bool = True,
    train: bool = True,
    repeats: int = 3,
) -> dict[str, float]:
    import torch

    from spinflow.io import read_jsonl
    from spinflow.models import build_tiny_model, load_model, load_tokenizer
    from spinflow.pair_training import encode_pairs, pair_collate, resolve_optim, spin_iteration
    from spinflow.training import make_accelerator, peak_memory_mb, seed_everything

    if model_dir is None:
        model_dir = str(BASE_MODEL) if BASE_MODEL.exists() else None
    if model_dir is None:
        model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
        print("models/base not found: timing a tiny model (run `dvc repro prepare_model` first)")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    g = params.generate
    print(
        f"model: {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
        f"threads: {torch.get_num_threads()}, device: {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )

    results: dict[str, float] = {}
    if pairs_file is not None:
        pair_records = read_jsonl(Path(pairs_file))[:pairs]
        print(f"pairs: {len(pair_records)} from {pairs_file} (generation not timed)")
    else:
        generation, pair_records = benchmark_generation(
            params,
            model,
            tokenizer,
            model_dir,
            prompts=prompts,
            compare_hf=compare_hf,
            repeats=repeats,
        )
        results.update(generation)
        pair_records = pair_records[:pairs]
        if not train:
            return results

    optim, beta = params.train_for(0)
    optim = optim.model_copy(update={"epochs": 1})
    examples = encode_pairs(tokenizer, pair_records, params.prompt)
    model = load_model(model_dir)  # a fresh copy: generation must not warm anything up
    seed_everything(params.seed)
    # what train_iter_k would choose here (bf16: auto measures once a machine, then is cached)
    optim, precision = resolve_optim(optim, model, tokenizer, examples, beta, params.spin.loss)
    print(f"precision: {precision.describe('spin.train.bf16')}")
    results["bf16"] = float(precision.bf16)
    if precision.measurement is not None:
        results["bf16_speedup"] = precision.measurement.speedup
    accelerator = make_accelerator(optim)
    started = time.perf_counter()
    _, result, reference_seconds, _ = spin_iteration(
        accelerator,
        model,
        tokenizer,
        examples,
        optim,
        beta=beta,
        loss=params.spin.loss,
        seed=params.seed,
        desc="benchmark train",
    )
    total_seconds = time.perf_counter() - started
    widest = max(
        int(pair_collate(tokenizer.pad_token_id)(examples[i : i + optim.batch_size])["tokens"])
        for i in range(0, len(examples), optim.batch_size)
    )
    estimate = memory_estimate_mb(model, optim, widest)
    results.update(
        {
            "reference_pairs_per_second": len(examples) / reference_seconds,
            "train_pairs_per_second": result.examples_seen / result.seconds,
            "train_tokens_per_second": result.tokens_seen / result.seconds,
            "train_seconds_per_step": result.seconds / max(result.steps, 1),
            "spin_pairs_per_second": len(examples) / total_seconds,
            "peak_memory_mb": peak_memory_mb(),
            "estimated_memory_mb": estimate["total"],
        }
    )
    print(
        f"\nbatch sizes: generate {g.batch_size}, train {optim.batch_size} pairs "
        f"(x{optim.gradient_accumulation_steps} accumulation), bf16 {optim.bf16}, "
        f"lora {optim.lora.enabled}, optimizer {optim.optimizer}, "
        f"group_by_length {optim.group_by_length}"
    )
    print(
        "memory estimate (MB): "
        + ", ".join(f"{k} {v:.0f}" for k, v in estimate.items())
        + " (process memory such as libraries not included)"
    )

    if compare_trl and importlib.util.find_spec("trl") is not None:
        for name, precompute in (("trl", False), ("trl_precompute", True)):
            trl_model = load_model(model_dir)
            seed_everything(params.seed)
            started = time.perf_counter()
            from spinflow.benchmark.trl_spin import trl_spin_trainer

            trainer = trl_spin_trainer(
                trl_model,
                tokenizer,
                examples,
                optim,
                beta=beta,
                loss=params.spin.loss,
                seed=params.seed,
                out_dir=tempfile.mkdtemp(),
                precompute_ref_log_probs=precompute,
            )
            trainer.train()
            results[f"{name}_pairs_per_second"] = len(examples) / (time.perf_counter() - started)
            del trainer, trl_model
    elif compare_trl:
        print("TRL is not installed (pip install -e .[dev]): no comparison with it")

    print(f"spin pairs/s counts setup and the reference pass ({len(examples)} pairs, one epoch)")
    for key, value in results.items():
        if key.startswith(("generation_", "hf_generate_", "ratio_generate")):
            continue  # printed with the generation figures
        print(f"{key:<32} {value:10.2f}")
    for name in ("trl", "trl_precompute"):
        if f"{name}_pairs_per_second" in results:
            ratio = results["spin_pairs_per_second"] / results[f"{name}_pairs_per_second"]
            results[f"ratio_{name}"] = ratio
            print(f"ratio train/{name}: {ratio:.2f}")
    return results

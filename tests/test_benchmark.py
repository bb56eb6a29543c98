"""`spinflow benchmark` measures a real model and prints its figures."""

from __future__ import annotations

import math
import time

import pytest

from spinflow import pair_training
from spinflow.benchmark import run_benchmark
from spinflow.config import Params
from spinflow.engines import torch as torch_engine

PAIRS = 4


def test_benchmark_figures_are_the_counts_over_the_measured_seconds(
    tiny_checkpoint_session, capsys, monkeypatch
):
    """Each figure is what was counted divided by the time measured for it: the counts are
    recorded here, independently of the statistics the benchmark keeps."""
    calls = []  # the answers' lengths, per call
    runs = []
    real_generate_batch, real_spin_iteration = (
        torch_engine.generate_batch,
        pair_training.spin_iteration,
    )

    def counting_generate_batch(*args, **kwargs):
        answers = real_generate_batch(*args, **kwargs)
        calls.append([len(a.token_ids) for a in answers])
        return answers

    def recording_spin_iteration(accelerator, model, tokenizer, examples, *args, **kwargs):
        out = real_spin_iteration(accelerator, model, tokenizer, examples, *args, **kwargs)
        runs.append((len(examples), out[1], out[2]))
        return out

    monkeypatch.setattr(torch_engine, "generate_batch", counting_generate_batch)
    monkeypatch.setattr(pair_training, "spin_iteration", recording_spin_iteration)
    params = Params()
    params.generate.engine = "torch"  # the engine whose batches are counted here
    params.generate.max_new_tokens = 4
    params.spin.train.batch_size = 2
    started = time.perf_counter()
    results = run_benchmark(
        params, model_dir=str(tiny_checkpoint_session), pairs=PAIRS, prompts=PAIRS, repeats=1
    )
    elapsed = time.perf_counter() - started

    warm_up, generated_tokens = calls  # a warm-up batch, then the timed run
    assert len(warm_up) == len(generated_tokens) == PAIRS
    new_tokens = sum(generated_tokens)
    assert new_tokens > 0
    # both generation figures share one measured duration, within the call's own
    seconds = PAIRS / results["generation_prompts_per_second"]
    assert 0 < seconds < elapsed
    assert results["generation_tokens_per_second"] == pytest.approx(new_tokens / seconds)

    ((pairs, result, reference_seconds),) = runs
    assert pairs == PAIRS
    assert result.steps == math.ceil(PAIRS / 2)  # one epoch, batch 2
    assert result.examples_seen == PAIRS and result.tokens_seen > 0
    assert 0 < reference_seconds < elapsed and 0 < result.seconds < elapsed
    assert results["reference_pairs_per_second"] == pytest.approx(PAIRS / reference_seconds)
    assert results["train_pairs_per_second"] == pytest.approx(PAIRS / result.seconds)
    assert results["train_tokens_per_second"] == pytest.approx(result.tokens_seen / result.seconds)
    assert results["train_seconds_per_step"] == pytest.approx(result.seconds / result.steps)
    assert results["peak_memory_mb"] > 0

    printed = capsys.readouterr().out
    assert f"ratio generate/hf_generate: {results['ratio_generate_hf']:.2f}" in printed
    assert results["ratio_generate_hf"] == pytest.approx(
        results["generation_tokens_per_second"] / results["hf_generate_tokens_per_second"]
    )
    for key, value in results.items():
        if key == "ratio_generate_hf":
            continue
        if key.startswith("ratio_"):  # the side-by-side lines: `ratio train/<peer>: R`
            peer = key.removeprefix("ratio_")
            assert f"ratio train/{peer}: {value:.2f}" in printed, key
            assert value == pytest.approx(
                results["spin_pairs_per_second"] / results[f"{peer}_pairs_per_second"]
            )
        else:
            assert f"{key:<32} {value:10.2f}" in printed, key
    # what bf16: auto chose here, with the ratio it measured, in one line
    (line,) = [x for x in printed.splitlines() if x.startswith("precision: ")]
    assert line.startswith("precision: spin.train.bf16: auto -> ")
    if "bf16_speedup" in results:
        assert f"bf16 {results['bf16_speedup']:.2f}x the speed of float32" in line
    assert (" -> bf16-autocast " in line) == (results["bf16"] == 1.0)

"""`spinflow benchmark` measures a real model and prints its figures."""

from __future__ import annotations

from spinflow.benchmark import run_benchmark
from spinflow.config import Params


def test_benchmark_times_generation_and_training(tiny_checkpoint_session, capsys):
    params = Params()
    params.generate.max_new_tokens = 4
    params.spin.train.batch_size = 2
    results = run_benchmark(params, model_dir=str(tiny_checkpoint_session), pairs=4)
    for key in (
        "generation_tokens_per_second",
        "reference_pairs_per_second",
        "train_pairs_per_second",
        "train_tokens_per_second",
        "peak_memory_mb",
    ):
        assert results[key] > 0, key
    assert results["train_seconds_per_step"] > 0
    printed = capsys.readouterr().out
    assert "train_pairs_per_second" in printed and "generation_tokens_per_second" in printed

"""Tests for spinflow.precision: what ``bf16: auto`` resolves to, and that it stays so."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from conftest import make_optim
from spinflow import precision, training
from spinflow.config import PromptParams
from spinflow.precision import Measurement

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NATIVE_CPU = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 avx512f amx_bf16\n"
PLAIN_CPU = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 avx512f\n"
RECORDS = [
    {"prompt": f"Repeat the word {w}.", "answer": f"{w} {w}"} for w in ["apple", "pear", "fig"]
]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def cpu_reports(monkeypatch):
    """Make the CPU report the given /proc/cpuinfo text (the capability check's only input)."""

    def set_text(text: str) -> None:
        monkeypatch.setattr(precision, "_cpuinfo", lambda: text)

    return set_text


@pytest.fixture
def sft_batch(tiny_tokenizer_session):
    examples = training.encode_sft(tiny_tokenizer_session, RECORDS, PromptParams())
    return training.sft_collate(tiny_tokenizer_session.pad_token_id)(examples)


def _count_measurements(monkeypatch, result: Measurement | None = None) -> list[int]:
    """Count calls of the probe; with ``result`` the probe is replaced by that measurement."""
    calls: list[int] = []
    real = precision.measure

    def counting(*args, **kwargs):
        calls.append(1)
        return result if result is not None else real(*args, **kwargs)

    monkeypatch.setattr(precision, "measure", counting)
    return calls


def _cache_files(cache) -> list:
    return sorted((cache / "precision").glob("*.json")) if (cache / "precision").exists() else []


def test_cpu_flags_decide_what_is_native(cpu_reports):
    cpu_reports(NATIVE_CPU)
    assert precision.native_bf16(CPU) == (True, "CPU flags amx_bf16")
    cpu_reports(PLAIN_CPU)
    native, why = precision.native_bf16(CPU)
    assert not native and "avx512_bf16" in why
    cpu_reports("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # Arm
    assert precision.native_bf16(CPU)[0]


def test_auto_is_float32_without_measuring_where_bf16_is_not_native(
    cpu_reports, monkeypatch, tiny_model, sft_batch, own_cache, caplog
):
    cpu_reports(PLAIN_CPU)
    calls = _count_measurements(monkeypatch)
    with caplog.at_level(logging.INFO, logger="spinflow.precision"):
        optim, chosen = precision.resolve_precision(
            make_optim(bf16="auto"), tiny_model, sft_batch, training.sft_loss_fn, key="sft.bf16"
        )
    assert optim.bf16 is False and chosen.bf16 is False
    assert chosen.reason.startswith("not native")
    assert calls == [] and _cache_files(own_cache) == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("sft.bf16: auto -> float32 (not native")


def test_true_and_false_are_taken_as_given(cpu_reports, monkeypatch, tiny_model, sft_batch):
    cpu_reports(PLAIN_CPU)
    calls = _count_measurements(monkeypatch)
    for setting in (True, False):
        optim, chosen = precision.resolve_precision(
            make_optim(bf16=setting), tiny_model, sft_batch, training.sft_loss_fn, key="sft.bf16"
        )
        assert optim.bf16 is setting and chosen.bf16 is setting
    assert calls == []


def test_probe_measures_both_precisions_and_changes_nothing(tiny_model, sft_batch):
    tiny_model.train()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    m = precision.measure(tiny_model, sft_batch, training.sft_loss_fn, CPU, rounds=1)
    assert torch.equal(torch.rand(3), expected_draw)  # random state as it was
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert m.float32_seconds > 0 and m.bf16_seconds > 0
    assert m.speedup == pytest.approx(m.float32_seconds / m.bf16_seconds)
    # bfloat16 arithmetic really ran: close to float32, not equal to it
    assert 0 < m.loss_difference < 0.05 and 0 < m.logps_difference < 0.05


def test_disagreement_beyond_the_tolerance_rejects_bf16(cpu_reports, tiny_model, sft_batch):
    cpu_reports(NATIVE_CPU)
    accepted = precision.auto_precision(
        tiny_model, sft_batch, training.sft_loss_fn, CPU, margin=0.0, tolerance=1.0
    )
    assert accepted.bf16, accepted.reason
    rejected = precision.auto_precision(
        tiny_model, sft_batch, training.sft_loss_fn, CPU, margin=0.0, tolerance=0.0
    )
    assert not rejected.bf16
    assert "more than the tolerance" in rejected.reason
    assert rejected.measurement.logps_difference > 0


def test_speed_under_the_margin_rejects_bf16(cpu_reports, tiny_model, sft_batch):
    cpu_reports(NATIVE_CPU)
    chosen = precision.auto_precision(
        tiny_model, sft_batch, training.sft_loss_fn, CPU, margin=math.inf, tolerance=1.0
    )
    assert not chosen.bf16 and "the speed of float32" in chosen.reason


def test_the_cache_keeps_the_choice(
    cpu_reports, monkeypatch, tiny_model, tiny_checkpoint, sft_batch, own_cache
):
    cpu_reports(NATIVE_CPU)
    calls = _count_measurements(monkeypatch)
    first = precision.auto_precision(
        tiny_model, sft_batch, training.sft_loss_fn, CPU, margin=0.0, tolerance=1.0
    )
    assert first.bf16 and not first.cached and calls == [1]
    (cache_file,) = _cache_files(own_cache)
    record = json.loads(cache_file.read_text())
    assert record["bf16"] is True and record["torch"] == torch.__version__
    assert record["device"]["name"] == "Test CPU"
    assert record["model"]["hidden_size"] == tiny_model.config.hidden_size

    # measuring again would now reject bf16: the cached decision must win
    slow = Measurement(0.1, 0.0, 0.0, 1.0, 10.0)
    calls = _count_measurements(monkeypatch, slow)
    again = precision.auto_precision(
        tiny_model, sft_batch, training.sft_loss_fn, CPU, margin=0.0, tolerance=1.0
    )
    assert again.bf16 and again.cached and calls == []
    assert again.measurement == first.measurement

    # another model shape is another key: measured afresh
    from spinflow.models import build_tiny_model, load_model

    wider = load_model(build_tiny_model(tiny_checkpoint.parent / "wider", seed=0, hidden_size=32))
    other = precision.auto_precision(
        wider, sft_batch, training.sft_loss_fn, CPU, margin=0.0, tolerance=1.0
    )
    assert calls == [1] and other.measurement == slow and len(_cache_files(own_cache)) == 2


def test_an_unreadable_cache_file_is_measured_again(
    cpu_reports, monkeypatch, tiny_model, sft_batch, own_cache, caplog
):
    cpu_reports(NATIVE_CPU)
    precision.auto_precision(
        tiny_model, sft_batch, training.sft_loss_fn, CPU, margin=0.0, tolerance=1.0
    )
    (cache_file,) = _cache_files(own_cache)
    cache_file.write_text("{not json")
    slow = Measurement(0.1, 0.0, 0.0, 1.0, 10.0)
    calls = _count_measurements(monkeypatch, slow)
    with caplog.at_level(logging.WARNING, logger="spinflow.precision"):
        chosen = precision.auto_precision(
            tiny_model, sft_batch, training.sft_loss_fn, CPU, margin=0.0, tolerance=1.0
        )
    assert calls == [1] and chosen.measurement == slow and not chosen.cached
    assert "unreadable precision cache" in caplog.text
    assert json.loads(cache_file.read_text())["measurement"]["speedup"] == 0.1


def test_auto_logs_its_choice_once_with_what_it_measured(
    cpu_reports, tiny_model, sft_batch, caplog
):
    cpu_reports(NATIVE_CPU)
    with caplog.at_level(logging.INFO, logger="spinflow.precision"):
        optim, chosen = precision.resolve_precision(
            make_optim(bf16="auto"), tiny_model, sft_batch, training.sft_loss_fn, key="sft.bf16"
        )
    m = chosen.measurement
    assert optim.bf16 is chosen.bf16
    assert chosen.bf16 == (m.speedup >= precision.SPEED_MARGIN)  # tiny model: agreement holds
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"sft.bf16: auto -> {chosen.name} (bf16 {m.speedup:.2f}x the speed")
    assert f"tolerance {precision.TOLERANCE:.0e}; measured now: " in line
    summary = chosen.summary()
    assert summary["bf16"] is chosen.bf16
    assert summary["bf16_speedup"] == round(m.speedup, 3)
    assert set(summary) == {"bf16", "bf16_speedup", "bf16_loss_difference", "bf16_logps_difference"}

"""Tests for spinflow.training: the loop, step counting, schedules, LoRA and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import make_optim
from spinflow import training
from spinflow.chat import prompt_ids
from spinflow.errors import TrainingError
from spinflow.io import RowsCsvStream, read_rows_csv, write_rows_csv
from spinflow.losses import masked_nll
from spinflow.models import load_model, load_tokenizer
from spinflow.schema import LoraParams, OptimParams, PromptParams

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = PromptParams(system_prompt=None, max_prompt_length=128, max_length=256)
SFT_RECORDS = [
    {"prompt": f"Repeat the word {w}.", "answer": f"{w} {w}"}
    for w in ["apple", "pear", "plum", "fig", "lime", "kiwi", "date"]
]


def test_training_is_reproducible(tiny_checkpoint_session, tiny_tokenizer_session):
    tok = tiny_tokenizer_session
    optim = make_optim(batch_size=2, epochs=1)

    def run():
        model = load_model(tiny_checkpoint_session)
        accelerator = training.make_accelerator(optim)
        examples = training.encode_sft(tok, SFT_RECORDS, PROMPT)
        result = training.train_loop(
            accelerator,
            model,
            examples,
            training.sft_collate(tok.pad_token_id),
            training.sft_loss_fn,
            optim,
            seed=3,
            desc="sft",
        )
        return [row["loss"] for row in result.history], model.state_dict()

    losses_a, state_a = run()
    losses_b, state_b = run()
    assert losses_a == losses_b
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_sft_steps_lower_the_answer_nll(tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    examples = training.encode_sft(tok, SFT_RECORDS, PROMPT)
    batch = training.sft_collate(tok.pad_token_id)(examples)

    def nll() -> float:
        with torch.no_grad():
            logits = tiny_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        return masked_nll(logits, batch["input_ids"], batch["loss_mask"]).item()

    before = nll()
    optim = make_optim(learning_rate=3e-3, batch_size=4, epochs=3)
    _train_sft(tok, tiny_model, optim, examples=examples)
    tiny_model.eval()
    assert nll() < before - 0.5


# ---------------------------------------------------------------------------------------------
# Failures, step counting


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_training_error(tiny_tokenizer_session, tiny_model, bad):
    tok = tiny_tokenizer_session
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = out.logits.sum() * 0 + (bad if len(calls) == 3 else 1.0)
        return loss, {"loss": loss.item()}

    optim = make_optim(batch_size=2)
    with pytest.raises(TrainingError, match=r"mysft: loss is (nan|inf) at optimizer step 3"):
        training.train_loop(
            training.make_accelerator(optim),
            tiny_model,
            training.encode_sft(tok, SFT_RECORDS, PROMPT),
            training.sft_collate(tok.pad_token_id),
            loss_fn,
            optim,
            seed=0,
            desc="mysft",
        )
    assert len(calls) == 3


def test_no_examples_raises_training_error(tiny_tokenizer_session, tiny_model):
    optim = make_optim()
    with pytest.raises(TrainingError, match="no training examples"):
        training.train_loop(
            training.make_accelerator(optim),
            tiny_model,
            [],
            training.sft_collate(tiny_tokenizer_session.pad_token_id),
            training.sft_loss_fn,
            optim,
            seed=0,
            desc="empty",
        )


def _sft_loop(
    tok,
    model,
    optim,
    records=SFT_RECORDS,
    *,
    examples=None,
    accelerator=None,
    loss_fn=training.sft_loss_fn,
    **loop_args,
):
    """``train_loop`` with the SFT loss (or ``loss_fn``) on ``records`` (or ready
    ``examples``), seed 0."""
    return training.train_loop(
        accelerator or training.make_accelerator(optim),
        model,
        training.encode_sft(tok, records, PROMPT) if examples is None else examples,
        training.sft_collate(tok.pad_token_id),
        loss_fn,
        optim,
        seed=0,
        **{"desc": "sft", **loop_args},
    )


def _train_sft(tok, model, optim, *, accelerator=None, examples=None, desc="sft"):
    """Plain SFT on the fixture records with ``optim``; returns the accelerator it used."""
    accelerator = accelerator or training.make_accelerator(optim)
    _sft_loop(tok, model, optim, examples=examples, accelerator=accelerator, desc=desc)
    return accelerator


def _sft_run(tok, model, n_examples: int, max_steps: int | None = None, **optim_changes):
    optim = make_optim(learning_rate=1e-4, optimizer="sgd", **optim_changes)
    records = [SFT_RECORDS[i % len(SFT_RECORDS)] for i in range(n_examples)]
    return _sft_loop(tok, model, optim, records, max_steps=max_steps)


@pytest.mark.parametrize(
    ("n_examples", "batch_size", "accumulation", "epochs"),
    [(5, 2, 2, 2), (6, 2, 1, 1), (7, 1, 3, 1), (4, 4, 3, 2), (9, 2, 4, 1)],
)
def test_optimizer_steps_with_gradient_accumulation(
    tiny_tokenizer_session, tiny_model, n_examples, batch_size, accumulation, epochs
):
    result = _sft_run(
        tiny_tokenizer_session,
        tiny_model,
        n_examples,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        epochs=epochs,
    )
    micro = math.ceil(n_examples / batch_size)
    expected = math.ceil(micro / accumulation) * epochs
    assert result.steps == expected
    assert [row["step"] for row in result.history] == list(range(1, expected + 1))
    assert result.examples_seen == n_examples * epochs
    assert result.history[-1]["epoch"] == pytest.approx(epochs)


def test_accumulated_step_epochs(tiny_tokenizer_session, tiny_model):
    # 5 examples, batch 2: micro-batches of 2, 2, 1; accumulating 2: steps close after 2 and 3
    result = _sft_run(
        tiny_tokenizer_session,
        tiny_model,
        5,
        batch_size=2,
        gradient_accumulation_steps=2,
        epochs=2,
    )
    epochs = [row["epoch"] for row in result.history]
    assert epochs == pytest.approx([2 / 3, 1.0, 5 / 3, 2.0])


def test_max_steps_cycles_beyond_one_epoch(tiny_tokenizer_session, tiny_model):
    result = _sft_run(tiny_tokenizer_session, tiny_model, 4, max_steps=5, batch_size=2, epochs=1)
    assert result.steps == 5
    assert [row["epoch"] for row in result.history] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])
    assert result.examples_seen == 10


def test_max_steps_shorter_than_an_epoch(tiny_tokenizer_session, tiny_model):
    result = _sft_run(tiny_tokenizer_session, tiny_model, 7, max_steps=2, batch_size=2, epochs=3)
    assert result.steps == 2
    assert result.examples_seen == 4


def test_accumulation_after_an_interrupted_epoch(tiny_tokenizer_session, tiny_checkpoint_session):
    tok = tiny_tokenizer_session
    _sft_run(tok, load_model(tiny_checkpoint_session), 7, max_steps=1, batch_size=2)
    result = _sft_run(
        tok,
        load_model(tiny_checkpoint_session),
        5,
        batch_size=2,
        gradient_accumulation_steps=2,
        epochs=1,
    )
    assert result.steps == 2
    assert [row["epoch"] for row in result.history] == pytest.approx([2 / 3, 1.0])


def test_linear_schedule_with_warmup(tiny_tokenizer_session, tiny_model):
    result = _sft_run(
        tiny_tokenizer_session,
        tiny_model,
        8,
        batch_size=1,
        epochs=1,
        scheduler="linear",
        warmup_ratio=0.25,
    )
    # each row holds the rate its own update used: 2 warmup steps from 0, then linear decay
    rates = [row["learning_rate"] for row in result.history]
    assert len(rates) == 8
    assert rates[0] == pytest.approx(0.0, abs=1e-12)
    assert rates[1] == pytest.approx(0.5e-4)
    assert max(rates) == pytest.approx(1e-4)
    assert rates.index(max(rates)) == 2
    assert rates[-1] == pytest.approx(1e-4 / 6)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:], strict=False))


# ---------------------------------------------------------------------------------------------
# LoRA and checkpoints


LORA_TARGETS = ["q_proj", "v_proj"]


def _loramake_optim() -> OptimParams:
    return make_optim(
        learning_rate=1e-2,
        batch_size=4,
        lora=LoraParams(enabled=True, r=4, alpha=8, target_modules=LORA_TARGETS),
    )


def test_apply_lora_is_a_no_op_when_disabled(tiny_model):
    assert training.apply_lora(tiny_model, make_optim()) is tiny_model
    assert training.merge_lora(tiny_model) is tiny_model


def test_lora_trains_adapters_and_merges_into_a_plain_model(tiny_tokenizer_session, tiny_model):
    tok = tiny_tokenizer_session
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    optim = _loramake_optim()
    model = training.apply_lora(tiny_model, optim)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    assert {n.split(".")[-4] for n in trainable} == set(LORA_TARGETS)

    _train_sft(tok, model, optim, desc="lora")
    plain = training.merge_lora(model)
    assert type(plain).__name__ == "LlamaForCausalLM"
    merged = plain.state_dict()
    assert set(merged) == set(original)
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert changed
    assert all(k.split(".")[-2] in LORA_TARGETS for k in changed), changed


def test_save_checkpoint_reloads(tiny_tokenizer_session, tiny_model, tmp_path):
    tok = tiny_tokenizer_session
    optim = make_optim(batch_size=4)
    accelerator = _train_sft(tok, tiny_model, optim)
    out = tmp_path / "models" / "theta_1"
    training.save_checkpoint(accelerator, tiny_model, tok, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["theta_1"]
    reloaded = load_model(out)
    expected = tiny_model.state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    reloaded_tok = load_tokenizer(out)
    assert reloaded_tok.chat_template == tok.chat_template
    assert prompt_ids(reloaded_tok, "Hi?", None, 64) == prompt_ids(tok, "Hi?", None, 64)


def test_save_checkpoint_merges_lora(
    tiny_tokenizer_session, tiny_model, tiny_checkpoint_session, tmp_path
):
    tok = tiny_tokenizer_session
    optim = _loramake_optim()
    model = training.apply_lora(tiny_model, optim)
    accelerator = _train_sft(tok, model, optim, desc="lora")
    model.eval()
    ids = torch.tensor([prompt_ids(tok, "Repeat the word fig.", None, 64)])
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits

    out = tmp_path / "theta_1"
    training.save_checkpoint(accelerator, model, tok, out)
    assert not (out / "adapter_config.json").exists()
    reloaded = load_model(out).eval()
    original_keys = set(load_model(tiny_checkpoint_session).state_dict())
    assert set(reloaded.state_dict()) == original_keys
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted_logits)


# ---------------------------------------------------------------------------------------------
# Settings verified by their effect on the weights


def _one_sft_step(tok, checkpoint, records, **optim_changes):
    """The weights after one SGD optimizer step of plain SFT on ``records``, and the loop's result."""
    optim = make_optim(
        **{"learning_rate": 0.5, "optimizer": "sgd", "max_grad_norm": None, **optim_changes}
    )
    model = load_model(checkpoint)
    return model, _sft_loop(tok, model, optim, records, items=training.answer_tokens)


def test_gradient_accumulation_matches_the_larger_batch(
    tiny_tokenizer_session, tiny_checkpoint_session
):
    records = SFT_RECORDS[:4]  # answers of 8, 8, 8 and 7 tokens: the micro-batches differ
    whole, whole_result = _one_sft_step(
        tiny_tokenizer_session, tiny_checkpoint_session, records, batch_size=4
    )
    split, split_result = _one_sft_step(
        tiny_tokenizer_session,
        tiny_checkpoint_session,
        records,
        batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert whole_result.steps == split_result.steps == 1
    # the logged loss is the loss of the whole step, not the mean of the two halves' losses
    assert split_result.history[0]["loss"] == pytest.approx(whole_result.history[0]["loss"])
    start = load_model(tiny_checkpoint_session).state_dict()
    split_state = split.state_dict()
    moved = 0
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(split_state[key], value, rtol=1e-4, atol=1e-6, msg=key)
        moved += not torch.equal(value, start[key])
    assert moved > 0  # the step did change the weights


def test_clipping_logs_the_norm_before_clipping_and_clips_the_update(
    tiny_tokenizer_session, tiny_checkpoint_session
):
    tok = tiny_tokenizer_session
    records = SFT_RECORDS[:4]
    # the gradient of the whole batch's loss, by hand
    model = load_model(tiny_checkpoint_session)
    batch = training.sft_collate(tok.pad_token_id)(training.encode_sft(tok, records, PROMPT))
    loss, _ = training.sft_loss_fn(model, batch)
    loss.backward()
    gradient = {name: p.grad.clone() for name, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient.values()])).item()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}

    max_norm = 1e-3
    assert norm > 100 * max_norm  # clipping must bite
    clipped, result = _one_sft_step(tok, tiny_checkpoint_session, records, batch_size=4)
    assert "grad_norm" not in result.history[0]  # clipping off: nothing to log
    clipped, result = _one_sft_step(
        tok, tiny_checkpoint_session, records, batch_size=4, max_grad_norm=max_norm
    )
    assert result.history[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    learning_rate = 0.5  # _one_sft_step's SGD rate
    scale = max_norm / (norm + 1e-6)  # torch's clip_grad_norm_
    names = list(start)
    update = torch.cat(
        [(dict(clipped.named_parameters())[n].detach() - start[n]).flatten() for n in names]
    )
    expected = torch.cat([(-learning_rate * scale * gradient[n]).flatten() for n in names])
    # the update is the gradient scaled down to max_grad_norm: its norm is lr × max_grad_norm and
    # it points along the gradient (float32 rounding of w + Δ limits each element to ~1e-7·|w|)
    assert update.norm().item() == pytest.approx(learning_rate * max_norm, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(update, expected, dim=0).item() > 0.9999


# ---------------------------------------------------------------------------------------------
# Length-grouped batches


def test_length_grouped_batches_are_seeded_and_cover_every_example():
    lengths = [5, 90, 7, 88, 6, 91, 89, 87, 86, 3]

    def epochs(seed):
        sampler = training.LengthGroupedBatches(lengths, 2, torch.Generator().manual_seed(seed))
        return [list(sampler) for _ in range(2)]

    first = epochs(0)
    assert first == epochs(0)
    assert first != epochs(1)
    for batches in first:
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert len(batches) == len(training.LengthGroupedBatches(lengths, 2, torch.Generator()))
    padding = sum(
        max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in first[0]
    )
    assert padding < 10  # random pairs of these lengths would pad by hundreds


def test_group_by_length_off_keeps_the_plain_shuffled_loader(tiny_tokenizer_session):
    examples = training.encode_sft(tiny_tokenizer_session, SFT_RECORDS, PROMPT)
    loader = training.make_loader(
        examples, training.sft_collate(0), make_optim(batch_size=2, group_by_length=False), 0
    )
    assert loader.batch_size == 2
    grouped = training.make_loader(
        examples, training.sft_collate(0), make_optim(batch_size=2, group_by_length=True), 0
    )
    assert isinstance(grouped.batch_sampler, training.LengthGroupedBatches)


def test_make_accelerator_needs_a_resolved_precision():
    with pytest.raises(TrainingError, match="bf16: 'auto' must be resolved"):
        training.make_accelerator(make_optim(bf16="auto"))


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_autocasts_the_loss_the_loop_computes(tiny_tokenizer_session, tiny_model, bf16):
    """bf16 reaches the loss function even though it calls the model's parts directly (accelerate
    autocasts only the prepared model's forward); then float32 again, in the same process."""
    tok = tiny_tokenizer_session
    optim = make_optim(batch_size=4, bf16=bf16)
    seen = []

    def loss_fn(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return training.sft_loss_fn(model, batch)

    training.train_loop(
        training.make_accelerator(optim),
        tiny_model,
        training.encode_sft(tok, SFT_RECORDS[:4], PROMPT),
        training.sft_collate(tok.pad_token_id),
        loss_fn,
        optim,
        seed=0,
        desc="sft",
    )
    assert seen == [bf16]
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


# ---------------------------------------------------------------------------------------------
# The steps CSV, written as training goes


def _csv_bytes(tmp_path, rows) -> bytes:
    """What the stage's one-piece write makes of ``rows``."""
    path = tmp_path / "one-piece.csv"
    write_rows_csv(path, rows)
    return path.read_bytes()


def test_each_step_is_in_the_steps_csv_as_it_ends(tiny_tokenizer_session, tiny_model, tmp_path):
    """After every step the file holds the bytes write_rows_csv writes for the history so far
    (floats to 8 digits; a column first seen at step 3 widens the header), and the stage's final
    one-piece write leaves it as it is; an earlier run's file is gone from the first step."""
    tok = tiny_tokenizer_session
    path = tmp_path / "plots" / "sft_steps.csv"
    path.parent.mkdir()
    path.write_text("loss,step\r\n9,1\r\n9,2\r\n9,3\r\n9,4\r\n9,5\r\n", encoding="utf-8")
    seen: list[bytes] = []

    def loss_fn(model, batch):
        loss, metrics = training.sft_loss_fn(model, batch)
        metrics["loss_scaled"] = loss.item() / 3e7  # digits beyond the 8 the file keeps
        if len(seen) >= 2:
            metrics["late"] = 1 / 3
        return loss, metrics

    def on_step(row):
        seen.append(path.read_bytes())

    optim = make_optim(batch_size=2, max_grad_norm=1.0)
    result = _sft_loop(tok, tiny_model, optim, loss_fn=loss_fn, on_step=on_step, steps_csv=path)
    history = result.history
    assert len(history) == len(seen) == 4
    for step, streamed in enumerate(seen, start=1):
        assert streamed == _csv_bytes(tmp_path, history[:step]), step
    header = [text.splitlines()[0] for text in (seen[1], seen[2])]
    assert header == [
        b"loss,loss_scaled,step,epoch,learning_rate,grad_norm",
        b"loss,loss_scaled,step,epoch,learning_rate,grad_norm,late",
    ]
    assert "e-" in seen[0].decode().splitlines()[1].split(",")[1]  # 8 digits of ~1e-7
    assert path.read_bytes() == seen[-1]
    write_rows_csv(path, history)  # the stage's own write at its end
    assert path.read_bytes() == seen[-1]


def test_a_resumed_training_writes_the_steps_csv_again_from_its_state(
    tiny_tokenizer_session, tiny_checkpoint_session, tmp_path, monkeypatch
):
    """A training stopped after step 3 (state saved at step 2) leaves its 3 steps; resumed, the
    file is written again from the 2 restored steps, then gains steps 3 and 4."""
    monkeypatch.chdir(tmp_path)
    tok = tiny_tokenizer_session
    path = tmp_path / "steps.csv"
    resume = training.Resume(tmp_path / "resume", 2, "f" * 64)
    optim = make_optim(batch_size=2)
    seen: dict[int, bytes] = {}

    def run(on_step):
        return _sft_loop(
            tok,
            load_model(tiny_checkpoint_session),
            optim,
            resume=resume,
            steps_csv=path,
            on_step=on_step,
        )

    def stop_at_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(stop_at_3)
    interrupted = path.read_bytes()
    assert len(interrupted.splitlines()) == 1 + 3

    result = run(lambda row: seen.setdefault(row["step"], path.read_bytes()))
    assert sorted(seen) == [3, 4]
    assert [row["step"] for row in result.history] == [1, 2, 3, 4]
    assert seen[3] == _csv_bytes(tmp_path, result.history[:3])
    assert path.read_bytes() == _csv_bytes(tmp_path, result.history)
    assert path.read_bytes().startswith(interrupted.splitlines(keepends=True)[0])


def test_the_committed_steps_files_come_out_the_same_streamed(tmp_path):
    """The default pipeline's steps files (hashed by DVC), their rows streamed one at a time,
    are written byte for byte as they are."""
    committed = sorted((Path(__file__).resolve().parents[1] / "plots").glob("*_steps.csv"))
    assert committed
    for source in committed:
        path = tmp_path / source.name
        with RowsCsvStream(path) as stream:
            for row in read_rows_csv(source):
                stream.append(row)
        assert path.read_bytes() == source.read_bytes(), source.name

"""spinflow's SPIN equals TRL's DPOTrainer set up as SPIN: log-probs, loss, one optimizer step.

TRL is a dev dependency (pip install -e .[dev]); both are given the same token ids
(:func:`spinflow.benchmark.trl_spin.trl_spin_trainer`), so any difference is in the computation.
"""

from __future__ import annotations

import pytest
import torch

from spinflow import pair_training, training
from spinflow.benchmark.trl_spin import trl_spin_trainer
from spinflow.config import OptimParams, PromptParams
from spinflow.losses import spin_loss
from spinflow.models import load_model

pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = PromptParams(system_prompt=None, max_prompt_length=128, max_length=256)
PAIRS = [
    {"prompt": f"What is {i} plus {i}?", "real": f"{i} plus {i} is {2 * i}.", "generated": g}
    for i, g in enumerate(["zq xx", "banana, yes: it is", "no idea at all", "7"])
]
BETA = 0.1
OPTIM = OptimParams(
    batch_size=len(PAIRS),
    optimizer="sgd",
    learning_rate=0.01,
    scheduler="constant",
    warmup_ratio=0.0,
    max_grad_norm=None,
    group_by_length=False,
    bf16=False,
)


def _models(checkpoint):
    """The opponent θk and a policy that already differs from it (so the loss is not log 2)."""
    reference = load_model(checkpoint).eval()
    policy = load_model(checkpoint)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return reference, policy


def _trl_metrics(trainer, batch) -> dict[str, float]:
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": loss.item(), **metrics}


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_logps_loss_and_one_step_equal_trl(
    tiny_tokenizer_session, tiny_checkpoint_session, tmp_path, kind
):
    tok = tiny_tokenizer_session
    reference, policy = _models(tiny_checkpoint_session)
    accelerator = training.make_accelerator(OPTIM)
    examples = pair_training.encode_pairs(tok, PAIRS, PROMPT)
    examples = pair_training.reference_logps(accelerator, reference, examples, 2, tok.pad_token_id)
    policy_before = {n: p.detach().clone() for n, p in policy.named_parameters()}

    batch = pair_training.pair_collate(tok.pad_token_id)(examples)
    with torch.no_grad():
        logps = training.forward_logps(policy, batch)
    n = len(PAIRS)
    ours = spin_loss(
        logps[:n],
        logps[n:],
        batch["reference_real_logps"],
        batch["reference_generated_logps"],
        beta=BETA,
        kind=kind,
    )

    trl_policy = load_model(tiny_checkpoint_session)
    trl_policy.load_state_dict(policy.state_dict())
    trainer = trl_spin_trainer(
        trl_policy,
        tok,
        examples,
        OPTIM,
        beta=BETA,
        loss=kind,
        seed=0,
        out_dir=tmp_path / "trl",
        ref_model=reference,
        max_steps=1,
    )
    dataset = trainer.train_dataset
    for i, example in enumerate(examples):
        metrics = _trl_metrics(trainer, trainer.data_collator([dataset[i]]))
        assert metrics["logps/chosen"] == pytest.approx(logps[i].item(), abs=1e-5)
        assert metrics["logps/rejected"] == pytest.approx(logps[n + i].item(), abs=1e-5)
        reference_real = metrics["logps/chosen"] - metrics["rewards/chosen"] / BETA
        reference_generated = metrics["logps/rejected"] - metrics["rewards/rejected"] / BETA
        assert reference_real == pytest.approx(example.reference_real_logps, abs=1e-4)
        assert reference_generated == pytest.approx(example.reference_generated_logps, abs=1e-4)
        assert metrics["loss"] == pytest.approx(ours.losses[i].item(), abs=1e-5)
    whole = _trl_metrics(trainer, trainer.data_collator([dataset[i] for i in range(n)]))
    assert whole["loss"] == pytest.approx(ours.loss.item(), abs=1e-5)

    # one SGD step of each moves the weights the same way
    trainer.train()
    training.train_loop(
        accelerator,
        policy,
        examples,
        pair_training.pair_collate(tok.pad_token_id),
        pair_training.spin_loss_fn(BETA, kind),
        OPTIM,
        seed=0,
        desc="spin",
        max_steps=1,
    )
    trl_after = dict(trl_policy.named_parameters())
    moved = 0.0
    for name, param in policy.named_parameters():
        ours_step = param.detach() - policy_before[name]
        trl_step = trl_after[name].detach() - policy_before[name]
        torch.testing.assert_close(ours_step, trl_step, atol=1e-6, rtol=1e-4)
        moved += float(ours_step.abs().sum())
    assert moved > 0

"""Tests for spinflow.losses: the SPIN loss, sequence log-probs and the SFT loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spinflow.chat import Encoded, collate
from spinflow.losses import masked_nll, sequence_logps, spin_loss

# Two pairs, β = 0.5:
#   real ratios      = policy_real - reference_real           = [0.5, 0.0]
#   generated ratios = policy_generated - reference_generated = [-0.5, 0.5]
#   logits = β·(real - generated)                               = [0.5, -0.25]
POLICY_REAL = [-1.0, -2.0]
POLICY_GENERATED = [-3.0, -1.0]
REFERENCE_REAL = [-1.5, -2.0]
REFERENCE_GENERATED = [-2.5, -1.5]
BETA = 0.5


def _inputs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    tensors = [
        torch.tensor(v, dtype=torch.float64)
        for v in (POLICY_REAL, POLICY_GENERATED, REFERENCE_REAL, REFERENCE_GENERATED)
    ]
    if requires_grad:
        tensors[0].requires_grad_(True)
        tensors[1].requires_grad_(True)
    return tuple(tensors)


# ---------------------------------------------------------------------------------------------
# spin_loss


def test_sigmoid_loss_matches_hand_computed_values():
    out = spin_loss(*_inputs(), beta=BETA, kind="sigmoid")
    # −log σ(0.5) = log(1 + e^−0.5);  −log σ(−0.25) = log(1 + e^0.25)
    expected = [0.4740769841801067, 0.8259394198788436]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.6500082020294751, abs=1e-12)
    assert out.loss.dim() == 0


def test_hinge_loss_matches_hand_computed_values():
    out = spin_loss(*_inputs(), beta=BETA, kind="hinge")
    # relu(1 − 0.5) = 0.5;  relu(1 + 0.25) = 1.25
    assert out.losses.tolist() == pytest.approx([0.5, 1.25], abs=1e-12)
    assert out.loss.item() == pytest.approx(0.875, abs=1e-12)


def test_hinge_loss_is_zero_beyond_the_margin():
    zero = torch.zeros(1)
    out = spin_loss(torch.tensor([30.0]), zero, zero, zero, beta=0.1, kind="hinge")
    assert out.losses.tolist() == [0.0]
    out = spin_loss(torch.tensor([5.0]), zero, zero, zero, beta=0.1, kind="hinge")
    assert out.losses.tolist() == pytest.approx([0.5])


def test_policy_equal_to_reference_gives_log_two():
    logps = torch.tensor([-4.0, -7.5, -1.25])
    out = spin_loss(logps, logps - 3.0, logps, logps - 3.0, beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2.0)] * 3, abs=1e-6)
    assert out.margins.tolist() == pytest.approx([0.0] * 3, abs=1e-7)
    assert out.accuracy.tolist() == [0.0, 0.0, 0.0]


def test_rewards_margins_and_accuracy():
    out = spin_loss(*_inputs(), beta=BETA)
    assert out.real_rewards.tolist() == pytest.approx([0.25, 0.0])
    assert out.generated_rewards.tolist() == pytest.approx([-0.25, 0.25])
    assert out.margins.tolist() == pytest.approx([0.5, -0.25])
    assert out.accuracy.tolist() == [1.0, 0.0]


def test_rewards_are_detached():
    out = spin_loss(*_inputs(requires_grad=True), beta=BETA)
    assert out.loss.requires_grad
    assert not out.real_rewards.requires_grad
    assert not out.generated_rewards.requires_grad


def test_sigmoid_loss_is_dpo_with_real_as_chosen():
    torch.manual_seed(0)
    policy_real, policy_generated, reference_real, reference_generated = (
        torch.randn(16, dtype=torch.float64) * 20 - 50 for _ in range(4)
    )
    beta = 0.1
    out = spin_loss(policy_real, policy_generated, reference_real, reference_generated, beta=beta)

    # The SPIN paper's form
    spin_form = -F.logsigmoid(
        beta * ((policy_real - reference_real) - (policy_generated - reference_generated))
    )
    # DPO: chosen = real, rejected = generated, written as log-ratios of the chosen and rejected
    # answers under policy vs reference, through softplus(−x) = −log σ(x)
    chosen_logratios = policy_real - reference_real
    rejected_logratios = policy_generated - reference_generated
    dpo = F.softplus(-beta * (chosen_logratios - rejected_logratios))
    # ... and the "policy logits minus reference logits" arrangement of TRL's DPO trainer
    trl_logits = (policy_real - policy_generated) - (reference_real - reference_generated)
    trl = -F.logsigmoid(beta * trl_logits)

    torch.testing.assert_close(out.losses, spin_form)
    torch.testing.assert_close(out.losses, dpo)
    torch.testing.assert_close(out.losses, trl)
    torch.testing.assert_close(out.loss, dpo.mean())


def test_swapping_real_and_generated_changes_the_loss_by_the_logit():
    real, generated, ref_real, ref_generated = _inputs()
    forward = spin_loss(real, generated, ref_real, ref_generated, beta=BETA)
    swapped = spin_loss(generated, real, ref_generated, ref_real, beta=BETA)
    # softplus(−x) − softplus(x) = −x
    torch.testing.assert_close(
        forward.losses - swapped.losses, -torch.tensor([0.5, -0.25], dtype=torch.float64)
    )


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_gradient_raises_real_and_lowers_generated(kind):
    real, generated, ref_real, ref_generated = _inputs(requires_grad=True)
    out = spin_loss(real, generated, ref_real, ref_generated, beta=BETA, kind=kind)
    out.loss.backward()
    assert (real.grad < 0).all(), real.grad
    assert (generated.grad > 0).all(), generated.grad


def test_sigmoid_gradient_value():
    real, generated, ref_real, ref_generated = _inputs(requires_grad=True)
    spin_loss(real, generated, ref_real, ref_generated, beta=BETA).loss.backward()
    # d/d policy_real of mean(−log σ(β·z)) = −β·σ(−β·z)/n
    logits = torch.tensor([0.5, -0.25], dtype=torch.float64)
    expected = -BETA * torch.sigmoid(-logits) / 2
    torch.testing.assert_close(real.grad, expected)
    torch.testing.assert_close(generated.grad, -expected)


def test_unknown_loss_kind_is_rejected():
    with pytest.raises(ValueError, match="ipo"):
        spin_loss(*_inputs(), kind="ipo")


# ---------------------------------------------------------------------------------------------
# sequence_logps and masked_nll

PAD = EOS = 2
VOCAB = 7


def _pad_equals_eos_batch() -> dict[str, torch.Tensor]:
    """Two sequences whose answers end with eos, right-padded with that same id."""
    encoded = [
        Encoded([1, 5, 6, 3, 4, EOS], prompt_length=3),  # answer 3 4 <eos>
        Encoded([1, 6, 3, EOS], prompt_length=2),  # answer 3 <eos>, then two pads
    ]
    return collate(encoded, pad_token_id=PAD)


def _manual_logps(logits, labels, mask) -> list[float]:
    totals = []
    for b in range(labels.size(0)):
        total = 0.0
        for t in range(1, labels.size(1)):
            if mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
        totals.append(total)
    return totals


def test_sequence_logps_matches_a_manual_loop():
    torch.manual_seed(1)
    batch = _pad_equals_eos_batch()
    logits = torch.randn(2, 6, VOCAB)
    got = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    expected = _manual_logps(logits, batch["input_ids"], batch["loss_mask"])
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got.dtype == torch.float32


def test_sequence_logps_counts_the_eos_token():
    torch.manual_seed(2)
    batch = _pad_equals_eos_batch()
    logits = torch.randn(2, 6, VOCAB)
    with_eos = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    # a mask built by comparing ids with the pad id drops the end-of-answer token
    id_mask = batch["loss_mask"] * (batch["input_ids"] != PAD)
    without_eos = sequence_logps(logits, batch["input_ids"], id_mask)
    eos_logps = torch.stack(
        [
            torch.log_softmax(logits[0, 4], -1)[EOS],  # position 5 is predicted at 4
            torch.log_softmax(logits[1, 2], -1)[EOS],  # position 3 is predicted at 2
        ]
    )
    torch.testing.assert_close(with_eos - without_eos, eos_logps)


def test_sequence_logps_ignores_prompt_and_padding_logits():
    torch.manual_seed(3)
    batch = _pad_equals_eos_batch()
    logits = torch.randn(2, 6, VOCAB)
    before = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    changed = logits.clone()
    changed[0, :2] += 100 * torch.randn(2, VOCAB)  # predict prompt tokens 1..2 of row 0
    changed[1, 3:] += 100 * torch.randn(3, VOCAB)  # predict the padding of row 1
    after = sequence_logps(changed, batch["input_ids"], batch["loss_mask"])
    torch.testing.assert_close(before, after)


def test_sequence_logps_of_uniform_logits():
    batch = _pad_equals_eos_batch()
    logits = torch.zeros(2, 6, VOCAB)
    got = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    # 3 answer tokens (incl. eos) in row 0 and 2 in row 1, each with probability 1/VOCAB
    assert got.tolist() == pytest.approx([-3 * math.log(VOCAB), -2 * math.log(VOCAB)])


def test_masked_nll_is_mean_negative_logp_per_answer_token():
    torch.manual_seed(4)
    batch = _pad_equals_eos_batch()
    logits = torch.randn(2, 6, VOCAB)
    nll = masked_nll(logits, batch["input_ids"], batch["loss_mask"])
    manual = _manual_logps(logits, batch["input_ids"], batch["loss_mask"])
    assert nll.item() == pytest.approx(-sum(manual) / 5, abs=1e-5)


def test_masked_nll_of_uniform_logits_is_log_vocab():
    batch = _pad_equals_eos_batch()
    nll = masked_nll(torch.zeros(2, 6, VOCAB), batch["input_ids"], batch["loss_mask"])
    assert nll.item() == pytest.approx(math.log(VOCAB))


def test_masked_nll_with_empty_mask_is_zero_not_nan():
    batch = _pad_equals_eos_batch()
    nll = masked_nll(
        torch.randn(2, 6, VOCAB), batch["input_ids"], torch.zeros_like(batch["loss_mask"])
    )
    assert nll.item() == 0.0


def test_masked_nll_gradient_flows_only_to_answer_positions():
    torch.manual_seed(5)
    batch = _pad_equals_eos_batch()
    logits = torch.randn(2, 6, VOCAB, requires_grad=True)
    masked_nll(logits, batch["input_ids"], batch["loss_mask"]).backward()
    touched = (logits.grad.abs().sum(-1) > 0).long()
    # position t carries the gradient of token t+1
    assert touched.tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]

"""The SPIN loss, a pure function on tensors.

For a pair (x, real answer y, generated answer y') and the opponent θk:

    logits = (log pθ(y|x) − log pθk(y|x)) − (log pθ(y'|x) − log pθk(y'|x))
    sigmoid: ℓ = −log σ(β · logits)          (the paper's logistic loss)
    hinge:   ℓ = max(0, 1 − β · logits)

with sequence log-probabilities summed over answer tokens. This is DPO's sigmoid loss with
chosen = real and rejected = generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SpinLossOutput:
    loss: torch.Tensor  # scalar, mean over pairs
    losses: torch.Tensor  # [pairs]
    real_rewards: torch.Tensor  # β·(log pθ(y) − log pθk(y)), detached
    generated_rewards: torch.Tensor  # β·(log pθ(y') − log pθk(y')), detached

    @property
    def margins(self) -> torch.Tensor:
        return self.real_rewards - self.generated_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.real_rewards > self.generated_rewards).float()


def spin_logits(
    policy_real_logps, policy_generated_logps, reference_real_logps, reference_generated_logps, beta
):
    """β·[(log pθ(y) − log pθk(y)) − (log pθ(y') − log pθk(y'))]: how much more the policy than
    the opponent prefers the real answer to the generated one (SPIN's implicit reward margin).

    Works element-wise on tensors and on plain floats alike; the loss and the evaluation's
    reward margin both use it.
    """
    return beta * (
        (policy_real_logps - reference_real_logps)
        - (policy_generated_logps - reference_generated_logps)
    )


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    reference_real_logps: torch.Tensor,
    reference_generated_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
) -> SpinLossOutput:
    """SPIN loss of a batch of pairs; every input is a [pairs] tensor of summed log-probs."""
    real_ratio = policy_real_logps - reference_real_logps
    generated_ratio = policy_generated_logps - reference_generated_logps
    logits = spin_logits(
        policy_real_logps,
        policy_generated_logps,
        reference_real_logps,
        reference_generated_logps,
        beta,
    )
    if kind == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif kind == "hinge":
        losses = torch.relu(1.0 - logits)
    else:
        raise ValueError(f"unknown SPIN loss {kind!r} (expected 'sigmoid' or 'hinge')")
    return SpinLossOutput(
        loss=losses.mean(),
        losses=losses,
        real_rewards=(beta * real_ratio).detach(),
        generated_rewards=(beta * generated_ratio).detach(),
    )


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each sequence.

    ``logits`` [batch, length, vocab] come from a forward pass over ``labels`` [batch, length];
    position t predicts token t+1. ``loss_mask`` [batch, length] is 1 on answer tokens.
    """
    shifted_logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = loss_mask[:, 1:].to(shifted_logits.dtype)
    token_logps = torch.gather(
        shifted_logits.float().log_softmax(-1), 2, targets.unsqueeze(-1)
    ).squeeze(-1)
    return (token_logps * mask).sum(-1)


def masked_nll(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per answer token over the batch (the SFT loss)."""
    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)

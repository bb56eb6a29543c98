"""Log-probabilities of answer tokens under a causal language model, without full logits.

Every method scores the same thing: the log-probability of some tokens (the answers) given what
comes before them. A batch names the tokens it scores (:class:`Scored`): for each one, the flat
position of the hidden state that predicts it, its id, and the sequence ("segment") whose sum it
adds to. :func:`segment_logps` runs the model's transformer body once, takes the hidden states of
those positions only and projects them through the output layer in chunks, so the
[batch, length, vocabulary] logits of the whole batch never exist; prompt positions cost no
projection and no softmax.

Batches come in two layouts:

- rows (:func:`spinflow.chat.collate`): one sequence a row, right-padded; the scored tokens are
  read from the loss mask (:func:`scored_from_loss_mask`);
- shared-prompt rows (:func:`spinflow.chat.collate_shared`): a row holds one prompt followed by
  several answers to it. ``branch`` says which part each token belongs to (0 the prompt, 1, 2, …
  the answers, -1 padding); an answer sees the prompt and itself, never the other answers, and
  its positions restart where the prompt ends, so its log-probs equal those of the
  prompt + answer sequence alone while the prompt is computed once.

Used by SFT (:func:`mean_nll`), SPIN's policy and reference passes and evaluation.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

# Positions projected at once: 1024 × a 49k vocabulary is 200 MB of float32 logits.
CHUNK_SIZE = 1024


@dataclass(frozen=True)
class Scored:
    """The tokens a batch scores: ``positions`` index the flattened [batch·length] hidden states
    that predict ``targets``; each adds to ``segments[i]`` of ``count`` sums."""

    positions: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    count: int


def scored_from_loss_mask(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> Scored:
    """Right-padded rows: token t of row b (loss mask 1) is predicted at (b, t − 1) and adds to
    the sum of row b."""
    rows, length = input_ids.shape
    mask = loss_mask[:, 1:].bool()
    row, col = mask.nonzero(as_tuple=True)
    return Scored(
        positions=row * length + col,
        targets=input_ids[:, 1:][mask],
        segments=row,
        count=rows,
    )


def scored_of(batch: dict) -> Scored:
    """The scored tokens of a batch of either layout."""
    if "score_positions" in batch:
        return Scored(
            batch["score_positions"],
            batch["score_targets"],
            batch["score_segments"],
            int(batch["segments"]),
        )
    return scored_from_loss_mask(batch["input_ids"], batch["loss_mask"])


def shared_prompt_mask(branch: torch.Tensor) -> torch.Tensor:
    """[rows, 1, length, length] boolean attention mask (True: may attend) of shared-prompt rows.

    Query i sees key j ≤ i when j is prompt or j is on i's own branch. Padding sees only padding
    (itself at least), so no row of the softmax is empty and no NaN reaches the gradients.
    """
    length = branch.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=branch.device).tril()
    query = branch.unsqueeze(2)
    key = branch.unsqueeze(1)
    allowed = ((key == 0) & (query >= 0)) | (key == query)
    return (allowed & causal).unsqueeze(1)


def _attention_mask(model, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    if "branch" not in batch:
        return batch["attention_mask"]
    allowed = shared_prompt_mask(batch["branch"])
    implementation = getattr(_config(model), "_attn_implementation", "sdpa")
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":  # eager attention adds the mask to the scores
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"shared-prompt batches need 'sdpa' or 'eager' attention, not {implementation!r}"
    )


def _config(model):
    return getattr(_unwrap(model), "config", None)


def _unwrap(model):
    """The transformers model inside DDP/compile and peft wrappers (LoRA layers stay inside)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def split_model(model):
    """(transformer body, output layer) of a causal LM, or None where projecting hidden states
    through the output layer alone would not give the model's logits."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        return None
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return None
    try:
        body = inner.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    head = inner.get_output_embeddings()
    if body is None or head is None or body is inner:
        return None
    return body, head


SCORE_ARGUMENT = "spinflow_scored"  # the keyword that asks the model's forward for log-probs


def _scoring_forward(self, *args, spinflow_scored=None, **kwargs):
    """The forward installed by :func:`enable_scoring`: the model's own forward, or, given
    ``spinflow_scored=(positions, targets)``, the float32 log-probs of those targets at those
    flat positions, computed from the body's hidden states without full logits."""
    forward = self._spinflow_plain_forward or types.MethodType(type(self).forward, self)
    if spinflow_scored is None:
        return forward(*args, **kwargs)
    positions, targets = spinflow_scored
    parts = split_model(self)
    if parts is None:  # the model's own logits: same numbers, more work
        return _logps_of_logits(forward(*args, **kwargs).logits, positions, targets)
    body, head = parts
    hidden = body(*args, **kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1))[positions]
    return _token_logps(hidden, head, targets)


def enable_scoring(model) -> None:
    """Let ``model`` (or the transformers model inside its DDP, FSDP, compile or peft wrappers)
    return log-probs from its own forward when called with ``spinflow_scored``.

    Calling the transformer body and the output layer from outside would skip the hooks of the
    wrapper around them: DDP's gradient synchronisation, FSDP's gathering of sharded weights
    (FSDP2 refuses with "FSDP requires a single root module"). Going through the root module's
    forward runs them all. Installed once, as a method of the instance, so a deep copy of the
    model gets its own; where the model cannot be split, the same call reads its full logits.
    """
    inner = _unwrap(model)
    if getattr(inner, "_spinflow_scoring", False):
        return
    # a forward set on the instance before (accelerate's autocast wrapper) stays the plain one
    inner._spinflow_plain_forward = inner.__dict__.get("forward")
    inner.forward = types.MethodType(_scoring_forward, inner)
    inner._spinflow_scoring = True


def _logps_of_logits(logits: torch.Tensor, positions, targets) -> torch.Tensor:
    flat = logits.reshape(-1, logits.size(-1))[positions].float()
    return flat.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - flat.logsumexp(-1)


def _token_logps(hidden: torch.Tensor, head, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row of ``hidden`` [n, hidden], projected ``CHUNK_SIZE`` at a time."""
    pieces = []
    for start in range(0, hidden.size(0), CHUNK_SIZE):
        logits = head(hidden[start : start + CHUNK_SIZE]).float()
        target = targets[start : start + CHUNK_SIZE].unsqueeze(-1)
        pieces.append(logits.gather(-1, target).squeeze(-1) - logits.logsumexp(-1))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def token_logps(model, batch: dict, *, full_logits: bool = False) -> tuple[torch.Tensor, Scored]:
    """float32 log-probs of the scored tokens of ``batch`` and which tokens they are.

    The model is called as a whole (through its DDP/FSDP/peft wrappers, see
    :func:`enable_scoring`). ``full_logits`` (or a model that cannot be split) reads the
    log-probs from the model's full logits instead: same numbers, more work.
    """
    scored = scored_of(batch)
    device = batch["input_ids"].device
    positions = scored.positions.to(device)
    targets = scored.targets.to(device)
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": _attention_mask(model, batch, dtype),
        "use_cache": False,
    }
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if full_logits:
        return _logps_of_logits(model(**inputs).logits, positions, targets), scored
    enable_scoring(model)
    return model(**inputs, **{SCORE_ARGUMENT: (positions, targets)}), scored


def segment_logps(model, batch: dict, *, full_logits: bool = False) -> torch.Tensor:
    """Summed log-prob of each scored sequence of ``batch`` ([segments], float32)."""
    logps, scored = token_logps(model, batch, full_logits=full_logits)
    sums = logps.new_zeros(scored.count)
    return sums.index_add(0, scored.segments.to(logps.device), logps)


def mean_nll(model, batch: dict, *, full_logits: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood per scored token (the SFT loss)."""
    logps, _ = token_logps(model, batch, full_logits=full_logits)
    return -logps.sum() / max(logps.numel(), 1)

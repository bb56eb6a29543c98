"""The ``continuous`` engine: a static KV cache and continuous batching, in plain torch.

``batch_size`` slots decode together, one token per slot per step. Slots whose answers end are
refilled with the next waiting prompts as soon as a quarter of them are free, prefilled together,
so hardly a step is spent on rows that have finished (with HF ``generate`` most of the work at
the default settings went to such rows). Each slot keeps
its keys and values in a preallocated cache ``[slots, kv_heads, length, head_dim]`` per layer, and
its own position; attention reads only the columns up to the longest live row.

The decoder is written against the modules of llama-style models (llama, mistral, qwen2, qwen3:
pre-norm, rotary embeddings, grouped-query attention, gated MLP) and reuses their weights and
their rotary module. Sampling is the reference sampler of :mod:`spinflow.generation` with each
prompt's own noise stream, so a prompt's answer does not depend on its slot, its neighbours or
the number of slots, as with the ``torch`` engine.

``dtype: bfloat16`` runs a bfloat16 copy of the decoder layers (the final norm, the output layer
and sampling stay float32); it pays where
the processor computes bfloat16 natively. ``dtype: auto`` (:func:`choose_dtype`) takes bfloat16
only where the device computes it natively and a probe on the model finds decoding at least
:data:`SPEED_MARGIN` times faster, with the next-token log-probs within :data:`TOLERANCE` of
float32; the decision is cached per machine and model shape, as ``bf16: auto`` is for training
(:mod:`spinflow.precision`), so every stage on a machine makes the same choice.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spinflow.errors import SpinflowError
from spinflow.generation import Completion, Request, SamplingParams, next_tokens

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
SPEED_MARGIN = 1.2  # bfloat16 decoding must be at least this many times faster
TOLERANCE = 0.05  # largest mean |log-prob difference| of the next token, in nats
MIN_SHARED_PREFIX = 8  # shorter shared prefixes are recomputed with each prompt
PROBE_VERSION = 2  # part of the cache key: a change to the probe or the bf16 path measures again


def supports(model) -> bool:
    return getattr(model.config, "model_type", None) in SUPPORTED


def _probe(model, prompts: list[list[int]], slots: int) -> dict:
    """Decode-step time of float32 and bfloat16 weights (fastest of 3, interleaved) and the mean
    |difference| of the log-probs both give the float32 model's next tokens after the prompts."""
    engines = {
        dtype: ContinuousEngine(model, eos_token_id=-1, batch_size=slots, dtype=dtype)
        for dtype in ("float32", "bfloat16")
    }
    seconds = {dtype: math.inf for dtype in engines}
    next_logps = {}
    rows = list(range(len(prompts)))
    with torch.inference_mode():
        for engine in engines.values():
            engine._allocate(len(prompts), max(len(p) for p in prompts) + 1)
        for dtype, engine in engines.items():
            next_logps[dtype] = torch.log_softmax(engine._prefill(rows, prompts).float(), -1)
        tokens = next_logps["float32"].argmax(-1)
        positions = torch.tensor([len(p) for p in prompts])
        index = torch.tensor(rows)
        for _ in range(4):  # the first round warms up
            for dtype, engine in engines.items():
                started = time.perf_counter()
                engine._decode(index, tokens, positions)
                if _ > 0:
                    seconds[dtype] = min(seconds[dtype], time.perf_counter() - started)
    chosen = tokens.unsqueeze(1)
    difference = (
        (next_logps["float32"].gather(1, chosen) - next_logps["bfloat16"].gather(1, chosen))
        .abs()
        .mean()
    )
    return {
        "speedup": seconds["float32"] / seconds["bfloat16"],
        "logp_difference": float(difference),
    }


def choose_dtype(model, prompts: list[list[int]], slots: int) -> tuple[str, str]:
    """``dtype: auto``: bfloat16 or float32 for decoding ``model`` here, and why, in words."""
    from spinflow.io import read_json, write_json
    from spinflow.precision import measurement_key, native_bf16

    device = next(model.parameters()).device
    native, evidence = native_bf16(device)
    if not native:
        return "float32", f"bfloat16 not native ({evidence})"
    fields, path = measurement_key(
        "generation", model, device, margin=SPEED_MARGIN, tolerance=TOLERANCE, probe=PROBE_VERSION
    )
    try:
        record = read_json(path)
        return record["dtype"], record["reason"] + f" (cached in {path})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    figures = _probe(model, prompts[:slots], slots)
    if not figures["logp_difference"] <= TOLERANCE:
        dtype = "float32"
        reason = f"bfloat16 log-probs differ by {figures['logp_difference']:.3f} > {TOLERANCE}"
    elif not figures["speedup"] >= SPEED_MARGIN:
        dtype = "float32"
        reason = f"bfloat16 decodes {figures['speedup']:.2f}x as fast, under {SPEED_MARGIN}x"
    else:
        dtype = "bfloat16"
        reason = (
            f"bfloat16 decodes {figures['speedup']:.2f}x as fast, log-probs within "
            f"{figures['logp_difference']:.3f} nats"
        )
    try:
        write_json(path, {**fields, **figures, "dtype": dtype, "reason": reason})
    except OSError as exc:
        log.warning("%s: cannot write the generation precision cache (%s)", path, exc)
    return dtype, reason


class ContinuousEngine:
    name = "continuous"

    def __init__(self, model, *, eos_token_id: int, batch_size: int, dtype: str = "float32"):
        config = model.config
        if not supports(model):
            raise SpinflowError(
                f"generate.engine: continuous supports {', '.join(SUPPORTED)} models, not "
                f"{getattr(config, 'model_type', type(model).__name__)!r}: choose torch (any model)"
            )
        window = getattr(config, "sliding_window", None)
        self.window = window if getattr(config, "use_sliding_window", True) else None
        self.eos_token_id = eos_token_id
        self.slots = batch_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.source = model
        self.dtype_choice = dtype  # "auto" is resolved by the first complete(), on its prompts
        if dtype != "auto":
            self._load(dtype)

    def _load(self, dtype: str) -> None:
        model = self.source
        if dtype == "bfloat16":
            model = copy.deepcopy(model).to(torch.bfloat16)
        self.model = model.eval()
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        inner = model.model
        self.embed, self.layers = inner.embed_tokens, inner.layers
        self.rotary = inner.rotary_emb
        # the final norm and output layer stay float32: bfloat16 logits (8 bits of mantissa)
        # would round values near 20 to steps of 0.125
        self.norm, self.lm_head = self.source.model.norm, self.source.lm_head
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.dtype_choice = dtype

    # -- the decoder ------------------------------------------------------------------------

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = self.rotary(hidden, positions)
        return lambda q, k: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)

    def _qkv(self, attention, hidden: torch.Tensor, rows: int, length: int):
        shape = (rows, length, -1, self.head_dim)
        q = attention.q_proj(hidden).view(shape)
        k = attention.k_proj(hidden).view(shape)
        v = attention.v_proj(hidden).view(shape)
        if hasattr(attention, "q_norm"):
            q, k = attention.q_norm(q), attention.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _prefill(self, slots: list[int], prompts: list[list[int]], offset: int = 0) -> torch.Tensor:
        """Run prompts (right-padded, one forward), fill their slots' caches; the logits of each
        prompt's next token. Columns past a prompt's end hold padding until decoding overwrites
        them, and decoding never reads a column before writing it.

        With ``offset``, the prompts continue the shared prefix held in ``self.prefix`` (its keys
        and values per layer, ``offset`` columns): it is copied into the slots, not recomputed.
        """
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        positions = torch.arange(offset, offset + width).unsqueeze(0).expand(len(prompts), -1)
        query = torch.arange(offset, offset + width).unsqueeze(1)
        key = torch.arange(offset + width).unsqueeze(0)
        visible = key <= query
        if self.window is not None:
            visible &= key > query - self.window
        mask = (visible.unsqueeze(0) & (key < offset + lengths.view(-1, 1, 1))).unsqueeze(1)
        # a padding query row sees no key at all: let it see the first, its output is unused
        mask[:, :, :, 0] = True
        index = torch.tensor(slots, device=self.device)
        hidden = self.embed(ids.to(self.device))
        rope = self._rope(hidden, positions.to(self.device))
        mask = mask.to(self.device)
        for number, (layer, (keys, values)) in enumerate(zip(self.layers, self.cache, strict=True)):
            attention = layer.self_attn
            q, k, v = self._qkv(attention, layer.input_layernorm(hidden), len(prompts), width)
            q, k = rope(q, k)
            keys[index, :, offset : offset + width] = k
            values[index, :, offset : offset + width] = v
            if offset:
                prefix_keys, prefix_values = self.prefix[number]
                keys[index, :, :offset] = prefix_keys
                values[index, :, :offset] = prefix_values
                k, v = keys[index, :, : offset + width], values[index, :, : offset + width]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True
            )
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(len(prompts), width, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = hidden[torch.arange(len(prompts)), (lengths - 1).to(self.device)]
        return self.lm_head(self.norm(last.float()))

    def _shared_prefix(self, requests: Sequence[Request]) -> int:
        """Compute once the keys and values of the prefix every prompt shares (a chat template's
        system prompt, say), leaving each prompt at least one token; its length (0: none)."""
        shortest = min(len(r.prompt_ids) for r in requests)
        first = requests[0].prompt_ids
        length = 0
        while length < shortest - 1 and all(
            r.prompt_ids[length] == first[length] for r in requests
        ):
            length += 1
        self.prefix = []
        if length < MIN_SHARED_PREFIX:
            return 0
        self._prefill([0], [list(first[:length])])
        self.prefix = [
            (keys[0, :, :length].clone(), values[0, :, :length].clone())
            for keys, values in self.cache
        ]
        return length

    def _decode(self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        """One token for each of ``slots`` at its own position; the logits of the next ones."""
        rows = tokens.size(0)
        full = rows == self.cache[0][0].size(0)
        width = int(positions.max()) + 1
        columns = torch.arange(width, device=self.device)
        visible = columns.unsqueeze(0) <= positions.unsqueeze(1)
        if self.window is not None:
            visible &= columns.unsqueeze(0) > positions.unsqueeze(1) - self.window
        mask = visible[:, None, None, :]
        hidden = self.embed(tokens).unsqueeze(1)
        rope = self._rope(hidden, positions.unsqueeze(1))
        for layer, (keys, values) in zip(self.layers, self.cache, strict=True):
            attention = layer.self_attn
            q, k, v = self._qkv(attention, layer.input_layernorm(hidden), rows, 1)
            q, k = rope(q, k)
            keys[slots, :, positions] = k[:, :, 0]
            values[slots, :, positions] = v[:, :, 0]
            # all slots live: a view of the cache; at the tail of the pool: the live rows only
            seen_keys = keys[:, :, :width] if full else keys[slots, :, :width]
            seen_values = values[:, :, :width] if full else values[slots, :, :width]
            out = F.scaled_dot_product_attention(
                q, seen_keys, seen_values, attn_mask=mask, scale=self.scaling, enable_gqa=True
            )
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm_head(self.norm(hidden[:, 0].float()))

    def _allocate(self, slots: int, length: int) -> None:
        shape = (slots, self.kv_heads, length, self.head_dim)
        self.cache = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in self.layers
        ]

    # -- the scheduler ----------------------------------------------------------------------

    @torch.inference_mode()
    def complete(
        self, requests: Sequence[Request], sampling: SamplingParams, *, desc: str = "generate"
    ) -> list[Completion]:
        if not requests:
            return []
        slots = min(self.slots, len(requests))
        if self.dtype_choice == "auto":
            dtype, reason = choose_dtype(self.source, [r.prompt_ids for r in requests], slots)
            log.info("generate.dtype auto: %s (%s)", dtype, reason)
            self._load(dtype)
        self._allocate(slots, max(len(r.prompt_ids) for r in requests) + sampling.max_new_tokens)
        # shortest prompts first: prompts admitted together are padded to similar lengths
        waiting = deque(sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids)))
        owner: list[int | None] = [None] * slots
        generators: list[torch.Generator] = [torch.Generator() for _ in range(slots)]
        answers: list[list[int]] = [[] for _ in requests]
        logps = [0.0] * len(requests)
        ended = [False] * len(requests)
        tokens = torch.zeros(slots, dtype=torch.long)
        positions = torch.zeros(slots, dtype=torch.long)
        logits = torch.zeros(slots, self.model.config.vocab_size)
        with tqdm(total=len(requests), desc=desc, unit="prompt", dynamic_ncols=True) as bar:

            def admit(free: list[int]) -> None:
                """Give free slots the next waiting prompts, prefilled together."""
                taken = free[: len(waiting)]
                if not taken:
                    return
                for slot in taken:
                    index = waiting.popleft()
                    owner[slot] = index
                    generators[slot] = torch.Generator().manual_seed(requests[index].seed)
                    positions[slot] = len(requests[index].prompt_ids)
                prompts = [list(requests[owner[slot]].prompt_ids[shared:]) for slot in taken]
                logits[taken] = self._prefill(taken, prompts, shared).float().cpu()

            shared = self._shared_prefix(requests)
            admit(list(range(slots)))
            idle: list[int] = []
            refill_at = max(1, slots // 4)
            while True:
                live = [s for s in range(slots) if owner[s] is not None]
                if not live:
                    break
                chosen = next_tokens(logits[live], sampling, [generators[s] for s in live])
                token_logps = torch.log_softmax(logits[live], dim=-1)
                token_logps = token_logps.gather(1, chosen.unsqueeze(1))[:, 0].tolist()
                stepping, free = [], []
                for slot, token, logp in zip(live, chosen.tolist(), token_logps, strict=True):
                    index = owner[slot]
                    logps[index] += logp
                    if token != self.eos_token_id:
                        answers[index].append(token)
                    if token == self.eos_token_id or len(answers[index]) >= sampling.max_new_tokens:
                        ended[index] = token == self.eos_token_id
                        owner[slot] = None
                        free.append(slot)
                        bar.update(1)
                    else:
                        tokens[slot] = token
                        stepping.append(slot)
                if stepping:
                    index = torch.tensor(stepping)
                    fresh = self._decode(
                        index.to(self.device),
                        tokens[index].to(self.device),
                        positions[index].to(self.device),
                    )
                    logits[index] = fresh.float().cpu()
                    positions[index] += 1
                # Freed slots are refilled a few at a time: one prefill of several prompts reads
                # the weights once, where one prefill per prompt would read them for each. A new
                # prompt's first token comes from its prefill, sampled at the next step.
                idle.extend(free)
                if len(idle) >= refill_at or not stepping:
                    admit(idle)
                    idle = [slot for slot in idle if owner[slot] is None]
        self.cache, self.prefix = [], []
        return [
            Completion(token_ids=answers[i], logp=logps[i], ended=ended[i])
            for i in range(len(requests))
        ]

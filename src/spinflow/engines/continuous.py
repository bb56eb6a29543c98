"""The ``continuous`` engine: a static KV cache and continuous batching, in plain torch.

``batch_size`` slots decode together, one token per slot per step. A slot whose answer ends
takes the next waiting prompt at once, and that prompt's tokens run in the same forward pass as
the other slots' decode step: the tokens of both are packed into one set of rows, so the step
reads the weights once for both (on a small model a step is bound by reading the weights, not
by arithmetic). Hardly a step is spent on rows that have finished, where HF ``generate`` spent
most of its work at the default settings. Each slot keeps its keys and values in a
preallocated cache ``[slots, kv_heads, length, head_dim]`` per layer, and its own position;
attention reads only the columns up to the longest live row. A prefix every prompt shares (a
chat template's system prompt) is computed once and copied into each slot.

The decoder is written against the modules of llama-style models (llama, mistral, qwen2, qwen3:
pre-norm, rotary embeddings, grouped-query attention, gated MLP) and reuses their weights and
their rotary module; the projections that read the same input are fused into one product.
Sampling is the reference sampler of :mod:`spinflow.generation` with each prompt's own noise
stream, so a prompt's answer does not depend on its slot, its neighbours or the number of
slots, as with the ``torch`` engine.

``dtype: bfloat16`` runs the matrix products of the decoder layers and of the output layer in
bfloat16 (on CPUs with the weights packed once for oneDNN); the residual stream, the norms, the
rotary embedding, the keys and values on CPUs, and sampling stay float32, and the
:data:`EXACT_TOP` largest logits of each row are computed again in float32. It pays where the
processor computes bfloat16 natively. ``dtype: auto`` (:func:`choose_dtype`) takes bfloat16 only
where the device computes it natively and a probe on the model finds generation at least
:data:`SPEED_MARGIN` times faster, with the log-probs of the answers float32 samples within
:data:`TOLERANCE` of float32's; the decision is cached per machine and model shape, as
``bf16: auto`` is for training (:mod:`spinflow.precision`), so every stage on a machine makes
the same choice.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spinflow.errors import SpinflowError
from spinflow.generation import (
    Completion,
    Engine,
    Request,
    SamplingParams,
    as_end_tokens,
    next_tokens,
)

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
SPEED_MARGIN = 1.2  # bfloat16 decoding must be at least this many times faster
TOLERANCE = 0.05  # largest mean |log-prob difference| of an answer token, in nats
MIN_SHARED_PREFIX = 8  # shorter shared prefixes are recomputed with each prompt
EXACT_TOP = 64  # bfloat16: the largest logits of a row recomputed in float32
PROBE_TOKENS = 32  # the probe's answers: at most this many tokens
PROBE_VERSION = 4  # part of the cache key: a change to the probe or the bf16 path measures again


def supports(model) -> bool:
    return getattr(model.config, "model_type", None) in SUPPORTED


def _teacher_forced(engine, prompts: list[list[int]], answers: list[list[int]]):
    """The log-probs ``engine`` gives each token of ``answers`` after its prompt (one tensor per
    answer), and the seconds its forward passes took: the prompts in one pass, then the answers
    a token a step, as decoding runs."""
    rows = list(range(len(prompts)))
    engine._allocate(len(rows), max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True)))
    logps: list[list[torch.Tensor]] = [[] for _ in rows]
    started = time.perf_counter()
    fed, logits = rows, engine._forward(rows, prompts, [0] * len(rows))
    for step in range(max(len(a) for a in answers)):
        for row, row_logits in zip(fed, torch.log_softmax(logits, -1), strict=True):
            logps[row].append(row_logits[answers[row][step]])
        fed = [row for row in rows if step + 1 < len(answers[row])]
        if fed:
            logits = engine._forward(
                fed, [[answers[r][step]] for r in fed], [len(prompts[r]) + step for r in fed]
            )
    seconds = time.perf_counter() - started
    engine.cache, engine.prefix = [], []
    return [torch.stack(row) for row in logps], seconds


def _probe(model, prompts: list[list[int]], slots: int, eos_token_id: int | Iterable[int]) -> dict:
    """bfloat16 against float32 on the answers the float32 engine samples for ``prompts``
    (temperature 1, at most :data:`PROBE_TOKENS` tokens, fixed seeds): the mean |difference| of
    the log-probs both give each answer token (the end token included), that of the first answer
    token alone (right after the prompt, where bfloat16 differs most), and how much faster
    bfloat16 runs the same forward passes (fastest of 2, interleaved, after a warm-up)."""
    engines = {
        dtype: ContinuousEngine(model, eos_token_id=eos_token_id, batch_size=slots, dtype=dtype)
        for dtype in ("float32", "bfloat16")
    }
    sampled = engines["float32"].complete(
        [Request(prompt, seed) for seed, prompt in enumerate(prompts)],
        SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=PROBE_TOKENS),
        desc="generate.dtype probe",
    )
    answers = [c.token_ids + [c.end_token_id] * c.ended for c in sampled]  # never empty
    seconds = {dtype: math.inf for dtype in engines}
    logps = {}
    with torch.inference_mode():
        for round_ in range(3):  # the first round warms up
            for dtype, engine in engines.items():
                logps[dtype], took = _teacher_forced(engine, prompts, answers)
                if round_ > 0:
                    seconds[dtype] = min(seconds[dtype], took)
    differences = [
        (exact - rounded).abs()
        for exact, rounded in zip(logps["float32"], logps["bfloat16"], strict=True)
    ]
    return {
        "speedup": seconds["float32"] / seconds["bfloat16"],
        "logp_difference": float(torch.cat(differences).mean()),
        "first_token_logp_difference": float(torch.stack([d[0] for d in differences]).mean()),
        "answer_tokens": sum(len(a) for a in answers),
    }


def choose_dtype(
    model, prompts: list[list[int]], slots: int, *, eos_token_id: int | Iterable[int]
) -> tuple[str, str]:
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
    figures = _probe(model, prompts[:slots], slots, eos_token_id)
    if not figures["logp_difference"] <= TOLERANCE:
        dtype = "float32"
        reason = (
            f"bfloat16 answer log-probs differ by {figures['logp_difference']:.3f} nats a token "
            f"> {TOLERANCE}"
        )
    elif not figures["speedup"] >= SPEED_MARGIN:
        dtype = "float32"
        reason = f"bfloat16 generates {figures['speedup']:.2f}x as fast, under {SPEED_MARGIN}x"
    else:
        dtype = "bfloat16"
        reason = (
            f"bfloat16 generates {figures['speedup']:.2f}x as fast, answer log-probs within "
            f"{figures['logp_difference']:.3f} nats a token (the first token "
            f"{figures['first_token_logp_difference']:.3f})"
        )
    try:
        write_json(path, {**fields, **figures, "dtype": dtype, "reason": reason})
    except OSError as exc:
        log.warning("%s: cannot write the generation precision cache (%s)", path, exc)
    return dtype, reason


class _Linear:
    """``x @ weightᵀ (+ bias)`` computed in ``dtype`` (with a bias, out in float32), for the
    ``(weight, bias)`` parts of one or more projections that read the same input: their weights
    are concatenated into one product.

    On CPUs a bfloat16 weight is packed once into oneDNN's blocked layout: a plain bfloat16
    weight is re-laid out on every call, which at a decode step's few rows costs as much as the
    product itself (θ0's layers: 21 ms a step plain, 14.5 packed, at 1 to 64 rows).
    """

    def __init__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]], dtype):
        weights = [weight.detach() for weight, _ in parts]
        weight = (torch.cat(weights) if len(weights) > 1 else weights[0]).to(dtype).contiguous()
        self.bias = None
        if any(bias is not None for _, bias in parts):
            self.bias = torch.cat(
                [
                    bias.detach().float()
                    if bias is not None
                    else torch.zeros(part.size(0), device=part.device)
                    for part, bias in parts
                ]
            )
        self.dtype = dtype
        self.weight = weight
        self.packed = None
        if weight.device.type == "cpu" and dtype == torch.bfloat16 and _onednn_bf16():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            self.weight = None  # the packed copy is all the product needs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            y = F.linear(x, self.weight)
        # in ``dtype``: adding it to a float32 tensor promotes it without a separate cast
        return y if self.bias is None else y + self.bias


def _parts(module: torch.nn.Linear, order: torch.Tensor | None = None):
    """``module``'s ``(weight, bias)``, with each head's output features put in ``order``."""
    weight, bias = module.weight.detach(), module.bias
    if order is None:
        return weight, bias
    width = order.numel()
    weight = weight.view(-1, width, weight.size(-1))[:, order].reshape(weight.shape)
    if bias is not None:
        bias = bias.detach().view(-1, width)[:, order].reshape(bias.shape)
    return weight, bias


def _to(value, device: torch.device):
    """``value`` (a tensor, or tuples of them and other things) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _onednn_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _rms_norm(weight: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm with float32 ``weight`` on float32 ``x``."""
    return F.rms_norm(x, weight.shape, weight, eps)


def _norm(module: torch.nn.Module, order: torch.Tensor | None = None):
    """An RMSNorm module's float32 weight (its features in ``order``) and epsilon."""
    weight = module.weight.detach().float()
    return (weight if order is None else weight[order]), module.variance_epsilon


class _Block:
    """One decoder layer's weights, ready for :class:`ContinuousEngine`'s forward.

    The features of each query and key head are reordered so that the two halves that the
    rotary embedding turns together ``(i, i + head_dim/2)`` lie side by side: the rotation is then
    one complex product. Attention reads queries and keys only through their dot products,
    which the same order on both leaves unchanged.
    """

    def __init__(self, layer, dtype: torch.dtype, order: torch.Tensor):
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = _norm(layer.input_layernorm)
        self.post_norm = _norm(layer.post_attention_layernorm)
        self.qkv = _Linear(
            [
                _parts(attention.q_proj, order),
                _parts(attention.k_proj, order),
                _parts(attention.v_proj),
            ],
            dtype,
        )
        # qwen3: per-head norms before the rotary embedding
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        self.q_norm = None if q_norm is None else _norm(q_norm, order)
        self.k_norm = None if k_norm is None else _norm(k_norm, order)
        self.o = _Linear([_parts(attention.o_proj)], dtype)
        self.gate_up = _Linear([_parts(mlp.gate_proj), _parts(mlp.up_proj)], dtype)
        self.down = _Linear([_parts(mlp.down_proj)], dtype)
        self.act = mlp.act_fn
        self.width = mlp.gate_proj.out_features  # gate_up's output splits here


class ContinuousEngine(Engine):
    """``eos_token_id``: the end token, or all of them (:func:`spinflow.generation.end_token_ids`)."""

    name = "continuous"

    def __init__(
        self,
        model,
        *,
        eos_token_id: int | Iterable[int],
        batch_size: int,
        dtype: str = "float32",
    ):
        config = model.config
        if not supports(model):
            raise SpinflowError(
                f"generate.engine: continuous supports {', '.join(SUPPORTED)} models, not "
                f"{getattr(config, 'model_type', type(model).__name__)!r}: choose torch (any model)"
            )
        window = getattr(config, "sliding_window", None)
        self.window = window if getattr(config, "use_sliding_window", True) else None
        self.eos_token_id = as_end_tokens(eos_token_id)
        self.slots = batch_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.source = model
        self.dtype_choice = dtype  # "auto" is resolved by the first complete(), on its prompts
        if dtype != "auto":
            self._load(dtype)

    def _load(self, dtype: str) -> None:
        model = self.source.eval()
        inner = model.model
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.device = next(model.parameters()).device
        # keys and values: float32 on CPUs, where attention over them ran faster than over
        # bfloat16 ones (θ0's decode step 34 against 36 ms), else the matrix products' dtype
        self.cache_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.embed = inner.embed_tokens
        attention = inner.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        half = self.head_dim // 2
        # each head's features as (i, i + head_dim/2) pairs: see _Block
        order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
        self.blocks = [_Block(layer, self.dtype, order) for layer in inner.layers]
        self.rotary = inner.rotary_emb
        # the residual stream, the norms and sampling stay float32, and so do the largest logits:
        # bfloat16 ones (8 bits of mantissa) would round values near 20 to steps of 0.125
        self.norm = _norm(inner.norm)
        self.head = _Linear([_parts(model.lm_head)], self.dtype)
        self.head_weight = model.lm_head.weight.detach().float()
        self.dtype_choice = dtype

    # -- the decoder ------------------------------------------------------------------------

    def _layer(self, block: _Block, hidden: torch.Tensor, rope, attend) -> torch.Tensor:
        """One decoder layer on float32 ``hidden`` [tokens, dim]. ``rope`` rotates queries and
        keys; ``attend(q, k, v)`` ([tokens, heads, head_dim] each) stores the new keys and values
        and attends."""
        tokens = hidden.size(0)
        qkv = block.qkv(_rms_norm(*block.input_norm, hidden)).view(tokens, -1, self.head_dim)
        qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=1)
        qk = qk.float()
        if block.q_norm is not None:
            q, k = qk.split([self.heads, self.kv_heads], dim=1)
            qk = torch.cat((_rms_norm(*block.q_norm, q), _rms_norm(*block.k_norm, k)), dim=1)
        q, k = rope(qk).to(self.cache_dtype).split([self.heads, self.kv_heads], dim=1)
        out = attend(q, k, v.to(self.cache_dtype))
        hidden = hidden + block.o(out.reshape(tokens, -1))
        gate, up = block.gate_up(_rms_norm(*block.post_norm, hidden)).split(block.width, dim=-1)
        return hidden + block.down(block.act(gate) * up)

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor):
        """The rotation of float32 queries and keys [tokens, heads, head_dim] at ``positions``,
        their features in :class:`_Block`'s order: each pair times a unit complex number."""
        cos, sin = self.rotary(hidden, positions.unsqueeze(0))
        half = self.head_dim // 2
        # the rotary module repeats each frequency in the second half of head_dim
        turn = torch.complex(cos[0, :, :half], sin[0, :, :half]).unsqueeze(1)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            pairs = torch.view_as_complex(x.unflatten(-1, (half, 2)))
            return torch.view_as_real(pairs * turn).flatten(-2)

        return rotate

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of float32 ``hidden`` [rows, dim]. In bfloat16 the output layer's
        product is rounded to bfloat16; the :data:`EXACT_TOP` largest logits of each row, which
        hold most of the probability, are computed again in float32."""
        hidden = _rms_norm(*self.norm, hidden)
        logits = self.head(hidden).float()
        if self.dtype != torch.float32:
            top = logits.topk(EXACT_TOP, dim=-1).indices
            exact = torch.einsum("rd,rkd->rk", hidden, self.head_weight[top])
            logits.scatter_(1, top, exact)
        return logits

    def _visible(self, queries: torch.Tensor, end: int) -> torch.Tensor:
        """Which of the cache columns ``0 … end-1`` each query position sees ([..., end]);
        a padding query (position -1) sees the first column, so its output is finite."""
        columns = torch.arange(end)
        visible = columns <= queries.unsqueeze(-1)
        if self.window is not None:
            visible &= columns > queries.unsqueeze(-1) - self.window
        visible[..., 0] |= queries < 0
        return visible

    def _forward(self, slots: list[int], chunks: list[list[int]], starts: list[int]):
        """One forward over several slots: slot ``slots[i]`` runs the tokens ``chunks[i]`` at
        positions ``starts[i]``, ``starts[i] + 1``, …, attending to its cache before them. A
        decode step is a chunk of one token; a new prompt, its tokens after the shared prefix.
        The chunks' tokens are packed for the matrix products, so decode steps and new prompts
        share one pass over the weights. The logits after each chunk's last token.

        Chunks of one token attend in one batched product over their slots' caches; longer
        chunks are right-padded together for :func:`F.scaled_dot_product_attention`.
        """
        slot, position, last, single, several = [], [], [], [], []  # per token, per chunk
        for number, (cache_slot, chunk, start) in enumerate(
            zip(slots, chunks, starts, strict=True)
        ):
            (single if len(chunk) == 1 else several).append(number)
            slot += [cache_slot] * len(chunk)
            position += range(start, start + len(chunk))
            last.append(len(position) - 1)
        groups = []
        if single:
            tokens = [last[number] for number in single]
            rows = [slots[number] for number in single]
            end = max(position[t] for t in tokens) + 1
            # [rows × kv_heads, query heads per kv head, end], for the batched product
            visible = self._visible(torch.tensor([position[t] for t in tokens]), end)
            bias = torch.zeros(len(tokens), 1, 1, end).masked_fill_(
                ~visible[:, None, None, :], float("-inf")
            )
            bias = bias.expand(-1, self.kv_heads, self.heads // self.kv_heads, -1)
            bias = bias.reshape(-1, self.heads // self.kv_heads, end)
            view = rows == list(range(self.cache[0][0].size(0)))  # every slot: no gather
            groups.append(("single", tokens, None if view else rows, end, bias))
        if several:
            width = max(len(chunks[number]) for number in several)
            tokens, flat = [], []  # each token's place in the packed and the padded layout
            queries = torch.full((len(several), width), -1)
            for local, number in enumerate(several):
                first = last[number] - len(chunks[number]) + 1
                tokens += range(first, last[number] + 1)
                flat += range(local * width, local * width + len(chunks[number]))
                queries[local, : len(chunks[number])] = torch.tensor(
                    position[first : last[number] + 1]
                )
            end = int(queries.max()) + 1
            mask = self._visible(queries, end).unsqueeze(1)
            rows = [slots[number] for number in several]
            groups.append(
                ("several", tokens, rows, end, (mask, torch.tensor(flat), len(several), width))
            )
        device = self.device
        groups = [
            (
                kind,
                torch.tensor(tokens, device=device),
                rows if rows is None else torch.tensor(rows, device=device),
                end,
                _to(extra, device),
            )
            for kind, tokens, rows, end, extra in groups
        ]
        slot = torch.tensor(slot, device=device)
        position = torch.tensor(position, device=device)
        ids = torch.tensor([token for chunk in chunks for token in chunk], device=device)
        hidden = self.embed(ids).float()
        rope = self._rope(hidden, position)
        for block, (keys, values) in zip(self.blocks, self.cache, strict=True):

            def attend(q, k, v, keys=keys, values=values):
                keys[slot, :, position] = k
                values[slot, :, position] = v
                out = None if len(groups) == 1 else q.new_empty(q.shape)
                for kind, tokens, rows, end, extra in groups:
                    seen_keys, seen_values = keys[:, :, :end], values[:, :, :end]
                    if rows is not None:
                        seen_keys = seen_keys.index_select(0, rows)
                        seen_values = seen_values.index_select(0, rows)
                    attend_group = self._attend_single if kind == "single" else self._attend_padded
                    if out is None:  # one kind of chunk: every token, in order
                        return attend_group(q, seen_keys, seen_values, extra)
                    got = attend_group(q.index_select(0, tokens), seen_keys, seen_values, extra)
                    out.index_copy_(0, tokens, got)
                return out

            hidden = self._layer(block, hidden, rope, attend)
        return self._logits(hidden[torch.tensor(last, device=device)])

    def _attend_single(self, q, keys, values, bias):
        """One query per row ([rows, heads, head_dim]) over the rows' caches [rows, kv_heads,
        end, head_dim]: two batched products, the query heads grouped by the key head they
        share (for a decode step this was faster than ``scaled_dot_product_attention``)."""
        rows, end = q.size(0), keys.size(2)
        grouped = q.reshape(rows * self.kv_heads, -1, self.head_dim)
        keys = keys.reshape(rows * self.kv_heads, end, self.head_dim)
        scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=self.scaling)
        out = torch.bmm(scores.softmax(-1), values.reshape(rows * self.kv_heads, end, -1))
        return out.view(rows, self.heads, self.head_dim)

    def _attend_padded(self, q, keys, values, extra):
        """Chunks of several queries: right-padded to [chunks, heads, width, head_dim]."""
        mask, flat, chunks, width = extra
        padded = q.new_zeros(chunks * width, self.heads, self.head_dim).index_copy_(0, flat, q)
        out = F.scaled_dot_product_attention(
            padded.view(chunks, width, self.heads, self.head_dim).transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            scale=self.scaling,
            enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(chunks * width, self.heads, -1).index_select(0, flat)

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
        self._forward([0], [list(first[:length])], [0])
        self.prefix = [
            (keys[0, :, :length].clone(), values[0, :, :length].clone())
            for keys, values in self.cache
        ]
        return length

    def _place_prefix(self, slots: list[int]) -> None:
        """Copy the shared prefix's keys and values into ``slots``."""
        if not self.prefix or not slots:
            return
        index = torch.tensor(slots, device=self.device)
        for (keys, values), (prefix_keys, prefix_values) in zip(
            self.cache, self.prefix, strict=True
        ):
            keys[index, :, : prefix_keys.size(1)] = prefix_keys
            values[index, :, : prefix_values.size(1)] = prefix_values

    def _allocate(self, slots: int, length: int) -> None:
        shape = (slots, self.kv_heads, length, self.head_dim)
        self.cache = [
            (
                torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
                torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
            )
            for _ in self.blocks
        ]
        self.prefix = []

    # -- the scheduler ----------------------------------------------------------------------

    @torch.inference_mode()
    def complete(
        self, requests: Sequence[Request], sampling: SamplingParams, *, desc: str = "generate"
    ) -> list[Completion]:
        if not requests:
            return []
        slots = min(self.slots, len(requests))
        if self.dtype_choice == "auto":
            dtype, reason = choose_dtype(
                self.source,
                [r.prompt_ids for r in requests],
                slots,
                eos_token_id=self.eos_token_id,
            )
            log.info("generate.dtype auto: %s (%s)", dtype, reason)
            self._load(dtype)
        self._allocate(slots, max(len(r.prompt_ids) for r in requests) + sampling.max_new_tokens)
        # shortest prompts first: prompts admitted together are padded to similar lengths
        waiting = deque(sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids)))
        owner: list[int | None] = [None] * slots
        generators: list[torch.Generator] = [torch.Generator() for _ in range(slots)]
        answers: list[list[int]] = [[] for _ in requests]
        logps = [0.0] * len(requests)
        ends: list[int | None] = [None] * len(requests)
        positions = [0] * slots  # where each slot's next token goes
        logits = torch.zeros(slots, self.source.config.vocab_size)
        with tqdm(total=len(requests), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
            shared = self._shared_prefix(requests)

            def admit(free: list[int]) -> list[tuple[int, list[int], int]]:
                """Give free slots the next waiting prompts; their chunks for the next forward."""
                taken = free[: len(waiting)]
                for slot in taken:
                    index = waiting.popleft()
                    owner[slot] = index
                    generators[slot] = torch.Generator().manual_seed(requests[index].seed)
                    positions[slot] = len(requests[index].prompt_ids)
                self._place_prefix(taken)
                return [
                    (slot, list(requests[owner[slot]].prompt_ids[shared:]), shared)
                    for slot in taken
                ]

            def run(chunks: list[tuple[int, list[int], int]]) -> None:
                rows = [slot for slot, _, _ in chunks]
                fresh = self._forward(rows, [c for _, c, _ in chunks], [s for _, _, s in chunks])
                logits[rows] = fresh.cpu()  # float32 (_logits)

            run(admit(list(range(slots))))
            while True:
                live = [s for s in range(slots) if owner[s] is not None]
                if not live:
                    break
                chosen = next_tokens(logits[live], sampling, [generators[s] for s in live])
                token_logps = torch.log_softmax(logits[live], dim=-1)
                token_logps = token_logps.gather(1, chosen.unsqueeze(1))[:, 0].tolist()
                chunks, free = [], []
                for slot, token, logp in zip(live, chosen.tolist(), token_logps, strict=True):
                    index = owner[slot]
                    logps[index] += logp
                    if token in self.eos_token_id:
                        ends[index] = token
                    else:
                        answers[index].append(token)
                    if ends[index] is not None or len(answers[index]) >= sampling.max_new_tokens:
                        owner[slot] = None
                        free.append(slot)
                        bar.update(1)
                    else:
                        chunks.append((slot, [token], positions[slot]))
                        positions[slot] += 1
                # A freed slot takes the next waiting prompt at once: the prompt runs in the same
                # forward as the decode step, so both share one pass over the weights. Its first
                # token comes from this forward, sampled at the next step.
                chunks += admit(free)
                if chunks:
                    run(chunks)
        self.cache, self.prefix = [], []
        return [
            Completion(
                token_ids=answers[i],
                logp=logps[i],
                ended=ends[i] is not None,
                end_token_id=ends[i],
            )
            for i in range(len(requests))
        ]

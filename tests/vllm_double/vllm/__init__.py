"""A test double of vLLM's offline API, for machines without a GPU (vLLM has no CPU wheel).

It mirrors vLLM 0.33.0 (the PyPI wheel, commit 4ba787ec9), read from these files of it:

- ``vllm/entrypoints/llm.py``: ``LLM.__init__`` (its keyword arguments and, of the
  ``EngineArgs`` fields in ``vllm/engine/arg_utils.py`` that ``**kwargs`` reaches, those listed
  in :data:`ENGINE_ARGS`), ``LLM.generate`` (and the length check of
  ``vllm/entrypoints/common/offline.py``), the refusal of ``data_parallel_size > 1``;
- ``vllm/sampling_params.py``: ``SamplingParams``, a msgspec struct: its fields, their types,
  ``__post_init__`` and the bounds of ``_verify_args``;
- ``vllm/inputs/llm.py``: the keys of a ``TokensPrompt``;
- ``vllm/outputs.py`` and ``vllm/logprobs.py``: ``RequestOutput``, ``CompletionOutput``,
  ``Logprob``;
- ``vllm/v1/engine/input_processor.py``: empty or too long prompts refused, the end tokens of the
  tokenizer and of the model's ``generation_config`` added to every request's stop tokens;
- ``vllm/distributed/parallel_state.py``: ``cleanup_dist_env_and_memory``.

A keyword vLLM 0.33 does not take, a value of the wrong type or one vLLM refuses raises here
too, so a renamed or removed argument fails the suite. Two departures, both stricter: the
double takes ``SamplingParams`` fields by keyword only, and of ``EngineArgs`` only the fields in
:data:`ENGINE_ARGS` (add one after checking it in vLLM's ``arg_utils.py``).

The "model" is not a network: an answer is a function of the prompt and the request's seed
alone. At each step it ends, with probability :data:`END_PROBABILITY`, on one of the tokens
vLLM stops on (the request's ``stop_token_ids``, the tokenizer's end token and the
``generation_config`` ones), else emits another token of the vocabulary; the end token stays in
``token_ids`` as in vLLM. A loaded model holds its GPU until its engine core is shut down (or
the ``LLM`` is garbage collected): loading a second one before that fails as vLLM's start-up
memory check does on a GPU whose memory is taken.

Every load, generate and release is appended to the file that ``VLLM_DOUBLE_LOG`` names (JSON
lines with the process id and ``CUDA_VISIBLE_DEVICES``), so a test sees what happened in the
processes a data-parallel engine starts.
"""

from __future__ import annotations

import json
import math
import os
import random
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args

__version__ = "0.33.0"

END_PROBABILITY = 0.25

ModelDType = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]

# EngineArgs fields spinflow may pass through LLM(**kwargs), with their types
ENGINE_ARGS: dict[str, Any] = {
    "data_parallel_size": int,
    "distributed_executor_backend": (str, type(None)),
    "max_model_len": (int, type(None)),
    "max_num_seqs": (int, type(None)),
    "max_num_batched_tokens": (int, type(None)),
    "enable_prefix_caching": (bool, type(None)),
    "enable_chunked_prefill": (bool, type(None)),
    "disable_log_stats": bool,
    "generation_config": str,
    "logprobs_mode": str,
    "max_logprobs": int,
    "kv_cache_dtype": str,
    "block_size": (int, type(None)),
    "async_scheduling": (bool, type(None)),
    "download_dir": (str, type(None)),
    "load_format": str,
}


class VLLMValidationError(ValueError):
    """vllm.exceptions.VLLMValidationError (a client error; a ValueError here, for tests)."""


def _log(event: str, **fields) -> None:
    path = os.environ.get("VLLM_DOUBLE_LOG")
    if not path:
        return
    record = {
        "event": event,
        "pid": os.getpid(),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **fields,
    }
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _is(value, kind) -> bool:
    """Whether ``value`` has the type ``kind`` names: a type, a tuple of them, ("list", item)
    or ("dict", key, value); a bool is never an int or a float, an int is a float."""
    if isinstance(kind, tuple) and kind and kind[0] == "list":
        return isinstance(value, list) and all(_is(v, kind[1]) for v in value)
    if isinstance(kind, tuple) and kind and kind[0] == "dict":
        return isinstance(value, dict) and all(
            _is(k, kind[1]) and _is(v, kind[2]) for k, v in value.items()
        )
    if isinstance(kind, tuple):
        return any(_is(value, k) for k in kind)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_keywords(where: str, given: dict, kinds: dict) -> None:
    for name, value in given.items():
        if name not in kinds:
            raise TypeError(f"{where}() got an unexpected keyword argument '{name}'")
        if not _is(value, kinds[name]):
            raise TypeError(f"{where}(): {name}={value!r} is not of type {kinds[name]}")


# ---------------------------------------------------------------------------------------------
# vllm/sampling_params.py


class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


_NONE = type(None)
_INTS = ("list", int)
_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2

# every field a caller may set, its type and its default
_SAMPLING_FIELDS: dict[str, tuple[Any, Any]] = {
    "n": (int, 1),
    "presence_penalty": (float, 0.0),
    "frequency_penalty": (float, 0.0),
    "repetition_penalty": (float, 1.0),
    "temperature": (float, 1.0),
    "watermarking": ((bool, _NONE), None),
    "top_p": (float, 1.0),
    "top_k": (int, 0),
    "min_p": (float, 0.0),
    "seed": ((int, _NONE), None),
    "stop": ((str, ("list", str), _NONE), None),
    "stop_token_ids": ((_INTS, _NONE), None),
    "ignore_eos": (bool, False),
    "max_tokens": ((int, _NONE), 16),
    "min_tokens": (int, 0),
    "logprobs": ((int, _NONE), None),
    "prompt_logprobs": ((int, _NONE), None),
    "prompt_logprob_token_ids": ((("list", _INTS), _NONE), None),
    "prompt_logprob_start": ((int, _NONE), None),
    "logprob_token_ids": ((_INTS, _NONE), None),
    "flat_logprobs": (bool, False),
    "detokenize": (bool, True),
    "skip_special_tokens": (bool, True),
    "spaces_between_special_tokens": (bool, True),
    "include_stop_str_in_output": (bool, False),
    "output_kind": (RequestOutputKind, RequestOutputKind.CUMULATIVE),
    "stream_interval": ((int, _NONE), None),
    "skip_clone": (bool, False),
    "structured_outputs": (object, None),
    "logit_bias": ((("dict", int, float), _NONE), None),
    "allowed_token_ids": ((_INTS, _NONE), None),
    "extra_args": ((dict, _NONE), None),
    "bad_words": ((("list", str), _NONE), None),
    "skip_reading_prefix_cache": ((bool, _NONE), None),
    "thinking_token_budget": ((int, _NONE), None),
    "repetition_detection": (object, None),
    "routed_experts_prompt_start": (int, 0),
    "trace_decode_token_ids": ((_INTS, _NONE), None),
}


class SamplingParams:
    """vllm.SamplingParams: the fields, types, normalisation and bounds of vLLM 0.33."""

    def __init__(self, **fields):
        _check_keywords(
            "SamplingParams", fields, {k: kind for k, (kind, _) in _SAMPLING_FIELDS.items()}
        )
        for name, (_, default) in _SAMPLING_FIELDS.items():
            setattr(self, name, fields.get(name, default))
        self._all_stop_token_ids: set[int] = set()
        self._post_init()

    def _post_init(self) -> None:
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = _MAX_TEMP
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        self.bad_words = list(dict.fromkeys(self.bad_words or []))
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:  # greedy
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")
        self._all_stop_token_ids.update(self.stop_token_ids)

    def _verify_args(self) -> None:
        def refuse(condition: bool, message: str) -> None:
            if condition:
                raise VLLMValidationError(message)

        refuse(self.n < 1, f"n must be at least 1, got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            refuse(not -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}.")
        refuse(
            not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0,
            f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.",
        )
        refuse(
            not math.isfinite(self.temperature),
            f"temperature must be a finite number, got {self.temperature}.",
        )
        refuse(self.temperature < 0.0, f"temperature must be non-negative, got {self.temperature}.")
        refuse(self.temperature > 2.0, f"temperature must be in [0, 2], got {self.temperature}.")
        refuse(not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
        refuse(self.top_k < -1, f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        refuse(not 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}.")
        refuse(
            self.max_tokens is not None and self.max_tokens < 1,
            f"max_tokens must be at least 1, got {self.max_tokens}.",
        )
        refuse(self.min_tokens < 0, f"min_tokens must be >= 0, got {self.min_tokens}.")
        refuse(
            self.max_tokens is not None and self.min_tokens > self.max_tokens,
            f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}.",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            refuse(
                value is not None and value != -1 and value < 0,
                f"{name} must be non-negative or -1, got {value}.",
            )
        refuse(any(not s for s in self.stop), "stop cannot contain an empty string.")
        refuse(
            bool(self.stop) and not self.detokenize,
            "stop strings are only supported when detokenize is True.",
        )
        refuse(any(not w for w in self.bad_words), "bad_words cannot contain an empty string.")


# ---------------------------------------------------------------------------------------------
# vllm/logprobs.py and vllm/outputs.py


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None
    sampling_mask: Any = None
    spec_decode_metrics: Any = None
    weight_versions: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs,
        outputs: list[CompletionOutput],
        finished: bool,
        metrics=None,
        lora_request=None,
        encoder_prompt: str | None = None,
        encoder_prompt_token_ids: list[int] | None = None,
        num_cached_tokens: int | None = None,
        num_cache_creation_tokens: int | None = None,
        *,
        prompt_token_id_logprobs=None,
        kv_transfer_params: dict[str, Any] | None = None,
        ec_transfer_params: dict[str, Any] | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.prompt_token_id_logprobs = prompt_token_id_logprobs
        self.outputs = outputs
        self.finished = finished
        self.metrics = metrics
        self.lora_request = lora_request
        self.encoder_prompt = encoder_prompt
        self.encoder_prompt_token_ids = encoder_prompt_token_ids
        self.num_cached_tokens = num_cached_tokens
        self.num_cache_creation_tokens = num_cache_creation_tokens
        self.kv_transfer_params = kv_transfer_params
        self.ec_transfer_params = ec_transfer_params


# ---------------------------------------------------------------------------------------------
# vllm/entrypoints/llm.py

_TOKENS_PROMPT_KEYS = {
    "prompt_token_ids": _INTS,
    "prompt": str,
    "token_type_ids": _INTS,
    "prompt_token_offsets": (("list", tuple), _NONE),
    "multi_modal_data": (dict, _NONE),
    "media_io_kwargs": (dict, _NONE),
    "mm_processor_kwargs": (dict, _NONE),
    "multi_modal_uuids": dict,
    "cache_salt": str,
}

_gpu_taken: list[str] = []  # the models whose memory this process's GPU holds


class _EngineCore:
    """The engine core client: ``shutdown`` frees the model's GPU memory."""

    def __init__(self, model: str):
        self.model = model
        self._finalizer = weakref.finalize(self, _free, model)

    def shutdown(self, timeout: float | None = None) -> None:
        if self._finalizer.detach() is not None:
            _free(self.model)
            _log("shutdown", model=self.model)


def _free(model: str) -> None:
    _gpu_taken.remove(model)


class _LLMEngine:
    def __init__(self, model: str):
        self.engine_core = _EngineCore(model)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _tokenizer_eos(directory: Path) -> int:
    """The tokenizer's end token id, from its files (vLLM asks the HF tokenizer; the double
    reads the same files without loading transformers in every replica process)."""
    eos = _read_json(directory / "tokenizer_config.json")["eos_token"]
    eos = eos["content"] if isinstance(eos, dict) else eos
    tokenizer = _read_json(directory / "tokenizer.json")
    for added in tokenizer.get("added_tokens", []):
        if added["content"] == eos:
            return added["id"]
    return tokenizer["model"]["vocab"][eos]


class LLM:
    """vllm.LLM: the constructor's keywords and types, and ``generate``."""

    _KEYWORDS: dict[str, Any] = {
        "runner": str,
        "convert": str,
        "tokenizer": (str, _NONE),
        "tokenizer_mode": str,
        "skip_tokenizer_init": bool,
        "trust_remote_code": bool,
        "allowed_local_media_path": str,
        "allowed_media_domains": (("list", str), _NONE),
        "tensor_parallel_size": int,
        "dtype": str,
        "quantization": (str, _NONE),
        "revision": (str, _NONE),
        "tokenizer_revision": (str, _NONE),
        "chat_template": (str, os.PathLike, _NONE),
        "seed": int,
        "gpu_memory_utilization": float,
        "cpu_offload_gb": float,
        "offload_group_size": int,
        "offload_num_in_group": int,
        "offload_prefetch_step": int,
        "offload_params": (set, _NONE),
        "enforce_eager": bool,
        "enable_return_routed_experts": bool,
        "return_sampling_mask": bool,
        "disable_custom_all_reduce": bool,
        "hf_token": (bool, str, _NONE),
        "hf_overrides": (dict, Callable, _NONE),
        "mm_processor_kwargs": (dict, _NONE),
        "pooler_config": object,
        "structured_outputs_config": object,
        "profiler_config": object,
        "attention_config": object,
        "kv_cache_memory_bytes": (int, _NONE),
        "compilation_config": object,
        "quantization_config": object,
        "logits_processors": (list, _NONE),
        "spec_method": (str, _NONE),
        "spec_model": (str, _NONE),
        "spec_tokens": (int, _NONE),
        **ENGINE_ARGS,
    }

    def __init__(self, model: str, **kwargs) -> None:
        if not isinstance(model, str):
            raise TypeError(f"LLM(): model={model!r} is not of type str")
        _check_keywords("LLM", kwargs, self._KEYWORDS)
        dtype = kwargs.get("dtype", "auto")
        if dtype not in get_args(ModelDType):
            raise ValueError(f"Unknown dtype: {dtype!r}")
        if kwargs.get("tensor_parallel_size", 1) < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if not 0 < kwargs.get("gpu_memory_utilization", 0.92) <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        data_parallel = kwargs.get("data_parallel_size", 1)
        if data_parallel > 1 and kwargs.get("distributed_executor_backend") != "external_launcher":
            raise ValueError(
                f"LLM(data_parallel_size={data_parallel}) is not supported for single-process "
                "usage and may hang."
            )
        if _gpu_taken:
            raise ValueError(
                f"Free memory on device is less than desired GPU memory utilization: the GPU "
                f"still holds {_gpu_taken[0]}"
            )
        config = _read_json(Path(model) / "config.json")
        generation = _read_json(Path(model) / "generation_config.json") or config
        ends = generation.get("eos_token_id")
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        self._eos = [_tokenizer_eos(Path(kwargs.get("tokenizer") or model)), *ends]
        self._vocab = config["vocab_size"]
        self._max_model_len = kwargs.get("max_model_len") or config["max_position_embeddings"]
        self.model = model
        self.arguments = {"model": model, **kwargs}
        _gpu_taken.append(model)
        self.llm_engine = _LLMEngine(model)
        _log("load", model=model, dtype=dtype, arguments=self.arguments)

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable = True,
        lora_request=None,
        priority: int | Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if not (isinstance(use_tqdm, bool) or callable(use_tqdm)):
            raise TypeError(f"generate(): use_tqdm={use_tqdm!r} is neither a bool nor callable")
        if callable(use_tqdm):  # called as vLLM calls it: over the prompts, then with a total
            use_tqdm(prompts if isinstance(prompts, list) else [prompts], desc="Rendering prompts")
            use_tqdm(total=1, desc="Processed prompts", dynamic_ncols=True, postfix="")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise VLLMValidationError(
                    f"The lengths of prompts ({len(prompts)}) and params "
                    f"({len(sampling_params)}) must be the same."
                )
        else:
            sampling_params = [sampling_params] * len(prompts)
        outputs = []
        for number, (prompt, params) in enumerate(zip(prompts, sampling_params, strict=True)):
            if not isinstance(prompt, dict):
                raise TypeError("the double takes token prompts only: {'prompt_token_ids': [...]}")
            _check_keywords("TokensPrompt", prompt, _TOKENS_PROMPT_KEYS)
            if not isinstance(params, SamplingParams):
                raise TypeError(f"sampling_params[{number}] is not a SamplingParams")
            ids = prompt["prompt_token_ids"]
            if not ids:
                raise VLLMValidationError("The decoder prompt cannot be empty")
            if len(ids) >= self._max_model_len:
                raise VLLMValidationError(
                    f"The decoder prompt (length {len(ids)}) is longer than the maximum model "
                    f"length of {self._max_model_len}."
                )
            outputs.append(self._answer(str(number), ids, params))
        _log(
            "generate",
            model=self.model,
            seeds=[p.seed for p in sampling_params],
            stop_token_ids=[list(p.stop_token_ids) for p in sampling_params],
            max_tokens=[p.max_tokens for p in sampling_params],
        )
        return outputs

    def _answer(self, request_id: str, ids: list[int], params: SamplingParams) -> RequestOutput:
        stops = list(dict.fromkeys([*params.stop_token_ids, *self._eos]))
        rng = random.Random(f"{params.seed}:{ids}")
        others = [t for t in range(self._vocab) if t not in stops]
        limit = min(params.max_tokens or self._max_model_len, self._max_model_len - len(ids))
        tokens: list[int] = []
        finish, stop_reason = "length", None
        while len(tokens) < limit:
            if rng.random() < END_PROBABILITY:
                tokens.append(rng.choice(stops))
                finish = "stop"
                if tokens[-1] in params.stop_token_ids and tokens[-1] != self._eos[0]:
                    stop_reason = tokens[-1]
                break
            tokens.append(rng.choice(others))
        logprobs = [
            {token: Logprob(logprob=math.log(rng.uniform(0.05, 1.0)), rank=1)} for token in tokens
        ]
        answer = CompletionOutput(
            index=0,
            text="",
            token_ids=tokens,
            cumulative_logprob=sum(
                step[t].logprob for step, t in zip(logprobs, tokens, strict=True)
            ),
            logprobs=logprobs if params.logprobs is not None else None,
            finish_reason=finish,
            stop_reason=stop_reason,
        )
        return RequestOutput(request_id, None, list(ids), None, [answer], True)

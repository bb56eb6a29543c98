"""Generation engines, one small module each, behind one interface.

An engine has a ``name`` and ``complete(requests, sampling, desc=...) -> completions``
(:class:`spinflow.generation.Request` in, :class:`spinflow.generation.Completion` out, in the
same order). ``generate.engine`` picks one:

- ``torch`` (:mod:`spinflow.engines.torch`): the reference. HF forward passes, any
  model, batches of prompts sorted by length.
- ``continuous`` (:mod:`spinflow.engines.continuous`): a static KV cache and continuous batching
  in plain torch, for llama-style models; the default on CPUs.
- ``vllm`` (:mod:`spinflow.engines.vllm`): vLLM on GPUs, installed with ``spinflow[vllm]``.

Every engine uses each prompt's own seed and ends answers on the same tokens
(:func:`spinflow.generation.end_token_ids`). An engine is a context manager: a stage opens it
with ``with open_engine(...) as engine:``, calls ``complete`` as often as it needs, and the
engine releases what it holds (vLLM's GPU memory) when the block ends, before the stage loads
another model. :func:`check_engine` says, before a stage does any work, whether the chosen
engine can run here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from spinflow.errors import SpinflowError

ENGINES = ("torch", "continuous", "vllm")


def check_engine(engine: str) -> None:
    """Stop with one line when ``generate.engine`` cannot run on this machine."""
    if engine not in ENGINES:
        raise SpinflowError(
            f"generate.engine: unknown engine {engine!r}; choose one of {', '.join(ENGINES)}"
        )
    if engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise SpinflowError(
                "generate.engine: vllm is not installed: pip install 'spinflow[vllm]' "
                "(GPU machines), or choose continuous or torch"
            )
        import torch

        if not torch.cuda.is_available():
            raise SpinflowError(
                "generate.engine: vllm needs a CUDA GPU and none is visible here; "
                "choose continuous or torch"
            )


def open_engine(generate, model, tokenizer, *, model_dir: Path, batch_size: int | None = None):
    """The engine ``generate.engine`` names, for ``model`` (loaded from ``model_dir``; vllm
    loads it itself and takes ``model=None``), to use in a ``with`` block.

    ``generate`` is the ``generate`` section of the params; ``batch_size`` overrides its
    ``batch_size`` (evaluation has its own).
    """
    from spinflow.generation import end_token_ids

    check_engine(generate.engine)
    slots = batch_size or generate.batch_size
    ends = end_token_ids(tokenizer, model if model is not None else model_dir)
    if generate.engine == "torch":
        from spinflow.engines.torch import TorchEngine

        return TorchEngine(
            model, eos_token_id=ends, pad_token_id=tokenizer.pad_token_id, batch_size=slots
        )
    if generate.engine == "continuous":
        from spinflow.engines.continuous import ContinuousEngine

        return ContinuousEngine(model, eos_token_id=ends, batch_size=slots, dtype=generate.dtype)
    from spinflow.engines.vllm import VllmEngine

    return VllmEngine(model_dir, eos_token_id=ends, options=generate.vllm)

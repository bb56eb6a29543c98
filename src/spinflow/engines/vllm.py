"""The ``vllm`` engine: vLLM on GPUs (``pip install 'spinflow[vllm]'``), written against vLLM 0.33.

One model, one vLLM instance, for the life of the engine. The ``vllm.LLM`` is built on the first
``complete()`` and answers every later call; ``close()`` (or the end of the ``with`` block the
stage opened the engine in) deletes it, stops its engine core, tears down vLLM's model-parallel
groups and distributed environment (``vllm.distributed.parallel_state.
cleanup_dist_env_and_memory``), collects garbage and empties torch's CUDA cache, so the GPU's
memory is free before the stage loads another model. A process holds one model at a time: an
engine that loads its model first closes the one still open in the process, if any.

Each request goes to vLLM with its own seed (``SamplingParams.seed``), so an answer depends on its
prompt and seed, not on the batch it ran in, within vLLM's own limits: results are batch-invariant
only with ``VLLM_BATCH_INVARIANT=1`` on the same GPU model and vLLM version. Answers end on the
end tokens every engine uses (:func:`spinflow.generation.end_token_ids`), passed as
``stop_token_ids`` (vLLM adds the same ones itself) and stripped from the answer; the log-prob
of an answer is the sum of vLLM's raw (untempered) log-probs of its tokens and its end token.

``generate.vllm.dtype: auto`` is decided here rather than left to vLLM, whose ``auto`` turns a
float32 checkpoint into float16 on some versions and GPUs (0.33 takes bfloat16 on GPUs of
compute capability 8.0 or more; its documentation still says float16). A checkpoint saved in
bfloat16 or float16 (:func:`spinflow.training.save_checkpoint` saves θk in bfloat16 when it was
trained with bf16 on GPUs) is loaded in that dtype. A float32 checkpoint is loaded in bfloat16
where the GPU computes it (``torch.cuda.is_bf16_supported()``), else in float32: never float16,
whose range a model trained in float32 or bfloat16 can overflow. The choice is logged.

``generate.vllm.tensor_parallel_size`` GPUs serve one model replica; with
``generate.vllm.data_parallel_size`` replicas (vLLM refuses ``data_parallel_size > 1`` in one
process), each replica is a process of its own on its own GPUs that keeps its model loaded
across calls and answers every n-th request; the answers come back in request order.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from spinflow.errors import SpinflowError
from spinflow.generation import Completion, Engine, Request, SamplingParams, as_end_tokens

log = logging.getLogger(__name__)

STOP_TIMEOUT = 120  # seconds a replica may take to release its model and exit

_resident: VllmEngine | None = None  # the engine whose model this process holds


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype a checkpoint's config.json records (``dtype``, or ``torch_dtype`` before
    transformers 5), or None."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def resolve_dtype(option: str, model_dir: Path, *, bf16_supported: bool) -> tuple[str, str]:
    """The dtype to hand vLLM for ``generate.vllm.dtype`` = ``option``, and why, in words."""
    if option != "auto":
        return option, "generate.vllm.dtype"
    saved = checkpoint_dtype(model_dir)
    if saved in ("bfloat16", "float16"):
        return saved, f"the checkpoint's dtype ({saved})"
    if bf16_supported:
        return "bfloat16", f"checkpoint {saved or 'without a dtype'}, the GPU computes bfloat16"
    return "float32", f"checkpoint {saved or 'without a dtype'}, no bfloat16 on this GPU"


def _engine_arguments(model_dir: Path, options) -> dict:
    return {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "dtype": options.dtype,  # "auto" is resolved where the model is loaded (_load)
        "seed": 0,  # every request carries its own seed
    }


def _load(arguments: dict):
    """A ``vllm.LLM`` for ``arguments``, on the GPUs visible to this process."""
    import torch
    import vllm

    dtype, reason = resolve_dtype(
        arguments["dtype"], Path(arguments["model"]), bf16_supported=torch.cuda.is_bf16_supported()
    )
    log.info("vllm: loading %s in %s (%s)", arguments["model"], dtype, reason)
    return vllm.LLM(**{**arguments, "dtype": dtype})


def _stop(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core now rather than when it is garbage collected."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def _free_memory() -> None:
    """Once the last reference to a ``vllm.LLM`` is gone: vLLM's model-parallel groups and
    distributed environment torn down, garbage collected, torch's CUDA cache emptied."""
    import torch
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _answer(
    llm, requests: Sequence[Request], sampling: SamplingParams, ends: frozenset[int], desc: str
) -> list[Completion]:
    """``requests`` answered by a loaded ``vllm.LLM``, in their order."""
    import vllm

    stop = sorted(ends)
    per_request = [
        vllm.SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,  # no top-k cut (vLLM makes temperature 0 greedy by itself)
            max_tokens=sampling.max_new_tokens,
            seed=request.seed,
            stop_token_ids=stop,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,  # the tokenizer decodes the answers (generate_answers)
        )
        for request in requests
    ]
    log.info("vllm: %s, %d prompts", desc, len(requests))
    outputs = llm.generate(
        [{"prompt_token_ids": list(r.prompt_ids)} for r in requests], per_request, use_tqdm=True
    )
    completions = []
    for output in outputs:
        answer = output.outputs[0]
        token_ids = list(answer.token_ids)
        logp = sum(
            step[token].logprob
            for step, token in zip(answer.logprobs or [], token_ids, strict=False)
        )
        ended = answer.finish_reason == "stop"
        end = token_ids.pop() if ended and token_ids and token_ids[-1] in ends else None
        completions.append(
            Completion(token_ids=token_ids, logp=float(logp), ended=ended, end_token_id=end)
        )
    return completions


def _serve(rank: int, devices: str, arguments: dict, ends: frozenset[int], connection) -> None:
    """One data-parallel replica: loads the model on its GPUs at its first request, answers
    ``(requests, sampling, desc)`` messages until it receives None, then releases the model."""
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    llm = None
    try:
        while (message := connection.recv()) is not None:
            requests, sampling, desc = message
            try:
                if llm is None:
                    llm = _load(arguments)
                connection.send(("ok", _answer(llm, requests, sampling, ends, desc)))
            except Exception as exc:  # reported by the parent as one line
                connection.send(("error", f"replica {rank}: {type(exc).__name__}: {exc}"))
    except EOFError:
        pass  # the parent is gone
    finally:
        if llm is not None:
            _stop(llm)
            llm = None
            _free_memory()
        connection.close()


class VllmEngine(Engine):
    """``eos_token_id``: the end tokens (:func:`spinflow.generation.end_token_ids`)."""

    name = "vllm"

    def __init__(self, model_dir: Path, *, eos_token_id: int | Iterable[int], options):
        self.arguments = _engine_arguments(Path(model_dir), options)
        self.eos_token_id = as_end_tokens(eos_token_id)
        self.replicas = options.data_parallel_size
        self.gpus_per_replica = options.tensor_parallel_size
        self._llm = None  # one replica: the model, in this process
        self._workers: list = []  # several: (process, connection) per replica

    def complete(
        self, requests: Sequence[Request], sampling: SamplingParams, *, desc: str = "generate"
    ) -> list[Completion]:
        if not requests:
            return []
        if self.replicas == 1:
            if self._llm is None:
                self._hold()
                self._llm = _load(self.arguments)
            return _answer(self._llm, requests, sampling, self.eos_token_id, desc)
        return self._complete_data_parallel(requests, sampling, desc)

    def close(self) -> None:
        """Release the model: this process's vLLM instance, or stop the replicas (each releases
        its own). The engine can be used again: the next ``complete()`` loads the model anew."""
        global _resident
        if _resident is self:
            _resident = None
        if self._llm is not None:
            _stop(self._llm)
            self._llm = None
            _free_memory()
        workers, self._workers = self._workers, []
        for _, connection in workers:
            with contextlib.suppress(OSError):  # that replica is gone already
                connection.send(None)
        for process, connection in workers:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                log.warning(
                    "vllm replica %s did not stop in %ss: terminated", process.pid, STOP_TIMEOUT
                )
                process.terminate()
                process.join()
            connection.close()

    def _hold(self) -> None:
        """Make this engine the one whose model the process holds, closing any other first."""
        global _resident
        if _resident is not None and _resident is not self:
            log.info(
                "vllm: releasing %s before loading %s",
                _resident.arguments["model"],
                self.arguments["model"],
            )
            _resident.close()
        _resident = self

    def _start_replicas(self) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        import torch

        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        needed = self.replicas * self.gpus_per_replica
        if len(gpus) < needed:
            raise SpinflowError(
                f"generate.vllm: data_parallel_size {self.replicas} x tensor_parallel_size "
                f"{self.gpus_per_replica} needs {needed} GPUs, {len(gpus)} visible"
            )
        self._hold()
        context = multiprocessing.get_context("spawn")
        for rank in range(self.replicas):
            devices = ",".join(
                gpus[rank * self.gpus_per_replica : (rank + 1) * self.gpus_per_replica]
            )
            parent, child = context.Pipe()
            process = context.Process(
                target=_serve, args=(rank, devices, self.arguments, self.eos_token_id, child)
            )
            process.start()
            child.close()
            self._workers.append((process, parent))

    def _complete_data_parallel(self, requests, sampling, desc) -> list[Completion]:
        if not self._workers:
            self._start_replicas()
        for rank, (_, connection) in enumerate(self._workers):
            share = list(requests[rank :: self.replicas])
            connection.send((share, sampling, desc if rank == 0 else f"{desc} [{rank}]"))
        completions: list[Completion | None] = [None] * len(requests)
        problems = []
        for rank, (_, connection) in enumerate(self._workers):
            try:
                status, payload = connection.recv()
            except EOFError:
                status, payload = "error", f"replica {rank} exited without answering"
            if status != "ok":
                problems.append(payload)
                continue
            for offset, completion in enumerate(payload):
                completions[rank + offset * self.replicas] = completion
        if problems:
            self.close()
            raise SpinflowError("generate.engine vllm: " + "; ".join(problems))
        return completions  # type: ignore[return-value]

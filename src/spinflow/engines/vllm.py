"""The ``vllm`` engine: vLLM on GPUs (``pip install 'spinflow[vllm]'``).

Each request goes to vLLM with its own seed (``SamplingParams.seed``), so an answer depends on its
prompt and seed, not on the batch it ran in, within vLLM's own limits: results are batch-invariant
only with ``VLLM_BATCH_INVARIANT=1`` on the same GPU model and vLLM version.

``generate.vllm.tensor_parallel_size`` GPUs serve one model replica; with
``generate.vllm.data_parallel_size`` replicas, each runs in its own process on its own GPUs and
answers every n-th request; the answers come back in request order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

from spinflow.errors import SpinflowError
from spinflow.generation import Completion, Request, SamplingParams


def _engine_arguments(model_dir: Path, options) -> dict:
    return {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "dtype": options.dtype,
        "seed": 0,  # every request carries its own seed
    }


def _complete_here(
    arguments: dict, requests: Sequence[Request], sampling: SamplingParams, eos: int, desc: str
) -> list[Completion]:
    """Answer ``requests`` with one vLLM instance in this process."""
    import vllm

    llm = vllm.LLM(**arguments)
    per_request = [
        vllm.SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=-1 if sampling.temperature > 0 else 1,
            max_tokens=sampling.max_new_tokens,
            seed=request.seed,
            stop_token_ids=[eos],
            logprobs=0,  # the sampled token's log-prob
        )
        for request in requests
    ]
    outputs = llm.generate(
        [{"prompt_token_ids": list(r.prompt_ids)} for r in requests], per_request, use_tqdm=True
    )
    completions = []
    for output in outputs:
        answer = output.outputs[0]
        token_ids = list(answer.token_ids)
        ended = answer.finish_reason == "stop"
        logp = sum(
            step[token].logprob
            for step, token in zip(answer.logprobs or [], token_ids, strict=False)
        )
        if token_ids and token_ids[-1] == eos:
            token_ids = token_ids[:-1]
        completions.append(Completion(token_ids=token_ids, logp=float(logp), ended=ended))
    return completions


def _replica(rank: int, devices: str, arguments, requests, sampling, eos, desc, connection):
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        connection.send(("ok", _complete_here(arguments, requests, sampling, eos, desc)))
    except BaseException as exc:  # reported by the parent as one line
        connection.send(("error", f"replica {rank}: {type(exc).__name__}: {exc}"))
    finally:
        connection.close()


class VllmEngine:
    name = "vllm"

    def __init__(self, model_dir: Path, *, eos_token_id: int, options):
        self.arguments = _engine_arguments(Path(model_dir), options)
        self.eos_token_id = eos_token_id
        self.replicas = options.data_parallel_size
        self.gpus_per_replica = options.tensor_parallel_size

    def complete(
        self, requests: Sequence[Request], sampling: SamplingParams, *, desc: str = "generate"
    ) -> list[Completion]:
        if self.replicas == 1:
            return _complete_here(self.arguments, requests, sampling, self.eos_token_id, desc)
        return self._complete_data_parallel(requests, sampling, desc)

    def _complete_data_parallel(self, requests, sampling, desc) -> list[Completion]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        import torch

        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        needed = self.replicas * self.gpus_per_replica
        if len(gpus) < needed:
            raise SpinflowError(
                f"generate.vllm: data_parallel_size {self.replicas} x tensor_parallel_size "
                f"{self.gpus_per_replica} needs {needed} GPUs, {len(gpus)} visible"
            )
        context = multiprocessing.get_context("spawn")
        workers = []
        for rank in range(self.replicas):
            devices = ",".join(
                gpus[rank * self.gpus_per_replica : (rank + 1) * self.gpus_per_replica]
            )
            receive, send = context.Pipe(duplex=False)
            share = list(requests[rank :: self.replicas])
            process = context.Process(
                target=_replica,
                args=(
                    rank,
                    devices,
                    self.arguments,
                    share,
                    sampling,
                    self.eos_token_id,
                    desc,
                    send,
                ),
            )
            process.start()
            send.close()
            workers.append((process, receive))
        completions: list[Completion | None] = [None] * len(requests)
        problems = []
        for rank, (process, receive) in enumerate(workers):
            try:
                status, payload = receive.recv()
            except EOFError:
                status, payload = "error", f"replica {rank} exited without answering"
            process.join()
            if status != "ok":
                problems.append(payload)
                continue
            for offset, completion in enumerate(payload):
                completions[rank + offset * self.replicas] = completion
        if problems:
            raise SpinflowError("generate.engine vllm: " + "; ".join(problems))
        return completions  # type: ignore[return-value]

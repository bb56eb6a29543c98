"""Training: one loop for every method, built on accelerate.

The same code runs in one CPU process here and in several GPU processes elsewhere (DDP, FSDP or
DeepSpeed through ``accelerate launch --config_file``). A method brings its examples, its collate
function and its loss function (:data:`LossFn`); :func:`train_loop` does the rest.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spinflow.chat import Encoded, collate, encode_example
from spinflow.devices import runs_on_cpu
from spinflow.errors import TrainingError
from spinflow.io import RowsCsvStream
from spinflow.logprobs import mean_nll, segment_logps
from spinflow.schema import OptimParams, PromptParams

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    steps: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """What the run computed: the same for the same inputs (DVC hashes it as a metric)."""
        last = self.history[-1] if self.history else {}
        return {
            "optimizer_steps": self.steps,
            "examples_seen": self.examples_seen,
            "tokens_seen": self.tokens_seen,
            **{f"final_{k}": v for k, v in last.items() if k not in ("step", "epoch")},
        }

    def timings(self) -> dict[str, float]:
        """How long it took and how much memory it used: different on every run, so kept out of
        the hashed metrics (see :func:`spinflow.graph.timings_file`)."""
        return {
            "train_seconds": round(self.seconds, 3),
            "examples_per_second": round(self.examples_seen / self.seconds, 4)
            if self.seconds
            else 0.0,
            "tokens_per_second": round(self.tokens_seen / self.seconds, 2) if self.seconds else 0.0,
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size otherwise."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def make_accelerator(optim: OptimParams, device: torch.device | None = None):
    """An Accelerator for ``optim`` on ``device`` (the stage's, :mod:`spinflow.devices`; default:
    a GPU when there is one); ``optim.bf16`` must be resolved already (true or false, see
    :func:`spinflow.precision.resolve_precision`): bf16 is autocast over float32 weights.

    Launched with an FSDP config on CPU processes (gloo), the model is sharded with FSDP as on
    GPUs (accelerate itself knows FSDP only on accelerators): a config can be tried on a laptop
    with the code a GPU run uses.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if optim.bf16 not in (True, False):
        raise TrainingError(f"bf16: {optim.bf16!r} must be resolved to true or false first")
    mixed_precision = "bf16" if optim.bf16 else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        if PartialState().num_processes > 1:
            raise TrainingError(
                f"this process already trained with mixed precision "
                f"{state.get('_mixed_precision')!r}; {mixed_precision!r} needs a new process"
            )
        # one process that trains twice (the benchmark, tests): accelerate keeps the first
        # precision for the life of the process unless its state is cleared
        AcceleratorState._reset_state()
    cpu = runs_on_cpu(device)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        cpu=cpu,
    )
    if cpu and accelerator.num_processes > 1 and _fsdp_requested():
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launcher
    return accelerator


def _fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_optimizer(model: torch.nn.Module, optim: OptimParams) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    if optim.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)


def apply_lora(model, optim: OptimParams):
    if not optim.lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=optim.lora.r,
        lora_alpha=optim.lora.alpha,
        lora_dropout=optim.lora.dropout,
        target_modules=list(optim.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_lora(model):
    """A plain model again: LoRA adapters are merged so every θk is an ordinary checkpoint."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def saved_dtype(accelerator) -> torch.dtype | None:
    """The dtype a checkpoint is saved in when it differs from its weights': bfloat16 for a model
    trained with bf16 on GPUs, the precision it was trained in (vLLM's ``dtype: auto`` and the
    next stage then read bfloat16, not float32 cast to float16). None on CPUs: there θk keeps
    its float32 weights, so what a CPU run saves does not depend on ``bf16``."""
    if accelerator.mixed_precision == "bf16" and not runs_on_cpu(accelerator.device):
        return torch.bfloat16
    return None


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    """``state_dict`` with its floating-point tensors in ``dtype``; tensors that shared storage
    (tied embeddings) still share it, so the checkpoint stores them once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident not in cast:
            cast[ident] = value.detach().to(dtype)
        out[key] = cast[ident]
    return out


def _record_dtype(checkpoint: Path, dtype: torch.dtype) -> None:
    """config.json of ``checkpoint`` says its weights are in ``dtype`` (``save_pretrained``
    records the dtype of the module, not that of the state dict it was given)."""
    import json

    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    accelerator, model, tokenizer, out_dir: Path, files: dict[str, Any] | None = None
) -> None:
    """Save a plain checkpoint atomically (main process only), with ``files`` (name: JSON
    object, such as provenance.json) written into it before it takes its place; in bfloat16
    when trained with bf16 on GPUs (:func:`saved_dtype`)."""
    from torch.distributed.fsdp import FSDPModule

    from spinflow.io import atomic_path, write_json

    accelerator.wait_for_everyone()
    sharded = isinstance(accelerator.unwrap_model(model), FSDPModule)  # FSDP2
    if sharded:
        state_dict = _gathered(model.state_dict(), accelerator.is_main_process)
    else:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        plain = merge_lora(accelerator.unwrap_model(model))
        if sharded:
            plain, state_dict = _unsharded(plain, state_dict), None
        elif plain is not accelerator.unwrap_model(model):
            state_dict = None  # merged weights live in the module now
        dtype = saved_dtype(accelerator)
        if dtype is not None:
            state_dict = _cast(plain.state_dict() if state_dict is None else state_dict, dtype)
        with atomic_path(out_dir, directory=True) as tmp:
            plain.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:
                _record_dtype(tmp, dtype)
            tokenizer.save_pretrained(tmp)
            for name, obj in (files or {}).items():
                write_json(tmp / name, obj)
    accelerator.wait_for_everyone()


def _gathered(state_dict: dict, keep: bool) -> dict:
    """Full CPU tensors of an FSDP2 ``state_dict`` whose values may still be sharded (DTensor):
    every process takes part in each gather, only the one that ``keep``s stores the result."""
    from torch.distributed.tensor import DTensor

    full = {}
    for key, value in state_dict.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            full[key] = value.detach().to("cpu")
    return full


def _unsharded(model, state_dict: dict):
    """A plain copy of an FSDP2 model holding its gathered ``state_dict``: transformers'
    ``save_pretrained`` reads the model's own (sharded) weights, which on the main process alone
    would wait forever for the others."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
    tied = {key for key in missing if key.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise TrainingError(
            f"the gathered weights do not fit {type(plain).__name__}: missing "
            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


# ---------------------------------------------------------------------------------------------
# Examples and batches


@dataclass(frozen=True)
class SftExample:
    encoded: Encoded

    @property
    def length(self) -> int:
        return len(self.encoded.input_ids)


def encode_sft(tokenizer, records: Sequence[dict], prompt: PromptParams) -> list[SftExample]:
    return [
        SftExample(
            encode_example(
                tokenizer,
                r["prompt"],
                r["answer"],
                system_prompt=prompt.system_prompt,
                max_prompt_length=prompt.max_prompt_length,
                max_length=prompt.max_length,
            )
        )
        for r in records
    ]


def sft_collate(pad_token_id: int):
    def fn(examples: list[SftExample]) -> dict:
        return collate([e.encoded for e in examples], pad_token_id)

    return fn


def forward_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-prob of every scored sequence of ``batch`` (answers only, see
    :mod:`spinflow.logprobs`)."""
    return segment_logps(model, batch)


def sft_loss_fn(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    loss = mean_nll(model, batch)
    return loss, {"loss": loss.item()}


def batch_rows(batch: dict) -> int:
    """Examples in a batch: pairs for SPIN (``index``), sequences otherwise."""
    return batch["index"].numel() if "index" in batch else batch["input_ids"].size(0)


def answer_tokens(batch: dict) -> int:
    """Tokens the SFT loss averages over: the answer tokens (each one predicted from before)."""
    return int(batch["loss_mask"][:, 1:].sum())


# ---------------------------------------------------------------------------------------------
# Resumable state

RESUME_DIR = Path(".spinflow") / "resume"
_COMPLETE = "loop.json"  # written last: a state folder without it is incomplete


@dataclass
class Resume:
    """Where a training stage keeps its resumable state, how often, and for what: the state is
    used only by a run with the same ``fingerprint`` (the stage, its settings and the hashes of
    its inputs)."""

    directory: Path
    every_steps: int
    fingerprint: str

    @classmethod
    def for_stage(cls, stage: str, every_steps: int | None, made_by: dict | None):
        """The stage's resume state, or None when ``every_steps`` is None. ``made_by`` is the
        provenance the main process computed (None on the others): its settings and input
        hashes make the fingerprint, which every process receives."""
        if every_steps is None:
            return None
        import hashlib
        import json

        from accelerate.state import PartialState

        fingerprint = None
        if made_by:
            identity = {key: made_by[key] for key in ("stage", "params", "inputs", "libraries")}
            text = json.dumps(identity, sort_keys=True, default=str)
            fingerprint = hashlib.sha256(text.encode()).hexdigest()
        state = PartialState()
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            fingerprint = broadcast_object_list([fingerprint])[0]
        return cls(RESUME_DIR / stage, every_steps, fingerprint)

    def latest(self) -> Path | None:
        """The newest complete state of this fingerprint (other states are removed)."""
        from spinflow.io import read_json

        found = []
        for folder in sorted(self.directory.glob("step-*")):
            marker = folder / _COMPLETE
            saved = read_json(marker) if marker.is_file() else {}
            if saved.get("fingerprint") == self.fingerprint:
                found.append((saved["steps"], folder))
        return max(found)[1] if found else None

    def clear(self, keep: Path | None = None) -> None:
        """Remove every state but ``keep`` (main process only); the folder too when empty."""
        import shutil

        for folder in self.directory.glob("step-*"):
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def finish(self, accelerator) -> None:
        """The stage's outputs are saved: its resumable state is of no more use."""
        if accelerator.is_main_process:
            self.clear()
        accelerator.wait_for_everyone()


def _save_resume(resume: Resume, accelerator, scheduler, result, on_epoch) -> None:
    """The state after ``result.steps`` optimizer steps, complete or not at all: accelerate's
    ``save_state`` (weights, optimizer, RNG of every process), the schedule and the loop's own
    position; then the older states go."""
    from spinflow.io import write_json, write_text

    folder = resume.directory / f"step-{result.steps:09d}"
    if accelerator.is_main_process:
        ignore = RESUME_DIR.parent / ".gitignore"
        if not ignore.is_file():
            write_text(ignore, "# spinflow's local state; not versioned\n*\n")
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        torch.save(
            {
                "scheduler": scheduler.state_dict(),
                "callback": on_epoch.state_dict() if hasattr(on_epoch, "state_dict") else None,
                "history": result.history,  # its rows' key order is the CSV's column order
            },
            folder / "extra.pt",
        )
        write_json(
            folder / _COMPLETE,
            {
                "fingerprint": resume.fingerprint,
                "steps": result.steps,
                "examples_seen": result.examples_seen,
                "tokens_seen": result.tokens_seen,
            },
        )
        resume.clear(keep=folder)
    accelerator.wait_for_everyone()


def _load_resume(folder: Path, accelerator, scheduler, result, on_epoch) -> None:
    """Restore the state saved in ``folder``."""
    from spinflow.io import read_json

    accelerator.load_state(str(folder))
    extra = torch.load(folder / "extra.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    if extra["callback"] is not None and hasattr(on_epoch, "load_state_dict"):
        on_epoch.load_state_dict(extra["callback"])
    saved = read_json(folder / _COMPLETE)
    result.steps = saved["steps"]
    result.examples_seen = saved["examples_seen"]
    result.tokens_seen = saved["tokens_seen"]
    result.history = extra["history"]


# ---------------------------------------------------------------------------------------------
# The loop


def _windows(loader, size: int):
    """(index of the last micro-batch, micro-batches) of each optimizer step of one epoch; the
    last step of an epoch may have fewer micro-batches."""
    window: list[dict] = []
    for micro, batch in enumerate(loader):
        window.append(batch)
        if len(window) == size:
            yield micro, window
            window = []
    if window:
        yield micro, window


def _optimizer_step(accelerator, model, optimizer, window, loss_fn, count, optim, where):
    """Accumulate the gradients of ``window``'s micro-batches, clip, step once.

    Returns the step's metrics (weighted by each micro-batch's items) and the gradient norm
    before clipping (None when clipping is off).
    """
    weights = [count(batch) for batch in window]
    total = sum(weights)
    processes = accelerator.num_processes
    if processes > 1:  # the step's items over every process
        total = accelerator.reduce(
            torch.tensor(float(total), device=accelerator.device), reduction="sum"
        ).item()
    # accelerate divides every loss by gradient_accumulation_steps, DDP and FSDP average the
    # processes' gradients: undo both and weight each micro-batch by its share of the step
    scales = [
        w * accelerator.gradient_accumulation_steps * processes / (total or 1) for w in weights
    ]
    row: dict[str, float] = {}
    for i, batch in enumerate(window):
        last = i + 1 == len(window)
        accelerator.sync_gradients = last  # gates the optimizer step and DeepSpeed's boundary
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            # accelerate autocasts only the prepared model's forward; the loss functions call
            # the transformer body and the output layer directly (spinflow.logprobs)
            with accelerator.autocast():
                loss, metrics = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    where.format(loss.item()) + "; lower the learning rate or check the data"
                )
            accelerator.backward(loss * scales[i] if scales[i] != 1.0 else loss)
        for key, value in metrics.items():
            row[key] = row.get(key, 0.0) + value * weights[i] / (sum(weights) or 1)
    if processes > 1:
        row = _global_means(accelerator, row, sum(weights))
    grad_norm = None
    if optim.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return row, grad_norm


def _seen(accelerator, window: list[dict]) -> tuple[int, int]:
    """Examples and tokens of one optimizer step, over every process; tokens of the sequences
    scored (a prompt shared by two answers counts twice)."""
    examples = sum(batch_rows(batch) for batch in window)
    tokens = sum(
        int(batch["tokens"] if "tokens" in batch else batch["attention_mask"].sum())
        for batch in window
    )
    if accelerator.num_processes == 1:
        return examples, tokens
    local = torch.tensor([examples, tokens], dtype=torch.int64, device=accelerator.device)
    examples, tokens = accelerator.reduce(local, reduction="sum").tolist()
    return int(examples), int(tokens)


def _global_means(accelerator, row: dict[str, float], total: float) -> dict[str, float]:
    """The step's metrics over every process: each process's weighted means, weighted again by
    its items (``total``), so a logged row is that of one process holding the whole step."""
    keys = sorted(row)
    local = torch.tensor(
        [float(total)] + [row[key] * total for key in keys],
        dtype=torch.float64,
        device=accelerator.device,
    )
    summed = accelerator.reduce(local, reduction="sum").tolist()
    return {key: value / summed[0] for key, value in zip(keys, summed[1:], strict=True)}


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of indices of similar length, in a seeded random order.

        Each epoch: shuffle all indices, cut them into windows of ``window`` batches, sort each
        window by length (longest first) and cut it into batches, then shuffle the full batches (a
    short one stays last, as with a plain shuffled loader). Which
        examples meet in a batch stays random across windows; within a batch there is little
        padding. Same seed, same batches.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, window: int = 50
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.window = window

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches.extend(
                window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)
            )
        # a short batch (there is at most one) stays last, as with a plain shuffled loader
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        for b in torch.randperm(len(full), generator=self.generator).tolist():
            yield full[b]
        yield from short


def make_loader(examples: Sequence, collate_fn, optim: OptimParams, seed: int) -> DataLoader:
    """Shuffled (seeded) batches; grouped by length when ``optim.group_by_length`` and the
    examples have a ``length``."""
    generator = torch.Generator().manual_seed(seed)
    examples = list(examples)
    if optim.group_by_length and all(hasattr(e, "length") for e in examples):
        sampler = LengthGroupedBatches([e.length for e in examples], optim.batch_size, generator)
        return DataLoader(examples, batch_sampler=sampler, collate_fn=collate_fn)
    return DataLoader(
        examples,
        batch_size=optim.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate_fn,
        drop_last=False,
    )


def train_loop(
    accelerator,
    model,
    examples: Sequence,
    collate_fn,
    loss_fn: LossFn,
    optim: OptimParams,
    *,
    seed: int,
    desc: str,
    max_steps: int | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    items: Callable[[dict], int] | None = None,
    on_epoch: Callable[[int, torch.nn.Module], bool] | None = None,
    resume: Resume | None = None,
    steps_csv: Path | None = None,
) -> TrainResult:
    """Optimise ``model`` on ``examples``; ``max_steps`` (if set) replaces ``optim.epochs``.

    ``on_epoch(epoch, model)`` runs after each complete epoch (1 for the first) with the model
    being trained; returning True ends training there (early stopping).

    ``loss_fn`` returns a mean over a batch's items: its rows (the default ``items``) or, for a
    per-token loss, what ``items`` counts (:func:`answer_tokens` for the SFT loss). An optimizer
    step over several micro-batches (gradient accumulation) weights each micro-batch's loss by
    its share of the step's items, so it takes the step one batch of them all would take; with
    several processes the shares are those of the step's items over every process, so N
    processes take the steps of one process accumulating their N batches. Each logged row is
    the same weighted mean of the micro-batches' metrics, over every process. A non-finite
    loss stops training with a TrainingError.

    With ``resume``, the state is saved every ``resume.every_steps`` optimizer steps, and a run
    that finds a state of the same fingerprint continues from it: the batches before it are
    drawn again (the same seeded order) but not trained on, so the steps after it are the ones
    the uninterrupted run takes. ``on_epoch`` may have ``state_dict``/``load_state_dict`` to be
    saved with it.

    With ``steps_csv`` (the stage's per-step CSV, a DVC output), the main process writes each
    step's row of the history there as the step ends, flushed, so the file can be followed while
    training runs (MLflow's live metrics read it): after every step it holds the bytes that
    :func:`spinflow.io.write_rows_csv` writes for the history so far. A resumed run writes it
    anew from the restored history, a fresh run first removes a file an earlier run left. Until
    the stage ends it is a partial file in the output's place: the stage writes the final one
    with ``write_rows_csv`` after saving its checkpoint (atomically, replacing the streamed file
    with the same bytes). A training that fails or is killed leaves the steps it made there,
    for a follower's last read, beside no checkpoint; DVC records a stage's outputs only when
    it ends well, and the next run of the stage replaces that file.
    """
    from transformers import get_scheduler

    if len(examples) == 0:
        raise TrainingError(f"{desc}: no training examples")
    loader = make_loader(examples, collate_fn, optim, seed)
    if optim.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    raw_optimizer = build_optimizer(model, optim)
    model, optimizer, loader = accelerator.prepare(model, raw_optimizer, loader)
    # sizes after prepare: with several processes each one sees its shard of the batches
    micro_per_epoch = len(loader)
    steps_per_epoch = math.ceil(micro_per_epoch / optim.gradient_accumulation_steps)
    total_steps = max_steps if max_steps is not None else steps_per_epoch * optim.epochs
    # stepped by hand once per optimizer step, so it is not handed to accelerate
    scheduler = get_scheduler(
        optim.scheduler,
        raw_optimizer,
        num_warmup_steps=int(round(optim.warmup_ratio * total_steps)),
        num_training_steps=total_steps,
    )
    model.train()
    count = items or batch_rows

    result = TrainResult()
    started = time.perf_counter()
    resumed_at = 0  # optimizer steps restored from a saved state
    found = resume.latest() if resume is not None else None
    if found is not None:
        _load_resume(found, accelerator, scheduler, result, on_epoch)
        resumed_at = result.steps
        log.info("%s: resumed from %s (step %d of %d)", desc, found, resumed_at, total_steps)
    elif resume is not None and accelerator.is_main_process:
        resume.clear()  # states of other inputs or settings
    stream = None
    if steps_csv is not None and accelerator.is_main_process:
        stream = RowsCsvStream(steps_csv, result.history)
    bar = tqdm(
        total=total_steps,
        initial=resumed_at,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=not accelerator.is_local_main_process,
    )
    epoch = 0
    drawn = 0  # optimizer steps' worth of batches drawn, resumed ones included
    try:
        while result.steps < total_steps:
            for last_micro, window in _windows(loader, optim.gradient_accumulation_steps):
                drawn += 1
                if drawn <= resumed_at:
                    continue  # trained before the state was saved
                step_lr = scheduler.get_last_lr()[0]  # the rate this update uses
                where = (
                    f"{desc}: loss is {{}} at optimizer step {result.steps + 1} (epoch {epoch + 1})"
                )
                row, grad_norm = _optimizer_step(
                    accelerator, model, optimizer, window, loss_fn, count, optim, where
                )
                scheduler.step()
                examples, tokens = _seen(accelerator, window)
                result.examples_seen += examples
                result.tokens_seen += tokens
                result.steps += 1
                row.update(
                    step=result.steps,
                    epoch=epoch + (last_micro + 1) / micro_per_epoch,
                    learning_rate=step_lr,
                )
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                result.history.append(row)
                if stream is not None:
                    stream.append(row)
                if on_step is not None:
                    on_step(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if result.steps >= total_steps:
                    break
                if resume is not None and result.steps % resume.every_steps == 0:
                    _save_resume(resume, accelerator, scheduler, result, on_epoch)
            epoch += 1
            # only a complete epoch (max_steps may end training inside one), and one not
            # finished before a resumed state was saved (its callback state was restored)
            if (
                on_epoch is not None
                and last_micro + 1 == micro_per_epoch
                and drawn >= resumed_at
                and on_epoch(epoch, model)
            ):
                break
    finally:
        accelerator.sync_gradients = True  # leave accelerate's shared state as a fresh loop expects
        if stream is not None:
            stream.close()
    bar.close()
    result.seconds = time.perf_counter() - started
    return result

"""Training precision: float32, or bfloat16 autocast where this machine measures it faster.

``bf16`` in ``sft`` and ``spin.train`` is ``true``, ``false`` or ``auto``. bf16 always means
autocast: weights, gradients and optimizer state stay float32 and the matrix products run in
bfloat16 (SPIN's updates, a learning rate of 2e-6 on weights of about 1e-2, are below bfloat16's
resolution, so bfloat16 weights would lose them).

``auto`` resolves to bf16 only when all of these hold:

1. the device computes bfloat16 natively (:func:`native_bf16`): a CUDA GPU with bfloat16 support,
   or a CPU with AMX-BF16 or AVX512-BF16 (x86) or the BF16 extension (Arm). Elsewhere bfloat16 is
   emulated (on this project's Xeon, limiting oneDNN to AVX2 made a bf16 linear layer 6 times
   slower than float32), and ``auto`` is float32 without measuring;
2. a probe (:func:`measure`) on the stage's own model and a real batch of it, one warm-up and
   :data:`PROBE_ROUNDS` timed forward + backward passes of the stage's loss per precision,
   interleaved, finds bf16 at least :data:`SPEED_MARGIN` times faster (fastest round of each);
3. in the same probe the loss and the per-sequence summed log-probs of bf16 agree with float32
   within :data:`TOLERANCE` (relative; for the log-probs, the norm of the difference over the
   norm of the float32 values).

The decision is cached in a small JSON file per key (device identity, torch version, model
shape, margin and tolerance) under ``$SPINFLOW_CACHE_DIR`` (default ``~/.cache/spinflow``),
outside every DVC output, so every later stage on the same machine makes the same choice without
measuring again and ``dvc repro`` stays byte-identical there. Delete the file to measure again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from spinflow.devices import runs_on_cpu
from spinflow.logprobs import segment_logps

log = logging.getLogger(__name__)

SPEED_MARGIN = 1.2  # bf16 must be at least this many times faster than float32
TOLERANCE = 0.05  # largest relative difference of the loss and the log-probs bf16 may have
PROBE_ROUNDS = 2  # timed forward + backward passes per precision, after one warm-up each
CACHE_ENV = "SPINFLOW_CACHE_DIR"
PROBE_VERSION = 1  # part of the cache key: a change to what the probe measures re-measures

# x86 /proc/cpuinfo flags of native bfloat16 arithmetic; Arm lists "bf16" among its features
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Measurement:
    """What the probe found: float32 time over bf16 time, and bf16's relative differences."""

    speedup: float
    loss_difference: float
    logps_difference: float
    float32_seconds: float
    bf16_seconds: float


@dataclass(frozen=True)
class Precision:
    """The precision a stage trains in, and why."""

    bf16: bool
    setting: bool | str  # what params.yaml asked for
    reason: str
    measurement: Measurement | None = None
    cache_file: Path | None = None
    cached: bool = False
    margin: float = SPEED_MARGIN
    tolerance: float = TOLERANCE

    @property
    def name(self) -> str:
        return "bf16-autocast" if self.bf16 else "float32"

    def summary(self) -> dict[str, Any]:
        """For the stage's metrics: the resolved precision and, if measured, the figures."""
        out: dict[str, Any] = {"bf16": self.bf16}
        if self.measurement is not None:
            m = self.measurement
            out.update(
                bf16_speedup=round(m.speedup, 3),
                bf16_loss_difference=float(f"{m.loss_difference:.3g}"),
                bf16_logps_difference=float(f"{m.logps_difference:.3g}"),
            )
        return out

    def describe(self, key: str) -> str:
        """One line: what ``key`` resolved to, with the measured ratio and agreement."""
        head = f"{key}: {str(self.setting).lower()} -> {self.name}"
        if self.measurement is None:
            return f"{head} ({self.reason})"
        m = self.measurement
        where = "cached" if self.cached else "measured now"
        return (
            f"{head} (bf16 {m.speedup:.2f}x the speed of float32, needs {self.margin}x; "
            f"differs by {m.loss_difference:.1e} on the loss and {m.logps_difference:.1e} on the "
            f"log-probs, tolerance {self.tolerance:.0e}; {where}: {self.cache_file})"
        )


# ---------------------------------------------------------------------------------------------
# The machine


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_field(info: str, *names: str) -> str:
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return ""


def cpu_bf16_flags() -> list[str]:
    """The native-bfloat16 flags this CPU reports (empty where it has none or does not say)."""
    flags = set(_cpu_field(_cpuinfo(), "flags", "Features").split())
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 natively, and the evidence, in words."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bfloat16"
        return False, f"{name} has no native bfloat16"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return True, f"CPU flags {', '.join(flags)}"
        return False, "the CPU reports none of " + ", ".join(CPU_BF16_FLAGS)
    return False, f"no bfloat16 probe for {device.type} devices"


def device_identity(device: torch.device) -> dict[str, Any]:
    """What makes a speed measurement valid: the processor and how torch runs on it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "cuda": torch.version.cuda,
        }
    info = _cpuinfo()
    return {
        "type": device.type,
        "name": _cpu_field(info, "model name", "Model name", "Hardware") or platform.processor(),
        "machine": platform.machine(),
        "bf16_flags": cpu_bf16_flags(),
        "threads": torch.get_num_threads(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def model_shape(model: torch.nn.Module) -> dict[str, Any]:
    """The model's architecture and size (not its weights: every θk of a run shares it)."""
    config = getattr(model, "config", None)
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    )
    params = list(model.parameters())
    return {
        **{key: getattr(config, key, None) for key in keys},
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "dtype": str(params[0].dtype) if params else None,
    }


def cache_dir() -> Path:
    """``$SPINFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/spinflow``, else ``~/.cache/spinflow``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spinflow"


# ---------------------------------------------------------------------------------------------
# The probe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.norm().item()
    difference = (got - expected).norm().item()
    return difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)


def measure(
    model: torch.nn.Module,
    batch: dict,
    loss_fn: LossFn,
    device: torch.device,
    rounds: int = PROBE_ROUNDS,
) -> Measurement:
    """Time forward + backward of ``loss_fn`` on ``batch`` in float32 and in bf16 autocast, and
    compare the loss and the per-sequence log-probs of the two.

    Leaves the model as it was: no optimizer step, gradients cleared, train/eval mode restored,
    and the random number generators restored (so measuring changes nothing that follows).
    """
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model.to(device)
    was_training = model.training
    model.eval()  # no dropout: both precisions compute the same function

    def step(bf16: bool) -> tuple[float, float]:
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(model, batch)
        loss.backward()
        _sync(device)
        seconds = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        return loss.item(), seconds

    def logps(bf16: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return segment_logps(model, batch).float().cpu()

    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            loss = {bf16: step(bf16)[0] for bf16 in (False, True)}  # also the warm-up
            seconds: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(rounds):
                for bf16 in (False, True):
                    seconds[bf16].append(step(bf16)[1])
            float32_logps, bf16_logps = logps(False), logps(True)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    fastest = {bf16: min(times) for bf16, times in seconds.items()}
    return Measurement(
        speedup=fastest[False] / fastest[True],
        loss_difference=_relative(torch.tensor(loss[True]), torch.tensor(loss[False])),
        logps_difference=_relative(bf16_logps, float32_logps),
        float32_seconds=fastest[False],
        bf16_seconds=fastest[True],
    )


def decide(m: Measurement, *, margin: float, tolerance: float) -> tuple[bool, str]:
    """bf16 if it is ``margin`` times faster and within ``tolerance``; the reason in words."""
    worst = max(m.loss_difference, m.logps_difference)
    if not worst <= tolerance:
        return (
            False,
            f"rejected: bf16 differs by {worst:.1e}, more than the tolerance {tolerance:.0e}",
        )
    if not m.speedup >= margin:
        return False, f"rejected: bf16 is {m.speedup:.2f}x the speed of float32, under {margin}x"
    return True, "bf16 is faster and within tolerance"


# ---------------------------------------------------------------------------------------------
# Resolving a stage's setting


def _read_cache(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        Measurement(**record["measurement"])
        if not isinstance(record["bf16"], bool):
            raise TypeError("bf16 is not a boolean")
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable precision cache (%s); measuring again", path, exc)
        return None


def _write_cache(path: Path, record: dict) -> None:
    from spinflow.io import write_json

    try:
        write_json(path, record)
    except OSError as exc:  # a read-only home must not stop training; the choice is only not kept
        log.warning("%s: cannot write the precision cache (%s)", path, exc)


def measurement_key(
    kind: str, model, device: torch.device, **settings: Any
) -> tuple[dict[str, Any], Path]:
    """What a cached speed measurement of ``kind`` holds for (device, torch, model shape and the
    probe's ``settings``), and the cache file it lives in."""
    fields = {
        "device": device_identity(device),
        "torch": torch.__version__,
        "model": model_shape(model),
        **settings,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return fields, cache_dir() / kind / f"{key}.json"


def auto_precision(
    model: torch.nn.Module,
    batch: dict,
    loss_fn: LossFn,
    device: torch.device,
    *,
    margin: float = SPEED_MARGIN,
    tolerance: float = TOLERANCE,
) -> Precision:
    """Resolve ``bf16: auto`` on this machine: cached decision, else capability check and probe."""
    native, evidence = native_bf16(device)
    if not native:
        return Precision(False, "auto", f"not native: {evidence}")
    key_fields, path = measurement_key(
        "precision", model, device, margin=margin, tolerance=tolerance, probe=PROBE_VERSION
    )
    record = _read_cache(path)
    if record is not None:
        m = Measurement(**record["measurement"])
        return Precision(record["bf16"], "auto", record["reason"], m, path, True, margin, tolerance)
    m = measure(model, batch, loss_fn, device)
    bf16, reason = decide(m, margin=margin, tolerance=tolerance)
    _write_cache(
        path,
        {
            **key_fields,
            "bf16": bf16,
            "reason": reason,
            "native": evidence,
            "measurement": dataclasses.asdict(m),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return Precision(bf16, "auto", reason, m, path, False, margin, tolerance)


def resolve_precision(
    optim, model, batch: dict, loss_fn: LossFn, *, key: str, device: torch.device | None = None
):
    """``optim`` with ``bf16`` resolved to true or false, and the :class:`Precision` chosen.

    ``true`` and ``false`` are taken as given; ``auto`` is decided by :func:`auto_precision` on
    ``model`` and ``batch`` (a real batch of the stage) with the stage's ``loss_fn``, on
    ``device`` (the stage's; default: this process's GPU when there is one). With
    several processes the main one decides and tells the others, so all train alike. The choice
    is logged once, as one line naming ``key`` (for example ``spin.train.bf16``).
    """
    from accelerate.state import PartialState

    if optim.bf16 != "auto":
        precision = Precision(bool(optim.bf16), optim.bf16, "set in params")
        return optim, precision
    state = PartialState(cpu=runs_on_cpu(device))
    precision = None
    if state.is_main_process:
        precision = auto_precision(model, batch, loss_fn, state.device)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        precision = broadcast_object_list([precision])[0]
    if state.is_main_process:
        log.info("%s", precision.describe(key))
    return optim.model_copy(update={"bf16": precision.bf16}), precision


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype inference autocasts to on ``device``: bfloat16 on a GPU that computes it
    natively, float32 elsewhere (on CPUs bf16 is chosen by measurement, see
    :func:`resolve_precision`, never by default)."""
    if device.type == "cuda" and native_bf16(device)[0]:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device):
    """The autocast context of inference on ``device`` (a no-op where it stays float32)."""
    dtype = inference_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

"""Where a stage runs its models: one decision, made here, for every stage and every engine.

``device: auto`` (params.yaml) is this process's GPU when CUDA is available (``cuda:<local
rank>`` when a launcher started several processes on the machine, so N processes use N GPUs),
else the CPU. ``cpu`` and ``cuda`` force one kind. Every stage that runs a model loads it through
:func:`spinflow.models.load_model` with the device decided here; training hands the same decision
to accelerate (:func:`spinflow.training.make_accelerator`).
"""

from __future__ import annotations

import os

import torch

from spinflow.errors import ConfigError

SETTINGS = ("auto", "cpu", "cuda")


def local_rank() -> int:
    """This process's index on its machine, as torchrun and accelerate set it (0 alone)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def stage_device(setting: str = "auto") -> torch.device:
    """The device of this process for ``setting`` (see the module's docstring)."""
    if setting not in SETTINGS:
        raise ConfigError(f"device: {setting!r} is not one of {', '.join(SETTINGS)}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no CUDA GPU here; use auto or cpu")
    rank = local_rank()
    count = torch.cuda.device_count()
    if rank >= count:
        raise ConfigError(
            f"device: process {rank} of this machine has no GPU of its own ({count} visible); "
            "launch at most one process per GPU"
        )
    return torch.device("cuda", rank)


def runs_on_cpu(device: torch.device | None) -> bool:
    """Whether ``device`` is the CPU; None (not decided by a stage) means the CPU where torch
    sees no GPU."""
    return device.type == "cpu" if device is not None else not torch.cuda.is_available()

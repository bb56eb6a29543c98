"""Where every stage reads and writes, relative to the project root."""

from __future__ import annotations

from pathlib import Path

BASE_MODEL = Path("models/base")
SFT_MODEL = Path("models/theta_0")
SFT_EXTRA_MODEL = Path("models/sft_extra")
DATA_DIR = Path("data/prepared")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORT_DIR = Path("reports")


def theta(k: int, *, sft_enabled: bool) -> Path:
    """Checkpoint of θk: θ0 is the SFT model (or the base model when SFT is off)."""
    if k == 0:
        return SFT_MODEL if sft_enabled else BASE_MODEL
    return Path(f"models/theta_{k}")


def generated_dir(k: int) -> Path:
    return Path(f"generated/iter_{k}")


def train_metrics(k: int) -> Path:
    return METRICS_DIR / f"train_iter_{k}.json"


def spin_steps(k: int) -> Path:
    """Optimizer steps of train_iter_k alone, so sft_extra re-runs only when that count changes."""
    return METRICS_DIR / f"spin_steps_iter_{k}.json"


def train_steps(name: str) -> Path:
    return PLOTS_DIR / f"{name}_steps.csv"


def eval_name(k: int) -> str:
    return f"iter_{k}"


def eval_metrics(name: str) -> Path:
    return METRICS_DIR / f"eval_{name}.json"


def eval_generations(name: str) -> Path:
    return Path(f"eval/{name}/generations.jsonl")

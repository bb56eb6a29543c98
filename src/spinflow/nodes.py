"""What the pipeline makes and how: models, evaluations, plots and stages, and the paths of the
outputs every method shares.

Every node names the stage that makes it; every stage names its inputs, the params keys it
reads, its outputs and the script that runs it. :mod:`spinflow.graph` assembles them from the
shared stages and each method's declarations (:mod:`spinflow.methods`). Paths are relative to
the project root. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from spinflow.config import Params

BASE_MODEL = Path("models/base")
DATA_DIR = Path("data/prepared")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
TIMINGS_DIR = Path("timings")  # run-to-run noise: not in dvc.yaml, ignored by Git
REPORT_DIR = Path("reports")

# What a model node is, for tracking and the report.
BASE, BASELINE, ITERATION, SFT_EXTRA = "base", "baseline", "iteration", "sft_extra"
# What the stage runner hands to tracking after a stage.
TRAINING, EVALUATION, REPORT = "training", "evaluation", "report"

VALIDATE_STAGE = "validate_params"  # first in dvc.yaml: checks all of params.yaml on every change
PROMPT_KEYS = ("prompt", "seed")
OVERRIDE_PREFIX = "spin.per_iteration."  # params that exist only while params.yaml sets them
WITH_SPIN = "autoif.with_spin"  # listed only while true: SPIN stages that read AutoIF's outputs


@dataclass(frozen=True)
class Model:
    """A checkpoint the pipeline makes."""

    name: str  # "base", "theta_0" … "theta_N", "sft_extra"
    path: Path
    stage: str  # the stage that writes it
    label: str  # row label in the report
    role: str  # BASE, BASELINE (θ0), ITERATION (θk+1) or SFT_EXTRA
    index: int | None = None  # k of θk on the SPIN chain; None off the chain
    iteration: int | None = None  # the SPIN iteration that made it (θk+1: k)
    run_name: str | None = None  # its MLflow run
    train_metrics: Path | None = None  # summary JSON of its training stage
    steps_csv: Path | None = None  # per-step training metrics
    timings: Path | None = None  # seconds, throughput, peak memory of its training (not hashed)
    pairs: tuple[Path, ...] = ()  # generated pairs it was trained on (SPIN)
    opponent: str | None = None  # the model it learned to tell itself apart from
    chart: str = "eval"  # prefix of its evaluation metrics in the pipeline run's charts
    step: int = 0  # x of its evaluation in those charts (k for θk)


@dataclass(frozen=True)
class Evaluation:
    """A model's held-out evaluation."""

    name: str  # "sft", "iter_k", "sft_extra": file names and MLflow sample tables
    model: str  # the evaluated model's node name
    stage: str
    opponent: str | None  # evaluation whose rows hold the opponent's answers and log-probs
    kind: str = "test"  # "test": the test split; AUTOIF: held-out instruction following

    @property
    def directory(self) -> Path:
        return Path("eval") / self.name

    @property
    def generations(self) -> Path:
        return self.directory / "generations.jsonl"

    @property
    def validation(self) -> Path:
        """Rows of the same evaluation on the validation split (test-split evaluations)."""
        return self.directory / "validation.jsonl"

    @property
    def metrics(self) -> Path:
        return METRICS_DIR / f"eval_{self.name}.json"


@dataclass(frozen=True)
class Plot:
    """A CSV that ``dvc plots`` draws: ``y`` against ``x``."""

    path: str
    x: str
    y: str | None = None


def steps_plot(stage: str) -> Plot:
    return Plot(str(steps_csv(stage)), "step", "loss")


@dataclass(frozen=True)
class Stage:
    """One DVC stage: what it reads, what it writes, which script runs it."""

    name: str
    script: str  # stages/<script>.py; it receives the stage name as its one argument
    inputs: tuple[str, ...]  # data and model paths (code dependencies are computed)
    params: tuple[str, ...]
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # small JSON files, not cached, still in the run cache
    plots: tuple[Plot, ...] = ()  # CSV plots, not cached
    uncached_outs: tuple[str, ...] = ()
    accelerate: str | None = None  # the params key of the accelerate config that launches it
    args: dict[str, object] = field(default_factory=dict)  # keyword arguments of the function
    track: str | None = None  # TRAINING, EVALUATION or REPORT: what tracking logs afterwards
    subject: str | None = None  # the model (TRAINING) or evaluation (EVALUATION) it concerns
    # modules its function loads by name (the report's method sections): code dependencies too
    code: tuple[str, ...] = ()

    @property
    def overrides(self) -> list[str]:
        """The keys it lists only under some params, named in its command too: the per-iteration
        overrides it reads, and autoif.with_spin."""
        return sorted(
            key for key in self.params if key.startswith(OVERRIDE_PREFIX) or key == WITH_SPIN
        )


# what evaluation reads of the generate section: the engine that answers the test prompts
ENGINE_KEYS = ("generate.engine", "generate.dtype", "generate.vllm")


def train_metrics(stage: str) -> Path:
    return METRICS_DIR / f"{stage}.json"


def steps_csv(stage: str) -> Path:
    return PLOTS_DIR / f"{stage}_steps.csv"


def timings_file(stage: str) -> Path:
    """Timings of a training stage: written beside the metrics but declared nowhere in dvc.yaml,
    so a re-run that computes the same bytes leaves dvc.lock as it was."""
    return TIMINGS_DIR / f"{stage}.json"


class GraphBuilder(Protocol):
    """What a method's ``declare(graph)`` is given (:class:`spinflow.graph.Graph` is one): the
    params, the nodes declared so far, and the calls that add its own."""

    params: Params
    models: dict[str, Model]
    evaluations: dict[str, Evaluation]
    stages: dict[str, Stage]
    report_inputs: list[str]  # files the report stage reads for the method's section
    report_outs: list[str]  # files the report stage writes for it
    report_metrics: list[str]  # metrics the report stage writes for it

    def add(self, stage: Stage) -> None: ...

    def add_evaluation(
        self, name: str, model: str, opponent: str | None, params: tuple[str, ...]
    ) -> None: ...

    def theta(self, k: int) -> Model: ...

    def evaluation_of(self, model: str) -> Evaluation | None: ...

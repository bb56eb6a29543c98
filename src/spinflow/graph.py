"""The pipeline graph, declared once.

Nodes are the things the pipeline makes (:mod:`spinflow.nodes`): the base model, the prepared
data, θ0 … θN, the baselines, each iteration's generated pairs and each model's evaluation.
:class:`Graph` declares the stages every pipeline shares (validate_params, prepare_model,
prepare_data, the report) and asks each registered method (:data:`spinflow.methods.registry.METHODS`) to
declare its own. dvc.yaml (:mod:`spinflow.pipeline`), the stage functions, tracking
(:mod:`spinflow.tracking`) and the report all read this graph; none of them parses names.

This module imports nothing heavy: it is read by every stage and by ``spinflow pipeline``.
"""

from __future__ import annotations

from pathlib import Path

from spinflow.config import PARAMS_FILE, Params
from spinflow.errors import ConfigError, SpinflowError
from spinflow.methods.registry import METHODS
from spinflow.nodes import (
    BASE,
    BASE_MODEL,
    DATA_DIR,
    ENGINE_KEYS,
    EVALUATION,
    PROMPT_KEYS,
    REPORT,
    REPORT_DIR,
    VALIDATE_STAGE,
    Evaluation,
    Model,
    Plot,
    Stage,
)

# the report's own switches: the rule that chooses the iteration a user keeps (validation split)
REPORT_PARAMS = ("tracking.champion_metric", "tracking.champion_mode")


class Graph:
    """Models, evaluations and stages of the pipeline these params describe."""

    def __init__(self, params: Params):
        self.params = params
        self.models: dict[str, Model] = {}
        self.evaluations: dict[str, Evaluation] = {}
        self.stages: dict[str, Stage] = {}
        # what a method adds to the report stage: files it reads, files and metrics it writes
        self.report_inputs: list[str] = []
        self.report_outs: list[str] = []
        self.report_metrics: list[str] = []
        self._validate()
        self._prepare()
        for method in METHODS:
            method.declare(self)
        self._report()
        self._check_sources()

    # -- lookups ------------------------------------------------------------------------------

    def stage(self, name: str) -> Stage:
        try:
            return self.stages[name]
        except KeyError:
            raise SpinflowError(
                f"no stage {name!r} in the pipeline params.yaml describes "
                f"(stages: {', '.join(self.stages)})"
            ) from None

    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise SpinflowError(f"no model {name!r} in this pipeline") from None

    def evaluation(self, name: str) -> Evaluation:
        try:
            return self.evaluations[name]
        except KeyError:
            raise SpinflowError(f"no evaluation {name!r} in this pipeline") from None

    def theta(self, k: int) -> Model:
        """θk of the SPIN chain (θ0 is the base model when sft.enabled is false)."""
        return self.model(self.chain[k])

    @property
    def chain(self) -> list[str]:
        """θ0 … θN in order."""
        ordered = sorted(
            (m for m in self.models.values() if m.index is not None), key=lambda m: m.index
        )
        return [m.name for m in ordered]

    def evaluated(self) -> list[tuple[Model, Evaluation]]:
        """Every evaluated model with its evaluation: θ0 … θN, then the models off the chain."""
        pairs = [(self.models[e.model], e) for e in self.evaluations.values()]
        on_chain = sorted((p for p in pairs if p[0].index is not None), key=lambda p: p[0].index)
        return on_chain + [p for p in pairs if p[0].index is None]

    def evaluation_of(self, model: str) -> Evaluation | None:
        return next((e for e in self.evaluations.values() if e.model == model), None)

    def producer(self, path: Path | str) -> str:
        """The stage whose outputs contain ``path``."""
        target = Path(path)
        for stage in self.stages.values():
            paths = (*stage.outs, *stage.metrics, *(p.path for p in stage.plots))
            for out in (*paths, *stage.uncached_outs):
                if target == Path(out) or Path(out) in target.parents:
                    return stage.name
        raise SpinflowError(f"{path}: no stage of this pipeline makes it")

    # -- declarations ----------------------------------------------------------------------------

    def add(self, stage: Stage) -> None:
        if stage.name in self.stages:
            raise SpinflowError(f"stage {stage.name!r} is declared twice")
        self.stages[stage.name] = stage

    def add_evaluation(self, name: str, model: str, opponent: str | None, params: tuple[str, ...]):
        """``eval_<name>``: ``model`` on the test and validation splits, against ``opponent``'s
        answers and log-probs where it has one."""
        evaluation = Evaluation(name, model, f"eval_{name}", opponent)
        inputs = [str(self.models[model].path), str(DATA_DIR)]
        if opponent is not None:
            inputs.append(str(self.evaluations[opponent].directory))
        benchmarks = self.params.eval.lm_eval
        if benchmarks.tasks and benchmarks.include_path:  # local harness tasks and their data
            inputs.append(benchmarks.include_path)
        self.evaluations[name] = evaluation
        self.add(
            Stage(
                evaluation.stage,
                "evaluate",
                tuple(inputs),
                ("eval", *PROMPT_KEYS, *ENGINE_KEYS, *params),
                outs=(str(evaluation.directory),),
                metrics=(str(evaluation.metrics),),
                args={"name": name},
                track=EVALUATION,
                subject=name,
            )
        )

    def _validate(self) -> None:
        """validate_params depends on the whole params.yaml (as a file, not on a list of keys), so
        any change to it, an unknown or misspelt key included, re-runs it; it writes nothing, so
        no other stage re-runs because it did. Listed first, DVC runs it before any other stage
        and stops there on an error. The accelerate config is a dependency too, so a deleted or
        edited config is checked before `accelerate launch` reads it."""
        inputs = [PARAMS_FILE]
        if self.params.spin.accelerate_config:
            inputs.append(self.params.spin.accelerate_config)
        self.add(Stage(VALIDATE_STAGE, VALIDATE_STAGE, tuple(inputs), ()))

    def _check_sources(self) -> None:
        """A local model or data source must not overlap an output of the pipeline: DVC refuses
        a path that is both a dependency and an output (or makes a cycle of it)."""
        for key, source in (
            ("model.source", self.params.model.source),
            ("data.source", self.params.data.source),
        ):
            for path in _local_source(source):
                mine = Path(path).resolve()
                for stage in self.stages.values():
                    paths = (*stage.outs, *stage.metrics, *(p.path for p in stage.plots))
                    for out in (*paths, *stage.uncached_outs):
                        theirs = Path(out).resolve()
                        if mine == theirs or mine in theirs.parents or theirs in mine.parents:
                            raise ConfigError(
                                f"{key}: {source} overlaps {out}, an output of stage "
                                f"'{stage.name}'; DVC cannot track a path that is both an input "
                                "and an output: copy what you need outside the pipeline's "
                                "outputs and point to the copy"
                            )

    def _prepare(self) -> None:
        p = self.params
        self.models["base"] = Model("base", BASE_MODEL, "prepare_model", "base", BASE)
        self.add(
            Stage(
                "prepare_model",
                "prepare_model",
                tuple(_local_source(p.model.source)),
                ("model", "seed"),
                outs=(str(BASE_MODEL),),
            )
        )
        self.add(
            Stage(
                "prepare_data",
                "prepare_data",
                tuple(_local_source(p.data.source)),
                ("data",),
                outs=(str(DATA_DIR),),
            )
        )

    def _report(self) -> None:
        """The report reads every evaluation and training summary, the data, and what the methods
        add (:attr:`report_inputs`); its params are the switches that add or remove rows (DVC
        does not re-run a stage whose dependency list merely shrank, but it does see a listed
        value change), each method's and the rule that chooses the kept iteration."""
        switches = [key for method in METHODS for key in method.report_params]
        self.add(
            Stage(
                "report",
                "report",
                (
                    *(str(e.metrics) for e in self.evaluations.values()),
                    *(str(e.directory) for e in self.evaluations.values()),
                    *(
                        str(m.train_metrics)
                        for m in self.models.values()
                        if m.train_metrics is not None
                    ),
                    str(DATA_DIR),
                    *self.report_inputs,
                ),
                (*switches, *REPORT_PARAMS),
                metrics=tuple(self.report_metrics),
                uncached_outs=(
                    str(REPORT_DIR / "results.md"),
                    str(REPORT_DIR / "metrics.png"),
                    *self.report_outs,
                ),
                plots=(Plot(str(REPORT_DIR / "by_iteration.csv"), "iteration"),),
                track=REPORT,
                code=tuple(m.report for m in METHODS if m.report and m.enabled(self.params)),
            )
        )


def _local_source(source: str) -> list[str]:
    """A local model directory or data file is a dependency: editing it re-runs its stage."""
    keyword = source in ("embedded", "tiny", "builtin")
    return [source] if not keyword and Path(source).exists() else []


def build(params: Params) -> Graph:
    return Graph(params)

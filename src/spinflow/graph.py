"""The pipeline graph, declared once.

Nodes are the things the pipeline makes: the base model, the prepared data, θ0 … θN, the
SFT-extra baseline, each iteration's generated pairs and each model's evaluation. Every node
names the stage that makes it; every stage names its inputs, the params keys it reads, its
outputs and the recipe function that runs it. dvc.yaml (:mod:`spinflow.pipeline`), the stage
functions (:mod:`spinflow.recipes`), tracking (:mod:`spinflow.tracking`) and the report all read
this graph; none of them parses names.

Paths are relative to the project root. This module imports nothing heavy: it is read by every
stage and by ``spinflow pipeline``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spinflow.config import PARAMS_FILE, Params
from spinflow.errors import ConfigError, SpinflowError

BASE_MODEL = Path("models/base")
DATA_DIR = Path("data/prepared")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
TIMINGS_DIR = Path("timings")  # run-to-run noise: not in dvc.yaml, ignored by Git
REPORT_DIR = Path("reports")
REPORT_FILES = ("results.md", "metrics.png", "by_iteration.csv", "diagnostics.png")
# the report's own metrics: paired differences and the verdict; per-iteration diagnostics
COMPARISONS = METRICS_DIR / "comparisons.json"
DIAGNOSTICS = METRICS_DIR / "diagnostics.json"

# What a model node is, for tracking and the report.
BASE, BASELINE, ITERATION, SFT_EXTRA = "base", "baseline", "iteration", "sft_extra"
LOBASS, RANDOM_SELECTION = "lobass", "random_selection"
LOBASS_DIR = Path("lobass")
LOBASS_SCORES = LOBASS_DIR / "scores"  # lobass_score: scores.jsonl, provenance.json
LOBASS_SELECTION = LOBASS_DIR / "selection"  # lobass_select: selected.jsonl, random.jsonl
AUTOIF = "autoif"  # a model of the AutoIF chain (θk+1 of AutoIF iteration k)
AUTOIF_DIR = Path("autoif")
AUTOIF_INSTRUCTIONS = AUTOIF_DIR / "instructions"  # autoif_instructions: instructions.jsonl, drops
AUTOIF_VERIFIED = AUTOIF_DIR / "verified"  # autoif_verify: instructions.jsonl, drops.jsonl
AUTOIF_QUERIES = AUTOIF_DIR / "queries"  # autoif_queries: train.jsonl, eval.jsonl
AUTOIF_SEED_LIBRARY = "src/spinflow/autoif_seeds.yaml"  # autoif.seeds: builtin
AUTOIF_SUPERVISED = AUTOIF_DIR / "supervised"  # autoif_supervise: instructions.yaml, drops.jsonl
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

    @property
    def overrides(self) -> list[str]:
        """The keys it lists only under some params, named in its command too: the per-iteration
        overrides it reads, and autoif.with_spin."""
        return sorted(
            key for key in self.params if key.startswith(OVERRIDE_PREFIX) or key == WITH_SPIN
        )


# what evaluation reads of the generate section: the engine that answers the test prompts
ENGINE_KEYS = ("generate.engine", "generate.dtype", "generate.vllm")


def generated_dir(k: int) -> Path:
    return Path(f"generated/iter_{k}")


def pairs_file(k: int) -> Path:
    return generated_dir(k) / "pairs.jsonl"


def train_metrics(stage: str) -> Path:
    return METRICS_DIR / f"{stage}.json"


def spin_steps(k: int) -> Path:
    """Optimizer steps of train_iter_k alone, so sft_extra re-runs only when that count changes."""
    return METRICS_DIR / f"spin_steps_iter_{k}.json"


def steps_csv(stage: str) -> Path:
    return PLOTS_DIR / f"{stage}_steps.csv"


def timings_file(stage: str) -> Path:
    """Timings of a training stage: written beside the metrics but declared nowhere in dvc.yaml,
    so a re-run that computes the same bytes leaves dvc.lock as it was."""
    return TIMINGS_DIR / f"{stage}.json"


def autoif_samples_dir(k: int) -> Path:
    """autoif_sample_iter_k: samples.jsonl, sft.jsonl, pairs.jsonl."""
    return AUTOIF_DIR / f"iter_{k}"


AUTOIF_SANDBOX_KEYS = ("autoif.sandbox_workers", "autoif.call_timeout")


def mixed_iterations(params: Params, k: int) -> range:
    """Iterations whose pairs train_iter_k trains on: its own and ``spin.mix_previous`` before."""
    return range(max(0, k - params.spin.mix_previous), k + 1)


class Graph:
    """Models, evaluations and stages of the pipeline these params describe."""

    def __init__(self, params: Params):
        self.params = params
        self.models: dict[str, Model] = {}
        self.evaluations: dict[str, Evaluation] = {}
        self.stages: dict[str, Stage] = {}
        self._validate()
        self._prepare()
        self._sft()
        self._lobass()
        self._spin()
        self._sft_extra()
        self._autoif()
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

    def _add(self, stage: Stage) -> None:
        self.stages[stage.name] = stage

    def _evaluate(self, name: str, model: str, opponent: str | None, params: tuple[str, ...]):
        evaluation = Evaluation(name, model, f"eval_{name}", opponent)
        inputs = [str(self.models[model].path), str(DATA_DIR)]
        if opponent is not None:
            inputs.append(str(self.evaluations[opponent].directory))
        benchmarks = self.params.eval.lm_eval
        if benchmarks.tasks and benchmarks.include_path:  # local harness tasks and their data
            inputs.append(benchmarks.include_path)
        self.evaluations[name] = evaluation
        self._add(
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
        self._add(Stage(VALIDATE_STAGE, VALIDATE_STAGE, tuple(inputs), ()))

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
        self._add(
            Stage(
                "prepare_model",
                "prepare_model",
                tuple(_local_source(p.model.source)),
                ("model", "seed"),
                outs=(str(BASE_MODEL),),
            )
        )
        self._add(
            Stage(
                "prepare_data",
                "prepare_data",
                tuple(_local_source(p.data.source)),
                ("data",),
                outs=(str(DATA_DIR),),
            )
        )

    def _sft(self) -> None:
        """θ0: the base model fine-tuned on the SFT split, or the base model itself.

        With ``spin.start: lobass`` the SFT model stays (LoBaSS scores against it) but the SPIN
        chain starts from the model fine-tuned on the LoBaSS selection instead.
        """
        p = self.params
        on_chain = p.spin.start == "sft"
        if p.sft.enabled:
            self.models["theta_0"] = Model(
                "theta_0",
                Path("models/theta_0"),
                "sft",
                "θ0 (SFT)" if on_chain else "SFT (all data)",
                BASELINE,
                index=0 if on_chain else None,
                run_name="theta_0 (sft)",
                train_metrics=train_metrics("sft"),
                steps_csv=steps_csv("sft"),
                timings=timings_file("sft"),
                chart="eval" if on_chain else "sft",
            )
            self._add(
                Stage(
                    "sft",
                    "sft",
                    (str(BASE_MODEL), str(DATA_DIR)),
                    ("sft", *PROMPT_KEYS),
                    outs=("models/theta_0",),
                    metrics=(str(train_metrics("sft")),),
                    plots=(steps_plot("sft"),),
                    accelerate="spin.accelerate_config",
                    track=TRAINING,
                    subject="theta_0",
                )
            )
        else:
            self.models["theta_0"] = Model(
                "theta_0",
                BASE_MODEL,
                "prepare_model",
                "θ0 (base)",
                BASELINE,
                index=0,
                run_name="theta_0 (base)",
            )
        self._evaluate("sft", "theta_0", None, ())

    def _spin(self) -> None:
        """Iteration k: θk answers the pool (generate_iter_k), θk+1 learns to tell the real
        answers from θk's (train_iter_k), θk+1 is evaluated against θk (eval_iter_k).

        With ``autoif.with_spin`` the pool also takes θ0's verified AutoIF answers (autoif/iter_0)
        and the generated ones are checked by the instructions' functions (autoif/verified, in
        the sandbox); train_iter_k also trains on iteration k's AutoIF pairs (autoif/iter_k),
        made by autoif_sample_iter_k from θk (:meth:`_autoif`)."""
        p = self.params
        combined = p.autoif.with_spin
        for k in range(p.spin.iterations):
            theta_k = self.theta(k)
            extra_inputs = (str(autoif_samples_dir(0)), str(AUTOIF_VERIFIED)) if combined else ()
            extra_params = (*AUTOIF_SANDBOX_KEYS, WITH_SPIN) if combined else ()
            self._add(
                Stage(
                    f"generate_iter_{k}",
                    "generate",
                    (str(theta_k.path), str(DATA_DIR), *extra_inputs),
                    (
                        "generate",
                        "prompt.system_prompt",
                        "prompt.max_prompt_length",
                        "seed",
                        *extra_params,
                    ),
                    outs=(str(generated_dir(k)),),
                    accelerate="generate.accelerate_config",
                    args={"k": k},
                )
            )
            override = (
                (f"spin.per_iteration.iter_{k}",) if f"iter_{k}" in p.spin.per_iteration else ()
            )
            mixed = tuple(generated_dir(j) for j in mixed_iterations(p, k))
            autoif_pairs = (
                (str(autoif_samples_dir(k)), str(train_metrics(f"autoif_sample_iter_{k}")))
                if combined
                else ()
            )
            name = f"theta_{k + 1}"
            stage = f"train_iter_{k}"
            self.models[name] = Model(
                name,
                Path(f"models/{name}"),
                stage,
                f"θ{k + 1} (SPIN + AutoIF iter {k})" if combined else f"θ{k + 1} (SPIN iter {k})",
                ITERATION,
                index=k + 1,
                iteration=k,
                step=k + 1,
                run_name=f"iter_{k}",
                train_metrics=train_metrics(stage),
                steps_csv=steps_csv(stage),
                timings=timings_file(stage),
                pairs=tuple(pairs_file(j) for j in mixed_iterations(p, k)),
                opponent=theta_k.name,
            )
            self._add(
                Stage(
                    stage,
                    "train",
                    (str(theta_k.path), *map(str, mixed), *autoif_pairs),
                    (
                        "spin.train",
                        "spin.beta",
                        "spin.loss",
                        "spin.mix_previous",
                        "spin.feedback_filter",
                    )
                    + PROMPT_KEYS
                    + override
                    + ((WITH_SPIN,) if combined else ()),
                    outs=(f"models/{name}",),
                    metrics=(str(train_metrics(stage)), str(spin_steps(k))),
                    plots=(steps_plot(stage),),
                    accelerate="spin.accelerate_config",
                    args={"k": k},
                    track=TRAINING,
                    subject=name,
                )
            )
            opponent = self.evaluation_of(theta_k.name)
            self._evaluate(f"iter_{k}", name, opponent.name, ("spin.beta", *override))

    def _lobass(self) -> None:
        """LoBaSS: score every SFT example by learnability (base model vs θ0 trained on all of
        them), keep the top fraction, fine-tune the base model on it; the same on a random
        selection of the same size is the control."""
        p = self.params
        if not p.lobass.enabled:
            return
        scores = LOBASS_SCORES
        self._add(
            Stage(
                "lobass_score",
                "lobass_score",
                (str(BASE_MODEL), "models/theta_0", str(DATA_DIR)),
                ("prompt", "eval.batch_size"),
                outs=(str(scores),),
                metrics=(str(train_metrics("lobass_score")),),
            )
        )
        selection = LOBASS_SELECTION
        self._add(
            Stage(
                "lobass_select",
                "lobass_select",
                (str(scores), str(DATA_DIR)),
                ("lobass.fraction", "lobass.min_examples", "sft.batch_size", "seed"),
                outs=(str(selection),),
                metrics=(str(train_metrics("lobass_select")),),
            )
        )
        start = p.spin.start == "lobass"
        for name, role, label in (
            (
                "sft_lobass",
                LOBASS,
                "θ0 (SFT on the LoBaSS selection)" if start else "SFT on the LoBaSS selection",
            ),
            ("sft_random", RANDOM_SELECTION, "SFT on a random selection (control)"),
        ):
            on_chain = start and role == LOBASS
            self.models[name] = Model(
                name,
                Path(f"models/{name}"),
                name,
                label,
                role,
                index=0 if on_chain else None,
                run_name=name,
                train_metrics=train_metrics(name),
                steps_csv=steps_csv(name),
                timings=timings_file(name),
                chart="eval" if on_chain else name,
            )
            self._add(
                Stage(
                    name,
                    "sft_selection",
                    (str(BASE_MODEL), str(selection)),
                    ("sft", *PROMPT_KEYS),
                    outs=(f"models/{name}",),
                    metrics=(str(train_metrics(name)),),
                    plots=(steps_plot(name),),
                    accelerate="spin.accelerate_config",
                    args={"role": role},
                    track=TRAINING,
                    subject=name,
                )
            )
            self._evaluate(name, name, None, ())

    def _sft_extra(self) -> None:
        """Baselines: θ0 trained further with plain SFT on the SFT split, for as many optimizer
        steps as all of SPIN (sft_extra) and for as much compute (sft_extra_compute)."""
        p = self.params
        if not p.sft_extra.enabled:
            return
        theta_0 = self.theta(0)
        spin_files = tuple(str(spin_steps(k)) for k in range(p.spin.iterations))
        variants = [("sft_extra", "SFT-extra (same steps)", "steps")]
        if p.sft_extra.compute:
            variants.append(("sft_extra_compute", "SFT-extra (same compute)", "compute"))
        for name, label, budget in variants:
            self.models[name] = Model(
                name,
                Path(f"models/{name}"),
                name,
                label,
                SFT_EXTRA,
                run_name=name,
                train_metrics=train_metrics(name),
                steps_csv=steps_csv(name),
                timings=timings_file(name),
                opponent=theta_0.name,
                chart=name,
                step=p.spin.iterations,
            )
            self._add(
                Stage(
                    name,
                    "sft_extra",
                    (str(theta_0.path), str(DATA_DIR), *spin_files),
                    ("sft", *PROMPT_KEYS),
                    outs=(f"models/{name}",),
                    metrics=(str(train_metrics(name)),),
                    plots=(steps_plot(name),),
                    accelerate="spin.accelerate_config",
                    args={"budget": budget},
                    track=TRAINING,
                    subject=name,
                )
            )
            self._evaluate(name, name, self.evaluation_of(theta_0.name).name, ("spin.beta",))

    def _autoif(self) -> None:
        """AutoIF: instructions with verification functions (autoif_instructions), kept when the
        functions pass their cases in the sandbox (autoif_verify), attached to SFT prompts
        (autoif_queries); iteration k: θk samples responses scored by the functions
        (autoif_sample_iter_k) and DPO against θk on passing vs failing ones makes the AutoIF
        θk+1 (autoif_train_iter_k). θ0 and every AutoIF model are evaluated on queries with
        held-out instructions (eval_autoif_*).

        With ``autoif.with_spin`` the AutoIF chain is the SPIN chain: autoif_sample_iter_k
        samples from SPIN's θk for k < spin.iterations, train_iter_k trains on its pairs
        (:meth:`_spin`), there is no AutoIF model, and every SPIN θk+1 is evaluated on the
        held-out instructions (eval_autoif_iter_k)."""
        p = self.params
        if not p.autoif.enabled:
            return
        seeds = AUTOIF_SEED_LIBRARY if p.autoif.seeds == "builtin" else p.autoif.seeds
        supervised: tuple[str, ...] = ()
        if p.autoif.supervisor is not None:
            if not Path(p.autoif.supervisor).is_dir():
                raise ConfigError(
                    f"autoif.supervisor: {p.autoif.supervisor} is not a directory; it must be "
                    "a local model checkpoint (for example models/theta_0)"
                )
            supervised = (str(AUTOIF_SUPERVISED),)
            self._add(
                Stage(
                    "autoif_supervise",
                    "autoif_supervise",
                    (seeds, p.autoif.supervisor),
                    (
                        "autoif.seeds",
                        "autoif.supervisor_rounds",
                        "autoif.supervisor_instructions",
                        "autoif.supervisor_attempts",
                        "autoif.supervisor_max_new_tokens",
                        "autoif.temperature",
                        "autoif.top_p",
                        "generate.engine",
                        "generate.dtype",
                        "generate.batch_size",
                        "generate.vllm",
                        "prompt.system_prompt",
                        "prompt.max_prompt_length",
                        "seed",
                    ),
                    outs=supervised,
                    metrics=(str(train_metrics("autoif_supervise")),),
                )
            )
        self._add(
            Stage(
                "autoif_instructions",
                "autoif_instructions",
                (seeds, *supervised),
                ("autoif.seeds", "autoif.supervisor", "autoif.min_cases"),
                outs=(str(AUTOIF_INSTRUCTIONS),),
                metrics=(str(train_metrics("autoif_instructions")),),
            )
        )
        sandbox = AUTOIF_SANDBOX_KEYS
        self._add(
            Stage(
                "autoif_verify",
                "autoif_verify",
                (str(AUTOIF_INSTRUCTIONS),),
                ("autoif.min_function_accuracy", "autoif.min_functions", *sandbox),
                outs=(str(AUTOIF_VERIFIED),),
                metrics=(str(train_metrics("autoif_verify")),),
            )
        )
        engine = ("generate.engine", "generate.dtype", "generate.batch_size", "generate.vllm")
        prompt = ("prompt.system_prompt", "prompt.max_prompt_length", "seed")
        # the supervisor rates the training queries (autoif.query_min_score)
        scoring = p.autoif.supervisor is not None and p.autoif.query_min_score is not None
        self._add(
            Stage(
                "autoif_queries",
                "autoif_queries",
                (str(AUTOIF_VERIFIED), str(DATA_DIR), *((p.autoif.supervisor,) if scoring else ())),
                (
                    "autoif.heldout",
                    "autoif.queries",
                    "autoif.eval_queries",
                    "autoif.eval_instructions_per_query",
                    *(
                        ("autoif.query_min_score", "eval.batch_size", *engine, *prompt)
                        if scoring
                        else ("seed",)
                    ),
                ),
                outs=(str(AUTOIF_QUERIES),),
                metrics=(str(train_metrics("autoif_queries")),),
            )
        )
        self._autoif_evaluate(f"{AUTOIF}_theta_0", self.theta(0).name, sandbox + engine + prompt)
        combined = p.autoif.with_spin
        previous = self.theta(0)
        for k in range(p.spin.iterations if combined else p.autoif.iterations):
            samples = autoif_samples_dir(k)
            self._add(
                Stage(
                    f"autoif_sample_iter_{k}",
                    "autoif_sample",
                    (str(previous.path), str(AUTOIF_QUERIES)),
                    (
                        "autoif.samples",
                        "autoif.temperature",
                        "autoif.top_p",
                        "autoif.max_new_tokens",
                        "autoif.chosen_min",
                        "autoif.pairs_per_query",
                        *sandbox,
                        *engine,
                        *prompt,
                    ),
                    outs=(str(samples),),
                    metrics=(str(train_metrics(f"autoif_sample_iter_{k}")),),
                    args={"k": k},
                )
            )
            if combined:  # train_iter_k trains on the pairs; SPIN's θk+1 is evaluated
                previous = self.theta(k + 1)
                self._autoif_evaluate(
                    f"{AUTOIF}_iter_{k}", previous.name, sandbox + engine + prompt
                )
                continue
            name, stage = f"{AUTOIF}_theta_{k + 1}", f"autoif_train_iter_{k}"
            self.models[name] = Model(
                name,
                Path(f"models/{name}"),
                stage,
                f"θ{k + 1} (AutoIF iter {k})",
                AUTOIF,
                iteration=k,
                step=k + 1,
                run_name=f"autoif_iter_{k}",
                train_metrics=train_metrics(stage),
                steps_csv=steps_csv(stage),
                timings=timings_file(stage),
                opponent=previous.name,
                chart=AUTOIF,
            )
            self._add(
                Stage(
                    stage,
                    "autoif_train",
                    (str(previous.path), str(samples)),
                    (
                        "autoif.train",
                        "autoif.beta",
                        "autoif.sft_first",
                        *(("sft",) if p.autoif.sft_first else ()),
                        *PROMPT_KEYS,
                    ),
                    outs=(f"models/{name}",),
                    metrics=(str(train_metrics(stage)),),
                    plots=(steps_plot(stage),),
                    accelerate="spin.accelerate_config",
                    args={"k": k},
                    track=TRAINING,
                    subject=name,
                )
            )
            self._autoif_evaluate(f"{AUTOIF}_iter_{k}", name, sandbox + engine + prompt)
            previous = self.models[name]

    def _autoif_evaluate(self, name: str, model: str, params: tuple[str, ...]) -> None:
        evaluation = Evaluation(name, model, f"eval_{name}", None, kind=AUTOIF)
        self.evaluations[name] = evaluation
        self._add(
            Stage(
                evaluation.stage,
                "autoif_evaluate",
                (str(self.models[model].path), str(AUTOIF_QUERIES)),
                ("autoif.max_new_tokens", "eval.batch_size", *params),
                outs=(str(evaluation.directory),),
                metrics=(str(evaluation.metrics),),
                args={"name": name},
                track=EVALUATION,
                subject=name,
            )
        )

    def _report(self) -> None:
        scores = (str(LOBASS_SCORES),) if "lobass_score" in self.stages else ()
        autoif = tuple(
            str(train_metrics(s))
            for s in self.stages
            if s in ("autoif_supervise", "autoif_instructions", "autoif_verify", "autoif_queries")
            or s.startswith("autoif_sample_iter_")
        )
        self._add(
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
                    # per-iteration diagnostics: each iteration's steps and θk's pool answers
                    *(
                        str(path)
                        for m in self.models.values()
                        if m.role == ITERATION
                        for path in (m.steps_csv, generated_dir(m.iteration))
                    ),
                    str(DATA_DIR),
                    *scores,
                    *(
                        (str(train_metrics("lobass_score")), str(train_metrics("lobass_select")))
                        if scores
                        else ()
                    ),
                    *autoif,
                ),
                # the switches that add or remove rows: DVC does not re-run a stage whose
                # dependency list merely shrank, but it does see a listed value change
                (
                    "spin.iterations",
                    "spin.start",
                    "sft.enabled",
                    "sft_extra",
                    "lobass",
                    "autoif.enabled",
                    "autoif.iterations",
                    # the rule that chooses the iteration a user keeps (validation split)
                    "tracking.champion_metric",
                    "tracking.champion_mode",
                ),
                metrics=(str(COMPARISONS), str(DIAGNOSTICS)),
                uncached_outs=(
                    str(REPORT_DIR / "results.md"),
                    str(REPORT_DIR / "metrics.png"),
                    str(REPORT_DIR / "diagnostics.png"),
                    *((str(REPORT_DIR / "lobass_scores.png"),) if scores else ()),
                ),
                plots=(Plot(str(REPORT_DIR / "by_iteration.csv"), "iteration"),),
                track=REPORT,
            )
        )


def _local_source(source: str) -> list[str]:
    """A local model directory or data file is a dependency: editing it re-runs its stage."""
    keyword = source in ("embedded", "tiny", "builtin")
    return [source] if not keyword and Path(source).exists() else []


def build(params: Params) -> Graph:
    return Graph(params)

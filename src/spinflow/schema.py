"""What every params section is built from: the base section, the value types, and the settings
the shared library reads (optimisation, LoRA, prompt lengths).

Methods declare their own sections from these (``spinflow.methods.<method>.params``);
:mod:`spinflow.config` puts every section together into :class:`~spinflow.config.Params`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are validated on assignment."""

    # allow_inf_nan: `.inf` or `.nan` is never a sensible learning rate, β or probability
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Strict(), Field(gt=0)]


NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


# torch seeds its generators with 64-bit integers: a larger seed overflows when a stage starts
MAX_SEED = 2**63 - 1


def _within_seeds(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be in 0..{MAX_SEED} (2**63 - 1): torch takes 64-bit seeds")
    return value


Seed = Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_within_seeds)]


# The continuous engine allocates every decoding slot's key-value cache for the prompt plus this
# many new tokens before it starts; no model the pipeline runs reads further
MAX_NEW_TOKENS = 32768


def _within_new_tokens(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_NEW_TOKENS:
        raise ValueError(
            f"at most {MAX_NEW_TOKENS} tokens: the continuous engine allocates every decoding "
            "slot's key-value cache for the prompt plus this many tokens before it starts"
        )
    return value


NewTokens = Annotated[
    int, Strict(), Field(gt=0, le=MAX_NEW_TOKENS), BeforeValidator(_within_new_tokens)
]


ITERATION_KEY = re.compile(r"^iter_(\d+)$")


class LoraParams(Section):
    enabled: bool = Field(
        False, description="Train LoRA adapters (merged at the end) instead of all weights"
    )
    r: PositiveInt = Field(16, description="LoRA rank")
    alpha: PositiveInt = Field(32, description="LoRA alpha")
    dropout: Probability = Field(0.0, description="LoRA dropout")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Module names that get adapters",
    )

    @field_validator("target_modules")
    @classmethod
    def _names_modules(cls, value: list[str]) -> list[str]:
        if not value or not all(name.strip() for name in value):
            raise ValueError(
                "must name the modules that get adapters (for example [q_proj, v_proj]); with "
                "none LoRA trains nothing: set lora.enabled: false to train all weights"
            )
        return value


class OptimParams(Section):
    """Optimisation settings shared by SFT and SPIN training."""

    learning_rate: Annotated[float, Field(gt=0.0)] = Field(5e-6, description="Peak learning rate")
    epochs: PositiveInt = Field(1, description="Passes over the training examples")
    batch_size: PositiveInt = Field(8, description="Examples per device per micro-batch")
    gradient_accumulation_steps: PositiveInt = Field(
        1, description="Micro-batches per optimizer step"
    )
    optimizer: Literal["adamw", "rmsprop", "sgd"] = Field(
        "rmsprop", description="Optimizer (the paper uses RMSprop)"
    )
    weight_decay: Annotated[float, Field(ge=0.0)] = Field(0.0, description="Weight decay")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule"
    )
    warmup_ratio: Probability = Field(0.1, description="Fraction of steps for linear warmup")
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = Field(
        1.0, description="Gradient clipping (null: off)"
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bfloat16 autocast over float32 weights: true, false, or auto (bf16 only where "
        "the device computes it natively and a probe measures it faster and as exact; "
        "see spinflow.precision)",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory")
    group_by_length: bool = Field(
        True,
        description="Batch examples of similar length together (less padding; order still seeded)",
    )
    lora: LoraParams = Field(default_factory=LoraParams)

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16_setting(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("must be auto, true or false")


class PromptParams(Section):
    system_prompt: str | None = Field(
        None, description="System message put before every prompt (null: none)"
    )
    max_prompt_length: PositiveInt = Field(
        128, description="Prompt tokens kept (truncated keeping the end)"
    )
    max_length: PositiveInt = Field(256, description="Prompt + answer tokens kept")

    @model_validator(mode="after")
    def _prompt_fits(self) -> PromptParams:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"prompt.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"prompt.max_length ({self.max_length})"
            )
        return self

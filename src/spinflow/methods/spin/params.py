"""The ``spin`` and ``sft_extra`` sections: self-play iterations and their continued-SFT baselines."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from spinflow.schema import ITERATION_KEY, NonNegativeInt, OptimParams, PositiveInt, Section


class SpinTrainParams(OptimParams):
    """SPIN's optimisation defaults (RMSprop as in the paper; lr sized for the embedded model)."""

    learning_rate: Annotated[float, Field(gt=0.0)] = Field(2e-6, description="Peak learning rate")


class TrainOverride(Section):
    """Per-iteration changes to ``spin.train`` (the paper lowers the learning rate later)."""

    learning_rate: Annotated[float, Field(gt=0.0)] | None = None
    epochs: PositiveInt | None = None
    beta: Annotated[float, Field(gt=0.0)] | None = None


class SpinParams(Section):
    start: Literal["sft", "lobass"] = Field(
        "sft",
        description="θ0 of the SPIN chain: the SFT model, or the model fine-tuned on the LoBaSS selection",
    )
    iterations: PositiveInt = Field(3, description="Number of SPIN iterations N (θ1 … θN)")
    beta: Annotated[float, Field(gt=0.0)] = Field(0.1, description="β of the SPIN loss")
    loss: Literal["sigmoid", "hinge"] = Field(
        "sigmoid", description="Logistic (paper) or hinge loss"
    )
    mix_previous: NonNegativeInt = Field(
        1, description="Also train on the pairs of this many previous iterations (paper: 1)"
    )
    feedback_filter: Literal["keep", "drop", "real_only"] = Field(
        "real_only",
        description=(
            "Pairs whose generated answer passes the task's verifier (it is not wrong): keep "
            "them, drop them, or real_only: keep only the real answer's term of the loss"
        ),
    )
    accelerate_config: str | None = Field(
        None, description="accelerate config file for multi-GPU runs (null: single process)"
    )
    train: SpinTrainParams = Field(default_factory=SpinTrainParams)
    per_iteration: dict[str, TrainOverride] = Field(
        default_factory=dict, description="Overrides of spin.train keyed iter_<k>"
    )

    @field_validator("per_iteration")
    @classmethod
    def _iteration_keys(cls, value: dict[str, TrainOverride]) -> dict[str, TrainOverride]:
        for key in value:
            if not ITERATION_KEY.match(key):
                raise ValueError(f"key {key!r} must look like iter_<k> (for example iter_2)")
        return value

    @model_validator(mode="after")
    def _iterations_exist(self) -> SpinParams:
        for key in self.per_iteration:
            k = int(ITERATION_KEY.match(key).group(1))
            if k >= self.iterations:
                raise ValueError(
                    f"per_iteration.{key} names iteration {k}, but spin.iterations is "
                    f"{self.iterations} (iterations 0..{self.iterations - 1})"
                )
        return self


class SftExtraParams(Section):
    enabled: bool = Field(
        True,
        description=(
            "Baseline: train θ0 further with plain SFT on the SFT split, for as many optimizer "
            "steps as all SPIN iterations took"
        ),
    )
    compute: bool = Field(
        False,
        description=(
            "Second baseline (sft_extra_compute): the same, for as much training compute as "
            "SPIN used (token passes of generation, reference passes and training); off in "
            "the default, which it would take past 10 minutes on 2 cores"
        ),
    )

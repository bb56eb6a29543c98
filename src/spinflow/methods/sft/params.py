"""The ``sft`` section: θ0, the base model fine-tuned on the SFT split."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from spinflow.schema import OptimParams, PositiveInt


class SftParams(OptimParams):
    enabled: bool = Field(
        True, description="Fine-tune the base model on the SFT split (off: θ0 = base)"
    )
    learning_rate: Annotated[float, Field(gt=0.0)] = Field(2e-5, description="Peak learning rate")
    optimizer: Literal["adamw", "rmsprop", "sgd"] = Field("adamw", description="Optimizer")
    epochs: PositiveInt = Field(
        6, description="Passes over the SFT split (the most, when sft.patience stops it earlier)"
    )
    patience: PositiveInt | None = Field(
        1,
        description=(
            "θ0: stop after this many epochs without a lower validation loss and keep the best "
            "epoch's weights (null: train all sft.epochs; needs data.num_val > 0)"
        ),
    )

"""The ``lobass`` section: learnability-based selection of the SFT data."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from spinflow.schema import PositiveInt, Section


class LobassParams(Section):
    """LoBaSS (arXiv 2310.13008): fine-tune on the SFT examples the model learns most from."""

    enabled: bool = Field(
        False,
        description="Score SFT examples by learnability, fine-tune the base model on the top ones",
    )
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.06, description="Share of the SFT split kept, by score (paper: 6%)"
    )
    min_examples: PositiveInt = Field(8, description="Keep at least this many examples")

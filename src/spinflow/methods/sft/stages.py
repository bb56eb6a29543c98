"""SFT: θ0, the base model fine-tuned on the SFT split (stage ``sft``).

θ0 is trained for at most ``sft.epochs`` epochs; with ``sft.patience`` it stops once its loss on
the validation split has not improved for that many epochs and keeps the best epoch's weights.
"""

from __future__ import annotations

from typing import Any

from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.graph import build
from spinflow.nodes import DATA_DIR
from spinflow.recipes.common import require
from spinflow.sft_training import supervised


def sft(params: Params) -> dict[str, Any]:
    """θ0: the base model fine-tuned on the SFT split."""
    from spinflow.data import load_split

    graph = build(params)
    records = load_split(DATA_DIR, "sft")
    if not records:
        raise SpinflowError(
            "data/prepared/sft.jsonl is empty: raise data.num_sft or set sft.enabled: false"
        )
    return supervised(
        params,
        graph.model("theta_0"),  # θ0 of the chain unless spin.start picks another model
        source=require(graph, graph.model("base").path),
        records=records,
        max_steps=None,
        extra_inputs={"data": DATA_DIR / "sft.jsonl", "val": DATA_DIR / "val.jsonl"},
        validation=load_split(DATA_DIR, "val"),
        patience=params.sft.patience,
    )

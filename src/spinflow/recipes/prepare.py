"""The inputs of every method: the base model (prepare_model) and the data splits (prepare_data)."""

from __future__ import annotations

from typing import Any

from spinflow.config import Params
from spinflow.nodes import BASE_MODEL, DATA_DIR
from spinflow.provenance import PROVENANCE_FILE, provenance


def prepare_model(params: Params) -> dict[str, Any]:
    """The base model as a plain Hugging Face checkpoint in models/base."""
    from spinflow.models import prepare_base_model

    return prepare_base_model(
        params.model.source,
        BASE_MODEL,
        gguf_file=params.model.gguf_file,
        revision=params.model.revision,
        dtype=params.model.dtype,
        seed=params.seed,
        files=lambda info: {
            PROVENANCE_FILE: {
                **provenance("prepare_model", params.model.model_dump(), {}),
                "model": info,
            }
        },
    )


def prepare_data(params: Params) -> dict[str, Any]:
    """The SFT split, the SPIN prompt pool and the test split in data/prepared."""
    from spinflow.data import prepare_data as build

    made_by = provenance("prepare_data", params.data.model_dump(), {})
    return build(params.data, DATA_DIR, files={PROVENANCE_FILE: made_by})

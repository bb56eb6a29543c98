"""vllm/distributed/parallel_state.py of vLLM 0.33.0, as far as spinflow calls it: the clean-up
after a model is released (model-parallel groups and distributed environment torn down, garbage
collected, the accelerator's cache emptied). The double records the call."""

from __future__ import annotations

import gc

from vllm import _log


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    if not isinstance(shutdown_ray, bool):
        raise TypeError(
            f"cleanup_dist_env_and_memory(): shutdown_ray={shutdown_ray!r} is not a bool"
        )
    gc.collect()
    _log("cleanup")

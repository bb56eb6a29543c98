"""Loaded at start-up by every stage process of the test pipelines (conftest.pipeline_env puts
this folder on PYTHONPATH): records where each model runs, and which of the package's modules
each stage process imported (at exit, to ``.spinflow/test-imports/<pid>.json``: the code
dependencies dvc.yaml lists must cover them, tests/test_pipeline.py).

In a stage process (``stages/<script>.py``) it wraps :func:`spinflow.devices.stage_device` (the
decision) and :func:`spinflow.models.load_model` (which must be given that decision), and adds a
forward hook to every model loaded: each forward pass appends, to
``.spinflow/test-devices/<pid>.jsonl`` in the stage's working directory, the stage, the devices
decided, the device the model was placed on when loaded and the device of its weights during the
pass. tests/test_devices.py reads these records.
"""

import os
import sys

# the stage scripts that run a model (the others do not import torch: they stay light)
MODEL_STAGES = {
    "sft", "sft_extra", "sft_selection", "generate", "train", "evaluate", "lobass_score",
    "autoif_sample", "autoif_supervise", "autoif_train", "autoif_evaluate",
}  # fmt: skip
_script = os.path.normpath(sys.argv[0] or "").split(os.sep)[-2:]

if len(_script) == 2 and _script[0] == "stages":
    import atexit

    def _record_imports() -> None:
        import json

        package = sys.modules.get("spinflow")
        if package is None:
            return
        root = os.path.dirname(package.__file__)  # the package's files, named as dvc.yaml does
        files = sorted(
            "src/spinflow/" + os.path.relpath(m.__file__, root).replace(os.sep, "/")
            for name, m in list(sys.modules.items())
            if name.startswith("spinflow.") and getattr(m, "__file__", None)
        )
        files.append("src/spinflow/__init__.py")
        folder = os.path.join(".spinflow", "test-imports")
        os.makedirs(folder, exist_ok=True)
        record = {"stage": " ".join(sys.argv[1:2]), "script": "/".join(_script), "files": files}
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f)

    atexit.register(_record_imports)
if len(_script) == 2 and _script[0] == "stages" and _script[1][:-3] in MODEL_STAGES:
    import json
    from pathlib import Path

    import spinflow.devices as devices
    import spinflow.models as models

    _stage = " ".join(sys.argv[1:2])
    _decided: list[str] = []
    _log = Path(".spinflow") / "test-devices" / f"{os.getpid()}.jsonl"
    _decide, _load = devices.stage_device, models.load_model

    def _stage_device(setting="auto"):
        device = _decide(setting)
        if str(device) not in _decided:
            _decided.append(str(device))
        return device

    def _write(placed, ran_on: str, what: str) -> None:
        _log.parent.mkdir(parents=True, exist_ok=True)
        row = {"stage": _stage, "decided": _decided, "placed": placed, "ran_on": ran_on}
        with open(_log, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "what": what}) + "\n")

    def _record(placed):
        def hook(module, args, kwargs):
            _write(placed, str(next(module.parameters()).device), "forward")

        return hook

    def _load_model(path, *, dtype="float32", device=None):
        model = _load(path, dtype=dtype, device=device)
        placed = None if device is None else str(device)
        model.register_forward_pre_hook(_record(placed), with_kwargs=True)
        model._test_placed = placed
        return model

    devices.stage_device = _stage_device
    models.load_model = _load_model

    # the continuous engine runs the model's weights with its own code, not its forward: it is
    # wrapped when the stage imports it (importing it here would add to what the stage imports)
    import importlib.abc
    import importlib.machinery

    def _patch_engine(continuous) -> None:
        engine_load = continuous.ContinuousEngine._load  # where it takes the weights it runs

        def _load_weights(self, dtype):
            engine_load(self, dtype)
            placed = getattr(self.source, "_test_placed", "not loaded by load_model")
            _write(placed, str(self.device), "continuous engine")

        continuous.ContinuousEngine._load = _load_weights

    class _EngineFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "spinflow.engines.continuous":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _patch_engine(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _EngineFinder())

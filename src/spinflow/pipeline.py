"""dvc.yaml, rendered from the pipeline graph.

DVC templating cannot compute k−1, and the number of iterations lives in params.yaml, so the
pipeline file is rendered from :mod:`spinflow.graph`: ``spinflow pipeline write`` writes it,
``spinflow pipeline check`` fails when it and params.yaml disagree. Each stage lists only the
parameter keys it reads, so a change re-runs exactly the stages it affects.

Code dependencies are computed, not listed: a stage depends on its script and on every module of
the package that the script imports, directly or through other modules, at module level or
inside a function (:func:`import_closure`), except the modules its params leave off
(:func:`switched_off`): tracking, which writes nothing DVC hashes; the generation engines other
than ``generate.engine``; AutoIF and the sandbox where AutoIF is off for the stage; the
lm-evaluation-harness adapter while ``eval.lm_eval.tasks`` is empty. Editing code a stage runs
re-runs that stage, and editing code it does not run re-runs nothing.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from spinflow.config import Params
from spinflow.errors import SpinflowError
from spinflow.graph import Graph, build
from spinflow.nodes import REPORT_DIR, Stage

DVC_FILE = "dvc.yaml"
PACKAGE = "spinflow"
SOURCE_ROOT = Path("src")
STAGES_DIR = Path("stages")
HEADER = (
    "# Rendered from params.yaml by `spinflow pipeline write`; do not edit by hand.\n"
    "# Change params.yaml, run `spinflow pipeline write`, then `dvc repro`.\n"
)
STEP_PLOT_Y = ("loss", "reward_margin", "reward_accuracy")
REPORT_PLOT_Y = ("verifier_pass_rate", "exact_match", "answer_logprob_per_token")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# Code dependencies


def _module_file(module: str, source_root: Path) -> Path | None:
    base = source_root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imported_modules(path: Path, module: str | None, source_root: Path) -> set[str]:
    """Package modules that ``path`` imports anywhere in its body (functions included)."""
    stat = path.stat()
    return set(_parsed_imports(path.resolve(), module, source_root.resolve(), stat.st_mtime_ns))


@functools.lru_cache(maxsize=1024)
def _parsed_imports(
    path: Path, module: str | None, source_root: Path, mtime_ns: int
) -> frozenset[str]:
    """:func:`_imported_modules` of one version of a file (``mtime_ns`` names the version)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise SpinflowError(f"{path}:{exc.lineno}: cannot parse ({exc.msg})") from None
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            names = [base]
            # `from pkg import name`: name may be a submodule
            names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                found.update(m for m in _with_packages(name) if _module_file(m, source_root))
    return frozenset(found)


def _inside(module: str, packages: frozenset[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def import_closure(
    script: str | Path,
    source_root: Path = SOURCE_ROOT,
    skip: frozenset[str] = frozenset(),
    loaded: tuple[str, ...] = (),
) -> list[str]:
    """Files of the package that ``script`` runs when imported or called: its import closure.

    Every ``import`` statement counts, also those inside functions, so a lazily imported module
    is a dependency too; so are the modules in ``loaded``, which the script imports by name
    (``Stage.code``). The modules in ``skip`` (and those inside them) are neither listed nor
    followed. Returns sorted paths as they appear under ``source_root``.
    """
    if not (source_root / PACKAGE).is_dir():
        raise SpinflowError(
            f"{source_root / PACKAGE}: not found; run `spinflow pipeline` in the project root"
        )
    seen: set[str] = set()
    todo = sorted(_imported_modules(Path(script), None, source_root))
    todo += [m for name in loaded for m in _with_packages(name) if _module_file(m, source_root)]
    while todo:
        module = todo.pop()
        if module in seen or _inside(module, skip):
            continue
        seen.add(module)
        path = _module_file(module, source_root)
        if path is not None:
            todo.extend(sorted(_imported_modules(path, module, source_root) - seen))
    return sorted(str(_module_file(m, source_root)) for m in seen)


# Modules that only some params run. An import of one of them sits inside a function, in the
# branch its param opens, so a stage that leaves it off never loads it (tests/test_e2e_dvc.py
# records what each stage process of the test pipeline really imports).
TRACKING = "spinflow.tracking"
ENGINE_MODULES = {
    "torch": "spinflow.engines.torch",
    "continuous": "spinflow.engines.continuous",
    "vllm": "spinflow.engines.vllm",
}
AUTOIF_MODULES = (
    "spinflow.methods.autoif.stages",
    "spinflow.methods.autoif.instructions",
    "spinflow.sandbox",
    "spinflow.sandbox_worker",
)
HARNESS = "spinflow.harness"
AUTOIF_SCRIPT_PREFIX = "autoif_"


def switched_off(params: Params, stage: Stage) -> frozenset[str]:
    """The package modules ``stage`` does not run with these params.

    Tracking runs in every tracked stage but writes nothing DVC hashes (MLflow only), so no
    output depends on it.
    """
    off = {TRACKING}
    off.update(m for name, m in ENGINE_MODULES.items() if name != params.generate.engine)
    if not (stage.script.startswith(AUTOIF_SCRIPT_PREFIX) or params.autoif.with_spin):
        off.update(AUTOIF_MODULES)
    if not params.eval.lm_eval.tasks:
        off.add(HARNESS)
    return frozenset(off)


# ---------------------------------------------------------------------------------------------
# Rendering


def machines(config: str | os.PathLike) -> int:
    """``num_machines`` of an accelerate config (1 when absent or unreadable: validation says
    why elsewhere)."""
    try:
        raw = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return 1
    return int(raw.get("num_machines", 1) or 1) if isinstance(raw, dict) else 1


def stage_command(stage: Stage, params: Params) -> list[str]:
    """The command that runs ``stage``: python, accelerate launch with the stage's accelerate
    config, or ``spinflow launch`` where that config names several machines
    (:mod:`spinflow.launch`)."""
    accelerate_config = params.value(stage.accelerate) if stage.accelerate else None
    if not accelerate_config:
        launcher = ["python"]
    elif machines(accelerate_config) > 1:
        launcher = ["spinflow", "launch", "--config_file", str(accelerate_config)]
    else:
        launcher = ["accelerate", "launch", "--config_file", str(accelerate_config)]
    # A per-iteration override is a param that exists only while params.yaml holds it, and
    # autoif.with_spin is listed only while true. DVC does not re-run a stage whose param list
    # merely shrank, so such a key is named in the command too: removing it changes the command,
    # which DVC does compare.
    overrides = [part for key in stage.overrides for part in ("--override", key)]
    return [*launcher, f"{STAGES_DIR / stage.script}.py", stage.name, *overrides]


def _cmd(stage: Stage, params: Params) -> str:
    return " ".join(stage_command(stage, params))


def code_dependencies(stage: Stage, params: Params) -> list[str]:
    """The stage's script and the package files it runs with these params."""
    script = str(STAGES_DIR / f"{stage.script}.py")
    return [script, *import_closure(script, skip=switched_off(params, stage), loaded=stage.code)]


def render_stage(stage: Stage, params: Params, code: dict[tuple, list[str]]) -> dict[str, Any]:
    key = (stage.script, switched_off(params, stage), stage.code)
    if key not in code:
        code[key] = code_dependencies(stage, params)
    entry: dict[str, Any] = {
        "cmd": _cmd(stage, params),
        "deps": [*code[key], *stage.inputs],
    }
    if stage.params:
        entry["params"] = list(stage.params)
    outs: list[Any] = list(stage.outs)
    outs += [{path: {"cache": False}} for path in stage.uncached_outs]
    if outs:
        entry["outs"] = outs
    if stage.metrics:
        # metrics, not plain uncached outs, so DVC's run cache still records the stage
        entry["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
    if stage.plots:
        entry["plots"] = [
            {p.path: {"x": p.x, **({"y": p.y} if p.y else {}), "cache": False}} for p in stage.plots
        ]
    return entry


def render(params: Params, graph: Graph | None = None) -> dict[str, Any]:
    """The dvc.yaml mapping for these params."""
    graph = graph or build(params)
    code: dict[tuple, list[str]] = {}
    stages = {name: render_stage(s, params, code) for name, s in graph.stages.items()}
    steps_files = {
        str(graph.model(name).steps_csv): list(STEP_PLOT_Y)
        for name in graph.chain[1:]
        if graph.model(name).steps_csv is not None
    }
    plots = [
        {"SPIN training per step": {"x": "step", "y": steps_files}},
        {
            "Held-out metrics by iteration": {
                "x": "iteration",
                "y": {str(REPORT_DIR / "by_iteration.csv"): list(REPORT_PLOT_Y)},
            }
        },
    ]
    return {"stages": stages, "plots": plots}


def render_text(params: Params) -> str:
    return HEADER + yaml.dump(render(params), Dumper=_Dumper, sort_keys=False, width=110)


def write(params: Params, path: str | Path = DVC_FILE) -> Path:
    from spinflow.io import write_text

    write_text(path, render_text(params))
    return Path(path)


def check(params: Params, path: str | Path = DVC_FILE) -> str | None:
    """None when ``path`` matches params; otherwise a one-line description of the difference."""
    path = Path(path)
    if not path.exists():
        return f"{path}: missing; run `spinflow pipeline write`"
    current = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    expected = render(params)
    if current == expected:
        return None
    have, want = set(current.get("stages", {})), set(expected["stages"])
    if have != want:
        detail = f"stages differ (extra: {sorted(have - want)}, missing: {sorted(want - have)})"
    else:
        changed = sorted(s for s in want if current["stages"][s] != expected["stages"][s])
        detail = f"stages differ in their definition: {changed}"
    return f"{path} does not match params.yaml: {detail}; run `spinflow pipeline write`"

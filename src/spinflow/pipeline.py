"""dvc.yaml, generated from params.yaml.

DVC templating cannot compute k−1, and the number of iterations lives in params.yaml, so the
pipeline file is rendered here: ``spinflow pipeline write`` writes it, ``spinflow pipeline check``
fails when it and params.yaml disagree. Each stage lists only the parameter keys it reads, so a
change re-runs exactly the stages it affects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spinflow import layout
from spinflow.config import Params

DVC_FILE = "dvc.yaml"
HEADER = (
    "# Rendered from params.yaml by `spinflow pipeline write`; do not edit by hand.\n"
    "# Change params.yaml, run `spinflow pipeline write`, then `dvc repro`.\n"
)
STEP_PLOT_Y = ("loss", "reward_margin", "reward_accuracy")
REPORT_PLOT_Y = ("verifier_pass_rate", "exact_match", "answer_logprob_per_token")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _cmd(script: str, *args: str, accelerate_config: str | None = None) -> str:
    launcher = (
        f"accelerate launch --config_file {accelerate_config}" if accelerate_config else "python"
    )
    return " ".join([launcher, f"stages/{script}.py", *args])


def _code(*modules: str) -> list[str]:
    return [f"src/spinflow/{m}.py" for m in modules]


def _local_source(source: str) -> list[str]:
    """A local model directory or data file is a dependency: editing it re-runs its stage."""
    keyword = source in ("embedded", "tiny", "builtin")
    return [source] if not keyword and Path(source).exists() else []


def render(params: Params) -> dict[str, Any]:
    """The dvc.yaml mapping for these params."""
    sft_on = params.sft.enabled
    stages: dict[str, Any] = {}
    prompt_keys = ["prompt", "seed"]

    stages["prepare_model"] = {
        "cmd": _cmd("prepare_model"),
        "deps": ["stages/prepare_model.py", *_code("models"), *_local_source(params.model.source)],
        "params": ["model", "seed"],
        "outs": [str(layout.BASE_MODEL)],
    }
    stages["prepare_data"] = {
        "cmd": _cmd("prepare_data"),
        "deps": [
            "stages/prepare_data.py",
            *_code("data", "tasks"),
            *_local_source(params.data.source),
        ],
        "params": ["data"],
        "outs": [str(layout.DATA_DIR)],
    }
    if sft_on:
        stages["sft"] = {
            "cmd": _cmd("sft", accelerate_config=params.spin.accelerate_config),
            "deps": [
                "stages/sft.py",
                *_code("training", "chat"),
                str(layout.BASE_MODEL),
                str(layout.DATA_DIR),
            ],
            "params": ["sft", *prompt_keys],
            "outs": [str(layout.SFT_MODEL)],
            "metrics": [{f"{layout.METRICS_DIR}/sft.json": {"cache": False}}],
            "plots": [{str(layout.train_steps("sft")): {"x": "step", "y": "loss", "cache": False}}],
        }

    def eval_stage(
        name: str, model_dir: Path, opponent: str | None, extra_params: list[str]
    ) -> dict[str, Any]:
        deps = [
            "stages/evaluate.py",
            *_code("evaluation", "generation", "verifiers"),
            str(model_dir),
            str(layout.DATA_DIR),
        ]
        if opponent is not None:
            deps.append(str(layout.eval_generations(opponent).parent))
        return {
            "cmd": _cmd("evaluate", "--model", name),
            "deps": deps,
            "params": ["eval", *prompt_keys, *extra_params],
            "outs": [str(layout.eval_generations(name).parent)],
            "metrics": [{str(layout.eval_metrics(name)): {"cache": False}}],
        }

    stages["eval_sft"] = eval_stage("sft", layout.theta(0, sft_enabled=sft_on), None, [])

    for k in range(params.spin.iterations):
        theta_k = str(layout.theta(k, sft_enabled=sft_on))
        theta_next = layout.theta(k + 1, sft_enabled=sft_on)
        stages[f"generate_iter_{k}"] = {
            "cmd": _cmd("generate", "--iteration", str(k)),
            "deps": [
                "stages/generate.py",
                *_code("generation", "chat"),
                theta_k,
                str(layout.DATA_DIR),
            ],
            "params": ["generate", "prompt.system_prompt", "prompt.max_prompt_length", "seed"],
            "outs": [str(layout.generated_dir(k))],
        }
        train_params: list[str] = [
            "spin.train",
            "spin.beta",
            "spin.loss",
            "spin.mix_previous",
            *prompt_keys,
        ]
        if f"iter_{k}" in params.spin.per_iteration:
            train_params.append(f"spin.per_iteration.iter_{k}")
        pair_dirs = [
            str(layout.generated_dir(j)) for j in range(max(0, k - params.spin.mix_previous), k + 1)
        ]
        stages[f"train_iter_{k}"] = {
            "cmd": _cmd(
                "train", "--iteration", str(k), accelerate_config=params.spin.accelerate_config
            ),
            "deps": ["stages/train.py", *_code("training", "losses", "chat"), theta_k, *pair_dirs],
            "params": train_params,
            "outs": [str(theta_next)],
            # metrics, not plain uncached outs, so DVC's run cache still records this stage
            "metrics": [
                {str(layout.train_metrics(k)): {"cache": False}},
                {str(layout.spin_steps(k)): {"cache": False}},
            ],
            "plots": [
                {
                    str(layout.train_steps(f"train_iter_{k}")): {
                        "x": "step",
                        "y": "loss",
                        "cache": False,
                    }
                }
            ],
        }
        beta_key = (
            [f"spin.per_iteration.iter_{k}"] if f"iter_{k}" in params.spin.per_iteration else []
        )
        stages[f"eval_iter_{k}"] = eval_stage(
            f"iter_{k}", theta_next, "sft" if k == 0 else f"iter_{k - 1}", ["spin.beta", *beta_key]
        )

    report_deps = ["stages/report.py", *_code("report"), str(layout.eval_metrics("sft"))]
    report_deps += [str(layout.eval_metrics(f"iter_{k}")) for k in range(params.spin.iterations)]
    if params.sft_extra.enabled:
        stages["sft_extra"] = {
            "cmd": _cmd("sft_extra", accelerate_config=params.spin.accelerate_config),
            "deps": [
                "stages/sft_extra.py",
                *_code("training", "chat"),
                str(layout.theta(0, sft_enabled=sft_on)),
                str(layout.DATA_DIR),
                *[str(layout.spin_steps(k)) for k in range(params.spin.iterations)],
            ],
            "params": ["sft", *prompt_keys],
            "outs": [str(layout.SFT_EXTRA_MODEL)],
            "metrics": [{f"{layout.METRICS_DIR}/sft_extra.json": {"cache": False}}],
        }
        stages["eval_sft_extra"] = eval_stage(
            "sft_extra", layout.SFT_EXTRA_MODEL, "sft", ["spin.beta"]
        )
        report_deps.append(str(layout.eval_metrics("sft_extra")))
    stages["report"] = {
        "cmd": _cmd("report"),
        "deps": report_deps,
        "params": ["spin.iterations"],
        "outs": [
            {str(layout.REPORT_DIR / "results.md"): {"cache": False}},
            {str(layout.REPORT_DIR / "metrics.png"): {"cache": False}},
        ],
        "plots": [
            {str(layout.REPORT_DIR / "by_iteration.csv"): {"x": "iteration", "cache": False}}
        ],
    }
    steps_files = {
        str(layout.train_steps(f"train_iter_{k}")): list(STEP_PLOT_Y)
        for k in range(params.spin.iterations)
    }
    plots = [
        {"SPIN training per step": {"x": "step", "y": steps_files}},
        {
            "Held-out metrics by iteration": {
                "x": "iteration",
                "y": {str(layout.REPORT_DIR / "by_iteration.csv"): list(REPORT_PLOT_Y)},
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

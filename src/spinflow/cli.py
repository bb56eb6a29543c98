"""The ``spinflow`` command: what users run outside DVC (stages run through :mod:`spinflow.runner`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from spinflow.config import PARAMS_FILE, Params, describe_fields, load_params
from spinflow.engines import ENGINES
from spinflow.errors import SpinflowError, cannot_write
from spinflow.runner import configure_logging

DESCRIPTION = """\
spinflow: self-play fine-tuning (SPIN) of language models as a DVC pipeline.

The pipeline itself runs with `dvc repro`; these commands help around it: check params.yaml,
list the parameters, render dvc.yaml after changing the number of iterations, time the
training loop."""

EPILOG = """\
examples:
  spinflow validate                      check params.yaml (schema, files it names)
  spinflow validate --params x.yaml      check another params file
  spinflow params                        current values, allowed values and meaning of every key
  spinflow params --defaults --yaml      the defaults as a complete params.yaml
  spinflow pipeline write                re-render dvc.yaml, then `dvc repro`
  spinflow evaluate models/theta_* --split val   compare checkpoints off the test split
  spinflow doctor                        check this machine before a long run

`spinflow <command> --help` describes a command's options."""


def _positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _cmd_validate(args) -> int:
    from spinflow.config import read_params_file
    from spinflow.graph import build
    from spinflow.validation import check_dvc_keys, check_references

    params = load_params(args.params)
    check_references(params)
    # DVC reads each stage's keys from the file itself: a preset must list them all
    check_dvc_keys(read_params_file(args.params), build(params), args.params)
    print(f"{args.params}: valid")
    return 0


def _show(value: Any) -> str:
    """A value as it is written in params.yaml (YAML flow style), not as a Python repr."""
    if isinstance(value, str) and value and value.strip() == value:
        try:
            plain = yaml.safe_load(value) == value and ": " not in value and " #" not in value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value, ensure_ascii=False)
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6)
    return text.strip().removesuffix("...").strip()


def _current(args) -> tuple[Params, str]:
    """The params to show and what they are: the file's values, or the defaults."""
    if args.defaults:
        return Params(), "defaults"
    if not os.path.exists(args.params):
        print(f"note: {args.params} not found; showing the defaults", file=sys.stderr)
        return Params(), "defaults"
    try:
        return load_params(args.params), f"values in {args.params}"
    except SpinflowError as exc:
        print(f"warning: {exc}; showing the defaults", file=sys.stderr)
        return Params(), "defaults"


def _cmd_params(args) -> int:
    params, what = _current(args)
    if args.yaml:
        raw = params.model_dump(mode="json")
        raw["spin"]["per_iteration"] = params.model_dump(mode="json", exclude_none=True)["spin"][
            "per_iteration"
        ]
        sys.stdout.write(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        return 0
    rows = describe_fields(params)
    header = ("key", "value", "allowed", "meaning")
    table = []
    for row in rows:
        value, default = _show(row["value"]), _show(row["default"])
        meaning = row["description"]
        if value != default:
            meaning += f" (default: {default})"
        table.append((row["key"], value, row["allowed"], meaning))
    widths = [max(len(header[i]), *(len(r[i]) for r in table)) for i in range(3)]
    widths[1:] = [min(width, 28) for width in widths[1:]]  # longer values push their line on
    print(f"# {what}; `spinflow params --help` for other views")
    for cells in (header, *table):
        line = "  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(cells[:3]))
        print(f"{line}  {cells[3]}".rstrip())
    return 0


def _cmd_pipeline(args) -> int:
    from spinflow import pipeline

    params = load_params(args.params)
    if args.action == "write":
        from spinflow.validation import check_references

        check_references(params)
        path = pipeline.write(params, args.dvc_file)
        print(f"wrote {path} ({params.spin.iterations} iterations)")
        return 0
    problem = pipeline.check(params, args.dvc_file)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"{args.dvc_file}: matches {args.params}")
    return 0


def _cmd_worker(args) -> int:
    from spinflow.launch import worker

    return worker(load_params(args.params), args.stage, args.machine_rank)


def _cmd_launch(args) -> int:
    from spinflow.launch import run

    if len(args.args) < 4 or args.args[0] != "--config_file":
        print("error: usage: spinflow launch --config_file CONFIG SCRIPT STAGE …", file=sys.stderr)
        return 2
    return run(args.args, stage=args.args[3])


def _cmd_benchmark(args) -> int:
    if args.sandbox:
        from spinflow import sandbox

        sandbox.benchmark_sandbox()
        return 0
    from spinflow.benchmark import run_benchmark

    params = load_params(args.params)
    changes = {
        "engine": args.engine,
        "dtype": args.dtype,
        "batch_size": args.generate_batch,
        "max_new_tokens": args.max_new_tokens,
    }
    for key, value in changes.items():
        if value is not None:
            setattr(params.generate, key, value)
    run_benchmark(
        params,
        model_dir=args.model,
        pairs=args.pairs,
        pairs_file=args.pairs_file,
        compare_trl=not args.no_trl,
        prompts=args.prompts,
        compare_hf=not args.no_hf,
        train=not args.generate_only,
        repeats=args.repeats,
    )
    return 0


def _cmd_doctor(args) -> int:
    from spinflow.doctor import main as doctor

    return doctor(load_params(args.params), args.params, as_json=args.json)


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from spinflow.io import write_json
    from spinflow.recipes.evaluate import evaluate_checkpoints

    params = load_params(args.params)
    results = evaluate_checkpoints(
        params, [Path(m) for m in args.models], args.split, Path(args.data)
    )
    print(f"| model | {args.split} examples | verifier pass rate [95% CI] | exact match [95% CI] |")
    print("|---|---:|---:|---:|")
    for r in results:
        cells = (r["num_examples"], r["verifier_pass_rate_ci"], r["exact_match_ci"])
        print(f"| {r['model']} | " + " | ".join(map(str, cells)) + " |")
    if args.out:
        write_json(Path(args.out), results)
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinflow",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    params_help = f"params file (default: {PARAMS_FILE})"
    parser.add_argument("--params", default=PARAMS_FILE, help=params_help)
    # the same option after the command (`spinflow validate --params x.yaml`); SUPPRESS keeps
    # the value given before the command when it is not repeated
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=argparse.SUPPRESS, help=params_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    sub.add_parser(
        "validate",
        parents=[common],
        help="check params.yaml: every key and value, and the files it names",
    ).set_defaults(fn=_cmd_validate)
    p = sub.add_parser(
        "params",
        parents=[common],
        help="every parameter: current value, allowed values, meaning",
        description="Every parameter with its value in the params file (or its default), what "
        "it accepts and what it means; values that differ from the default show the default.",
    )
    p.add_argument("--defaults", action="store_true", help="show the defaults, not the file")
    p.add_argument("--yaml", action="store_true", help="print a complete params file instead")
    p.set_defaults(fn=_cmd_params)
    p = sub.add_parser(
        "pipeline",
        parents=[common],
        help="render dvc.yaml from params.yaml, or check that they agree",
    )
    p.add_argument("action", choices=["write", "check"])
    p.add_argument("--dvc-file", default="dvc.yaml")
    p.set_defaults(fn=_cmd_pipeline)
    b = sub.add_parser(
        "benchmark",
        parents=[common],
        help="measure generation and training speed for the current params",
    )
    b.add_argument(
        "--model", default=None, help="checkpoint dir (default: models/base, else a tiny model)"
    )
    b.add_argument("--pairs", type=int, default=16, help="training pairs to time")
    b.add_argument(
        "--pairs-file",
        default=None,
        help="pairs.jsonl to train on (default: generate answers to built-in prompts)",
    )
    b.add_argument(
        "--no-trl", action="store_true", help="skip the comparison with TRL's DPOTrainer"
    )
    b.add_argument(
        "--sandbox", action="store_true", help="time only the sandbox for model-written code"
    )
    b.add_argument("--prompts", type=int, default=64, help="built-in prompts to answer")
    b.add_argument("--engine", choices=ENGINES, default=None, help="instead of generate.engine")
    b.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default=None,
        help="instead of generate.dtype",
    )
    b.add_argument(
        "--generate-batch", type=int, default=None, help="instead of generate.batch_size"
    )
    b.add_argument(
        "--max-new-tokens", type=int, default=None, help="instead of generate.max_new_tokens"
    )
    b.add_argument("--no-hf", action="store_true", help="skip the comparison with HF generate")
    b.add_argument("--generate-only", action="store_true", help="time generation only")
    b.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="alternating timed runs of generation and HF generate; the medians are reported",
    )
    b.set_defaults(fn=_cmd_benchmark)
    e = sub.add_parser(
        "evaluate",
        parents=[common],
        help="evaluate checkpoints on a prepared split (val: choose settings off the test split)",
        description="Greedy answers of each checkpoint to one prepared split, scored as the "
        "eval stages score the test split (eval.*, prompt.*, generate.engine), with 95%% "
        "bootstrap intervals. Writes nothing in the pipeline.",
    )
    e.add_argument("models", nargs="+", help="checkpoint directories")
    e.add_argument("--split", default="val", help="prepared split (default: val)")
    e.add_argument("--data", default="data/prepared", help="prepared data directory")
    e.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(fn=_cmd_evaluate)
    d = sub.add_parser(
        "doctor",
        parents=[common],
        help="check this machine before a long run: devices, engines, sandbox, accelerate "
        "config, a smoke test",
        description="A line each, PASS, FAIL or SKIP and why: the devices stages run on and "
        "their bf16 support, the generation engines usable here, the sandbox layers, the "
        "accelerate configs params.yaml names, and on each device a tiny random model answering "
        "through each usable engine (log-probs checked against training's) and one SPIN "
        "training step in the precision bf16: auto picks. Exit status 1 if any check failed.",
    )
    d.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    d.set_defaults(fn=_cmd_doctor)
    w = sub.add_parser(
        "worker",
        parents=[common],
        help="run a stage on another machine of a multi-machine accelerate config",
        description="On a machine other than the one running `dvc repro`, in the same project "
        "folder on a shared filesystem: run STAGE (as dvc.yaml has it) as this machine's rank, "
        "so that it joins the stage's processes on the first machine.",
    )
    w.add_argument("stage", help="the stage, e.g. train_iter_0")
    w.add_argument("--machine-rank", type=int, required=True, help="this machine: 1, 2, …")
    w.set_defaults(fn=_cmd_worker)
    launch = sub.add_parser(
        "launch",
        help="(in dvc.yaml) accelerate launch of a multi-machine stage",
        description="What dvc.yaml runs for a stage whose accelerate config names several "
        "machines: accelerate launch with the join timeout (SPINFLOW_JOIN_TIMEOUT seconds), "
        "one line when the other machines do not join.",
    )
    launch.add_argument(
        "args", nargs=argparse.REMAINDER, help="--config_file CONFIG SCRIPT STAGE …"
    )
    launch.set_defaults(fn=_cmd_launch)
    return parser


def _quiet_stdout() -> None:
    """stdout's reader went away (`spinflow params | head`): send what is left nowhere, so that
    flushing at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"] and argv[1:2] != ["--help"] and argv[1:2] != ["-h"]:
        # accelerate's options pass through untouched (argparse would take them for its own)
        return _cmd_launch(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        code = args.fn(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except SpinflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        error = cannot_write(exc.filename, exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

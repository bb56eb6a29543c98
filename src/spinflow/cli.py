"""The ``spinflow`` command: what users run outside DVC (stages run through :mod:`spinflow.runner`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from spinflow.config import PARAMS_FILE, describe_schema, load_params
from spinflow.engines import ENGINES
from spinflow.errors import SpinflowError
from spinflow.runner import configure_logging


def _cmd_validate(args) -> int:
    load_params(args.params)
    print(f"{args.params}: valid")
    return 0


def _cmd_params(args) -> int:
    rows = describe_schema()
    width = max(len(k) for k, _, _ in rows)
    for key, default, description in rows:
        print(f"{key:<{width}}  {default!r:<24}  {description}")
    return 0


def _cmd_pipeline(args) -> int:
    from spinflow import pipeline

    params = load_params(args.params)
    if args.action == "write":
        path = pipeline.write(params, args.dvc_file)
        print(f"wrote {path} ({params.spin.iterations} iterations)")
        return 0
    problem = pipeline.check(params, args.dvc_file)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"{args.dvc_file}: matches {args.params}")
    return 0


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
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spinflow", description=__doc__)
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("validate", help="validate params.yaml against the schema").set_defaults(
        fn=_cmd_validate
    )
    sub.add_parser("params", help="list every parameter with its default and meaning").set_defaults(
        fn=_cmd_params
    )
    p = sub.add_parser(
        "pipeline", help="render dvc.yaml from params.yaml, or check that they agree"
    )
    p.add_argument("action", choices=["write", "check"])
    p.add_argument("--dvc-file", default="dvc.yaml")
    p.set_defaults(fn=_cmd_pipeline)
    b = sub.add_parser(
        "benchmark", help="measure generation and training speed for the current params"
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
    b.set_defaults(fn=_cmd_benchmark)

    args = parser.parse_args(argv)
    configure_logging()
    try:
        return args.fn(args)
    except SpinflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

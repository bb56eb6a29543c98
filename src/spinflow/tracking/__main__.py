"""``python -m spinflow.tracking uri|sync [--params params.yaml]``.

``uri`` prints where runs go (without a password); ``sync`` logs every pipeline output on disk
into MLflow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from spinflow.config import PARAMS_FILE, load_params
from spinflow.errors import SpinflowError
from spinflow.tracking import redact, sync, tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spinflow.tracking",
        description="uri: print the tracking URI; sync: log every pipeline output on disk.",
    )
    parser.add_argument("action", choices=["uri", "sync"])
    parser.add_argument("--params", default=PARAMS_FILE)
    args = parser.parse_args(argv)
    if args.action == "uri":
        print(redact(tracking_uri()))
        return 0
    logging.basicConfig(level=os.environ.get("SPINFLOW_LOG_LEVEL", "INFO"))
    try:
        sync(load_params(args.params))
    except SpinflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"synced to {redact(tracking_uri())}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

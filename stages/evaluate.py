"""DVC stages eval_sft, eval_iter_<k>, eval_sft_extra: held-out metrics of one model."""

from spinflow.cli import run_stage
from spinflow.steps import evaluate


def _arguments(parser):
    parser.add_argument(
        "--model", dest="name", required=True, help='"sft", "iter_<k>" or "sft_extra"'
    )


if __name__ == "__main__":
    run_stage("evaluate", evaluate, add_arguments=_arguments)

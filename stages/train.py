"""DVC stages train_iter_<k>: θk+1 learns to tell real answers from θk's."""

from spinflow.cli import run_stage
from spinflow.steps import train


def _arguments(parser):
    parser.add_argument("--iteration", dest="k", type=int, required=True, help="SPIN iteration k")


if __name__ == "__main__":
    run_stage("train", train, add_arguments=_arguments)

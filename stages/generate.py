"""DVC stages generate_iter_<k>: θk answers every prompt of the SPIN pool."""

from spinflow.cli import run_stage
from spinflow.steps import generate


def _arguments(parser):
    parser.add_argument("--iteration", dest="k", type=int, required=True, help="SPIN iteration k")


if __name__ == "__main__":
    run_stage("generate", generate, add_arguments=_arguments)

"""DVC stages generate_iter_<k>: θk answers every prompt of the SPIN pool."""

from spinflow.methods.spin.generate import generate
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("generate", generate)

"""DVC stage prepare_model: the base model as a plain HF checkpoint in models/base."""

from spinflow.cli import run_stage
from spinflow.steps import prepare_model

if __name__ == "__main__":
    run_stage("prepare_model", prepare_model)

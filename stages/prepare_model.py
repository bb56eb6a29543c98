"""DVC stage prepare_model: the base model as a plain HF checkpoint in models/base."""

from spinflow.recipes.prepare import prepare_model
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("prepare_model", prepare_model)

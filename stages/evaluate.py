"""DVC stages eval_sft, eval_iter_<k>, eval_sft_extra(_compute), eval_lobass…: held-out metrics of
one model."""

from spinflow.recipes.evaluate import evaluate
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("evaluate", evaluate)

"""DVC stage autoif_evaluate: held-out instruction-following accuracy of one model (AutoIF)."""

from spinflow.methods.autoif.stages import autoif_evaluate
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("autoif_evaluate", autoif_evaluate)

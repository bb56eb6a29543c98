"""DVC stage autoif_instructions: the instruction library, its unusable items dropped (AutoIF)."""

from spinflow.methods.autoif.stages import autoif_instructions
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("autoif_instructions", autoif_instructions)

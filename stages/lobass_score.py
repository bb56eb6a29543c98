"""DVC stage lobass_score: how much fine-tuning lowered each SFT example's loss (LoBaSS)."""

from spinflow.methods.lobass.stages import lobass_score
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("lobass_score", lobass_score)

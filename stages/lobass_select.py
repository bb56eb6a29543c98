"""DVC stage lobass_select: the most learnable SFT examples, and a random control of equal size."""

from spinflow.methods.lobass.stages import lobass_select
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("lobass_select", lobass_select)

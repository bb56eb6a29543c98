"""DVC stage sft_extra: θ0 trained further with plain SFT for as many steps as SPIN used."""

from spinflow.cli import run_stage
from spinflow.steps import sft_extra

if __name__ == "__main__":
    run_stage("sft_extra", sft_extra)

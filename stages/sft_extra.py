"""DVC stage sft_extra: θ0 trained further with plain SFT for as many steps as SPIN used."""

from spinflow.recipes.sft import sft_extra
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("sft_extra", sft_extra)

"""DVC stage sft: θ0, the base model fine-tuned on the SFT split."""

from spinflow.methods.sft.stages import sft
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("sft", sft)

"""DVC stage sft: θ0, the base model fine-tuned on the SFT split."""

from spinflow.cli import run_stage
from spinflow.steps import sft

if __name__ == "__main__":
    run_stage("sft", sft)

"""DVC stages sft_lobass, sft_random: the base model fine-tuned on one selection of the SFT data."""

from spinflow.methods.lobass.stages import sft_selection
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("sft_selection", sft_selection)

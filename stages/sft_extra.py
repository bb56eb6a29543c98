"""DVC stages sft_extra and sft_extra_compute: θ0 trained further with plain SFT for as many
optimizer steps, or as much compute, as SPIN used."""

from spinflow.methods.spin.baselines import sft_extra
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("sft_extra", sft_extra)

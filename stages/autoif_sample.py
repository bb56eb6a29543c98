"""DVC stage autoif_sample: θk samples responses scored by their instruction's functions (AutoIF)."""

from spinflow.methods.autoif.stages import autoif_sample
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("autoif_sample", autoif_sample)

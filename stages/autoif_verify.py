"""DVC stage autoif_verify: instruction functions cross-validated on their cases in the sandbox (AutoIF)."""

from spinflow.methods.autoif.stages import autoif_verify
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("autoif_verify", autoif_verify)

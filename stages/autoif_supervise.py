"""DVC stage autoif_supervise: new instructions, functions and cases written by a supervision model (AutoIF)."""

from spinflow.methods.autoif.stages import autoif_supervise
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("autoif_supervise", autoif_supervise)

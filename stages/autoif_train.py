"""DVC stage autoif_train: DPO against θk on passing vs failing samples (AutoIF)."""

from spinflow.methods.autoif.stages import autoif_train
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("autoif_train", autoif_train)

"""DVC stage autoif_queries: instructions attached to SFT and test prompts, held-out instructions set aside (AutoIF)."""

from spinflow.methods.autoif.stages import autoif_queries
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("autoif_queries", autoif_queries)

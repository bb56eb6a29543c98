"""DVC stage prepare_data: the SFT split, the SPIN prompt pool and the test split in data/prepared."""

from spinflow.recipes.prepare import prepare_data
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("prepare_data", prepare_data)

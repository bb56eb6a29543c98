"""DVC stage prepare_data: the SFT split, the SPIN prompt pool and the test split in data/prepared."""

from spinflow.cli import run_stage
from spinflow.steps import prepare_data

if __name__ == "__main__":
    run_stage("prepare_data", prepare_data)

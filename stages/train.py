"""DVC stages train_iter_<k>: θk+1 learns to tell real answers from θk's."""

from spinflow.methods.spin.train import train
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("train", train)

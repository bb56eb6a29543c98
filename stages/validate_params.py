"""DVC stage validate_params: all of params.yaml checked before any other stage runs.

It depends on params.yaml as a whole file, so any change re-runs it (an unknown or misspelt key
included), and writes nothing another stage depends on.
"""

from spinflow.runner import run_stage
from spinflow.validation import validate_stage

if __name__ == "__main__":
    run_stage("validate_params", validate_stage)

"""Loaded at start-up by the stage processes of tests/test_resume.py (through PYTHONPATH).

Once the training state of optimizer step ``SPINFLOW_TEST_KILL_AT_STEP`` is saved, the main
process sends itself SIGKILL, as an out-of-memory killer or a lost machine would; it does so once
(``SPINFLOW_TEST_KILL_MARKER`` records it), so the run started again finishes.
"""

import os
import signal
from pathlib import Path

if os.environ.get("SPINFLOW_TEST_KILL_AT_STEP"):
    import spinflow.training as training

    _save = training._save_resume
    _step = int(os.environ["SPINFLOW_TEST_KILL_AT_STEP"])
    _marker = Path(os.environ["SPINFLOW_TEST_KILL_MARKER"])

    def _save_then_die(resume, accelerator, scheduler, result, on_epoch):
        _save(resume, accelerator, scheduler, result, on_epoch)
        if result.steps >= _step and accelerator.is_main_process and not _marker.exists():
            _marker.write_text(str(result.steps))
            os.kill(os.getpid(), signal.SIGKILL)

    training._save_resume = _save_then_die

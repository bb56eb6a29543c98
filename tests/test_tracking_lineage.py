"""What a run came from: DVC's recorded dependency hashes (spinflow.tracking.lineage)."""

from __future__ import annotations

from spinflow.tracking.lineage import lock_hashes


def test_lock_hashes_for_finished_and_running_stages(tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        "  train_iter_0:\n    deps:\n"
        "    - {path: models/theta_0, hash: md5, md5: aaa.dir}\n"
        "    - {path: stages/train.py, hash: md5, md5: bbb}\n"
        "    outs:\n    - {path: models/theta_1, hash: md5, md5: ccc.dir}\n"
        "  train_iter_1:\n    deps:\n    - {path: models/theta_1, hash: md5, md5: old.dir}\n"
    )
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train_iter_1:\n    cmd: x\n    deps:\n    - stages/train.py\n"
        "    - models/theta_1\n"
    )
    finished = lock_hashes("train_iter_0", running="eval_iter_0", root=tmp_path)
    assert finished == {"models/theta_0": "aaa.dir", "stages/train.py": "bbb"}
    running = lock_hashes("train_iter_1", running="train_iter_1", root=tmp_path)
    assert running == {"models/theta_1": "ccc.dir"}  # not the stale entry of its own last run

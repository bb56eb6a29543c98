"""Shared test fixtures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Test files that take longest, longest first (measured on 2 cores): pytest-xdist hands them
# out before the others, so the many short files fill the end of the run on every worker instead
# of one long file keeping a worker busy while the others have nothing left to do.
LONGEST_FIRST = (
    "test_e2e_dvc.py",
    "test_recipes_autoif.py",
    "test_e2e_hardening.py",
    "test_experiments.py",
    "test_tracking_faults.py",
    "test_pipeline.py",
    "test_distributed.py",
    "test_mlflow_server.py",
    "test_resume.py",
    "test_remote.py",
    "test_recipes_autoif_supervised.py",
    "test_tracking_store.py",
    "test_machines.py",
    "test_harness.py",
    "test_tracking.py",
    "test_engines.py",
    "test_sandbox.py",
    "test_report.py",
    "test_doctor.py",
    "test_cli.py",
    "test_tracking_live.py",
)


def pytest_configure(config) -> None:
    """With several pytest-xdist workers, each worker's torch gets its share of the cores
    (stage processes the tests start use one thread: see pipeline_env). Files are handed to
    workers in the order of LONGEST_FIRST, not pytest-xdist's (most tests first)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items) -> None:
    """The files of LONGEST_FIRST first, in its order; the others after them as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def shared_path(tmp_path_factory, name: str) -> Path:
    """``name`` in the temporary folder of this test session that all its pytest-xdist workers
    share (the session's own folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / name


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory) -> Path:
    """bf16: auto keeps its decisions in a cache of this test session, never in the home
    directory; stage processes started by tests inherit it (tests that need their own cache set
    SPINFLOW_CACHE_DIR to their tmp_path). One cache for all pytest-xdist workers, as for the
    tiny pipeline they share: a stage re-run in a copy of it decides as its first run did."""
    from spinflow.precision import CACHE_ENV

    path = shared_path(tmp_path_factory, "spinflow-cache")
    path.mkdir(exist_ok=True)
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def tiny_checkpoint_session(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint built once per test session; do not modify it."""
    from spinflow.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture
def tiny_checkpoint(tiny_checkpoint_session, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may change."""
    return Path(shutil.copytree(tiny_checkpoint_session, tmp_path / "tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer_session(tiny_checkpoint_session):
    """The tiny checkpoint's tokenizer, loaded once; do not modify it."""
    from spinflow.models import load_tokenizer

    return load_tokenizer(tiny_checkpoint_session)


@pytest.fixture(scope="session")
def tiny_model_session(tiny_checkpoint_session):
    """The tiny model in eval mode, loaded once, for tests that only run it (never train it)."""
    from spinflow.models import load_model

    return load_model(tiny_checkpoint_session).eval()


@pytest.fixture
def tiny_model(tiny_checkpoint_session):
    """A freshly loaded tiny model that a test may train."""
    from spinflow.models import load_model

    return load_model(tiny_checkpoint_session)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model work on one thread (restored afterwards): tiny matrices gain
    nothing from more threads, and on a busy 2-core machine they run several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The whole pipeline on the tiny model as a Git + DVC repository, built once per session

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEVICE_HOOK = Path(__file__).parent / "device_hook"
STAGE_RAN = re.compile(r"Running stage '([^']+)'")
STAGE_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")
OUTPUT_DIRS = ("models", "data", "generated", "eval")
TINY_PIPELINE = {
    "model": {"source": "tiny"},
    "data": {"num_sft": 8, "num_val": 4, "num_pool": 8, "num_test": 8},
    "sft": {"batch_size": 4, "epochs": 1},  # the validation curve, one point
    # float32: the batch-invariant path, which the tests of byte-equal files rely on
    "generate": {"max_new_tokens": 8, "dtype": "float32"},
    "spin": {"iterations": 1, "train": {"batch_size": 4}},
    "sft_extra": {"enabled": False},
    "eval": {"max_new_tokens": 8},
    "tracking": {"enabled": False},
}


def _merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def pipeline_env() -> dict[str, str]:
    """What the stage and DVC processes of a test repository run with: this venv first on PATH,
    offline, one thread, no telemetry, a fixed Git identity."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TQDM_DISABLE": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "spinflow tests",
        "GIT_AUTHOR_EMAIL": "tests@spinflow.invalid",
        "GIT_COMMITTER_NAME": "spinflow tests",
        "GIT_COMMITTER_EMAIL": "tests@spinflow.invalid",
        # records where each stage runs its models (tests/test_devices.py)
        "PYTHONPATH": str(DEVICE_HOOK),
    }
    for name in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


class DvcRepo:
    """A Git + DVC repository of the pipeline, driven through the ``git``/``dvc`` commands."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.env = pipeline_env() if env is None else env

    def run(self, *cmd: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
        """Run a command in the repository; fail the test with its output when it fails.

        The repository's own ``src`` comes first on PYTHONPATH, so stages run the code that DVC
        hashes as their dependencies, not the editable install (which may change meanwhile)."""
        full_env = {**self.env, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.root / "src"), full_env.get("PYTHONPATH")) if p
        )
        proc = subprocess.run(
            cmd,
            cwd=self.root,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, (
            f"`{' '.join(cmd)}` in {self.root} exited {proc.returncode}:\n{output[-6000:]}"
        )
        return output

    @staticmethod
    def ran(output: str) -> set[str]:
        """Stages whose command ran, from the output of dvc repro / dvc exp run."""
        return set(STAGE_RAN.findall(output))

    @staticmethod
    def restored(output: str) -> set[str]:
        """Stages whose outputs came from the run cache instead of running."""
        return set(STAGE_RESTORED.findall(output))

    def clone(self, dest: Path) -> DvcRepo:
        """``git clone`` of the committed state: no DVC cache, no outputs."""
        self.run("git", "clone", "-q", str(self.root), str(dest))
        return DvcRepo(dest, dict(self.env))

    def copy(self, dest: Path) -> DvcRepo:
        """A full copy: working tree, Git history and DVC cache."""
        dvc_tmp = self.root / ".dvc"

        def skip_dvc_tmp(folder: str, names: list[str]) -> list[str]:
            return ["tmp"] if Path(folder) == dvc_tmp else []

        shutil.copytree(self.root, dest, symlinks=True, ignore=skip_dvc_tmp)
        return DvcRepo(dest, dict(self.env))

    def output_digests(self, dirs: tuple[str, ...] = OUTPUT_DIRS) -> dict[str, str]:
        """sha256 of every file under the output folders, by path relative to the root."""
        digests = {}
        for folder in dirs:
            for path in sorted((self.root / folder).rglob("*")):
                if path.is_file():
                    rel = path.relative_to(self.root).as_posix()
                    digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests

    def json(self, relative: str):
        return json.loads((self.root / relative).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_dvc_repo(tmp_path_factory) -> DvcRepo:
    """The project's stages and params (with the tiny model and one SPIN iteration), run once
    with ``dvc repro`` and committed with its dvc.lock: built by the first pytest-xdist worker
    that needs it, the others wait for it and share it. Read-only: copy() or clone() it."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from filelock import FileLock

    folder = shared_path(tmp_path_factory, "tiny-pipeline")
    built = folder / "built"
    with FileLock(f"{folder}.lock"):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            _build_tiny_pipeline(DvcRepo(folder / "repo"))
            built.touch()
    return DvcRepo(folder / "repo")


def _build_tiny_pipeline(repo: DvcRepo) -> None:
    repo.root.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PROJECT_ROOT / "stages", repo.root / "stages", ignore=ignore)
    shutil.copytree(
        PROJECT_ROOT / "src" / "spinflow", repo.root / "src" / "spinflow", ignore=ignore
    )
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    (repo.root / "params.yaml").write_text(
        yaml.safe_dump(_merge(raw, TINY_PIPELINE), sort_keys=False), encoding="utf-8"
    )
    repo.run("git", "init", "-q", ".")
    repo.run("dvc", "init", "-q")
    repo.run("dvc", "config", "core.analytics", "false")
    repo.run("spinflow", "pipeline", "write")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "tiny pipeline")
    repo.run("dvc", "repro", timeout=600)
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "dvc repro")


def make_optim(**changes):
    """Optimisation settings for unit tests: AdamW 1e-3, batch 8, one epoch, constant rate,
    float32."""
    from spinflow.config import OptimParams

    base = {
        "bf16": False,
        "learning_rate": 1e-3,
        "epochs": 1,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "optimizer": "adamw",
        "scheduler": "constant",
        "warmup_ratio": 0.0,
    }
    return OptimParams(**{**base, **changes})


def can_mount_tmpfs() -> bool:
    """Whether `unshare -rm` can mount a tmpfs here (user namespaces): the full-disk and
    read-only tests need it."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_launch_config(path: Path, port: int, *, machines: int = 1) -> Path:
    """An accelerate config at ``path`` for 2 CPU processes in all, on ``machines`` "machines"
    of 127.0.0.1: MULTI_GPU makes accelerate start them with torchrun, which talks gloo
    without CUDA."""
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": machines,
        "num_processes": 2,
        "machine_rank": 0,
        "main_process_ip": "127.0.0.1",
        "main_process_port": port,
        "mixed_precision": "no",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path

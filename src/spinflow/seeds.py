"""Seeds derived from the run seed: stable across Python runs, machines and batch sizes."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and a key (a prompt's id, a stage's name)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage's training or sampling, within torch's 31-bit range."""
    return derive_seed(seed, stage) % (2**31)

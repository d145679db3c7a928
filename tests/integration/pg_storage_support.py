"""Shared by the PostgreSQL storage tests: the run they all store batches for.

Test modules import this by name (pytest puts their folder on sys.path); it is not a
conftest, so the name never means another folder's module.
"""

from __future__ import annotations

from coderepair.coordinator.storage import repo
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.models import Run

T0 = 1_700_000_000_000


def ensure_test_run(db: Database, group_size: int) -> Run:
    """Run "r1" (a throwaway trainer key, policy lag 2) in `db`, created at T0."""
    return repo.ensure_run(
        db,
        repo.RunSpec(
            run_id="r1",
            trainer_public_key=b"\x01" * 32,
            base_model_id="tiny",
            tokenizer_sha256="a" * 64,
            reward_spec_json="{}",
            reward_spec_hash="b" * 64,
            sampling={},
            group_size=group_size,
            max_policy_lag=2,
        ),
        T0,
    )

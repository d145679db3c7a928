"""The audit and dashboard settings, the submit counters, and the model auditor's refusal
to blame a worker for its own set-up failures (a missing model, an unknown version).

The model itself is exercised end to end in
tests/integration/coordinator/test_model_auditor.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coderepair.coordinator.config import ConfigError, CoordinatorConfig, load_config
from coderepair.coordinator.service.audit import AuditRequest
from coderepair.coordinator.service.auditor import (
    AuditorSetupError,
    ModelAuditor,
    PolicyLoader,
    policy_chain,
)
from coderepair.coordinator.service.context import ServiceContext
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.migrate import upgrade_to_head
from coderepair.coordinator.storage.models import AuditKind
from coderepair.coordinator.storage.objects import LocalObjectStore
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.rollout import RolloutRecord
from coderepair.v1 import common_pb2, worker_pb2

R = common_pb2.RejectionReason


# ---------------------------------------------------------------- configuration


def test_auditor_defaults_to_the_model_when_a_policy_dir_is_given(tmp_path: Path) -> None:
    assert load_config().audit.resolved_auditor() == "consistency"
    path = tmp_path / "coordinator.toml"
    path.write_text(
        '[audit]\npolicy_dir = "models/base"\nweights_cache_dir = "cache"\nkinds = ["proof"]\n'
    )
    config = load_config(path)
    assert config.audit.resolved_auditor() == "model"
    assert config.audit.policy_dir == tmp_path / "models/base"  # relative to the file
    assert config.audit.weights_cache_dir == tmp_path / "cache"


def test_model_auditor_without_a_policy_dir_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('[audit]\nauditor = "model"\n')
    with pytest.raises(ConfigError, match=r"audit: .*needs audit.policy_dir"):
        load_config(path)


def test_dashboard_table_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text("[dashboard]\nport = 0\nrefresh_s = 1.0\n[dashboard.window]\nbucket_s = 5\n")
    config = load_config(path)
    assert config.dashboard.port == 0 and config.dashboard.window.bucket_s == 5
    path.write_text('[dashboard]\nhost = "dashboard.example"\n')
    with pytest.raises(ConfigError, match=r"dashboard.host: .*not an IP address"):
        load_config(path)
    path.write_text("[dashboard]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"dashboard.prot: unknown setting"):
        load_config(path)


# ---------------------------------------------------------------- submit counters


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    db = Database.open(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade_to_head(db.engine)
    executor = ThreadPoolExecutor(max_workers=1)
    yield ServiceContext(
        config=CoordinatorConfig(),
        db=db,
        objects=LocalObjectStore(tmp_path / "objects"),
        runs={},
        executor=executor,
    )
    executor.shutdown()
    db.close()


def _record(n_tokens: int) -> RolloutRecord:
    return RolloutRecord(
        task_id="t",
        lease_id="l",
        run_id="r",
        worker_key="ab" * 32,
        policy_version=1,
        sample_index=0,
        seed=1,
        prompt_ids=[1],
        completion_ids=list(range(n_tokens)),
        behaviour_logprobs=[-0.1] * n_tokens,
        completion_text="x",
        patch="",
        reward=-1.0,
        reward_components={"malformed": -1.0},
        reward_spec_hash="0" * 64,
        test_log_sha256="0" * 64,
        proof=b"",
        timings={},
        created_at_ms=1,
    )


def test_submit_counters_count_each_batch_once(ctx: ServiceContext) -> None:
    registry = ctx.metrics.registry
    accepted = worker_pb2.SubmitRolloutsResponse(accepted=True, batch_id="b")
    ctx.record_submit(accepted, 0.01, rollouts=2, tokens=7)
    replay = worker_pb2.SubmitRolloutsResponse(accepted=True, replayed_response=True)
    ctx.record_submit(replay, 0.01, rollouts=1, tokens=3)
    refused = worker_pb2.SubmitRolloutsResponse(
        rejection=common_pb2.Rejection(reason=R.REJECTION_REASON_DUPLICATE)
    )
    ctx.record_submit(refused, 0.02)
    ctx.record_submit(worker_pb2.SubmitRolloutsResponse(), 0.03)  # no reason: an error

    assert registry.get_sample_value("coderepair_batches_accepted_total") == 1
    assert registry.get_sample_value("coderepair_rollouts_ingested_total") == 2
    assert registry.get_sample_value("coderepair_completion_tokens_ingested_total") == 7
    assert (
        registry.get_sample_value("coderepair_batches_rejected_total", {"reason": "DUPLICATE"}) == 1
    )
    for outcome in ("accepted", "rejected", "error"):
        count = registry.get_sample_value("coderepair_submit_seconds_count", {"outcome": outcome})
        assert count == 1, outcome


def test_contexts_do_not_share_counters(ctx: ServiceContext, tmp_path: Path) -> None:
    other = ServiceContext(
        config=ctx.config, db=ctx.db, objects=ctx.objects, runs={}, executor=ctx.executor
    )
    ctx.metrics.record_leases(2)
    assert other.metrics.registry.get_sample_value("coderepair_leases_issued_total") == 0


# ---------------------------------------------------------------- set-up failures


def test_unknown_policy_version_is_a_setup_error(ctx: ServiceContext) -> None:
    with pytest.raises(AuditorSetupError, match="never published"):
        policy_chain(ctx.db, "r1", 3)


@pytest.mark.parametrize("kind", list(AuditKind))
def test_a_missing_model_is_an_error_verdict_never_a_failure(
    tmp_path: Path, kind: AuditKind
) -> None:
    def no_chain(run_id: str, version: int) -> list[object]:
        raise AssertionError("the base model is checked first")

    loader = PolicyLoader(tmp_path / "no-model", no_chain, {"r": "ab" * 32}, tmp_path / "w")  # type: ignore[arg-type]
    auditor = ModelAuditor(loader, lambda: pytest.fail("no sandbox is needed"))
    from coderepair.coordinator.service.scheduler import PooledTask

    result = auditor(
        AuditRequest(
            job_id="j",
            kind=kind,
            batch_id="b",
            worker_id="w",
            run_id="r",
            policy_version=1,
            reward_spec=RewardSpec(),
            records=[_record(2)],
            tasks={"t": PooledTask("t", "", (1,), b"{}")},
        )
    )
    assert result.verdict == "error"
    assert "config.json" in result.detail

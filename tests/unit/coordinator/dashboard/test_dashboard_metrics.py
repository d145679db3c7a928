"""Prometheus metrics: the service's counters and the database snapshot as gauges, on a
registry of the test's own (the process-wide default registry is never touched)."""

from __future__ import annotations

import pytest
from dashboard_world import T0, make_world
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from coderepair.coordinator.dashboard.config import StatsWindow
from coderepair.coordinator.dashboard.metrics import (
    REJECTION_REASONS,
    CoordinatorMetrics,
    MetricsLabelError,
    StatsCollector,
)
from coderepair.coordinator.dashboard.stats import StatsSnapshot, collect_stats
from coderepair.coordinator.storage.db import Database

WINDOW = StatsWindow(history_s=60, bucket_s=10)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_service_counters_and_latency_histogram() -> None:
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    metrics.record_accepted(seconds=0.004, rollouts=8, tokens=400)
    metrics.record_accepted(seconds=0.2, rollouts=8, tokens=100)
    metrics.record_rejected("DUPLICATE", seconds=0.001)
    metrics.record_voided("AUDIT_PROOF")
    metrics.record_error(seconds=0.5)
    metrics.record_audit("proof", "failed")
    metrics.record_leases(3)
    got = _samples(registry)
    assert got[("coderepair_rollouts_ingested_total", ())] == 16
    assert got[("coderepair_completion_tokens_ingested_total", ())] == 500
    assert got[("coderepair_batches_accepted_total", ())] == 2
    assert got[("coderepair_batches_rejected_total", (("reason", "DUPLICATE"),))] == 1
    assert got[("coderepair_batches_voided_total", (("reason", "AUDIT_PROOF"),))] == 1
    assert got[("coderepair_audit_verdicts_total", (("kind", "proof"), ("verdict", "failed")))] == 1
    assert got[("coderepair_leases_issued_total", ())] == 3
    accepted = (("outcome", "accepted"),)
    assert got[("coderepair_submit_seconds_count", accepted)] == 2
    assert got[("coderepair_submit_seconds_bucket", (("le", "0.005"), *accepted))] == 1
    assert got[("coderepair_submit_seconds_bucket", (("le", "0.25"), *accepted))] == 2
    assert got[("coderepair_submit_seconds_count", (("outcome", "error"),))] == 1
    # Nothing leaked into the process-wide registry.
    assert REGISTRY.get_sample_value("coderepair_batches_accepted_total") is None


@pytest.mark.parametrize(
    "record",
    [
        lambda m: m.record_rejected("REJECTION_REASON_DUPLICATE", seconds=0.1),
        lambda m: m.record_rejected("duplicate", seconds=0.1),
        lambda m: m.record_rejected("DUPLICATE", seconds=-1.0),
        lambda m: m.record_rejected("DUPLICATE", seconds=float("nan")),
        lambda m: m.record_voided("<script>"),
        lambda m: m.record_accepted(seconds=0.1, rollouts=-1, tokens=0),
        lambda m: m.record_audit("vibes", "passed"),
        lambda m: m.record_audit("proof", "pending"),
        lambda m: m.record_leases(-2),
    ],
)
def test_label_values_and_counts_outside_their_sets_are_refused(record: object) -> None:
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    with pytest.raises(MetricsLabelError):
        record(metrics)  # type: ignore[operator]
    # Nothing was recorded by the refused call.
    assert registry.get_sample_value(
        "coderepair_submit_seconds_count", {"outcome": "rejected"}
    ) in (
        None,
        0.0,
    )


def test_rejection_reasons_are_the_protocol_enum_without_prefix() -> None:
    assert {"DUPLICATE", "AUDIT_PROOF", "STRUCTURAL", "BANNED"} <= REJECTION_REASONS
    assert "UNSPECIFIED" not in REJECTION_REASONS


def test_two_instances_need_two_registries() -> None:
    registry = CollectorRegistry()
    CoordinatorMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        CoordinatorMetrics(registry)
    CoordinatorMetrics(CollectorRegistry())


def test_stats_collector_renders_the_snapshot(storage_db: Database) -> None:
    world = make_world(storage_db)
    alice, bob = world.worker("alice", 2), world.worker("bob", 3)
    world.accept(alice, [1.0, 0.0, 1.0, 0.0], T0)
    world.reject(bob, "STALE_POLICY", T0)
    registry = CollectorRegistry()
    registry.register(StatsCollector(lambda: collect_stats(storage_db, WINDOW, now_ms=T0 + 1_000)))
    got = _samples(registry)
    assert got[("coderepair_stats_up", ())] == 1
    assert got[("coderepair_workers_registered", ())] == 2
    assert got[("coderepair_workers_online", ())] == 2
    assert got[("coderepair_run_head_cursor", (("run", "r1"),))] == 4
    assert got[("coderepair_run_reward_mean", (("run", "r1"),))] == 0.5
    assert got[("coderepair_recent_batches", (("outcome", "ACCEPTED"),))] == 1
    assert got[("coderepair_recent_batches", (("outcome", "STALE_POLICY"),))] == 1
    assert got[("coderepair_batches_in_audit_window", ())] == 1


def test_a_database_error_is_stats_up_zero_not_a_failed_scrape() -> None:
    def broken() -> StatsSnapshot:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    registry = CollectorRegistry()
    CoordinatorMetrics(registry).record_leases()
    registry.register(StatsCollector(broken))
    got = _samples(registry)
    assert got[("coderepair_stats_up", ())] == 0
    assert got[("coderepair_leases_issued_total", ())] == 1
    assert ("coderepair_workers_online", ()) not in got

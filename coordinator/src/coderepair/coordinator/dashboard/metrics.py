"""Prometheus metrics of the coordinator, on a registry the caller owns.

Two sources, one registry (no global default registry, nothing at module level):
- `CoordinatorMetrics`: counters and histograms that only the running service can know
  (submit latency, batches by outcome, rollouts ingested, audit verdicts). The service
  owns one instance and calls its `record_*` methods. These are per process: with
  several replicas, sum them across replicas.
- `StatsCollector`: renders a `StatsSnapshot` of the database as gauges at scrape time
  (workers online, audit backlog, cursors, recent outcomes...). They describe the shared
  database, so every replica reports the same values: aggregate them with max(), not
  sum().

Label values are checked against closed sets (the protocol's rejection reasons, the
audit kinds and verdicts), so a bug or a hostile input can never blow up the number of
time series; an unknown value is a `MetricsLabelError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from coderepair.coordinator.dashboard.stats import (
    ACCEPTED,
    DashboardError,
    StatsSnapshot,
)
from coderepair.coordinator.storage.models import AuditKind, AuditState
from coderepair.v1 import common_pb2

__all__ = [
    "REJECTION_REASONS",
    "SUBMIT_LATENCY_BUCKETS",
    "CoordinatorMetrics",
    "MetricsLabelError",
    "StatsCollector",
]

_log = logging.getLogger(__name__)

_REASON_PREFIX = "REJECTION_REASON_"
REJECTION_REASONS: frozenset[str] = frozenset(
    name.removeprefix(_REASON_PREFIX)
    for name in common_pb2.RejectionReason.keys()  # noqa: SIM118 - protobuf enum wrapper
    if name != f"{_REASON_PREFIX}UNSPECIFIED"
)
"""Rejection reasons a batch can be refused for (common.proto, without the prefix)."""

SUBMIT_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Histogram bounds in seconds: fine below 100 ms, the p99 target at 200 workers."""

_VERDICTS = frozenset({AuditState.PASSED.value, AuditState.FAILED.value, AuditState.ERROR.value})
_KINDS = frozenset(k.value for k in AuditKind)


class MetricsLabelError(DashboardError):
    """A metric was recorded with a label value outside its closed set, or a bad count."""


def _reason(reason: str) -> str:
    if reason not in REJECTION_REASONS:
        raise MetricsLabelError(
            f"unknown rejection reason {reason!r}: record one of {sorted(REJECTION_REASONS)} "
            "(a RejectionReason name without the REJECTION_REASON_ prefix)"
        )
    return reason


def _count(name: str, value: int) -> int:
    if value < 0:
        raise MetricsLabelError(f"{name} must be >= 0, got {value}: counters only go up")
    return value


def _seconds(value: float) -> float:
    if not value >= 0:  # also refuses NaN
        raise MetricsLabelError(f"a latency must be a duration >= 0 seconds, got {value}")
    return value


class CoordinatorMetrics:
    """The service's own counters and histograms, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, *, namespace: str = "coderepair") -> None:
        self.registry = registry
        self.submit_seconds = Histogram(
            "submit_seconds",
            "Time from receiving a SubmitBatch to answering it, by outcome "
            "(accepted, rejected, error).",
            ["outcome"],
            namespace=namespace,
            buckets=SUBMIT_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batches_accepted = Counter(
            "batches_accepted",
            "Batches accepted (committed, in their audit window).",
            namespace=namespace,
            registry=registry,
        )
        self.batches_rejected = Counter(
            "batches_rejected",
            "Batches refused at submission, by rejection reason.",
            ["reason"],
            namespace=namespace,
            registry=registry,
        )
        self.batches_voided = Counter(
            "batches_voided",
            "Accepted batches voided later (failed audit, ban), by rejection reason.",
            ["reason"],
            namespace=namespace,
            registry=registry,
        )
        self.rollouts_ingested = Counter(
            "rollouts_ingested",
            "Samples of accepted batches, durably committed.",
            namespace=namespace,
            registry=registry,
        )
        self.tokens_ingested = Counter(
            "completion_tokens_ingested",
            "Completion tokens of accepted samples (the credit unit).",
            namespace=namespace,
            registry=registry,
        )
        self.audit_verdicts = Counter(
            "audit_verdicts",
            "Audit jobs finished, by kind (proof, sampling, reward) and verdict "
            "(passed, failed, error).",
            ["kind", "verdict"],
            namespace=namespace,
            registry=registry,
        )
        self.leases_issued = Counter(
            "leases_issued",
            "Leases handed out to workers.",
            namespace=namespace,
            registry=registry,
        )

    def record_accepted(self, *, seconds: float, rollouts: int, tokens: int) -> None:
        """A batch was accepted after `seconds`, with `rollouts` samples of `tokens`
        completion tokens in all. Call it only after the commit (acknowledged work)."""
        self.submit_seconds.labels("accepted").observe(_seconds(seconds))
        self.batches_accepted.inc()
        self.rollouts_ingested.inc(_count("rollouts", rollouts))
        self.tokens_ingested.inc(_count("tokens", tokens))

    def record_rejected(self, reason: str, *, seconds: float) -> None:
        """A batch was refused for `reason` (e.g. "DUPLICATE") after `seconds`."""
        label = _reason(reason)
        self.submit_seconds.labels("rejected").observe(_seconds(seconds))
        self.batches_rejected.labels(label).inc()

    def record_error(self, *, seconds: float) -> None:
        """A submission failed inside the coordinator (nothing written) after `seconds`."""
        self.submit_seconds.labels("error").observe(_seconds(seconds))

    def record_voided(self, reason: str) -> None:
        """An accepted batch was voided for `reason` (e.g. "AUDIT_PROOF", "BANNED")."""
        self.batches_voided.labels(_reason(reason)).inc()

    def record_audit(self, kind: str, verdict: str) -> None:
        """An audit job of `kind` finished with `verdict` (AuditKind/AuditState values)."""
        if kind not in _KINDS:
            raise MetricsLabelError(f"unknown audit kind {kind!r}: one of {sorted(_KINDS)}")
        if verdict not in _VERDICTS:
            raise MetricsLabelError(
                f"unknown audit verdict {verdict!r}: one of {sorted(_VERDICTS)}"
            )
        self.audit_verdicts.labels(kind, verdict).inc()

    def record_leases(self, count: int = 1) -> None:
        """`count` leases were handed out."""
        self.leases_issued.inc(_count("count", count))


class StatsCollector(Collector):
    """Gauges rendered from a database snapshot at each scrape.

    `snapshot` is called once per scrape, in the scraping thread (it may block on the
    database); give it a cached reader so that scrapes and open pages share queries.
    A database error is not a scrape error: the scrape answers with
    `<namespace>_stats_up 0` and the service's own metrics, and the error is logged.
    """

    def __init__(
        self, snapshot: Callable[[], StatsSnapshot], *, namespace: str = "coderepair"
    ) -> None:
        self._snapshot = snapshot
        self._ns = namespace

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields (registration checks names against them)."""
        return list(self._families(None, 0.0))

    def collect(self) -> Iterable[Metric]:
        """Query the snapshot and yield it as gauges."""
        started = time.perf_counter()
        try:
            snapshot: StatsSnapshot | None = self._snapshot()
        except (SQLAlchemyError, DashboardError) as exc:
            _log.warning("dashboard stats for /metrics failed: %s", exc)
            snapshot = None
        return list(self._families(snapshot, time.perf_counter() - started))

    def _gauge(self, name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{self._ns}_{name}", documentation, labels=labels)

    def _families(self, snap: StatsSnapshot | None, seconds: float) -> Iterator[Metric]:
        up = self._gauge("stats_up", "1 when the last database snapshot was read, else 0.", [])
        up.add_metric([], 1.0 if snap is not None else 0.0)
        yield up
        took = self._gauge("stats_seconds", "Time taken to read the database snapshot.", [])
        took.add_metric([], seconds)
        yield took
        gauges = {
            "workers_registered": "Worker keys ever registered.",
            "workers_online": "Workers seen within the online window.",
            "workers_banned": "Worker keys under a ban in force.",
            "leases_open": "Leases open now.",
            "leases_overdue": "Open leases past their deadline, not yet swept.",
            "batches_in_audit_window": "Accepted batches still in their audit window.",
        }
        if snap is not None:
            values = {
                "workers_registered": snap.workers.registered,
                "workers_online": snap.workers.online,
                "workers_banned": snap.workers.banned,
                "leases_open": snap.leases.open,
                "leases_overdue": snap.leases.overdue,
                "batches_in_audit_window": snap.audits.batches_in_audit_window,
            }
        for name, documentation in gauges.items():
            family = self._gauge(name, documentation, [])
            if snap is not None:
                family.add_metric([], float(values[name]))
            yield family

        backlog = self._gauge(
            "audit_backlog_jobs",
            "Audit jobs waiting for a validator, by kind and state (pending, claimed, error).",
            ["kind", "state"],
        )
        recent = self._gauge(
            "recent_batches",
            "Batches submitted within the dashboard's history window, by outcome "
            f"({ACCEPTED} or the rejection reason).",
            ["outcome"],
        )
        head = self._gauge("run_head_cursor", "Last cursor handed out in the run.", ["run"])
        acked = self._gauge(
            "run_acked_cursor", "Cursor the run's trainer has checkpointed.", ["run"]
        )
        version = self._gauge("run_policy_version", "Latest published policy version.", ["run"])
        rate = self._gauge(
            "run_rollouts_per_second",
            "Rollouts accepted per second over the trailing rate window.",
            ["run"],
        )
        reward = self._gauge(
            "run_reward_mean",
            "Mean reward of the rollouts accepted in the trailing rate window "
            "(absent when there are none).",
            ["run"],
        )
        if snap is not None:
            for kind, states in sorted(snap.audits.by_kind.items()):
                for state, count in sorted(states.items()):
                    backlog.add_metric([kind, state], float(count))
            for outcome, count in sorted(snap.outcome_totals.items()):
                recent.add_metric([outcome], float(count))
            for run in snap.runs:
                head.add_metric([run.run_id], float(run.head_cursor))
                acked.add_metric([run.run_id], float(run.acked_cursor))
                version.add_metric([run.run_id], float(run.latest_policy_version))
            if snap.run_id is not None:
                rate.add_metric([snap.run_id], snap.rollouts_per_s)
                if snap.reward_mean_recent is not None:
                    reward.add_metric([snap.run_id], snap.reward_mean_recent)
        yield from (backlog, recent, head, acked, version, rate, reward)

"""The demo's parsing of worker events and its view of the network state."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from coderepair.demo.network import NetworkState, WorkerState, audit_verdicts, fold_worker_line
from coderepair.demo.view import outcomes_text, plain_line, render

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.text())
def test_any_text_line_is_folded_without_raising(line: str) -> None:
    state = WorkerState("w")
    fold_worker_line(state, line)
    assert all(isinstance(v, int) for v in state.versions)


@given(st.dictionaries(st.text(), _json, max_size=6))
def test_any_json_object_is_folded_without_raising(entry: dict[str, Any]) -> None:
    state = WorkerState("w")
    fold_worker_line(state, json.dumps(entry))
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in state.versions)


def test_events_update_the_worker_state() -> None:
    state = WorkerState("w")
    lines = [
        "INFO something on stdout",
        json.dumps({"event": "engine", "message": "engine hf: vLLM is not installed"}),
        json.dumps({"event": "policy_swapped", "message": "policy v1", "version": 1}),
        json.dumps({"event": "stats", "rollouts_generated": 8, "policy_version": 1}),
        json.dumps({"event": "policy_swapped", "message": "policy v2", "version": 2}),
        json.dumps({"event": "policy_swapped", "version": True}),
        "{not json",
    ]
    for line in lines:
        fold_worker_line(state, line)
    assert state.versions == [1, 2]
    assert state.policy_version == 2
    assert state.stats["rollouts_generated"] == 8
    assert state.engine_reason == "engine hf: vLLM is not installed"


def _state() -> NetworkState:
    state = NetworkState(phase="learning")
    state.coordinator = {
        "runs": [{"run_id": "demo", "latest_policy_version": 3}],
        "outcome_totals": {"ACCEPTED": 5, "DUPLICATE": 1},
    }
    state.audit_verdicts = {"reward/passed": 4, "proof/failed": 2}
    state.steps = [{"step": 1, "reward/mean": -0.5, "loss": 0.1}]
    worker = WorkerState("worker-1", versions=[1, 3], stats={"rollouts_generated": 12})
    state.workers = {"worker-1": worker}
    return state


def test_state_reads_the_coordinator_snapshot() -> None:
    state = _state()
    assert state.latest_version == 3
    assert state.batch_outcomes() == {"accepted": 5, "duplicate": 1}
    assert state.audits_done == 6
    assert outcomes_text({"duplicate": 1, "accepted": 5, "audit_proof": 2}) == (
        "accepted 5, audit_proof 2, duplicate 1"
    )
    assert NetworkState().latest_version == 0


def test_plain_line_and_live_panel_show_the_figures() -> None:
    from rich.console import Console

    state = _state()
    line = plain_line(state)
    assert "policy v3" in line and "accepted 5, duplicate 1" in line and "audits 6" in line
    assert "reward -0.500" in line and "worker-1=v3/12r" in line
    console = Console(width=160, record=True)
    console.print(render(state, "http://127.0.0.1:1/", 600.0))
    text = console.export_text()
    assert "batches accepted 5, duplicate 1" in text and "steps 1" in text and "worker-1" in text


def test_audit_verdicts_are_read_from_the_coordinators_metrics_page() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from coderepair.coordinator.dashboard.metrics import CoordinatorMetrics

    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    for kind, verdict in [("proof", "passed"), ("proof", "passed"), ("reward", "failed")]:
        metrics.record_audit(kind, verdict)
    page = generate_latest(registry).decode()
    assert audit_verdicts(page) == {"proof/passed": 2, "reward/failed": 1}
    assert audit_verdicts("") == {}

"""The demo network: a coordinator, a trainer and workers as processes on one machine.

`DemoNetwork` starts the three roles with their ordinary console scripts and the
configs `prepare` wrote, watches them, and stops them:

1. the coordinator (`serve`), ready when its dashboard's ``/healthz`` answers;
2. the trainer (`run`), which publishes the start model as version 1, then trains on
   the coordinator's stream and publishes every step;
3. the workers (`join --json-logs`), each with its own key, config dir and cache.

`run()` returns when the trainer has made its steps (and every worker holds the last
version it published), when the time budget is spent, or when `request_stop()` is
called (Ctrl-C). A role that dies early ends the run with its log's tail: the demo
fails fast rather than waiting on a network that cannot progress. `shutdown()` is
idempotent and bounded: workers get SIGINT (they finish or release their leases), the
trainer and the coordinator SIGTERM, and whatever outlives its grace is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from coderepair.demo.prepare import RUN_ID, DemoPlan
from coderepair.demo.processes import RoleProcess
from coderepair.protocol.errors import ProtocolError

__all__ = [
    "DemoError",
    "DemoNetwork",
    "NetworkState",
    "WorkerState",
    "audit_verdicts",
    "fold_worker_line",
]

_POLL_S = 1.0


class DemoError(ProtocolError):
    """The demo network could not do its job; the message says which role and why."""


@dataclass
class WorkerState:
    """What one worker has reported (its JSON ``stats`` and events)."""

    name: str
    stats: dict[str, Any] = field(default_factory=dict)
    versions: list[int] = field(default_factory=list)
    """Policy versions swapped in, in order."""
    last_event: str = ""
    engine_reason: str = ""

    @property
    def policy_version(self) -> int:
        return self.versions[-1] if self.versions else 0


@dataclass
class NetworkState:
    """Everything the view shows, refreshed once a second."""

    started: float = field(default_factory=time.monotonic)
    phase: str = "starting"
    coordinator: dict[str, Any] = field(default_factory=dict)
    """The dashboard's /api/stats snapshot (empty until it answers)."""
    steps: list[dict[str, Any]] = field(default_factory=list)
    """The trainer's metrics.jsonl rows, one per step."""
    trainer_last_line: str = ""
    workers: dict[str, WorkerState] = field(default_factory=dict)
    audit_verdicts: dict[str, int] = field(default_factory=dict)
    """Finished audits by "kind/verdict" (the coordinator's /metrics)."""

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def latest_version(self) -> int:
        run = next((r for r in self.coordinator.get("runs", []) if r.get("run_id") == RUN_ID), None)
        return int(run["latest_policy_version"]) if run else 0

    def batch_outcomes(self) -> dict[str, int]:
        """Batches by outcome ("accepted", "duplicate", "audit_proof", ...)."""
        totals = self.coordinator.get("outcome_totals", {})
        return {str(k).lower(): int(v) for k, v in totals.items()}

    @property
    def audits_done(self) -> int:
        return sum(self.audit_verdicts.values())


def _bin(name: str) -> str:
    """A console script next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else name


class DemoNetwork:
    """Start, watch and stop the demo's processes (``async with`` or run + shutdown)."""

    def __init__(
        self,
        plan: DemoPlan,
        workers: int,
        budget_s: float,
        trainer_public_key: str,
        engine: str = "auto",
    ) -> None:
        self.plan = plan
        self.n_workers = workers
        self.budget_s = budget_s
        self.trainer_public_key = trainer_public_key
        self.engine = engine
        self.state = NetworkState()
        self.logs = plan.workdir / "run" / "logs"
        self._coordinator: RoleProcess | None = None
        self._trainer: RoleProcess | None = None
        self._workers: list[RoleProcess] = []
        self._stop = asyncio.Event()
        self._shutdown_done = False
        self.end_reason = ""

    async def __aenter__(self) -> DemoNetwork:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    def request_stop(self) -> None:
        """Ask `run` to end at its next poll (Ctrl-C)."""
        self._stop.set()

    # ------------------------------------------------------------------ 1. start

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODEREPAIR_")}
        # Each role on a small share of two cores: oversubscribed torch threads crawl,
        # and OpenMP threads that spin while they wait take the cores from the others.
        env |= {
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "TOKENIZERS_PARALLELISM": "0",
        }
        return env | extra

    async def _start_coordinator(self) -> None:
        self.state.phase = "starting the coordinator"
        self._coordinator = RoleProcess(
            "coordinator",
            [_bin("coderepair-coordinator"), "serve", "--config", str(self.plan.coordinator_toml)],
            self.logs / "coordinator.log",
            env=self._env(),
        )
        await self._coordinator.start()
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            if not self._coordinator.running:
                raise DemoError(
                    "the coordinator exited at start-up "
                    f"(code {self._coordinator.returncode}):\n{self._coordinator.tail()}"
                )
            if await asyncio.to_thread(self._get, "healthz") is not None:
                return
            await asyncio.sleep(0.5)
        raise DemoError(f"the coordinator did not answer within 120 s:\n{self._coordinator.tail()}")

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.plan.dashboard_url + path, timeout=5.0) as answer:
                body: bytes = answer.read()
                return body
        except (OSError, ValueError):
            return None

    async def _start_trainer(self) -> None:
        self.state.phase = "starting the trainer"

        def line(text: str) -> None:
            if text.strip():
                self.state.trainer_last_line = text.strip()[-160:]

        self._trainer = RoleProcess(
            "trainer",
            [_bin("coderepair-trainer"), "run", "--config", str(self.plan.trainer_toml)],
            self.logs / "trainer.log",
            env=self._env(OMP_NUM_THREADS="2"),
            on_line=line,
        )
        await self._trainer.start()

    async def _start_workers(self) -> None:
        self.state.phase = "starting the workers"
        for i in range(1, self.n_workers + 1):
            name = f"worker-{i}"
            home = self.plan.workdir / "run" / name
            state = WorkerState(name)
            self.state.workers[name] = state
            proc = RoleProcess(
                name,
                [
                    _bin("coderepair-worker"),
                    "--json-logs",
                    "join",
                    "--coordinator",
                    self.plan.grpc_address,
                    "--run-id",
                    RUN_ID,
                    "--key",
                    str(home / "worker.pem"),
                    "--trainer-key",
                    self.trainer_public_key,
                    "--cache-dir",
                    str(home / "cache"),
                    "--engine",
                    self.engine,
                    "--sandbox",
                    self.plan.sandbox,
                    "--cpu-threads",
                    "1",
                    "--max-tasks",
                    "1",
                    "--policy-poll",
                    "2",
                    "--drain-timeout",
                    "60",
                    "--display-name",
                    f"demo {name}",
                ],
                self.logs / f"{name}.log",
                env=self._env(XDG_CONFIG_HOME=str(home / "config")),
                on_line=functools.partial(fold_worker_line, state),
            )
            await proc.start()
            self._workers.append(proc)

    # ------------------------------------------------------------------ 2. watch

    async def run(self) -> str:
        """Run until done, out of budget or stopped; returns why it ended."""
        await self._start_coordinator()
        await self._start_trainer()
        await self._start_workers()
        self.state.phase = "learning"
        trainer_done_at: float | None = None
        while True:
            await self._refresh()
            self._fail_if_a_role_died()
            assert self._trainer is not None
            if self._stop.is_set():
                self.end_reason = "stopped (Ctrl-C)"
                break
            if self.state.elapsed_s >= self.budget_s:
                self.end_reason = f"time budget of {self.budget_s / 60:.0f} min spent"
                break
            if not self._trainer.running:
                # Its steps are made; give the workers a bounded while to take the last one.
                self.state.phase = "workers taking the last version"
                trainer_done_at = trainer_done_at or time.monotonic()
                latest = self.state.latest_version
                if all(w.policy_version >= latest for w in self.state.workers.values()):
                    self.end_reason = "the trainer made its steps"
                    break
                if time.monotonic() - trainer_done_at > 90.0:
                    self.end_reason = "the trainer made its steps (a worker lagged behind)"
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _POLL_S)
        await self._refresh()
        return self.end_reason

    async def _refresh(self) -> None:
        body = await asyncio.to_thread(self._get, f"api/stats?run={RUN_ID}")
        if body is not None:
            with contextlib.suppress(ValueError):
                self.state.coordinator = json.loads(body)
        page = await asyncio.to_thread(self._get, "metrics")
        if page is not None:
            with contextlib.suppress(ValueError):
                self.state.audit_verdicts = audit_verdicts(page.decode("utf-8", "replace"))
        metrics = self.plan.trainer_dir / "metrics.jsonl"
        if metrics.is_file():
            rows = []
            for text in metrics.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(text))
            self.state.steps = rows

    def _fail_if_a_role_died(self) -> None:
        assert self._coordinator is not None and self._trainer is not None
        if not self._coordinator.running:
            raise DemoError(
                f"the coordinator exited (code {self._coordinator.returncode}); its log "
                f"{self._coordinator.log_path} ends with:\n{self._coordinator.tail()}"
            )
        code = self._trainer.returncode
        if code not in (None, 0):
            raise DemoError(
                f"the trainer exited with code {code}; its log {self._trainer.log_path} ends "
                f"with:\n{self._trainer.tail()}"
            )
        for proc in self._workers:
            if not proc.running:
                raise DemoError(
                    f"{proc.name} exited (code {proc.returncode}); its log {proc.log_path} "
                    f"ends with:\n{proc.tail()}"
                )

    # ------------------------------------------------------------------ 3. stop

    async def shutdown(self) -> None:
        """Stop every role (workers first, so their leases are released). Idempotent."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        self.state.phase = "stopping"
        await asyncio.gather(*(w.stop(signal.SIGINT, timeout=75.0) for w in self._workers))
        if self._trainer is not None:
            await self._trainer.stop(signal.SIGTERM, timeout=30.0)
        with contextlib.suppress(Exception):
            await self._refresh()  # the coordinator's last figures, while it still answers
        if self._coordinator is not None:
            await self._coordinator.stop(signal.SIGTERM, timeout=30.0)
        self.state.phase = "stopped"


def audit_verdicts(exposition: str) -> dict[str, int]:
    """``coderepair_audit_verdicts_total`` of a Prometheus text page, by "kind/verdict"."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "coderepair_audit_verdicts":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels.get('kind', '?')}/{sample.labels.get('verdict', '?')}"
                out[key] = out.get(key, 0) + int(sample.value)
    return out


def fold_worker_line(state: WorkerState, text: str) -> None:
    """Fold one JSON line of ``coderepair-worker --json-logs join`` into ``state``."""
    if not text.startswith("{"):
        return  # a log line on stdout, not an event
    try:
        entry = json.loads(text)
    except ValueError:
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("event"), str):
        return
    kind = entry["event"]
    if kind == "stats":
        state.stats = entry
        return
    state.last_event = str(entry.get("message") or kind)[:120]
    version = entry.get("version")
    if kind == "policy_swapped" and isinstance(version, int) and not isinstance(version, bool):
        state.versions.append(version)
    elif kind == "engine":
        state.engine_reason = str(entry.get("message", ""))

"""What the servicers share: config, database, object store, run state, clock, threads.

Storage calls are blocking (see `storage.db`): `ServiceContext.call` runs one in the
service's bounded thread pool, whose size equals the database pool's, so the event loop
never waits on a disk or a socket and no thread waits for a connection.

`ServiceContext.metrics` is the process's `CoordinatorMetrics` (on the registry the
`Coordinator` owns and the dashboard's /metrics serves): servicers and loops record
their events on it.

`RunState` is the in-memory view of one configured run: its pool of tasks, its reward
spec and sampling settings. The run's mutable facts (latest policy version, head
cursor) live in the database and are read per request, so several replicas agree.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry

from coderepair.coordinator.config import CoordinatorConfig, RunConfig
from coderepair.coordinator.dashboard.metrics import CoordinatorMetrics
from coderepair.coordinator.service.scheduler import TaskPool
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.objects import ObjectStore
from coderepair.protocol.reward import RewardSpec
from coderepair.v1 import common_pb2, worker_pb2

__all__ = ["RunState", "ServiceContext", "wall_clock_ms"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return int(time.time() * 1000)


@dataclass
class RunState:
    """A configured run as the servicers need it."""

    config: RunConfig
    pool: TaskPool
    reward_spec: RewardSpec
    trainer_public_key: bytes

    @property
    def run_id(self) -> str:
        return self.config.run_id

    def sampling(self) -> dict[str, Any]:
        """The run's decoding settings as stored in `runs.sampling_json`."""
        return {
            "sampler": "gumbel_max_v1",
            "temperature": self.config.temperature,
            "max_new_tokens": self.config.max_new_tokens,
        }


@dataclass
class ServiceContext:
    """Shared by the three servicers, the audit loop and the sweeps of one process."""

    config: CoordinatorConfig
    db: Database
    objects: ObjectStore
    runs: dict[str, RunState]
    executor: ThreadPoolExecutor
    clock_ms: Callable[[], int] = wall_clock_ms
    # A private registry by default, so contexts built by tests never share counters.
    metrics: CoordinatorMetrics = field(
        default_factory=lambda: CoordinatorMetrics(CollectorRegistry())
    )
    # Woken at every acceptance, so following trainer streams need not poll.
    accepted: asyncio.Event = field(default_factory=asyncio.Event)

    def now_ms(self) -> int:
        return self.clock_ms()

    async def call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run a blocking storage call in the service's thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def notify_accepted(self) -> None:
        """Wake every stream waiting at the head; they re-arm the event themselves."""
        self.accepted.set()
        self.accepted = asyncio.Event()

    def record_submit(
        self,
        response: worker_pb2.SubmitRolloutsResponse,
        seconds: float,
        *,
        rollouts: int = 0,
        tokens: int = 0,
    ) -> None:
        """Count one answered SubmitRollouts on `metrics`.

        ``rollouts``, ``tokens``: the batch's rollouts and completion tokens when it
        was accepted. A replayed answer (a
        retry of a batch stored before) was counted the first time and is not counted
        again; an answer without a reason counts as an error, never as a bad label.
        """
        if response.replayed_response:
            return
        if response.accepted:
            self.metrics.record_accepted(
                seconds=seconds,
                rollouts=rollouts,
                tokens=tokens,
            )
            return
        reason = common_pb2.RejectionReason.Name(response.rejection.reason)
        if response.rejection.reason == common_pb2.REJECTION_REASON_UNSPECIFIED:
            self.metrics.record_error(seconds=seconds)
        else:
            self.metrics.record_rejected(reason.removeprefix("REJECTION_REASON_"), seconds=seconds)

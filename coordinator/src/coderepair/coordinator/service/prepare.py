"""Preparing a submitted batch for storage, off the event loop's interpreter.

Between reading the lease and committing the batch, a submission needs CPU and nothing
else: the payload's digest (what answers retries), `check_batch`, the Parquet encoding
of the checked batch, and the digest of every completion (the duplicate check's key).
For a 64-rollout batch that is about 5 ms, all of it holding the GIL, and the process's
event loop, its database threads and gRPC's callbacks all wait for that lock. Under
load the waits add up: on the project's 2-core reference machine a submit's p99 was
2-5x its p50 while the second core sat mostly idle.

`BatchPreparer` runs that work in `processes` helper processes (`server.prepare_processes`):
the event loop sends the signed payload's bytes and what the lease says (a few KiB of
plain data) and gets back the digests and the Parquet bytes. With ``processes=0`` it
runs in a thread of this process instead, as a coordinator without helpers does; both
paths call the same function, `prepare_batch`, so they give the same answers.

What it never does: read or write the database or the object store. The caller writes
the Parquet bytes and commits, so durability and ordering stay where they were.

A helper that dies (killed, out of memory) breaks its pool: the jobs in flight are run
again on a fresh one (they have no side effects), so a crash costs those submissions a
few milliseconds and not the service. A job whose second helper dies too fails with
`PreparerBrokenError`, which the servicer answers UNAVAILABLE (retryable) with nothing
written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from coderepair.coordinator.service.gate import Refusal
from coderepair.coordinator.service.validation import LeaseView, check_batch
from coderepair.coordinator.service.wire import SubmitView
from coderepair.coordinator.storage.models import Lease, LeaseState
from coderepair.coordinator.storage.repo import LeaseTask
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.reward import RewardSpec

__all__ = [
    "BatchPreparer",
    "PrepareJob",
    "PreparedBatch",
    "PreparerBrokenError",
    "payload_digest",
    "prepare_batch",
]

log = logging.getLogger(__name__)


def payload_digest(payload: Any) -> str:
    """The batch digest that answers retries: SHA-256 of the payload's deterministic
    encoding (the same for a `SubmitPayload` and its `wire.SubmitView`)."""
    return hashlib.sha256(payload.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class PrepareJob:
    """What `prepare_batch` needs: plain data, cheap to send to another process."""

    payload: bytes
    """The signed `SubmitPayload` bytes, as the worker sent them."""
    lease_id: str
    lease_policy_version: int
    tasks: tuple[LeaseTask, ...]
    """The lease's tasks with their seeds, in lease order."""
    prompts: dict[str, tuple[int, ...]]
    """Each leased task's prompt token ids."""
    run_id: str
    worker_key_hex: str
    group_size: int
    max_new_tokens: int
    reward_spec: RewardSpec
    reward_spec_hash: str
    now_ms: int


@dataclass(frozen=True)
class PreparedBatch:
    """A checked batch, ready to store: `refusal` is None, or the reason it is refused."""

    payload_sha256: str
    refusal: Refusal | None = None
    parquet: bytes = b""
    """The batch as one Parquet file (`CheckedBatch.parquet_bytes`)."""
    task_ids: tuple[str, ...] = ()
    sample_indices: tuple[int, ...] = ()
    completion_sha256: tuple[str, ...] = ()
    n_completion_tokens: tuple[int, ...] = ()
    rewards: tuple[float, ...] = ()

    @property
    def n_tokens(self) -> int:
        """Completion tokens in the batch."""
        return sum(self.n_completion_tokens)

    def __len__(self) -> int:
        return len(self.task_ids)


def prepare_batch(job: PrepareJob) -> PreparedBatch:
    """Digest, check, encode: the batch ready to store, or its refusal (never raises a
    `Refusal`: it comes back as data, so it crosses a process boundary unchanged)."""
    payload = SubmitView.FromString(job.payload)
    digest = payload_digest(payload)
    lease = Lease(
        lease_id=job.lease_id,
        policy_version=job.lease_policy_version,
        state=LeaseState.OPEN,
    )
    view = LeaseView(lease=lease, tasks=job.tasks, prompts=job.prompts)
    try:
        batch = check_batch(
            payload,
            view,
            run_id=job.run_id,
            worker_key_hex=job.worker_key_hex,
            group_size=job.group_size,
            max_new_tokens=job.max_new_tokens,
            reward_spec=job.reward_spec,
            reward_spec_hash=job.reward_spec_hash,
            now_ms=job.now_ms,
        )
    except Refusal as refusal:
        return PreparedBatch(payload_sha256=digest, refusal=refusal)
    return PreparedBatch(
        payload_sha256=digest,
        parquet=batch.parquet_bytes(),
        task_ids=tuple(batch.rows["task_id"]),
        sample_indices=tuple(batch.rows["sample_index"]),
        completion_sha256=tuple(batch.digests()),
        n_completion_tokens=tuple(batch.lengths()),
        rewards=tuple(batch.rows["reward"]),
    )


class PreparerBrokenError(ProtocolError):
    """A helper process died while preparing the batch; nothing was written."""


def _warm() -> int:
    """Run in each new helper: the imports are done, report ready."""
    return 0


class BatchPreparer:
    """Runs `prepare_batch` in helper processes, or in a thread when ``processes`` is 0.

    Lifecycle: `start()` spawns the helpers and waits until they have imported what
    they need (so the first submission does not pay for it); `prepare(job)` awaits one
    job; `shutdown()` stops them, is idempotent and bounded. A pool broken by a dead
    helper is replaced on the next call (module docstring).
    """

    def __init__(
        self,
        processes: int,
        *,
        fn: Callable[[PrepareJob], PreparedBatch] = prepare_batch,
    ) -> None:
        """``fn``: the job's function, a module-level one (helpers import it by name);
        `prepare_batch` but in tests."""
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.processes = processes
        self._fn = fn
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the coordinator holds threads (gRPC, database) that a fork
        # would copy in whatever state they were in.
        return ProcessPoolExecutor(
            max_workers=self.processes, mp_context=multiprocessing.get_context("spawn")
        )

    async def start(self) -> None:
        """Spawn the helpers and wait until each answered (no-op with 0 processes)."""
        if self.processes == 0 or self._pool is not None:
            return
        pool = self._new_pool()
        self._pool = pool
        loop = asyncio.get_running_loop()
        # One warm-up call per helper: the pool spawns helpers as calls queue up.
        await asyncio.gather(*(loop.run_in_executor(pool, _warm) for _ in range(self.processes)))

    def _executor(self) -> Executor | None:
        with self._lock:
            if self._closed:
                raise PreparerBrokenError("the coordinator is shutting down: retry later")
            if self.processes == 0:
                return None  # the event loop's default thread pool
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    async def prepare(self, job: PrepareJob) -> PreparedBatch:
        """`prepare_batch(job)` in a helper (or a thread).

        A job whose helper died is run once more on a fresh pool (it has no side
        effects); `PreparerBrokenError` when that one dies too, or during shutdown.
        """
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            executor = self._executor()
            try:
                return await loop.run_in_executor(executor, self._fn, job)
            except BrokenProcessPool as exc:
                self._replace(executor)
                if attempt:
                    raise PreparerBrokenError(
                        "a batch-preparing helper process died twice while checking this "
                        "batch; nothing was written: retry the same batch later"
                    ) from exc
        raise AssertionError("unreachable")

    def _replace(self, broken: Executor | None) -> None:
        with self._lock:
            if self._pool is not broken or broken is None:
                return  # another caller replaced it already
            log.error("a batch-preparing helper process died; starting a fresh pool")
            self._pool = None if self._closed else self._new_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        """The helpers' process ids (tests, diagnostics)."""
        pool = self._pool
        if pool is None:
            return []
        processes: dict[int, Any] = getattr(pool, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.pid is not None]

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the helpers (calls in flight are cancelled); safe to call twice."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(
                asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True), timeout_s
            )
        except TimeoutError:
            log.warning("batch-preparing helpers did not stop within %.1f s; killed", timeout_s)
            for process in (getattr(pool, "_processes", None) or {}).values():
                process.kill()

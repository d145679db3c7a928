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
plain data) over a pipe and gets back the digests (see "helper processes" below for
why not `ProcessPoolExecutor`). With ``processes=0`` it
runs in a thread of this process instead, as a coordinator without helpers does; both
paths call the same function, `prepare_batch`, so they give the same answers.

What it never does: touch the database. Where the object store is a local directory it
also writes the Parquet object (content-addressed, fsynced, before the caller commits,
as the caller would); otherwise it returns the bytes and the caller writes them. The
caller commits after either, so durability and ordering stay where they were.

A helper that dies (killed, out of memory) is replaced, and the jobs it held are run
again on a fresh one (they have no side effects; a write of the object is
content-addressed), so a crash costs those submissions a second and not the service. A
job whose second helper dies too fails with `PreparerBrokenError`, which the servicer
answers UNAVAILABLE (retryable) with nothing written.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coderepair.coordinator.service.gate import Refusal
from coderepair.coordinator.service.tuning import tune_helper_process
from coderepair.coordinator.service.validation import LeaseView, check_batch
from coderepair.coordinator.service.wire import SubmitView
from coderepair.coordinator.storage.models import Lease, LeaseState
from coderepair.coordinator.storage.objects import LocalObjectStore, ObjectStore
from coderepair.coordinator.storage.repo import LeaseTask
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.reward import RewardSpec

__all__ = [
    "BatchPreparer",
    "PrepareJob",
    "PreparedBatch",
    "PreparerBrokenError",
    "payload_digest",
    "portable_store",
    "prepare_batch",
]

log = logging.getLogger(__name__)


def portable_store(store: ObjectStore) -> LocalObjectStore | None:
    """`store` if a helper process can write to it itself (a plain local directory),
    else None (S3's client, or a store subclassed by tests, stays in this process)."""
    return store if type(store) is LocalObjectStore else None


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
    object_prefix: str = ""
    """The batch's object key is this, the payload digest, and ``.parquet``."""
    store: LocalObjectStore | None = None
    """Where to write the Parquet object, when it is a store another process can write
    to (a local directory); None leaves the write to the caller."""


@dataclass(frozen=True)
class PreparedBatch:
    """A checked batch, ready to store: `refusal` is None, or the reason it is refused."""

    payload_sha256: str
    refusal: Refusal | None = None
    object_key: str = ""
    """Where the batch's Parquet object goes (`PrepareJob.object_prefix`)."""
    parquet: bytes = b""
    """The batch as one Parquet file (`CheckedBatch.parquet_bytes`), still to be written
    under `object_key`; empty once `prepare_batch` wrote it to the job's store."""
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
    """Digest, check, encode and, given a store, write the object: the batch ready to
    commit, or its refusal (never raises a `Refusal`: it comes back as data, so it
    crosses a process boundary unchanged). A failed write raises."""
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
    key = f"{job.object_prefix}{digest}.parquet"
    parquet = batch.parquet_bytes()
    if job.store is not None:
        # Content-addressed: a retry rewrites the same bytes, and an object whose batch
        # is never committed is never read (`worker_service`).
        job.store.put(key, parquet)
        parquet = b""
    return PreparedBatch(
        payload_sha256=digest,
        object_key=key,
        parquet=parquet,
        task_ids=tuple(batch.rows["task_id"]),
        sample_indices=tuple(batch.rows["sample_index"]),
        completion_sha256=tuple(batch.digests()),
        n_completion_tokens=tuple(batch.lengths()),
        rewards=tuple(batch.rows["reward"]),
    )


class PreparerBrokenError(ProtocolError):
    """A helper process died while preparing the batch; nothing was written."""


# ---------------------------------------------------------------- helper processes
#
# Why not `concurrent.futures.ProcessPoolExecutor`: it moves every job through two
# threads of this process (a queue feeder that pickles and writes, a manager that reads
# and unpickles), and each must win the interpreter lock back from the event loop and
# the database threads, up to a 5 ms switch interval per hand-off. Measured on the
# bench's paced load, a 5 ms job took 11-13 ms there at p50 and 31-45 ms at p99. Here
# the event loop itself writes each job to its helper's pipe and reads the answer
# (asyncio pipe transports), so a job costs this process no thread at all.
#
# The frames on both pipes are those of `multiprocessing.Connection` (a big-endian
# length, then the bytes), so the helper side is plain blocking `send_bytes` and
# `recv_bytes`.

_READY = b"ready"


def _helper_main(
    jobs: multiprocessing.connection.Connection,
    answers: multiprocessing.connection.Connection,
    fn: Callable[[PrepareJob], PreparedBatch],
) -> None:
    """A helper: answer each job until the coordinator closes its end of the pipe.

    The object write is pipelined: this thread checks and encodes a job with the
    store taken out of it, so that `fn` hands the Parquet bytes back, and a writer
    thread writes them and sends the answer, in job order, while this thread goes
    on to the next job. A write is mostly waiting for two fsyncs (the file, then its
    folder), and a burst of submissions queues on this helper: done in line, every
    job behind it waited for those fsyncs too.
    """
    tune_helper_process()
    answers.send_bytes(_READY)
    outbox: queue.SimpleQueue[tuple[tuple[bool, Any], LocalObjectStore | None] | None]
    outbox = queue.SimpleQueue()
    writer = threading.Thread(
        target=_write_and_answer, args=(outbox, answers), name="prepare-writer", daemon=True
    )
    writer.start()
    try:
        while True:
            try:
                data = jobs.recv_bytes()
            except EOFError:
                return
            store: LocalObjectStore | None = None
            try:
                job = _job_from_frame(data)
                store, job = job.store, dataclasses.replace(job, store=None)
                answer: tuple[bool, Any] = (True, fn(job))
            except Exception as exc:  # a bug: reported to the caller, the helper lives on
                answer = (False, exc)
            outbox.put((answer, store))
    finally:
        outbox.put(None)  # the writer answers what is queued, then stops
        writer.join()


def _job_from_frame(frame: bytes) -> PrepareJob:
    """A job as `_Helper.send` framed it: the length of the pickled job (without its
    payload), the pickle, then the payload's bytes."""
    (size,) = struct.unpack_from("!i", frame)
    job: PrepareJob = pickle.loads(memoryview(frame)[4 : 4 + size])
    return dataclasses.replace(job, payload=frame[4 + size :])


def _write_and_answer(
    outbox: queue.SimpleQueue[tuple[tuple[bool, Any], LocalObjectStore | None] | None],
    answers: multiprocessing.connection.Connection,
) -> None:
    """The helper's writer thread: write each prepared batch's object, then answer."""
    while (item := outbox.get()) is not None:
        answer, store = item
        ok, prepared = answer
        if ok and store is not None and prepared.parquet:
            try:
                # Content-addressed, as in `prepare_batch`.
                store.put(prepared.object_key, prepared.parquet)
                answer = (True, dataclasses.replace(prepared, parquet=b""))
            except Exception as exc:
                answer = (False, exc)
        try:
            out = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            out = pickle.dumps((False, RuntimeError(f"unpicklable answer: {exc!r}")))
        answers.send_bytes(out)


class _Frames(asyncio.Protocol):
    """Reads `multiprocessing.Connection` frames off a helper's answer pipe."""

    def __init__(self, helper: _Helper) -> None:
        self._helper = helper
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            (size,) = struct.unpack_from("!i", buffer)
            header = 4
            if size == -1:  # a frame of 2 GiB or more: the length follows as 8 bytes
                if len(buffer) < 12:
                    return
                (size,) = struct.unpack_from("!Q", buffer, 4)
                header = 12
            if len(buffer) < header + size:
                return
            frame = bytes(buffer[header : header + size])
            del buffer[: header + size]
            self._helper.answered(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._helper.died()


class _Helper:
    """One helper process and its two pipes, driven by the event loop."""

    def __init__(self, process: Any, jobs: asyncio.WriteTransport) -> None:
        self.process = process
        self._jobs = jobs
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: collections.deque[asyncio.Future[PreparedBatch]] = collections.deque()
        self.alive = True
        self.answers: asyncio.BaseTransport | None = None

    def send(self, job: PrepareJob) -> asyncio.Future[PreparedBatch]:
        # The payload (the bulk of a job) travels beside the pickle, not inside it:
        # pickling would copy it into a growing buffer first (`_job_from_frame`).
        head = pickle.dumps(dataclasses.replace(job, payload=b""), pickle.HIGHEST_PROTOCOL)
        future: asyncio.Future[PreparedBatch] = asyncio.get_running_loop().create_future()
        self.pending.append(future)  # a helper answers its jobs in order
        self._jobs.write(struct.pack("!ii", 4 + len(head) + len(job.payload), len(head)) + head)
        self._jobs.write(job.payload)
        return future

    def answered(self, frame: bytes) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
            return
        ok, value = pickle.loads(frame)
        future = self.pending.popleft()
        if future.done():  # its caller was cancelled
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def died(self) -> None:
        """Fail whatever it still held (idempotent: also after `close`)."""
        self.alive = False
        broken = PreparerBrokenError(f"batch-preparing helper {self.process.pid} died")
        if not self.ready.done():
            self.ready.set_exception(broken)
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(broken)

    def close(self) -> None:
        """Closing the job pipe is the helper's signal to exit."""
        self.alive = False
        self._jobs.close()


_PIPE_BYTES = 1 << 20


def _widen(fd: int) -> None:
    """Give a pipe room for a whole job (a 64-rollout batch is about 300 KB) or answer:
    with Linux's default 64 KiB, a job crosses in several writes, each waiting for
    the helper to read and for the event loop to come round again."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or over pipe-max-size
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


async def _spawn(fn: Callable[[PrepareJob], PreparedBatch]) -> _Helper:
    # spawn, not fork: the coordinator holds threads (gRPC, database) that a fork
    # would copy in whatever state they were in.
    context = multiprocessing.get_context("spawn")
    job_out, job_in = context.Pipe(duplex=False)
    answer_out, answer_in = context.Pipe(duplex=False)
    process = context.Process(
        target=_helper_main,
        args=(job_out, answer_in, fn),
        name="coordinator-prepare",
        daemon=True,
    )
    await asyncio.to_thread(process.start)
    job_out.close()
    answer_in.close()
    loop = asyncio.get_running_loop()
    # The transports own duplicates of the descriptors; the Connections are closed.
    writer = os.fdopen(os.dup(job_in.fileno()), "wb", buffering=0)
    reader = os.fdopen(os.dup(answer_out.fileno()), "rb", buffering=0)
    for pipe in (writer, reader):
        _widen(pipe.fileno())
    job_in.close()
    answer_out.close()
    jobs, _ = await loop.connect_write_pipe(asyncio.Protocol, writer)
    helper = _Helper(process, jobs)
    helper.answers, _ = await loop.connect_read_pipe(lambda: _Frames(helper), reader)
    return helper


class BatchPreparer:
    """Runs `prepare_batch` in helper processes, or in a thread when ``processes`` is 0.

    Lifecycle: `start()` spawns the helpers and waits until they have imported what
    they need (so the first submission does not pay for it); `prepare(job)` awaits one
    job on the least busy helper; `shutdown()` stops them, is idempotent and bounded.
    A dead helper is replaced on the next call (module docstring).
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
        self._helpers: list[_Helper] = []
        self._spawning: asyncio.Lock | None = None
        self._closed = False

    async def start(self) -> None:
        """Spawn the helpers and wait until each answered (no-op with 0 processes)."""
        await self._ensure()

    async def _ensure(self) -> list[_Helper]:
        """The live helpers, spawning replacements for the dead ones first."""
        if self._closed:
            raise PreparerBrokenError("the coordinator is shutting down: retry later")
        self._spawning = self._spawning or asyncio.Lock()
        async with self._spawning:
            for helper in [h for h in self._helpers if not h.alive]:
                self._helpers.remove(helper)
                log.error("batch-preparing helper %s died; starting another", helper.process.pid)
                helper.close()
                await asyncio.to_thread(helper.process.join, 5.0)
            missing = self.processes - len(self._helpers)
            if missing > 0:
                spawned = await asyncio.gather(*(_spawn(self._fn) for _ in range(missing)))
                self._helpers.extend(spawned)
                try:
                    await asyncio.gather(*(h.ready for h in spawned))
                except PreparerBrokenError as exc:
                    raise PreparerBrokenError(
                        f"a batch-preparing helper died while starting: {exc}"
                    ) from exc
            if self._closed:  # shut down while we were spawning
                raise PreparerBrokenError("the coordinator is shutting down: retry later")
            return list(self._helpers)

    async def prepare(self, job: PrepareJob) -> PreparedBatch:
        """`prepare_batch(job)` in a helper (or a thread).

        A job whose helper died is run once more on a fresh one (it has no side
        effects); `PreparerBrokenError` when that one dies too, or during shutdown.
        """
        if self.processes == 0:
            if self._closed:
                raise PreparerBrokenError("the coordinator is shutting down: retry later")
            return await asyncio.get_running_loop().run_in_executor(None, self._fn, job)
        for attempt in range(2):
            helpers = self._helpers
            if len(helpers) < self.processes or not all(h.alive for h in helpers):
                helpers = await self._ensure()
            elif self._closed:
                raise PreparerBrokenError("the coordinator is shutting down: retry later")
            helper = min(helpers, key=lambda h: len(h.pending))
            try:
                return await helper.send(job)
            except PreparerBrokenError as exc:
                if attempt:
                    raise PreparerBrokenError(
                        "a batch-preparing helper process died twice while checking this "
                        "batch; nothing was written: retry the same batch later"
                    ) from exc
        raise AssertionError("unreachable")

    def pids(self) -> list[int]:
        """The live helpers' process ids (tests, diagnostics)."""
        return [h.process.pid for h in self._helpers if h.alive]

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the helpers (jobs in flight fail as broken); safe to call twice."""
        self._closed = True
        helpers, self._helpers = self._helpers, []
        for helper in helpers:
            helper.close()

        def join() -> None:
            for helper in helpers:
                helper.process.join(timeout_s)
                if helper.process.is_alive():
                    log.warning(
                        "batch-preparing helper %s did not stop within %.1f s; killed",
                        helper.process.pid,
                        timeout_s,
                    )
                    helper.process.kill()
                    helper.process.join(timeout_s)

        if helpers:
            await asyncio.to_thread(join)
        for helper in helpers:
            helper.died()  # fail whatever is still pending
            if helper.answers is not None:
                helper.answers.close()

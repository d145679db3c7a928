"""`CoordinatorSource`: the coordinator's accepted-rollout stream as a `RolloutSource`.

The trainer loop is synchronous and reads rows in small chunks; the coordinator pushes
them over a server-streaming RPC (``TrainerService.StreamRollouts``). A reader thread
sits between the two and moves rows from the gRPC call into a bounded queue:

- **Back-pressure.** When the queue is full the thread blocks on ``put`` and stops
  pulling from the call, so gRPC flow control stops the coordinator, which reads the next
  page from its store only when the transport has taken the previous one.
- **Reconnect.** ``UNAVAILABLE`` (coordinator restart, network blip) reopens the stream
  after the last row *received*, with exponential back-off, until ``reconnect_max_s`` of
  continuous failure; then the next ``read`` raises `StreamError`. Any other status (a
  refused signature, an unknown run) is not retried: it will not heal by itself.
- **Acks.** ``ack(cursor)`` (called by the loop after a checkpoint is on disk) is a
  signed ``AckCursor``; the coordinator then knows nothing before it is needed again.
  ``ack(checkpointed, consumed=cursor)`` (called while the loop waits for rows) tells it
  how far the trainer has read and decided, so the rows it dropped leave the run's
  back-pressure count.

Versions: coordinator runs number policies 1, 2, 3, ... without gaps; the trainer numbers
its weights by optimizer step from 0 (the model it starts from) and publishes every
``publish_every`` (= k) steps. So coordinator version 1 is the base model, and coordinator
version *c* holds the weights after step ``(c - 1) * k``. Rows arrive with the
coordinator's number and are handed to the loop with the step's (`to_trainer_version`),
so the loop's staleness window is counted in optimizer steps whatever k is.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from coderepair.protocol import rpc
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.protocol.rollout import RolloutRecord
from coderepair.trainer.rollouts import RolloutSource, SourcedRollout, SourceError
from coderepair.v1 import trainer_pb2, trainer_pb2_grpc

__all__ = [
    "VERSION_OFFSET",
    "CoordinatorSource",
    "StreamError",
    "record_from_row",
    "signed_envelope",
    "to_coordinator_version",
    "to_trainer_version",
]

log = logging.getLogger(__name__)

VERSION_OFFSET = 1
"""Coordinator version of the base model, trainer version 0 (coordinator runs start at 1)."""

# Fields of a record the stream does not carry (the coordinator checked them on submission).
_UNKNOWN_HASH = "0" * 64
_BACKOFF_START_S = 0.2
_BACKOFF_MAX_S = 10.0


class StreamError(SourceError):
    """The rollout stream failed for good (refused, or unavailable for too long)."""


def to_trainer_version(coordinator_version: int, publish_every: int = 1) -> int:
    """The optimizer step whose weights a coordinator policy version holds."""
    if coordinator_version < VERSION_OFFSET:
        raise StreamError(
            f"policy version {coordinator_version} is below {VERSION_OFFSET}: coordinator "
            "runs number versions from 1; is this coordinator speaking an older protocol?"
        )
    return (coordinator_version - VERSION_OFFSET) * publish_every


def to_coordinator_version(step: int, publish_every: int = 1) -> int:
    """The coordinator version of the weights after ``step`` (a multiple of publish_every)."""
    if step < 0 or step % publish_every:
        raise StreamError(
            f"step {step} is not a publishing step (a non-negative multiple of "
            f"publish_every={publish_every}): only those have a coordinator version"
        )
    return step // publish_every + VERSION_OFFSET


def signed_envelope(identity: Identity, method: str, payload: object) -> bytes:
    """Envelope bytes of ``payload`` for the signed RPC at ``method`` (its full path)."""
    purpose = rpc.SIGNED_RPCS[method].purpose
    data: bytes = payload.SerializeToString()  # type: ignore[attr-defined]
    return identity.sign(purpose, data).to_bytes()


def record_from_row(row: trainer_pb2.RolloutRow, publish_every: int = 1) -> RolloutRecord:
    """The trainer's record of a streamed row (versions renumbered; see the module)."""
    sample = row.sample
    try:
        return RolloutRecord(
            task_id=sample.task_id,
            lease_id=row.lease_id,
            run_id=row.run_id,
            # The row names the worker by its short id, not its key; training needs neither.
            worker_key=_UNKNOWN_HASH,
            policy_version=to_trainer_version(int(row.policy_version), publish_every),
            sample_index=int(sample.sample_index),
            seed=int(sample.seed),
            prompt_ids=[int(t) for t in sample.prompt_token_ids],
            completion_ids=[int(t) for t in sample.completion_token_ids],
            behaviour_logprobs=[float(x) for x in sample.behaviour_logprobs],
            completion_text=sample.completion_text,
            patch=sample.patch,
            reward=float(sample.reward),
            reward_components=dict(sample.reward_components),
            reward_spec_hash=_UNKNOWN_HASH,
            test_log_sha256=sample.test_log_sha256,
            proof=bytes(sample.proof),
            timings={
                "generate": sample.timings.generate_ms / 1000.0,
                "reward": sample.timings.reward_ms / 1000.0,
                "proof": sample.timings.proof_ms / 1000.0,
            },
            created_at_ms=int(row.accepted_unix_ms),
        )
    except StreamError:
        raise
    except ProtocolError as exc:
        raise StreamError(
            f"row {row.cursor} of run {row.run_id!r} is not a valid rollout ({exc}); the "
            "coordinator validated it on submission, so it and this trainer disagree on the "
            "protocol: upgrade the older of the two"
        ) from exc


@dataclass(frozen=True)
class _End:
    """Queue marker: the stream ended (not following) or failed (``error`` set)."""

    error: StreamError | None = None


class CoordinatorSource(RolloutSource):
    """Rows of one coordinator run, read ahead by a thread into a bounded buffer."""

    def __init__(
        self,
        address: str,
        run_id: str,
        identity: Identity,
        *,
        follow: bool = True,
        publish_every: int = 1,
        buffer_rows: int = 256,
        reconnect_max_s: float = 300.0,
        rpc_timeout_s: float = 30.0,
    ) -> None:
        if buffer_rows < 1:
            raise SourceError(f"buffer_rows must be >= 1, got {buffer_rows}")
        self.address = address
        self.run_id = run_id
        self.follow = follow
        self.publish_every = publish_every
        self.reconnect_max_s = reconnect_max_s
        self.rpc_timeout_s = rpc_timeout_s
        self.trainer_step = 0
        """Step reported with acks (informational; the run sets it as it trains)."""
        self.acked_cursor = 0
        """The coordinator's acked cursor after the last ack."""
        self.reconnects = 0
        """Times the stream was reopened after UNAVAILABLE."""
        self._identity = identity
        self._queue: queue.Queue[SourcedRollout | _End] = queue.Queue(maxsize=buffer_rows)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: grpc.Future | None = None
        self._call_lock = threading.Lock()
        self._ended: _End | None = None
        self._channel = grpc.insecure_channel(address, options=rpc.channel_options())
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)

    # ---------------------------------------------------------------- RolloutSource

    def open(self, after_cursor: int) -> None:
        if self._thread is not None:
            raise SourceError("open() called twice: a source is opened once per run")
        if after_cursor < 0:
            raise SourceError(f"after_cursor must be >= 0, got {after_cursor}")
        self._thread = threading.Thread(
            target=self._pump, args=(after_cursor,), name="rollout-stream", daemon=True
        )
        self._thread.start()

    def read(self, max_rows: int, timeout_s: float) -> list[SourcedRollout] | None:
        if self._thread is None:
            raise SourceError("read() before open(): open the source at a cursor first")
        if self._ended is not None:
            return self._finish()
        rows: list[SourcedRollout] = []
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return rows
        while True:
            if isinstance(item, _End):
                self._ended = item
                break
            rows.append(item)
            if len(rows) >= max(1, max_rows):
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if not rows and self._ended is not None:
            return self._finish()
        return rows

    def ack(self, cursor: int, *, consumed: int = 0) -> bool:
        payload = trainer_pb2.AckPayload(
            run_id=self.run_id,
            cursor=cursor,
            trainer_step=self.trainer_step,
            consumed_cursor=max(cursor, consumed),
        )
        method = f"/{rpc.TRAINER_SERVICE}/AckCursor"
        request = trainer_pb2.AckCursorRequest(
            envelope=signed_envelope(self._identity, method, payload)
        )
        try:
            answer = self._stub.AckCursor(request, timeout=self.rpc_timeout_s)
        except grpc.RpcError as exc:
            # The checkpoint is on disk and records the cursor; an ack that did not reach
            # the coordinator only delays its bookkeeping, and the next ack covers it.
            log.warning("AckCursor(%d) failed: %s; the next ack covers it", cursor, exc)
            return False
        self.acked_cursor = int(answer.acked_cursor)
        log.info(
            "acked cursor %d, consumed %d (coordinator head %d)",
            answer.acked_cursor,
            answer.consumed_cursor,
            answer.head_cursor,
        )
        return True

    def close(self) -> None:
        self._stop.set()
        with self._call_lock:
            if self._call is not None:
                self._call.cancel()
        # Unblock a reader thread waiting on a full queue.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._channel.close()

    # ---------------------------------------------------------------- the reader thread

    def _finish(self) -> list[SourcedRollout] | None:
        assert self._ended is not None
        if self._ended.error is not None:
            raise self._ended.error
        return None

    def _put(self, item: SourcedRollout | _End) -> bool:
        """Block until the trainer makes room (back-pressure); False once closing."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, after_cursor: int) -> None:
        last = after_cursor
        failing_since: float | None = None
        backoff = _BACKOFF_START_S
        method = f"/{rpc.TRAINER_SERVICE}/StreamRollouts"
        while not self._stop.is_set():
            payload = trainer_pb2.StreamPayload(
                run_id=self.run_id, after_cursor=last, follow=self.follow
            )
            request = trainer_pb2.StreamRolloutsRequest(
                envelope=signed_envelope(self._identity, method, payload)
            )
            try:
                call = self._stub.StreamRollouts(request)
                with self._call_lock:
                    self._call = call
                for row in call:
                    failing_since, backoff = None, _BACKOFF_START_S
                    if row.cursor <= last:
                        raise StreamError(
                            f"the coordinator sent cursor {row.cursor} after {last}: cursors "
                            "must strictly increase; the stream cannot be trusted"
                        )
                    item = SourcedRollout(
                        cursor=int(row.cursor),
                        record=record_from_row(row, self.publish_every),
                        group_size=int(row.group_size) or None,
                    )
                    if not self._put(item):
                        return
                    last = int(row.cursor)
                self._put(_End())  # not following: the head was reached
                return
            except StreamError as exc:
                self._put(_End(exc))
                return
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code != grpc.StatusCode.UNAVAILABLE:
                    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                    self._put(
                        _End(
                            StreamError(
                                f"StreamRollouts for run {self.run_id!r} at {self.address} "
                                f"failed with {code}: {detail}"
                            )
                        )
                    )
                    return
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since >= self.reconnect_max_s:
                    self._put(
                        _End(
                            StreamError(
                                f"the coordinator at {self.address} has been unavailable for "
                                f"{now - failing_since:.0f} s: check that it runs, then resume "
                                "(`coderepair-trainer resume`)"
                            )
                        )
                    )
                    return
                log.warning(
                    "rollout stream unavailable (%s); reconnecting after cursor %d in %.1f s",
                    exc.details() if isinstance(exc, grpc.Call) else exc,
                    last,
                    backoff,
                )
                self.reconnects += 1
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
            finally:
                with self._call_lock:
                    self._call = None

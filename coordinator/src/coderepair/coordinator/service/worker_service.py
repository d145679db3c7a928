"""WorkerService: registration, heartbeats, policies, leases and rollout submission.

SubmitRollouts runs the validation pipeline cheapest stage first:

1. request size and envelope (`EnvelopeGate`: wire format, purpose, clock skew,
   signature, then the replay check against the shared nonce table);
2. the signer must be registered and not banned;
3. structural checks against the lease, the run and its task pool (`validation`): the
   lease's own here, the samples' in `prepare.prepare_batch`, which also digests the
   payload and encodes the Parquet record, in a helper process where the coordinator
   has them (``server.prepare_processes``) so the event loop keeps its interpreter;
4. the Parquet record goes to the object store under a content-addressed key (a retry
   rewrites the same bytes; an object whose batch is never committed is never read);
5. `record_batch`: one transaction that looks the idempotency key up, closes the lease,
   refuses completions other workers already had accepted, takes the cursor range,
   inserts the index rows and, when the BOINC draw says so, the audit jobs.

The answer is built from the stored batch, and only after its commit: an accepted
response means the batch is durable, and a retry with the same idempotency key gets
the same answer (`replayed_response`) without storing anything twice. A refusal at
stage 3 or 5 is stored too (as a REJECTED batch), so its retry gets the same verdict.
Refusals of unattributable requests (stages 1-2) are gRPC statuses with the
`Rejection` in the trailing metadata; refusals of a signed batch are in-band, as the
contract says.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import grpc

from coderepair.coordinator.service import convert
from coderepair.coordinator.service.context import RunState, ServiceContext
from coderepair.coordinator.service.gate import (
    EnvelopeGate,
    PendingNonce,
    Refusal,
    guarded,
    not_registered,
    require_active,
)
from coderepair.coordinator.service.prepare import (
    BatchPreparer,
    PreparedBatch,
    PrepareJob,
    PreparerBrokenError,
    payload_digest,
    portable_store,
)
from coderepair.coordinator.service.scheduler import new_seeds
from coderepair.coordinator.service.stats import (
    lease_states,
    worker_and_batches,
    workers_online,
)
from coderepair.coordinator.service.validation import (
    LeaseView,
    check_envelope_fields,
    check_lease_open,
    check_policy_window,
    should_audit,
)
from coderepair.coordinator.service.wire import SubmitView
from coderepair.coordinator.storage import batches, repo
from coderepair.coordinator.storage.errors import (
    DuplicateCompletionError,
    IdempotencyConflictError,
    LeaseNotOpenError,
    NotFoundError,
)
from coderepair.coordinator.storage.models import AuditKind, LeaseState, Run, Worker
from coderepair.protocol import rpc
from coderepair.protocol.identity import PUBLIC_KEY_BYTES, fingerprint
from coderepair.v1 import common_pb2, worker_pb2, worker_pb2_grpc

__all__ = ["WorkerServicer"]

log = logging.getLogger(__name__)
R = common_pb2.RejectionReason
_M = f"/{rpc.WORKER_SERVICE}/"
_NO_WORK_RETRY_MS = 2000
_MAX_STATUS_BATCHES = 100
COORDINATOR_VERSION = "0.1.0"


def _printable(value: str, limit: int, name: str) -> str:
    if len(value) > limit or not value.isprintable():
        raise Refusal(
            R.REJECTION_REASON_STRUCTURAL,
            f"{name} must be at most {limit} printable characters",
        )
    return value


def _draft(worker: Worker, payload: Any, lease: Any, digest: str) -> batches.BatchDraft:
    return batches.BatchDraft(
        worker_id=worker.worker_id,
        idempotency_key=payload.idempotency_key,
        payload_sha256=digest,
        run_id=lease.run_id if lease is not None else None,
        lease_id=lease.lease_id if lease is not None else None,
        policy_version=int(payload.policy_version),
    )


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """The worker-facing service over a `ServiceContext`."""

    def __init__(
        self,
        ctx: ServiceContext,
        gate: EnvelopeGate,
        rng: random.Random,
        preparer: BatchPreparer | None = None,
    ) -> None:
        self._ctx = ctx
        # Digests, checks and Parquet encoding of a batch (`prepare`): in helper
        # processes when the coordinator has them, else in a thread of this one.
        self._preparer = preparer if preparer is not None else BatchPreparer(0)
        # A local store is written by `prepare_batch` too, in the helper where there is
        # one; another (S3) is written here.
        self._store = portable_store(ctx.objects)
        # Submissions and the nonces of worker calls are written by group commit
        # (`storage.batches.GroupCommitter`): one transaction, one fsync, for all the
        # requests that arrive while the previous commit runs.
        self._committer = batches.GroupCommitter(ctx.db)
        self._gate = gate.with_group_commit(self._committer)
        self._rng = rng

    async def _record(
        self, draft: batches.BatchDraft, nonce: PendingNonce
    ) -> batches.RecordedBatch:
        """`record_batch` through the group committer, with the request's nonce in the
        same operation (`EnvelopeGate.open_deferred`): returns after the commit."""
        now = self._ctx.now_ms()

        def operation(session: Any) -> batches.RecordedBatch:
            nonce.remember_or_refuse(session)
            return batches.record_in(session, draft, now)

        future = self._committer.submit(operation, worker_id=draft.worker_id)
        return await asyncio.wrap_future(future)

    # ---------------------------------------------------------------- helpers

    async def _worker(self, signer: bytes, *, touch: bool = False) -> Worker:
        worker_id = fingerprint(signer)
        ctx = self._ctx
        if touch:
            try:
                worker = await ctx.call(repo.touch_worker, ctx.db, worker_id, ctx.now_ms())
            except NotFoundError:
                raise not_registered(worker_id) from None
        else:
            found = await ctx.call(repo.get_worker, ctx.db, worker_id)
            if found is None:
                raise not_registered(worker_id)
            worker = found
        return require_active(worker)

    async def _runs(self) -> list[Run]:
        rows = await self._ctx.call(repo.list_runs, self._ctx.db)
        return [r for r in rows if r.run_id in self._ctx.runs and r.accepting_work]

    def _heartbeat_ms(self) -> int:
        return int(self._ctx.config.server.heartbeat_interval_s * 1000)

    # ---------------------------------------------------------------- Register

    @guarded
    async def Register(
        self, request: worker_pb2.RegisterRequest, context: Any
    ) -> worker_pb2.RegisterResponse:
        signer, payload = await self._gate.open(request, _M + "Register")
        _printable(payload.display_name, 64, "display_name")
        _printable(payload.client_version, 64, "client_version")
        ctx = self._ctx
        worker = await ctx.call(
            repo.upsert_worker,
            ctx.db,
            signer,
            display_name=payload.display_name,
            client_version=payload.client_version,
            capabilities=convert.capabilities_dict(payload.capabilities),
            now_ms=ctx.now_ms(),
        )
        runs = await self._runs()
        return worker_pb2.RegisterResponse(
            worker_id=worker.worker_id,
            state=convert.worker_state(worker.state),
            server_time_unix_ms=ctx.now_ms(),
            max_clock_skew_ms=int(ctx.config.server.max_clock_skew_s * 1000),
            heartbeat_interval_ms=self._heartbeat_ms(),
            runs=[convert.run_summary(r) for r in runs],
            coordinator_version=COORDINATOR_VERSION,
        )

    # ---------------------------------------------------------------- Heartbeat

    @guarded
    async def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: Any
    ) -> worker_pb2.HeartbeatResponse:
        signer, payload = await self._gate.open(request, _M + "Heartbeat")
        if len(payload.lease_ids) > 16:
            raise Refusal(R.REJECTION_REASON_STRUCTURAL, "list at most 16 lease_ids")
        worker = await self._worker(signer, touch=True)
        ctx = self._ctx
        states = await ctx.call(lease_states, ctx.db, list(payload.lease_ids))
        revoked = [
            lease_id
            for lease_id in payload.lease_ids
            if lease_id not in states
            or states[lease_id][0] != worker.worker_id
            or states[lease_id][1] is not LeaseState.OPEN
        ]
        runs = await self._runs()
        return worker_pb2.HeartbeatResponse(
            server_time_unix_ms=ctx.now_ms(),
            heartbeat_interval_ms=self._heartbeat_ms(),
            revoked_lease_ids=revoked,
            state=convert.worker_state(worker.state),
            runs=[convert.run_summary(r) for r in runs],
        )

    # ---------------------------------------------------------------- GetPolicy

    @guarded
    async def GetPolicy(
        self, request: worker_pb2.GetPolicyRequest, context: Any
    ) -> worker_pb2.GetPolicyResponse:
        ctx = self._ctx
        run = await ctx.call(repo.get_run, ctx.db, request.run_id)
        if run is None:
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL,
                f"no run {request.run_id[:64]!r}: Register lists the runs accepting work",
            )
        latest = run.latest_policy_version
        wanted = request.version if request.HasField("version") else latest
        if not 1 <= wanted <= latest:
            raise Refusal(
                R.REJECTION_REASON_STALE_POLICY,
                f"run {run.run_id} has policy versions 1..{latest}; version {wanted} does "
                "not exist (yet): ask for the latest",
            )
        have = request.have_version if request.HasField("have_version") else None
        if have is not None and have >= wanted:
            return worker_pb2.GetPolicyResponse()
        chain = []
        version = wanted
        while True:
            policy = await ctx.call(repo.get_policy, ctx.db, run.run_id, version)
            if policy is None:
                raise Refusal(
                    R.REJECTION_REASON_INTERNAL,
                    f"policy version {version} of run {run.run_id} is missing from the store",
                )
            chain.append(policy)
            # Stop at a full checkpoint, or at a delta that applies to what is held.
            if policy.kind.value == "full" or policy.parent_version is None:
                break
            if have is not None and policy.parent_version == have:
                break
            version = policy.parent_version
        chain.reverse()
        return worker_pb2.GetPolicyResponse(chain=[convert.policy_info(p) for p in chain])

    # ---------------------------------------------------------------- LeaseTasks

    def _pick_run(self, runs: list[Run], wanted: str) -> tuple[Run, RunState] | None:
        for run in runs:
            if wanted and run.run_id != wanted:
                continue
            state = self._ctx.runs[run.run_id]
            if run.latest_policy_version >= 1 and state.pool.free_count() > 0:
                return run, state
        return None

    async def _lease_room(self, run: Run, state: RunState, limit: int) -> int:
        """Tasks a new lease may hold under the run's back-pressure limit (at least one
        task whenever anything is below the limit, so a limit under G still makes work)."""
        ahead = await self._ctx.call(batches.rollouts_ahead, self._ctx.db, run.run_id)
        in_flight = state.pool.held_count() * run.group_size
        room = limit - ahead - in_flight
        if room <= 0:
            return 0
        return max(1, room // run.group_size)

    @guarded
    async def LeaseTasks(
        self, request: worker_pb2.LeaseTasksRequest, context: Any
    ) -> worker_pb2.LeaseTasksResponse:
        signer, payload = await self._gate.open(request, _M + "LeaseTasks")
        if payload.max_tasks < 1:
            raise Refusal(R.REJECTION_REASON_STRUCTURAL, "max_tasks must be at least 1")
        worker = await self._worker(signer)
        runs = await self._runs()
        if payload.run_id and payload.run_id not in {r.run_id for r in runs}:
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL,
                f"run {payload.run_id[:64]!r} is not accepting work here: pick one that "
                "Register or Heartbeat lists",
            )
        picked = self._pick_run(runs, payload.run_id)
        if picked is None:
            return worker_pb2.LeaseTasksResponse(retry_after_ms=_NO_WORK_RETRY_MS)
        run, state = picked
        config = state.config
        wanted_tasks = min(payload.max_tasks, config.max_tasks_per_lease)
        if config.max_rollouts_ahead is not None:
            room = await self._lease_room(run, state, config.max_rollouts_ahead)
            if room < 1:
                return worker_pb2.LeaseTasksResponse(retry_after_ms=_NO_WORK_RETRY_MS)
            wanted_tasks = min(wanted_tasks, room)
        reservation = state.pool.reserve(wanted_tasks)
        if reservation is None:
            return worker_pb2.LeaseTasksResponse(retry_after_ms=_NO_WORK_RETRY_MS)
        ctx = self._ctx
        issued = ctx.now_ms()
        deadline = issued + int(config.lease_ttl_s * 1000)
        seeds = {t.task_id: new_seeds(run.group_size) for t in reservation.tasks}
        try:
            lease = await ctx.call(
                repo.create_lease,
                ctx.db,
                run_id=run.run_id,
                worker_id=worker.worker_id,
                policy_version=run.latest_policy_version,
                tasks=[repo.LeaseTask(t.task_id, seeds[t.task_id]) for t in reservation.tasks],
                issued_ms=issued,
                deadline_ms=deadline,
            )
        except BaseException:
            state.pool.cancel(reservation)
            raise
        state.pool.bind(reservation, lease.lease_id)
        ctx.metrics.record_leases()
        message = common_pb2.Lease(
            lease_id=lease.lease_id,
            run_id=run.run_id,
            policy_version=lease.policy_version,
            reward_spec_hash=run.reward_spec_hash,
            reward_spec_json=run.reward_spec_json.encode(),
            group_size=run.group_size,
            sampling=common_pb2.SamplingParams(
                sampler=common_pb2.SAMPLER_GUMBEL_MAX_V1,
                temperature=config.temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=config.max_new_tokens,
            ),
            issued_unix_ms=issued,
            deadline_unix_ms=deadline,
            tasks=[
                common_pb2.LeasedTask(
                    task_id=t.task_id,
                    prompt_text=t.prompt_text,
                    prompt_token_ids=list(t.prompt_ids),
                    chat_template_sha256=state.pool.chat_template_sha256,
                    seeds=seeds[t.task_id],
                    task_json=t.task_json,
                )
                for t in reservation.tasks
            ],
        )
        return worker_pb2.LeaseTasksResponse(lease=message)

    # ---------------------------------------------------------------- SubmitRollouts

    @guarded
    async def SubmitRollouts(
        self, request: worker_pb2.SubmitRolloutsRequest, context: Any
    ) -> worker_pb2.SubmitRolloutsResponse:
        started = time.perf_counter()
        signer, payload, raw, nonce = self._gate.open_deferred(
            request, _M + "SubmitRollouts", view=SubmitView
        )
        ctx = self._ctx
        worker_id = fingerprint(signer)
        lease_id = payload.lease_id if 0 < len(payload.lease_id) <= 64 else None
        view = await ctx.call(batches.submission_view, ctx.db, worker_id, lease_id)
        if view.worker is None:
            raise not_registered(worker_id)
        worker = require_active(view.worker)
        try:
            check_envelope_fields(payload)
        except Refusal as refusal:
            # Without a usable idempotency key nothing can be stored for a retry.
            refused = convert.refused_response(refusal)
            ctx.record_submit(refused, time.perf_counter() - started)
            return refused
        lease = view.lease
        try:
            job, state = self._job(raw, payload, lease, view.run, worker, signer)
        except Refusal as refusal:
            draft = _draft(worker, payload, lease, payload_digest(payload))
            response = await self._store_refusal(draft, refusal, nonce)
            ctx.record_submit(response, time.perf_counter() - started)
            return response
        try:
            prepared = await self._preparer.prepare(job)
        except PreparerBrokenError as exc:
            # UNAVAILABLE, not INTERNAL: nothing was written and the same batch will
            # succeed later, so workers retry it as they do a lost connection.
            rejection = Refusal(R.REJECTION_REASON_INTERNAL, str(exc), retry_after_ms=1000)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                rejection.message,
                rpc.rejection_metadata(rejection.to_proto()),
            )
            raise AssertionError("grpc.aio context.abort() returned instead of raising") from exc
        draft = _draft(worker, payload, lease, prepared.payload_sha256)
        if prepared.refusal is not None:
            response = await self._store_refusal(draft, prepared.refusal, nonce)
            ctx.record_submit(response, time.perf_counter() - started)
            return response
        response = await self._accept(draft, prepared, state, worker, nonce)
        ctx.record_submit(
            response,
            time.perf_counter() - started,
            rollouts=len(prepared),
            tokens=prepared.n_tokens,
        )
        return response

    def _job(  # noqa: PLR0917  (the submission's parts, as SubmitRollouts has them)
        self,
        raw: bytes,
        payload: Any,
        lease: Any,
        run: Run | None,
        worker: Worker,
        signer: bytes,
    ) -> tuple[PrepareJob, RunState]:
        """The lease-side checks, then what `prepare_batch` needs to check the rest."""
        ctx = self._ctx
        if lease is None:
            raise Refusal(
                R.REJECTION_REASON_UNKNOWN_LEASE,
                f"no lease {payload.lease_id!r} exists here: submit only leases this "
                "coordinator issued",
            )
        state = ctx.runs.get(lease.run_id)
        if state is None:
            raise Refusal(
                R.REJECTION_REASON_UNKNOWN_LEASE,
                f"run {lease.run_id} of lease {lease.lease_id} is no longer served",
            )
        tasks = repo.lease_tasks(lease)
        prompts = {}
        for task in tasks:
            pooled = state.pool.get(task.task_id)
            if pooled is None:
                raise Refusal(
                    R.REJECTION_REASON_UNKNOWN_LEASE,
                    f"task {task.task_id} of lease {lease.lease_id} is no longer in the run's "
                    "task set: lease new work",
                )
            prompts[task.task_id] = pooled.prompt_ids
        now = ctx.now_ms()
        lease_view = LeaseView(lease=lease, tasks=tasks, prompts=prompts)
        check_lease_open(lease_view, worker.worker_id, now)
        assert run is not None  # a lease's run row is never deleted
        check_policy_window(
            int(payload.policy_version), run.latest_policy_version, run.max_policy_lag
        )
        job = PrepareJob(
            payload=raw,
            lease_id=lease.lease_id,
            lease_policy_version=lease.policy_version,
            tasks=tuple(tasks),
            prompts=prompts,
            run_id=run.run_id,
            worker_key_hex=signer.hex(),
            group_size=run.group_size,
            max_new_tokens=state.config.max_new_tokens,
            reward_spec=state.reward_spec,
            reward_spec_hash=run.reward_spec_hash,
            now_ms=now,
            object_prefix=f"runs/{run.run_id}/batches/{worker.worker_id}/",
            store=self._store,
        )
        return job, state

    async def _store_refusal(
        self, draft: batches.BatchDraft, refusal: Refusal, nonce: PendingNonce
    ) -> worker_pb2.SubmitRolloutsResponse:
        rejected = batches.BatchDraft(
            worker_id=draft.worker_id,
            idempotency_key=draft.idempotency_key,
            payload_sha256=draft.payload_sha256,
            run_id=draft.run_id,
            lease_id=draft.lease_id,
            policy_version=draft.policy_version,
            rejection=batches.Rejection(
                refusal.reason_name,
                refusal.message[:1024],
                ban_after=self._ctx.config.audit.ban_after_malformed,
                ban_window=self._ctx.config.audit.malformed_window,
            ),
        )
        try:
            recorded = await self._record(rejected, nonce)
        except IdempotencyConflictError as exc:
            return convert.refused_response(Refusal(R.REJECTION_REASON_CONFLICT, str(exc)))
        if not recorded.created:
            # A retry of a batch stored before: its original verdict stands.
            return convert.submit_response(recorded.batch, replayed=True)
        response = convert.submit_response(recorded.batch, replayed=False)
        # Keep the pointers (task, sample) of this answer; the stored copy has none.
        response.rejection.CopyFrom(refusal.to_proto())
        if recorded.banned:
            log.warning("worker %s banned: too many malformed or replayed batches", draft.worker_id)
            response.rejection.message = (
                f"{response.rejection.message[:800]}; this key is now banned: too many of its "
                "recent batches were malformed, for another key's lease or replayed"
            )
        return response

    async def _accept(
        self,
        draft: batches.BatchDraft,
        batch: PreparedBatch,
        state: RunState,
        worker: Worker,
        nonce: PendingNonce,
    ) -> worker_pb2.SubmitRolloutsResponse:
        ctx = self._ctx
        key = batch.object_key
        if batch.parquet:  # not written by `prepare_batch`
            # Off the event loop, and not on the database threads: the object's fsyncs
            # would hold them.
            await asyncio.to_thread(ctx.objects.put, key, batch.parquet)
        audit = should_audit(worker.valid_streak, ctx.config.audit, self._rng)
        kinds = [AuditKind(k) for k in ctx.config.audit.kinds]
        # A completion another worker already had accepted is what a copier sends, but
        # also what honest workers write once the policy is confident (a learned fix).
        # Refusing it would punish the best samples; replaying this lease's seeds tells
        # the two apart: a copy made under other seeds does not reproduce unless the
        # policy is that certain, and then nothing was gained by copying. Without the
        # sampling replay there is no such test, and a duplicate is refused.
        on_duplicate = kinds if AuditKind.SAMPLING in kinds else None
        accepted = batches.BatchDraft(
            worker_id=draft.worker_id,
            idempotency_key=draft.idempotency_key,
            payload_sha256=draft.payload_sha256,
            run_id=draft.run_id,
            lease_id=draft.lease_id,
            policy_version=draft.policy_version,
            object_key=key,
            samples=list(
                map(
                    batches.SampleIndex._make,
                    zip(
                        range(len(batch)),
                        batch.task_ids,
                        batch.sample_indices,
                        batch.completion_sha256,
                        batch.n_completion_tokens,
                        batch.rewards,
                        strict=True,
                    ),
                )
            ),
            audit_kinds=kinds if audit else [],
            duplicate_audit_kinds=on_duplicate,
        )
        try:
            recorded = await self._record(accepted, nonce)
        except DuplicateCompletionError as exc:
            refusal = Refusal(R.REJECTION_REASON_DUPLICATE, str(exc))
            return await self._store_refusal(draft, refusal, nonce)
        except LeaseNotOpenError as exc:
            reason = R.Value(f"REJECTION_REASON_{exc.reason}")
            return await self._store_refusal(draft, Refusal(reason, str(exc)), nonce)
        except IdempotencyConflictError as exc:
            return convert.refused_response(Refusal(R.REJECTION_REASON_CONFLICT, str(exc)))
        if recorded.created:
            ctx.notify_accepted()
            state.pool.give_back(draft.lease_id or "")
        return convert.submit_response(recorded.batch, replayed=not recorded.created)

    # ---------------------------------------------------------------- GetStatus

    @guarded
    async def GetStatus(
        self, request: worker_pb2.GetStatusRequest, context: Any
    ) -> worker_pb2.GetStatusResponse:
        key = bytes(request.worker_public_key)
        if key and len(key) != PUBLIC_KEY_BYTES:
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL,
                f"worker_public_key must be empty or {PUBLIC_KEY_BYTES} bytes, got {len(key)}",
            )
        if len(request.batch_ids) > _MAX_STATUS_BATCHES:
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL, f"ask for at most {_MAX_STATUS_BATCHES} batch ids"
            )
        if request.batch_ids and not key:
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL, "batch_ids need the worker_public_key they belong to"
            )
        ctx = self._ctx
        response = worker_pb2.GetStatusResponse(
            workers_online=await ctx.call(
                workers_online,
                ctx.db,
                now_ms=ctx.now_ms(),
                heartbeat_interval_ms=self._heartbeat_ms(),
            ),
            runs=[convert.run_summary(r) for r in await self._runs()],
        )
        if key:
            worker, found = await ctx.call(
                worker_and_batches, ctx.db, fingerprint(key), list(request.batch_ids)
            )
            if worker is not None:
                response.worker.CopyFrom(convert.worker_status(worker))
                response.batches.extend(
                    convert.batch_status(found[b]) for b in request.batch_ids if b in found
                )
        return response

    # ---------------------------------------------------------------- ReleaseLease

    @guarded
    async def ReleaseLease(
        self, request: worker_pb2.ReleaseLeaseRequest, context: Any
    ) -> worker_pb2.ReleaseLeaseResponse:
        signer, payload = await self._gate.open(request, _M + "ReleaseLease")
        _printable(payload.reason, 256, "reason")
        worker = await self._worker(signer)
        ctx = self._ctx
        try:
            released = await ctx.call(
                repo.release_lease, ctx.db, payload.lease_id, worker.worker_id, ctx.now_ms()
            )
        except NotFoundError as exc:
            raise Refusal(R.REJECTION_REASON_UNKNOWN_LEASE, str(exc)) from exc
        if released:
            for state in ctx.runs.values():
                state.pool.give_back(payload.lease_id)
        return worker_pb2.ReleaseLeaseResponse(released=released)

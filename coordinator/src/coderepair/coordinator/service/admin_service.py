"""AdminService: workers, bans, runs, audits and statistics for operators.

Every call, reads included, must be signed by a key listed in ``admin.public_keys``;
any other signer gets NOT_AUTHORIZED. Pages use an offset as their opaque token.
"""

from __future__ import annotations

from typing import Any

from coderepair.coordinator.service import convert
from coderepair.coordinator.service.context import ServiceContext
from coderepair.coordinator.service.gate import EnvelopeGate, Refusal, guarded, reason_value
from coderepair.coordinator.service.stats import (
    DEFAULT_WINDOW_MS,
    collect_stats,
    list_workers,
    online_cutoff_ms,
    run_progress,
)
from coderepair.coordinator.storage import audits, repo
from coderepair.coordinator.storage.errors import NotFoundError
from coderepair.coordinator.storage.models import Run, Worker
from coderepair.protocol import rpc
from coderepair.v1 import admin_pb2, admin_pb2_grpc, common_pb2

__all__ = ["AdminServicer"]

R = common_pb2.RejectionReason
_MAX_STATS_WINDOW_MS = 365 * 24 * 3600 * 1000
_M = f"/{rpc.ADMIN_SERVICE}/"
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000


def _page(page: common_pb2.PageRequest) -> tuple[int, int]:
    size = page.page_size or _DEFAULT_PAGE
    if size > _MAX_PAGE:
        raise Refusal(R.REJECTION_REASON_STRUCTURAL, f"page_size is at most {_MAX_PAGE}")
    token = page.page_token
    if token and not token.isdigit():
        raise Refusal(
            R.REJECTION_REASON_STRUCTURAL,
            "page_token is not one this coordinator issued: pass next_page_token unchanged",
        )
    return int(token or 0), size


def _reason(text: str) -> str:
    if not 1 <= len(text) <= 512:
        raise Refusal(R.REJECTION_REASON_STRUCTURAL, "reason must be 1 to 512 characters")
    return text


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """The operator-facing service over a `ServiceContext`."""

    def __init__(self, ctx: ServiceContext, gate: EnvelopeGate) -> None:
        self._ctx = ctx
        self._gate = gate
        self._admins = {bytes.fromhex(k) for k in ctx.config.admin.public_keys}

    async def _open(self, request: Any, method: str) -> Any:
        signer, payload = await self._gate.open(request, _M + method)
        if signer not in self._admins:
            raise Refusal(
                R.REJECTION_REASON_NOT_AUTHORIZED,
                "this key is not an admin key of the coordinator: add its public key to "
                "admin.public_keys in the coordinator's config",
            )
        return payload

    def _heartbeat_ms(self) -> int:
        return int(self._ctx.config.server.heartbeat_interval_s * 1000)

    def _info(self, worker: Worker) -> admin_pb2.WorkerInfo:
        cutoff = online_cutoff_ms(self._ctx.now_ms(), self._heartbeat_ms())
        return convert.worker_info(worker, online=worker.last_seen_unix_ms >= cutoff)

    @guarded
    async def ListWorkers(
        self, request: admin_pb2.ListWorkersRequest, context: Any
    ) -> admin_pb2.ListWorkersResponse:
        payload = await self._open(request, "ListWorkers")
        offset, size = _page(payload.page)
        state = None
        if payload.HasField("state"):
            if payload.state not in convert.WORKER_STATE_FROM_PROTO:
                raise Refusal(R.REJECTION_REASON_STRUCTURAL, "state must be ACTIVE or BANNED")
            state = convert.WORKER_STATE_FROM_PROTO[payload.state]
        ctx = self._ctx
        since = (
            online_cutoff_ms(ctx.now_ms(), self._heartbeat_ms()) if payload.online_only else None
        )
        rows = await ctx.call(
            list_workers, ctx.db, state=state, online_since_ms=since, offset=offset, limit=size + 1
        )
        return admin_pb2.ListWorkersResponse(
            workers=[self._info(w) for w in rows[:size]],
            next_page_token=str(offset + size) if len(rows) > size else "",
        )

    @guarded
    async def BanWorker(
        self, request: admin_pb2.BanWorkerRequest, context: Any
    ) -> admin_pb2.BanWorkerResponse:
        payload = await self._open(request, "BanWorker")
        ctx = self._ctx
        until = payload.until_unix_ms if payload.HasField("until_unix_ms") else None
        try:
            worker, voided = await ctx.call(
                audits.ban_worker,
                ctx.db,
                payload.worker_id,
                reason=_reason(payload.reason),
                until_ms=until,
                void_pending=payload.void_pending,
                now_ms=ctx.now_ms(),
            )
        except NotFoundError as exc:
            raise Refusal(R.REJECTION_REASON_STRUCTURAL, str(exc)) from exc
        return admin_pb2.BanWorkerResponse(worker=self._info(worker), batches_voided=voided)

    @guarded
    async def UnbanWorker(
        self, request: admin_pb2.UnbanWorkerRequest, context: Any
    ) -> admin_pb2.UnbanWorkerResponse:
        payload = await self._open(request, "UnbanWorker")
        _reason(payload.reason)
        ctx = self._ctx
        try:
            worker = await ctx.call(audits.unban_worker, ctx.db, payload.worker_id, ctx.now_ms())
        except NotFoundError as exc:
            raise Refusal(R.REJECTION_REASON_STRUCTURAL, str(exc)) from exc
        return admin_pb2.UnbanWorkerResponse(worker=self._info(worker))

    @guarded
    async def ListRuns(
        self, request: admin_pb2.ListRunsRequest, context: Any
    ) -> admin_pb2.ListRunsResponse:
        payload = await self._open(request, "ListRuns")
        offset, size = _page(payload.page)
        ctx = self._ctx
        runs: list[Run] = await ctx.call(repo.list_runs, ctx.db)
        progress = {p.run_id: p for p in await ctx.call(run_progress, ctx.db)}
        chosen = runs[offset : offset + size]
        return admin_pb2.ListRunsResponse(
            runs=[
                admin_pb2.RunInfo(
                    summary=convert.run_summary(run),
                    created_unix_ms=run.created_unix_ms,
                    head_cursor=progress[run.run_id].head_cursor,
                    acked_cursor=progress[run.run_id].acked_cursor,
                    trainer_step=progress[run.run_id].trainer_step,
                    open_leases=progress[run.run_id].open_leases,
                )
                for run in chosen
            ],
            next_page_token=str(offset + size) if len(runs) > offset + size else "",
        )

    @guarded
    async def ListAudits(
        self, request: admin_pb2.ListAuditsRequest, context: Any
    ) -> admin_pb2.ListAuditsResponse:
        payload = await self._open(request, "ListAudits")
        offset, size = _page(payload.page)
        states = None
        if payload.HasField("verdict"):
            if payload.verdict not in convert.AUDIT_STATES_FOR_VERDICT:
                raise Refusal(R.REJECTION_REASON_STRUCTURAL, "verdict is unset or unknown")
            states = convert.AUDIT_STATES_FOR_VERDICT[payload.verdict]
        ctx = self._ctx
        jobs = await ctx.call(
            audits.list_audit_jobs,
            ctx.db,
            worker_id=payload.worker_id if payload.HasField("worker_id") else None,
            batch_id=payload.batch_id if payload.HasField("batch_id") else None,
            limit=offset + size + 1,
        )
        if states is not None:
            jobs = [j for j in jobs if j.state in states]
        page = jobs[offset : offset + size]
        return admin_pb2.ListAuditsResponse(
            audits=[convert.audit_info(j) for j in page],
            next_page_token=str(offset + size) if len(jobs) > offset + size else "",
        )

    @guarded
    async def GetStats(
        self, request: admin_pb2.GetStatsRequest, context: Any
    ) -> admin_pb2.GetStatsResponse:
        payload = await self._open(request, "GetStats")
        if payload.window_ms > _MAX_STATS_WINDOW_MS:
            # A uint64 past the database's integers: refused, not an INTERNAL error.
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL,
                f"window_ms is at most {_MAX_STATS_WINDOW_MS} (365 days); 0 = the default",
            )
        ctx = self._ctx
        stats = await ctx.call(
            collect_stats,
            ctx.db,
            now_ms=ctx.now_ms(),
            heartbeat_interval_ms=self._heartbeat_ms(),
            window_ms=int(payload.window_ms) or DEFAULT_WINDOW_MS,
            run_id=payload.run_id,
        )
        run = stats.runs[-1] if stats.runs else None
        return admin_pb2.GetStatsResponse(
            window_ms=stats.window_ms,
            workers_online=stats.workers_online,
            workers_banned=stats.workers_banned,
            leases_open=stats.leases_open,
            audits_pending=stats.batches_pending_audit,
            rollouts_per_second=stats.rollouts_per_second,
            batches_accepted=stats.batches_accepted,
            rejections=[
                admin_pb2.ReasonCount(reason=reason_value(name), count=n)
                for name, n in sorted(stats.rejections.items())
            ],
            reward_mean=stats.reward_mean,
            latest_policy_version=run.latest_policy_version if run else 0,
            head_cursor=run.head_cursor if run else 0,
            acked_cursor=run.acked_cursor if run else 0,
        )

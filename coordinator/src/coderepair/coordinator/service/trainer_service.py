"""TrainerService: the accepted-rollout stream, cursor acks and policy publication.

Only the run's trainer key (`RunSummary.trainer_public_key`) may call these; any other
signer gets NOT_AUTHORIZED.

StreamRollouts reads the index in cursor order (`storage.batches.read_stream`, which
never splits a GRPO group), loads each batch's Parquet record once, and yields rows.
Back-pressure is gRPC flow control: the handler is an async generator, so it reads
the next page from the store only when the previous rows were taken by the transport,
and a slow trainer holds at most one page in this process. In follow mode it waits at
the head for this process's next acceptance (or `stream_poll_s`, for acceptances by
other replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from coderepair.coordinator.service.context import ServiceContext
from coderepair.coordinator.service.gate import (
    EnvelopeGate,
    Refusal,
    guarded,
    internal_error,
    refusal_from,
)
from coderepair.coordinator.storage import batches, repo
from coderepair.coordinator.storage.errors import ConflictError, NotFoundError
from coderepair.coordinator.storage.models import PolicyKind, Run
from coderepair.protocol import rpc
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.manifest import SignedManifest, verify_manifest
from coderepair.protocol.rollout import RolloutRecord, from_parquet_bytes
from coderepair.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

__all__ = ["TrainerServicer"]

log = logging.getLogger(__name__)
R = common_pb2.RejectionReason
_M = f"/{rpc.TRAINER_SERVICE}/"
_CACHED_OBJECTS = 8
_MAX_METRICS = 64


def _sample(record: RolloutRecord) -> common_pb2.RolloutSample:
    timings = record.timings
    return common_pb2.RolloutSample(
        task_id=record.task_id,
        sample_index=record.sample_index,
        seed=record.seed,
        prompt_token_ids=record.prompt_ids,
        completion_token_ids=record.completion_ids,
        behaviour_logprobs=record.behaviour_logprobs,
        completion_text=record.completion_text,
        patch=record.patch,
        reward=record.reward,
        reward_components=record.reward_components,
        test_log_sha256=record.test_log_sha256,
        proof=record.proof,
        finish_reason=common_pb2.FINISH_REASON_STOP,
        timings=common_pb2.SampleTimings(
            generate_ms=round(timings.get("generate", 0.0) * 1000),
            reward_ms=round(timings.get("reward", 0.0) * 1000),
            proof_ms=round(timings.get("proof", 0.0) * 1000),
        ),
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """The trainer-facing service over a `ServiceContext`."""

    def __init__(self, ctx: ServiceContext, gate: EnvelopeGate) -> None:
        self._ctx = ctx
        self._gate = gate

    async def _authorize(self, request: Any, method: str) -> tuple[Run, Any]:
        signer, payload = await self._gate.open(request, _M + method)
        run = await self._ctx.call(repo.get_run, self._ctx.db, payload.run_id)
        if run is None:
            raise Refusal(
                R.REJECTION_REASON_STRUCTURAL,
                f"no run {payload.run_id[:64]!r} at this coordinator: check the trainer's run_id",
            )
        if signer != run.trainer_public_key:
            raise Refusal(
                R.REJECTION_REASON_NOT_AUTHORIZED,
                f"only run {run.run_id}'s trainer key may call {method}: sign with the key "
                "named as trainer_public_key in the coordinator's config",
            )
        return run, payload

    # ---------------------------------------------------------------- StreamRollouts

    async def StreamRollouts(
        self, request: trainer_pb2.StreamRolloutsRequest, context: Any
    ) -> AsyncIterator[trainer_pb2.RolloutRow]:
        try:
            run, payload = await self._authorize(request, "StreamRollouts")
            async for row in self._rows(run, payload):
                yield row
        except ProtocolError as exc:
            await rpc.abort_with_rejection(context, refusal_from(exc).to_proto())
        except Exception:
            log.exception("StreamRollouts failed")
            await rpc.abort_with_rejection(context, internal_error().to_proto())

    async def _rows(
        self, run: Run, payload: trainer_pb2.StreamPayload
    ) -> AsyncIterator[trainer_pb2.RolloutRow]:
        ctx = self._ctx
        cursor = int(payload.after_cursor)
        cache: OrderedDict[str, list[RolloutRecord]] = OrderedDict()
        page = ctx.config.server.stream_batch_rows
        while True:
            woken = ctx.accepted  # armed before the read, so no acceptance is missed
            rows = await ctx.call(
                batches.read_stream,
                ctx.db,
                run.run_id,
                cursor,
                page,
                int(payload.min_policy_version),
            )
            for row in rows:
                records = await self._records(row.object_key, cache)
                record = records[row.row_index]
                yield trainer_pb2.RolloutRow(
                    cursor=row.cursor,
                    run_id=row.run_id,
                    batch_id=row.batch_id,
                    lease_id=row.lease_id,
                    worker_id=row.worker_id,
                    policy_version=row.policy_version,
                    group_size=run.group_size,
                    sample=_sample(record),
                    accepted_unix_ms=row.accepted_unix_ms,
                    audit_pending=row.audit_pending,
                )
                cursor = row.cursor
            if rows:
                continue
            if not payload.follow:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=ctx.config.server.stream_poll_s)

    async def _records(
        self, key: str, cache: OrderedDict[str, list[RolloutRecord]]
    ) -> list[RolloutRecord]:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        data = await self._ctx.call(self._ctx.objects.get, key)
        records = await asyncio.to_thread(from_parquet_bytes, data)
        cache[key] = records
        if len(cache) > _CACHED_OBJECTS:
            cache.popitem(last=False)
        return records

    # ---------------------------------------------------------------- AckCursor

    @guarded
    async def AckCursor(
        self, request: trainer_pb2.AckCursorRequest, context: Any
    ) -> trainer_pb2.AckCursorResponse:
        run, payload = await self._authorize(request, "AckCursor")
        ctx = self._ctx
        result = await ctx.call(
            batches.ack_cursor,
            ctx.db,
            run.run_id,
            int(payload.cursor),
            int(payload.trainer_step),
            ctx.now_ms(),
            consumed=int(payload.consumed_cursor),
        )
        return trainer_pb2.AckCursorResponse(
            acked_cursor=result.acked_cursor,
            head_cursor=result.head_cursor,
            consumed_cursor=result.consumed_cursor,
        )

    # ---------------------------------------------------------------- PublishPolicy

    @guarded
    async def PublishPolicy(
        self, request: trainer_pb2.PublishPolicyRequest, context: Any
    ) -> trainer_pb2.PublishPolicyResponse:
        run, payload = await self._authorize(request, "PublishPolicy")
        try:
            draft = self._policy_draft(run, payload)
            ctx = self._ctx
            policy = await ctx.call(repo.publish_policy, ctx.db, draft, ctx.now_ms())
        except (Refusal, ConflictError, NotFoundError, ProtocolError) as exc:
            refusal = refusal_from(exc)
            if isinstance(exc, ConflictError | NotFoundError):
                refusal = Refusal(R.REJECTION_REASON_CONFLICT, str(exc))
            return trainer_pb2.PublishPolicyResponse(
                accepted=False,
                rejection=refusal.to_proto(),
                latest_version=run.latest_policy_version,
            )
        return trainer_pb2.PublishPolicyResponse(accepted=True, latest_version=policy.version)

    def _policy_draft(self, run: Run, payload: trainer_pb2.PublishPayload) -> repo.PolicyDraft:
        def structural(message: str) -> Refusal:
            return Refusal(R.REJECTION_REASON_STRUCTURAL, message)

        signed = SignedManifest.from_bytes(bytes(payload.manifest_json))
        manifest = verify_manifest(signed, run.trainer_public_key)
        if manifest.run_id != run.run_id or manifest.version != payload.version:
            raise structural(
                f"the manifest is for {manifest.run_id} v{manifest.version}, the request for "
                f"{run.run_id} v{payload.version}: publish the manifest of this version"
            )
        if manifest.base_model != run.base_model_id:
            raise structural(
                f"the manifest's base model {manifest.base_model!r} is not the run's "
                f"{run.base_model_id!r}"
            )
        if manifest.tokenizer_sha256 != run.tokenizer_sha256:
            raise structural("the manifest's tokenizer_sha256 is not the run's")
        listed = {s.name: s for s in manifest.shards}
        given = {s.name: s for s in payload.shards}
        if set(listed) != set(given) or len(given) != len(payload.shards):
            raise structural(
                "shards must name exactly the manifest's shard files, each once: "
                f"manifest has {sorted(listed)[:5]}…, request has {sorted(given)[:5]}…"
            )
        for name, shard in given.items():
            entry = listed[name]
            if shard.size_bytes != entry.size or shard.sha256 != entry.sha256 or not shard.urls:
                raise structural(
                    f"shard {name}: size/sha256 must equal the manifest's and at least one "
                    "URL must be given"
                )
        metrics = dict(payload.metrics)
        if len(metrics) > _MAX_METRICS or not all(math.isfinite(v) for v in metrics.values()):
            raise structural(f"metrics: at most {_MAX_METRICS} finite numbers")
        return repo.PolicyDraft(
            run_id=run.run_id,
            version=int(payload.version),
            parent_version=manifest.parent_version,
            kind=PolicyKind(manifest.kind),
            manifest_json=bytes(payload.manifest_json),
            shards=[
                {
                    "name": s.name,
                    "urls": list(s.urls),
                    "size_bytes": int(s.size_bytes),
                    "sha256": s.sha256,
                    "urls_expire_unix_ms": int(s.urls_expire_unix_ms),
                }
                for s in payload.shards
            ],
            trained_through_cursor=int(payload.trained_through_cursor),
            trainer_step=int(payload.trainer_step),
            metrics=metrics,
        )

"""The work loop: lease → generate → verify → prove → submit, as an asyncio pipeline.

Three stages run concurrently, joined by queues, so that generation never waits on
verification or submission:

* **produce** leases tasks, makes sure the engine holds the lease's policy version
  (swapping a downloaded version in *between* leases, never during one), and generates
  the group of samples in a thread (the engine releases the GIL in torch);
* **verify** parses each completion's patch, applies it to the task and runs its tests
  in the sandbox (at most ``max_sandboxes`` jobs at once, in threads), computes the
  reward by the lease's reward spec and builds the rollout samples with their proofs;
* **submit** sends each batch under a fresh idempotency key and retries it (same key,
  fresh signature) until the coordinator answers, across coordinator restarts: a batch
  is never lost, and never stored twice.

Alongside, a heartbeat keeps the coordinator informed and learns about revoked leases and
new policy versions, and a policy watcher downloads new versions in the background.

Leaving (`WorkLoop.drain`): no new lease is taken; the lease being generated is released
as soon as its generation returns (its tasks go back to the pool); leases already generated are
verified and submitted, and whatever is still in hand when ``drain_timeout_s`` passes is
released too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.task import RepairTask
from coderepair.v1 import common_pb2, worker_pb2
from coderepair.worker.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from coderepair.worker.engines.base import Engine, Generation, GenerationRequest, SamplingParams
from coderepair.worker.sandbox.base import JobResult, Sandbox, SandboxError
from coderepair.worker.verify import EMPTY_LOG_SHA256, Plan, plan
from coderepair.worker.view import View, WorkerStats

if TYPE_CHECKING:
    import torch

    from coderepair.worker.p2p import PeerNetwork
    from coderepair.worker.weights import PolicyWeights

__all__ = ["LoopConfig", "LoopError", "PolicyHolder", "WorkLoop"]

log = logging.getLogger(__name__)
R = common_pb2.RejectionReason
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


class LoopError(ProtocolError):
    """The loop cannot go on (the policy cannot be fetched, the key was banned, ...)."""


@dataclass(frozen=True)
class LoopConfig:
    """Knobs of the loop (from the worker config and `join`'s flags)."""

    run_id: str
    max_tasks: int = 2
    max_sandboxes: int = 2
    heartbeat_s: float = 10.0
    policy_poll_s: float = 15.0
    drain_timeout_s: float = 60.0
    sandbox_retries: int = 1


# ---------------------------------------------------------------- the policy


class PolicyHolder:
    """The policy version the engine runs, and the next one downloaded in the background.

    `PolicyWeights` verifies and holds the tensors; the engine gets them through
    `Engine.apply_weights` only in `swap`, which the produce stage calls between leases.
    At most one downloaded version waits for its swap: a delta mutates the held tensors
    in place, so the next one is fetched only after the previous one reached the engine.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        weights: PolicyWeights,
        engine: Engine,
        *,
        run_id: str,
        view: View,
        stats: WorkerStats,
        peers: PeerNetwork | None = None,
    ) -> None:
        self._client = client
        self._peers = peers
        self._weights = weights
        self._engine = engine
        self._run_id = run_id
        self._view = view
        self._stats = stats
        self._lock = asyncio.Lock()
        self._pending: tuple[int, Mapping[str, torch.Tensor]] | None = None
        self.engine_version = 0

    @property
    def held_version(self) -> int:
        held = self._weights.held
        return int(held.version) if held is not None else 0

    async def fetch(self, version: int | None = None) -> int:
        """Download and verify ``version`` (default: the latest) unless already held.

        Returns the version held afterwards. Raises `LoopError` when the coordinator's
        chain cannot be taken (bad signature, bad hash, unreachable shards).
        """
        async with self._lock:
            if self._pending is not None:
                return self.held_version
            have = self.held_version or None
            answer = await self._client.get_policy(self._run_id, have_version=have, version=version)
            if not answer.chain:
                return self.held_version
            changed: dict[str, torch.Tensor] = {}
            for info in answer.chain:
                changed = await self._take(info, changed)
            held = self.held_version
            # Several links (a full version and deltas after it): hand over everything.
            tensors = dict(self._weights.state_dict) if len(answer.chain) > 1 else changed
            self._pending = (held, tensors)
            return held

    async def _take(
        self, info: common_pb2.PolicyInfo, changed: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        sources = {s.name: list(s.urls) for s in info.shards}
        total = sum(int(s.size_bytes) for s in info.shards)
        label = f"policy v{info.version}"
        self._view.download(label, total)
        started = time.monotonic()
        try:
            if self._peers is not None:
                # Peers first, the origin as fallback; every byte is hash-checked either way.
                if info.peer_bootstrap:
                    await self._peers.connect(list(info.peer_bootstrap))
                sources = await self._peers.prefetch(bytes(info.manifest_json), sources)
            update = await asyncio.to_thread(
                self._weights.apply, bytes(info.manifest_json), sources
            )
        except ProtocolError as exc:
            raise LoopError(f"policy version {info.version} refused: {exc}") from exc
        self._view.downloaded(label, update.download_bytes)
        self._view.event(
            "policy_downloaded",
            f"policy v{info.version} ({update.kind}, {update.download_bytes} bytes, "
            f"{update.changed_elements} values) verified in {time.monotonic() - started:.1f} s",
            version=int(info.version),
            policy_kind=update.kind,
            bytes=update.download_bytes,
        )
        if self._peers is not None:
            with contextlib.suppress(ProtocolError):  # only manifests over 1 MiB are refused
                await self._peers.announce(bytes(info.manifest_json))
        return {**changed, **update.tensors}

    @property
    def pending(self) -> bool:
        return self._pending is not None

    async def swap(self) -> bool:
        """Give the engine the downloaded version, if one waits; True when it did."""
        async with self._lock:
            if self._pending is None:
                return False
            version, tensors = self._pending
            await asyncio.to_thread(self._engine.apply_weights, tensors)
            self._pending = None
            old, self.engine_version = self.engine_version, version
            self._stats.policy_version = version
            self._view.event(
                "policy_swapped",
                f"engine now runs policy v{version} (was v{old})",
                version=version,
                previous=old,
            )
            return True

    async def ensure(self, version: int) -> None:
        """Make the engine run exactly ``version`` (fetching it now if needed)."""
        if self.engine_version == version:
            return
        await self.swap()
        if self.engine_version != version:
            await self.fetch(version)
            await self.swap()
        if self.engine_version != version:
            raise LoopError(
                f"the lease is for policy v{version} but the coordinator's chain gave "
                f"v{self.engine_version}; lease again"
            )


# ---------------------------------------------------------------- the loop


@dataclass
class _Work:
    """One lease travelling through the pipeline."""

    lease: common_pb2.Lease
    tasks: dict[str, RepairTask]
    spec: RewardSpec
    generations: list[Generation] = field(default_factory=list)
    generate_s: float = 0.0
    samples: list[common_pb2.RolloutSample] = field(default_factory=list)


class WorkLoop:
    """Runs the pipeline until `drain` is called or a fatal error happens."""

    def __init__(
        self,
        *,
        client: CoordinatorClient,
        engine: Engine,
        sandbox: Sandbox,
        policy: PolicyHolder,
        config: LoopConfig,
        stats: WorkerStats,
        view: View,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self._client = client
        self._engine = engine
        self._sandbox = sandbox
        self._policy = policy
        self._config = config
        self.stats = stats
        self._view = view
        self._now_ms = now_ms or (lambda: int(time.time() * 1000) + client.clock_offset_ms)
        self._draining = asyncio.Event()
        self._to_verify: asyncio.Queue[_Work] = asyncio.Queue(maxsize=4)
        self._to_submit: asyncio.Queue[_Work] = asyncio.Queue()
        self._held: dict[str, common_pb2.Lease] = {}
        # Leases whose release call has not answered yet: still in hand until it does.
        self._releasing: set[str] = set()
        self._revoked: set[str] = set()
        self._generating: str | None = None
        self._leasing = False
        self._sandboxes = asyncio.Semaphore(config.max_sandboxes)
        self._refresh = asyncio.Event()
        self._reward_sum = 0.0
        self._latest_seen = 0

    # ------------------------------------------------------------ control

    @property
    def held_lease_ids(self) -> list[str]:
        return list(self._held)

    def drain(self) -> None:
        """Stop taking work; finish or release what is in hand (see the module docstring)."""
        if not self._draining.is_set():
            self._draining.set()
            self.stats.state = "leaving"
            self._view.event("draining", "leaving: finishing or releasing the leases in hand")

    async def run(self) -> None:
        """Run every stage until drained; release whatever is left; return."""
        self.stats.state = "working"
        stages = [
            asyncio.create_task(self._produce(), name="produce"),
            asyncio.create_task(self._verify(), name="verify"),
            asyncio.create_task(self._submit(), name="submit"),
        ]
        helpers = [
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._watch_policy(), name="policy"),
            asyncio.create_task(self._tick(), name="tick"),
        ]
        try:
            await self._wait_stages(stages)
        finally:
            for task in stages + helpers:
                task.cancel()
            for task in stages + helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._release_all("the worker is leaving")
            self.stats.state = "stopped"

    async def _wait_stages(self, stages: list[asyncio.Task[None]]) -> None:
        # A stage that fails ends the loop with its error; draining ends it when the
        # pipeline is empty or the drain timeout passes, whichever comes first.
        drain_wait = asyncio.create_task(self._draining.wait())
        try:
            done, _ = await asyncio.wait([*stages, drain_wait], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not drain_wait:
                    _raise_if_failed(task)
            deadline = time.monotonic() + self._config.drain_timeout_s
            while time.monotonic() < deadline:
                for task in stages:
                    if task.done():
                        _raise_if_failed(task)
                if self._pipeline_empty():
                    return
                await asyncio.sleep(0.05)
            log.warning("drain timeout: releasing %d lease(s) still in hand", len(self._held))
        finally:
            drain_wait.cancel()

    def _pipeline_empty(self) -> bool:
        return (
            not self._leasing
            and self._generating is None
            and self._to_verify.empty()
            and self._to_submit.empty()
            and not self._held
            and not self._releasing
        )

    async def _release_all(self, reason: str) -> None:
        # A release that `run` cancelled mid-call is still in `_releasing`: send it again.
        for lease_id in [*self._held, *sorted(self._releasing - set(self._held))]:
            await self._release(lease_id, reason)

    async def _release(self, lease_id: str, reason: str) -> None:
        # The lease counts as in hand until the coordinator answers: were it dropped
        # before, the drain would see an empty pipeline, cancel this call mid-flight and
        # leave the tasks held by no one until the lease's deadline.
        self._held.pop(lease_id, None)
        self._releasing.add(lease_id)
        try:
            released = await self._client.release(lease_id, reason)
        except CoordinatorError as exc:
            self._releasing.discard(lease_id)
            log.warning("could not release lease %s (%s): it expires on its own", lease_id, exc)
            return
        self._releasing.discard(lease_id)
        self._view.event(
            "lease_released",
            f"lease {lease_id} released ({reason})",
            lease_id=lease_id,
            released=released,
        )

    # ------------------------------------------------------------ produce

    async def _produce(self) -> None:
        while not self._draining.is_set():
            await self._policy.swap()
            # While the call runs the pipeline is not empty: a drain that cancelled it
            # would leave the lease the coordinator granted held by no one.
            self._leasing = True
            try:
                answer = await self._client.lease(
                    self._config.run_id, self._config.max_tasks, self._policy.engine_version or None
                )
            except CoordinatorUnavailable as exc:
                self._view.event("coordinator_unreachable", f"no lease: {exc}")
                await self._idle(5.0)
                continue
            finally:
                self._leasing = False
            if not answer.HasField("lease"):
                await self._idle(max(answer.retry_after_ms, 200) / 1000.0)
                continue
            lease = answer.lease
            if self._draining.is_set():
                # Granted as the drain began: give it straight back, ungenerated.
                await self._release(lease.lease_id, "the worker is leaving")
                continue
            self._held[lease.lease_id] = lease
            self._generating = lease.lease_id
            self.stats.leases += 1
            try:
                work = await self._generate(lease)
            finally:
                self._generating = None
            if work is None:
                continue
            if self._draining.is_set() or lease.lease_id in self._revoked:
                await self._release(lease.lease_id, "the worker is leaving")
                continue
            await self._to_verify.put(work)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._draining.wait(), timeout=seconds)

    async def _generate(self, lease: common_pb2.Lease) -> _Work | None:
        try:
            spec = RewardSpec.from_json(bytes(lease.reward_spec_json))
            if spec.spec_hash() != lease.reward_spec_hash:
                raise LoopError(
                    f"lease {lease.lease_id}: its reward spec does not hash to the "
                    f"reward_spec_hash it names; the coordinator is misconfigured"
                )
            tasks = {t.task_id: RepairTask.model_validate_json(t.task_json) for t in lease.tasks}
            await self._policy.ensure(int(lease.policy_version))
        except (ProtocolError, ValueError) as exc:
            self._view.event("lease_skipped", f"lease {lease.lease_id} skipped: {exc}")
            await self._release(lease.lease_id, f"cannot work on it: {str(exc)[:200]}")
            return None
        params = SamplingParams(
            temperature=lease.sampling.temperature,
            max_new_tokens=lease.sampling.max_new_tokens,
            stop_token_ids=self._engine.stop_token_ids,
        )
        requests = [
            GenerationRequest(
                prompt_ids=tuple(task.prompt_token_ids),
                seeds=tuple(task.seeds),
                sample_indices=tuple(range(len(task.seeds))),
                params=params,
            )
            for task in lease.tasks
        ]
        started = time.monotonic()
        generations = await asyncio.to_thread(self._engine.generate, requests)
        work = _Work(lease, tasks, spec, generations, time.monotonic() - started)
        self.stats.rollouts_generated += len(generations)
        self.stats.tokens_generated += sum(len(g.completion_ids) for g in generations)
        self.stats.tokens_per_second = self._engine.tokens_per_second
        return work

    # ------------------------------------------------------------ verify

    async def _verify(self) -> None:
        while True:
            work = await self._to_verify.get()
            try:
                if work.lease.lease_id in self._revoked:
                    self._held.pop(work.lease.lease_id, None)
                    continue
                try:
                    work.samples = await self._score(work)
                except SandboxError as exc:
                    self._view.event("sandbox_failed", f"the sandbox failed: {exc}")
                    await self._release(work.lease.lease_id, "the worker's sandbox failed")
                    continue
                await self._to_submit.put(work)
            finally:
                self._to_verify.task_done()

    async def _score(self, work: _Work) -> list[common_pb2.RolloutSample]:
        lease = work.lease
        leased = {t.task_id: t for t in lease.tasks}
        plans: list[tuple[Generation, common_pb2.LeasedTask, Plan]] = []
        for gen in work.generations:
            task = lease.tasks[gen.request_index]
            plans.append(
                (
                    gen,
                    task,
                    plan(work.tasks[task.task_id], gen.text, len(gen.completion_ids), work.spec),
                )
            )
        results = await asyncio.gather(*(self._run_job(p) for _, _, p in plans))
        samples = []
        for (gen, task, job_plan), result in zip(plans, results, strict=True):
            reward = job_plan.reward(result, work.spec)
            self._reward_sum += reward.total
            samples.append(
                common_pb2.RolloutSample(
                    task_id=task.task_id,
                    sample_index=gen.sample_index,
                    seed=leased[task.task_id].seeds[gen.sample_index],
                    prompt_token_ids=task.prompt_token_ids,
                    completion_token_ids=list(gen.completion_ids),
                    behaviour_logprobs=[min(0.0, x) for x in gen.logprobs],
                    completion_text=gen.text,
                    patch=job_plan.patch,
                    reward=reward.total,
                    reward_components=reward.components,
                    test_log_sha256=result.log_sha256 if result is not None else EMPTY_LOG_SHA256,
                    proof=b"".join(gen.proofs),
                    finish_reason=_FINISH[gen.finish_reason],
                    timings=common_pb2.SampleTimings(
                        generate_ms=_ms(gen.timings.prefill_s + gen.timings.decode_s),
                        reward_ms=_ms(result.duration_s if result is not None else 0.0),
                        proof_ms=_ms(gen.timings.proof_s),
                    ),
                )
            )
        return samples

    async def _run_job(self, job_plan: Plan) -> JobResult | None:
        if job_plan.job is None:
            return None
        job = job_plan.job
        async with self._sandboxes:
            for attempt in range(self._config.sandbox_retries + 1):
                try:
                    result = await asyncio.to_thread(self._sandbox.run, job)
                except SandboxError:
                    if attempt == self._config.sandbox_retries:
                        raise
                    continue
                self.stats.sandbox_jobs += 1
                self.stats.sandbox_seconds += result.duration_s
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------ submit

    async def _submit(self) -> None:
        while True:
            work = await self._to_submit.get()
            try:
                await self._submit_one(work)
            finally:
                self._to_submit.task_done()

    async def _submit_one(self, work: _Work) -> None:
        lease = work.lease
        payload = worker_pb2.SubmitPayload(
            lease_id=lease.lease_id,
            idempotency_key=uuid.uuid4().hex,
            policy_version=lease.policy_version,
            samples=work.samples,
        )
        while True:
            try:
                answer = await self._client.submit(payload)
                break
            except CoordinatorUnavailable as exc:
                # Same payload, same key: retrying is safe however often it happens.
                if self._now_ms() > lease.deadline_unix_ms:
                    self._held.pop(lease.lease_id, None)
                    self._view.event(
                        "batch_dropped",
                        f"lease {lease.lease_id} passed its deadline while the coordinator "
                        f"was unreachable ({exc})",
                    )
                    return
                self._view.event("coordinator_unreachable", f"still retrying: {exc}")
            except CoordinatorError as exc:
                self._held.pop(lease.lease_id, None)
                self._reject(len(payload.samples), f"refused: {exc}")
                return
        self._held.pop(lease.lease_id, None)
        n = len(payload.samples)
        self.stats.rollouts_submitted += n
        self.stats.retries = self._client.stats.retries
        self.stats.reconnects = self._client.stats.reconnects
        if answer.accepted:
            self.stats.rollouts_accepted += n
            self.stats.batches_accepted += 1
            self.stats.mean_reward = self._reward_sum / max(1, self.stats.rollouts_accepted)
            self._view.event(
                "batch_accepted",
                f"batch {answer.batch_id}: {n} rollouts accepted"
                + (" (answer replayed)" if answer.replayed_response else ""),
                batch_id=answer.batch_id,
                lease_id=lease.lease_id,
                policy_version=int(lease.policy_version),
                idempotency_key=payload.idempotency_key,
                rollouts=n,
                replayed=answer.replayed_response,
                audit_pending=answer.audit_pending,
            )
            return
        rejection = answer.rejection
        reason = R.Name(rejection.reason) if rejection.reason in R.values() else "?"
        self._reject(n, f"{reason}: {rejection.message}", batch_id=answer.batch_id)
        if rejection.reason == R.REJECTION_REASON_STALE_POLICY:
            self._refresh.set()

    def _reject(self, n: int, why: str, **fields: Any) -> None:
        self.stats.rollouts_rejected += n
        self.stats.batches_rejected += 1
        self.stats.last_rejection = why[:300]
        self._view.event("batch_rejected", f"batch rejected: {why}", reason=why, **fields)

    # ------------------------------------------------------------ helpers

    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            activity = (
                worker_pb2.WORKER_ACTIVITY_DRAINING
                if self._draining.is_set()
                else worker_pb2.WORKER_ACTIVITY_WORKING
            )
            try:
                answer = await self._client.heartbeat(
                    activity=activity,
                    lease_ids=list(self._held),
                    run_id=self._config.run_id,
                    policy_version=self._policy.engine_version,
                    tokens_per_second=self._engine.tokens_per_second,
                )
                beats += 1
                if beats % 3 == 1:
                    await self._update_credit()
            except CoordinatorError as exc:
                log.info("heartbeat failed: %s", exc)
                continue
            if answer.heartbeat_interval_ms:
                self._config = _with_heartbeat(self._config, answer.heartbeat_interval_ms)
            for lease_id in answer.revoked_lease_ids:
                if lease_id in self._held and lease_id not in self._revoked:
                    self._revoked.add(lease_id)
                    self._view.event("lease_revoked", f"lease {lease_id} was revoked")
            for run in answer.runs:
                if run.run_id == self._config.run_id:
                    self._note_latest(int(run.latest_policy_version))
            if answer.state == common_pb2.WORKER_STATE_BANNED:
                self._view.event("banned", "the coordinator banned this key: leaving")
                self.drain()

    async def _update_credit(self) -> None:
        status = await self._client.status()
        if status.HasField("worker"):
            self.stats.credit_granted = int(status.worker.credit_granted)
            self.stats.credit_pending = int(status.worker.credit_pending)

    def _note_latest(self, version: int) -> None:
        self._latest_seen = max(self._latest_seen, version)
        if version > self._policy.held_version:
            self._refresh.set()

    async def _watch_policy(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), timeout=self._config.policy_poll_s)
            self._refresh.clear()
            if self._policy.pending:
                continue
            try:
                await self._policy.fetch()
            except (LoopError, CoordinatorError) as exc:
                self._view.event("policy_failed", f"new policy not taken: {exc}")

    async def _tick(self) -> None:
        while True:
            self.stats.tokens_per_second = self._engine.tokens_per_second
            self.stats.retries = self._client.stats.retries
            self.stats.reconnects = self._client.stats.reconnects
            self._view.refresh()
            await asyncio.sleep(0.5)


def _raise_if_failed(stage: asyncio.Task[Any]) -> None:
    """Re-raise a finished stage's error; a stage cancelled by anyone but `run` is one too.

    Without the second case a stray `CancelledError` (grpc.aio raises one for a call
    whose channel closed) would pass through `run` and end the worker with no word.
    """
    if stage.cancelled():
        raise LoopError(f"the {stage.get_name()} stage stopped unexpectedly (cancelled)")
    error = stage.exception()
    if error is not None:
        raise error


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


def _with_heartbeat(config: LoopConfig, interval_ms: int) -> LoopConfig:
    seconds = max(0.5, interval_ms / 1000.0)
    if seconds == config.heartbeat_s:
        return config
    return LoopConfig(
        run_id=config.run_id,
        max_tasks=config.max_tasks,
        max_sandboxes=config.max_sandboxes,
        heartbeat_s=seconds,
        policy_poll_s=config.policy_poll_s,
        drain_timeout_s=config.drain_timeout_s,
        sandbox_retries=config.sandbox_retries,
    )

"""The coordinator process: storage, task pools, the grpc.aio server, background loops.

`Coordinator(config)` is used as ``async with Coordinator(config) as c: ...`` (tests,
the demo) or through `Coordinator.run()` (``coderepair-coordinator serve``), which
serves until SIGINT/SIGTERM. Start-up: migrate the database to head, open the object
store, create or check every configured run (`storage.repo.ensure_run`) and render its
task pool, register the three contract services plus health and reflection, bind, and
start the loops:

- the sweep (every ``server.sweep_interval_s``): expired leases go back to the pool,
  audit windows close (credit granted, streaks grow), old nonces are forgotten, the
  pools re-read which tasks open leases hold, and SQLite's WAL is checkpointed (its
  commits do not, so no submission waits for one);
- the in-process audit loop (``audit.in_process``), running the given `Auditor` or
  the one ``audit.auditor`` names (`service.auditor.build_auditor`);
- the operators' dashboard (``dashboard.enabled``): page, /api/stats, /metrics, /healthz;
- ``server.prepare_processes`` helper processes that check and encode submitted batches
  (`service.prepare`), spawned before the port opens.

Metrics: the coordinator owns one `CollectorRegistry` and one `CoordinatorMetrics` on it
(`metrics`), shared through the `ServiceContext` with the servicers and the audit loop;
the dashboard's /metrics serves that registry plus a `StatsCollector` of the database.

`shutdown()` is idempotent: health turns NOT_SERVING first (load balancers drain), the
server stops taking calls and lets running ones finish within the grace period, the
loops and the dashboard stop (each within a bounded time), the auditor releases its
sandbox, the batch-preparing helpers exit, and the database pool is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from coderepair.coordinator.config import CoordinatorConfig, ObjectStoreConfig, RunConfig
from coderepair.coordinator.dashboard.http import DashboardServer, DashboardStateError
from coderepair.coordinator.dashboard.metrics import CoordinatorMetrics
from coderepair.coordinator.service.admin_service import AdminServicer
from coderepair.coordinator.service.audit import AuditLoop, Auditor
from coderepair.coordinator.service.auditor import build_auditor, close_auditor
from coderepair.coordinator.service.context import RunState, ServiceContext, wall_clock_ms
from coderepair.coordinator.service.gate import EnvelopeGate, UndecodableRequestGuard
from coderepair.coordinator.service.prepare import BatchPreparer
from coderepair.coordinator.service.scheduler import PromptEncoder, SchedulerError, load_pool
from coderepair.coordinator.service.stats import open_lease_tasks
from coderepair.coordinator.service.trainer_service import TrainerServicer
from coderepair.coordinator.service.tuning import (
    freeze_startup_heap,
    steady_arrow_memory_pool,
    tune_serving_process,
)
from coderepair.coordinator.service.worker_service import WorkerServicer
from coderepair.coordinator.storage import audits, batches, repo
from coderepair.coordinator.storage.db import Database, SqliteSync
from coderepair.coordinator.storage.migrate import upgrade_to_head
from coderepair.coordinator.storage.models import AuditKind
from coderepair.coordinator.storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore
from coderepair.protocol import rpc
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import EnvelopeVerifier
from coderepair.protocol.reward import RewardInputError, RewardSpec
from coderepair.v1 import admin_pb2_grpc, trainer_pb2_grpc, worker_pb2_grpc

__all__ = [
    "Coordinator",
    "StartupError",
    "ValidatorProcess",
    "build_object_store",
    "freeze_startup_heap",
    "load_run",
    "open_context",
    "steady_arrow_memory_pool",
    "tune_serving_process",
]

log = logging.getLogger(__name__)


class StartupError(ProtocolError):
    """The coordinator cannot start with this configuration; the message says why."""


def build_object_store(config: ObjectStoreConfig) -> ObjectStore:
    """The configured object store (a directory, or an S3 bucket through boto3)."""
    if config.kind == "local":
        return LocalObjectStore(config.path)
    import boto3  # type: ignore[import-untyped]  # noqa: PLC0415  (S3 deployments only)

    client = boto3.client("s3", endpoint_url=config.endpoint_url or None, region_name=config.region)
    return S3ObjectStore(config.bucket, client, prefix=config.prefix)


def load_run(config: RunConfig) -> RunState:
    """A configured run's reward spec, tokenizer and task pool."""
    if config.reward_spec_path is None:
        spec = RewardSpec()
    else:
        try:
            spec = RewardSpec.from_json(config.reward_spec_path.read_bytes())
        except OSError as exc:
            raise StartupError(
                f"run {config.run_id}: cannot read reward spec {config.reward_spec_path}: "
                f"{exc.strerror}"
            ) from exc
        except RewardInputError as exc:
            raise StartupError(f"run {config.run_id}: {exc}") from exc
    try:
        encoder = PromptEncoder(config.tokenizer_path)
        pool = load_pool(config.tasks_path, config.split, encoder)
    except (SchedulerError, ProtocolError) as exc:
        raise StartupError(f"run {config.run_id}: {exc}") from exc
    return RunState(
        config=config,
        pool=pool,
        reward_spec=spec,
        trainer_public_key=bytes.fromhex(config.trainer_public_key),
    )


def _ensure_run(db: Database, state: RunState, now_ms: int) -> None:
    config = state.config
    repo.ensure_run(
        db,
        repo.RunSpec(
            run_id=config.run_id,
            trainer_public_key=state.trainer_public_key,
            base_model_id=config.base_model_id,
            tokenizer_sha256=config.tokenizer_sha256,
            reward_spec_json=state.reward_spec.model_dump_json(),
            reward_spec_hash=state.reward_spec.spec_hash(),
            sampling=state.sampling(),
            group_size=config.group_size,
            max_policy_lag=config.max_policy_lag,
        ),
        now_ms,
    )


async def open_context(
    config: CoordinatorConfig,
    *,
    object_store: ObjectStore | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
    metrics: CoordinatorMetrics | None = None,
    setup_database: bool = True,
    checkpoints_in_sweep: bool = False,
) -> ServiceContext:
    """Open the database, the object store and the configured runs' pools.

    ``setup_database``: migrate the schema to head and create (or check) every run's
    row, as a serving coordinator does; a validator process only reads what a
    coordinator set up, so that several of them never race on a migration.
    ``checkpoints_in_sweep``: SQLite commits leave the WAL's checkpoints to the caller's
    sweep (`Database.checkpoint`), as a serving coordinator's do.
    """
    threads = config.server.db_threads
    db = Database.open(
        config.database.url,
        pool_size=threads,
        sqlite_synchronous=SqliteSync(config.database.sqlite_synchronous),
        sqlite_autocheckpoint=not checkpoints_in_sweep,
    )
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="coordinator-db")
    try:
        if setup_database:
            await asyncio.to_thread(upgrade_to_head, db.engine)
        objects = object_store
        if objects is None:
            objects = await asyncio.to_thread(build_object_store, config.object_store)
        states = await asyncio.gather(*(asyncio.to_thread(load_run, r) for r in config.runs))
        runs = {s.run_id: s for s in states}
        if setup_database:
            for state in states:
                await asyncio.to_thread(_ensure_run, db, state, clock_ms())
    except BaseException:
        executor.shutdown(wait=False)
        db.close()
        raise
    return ServiceContext(
        config=config,
        db=db,
        objects=objects,
        runs=runs,
        executor=executor,
        clock_ms=clock_ms,
        metrics=metrics if metrics is not None else CoordinatorMetrics(CollectorRegistry()),
    )


class Coordinator:
    """One coordinator process (see the module docstring)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        auditor: Auditor | None = None,
        object_store: ObjectStore | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        validator_id: str = "in-process",
        seed: int | None = None,
    ) -> None:
        self.config = config
        self._auditor: Auditor | None = auditor
        self._own_auditor = auditor is None
        self.registry = CollectorRegistry()
        """The process's Prometheus registry (served by the dashboard's /metrics)."""
        self.metrics = CoordinatorMetrics(self.registry)
        """The service's counters, recorded by the servicers and the audit loop."""
        self.dashboard: DashboardServer | None = None
        self._object_store = object_store
        self._clock_ms = clock_ms
        self._validator_id = validator_id
        self._rng = random.Random(seed)
        self._preparer = BatchPreparer(config.server.prepare_processes)
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._ctx: ServiceContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._closed = False
        self.port = 0

    @property
    def context(self) -> ServiceContext:
        """The shared state (started coordinators only)."""
        if self._ctx is None:
            raise StartupError("the coordinator is not started: call start() first")
        return self._ctx

    @property
    def preparer(self) -> BatchPreparer:
        """The helpers that check and encode submitted batches (``server.prepare_processes``)."""
        return self._preparer

    @property
    def address(self) -> str:
        """host:port clients connect to (with the port actually bound)."""
        host = self.config.server.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Open storage, load runs, bind and start serving (see the module docstring)."""
        if self._server is not None:
            return
        config = self.config
        ctx = await open_context(
            config,
            object_store=self._object_store,
            clock_ms=self._clock_ms,
            metrics=self.metrics,
            setup_database=True,
            checkpoints_in_sweep=True,
        )
        db = ctx.db
        self._ctx = ctx
        await self._resync_pools()
        try:
            await self._preparer.start()
        except Exception as exc:
            await self._preparer.shutdown()
            await self._close_storage()
            raise StartupError(
                f"the {config.server.prepare_processes} batch-preparing helper process(es) "
                f"did not start ({type(exc).__name__}: {exc}); set server.prepare_processes "
                "= 0 to check batches in this process"
            ) from exc
        gate = EnvelopeGate(
            EnvelopeVerifier(config.server.max_clock_skew_s, clock=lambda: ctx.now_ms() / 1000),
            lambda fn, *a, **kw: ctx.call(fn, ctx.db, *a, **kw),
            ctx.now_ms,
            config.server.max_message_bytes,
        )
        # gRPC's own limit is twice the configured one, so every request up to it gets
        # a typed TOO_LARGE refusal from the handler (with the Rejection trailer).
        server = grpc.aio.server(
            options=[
                *rpc.server_options(2 * config.server.max_message_bytes),
                # gRPC sets SO_REUSEPORT unless told not to: a second coordinator on a
                # taken port would bind it and take half the first one's clients.
                ("grpc.so_reuseport", int(config.server.reuse_port)),
            ],
            interceptors=[UndecodableRequestGuard()],
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(ctx, gate, self._rng, self._preparer), server
        )
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(ctx, gate), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(ctx, gate), server)
        self._health = await rpc.add_health_and_reflection(server)
        try:
            port = server.add_insecure_port(config.server.listen)
        except RuntimeError:  # this grpcio raises where older ones returned 0
            port = 0
        if port == 0:
            await self._preparer.shutdown()
            await self._close_storage()
            raise StartupError(
                f"cannot listen on {config.server.listen}: the port is taken or the address "
                "is not local; change server.listen (replicas sharing a port set "
                "server.reuse_port in each)"
            )
        self.port = port
        await server.start()
        self._server = server
        self._tasks.append(asyncio.create_task(self._sweep_forever(), name="coordinator-sweep"))
        if config.audit.in_process:
            if self._auditor is None:
                self._auditor = build_auditor(config, db)
            loop = AuditLoop(ctx, self._auditor, self._validator_id)
            self._tasks.append(
                asyncio.create_task(loop.run_forever(self._stop), name="coordinator-audits")
            )
        if config.dashboard.enabled:
            dashboard = DashboardServer(
                config.dashboard, db, registry=self.registry, clock=self._clock_ms
            )
            try:
                await dashboard.start()
            except DashboardStateError as exc:
                await self.shutdown()
                raise StartupError(str(exc)) from exc
            self.dashboard = dashboard
        log.info("coordinator listening on %s (%d runs)", self.address, len(ctx.runs))

    # ---------------------------------------------------------------- background

    async def _resync_pools(self) -> None:
        ctx = self.context
        generations = {run_id: s.pool.generation() for run_id, s in ctx.runs.items()}
        known = {k: v for s in ctx.runs.values() for k, v in s.pool.leases().items()}
        held = await ctx.call(open_lease_tasks, ctx.db, known)
        for run_id, state in ctx.runs.items():
            state.pool.resync(held.get(run_id, {}), generations[run_id])

    async def sweep_once(self) -> None:
        """One pass of the sweep (exposed so tests need not wait for the timer)."""
        ctx = self.context
        now = ctx.now_ms()
        expired = await ctx.call(repo.expire_leases, ctx.db, now)
        for lease in expired:
            state = ctx.runs.get(lease.run_id)
            if state is not None:
                state.pool.give_back(lease.lease_id)
        window_ms = int(ctx.config.audit.window_s * 1000)
        await ctx.call(
            audits.close_audit_windows,
            ctx.db,
            now_ms=now,
            window_ms=window_ms,
            audit_kinds=[AuditKind(k) for k in ctx.config.audit.kinds],
        )
        await ctx.call(repo.prune_nonces, ctx.db, now)
        await self._resync_pools()
        await ctx.call(ctx.db.checkpoint)

    async def _sweep_forever(self) -> None:
        interval = self.config.server.sweep_interval_s
        while not self._stop.is_set():
            try:
                await self.sweep_once()
            except Exception as exc:
                if batches.is_transient(exc):
                    # A lock conflict with submissions: nothing was written, and the
                    # next sweep does the same work.
                    log.warning("sweep gave way to a lock conflict (%s)", str(exc).splitlines()[0])
                else:
                    log.exception("sweep failed; retrying at the next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval)

    # ---------------------------------------------------------------- lifecycle

    async def wait(self) -> None:
        """Until the server terminates (after `shutdown`)."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop serving and release everything; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
        if self.dashboard is not None:
            try:
                await asyncio.wait_for(self.dashboard.shutdown(), timeout=grace_s)
            except TimeoutError:
                log.warning("the dashboard did not stop within %.1f s; abandoned", grace_s)
        for task in self._tasks:
            task.cancel()
        # An audit running in a thread cannot be interrupted: wait for it a bounded time.
        if self._tasks:
            done, stuck = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in stuck:
                log.warning("%s did not stop within %.1f s; abandoned", task.get_name(), grace_s)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("%s had failed: %r", task.get_name(), task.exception())
        if self._own_auditor and self._auditor is not None:
            await asyncio.to_thread(close_auditor, self._auditor)
        await self._preparer.shutdown(grace_s)
        await self._close_storage()

    async def _close_storage(self) -> None:
        if self._ctx is not None:
            self._ctx.executor.shutdown(wait=True)
            self._ctx.db.close()

    async def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully."""
        await self.start()
        tune_serving_process()
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            await self.shutdown()

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


class ValidatorProcess:
    """`coderepair-coordinator validator`: the audit loop alone, against the shared database.

    No gRPC server and no sweep: it claims audit jobs the serving coordinators queued
    (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so any number of validator processes and
    coordinators share the queue without doing a job twice; SQLite serialises writers,
    so run one there), audits them with the configured auditor and records verdicts.
    The database must have been set up by ``serve`` (it is not migrated here).

    SIGTERM/SIGINT stop it gracefully: the jobs already claimed are finished and
    recorded, nothing new is claimed, then storage and the sandbox are released.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        validator_id: str,
        auditor: Auditor | None = None,
        object_store: ObjectStore | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        claim_limit: int = 2,
    ) -> None:
        self.config = config
        self.validator_id = validator_id
        self._auditor = auditor
        self._own_auditor = auditor is None
        self._object_store = object_store
        self._clock_ms = clock_ms
        self._claim_limit = claim_limit
        self.registry = CollectorRegistry()
        self.metrics = CoordinatorMetrics(self.registry)
        self.stop = asyncio.Event()
        """Set it (or send SIGTERM to `run`) to stop after the jobs in hand."""

    async def run(self, *, handle_signals: bool = True) -> None:
        """Audit until `stop` is set (or SIGTERM/SIGINT arrives), then release everything."""
        ctx = await open_context(
            self.config,
            object_store=self._object_store,
            clock_ms=self._clock_ms,
            metrics=self.metrics,
            setup_database=False,
        )
        auditor = self._auditor if self._auditor is not None else build_auditor(self.config, ctx.db)
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, self.stop.set)
        log.info("validator %s auditing (%d runs)", self.validator_id, len(ctx.runs))
        try:
            audit_loop = AuditLoop(ctx, auditor, self.validator_id, claim_limit=self._claim_limit)
            await audit_loop.run_forever(self.stop)
        finally:
            if self._own_auditor:
                await asyncio.to_thread(close_auditor, auditor)
            ctx.executor.shutdown(wait=True)
            ctx.db.close()
            log.info("validator %s stopped", self.validator_id)


def default_config_path() -> Path:
    """Where `serve` looks when no --config is given."""
    return Path("coordinator.toml")

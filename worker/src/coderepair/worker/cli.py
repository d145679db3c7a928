"""`coderepair-worker`: the volunteer's console script.

Parses arguments before importing anything heavy (torch, transformers), so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

from coderepair.protocol._cli import version_callback

app = typer.Typer(
    name="coderepair-worker",
    help="Lend your GPU or CPU to the coderepair rollout network.",
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
            callback=version_callback("coderepair-worker", "coderepair-worker"),
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Lend your GPU or CPU to the coderepair rollout network."""


def main() -> None:
    app()

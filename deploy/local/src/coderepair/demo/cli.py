"""`coderepair`: the umbrella console script.

Parses arguments before importing anything heavy (torch, transformers), so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

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


def main() -> None:
    app()

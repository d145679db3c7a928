"""Small helpers shared by the console scripts; importing this pulls in nothing heavy."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version


def distribution_version(dist: str) -> str:
    """The installed version of `dist`, or ``"unknown"`` when it runs from a bare checkout."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def version_callback(dist: str, prog: str) -> Callable[[bool], None]:
    """An eager ``--version`` option callback that prints ``prog version`` and exits 0."""

    def callback(value: bool) -> None:
        if value:
            print(f"{prog} {distribution_version(dist)}")
            raise SystemExit(0)

    return callback

"""Every console script exists from day one, answers --help and --version, and stays light."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

SCRIPTS = {
    "coderepair": ("coderepair", "coderepair.demo.cli"),
    "coderepair-worker": ("coderepair-worker", "coderepair.worker.cli"),
    "coderepair-coordinator": ("coderepair-coordinator", "coderepair.coordinator.cli"),
    "coderepair-trainer": ("coderepair-trainer", "coderepair.trainer.cli"),
}
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_version_prints_the_installed_distribution_version(script: str) -> None:
    dist, _ = SCRIPTS[script]
    out = subprocess.run(
        [str(BIN / script), "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"{script} {version(dist)}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_describes_the_program(script: str) -> None:
    out = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, check=True)
    assert f"Usage: {script}" in out.stdout
    assert "--version" in out.stdout


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_cli_module_imports_no_heavy_dependency(script: str) -> None:
    """--help must answer fast: the CLI module may not import torch, transformers or SQLAlchemy."""
    _, module = SCRIPTS[script]
    probe = (
        f"import sys, {module}; "
        "heavy = [m for m in ('torch', 'transformers', 'sqlalchemy', 'trl', 'vllm') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

"""The workspace keeps the shape DESIGN.md fixes: its top level and the PEP 420 namespace."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = {
    "pyproject.toml",
    "README.md",
    "Makefile",
    "protocol",
    "worker",
    "coordinator",
    "trainer",
    "tests",
    "bench",
    "deploy",
}
DISTRIBUTIONS = {
    "protocol": "coderepair-protocol",
    "worker": "coderepair-worker",
    "coordinator": "coderepair-coordinator",
    "trainer": "coderepair-trainer",
}


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_top_level_is_exactly_the_fixed_set() -> None:
    visible = {f.split("/", 1)[0] for f in _tracked_files() if not f.startswith(".")}
    assert visible == TOP_LEVEL
    assert (ROOT / ".ci" / "run").is_file()


def test_namespace_package_has_no_init_in_any_distribution() -> None:
    offenders = [f for f in _tracked_files() if f.endswith("coderepair/__init__.py")]
    assert offenders == []


def test_each_distribution_declares_its_name_and_source_dir() -> None:
    for folder, name in DISTRIBUTIONS.items():
        meta = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())
        assert meta["project"]["name"] == name
        package = folder
        assert (ROOT / folder / "src" / "coderepair" / package / "__init__.py").is_file()


def test_worker_distribution_brings_no_trainer_dependency() -> None:
    meta = tomllib.loads((ROOT / "worker" / "pyproject.toml").read_text())
    names = {Requirement(d).name.lower() for d in meta["project"]["dependencies"]}
    assert names.isdisjoint({"trl", "coderepair-trainer", "accelerate", "deepspeed"})


def test_dev_constraints_pin_the_cpu_torch_served_here() -> None:
    pins = (ROOT / ".ci" / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in pins

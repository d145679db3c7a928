"""A volunteer's `pip install coderepair-worker`: binary wheels only, no trainer stack.

The protocol and worker distributions are built into wheels (hatchling, as a release
would build them); then pip resolves installing ``coderepair-worker`` from those wheels
into a fresh, empty virtual environment, with ``--only-binary=:all:`` (any package that
would need compiling on the volunteer's machine makes the resolve fail) and
``--dry-run --report`` (the resolved set, without downloading torch's gigabytes). The
report must hold the worker and protocol wheels built here, and no trainer dependency:
no ``trl``, no ``coderepair-trainer``, no ``coderepair-coordinator``, and no sdist.

The other distributions come from PyPI, under the CI constraints (.ci/constraints.txt).
Without PyPI the test is skipped, unless ``CI`` is set: there a missing index is a
failure, not a reason to pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip"]
FORBIDDEN = {"trl", "coderepair-trainer", "coderepair-coordinator"}


def _pypi_reachable() -> str | None:
    """None when PyPI's simple index answers, else why not."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10) as answer:
            answer.read(1)
    except (urllib.error.URLError, OSError) as exc:
        return str(exc)
    return None


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, (
        f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def _build_wheels(out: Path) -> dict[str, Path]:
    """coderepair-protocol and coderepair-worker wheels in ``out``, by distribution name."""
    # The venv's hatchling builds them (no isolated build env to download); a release
    # builds the same way from the same pyproject.toml.
    _run(
        [
            *PIP,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(ROOT / "protocol"),
            str(ROOT / "worker"),
        ],
        ROOT,
    )
    wheels = {_normalise(p.name.split("-")[0]): p for p in out.glob("*.whl")}
    assert set(wheels) == {"coderepair-protocol", "coderepair-worker"}, sorted(out.iterdir())
    return wheels


def _resolve(tmp_path: Path, wheels: Path) -> list[dict[str, Any]]:
    """What pip would install into a fresh venv: the report's ``install`` entries."""
    venv = tmp_path / "fresh"
    # No pip inside: this environment's pip resolves for it (--python), which is all a
    # dry run needs, and saves seconds of ensurepip.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    report = tmp_path / "report.json"
    _run(
        [
            *PIP,
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "--only-binary=:all:",
            "--constraint",
            str(ROOT / ".ci" / "constraints.txt"),
            "--find-links",
            str(wheels),
            "coderepair-worker",
        ],
        tmp_path,
    )
    data = json.loads(report.read_text(encoding="utf-8"))
    install = data["install"]
    assert isinstance(install, list) and install, data
    return install


@pytest.mark.timeout(300)
def test_worker_wheel_installs_from_binaries_without_the_trainer_stack(tmp_path: Path) -> None:
    why = _pypi_reachable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but PyPI is unreachable ({why}): the resolve needs it")
        pytest.skip(f"PyPI is unreachable ({why}); this test resolves against it")
    wheels = _build_wheels(tmp_path / "wheels")
    install = _resolve(tmp_path, tmp_path / "wheels")

    resolved = {_normalise(item["metadata"]["name"]): item for item in install}
    assert not FORBIDDEN & set(resolved), sorted(FORBIDDEN & set(resolved))
    # Only wheels: an sdist would be built (compiled, maybe) on the volunteer's machine.
    urls = {name: item["download_info"]["url"] for name, item in resolved.items()}
    sdists = {name: url for name, url in urls.items() if not url.endswith(".whl")}
    assert not sdists, sdists
    # Ours come from the wheels just built, at their version, not from an index.
    for name in ("coderepair-worker", "coderepair-protocol"):
        assert name in resolved, sorted(resolved)
        assert urls[name] == wheels[name].resolve().as_uri(), urls[name]
        assert resolved[name]["metadata"]["version"] == "0.1.0"
    # What the worker needs at run time is in the set (the resolve is not vacuous).
    assert {"torch", "transformers", "grpcio", "rich", "typer", "docker"} <= set(resolved)
    # The constraint held (a local label such as +cpu comes from the index pip uses).
    assert Version(resolved["torch"]["metadata"]["version"]).public == "2.13.0"

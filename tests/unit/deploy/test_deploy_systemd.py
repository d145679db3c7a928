"""deploy/systemd/coderepair-worker.service: systemd accepts it, and it is hardened.

`systemd-analyze verify` checks the unit when it is installed (it insists that the
ExecStart binary exists, so a copy pointing at /bin/true is verified); the hardening
keys are checked by parsing the unit either way.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[3] / "deploy" / "systemd" / "coderepair-worker.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    return parser["Service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/coderepair-worker", "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt keys are only warnings ("ignoring"): they fail here.
    assert str(copy) not in result.stderr, result.stderr


def test_unit_is_hardened() -> None:
    service = _service()
    assert service["DynamicUser"] == "yes"
    assert service["ProtectSystem"] == "strict"
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges", "ProtectKernelModules"):
        assert service[key] == "yes", key
    assert service["CapabilityBoundingSet"] == ""
    assert service["UMask"] == "0077"
    # bubblewrap needs namespaces, GPUs need devices: these must stay unset.
    assert "RestrictNamespaces" not in service and "PrivateDevices" not in service


def test_unit_runs_join_with_its_state_in_systemd_directories() -> None:
    service = _service()
    assert service["ExecStart"].split()[1:] == ["join"]
    assert service["KillSignal"] == "SIGINT"
    assert service["StateDirectory"] == "coderepair-worker"
    env = UNIT.read_text()
    assert "CODEREPAIR_WORKER_KEY_PATH=/var/lib/coderepair-worker/" in env
    assert "CODEREPAIR_WORKER_CONFIG=/etc/coderepair/worker.toml" in env
    assert "Docker group note" in env

"""`coderepair-worker` commands run in-process (typer's runner) on real files and keys."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coderepair.protocol.identity import Identity
from coderepair.worker.cli import _JsonFormatter, app
from coderepair.worker.config import ENV_PREFIX

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(var)
    for name in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / name.lower()))


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    # The commands configure the root logger as a console script would.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def _key(tmp_path: Path) -> Path:
    return tmp_path / "data" / "coderepair" / "worker-key.pem"


@pytest.mark.parametrize("argv", [["--help"], ["doctor", "--help"], ["keys", "--help"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['coderepair-worker', *{argv!r}]\n"
        "from coderepair.worker.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'docker', 'grpc') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout
    assert "HEAVY []" in out.stdout


def test_keys_show_without_a_key_says_how_to_get_one() -> None:
    result = runner.invoke(app, ["keys", "show"])
    assert result.exit_code == 1
    assert "no key at" in result.output and "keys rotate" in result.output


def test_rotate_creates_then_show_prints_no_private_key(tmp_path: Path) -> None:
    created = runner.invoke(app, ["keys", "rotate"])
    assert created.exit_code == 0, created.output
    path = _key(tmp_path)
    identity = Identity.load(path)
    shown = runner.invoke(app, ["keys", "show", "--json"])
    assert shown.exit_code == 0
    facts = json.loads(shown.output)
    assert facts == {
        "worker_id": identity.key_id,
        "public_key": identity.public_key_hex,
        "path": str(path),
        "mode": "0600",
    }
    text = runner.invoke(app, ["keys", "show"]).output
    assert identity.public_key_hex in text
    assert "PRIVATE" not in text and path.read_text().splitlines()[1] not in text


def test_rotate_asks_and_keeps_the_old_key_as_bak(tmp_path: Path) -> None:
    path = _key(tmp_path)
    old = Identity.create(path)
    old_bytes = path.read_bytes()
    refused = runner.invoke(app, ["keys", "rotate"], input="n\n")
    assert refused.exit_code == 1 and "unchanged" in refused.output
    assert path.read_bytes() == old_bytes
    accepted = runner.invoke(app, ["keys", "rotate"], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    backup = path.with_name(path.name + ".bak")
    assert backup.read_bytes() == old_bytes
    assert backup.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_mode & 0o777 == 0o600
    assert Identity.load(backup).key_id == old.key_id
    assert Identity.load(path).key_id != old.key_id
    again = runner.invoke(app, ["keys", "rotate", "--yes"])
    assert again.exit_code == 0
    assert path.with_name(path.name + ".bak.1").exists() and backup.read_bytes() == old_bytes


def test_keys_show_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    path = _key(tmp_path)
    Identity.create(path)
    path.chmod(0o644)
    result = runner.invoke(app, ["keys", "show"])
    assert result.exit_code == 1 and f"chmod 600 {path}" in result.output


def test_status_before_join(tmp_path: Path) -> None:
    Identity.create(_key(tmp_path))
    result = runner.invoke(app, ["status", "--offline", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["state"]["joined"] is False
    assert "not joined yet" in report["state"]["note"]
    assert report["identity"]["mode"] == "0600"
    assert report["config"]["engine"] == "auto"
    human = runner.invoke(app, ["status", "--offline"]).output
    assert "not joined yet" in human


def test_status_shows_the_join_state_and_refuses_a_broken_one(tmp_path: Path) -> None:
    state = tmp_path / "data" / "coderepair" / "worker-state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"worker_id": "abc", "policy_version": 3}))
    report = json.loads(runner.invoke(app, ["status", "--offline", "--json"]).output)
    assert report["state"] == {"joined": True, "worker_id": "abc", "policy_version": 3}
    assert "no key at" in report["identity"]["error"]
    state.write_text("{not json")
    report = json.loads(runner.invoke(app, ["status", "--offline", "--json"]).output)
    assert "is not JSON" in report["state"]["error"]


def test_status_reports_an_unreachable_coordinator(tmp_path: Path) -> None:
    Identity.create(_key(tmp_path))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(app, ["status", "--json", "--coordinator", f"127.0.0.1:{port}"])
    assert result.exit_code == 0
    assert "UNAVAILABLE" in json.loads(result.output)["coordinator"]["error"]


def test_bad_configuration_exits_2_with_the_reason() -> None:
    result = runner.invoke(app, ["doctor", "--coordinator", "nowhere"])
    assert result.exit_code == 2
    assert "coordinator (from flag --coordinator)" in result.output
    assert "is not HOST:PORT" in result.output


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text("engine = 'fast'\n")
    result = runner.invoke(app, ["--config", str(path), "status", "--offline"])
    assert result.exit_code == 2 and f"engine (from file {path})" in result.output


def test_json_logs_flag_switches_the_log_format() -> None:
    result = runner.invoke(app, ["--json-logs", "status", "--offline", "--json"])
    assert result.exit_code == 0
    assert isinstance(logging.getLogger().handlers[0].formatter, _JsonFormatter)
    record = logging.LogRecord(
        "coderepair.x", logging.WARNING, __file__, 1, "hi %s", ("you",), None
    )
    entry = json.loads(_JsonFormatter().format(record))
    assert entry["message"] == "hi you" and entry["level"] == "warning"
    assert entry["logger"] == "coderepair.x"


def test_doctor_json_reports_the_unreachable_coordinator() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(
        app,
        ["doctor", "--json", "--coordinator", f"127.0.0.1:{port}", "--sandbox", "bubblewrap"],
    )
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False and report["status"] == "fail"
    by_name = {check["name"]: check for check in report["checks"]}
    assert by_name["coordinator"]["status"] == "fail"
    assert "unreachable" in by_name["coordinator"]["detail"]

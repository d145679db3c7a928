"""The worker's settings: file < environment < flags, clear typed errors, never a crash."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coderepair.worker.config import (
    CONFIG_ENV,
    ENV_PREFIX,
    ConfigError,
    WorkerConfig,
    default_config_path,
    load_config,
)

KEY = "AB" * 32


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """User dirs under tmp_path and no CODEREPAIR_WORKER_* variable from the caller."""
    for var in list(os.environ):
        if var.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(var)
    for name in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / name.lower()))
    yield


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file(tmp_path: Path) -> None:
    config = load_config()
    assert config.coordinator is None and config.run_id is None
    assert config.engine == "auto" and config.sandbox == "auto"
    assert config.key_path == tmp_path / "data" / "coderepair" / "worker-key.pem"
    assert config.cache_dir == tmp_path / "cache" / "coderepair" / "worker"
    assert default_config_path() == tmp_path / "config" / "coderepair" / "worker.toml"


def test_every_field_is_documented_with_its_default() -> None:
    for name, field in WorkerConfig.model_fields.items():
        assert field.description and "Default" in field.description, name


def test_the_default_file_is_read_when_present() -> None:
    path = default_config_path()
    path.parent.mkdir(parents=True)
    path.write_text('coordinator = "coord.example.org:50051"\nmax_sandboxes = 4\n')
    config = load_config()
    assert config.coordinator == "coord.example.org:50051"
    assert config.max_sandboxes == 4


def test_environment_overrides_file_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, 'coordinator = "a:1"\nrun_id = "file"\nengine = "hf"\n')
    monkeypatch.setenv("CODEREPAIR_WORKER_RUN_ID", "env")
    monkeypatch.setenv("CODEREPAIR_WORKER_COORDINATOR", "b:2")
    config = load_config(path, {"coordinator": "c:3", "engine": None})
    assert config.coordinator == "c:3"  # flag
    assert config.run_id == "env"  # environment over file
    assert config.engine == "hf"  # file; a None flag means "not given"


def test_config_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(_write(tmp_path, "cpu_threads = 3\n")))
    assert load_config().cpu_threads == 3


def test_relative_paths_in_the_file_resolve_against_it(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, 'key_path = "keys/k.pem"\ncache_dir = "cache"\n'))
    assert config.key_path == tmp_path / "keys" / "k.pem"
    assert config.cache_dir == tmp_path / "cache"
    assert config.state_path == tmp_path / "keys" / "worker-state.json"


def test_trainer_key_is_normalised_and_checked() -> None:
    assert load_config(overrides={"trainer_public_key": KEY}).trainer_public_key == KEY.lower()
    with pytest.raises(ConfigError, match="64 hex characters"):
        load_config(overrides={"trainer_public_key": "abc"})


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("coordinator", "localhost", "is not HOST:PORT"),
        ("coordinator", "host:70000", "port 1-65535"),
        ("run_id", "a b", "is not a run id"),
        ("engine", "tensorrt", "'auto', 'vllm' or 'hf'"),
        ("sandbox", "chroot", "'auto', 'docker' or 'bubblewrap'"),
        ("gpu_memory_fraction", 1.5, "less than or equal to 1"),
        ("gpu_memory_fraction", 0, "greater than 0"),
        ("max_sandboxes", 0, "greater than or equal to 1"),
        ("cpu_threads", -2, "greater than or equal to 1"),
        ("display_name", "a\nb", "printable"),
    ],
)
def test_bad_flags_say_what_to_change(field: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides={field: value})
    message = str(caught.value)
    assert f"{field} (from flag --{field.replace('_', '-')})" in message
    assert expected in message


@pytest.mark.parametrize(
    ("address"), ["127.0.0.1:50051", "coord.example.org:1", "[::1]:50051", "localhost:65535"]
)
def test_good_addresses(address: str) -> None:
    assert load_config(overrides={"coordinator": address}).coordinator == address


def test_errors_name_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEREPAIR_WORKER_MAX_SANDBOXES", "many")
    with pytest.raises(ConfigError, match="from environment CODEREPAIR_WORKER_MAX_SANDBOXES"):
        load_config()


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEREPAIR_WORKER_COORDINATOR", "")
    assert load_config().coordinator is None


def test_misspelt_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEREPAIR_WORKER_COORDINATR", "a:1")
    with pytest.raises(ConfigError, match=r"CODEREPAIR_WORKER_COORDINATR.*fix the spelling"):
        load_config()


def test_unknown_file_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"coordinater \(from file .*unknown setting"):
        load_config(_write(tmp_path, 'coordinater = "a:1"\n'))


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration file at"):
        load_config(tmp_path / "missing.toml")


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid UTF-8 TOML"):
        load_config(_write(tmp_path, "coordinator = \n"))


def test_key_path_must_not_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory: name the key file itself"):
        load_config(overrides={"key_path": tmp_path})


def test_cache_dir_must_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        load_config(overrides={"cache_dir": tmp_path / "f"})


def test_importing_the_config_does_not_import_torch() -> None:
    code = "import sys, coderepair.worker.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- property-based

_FIELDS = sorted(WorkerConfig.model_fields)
# What os.environ can hold: no NUL, no lone surrogates.
_ENV_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
_GOOD_FILE = (
    'coordinator = "127.0.0.1:50051"\nrun_id = "r1"\n'
    f'trainer_public_key = "{KEY}"\nengine = "hf"\ngpu_memory_fraction = 0.5\n'
    'max_sandboxes = 3\ncpu_threads = 2\nsandbox = "docker"\njson_logs = true\n'
    'display_name = "box"\nkey_path = "k.pem"\ncache_dir = "c"\n'
)


def _load_text(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(config, WorkerConfig)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text())
def test_random_toml_text_is_valid_or_a_config_error(tmp_path: Path, text: str) -> None:
    _load_text(tmp_path / "random.toml", text.encode("utf-8", "surrogatepass"))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary())
def test_random_bytes_are_valid_or_a_config_error(tmp_path: Path, data: bytes) -> None:
    _load_text(tmp_path / "random.toml", data)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, len(_GOOD_FILE)))
def test_truncated_file_is_valid_or_a_config_error(tmp_path: Path, cut: int) -> None:
    _load_text(tmp_path / "cut.toml", _GOOD_FILE[:cut].encode())


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.dictionaries(st.sampled_from(_FIELDS), _ENV_TEXT, max_size=4),
    toml_values=st.dictionaries(
        st.sampled_from(_FIELDS),
        st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), _ENV_TEXT),
        max_size=4,
    ),
)
def test_random_environment_and_file_values_are_valid_or_a_config_error(
    tmp_path: Path, values: dict[str, str], toml_values: dict[str, object]
) -> None:
    lines = []
    for key, value in toml_values.items():
        if isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
        elif isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, float) and math.isnan(value):
            lines.append(f"{key} = nan")
        elif isinstance(value, float) and value in (float("inf"), float("-inf")):
            lines.append(f"{key} = {'-' if value < 0 else ''}inf")
        else:
            lines.append(f"{key} = {value!r}")
    path = tmp_path / "fields.toml"
    path.write_text("\n".join(lines) + "\n")
    env = {ENV_PREFIX + key.upper(): value for key, value in values.items()}
    with mock.patch.dict(os.environ, env):
        try:
            config = load_config(path)
        except ConfigError as exc:
            assert "invalid worker configuration" in str(exc) or "TOML" in str(exc)
        else:
            assert isinstance(config, WorkerConfig)

"""The coordinator's settings: file < environment < flags, clear errors, example files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.config import ConfigError, CoordinatorConfig, load_config

REPO = Path(__file__).resolve().parents[3]
KEY = "ab" * 32

RUN = f"""
[[runs]]
run_id = "r1"
trainer_public_key = "{KEY}"
base_model_id = "tiny"
tokenizer_path = "tok"
tokenizer_sha256 = "{"c" * 64}"
tasks_path = "tasks.jsonl"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(REPO.glob("deploy/**/*.toml")), ids=str)
def test_every_example_under_deploy_loads(path: Path) -> None:
    if "coordinator" not in path.name:
        pytest.skip("not a coordinator config")
    config = load_config(path)
    assert config.runs, "the example should show a run"
    assert config.runs[0].tasks_path.is_absolute()


def test_example_exists() -> None:
    assert (REPO / "deploy" / "coordinator.toml").is_file()


def test_defaults_without_a_file() -> None:
    config = load_config()
    assert config.database.url.startswith("sqlite:///")
    assert config.object_store.kind == "local"
    assert config.runs == ()


def test_paths_resolve_against_the_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[database]\nurl = "sqlite:///c.db"\n' + RUN))
    assert config.database.url == f"sqlite:///{tmp_path / 'c.db'}"
    assert config.runs[0].tokenizer_path == tmp_path / "tok"


def test_environment_overrides_file_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, '[server]\nlisten = "127.0.0.1:1"\nmax_clock_skew_s = 5\n')
    monkeypatch.setenv("CODEREPAIR_COORDINATOR_SERVER__LISTEN", "127.0.0.1:2")
    assert load_config(path).server.listen == "127.0.0.1:2"
    assert load_config(path).server.max_clock_skew_s == 5
    flags = {"server": {"listen": "127.0.0.1:3"}}
    assert load_config(path, flags).server.listen == "127.0.0.1:3"
    assert load_config(path, flags).server.max_clock_skew_s == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nlisten = "nowhere"\n', "server.listen"),
        ('[server]\nlisten = "1.2.3.4:99999"\n', "host:port"),
        ('[database]\nurl = "mysql://x"\n', "sqlite:///PATH"),
        ('[database]\nurl = "sqlite:///:memory:"\n', "in-memory"),
        ('[object_store]\nkind = "s3"\n', "bucket"),
        ("[audit]\nmin_rate = 0\n", "audit.min_rate"),
        ('[admin]\npublic_keys = ["xyz"]\n', "64 lowercase hex"),
        ("[server]\nlisten_adress = 1\n", "unknown setting"),
        (RUN.replace(KEY, "nothex"), "trainer_public_key"),
        (RUN + RUN, "appears twice"),
        (RUN.replace('run_id = "r1"', 'run_id = "a b"'), "run_id"),
        ("[[runs]]\nrun_id = 'r'\n", "required"),
    ],
)
def test_bad_values_say_what_to_change(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="invalid coordinator configuration") as info:
        load_config(_write(tmp_path, text))
    assert expected in str(info.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[server\n"))


def test_every_field_is_documented() -> None:
    def walk(model: type) -> None:
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            assert info.description, f"{model.__name__}.{name} has no description"
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(CoordinatorConfig)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_random_text_is_a_config_or_a_config_error(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.toml"
        path.write_text(text)
        with contextlib.suppress(ConfigError):
            load_config(path)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=len(RUN)))
def test_truncated_file_is_a_config_or_a_config_error(cut: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.toml"
        path.write_text(RUN[:cut])
        with contextlib.suppress(ConfigError):
            load_config(path)

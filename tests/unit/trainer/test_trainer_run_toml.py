"""Every example trainer config under deploy/ (deploy/**/run*.toml) loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from coderepair.trainer.config import ConfigError, load_run_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "deploy").glob("**/run*.toml"))


def test_there_is_an_example() -> None:
    assert EXAMPLES, "deploy/trainer/run.toml is missing"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_loads(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.coordinator is not None and cfg.store is not None
    # Relative paths resolve against the file, not the working directory.
    assert cfg.key_file.is_absolute() and cfg.output_dir.is_absolute()


def test_env_and_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.toml"
    path.write_text('model = "m"\nmax_steps = 5\n[coordinator]\naddress = "h:1"\nrun_id = "r"\n')
    monkeypatch.setenv("CODEREPAIR_TRAINER_MAX_STEPS", "7")
    monkeypatch.setenv("CODEREPAIR_TRAINER_COORDINATOR__RUN_ID", "r2")
    cfg = load_run_config(path)
    assert cfg.max_steps == 7 and cfg.coordinator is not None
    assert cfg.coordinator.run_id == "r2" and cfg.coordinator.address == "h:1"
    assert load_run_config(path, {"max_steps": 9}).max_steps == 9


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model = \n", "not valid TOML"),
        ('model = "m"\nmax_steps = 0\n', "max_steps"),
        ('model = "m"\n[store]\nkind = "local"\n', "store.path"),
        ('model = "m"\n[publish]\nfull_every = 2\n', "no store"),
        ('model = "m"\n[coordinator]\naddress = "h:1"\nrun_id = "bad id"\n', "run_id"),
    ],
)
def test_bad_files_get_a_config_error(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_run_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(tmp_path / "absent.toml")

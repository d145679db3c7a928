"""The trainer config: defaults, documentation and actionable validation errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coderepair.trainer.config import ConfigError, LossConfig, TrainerConfig, load_config


def test_defaults_are_the_documented_safe_ones() -> None:
    cfg = load_config({"model": "/models/tiny"})
    assert cfg.loss.kl_coef == 0.0 and cfg.loss.entropy_coef == 0.0
    assert cfg.loss.delta > 1 + cfg.loss.clip_eps_high
    assert cfg.metrics.backend == "tensorboard"
    assert cfg.samples_per_step == cfg.prompts_per_step * cfg.group_size


def test_every_field_is_documented() -> None:
    for model in (TrainerConfig, LossConfig):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({}, "model"),
        ({"model": "m", "group_size": 1}, "group_size"),
        ({"model": "m", "loss": {"delta": 1.1}}, "raise delta"),
        ({"model": "m", "loss": {"clip_eps_low": 1.5}}, "clip_eps_low"),
        ({"model": "m", "warmup_steps": 10, "max_steps": 5}, "lower warmup_steps"),
        ({"model": "m", "adam_betas": [0.9, 1.0]}, "adam_betas"),
        ({"model": "m", "metrics": {"backend": "wandb"}}, "wandb_project"),
        ({"model": "m", "max_staleness": -1}, "max_staleness"),
        ({"model": "m", "typo_field": 1}, "typo_field"),
    ],
)
def test_invalid_configs_raise_config_error_naming_the_fix(
    data: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(data)


def test_importing_the_config_does_not_import_torch() -> None:
    code = "import sys, coderepair.trainer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""The calibration command on the tiny model: a small run, its report and its CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from coderepair.worker.calibrate import (
    CHEATS,
    CalibrationError,
    CalibrationSettings,
    calibrate_command,
    run_calibration,
)
from coderepair.worker.validator import ValidatorConfig

SMALL = CalibrationSettings(completions=16, cheat_completions=8, max_new_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_calibration(SMALL)


def test_report_holds_every_case_with_its_figures(report: dict[str, Any]) -> None:
    assert list(report["cases"]) == ["honest", *CHEATS]
    honest = report["cases"]["honest"]
    assert honest["completions"] == 16 and honest["rejected"] == 0
    assert report["false_rejections"] == 0
    for name in CHEATS:
        case = report["cases"][name]
        assert case["completions"] == 8
        assert case["rejection_rate"] == 1.0, (name, case["failed_checks"])
        assert sum(case["failed_checks"].values()) >= case["rejected"]
        assert case["rejection_rate_of_changed"] == 1.0
        assert case["passed_identical_to_honest"] <= case["identical_to_honest"]
    stats = honest["statistics"]
    assert stats["agreement_rate"]["min"] == 1.0 and stats["max_score_gap"]["max"] == 0.0
    assert stats["mant_err_median"]["count"] == 16
    assert report["validation_tok_s"] > 0 and report["generation_tok_s"] > 0


def test_suggested_thresholds_are_a_valid_config_that_passes_honest_work(
    report: dict[str, Any],
) -> None:
    suggested = ValidatorConfig.model_validate(report["suggested_thresholds"])
    honest = report["cases"]["honest"]["statistics"]
    assert suggested.proof.max_exp_mismatches >= honest["exp_mismatches"]["max"]
    assert suggested.proof.max_mant_err_median >= honest["mant_err_median"]["max"]
    assert suggested.max_logprob_deviation > honest["logprob_deviation"]["max"]
    # The cheats the sampling replay is for leave gaps far above the suggested limit.
    for name in ("one token changed", "best-of-4 over seeds", "another temperature"):
        assert report["cases"][name]["statistics"]["max_score_gap"]["min"] > (
            suggested.max_score_gap
        )


def test_report_is_json(report: dict[str, Any]) -> None:
    text = json.dumps(report, allow_nan=False)  # no NaN may leak into the file
    assert json.loads(text)["settings"]["completions"] == 16


def test_cli_writes_the_report(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("calibrate")(calibrate_command)
    app.command("other")(lambda: None)  # a sub-app of several commands, as mounted
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--completions",
            "8",
            "--cheat-completions",
            "1",
            "--max-new-tokens",
            "4",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "suggested thresholds" in result.output
    assert json.loads(out.read_text())["cases"]["honest"]["completions"] == 8
    bad = CliRunner().invoke(app, ["calibrate", "--model", str(tmp_path / "nowhere")])
    assert bad.exit_code != 0 and "policy directory" in bad.output


def test_bad_settings_raise_typed_errors() -> None:
    with pytest.raises(CalibrationError, match="cheat_temperature"):
        run_calibration(CalibrationSettings(completions=8, temperature=0.6))
    for bad in ({"completions": 1}, {"temperature": math.nan}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            CalibrationSettings(**bad)

"""Repeated demo runs compared: quarter means, the rise, the run-to-run noise, and the
summary.json reader on good and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from coderepair.demo.cli import app
from coderepair.demo.learning import (
    LearningError,
    RunReward,
    compare,
    outcome_shares,
    quarter_means,
    read_run,
)


def _write(run_dir: Path, rewards: list[float], **extra: object) -> Path:
    (run_dir / "run").mkdir(parents=True)
    summary = {"reward_per_step": rewards, **extra}
    (run_dir / "run" / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_quarter_means_take_the_first_and_last_quarter() -> None:
    assert quarter_means([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == (0.5, 6.5)
    assert quarter_means([-1.0, 1.0]) == (-1.0, 1.0)  # a quarter is at least one step
    with pytest.raises(LearningError, match="no trainer step"):
        quarter_means([])


@settings(max_examples=100, deadline=None)
@given(
    rewards=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=60),
    shift=st.floats(-1.0, 1.0),
)
def test_a_constant_shift_moves_both_quarters_alike(rewards: list[float], shift: float) -> None:
    first, last = quarter_means(rewards)
    first_s, last_s = quarter_means([r + shift for r in rewards])
    assert math.isclose(first_s - first, shift, abs_tol=1e-9)
    assert math.isclose(last_s - last, shift, abs_tol=1e-9)


def test_compare_pools_the_quarters_spread_across_runs() -> None:
    runs = [
        RunReward("a", 8, -0.2, 0.3, 0, 0, quarter_standard_error=0.1),
        RunReward("b", 8, 0.0, 0.5, 0, 0, quarter_standard_error=0.3),
    ]
    report = compare(runs)
    assert math.isclose(report.mean_rise, 0.5)
    # stdev of two values x, y is |x - y| / sqrt(2): 0.2 / sqrt(2) for both quarters.
    assert math.isclose(report.noise, 0.2 / math.sqrt(2))
    assert math.isclose(report.rise_spread, 0.0, abs_tol=1e-12)
    assert math.isclose(report.within_run_error, 0.2)
    assert report.rise_exceeds_noise
    flat = [
        RunReward("a", 8, first_quarter=0.0, last_quarter=0.1, heldout_before=0, heldout_after=0),
        RunReward("b", 8, first_quarter=0.5, last_quarter=0.4, heldout_before=0, heldout_after=0),
    ]
    assert not compare(flat).rise_exceeds_noise
    with pytest.raises(LearningError, match="at least two runs"):
        compare(runs[:1])


def test_read_run_finds_the_summary_in_the_workdir_or_its_run_dir(tmp_path: Path) -> None:
    work = _write(tmp_path / "w", [0.0, 0.0, 1.0, 1.0], heldout_pass_at_1_before=0.25)
    for where in (work, work / "run"):
        run = read_run(where)
        assert (run.steps, run.first_quarter, run.last_quarter) == (4, 0.0, 1.0)
        assert (run.heldout_before, run.heldout_after) == (0.25, None)
        # stdev of (0, 0, 1, 1) is 1/sqrt(3); a quarter of four steps is one step.
        assert math.isclose(run.quarter_standard_error, 1 / math.sqrt(3))
    with pytest.raises(LearningError, match=r"no summary\.json"):
        read_run(tmp_path / "missing")


@settings(max_examples=100, deadline=None)
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=10,
    )
)
def test_read_run_refuses_any_malformed_summary_clearly(
    tmp_path_factory: pytest.TempPathFactory, body: object
) -> None:
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "summary.json").write_text(json.dumps({"reward_per_step": body}))
    try:
        run = read_run(run_dir)
    except LearningError as exc:
        assert "reward_per_step" in str(exc) or "no trainer step" in str(exc)
    else:
        assert isinstance(body, list) and run.steps == len(body) > 0


def test_the_cli_reports_the_rise_and_refuses_a_single_run(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", [-0.5, -0.5, 0.5, 0.5])
    b = _write(tmp_path / "b", [-0.3, -0.3, 0.3, 0.3])
    runner = CliRunner()
    answer = runner.invoke(app, ["learning", str(a), str(b), "--json"])
    assert answer.exit_code == 0, answer.output
    report = json.loads(answer.output)
    assert math.isclose(report["mean_rise"], 0.8) and report["rise_exceeds_noise"] is True
    assert [r["steps"] for r in report["runs"]] == [4, 4]
    one = runner.invoke(app, ["learning", str(a)])
    assert one.exit_code == 1 and "at least two runs" in one.output


def test_outcome_shares_compare_the_early_and_late_policy_versions() -> None:
    versions = [1, 1, 2, 3, 4, 4, 4, 4]
    components = [
        ["malformed"],
        ["pass"],
        ["pass"],  # versions 2 and 3 are neither the first nor the last quarter
        ["malformed"],
        ["pass"],
        ["pass", "length_penalty"],
        ["not_applied", "well_formed"],
        ["fail", "tests"],
    ]
    o = outcome_shares(versions, components)
    assert (o.rollouts, o.pass_first, o.pass_last) == (8, 0.5, 0.5)
    assert (o.malformed_first, o.malformed_last) == (0.5, 0.0)
    with pytest.raises(LearningError):
        outcome_shares([1], [])


def test_read_run_reads_outcomes_from_the_local_object_store(tmp_path: Path) -> None:
    work = _write(tmp_path / "w", [0.0, 1.0])
    batch = work / "run" / "objects" / "runs" / "demo" / "batches" / "b1"
    batch.mkdir(parents=True)
    table = pa.table(
        {
            "policy_version": pa.array([1, 1, 2, 2], pa.int64()),
            "reward_components": pa.array(
                [[("malformed", -1.0)], [("pass", 1.0)], [("pass", 1.0)], [("pass", 1.0)]],
                pa.map_(pa.string(), pa.float64()),
            ),
        }
    )
    pq.write_table(table, batch / "x.parquet")
    run = read_run(work)
    assert run.outcomes is not None
    assert (run.outcomes.pass_first, run.outcomes.pass_last) == (0.5, 1.0)
    assert (run.outcomes.malformed_first, run.outcomes.malformed_last) == (0.5, 0.0)
    (batch / "y.parquet").write_bytes(b"not parquet")
    with pytest.raises(LearningError, match="cannot read the rollouts"):
        read_run(work)

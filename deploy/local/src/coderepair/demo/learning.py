"""Did the demo learn? The reward rise of repeated runs against their run-to-run noise.

One run's per-step mean reward is noisy: 16 samples a step, from tasks of very different
difficulty. A rise means something only against what the same figure does from run to
run, so `coderepair learning RUN_DIR...` reads the `summary.json` of several demo runs
of one configuration and reports:

- per run, the mean reward of the first and of the last quarter of its trainer steps;
- the rise (last minus first quarter), averaged over the runs;
- the run-to-run noise: the sample standard deviation, across runs, of a quarter's mean,
  pooled over the first and the last quarter (the spread one quarter's figure has when
  the configuration is repeated);
- whether the mean rise exceeds that noise (and the run-to-run spread of the rise itself);
- a second, within-run figure that does not rest on a handful of runs: the standard error
  of a quarter's mean from the spread of the per-step rewards (stdev / sqrt(steps in a
  quarter)), averaged over the runs;
- from the accepted rollouts' Parquet files (``run/objects``), the share that passed the
  tests and the share that was malformed, in the first and the last quarter of the policy
  versions that generated them: what the reward's rise is made of.

Two runs are the least that gives a spread at all; more runs give a better estimate.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coderepair.protocol.errors import ProtocolError

__all__ = [
    "LearningError",
    "LearningReport",
    "Outcomes",
    "RunReward",
    "compare",
    "outcome_shares",
    "quarter_means",
    "read_run",
]


class LearningError(ProtocolError):
    """A run directory cannot be read, or the runs cannot be compared."""


def quarter_means(rewards: Sequence[float]) -> tuple[float, float]:
    """Mean reward of the first and of the last quarter of the steps (at least one step
    each), as the demo's summary reports them."""
    if not rewards:
        raise LearningError("a run with no trainer step has no reward to compare")
    quarter = max(1, len(rewards) // 4)
    return statistics.fmean(rewards[:quarter]), statistics.fmean(rewards[-quarter:])


@dataclass(frozen=True)
class Outcomes:
    """Shares of a run's accepted rollouts by outcome, early and late in the run."""

    rollouts: int
    pass_first: float
    pass_last: float
    malformed_first: float
    malformed_last: float


def outcome_shares(versions: Sequence[int], components: Sequence[Sequence[str]]) -> Outcomes:
    """Pass and malformed shares of the rollouts from the first and the last quarter of
    the policy versions present; ``components`` are each rollout's reward component
    names (``pass`` and ``malformed`` name those outcomes in the protocol's reward)."""
    if len(versions) != len(components) or not versions:
        raise LearningError("outcome shares need one component list per rollout, and rollouts")
    ordered = sorted(set(versions))
    quarter = max(1, len(ordered) // 4)
    early, late = set(ordered[:quarter]), set(ordered[-quarter:])

    def share(chosen: set[int], name: str) -> float:
        picked = [name in c for v, c in zip(versions, components, strict=True) if v in chosen]
        return sum(picked) / len(picked)

    return Outcomes(
        rollouts=len(versions),
        pass_first=share(early, "pass"),
        pass_last=share(late, "pass"),
        malformed_first=share(early, "malformed"),
        malformed_last=share(late, "malformed"),
    )


def _read_outcomes(run_dir: Path) -> Outcomes | None:
    """Outcome shares from the run's local object store; None when it holds no rollouts
    (an S3 store, or a run that accepted nothing)."""
    import pyarrow.parquet as pq  # noqa: PLC0415  (heavy; only this reader needs it)

    objects = next(
        (p for p in (run_dir / "run" / "objects", run_dir / "objects") if p.is_dir()), None
    )
    if objects is None:
        return None
    versions: list[int] = []
    components: list[list[str]] = []
    for path in sorted(objects.glob("runs/*/batches/*/*.parquet")):
        try:
            table = pq.read_table(path, columns=["policy_version", "reward_components"])
        except (OSError, ValueError, KeyError) as exc:
            raise LearningError(f"cannot read the rollouts in {path}: {exc}") from exc
        for row in table.to_pylist():
            versions.append(int(row["policy_version"]))
            components.append([str(name) for name, _ in row["reward_components"] or []])
    return outcome_shares(versions, components) if versions else None


@dataclass(frozen=True)
class RunReward:
    """One run's reward figures."""

    path: str
    steps: int
    first_quarter: float
    last_quarter: float
    heldout_before: float | None
    heldout_after: float | None
    outcomes: Outcomes | None = None
    quarter_standard_error: float = 0.0
    """stdev of the per-step rewards / sqrt(steps in a quarter): within-run noise."""

    @property
    def rise(self) -> float:
        return self.last_quarter - self.first_quarter


def read_run(run_dir: Path) -> RunReward:
    """The figures of the demo run in ``run_dir`` (a work directory or its ``run/``)."""
    candidates = [run_dir / "summary.json", run_dir / "run" / "summary.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise LearningError(
            f"no summary.json in {run_dir} or {run_dir / 'run'}: pass the --workdir of a "
            "finished `coderepair demo` run"
        )
    try:
        summary: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LearningError(f"cannot read {path}: {exc}") from exc
    rewards = summary.get("reward_per_step") if isinstance(summary, dict) else None
    if not isinstance(rewards, list) or not all(
        isinstance(r, int | float) and math.isfinite(r) for r in rewards
    ):
        raise LearningError(f"{path} has no list of finite numbers under reward_per_step")
    values = [float(r) for r in rewards]
    first, last = quarter_means(values)
    quarter = max(1, len(values) // 4)
    step_sd = statistics.stdev(values) if len(values) > 1 else 0.0

    def _pass(key: str) -> float | None:
        value = summary.get(key)
        return float(value) if isinstance(value, int | float) else None

    return RunReward(
        path=str(run_dir),
        steps=len(rewards),
        first_quarter=first,
        last_quarter=last,
        heldout_before=_pass("heldout_pass_at_1_before"),
        heldout_after=_pass("heldout_pass_at_1_after"),
        outcomes=_read_outcomes(run_dir),
        quarter_standard_error=step_sd / math.sqrt(quarter),
    )


@dataclass(frozen=True)
class LearningReport:
    """Repeated runs of one configuration, compared."""

    runs: tuple[RunReward, ...]
    mean_rise: float
    noise: float
    """Pooled run-to-run standard deviation of a quarter's mean reward."""
    rise_spread: float
    """Run-to-run standard deviation of the rise itself."""
    within_run_error: float
    """Mean over the runs of a quarter's within-run standard error."""

    @property
    def rise_exceeds_noise(self) -> bool:
        return self.mean_rise > self.noise

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": [
                {
                    "path": r.path,
                    "steps": r.steps,
                    "first_quarter": round(r.first_quarter, 4),
                    "last_quarter": round(r.last_quarter, 4),
                    "rise": round(r.rise, 4),
                    "heldout_before": r.heldout_before,
                    "heldout_after": r.heldout_after,
                    "outcomes": None
                    if r.outcomes is None
                    else {k: round(v, 4) for k, v in vars(r.outcomes).items()},
                }
                for r in self.runs
            ],
            "mean_rise": round(self.mean_rise, 4),
            "noise": round(self.noise, 4),
            "rise_spread": round(self.rise_spread, 4),
            "within_run_error": round(self.within_run_error, 4),
            "rise_exceeds_noise": self.rise_exceeds_noise,
        }


def compare(runs: Sequence[RunReward]) -> LearningReport:
    """The mean rise of ``runs`` against their run-to-run noise (two runs at least)."""
    if len(runs) < 2:
        raise LearningError(
            f"run-to-run noise needs at least two runs of one configuration, got {len(runs)}"
        )
    first_sd = statistics.stdev(r.first_quarter for r in runs)
    last_sd = statistics.stdev(r.last_quarter for r in runs)
    return LearningReport(
        runs=tuple(runs),
        mean_rise=statistics.fmean(r.rise for r in runs),
        noise=math.sqrt((first_sd**2 + last_sd**2) / 2),
        rise_spread=statistics.stdev(r.rise for r in runs),
        within_run_error=statistics.fmean(r.quarter_standard_error for r in runs),
    )

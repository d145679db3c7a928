"""`coderepair demo --tiny`: the whole network on one machine, as a user runs it.

Real processes throughout: the `coderepair` console script prepares tasks (HumanEval
mutants verified in the sandbox), the tiny model and its warm start, then starts
`coderepair-coordinator serve`, `coderepair-trainer run` and two `coderepair-worker
join` processes, and ends with a summary. What is checked is that the network did its
job: rollouts generated and verified in the sandbox, validated (audited) and accepted
by the coordinator, trained on by the trainer, and a version it published reached the
workers, then that every process is gone and the summary's artefacts exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(sys.executable).with_name("coderepair")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_demo_generates_verifies_validates_trains_and_updates_workers(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEREPAIR_")}
    done = subprocess.run(
        [str(DEMO), "demo", "--tiny", "--plain", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=1400,
        env=env | {"COLUMNS": "160"},
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run = tmp_path / "demo" / "run"
    summary = json.loads((run / "summary.json").read_text())
    print(json.dumps(summary, indent=1))

    # Generated, and verified in the sandbox by the workers (malformed answers, which
    # the warm-started tiny model still writes, need no test run).
    assert summary["rollouts_generated"] > 0
    assert summary["sandbox_jobs"] > 0
    # Validated: every batch is audited at first (TOPLOC proof, sampling replay, reward
    # re-run in the coordinator's sandbox); honest workers fail none of them.
    verdicts = summary["audit_verdicts"]
    for kind in ("proof", "sampling", "reward"):
        assert verdicts.get(f"{kind}/passed", 0) > 0, verdicts
        assert verdicts.get(f"{kind}/failed", 0) == 0, verdicts
    assert summary["batches"].get("accepted", 0) > 0
    assert summary["rollouts_accepted"] > 0
    # Trained on: the trainer made its steps from accepted rollouts.
    assert summary["trainer_steps"] == 3
    assert summary["end_reason"].startswith("the trainer made its steps")
    assert 0 < summary["rollouts_trained"] <= summary["rollouts_accepted"]
    assert len(summary["reward_per_step"]) == 3
    # A new policy version reached the workers.
    assert summary["policy_versions_published"] >= 2
    for worker in summary["workers"].values():
        assert worker["policy_versions"][0] == 1
        assert max(worker["policy_versions"]) >= 2, worker
    # The ending: held-out pass@1 before and after, a PNG, the summary printed.
    for key in ("heldout_pass_at_1_before", "heldout_pass_at_1_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert Path(summary["reward_curve_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coderepair demo: summary" in done.stdout
    assert "held-out pass@1, before → after" in done.stdout
    # Every role left: their logs end, and no process of this run is still alive.
    leftover = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True, check=False
    )
    assert leftover.stdout.strip() == "", leftover.stdout
    worker_log = (run / "logs" / "worker-1.log").read_text()
    assert '"event": "left"' in worker_log or '"event":"left"' in worker_log

"""`coderepair.worker.verify.plan`: the worker's reward plan for one completion (pure: no
sandbox runs here; the sandbox job it builds is checked for its content)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.tasks.repo import load_fixtures
from coderepair.protocol.patch import edits_between, render_edits
from coderepair.protocol.reward import RewardSpec
from coderepair.worker.sandbox.base import JobResult
from coderepair.worker.verify import EMPTY_LOG_SHA256, plan

TASK = load_fixtures()[0]
SPEC = RewardSpec()


def test_the_oracle_fix_applies_and_builds_the_tasks_test_job() -> None:
    text = render_edits(edits_between(TASK.files, TASK.oracle), think="fix it")
    made = plan(TASK, text, 40, SPEC)
    assert made.outcome["format_ok"] and made.outcome["applied"]
    assert made.job is not None and made.job.kind == "pytest"
    assert dict(made.job.files) == TASK.oracle
    assert made.job.test_ids == TASK.fail_to_pass + TASK.pass_to_pass
    passed = JobResult("ok", 3, 3, {}, "", EMPTY_LOG_SHA256, 0.1, "test")
    failed = JobResult("ok", 0, 3, {}, "", EMPTY_LOG_SHA256, 0.1, "test")
    assert made.reward(passed, SPEC).total == SPEC.pass_reward
    assert made.reward(failed, SPEC).total < SPEC.pass_reward


def test_a_malformed_completion_gets_the_malformed_reward_and_no_job() -> None:
    made = plan(TASK, "no patch here", 3, SPEC)
    assert made.job is None and made.patch == "" and made.notes
    reward = made.reward(None, SPEC)
    assert reward.total == SPEC.malformed_reward
    assert reward.components == {"malformed": SPEC.malformed_reward}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_any_text_gives_a_plan_with_a_reward_in_range(text: str) -> None:
    made = plan(TASK, text, 5, SPEC)
    reward = made.reward(None, SPEC)
    assert SPEC.min_reward <= reward.total <= SPEC.max_reward


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_truncated_patch_never_raises(data: st.DataObject) -> None:
    text = render_edits(edits_between(TASK.files, TASK.oracle))
    cut = data.draw(st.integers(0, len(text)))
    made = plan(TASK, text[:cut], 5, SPEC)
    assert made.outcome["format_ok"] == (made.patch != "")

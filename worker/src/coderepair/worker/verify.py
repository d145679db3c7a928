"""Scoring one completion: parse the patch, apply it to the task, run the tests, reward.

This is the worker's half of the reward rule (DESIGN.md, "Reward"), and it must give
exactly what the coordinator's reward audit recomputes: the same outcome fields, the
same sandbox job for the same patched files, the same `compute_reward`. `plan` does
the pure part (parse, apply, similarity) and says which sandbox job, if any, decides the
rest; `Plan.reward` turns the job's result into the reward.

Model-written code never runs here: `plan` only builds a `Job`, which the caller runs in
a `Sandbox`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from coderepair.protocol.patch import (
    PatchApplyError,
    PatchFormatError,
    apply_edits,
    parse_response,
    render_edits,
    unified_diff,
)
from coderepair.protocol.reward import (
    Reward,
    RewardSpec,
    VerificationOutcome,
    compute_reward,
    similarity,
)
from coderepair.protocol.task import RepairTask
from coderepair.worker.sandbox.base import Job, JobResult

__all__ = ["EMPTY_LOG_SHA256", "Plan", "plan"]

EMPTY_LOG_SHA256 = hashlib.sha256(b"").hexdigest()
"""Test-log digest of a completion whose tests never ran (malformed, did not apply)."""


@dataclass(frozen=True)
class Plan:
    """What one completion's reward needs: the outcome so far and the job to run, if any."""

    outcome: dict[str, Any]
    job: Job | None
    patch: str = ""
    """The parsed patch in canonical form ("" when the response was malformed)."""
    notes: tuple[str, ...] = field(default=())
    """Why the patch did not parse or apply (for the live view and logs)."""

    def reward(self, result: JobResult | None, spec: RewardSpec) -> Reward:
        """The reward of the outcome, with the sandbox job's result when one ran."""
        fields = dict(self.outcome)
        if result is not None:
            fields.update(
                tests_passed=result.tests_passed,
                tests_total=result.tests_total,
                timed_out=result.status == "timeout",
            )
        return compute_reward(spec, VerificationOutcome(**fields))


def plan(task: RepairTask, completion_text: str, completion_tokens: int, spec: RewardSpec) -> Plan:
    """Parse ``completion_text`` against ``task`` (see the module docstring)."""
    try:
        parsed = parse_response(completion_text)
    except PatchFormatError as exc:
        return Plan(
            {"format_ok": False, "completion_tokens": completion_tokens}, None, "", (str(exc),)
        )
    searched = [e for e in parsed.edits if e.search]
    found = sum(1 for e in searched if e.search in task.files.get(e.path, ""))
    base: dict[str, Any] = {
        "format_ok": True,
        "search_blocks_found": found,
        "search_blocks_total": len(searched),
        "completion_tokens": completion_tokens,
    }
    patch = render_edits(parsed.edits)
    try:
        patched = apply_edits(task.files, parsed.edits, protected=tuple(task.tests))
    except PatchApplyError as exc:
        if spec.similarity_weight > 0.0:
            base["similarity"] = 0.0
        return Plan(base, None, patch, (str(exc),))
    if spec.similarity_weight > 0.0:
        base["similarity"] = similarity(
            unified_diff(task.files, patched), unified_diff(task.files, task.oracle)
        )
    base["applied"] = True
    if task.kind == "function":
        job = Job(
            kind="function",
            files=dict(patched),
            tests=dict(task.tests),
            entry_point=task.entry_point,
        )
    else:
        job = Job(
            kind="pytest",
            files=dict(patched),
            tests=dict(task.tests),
            test_ids=tuple(task.fail_to_pass + task.pass_to_pass),
        )
    return Plan(base, job, patch)

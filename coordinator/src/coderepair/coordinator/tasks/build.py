"""The corpus builder: HumanEval mutants and repository tasks, verified in the sandbox.

`build_corpus` makes up to ``candidates_per_problem`` distinct mutants of every HumanEval
problem (`humaneval.mutants_of`), runs the canonical solution and every mutant in one
parallel batch through the sandbox, and keeps, per problem whose canonical solution
passes, the first ``max_per_problem`` mutants that fail their tests. Mutants that pass
(equivalent programs) or time out are dropped. The bundled repository fixtures (and any
JSONL tasks given) are verified the same way: the oracle passes every test id, the buggy
snapshot fails every FAIL_TO_PASS id and passes every PASS_TO_PASS id.

Same seed, same builder version and a deterministic sandbox give the same tasks and so
the same content hashes. The only nondeterminism a sandbox can add is a mutant whose
run time sits right at `BUILD_LIMITS.timeout_s`; the limit is far above what any
canonical solution needs, so such mutants are endless loops in practice.
"""

from __future__ import annotations

import ast
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coderepair.coordinator.tasks import humaneval
from coderepair.coordinator.tasks.humaneval import HumanEvalProblem, Mutant
from coderepair.coordinator.tasks.repo import load_fixtures
from coderepair.coordinator.tasks.split import SPLIT_RULE, split_of
from coderepair.coordinator.tasks.verify import (
    DEFAULT_WORKERS,
    buggy_job,
    fails,
    function_job,
    oracle_job,
    passes,
    run_all,
)
from coderepair.protocol.task import Mutation, RepairTask, TaskSet, write_taskset
from coderepair.worker.sandbox.base import Job, JobResult, Sandbox, SandboxLimits

BUILDER_VERSION = "1"
"""Bump when a change to the operators or the selection changes which tasks a seed gives."""
DEFAULT_CANDIDATES_PER_PROBLEM = 16
"""Mutants generated and verified per problem (some turn out equivalent and are dropped)."""
DEFAULT_MAX_PER_PROBLEM = 12
"""Verified mutants kept per problem, so that no problem dominates the corpus."""
BUILD_LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=512, pids=64)
"""Limits for verification: every canonical solution runs in well under a second here."""


@dataclass(frozen=True)
class BuildReport:
    """What the builder did, for the operator's console."""

    backend: str
    seed: int
    duration_s: float
    problems: int
    candidates: int
    """Mutants generated (all were run in the sandbox)."""
    equivalent: int
    """Mutants that passed every test (not bugs) and were dropped."""
    timed_out: int
    """Mutants that ran out of time and were dropped."""
    capped: int
    """Failing mutants left out by ``max_per_problem``."""
    canonical_failures: tuple[str, ...] = field(default=())
    """Problems whose canonical solution did not pass (with what happened): all their
    mutants were dropped. HumanEval's references all pass, so any entry means the
    sandbox misbehaved."""
    rejected_repo_tasks: tuple[str, ...] = field(default=())
    """Repository tasks whose oracle did not pass or whose bug did not fail as declared."""

    def summary(self) -> str:
        return (
            f"{self.problems} problems, {self.candidates} mutants run in {self.backend} in "
            f"{self.duration_s:.1f}s: {self.equivalent} equivalent, {self.timed_out} timed "
            f"out, {self.capped} over the per-problem cap; canonical failures: "
            f"{list(self.canonical_failures) or 'none'}; rejected repo tasks: "
            f"{list(self.rejected_repo_tasks) or 'none'}"
        )


def build_corpus(
    seed: int,
    sandbox: Sandbox,
    *,
    problem_ids: Iterable[str] | None = None,
    candidates_per_problem: int = DEFAULT_CANDIDATES_PER_PROBLEM,
    max_per_problem: int = DEFAULT_MAX_PER_PROBLEM,
    include_fixtures: bool = True,
    repo_tasks: Sequence[RepairTask] = (),
    workers: int = DEFAULT_WORKERS,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TaskSet, BuildReport]:
    """Build and verify the corpus; see the module docstring.

    ``sandbox`` should be made with `BUILD_LIMITS`. ``problem_ids`` selects a subset of
    HumanEval (all 164 by default). Raises `verify.VerifyError` if the sandbox itself
    keeps failing.
    """
    if candidates_per_problem < 1 or max_per_problem < 1:
        raise ValueError("candidates_per_problem and max_per_problem must be at least 1")
    start = time.monotonic()
    problems = humaneval.load_problems(problem_ids)
    mutants = {
        p.problem_id: humaneval.mutants_of(p, seed, candidates_per_problem) for p in problems
    }
    repos = [*(load_fixtures() if include_fixtures else []), *repo_tasks]

    jobs: list[Job] = []
    for problem in problems:
        jobs.append(_function_job(problem, humaneval.oracle_of(problem)))
        jobs += [_function_job(problem, m.source) for m in mutants[problem.problem_id]]
    for task in repos:
        jobs += [oracle_job(task), buggy_job(task)]
    results = iter(run_all(sandbox, jobs, workers=workers, progress=progress))

    tasks: list[RepairTask] = []
    canonical_failures: list[str] = []
    counts: Counter[str] = Counter()
    for problem in problems:
        canonical = next(results)
        candidates = mutants[problem.problem_id]
        verdicts = [next(results) for _ in candidates]
        counts["candidates"] += len(candidates)
        if not passes(canonical):
            canonical_failures.append(f"{problem.problem_id} ({_outcome(canonical)})")
            continue
        kept: list[Mutant] = []
        for mutant, result in zip(candidates, verdicts, strict=True):
            if result.status == "timeout":
                counts["timed_out"] += 1
            elif not fails(result):
                counts["equivalent"] += 1
            elif len(kept) >= max_per_problem:
                counts["capped"] += 1
            else:
                kept.append(mutant)
        tasks += [_function_task(problem, mutant) for mutant in kept]
    rejected = []
    for task in repos:
        good, bad = next(results), next(results)
        if passes(good) and fails(bad, task.fail_to_pass, task.pass_to_pass):
            tasks.append(task)
        else:
            rejected.append(f"{task.problem_id} (oracle {_outcome(good)}; buggy {_outcome(bad)})")

    taskset = TaskSet.from_tasks(
        tasks, builder_version=BUILDER_VERSION, split_rule=SPLIT_RULE, seed=seed
    )
    report = BuildReport(
        backend=sandbox.name,
        seed=seed,
        duration_s=time.monotonic() - start,
        problems=len(problems),
        candidates=counts["candidates"],
        equivalent=counts["equivalent"],
        timed_out=counts["timed_out"],
        capped=counts["capped"],
        canonical_failures=tuple(canonical_failures),
        rejected_repo_tasks=tuple(rejected),
    )
    return taskset, report


def write_corpus(taskset: TaskSet, path: str | Path) -> None:
    """Write the versioned task-set file (header line, then one task per line)."""
    write_taskset(taskset, path)


def _outcome(result: JobResult) -> str:
    anomalies = f", anomalies: {list(result.anomalies)}" if result.anomalies else ""
    return f"{result.status}, {result.tests_passed}/{result.tests_total} passed{anomalies}"


def _function_job(problem: HumanEvalProblem, source: str) -> Job:
    return function_job(
        {humaneval.SOLUTION_PATH: source},
        {humaneval.TESTS_PATH: problem.test_module},
        f"{humaneval.SOLUTION_PATH}:{problem.entry_point}",
    )


def _function_task(problem: HumanEvalProblem, mutant: Mutant) -> RepairTask:
    return RepairTask.create(
        kind="function",
        source="humaneval",
        problem_id=problem.problem_id,
        split=split_of(problem.problem_id),
        description=_description(problem),
        files={humaneval.SOLUTION_PATH: mutant.source},
        tests={humaneval.TESTS_PATH: problem.test_module},
        entry_point=f"{humaneval.SOLUTION_PATH}:{problem.entry_point}",
        oracle={humaneval.SOLUTION_PATH: mutant.oracle},
        mutation=Mutation(operator=mutant.operator, line=mutant.line, detail=mutant.detail),
    )


def _description(problem: HumanEvalProblem) -> str:
    """The problem statement: what the function should do, from its docstring."""
    docstring = ""
    for node in ast.parse(problem.prompt).body:
        if isinstance(node, ast.FunctionDef) and node.name == problem.entry_point:
            docstring = ast.get_docstring(node) or ""
    intro = (
        f"The function `{problem.entry_point}` in `{humaneval.SOLUTION_PATH}` has a bug: "
        "it fails its tests. Fix it so that it does what its docstring says."
    )
    return f"{intro}\n\n{docstring}".strip()

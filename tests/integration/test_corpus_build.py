"""The corpus builder against the real sandboxes: Docker warm pool and bubblewrap.

On a subset of HumanEval (chosen to include held-out problems and the problems whose
tests call helpers from the prompt), the builder's verdicts are re-checked in both
backends: every canonical solution passes and every kept mutant fails, in Docker AND
in bubblewrap; the same seed gives the same hashes whichever backend built it; the
split by problem never puts one problem in both splits.

`test_full_corpus_verifies_in_both_backends` does the same for the whole corpus
(slow: it is the acceptance check, about 7 minutes on 2 busy cores).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from coderepair.coordinator.tasks.build import build_corpus
from coderepair.coordinator.tasks.sandboxes import open_sandbox
from coderepair.coordinator.tasks.split import split_of
from coderepair.coordinator.tasks.verify import reverify
from coderepair.protocol.task import TaskSet, loads_taskset
from coderepair.worker.sandbox.base import Sandbox

# 7, 12, 15 and 101 are held out; 32, 33 and 38 have tests that call prompt helpers.
SUBSET = [f"HumanEval/{i}" for i in (0, 7, 12, 15, 32, 33, 38, 57, 101, 140)]
SEED = 11


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def bubblewrap() -> Iterator[Sandbox]:
    if shutil.which("bwrap") is None:
        if _in_ci():
            pytest.fail("CI must provide bubblewrap (.ci/run installs it)")
        pytest.skip("bubblewrap (bwrap) is not installed")
    with open_sandbox("bubblewrap") as sandbox:
        yield sandbox


def _build(sandbox: Sandbox) -> TaskSet:
    taskset, report = build_corpus(
        SEED, sandbox, problem_ids=SUBSET, candidates_per_problem=8, max_per_problem=5
    )
    assert report.canonical_failures == (), report.summary()
    assert report.rejected_repo_tasks == (), report.summary()
    assert report.problems == len(SUBSET)
    # The written file reads back to the same tasks.
    assert loads_taskset(taskset.dumps()).tasks == taskset.tasks
    return taskset


def _check_split(taskset: TaskSet) -> None:
    train = {t.problem_id for t in taskset.in_split("train")}
    heldout = {t.problem_id for t in taskset.in_split("heldout")}
    assert train and heldout
    assert not train & heldout
    assert all(t.split == split_of(t.problem_id) for t in taskset.tasks)


def _check_verifies(taskset: TaskSet, sandbox: Sandbox) -> None:
    report = reverify(taskset.tasks, sandbox)
    assert report.backend == sandbox.name
    assert len(report.verdicts) == len(taskset)
    assert report.all_ok, [v for v in report.failures][:5]


@pytest.mark.docker
def test_subset_verifies_in_docker_and_bubblewrap_with_the_same_hashes(
    bubblewrap: Sandbox,
) -> None:
    with open_sandbox("docker") as docker:
        built_in_docker = _build(docker)
        _check_verifies(built_in_docker, docker)
    _check_verifies(built_in_docker, bubblewrap)
    _check_split(built_in_docker)
    kinds = {t.kind for t in built_in_docker.tasks}
    assert kinds == {"function", "repo"}
    assert len(built_in_docker.in_split("heldout")) >= 4
    # Same seed, other backend: the very same tasks, hash for hash.
    built_in_bubblewrap = _build(bubblewrap)
    assert [t.content_hash for t in built_in_bubblewrap.tasks] == [
        t.content_hash for t in built_in_docker.tasks
    ]


def test_subset_builds_reproducibly_in_bubblewrap(bubblewrap: Sandbox) -> None:
    """The fallback on its own, as on a machine without a Docker engine."""
    first = _build(bubblewrap)
    _check_verifies(first, bubblewrap)
    _check_split(first)
    again = _build(bubblewrap)
    assert [t.task_id for t in again.tasks] == [t.task_id for t in first.tasks]
    other_seed, _ = build_corpus(
        SEED + 1, bubblewrap, problem_ids=SUBSET, candidates_per_problem=8, max_per_problem=5
    )
    assert {t.task_id for t in other_seed.tasks} != {t.task_id for t in first.tasks}


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(1800)
def test_full_corpus_verifies_in_both_backends(bubblewrap: Sandbox) -> None:
    """The acceptance check: the whole corpus, built in Docker, re-verified in bubblewrap.

    Building keeps a mutant only if the canonical solution passes and the mutant fails
    in Docker; re-verifying runs every oracle and every buggy snapshot again in the
    fallback. Running the Docker side twice would only repeat the build's own check.
    """
    with open_sandbox("docker") as docker:
        taskset, report = build_corpus(0, docker)
    assert report.canonical_failures == (), report.summary()
    assert report.rejected_repo_tasks == (), report.summary()
    assert sum(1 for t in taskset.tasks if t.source == "humaneval") >= 1_000
    _check_split(taskset)
    _check_verifies(taskset, bubblewrap)

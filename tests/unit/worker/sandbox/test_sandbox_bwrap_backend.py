"""The bubblewrap backend with real bwrap: what a job sees from inside, and the host side.

The candidate here reports facts about its own process (uid, capabilities, visible
paths...) as return values, and the trusted ``check`` asserts them — so each property
is observed from inside the sandbox, through the same runner a verification uses.
Attacks live in tests/adversarial/test_hostile_patches.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coderepair.worker.sandbox.base import Job, SandboxError, SandboxLimits, SandboxUnavailable
from coderepair.worker.sandbox.bwrap_backend import (
    RUNNER_IN_SANDBOX,
    SANDBOX_UID,
    WORKDIR_IN_SANDBOX,
    BubblewrapSandbox,
    bwrap_argv,
    probe,
)

LIMITS = SandboxLimits(timeout_s=20, workdir_mb=8)

INSPECT = """\
import os

def fact(name):
    if name == "uid":
        return [os.getuid(), os.geteuid(), os.getgid()]
    if name == "caps":
        with open("/proc/self/status") as fh:
            return [l.split()[1] for l in fh if l.startswith(("CapEff", "CapPrm", "CapBnd"))]
    if name == "env":
        return sorted(os.environ)
    if name == "exists":
        return [p for p in ("/home", "/root", "/work/main", "/etc/shadow", "/var/run/docker.sock",
                            "/sys", "/usr/local/bin") if os.path.exists(p)]
    if name == "writable":
        found = []
        for p in ("/", "/etc", "/usr", "/dev", "/dev/shm", "/opt/coderepair", "/tmp"):
            try:
                with open(os.path.join(p, ".probe"), "w"):
                    found.append(p)
            except OSError:
                pass
        return found
    if name == "workdir_size":
        st = os.statvfs("/work")
        return st.f_blocks * st.f_frsize
    if name == "hostname":
        return os.uname().nodename
    if name == "interfaces":
        return sorted(n for _, n in __import__("socket").if_nameindex())
"""

INSPECT_CHECK = f"""\
def check(candidate):
    assert candidate("uid") == [{SANDBOX_UID}, {SANDBOX_UID}, {SANDBOX_UID}]
    assert candidate("caps") == ["0000000000000000"] * 3
    assert set(candidate("env")) <= {{"PATH", "HOME", "TMPDIR", "LANG", "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}}
    assert candidate("exists") == []
    assert candidate("writable") == []
    assert candidate("workdir_size") == {LIMITS.workdir_mb * 1024 * 1024}
    assert candidate("hostname") == "sandbox"
    assert candidate("interfaces") == ["lo"]
"""


@pytest.fixture(scope="module")
def sandbox() -> Iterator[BubblewrapSandbox]:
    try:
        box = BubblewrapSandbox(LIMITS)
    except SandboxUnavailable as exc:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            raise
        pytest.skip(f"bubblewrap unavailable: {exc}")
    with box:
        yield box


def add_job(body: str) -> Job:
    return Job(
        "function",
        {"solution.py": body},
        {"test_add.py": "def check(candidate):\n    assert candidate(1, 2) == 3\n"},
        "solution.py:add",
    )


def test_a_job_sees_an_unprivileged_empty_sealed_world(sandbox: BubblewrapSandbox) -> None:
    job = Job("function", {"inspect.py": INSPECT}, {"t.py": INSPECT_CHECK}, "inspect.py:fact")
    result = sandbox.run(job)
    assert result.backend == "bubblewrap"
    failed = [name for name, ok in result.per_test.items() if not ok]
    assert result.all_passed, f"{failed}: {result.log}"


def test_pass_fail_and_pytest_jobs(sandbox: BubblewrapSandbox) -> None:
    assert sandbox.run(add_job("def add(a, b):\n    return a + b\n")).all_passed
    wrong = sandbox.run(add_job("def add(a, b):\n    return a * b\n"))
    assert wrong.status == "ok" and wrong.tests_passed == 0
    job = Job(
        "pytest",
        {"calc.py": "def add(a, b):\n    return a + b\n"},
        {"test_calc.py": "from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n"},
        test_ids=("test_calc.py::test_add",),
    )
    result = sandbox.run(job)
    assert result.all_passed, result


GRPC_BESIDE = """
import sys
from concurrent import futures

import grpc

from coderepair.worker.sandbox.base import Job, SandboxLimits
from coderepair.worker.sandbox.bwrap_backend import BubblewrapSandbox

server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
grpc.channel_ready_future(channel).result(timeout=30)
job = Job("function", {"solution.py": "def add(a, b):\\n    return a + b\\n"},
          {"t.py": "def check(candidate):\\n    assert candidate(1, 2) == 3\\n"},
          "solution.py:add")
with BubblewrapSandbox(SandboxLimits(timeout_s=20, workdir_mb=8)) as box:
    for _ in range(4):
        assert box.run(job).all_passed
print("ran 4")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch happens only when run as root")
def test_starting_bwrap_as_root_runs_no_grpc_fork_handlers(
    sandbox: BubblewrapSandbox, tmp_path: Path
) -> None:
    """A worker is a gRPC client: its sandboxes start beside gRPC's threads. A real fork
    there runs gRPC's fork handlers (logged by fork_posix.cc each time), and once in a
    full test run such a child died before bwrap ran; setpriv lets Popen vfork."""
    script = tmp_path / "beside.py"
    script.write_text(GRPC_BESIDE)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and "ran 4" in done.stdout, done.stderr[-2000:]
    assert "fork" not in done.stderr, done.stderr[-2000:]


def test_concurrent_runs_are_independent(sandbox: BubblewrapSandbox) -> None:
    verdicts: dict[int, bool] = {}

    def one(i: int) -> None:
        body = f"def add(a, b):\n    return a + b + {i % 2}\n"  # odd i answers wrong
        verdicts[i] = sandbox.run(add_job(body)).all_passed

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verdicts == {0: True, 1: False, 2: True, 3: False}


def test_a_closed_sandbox_refuses_jobs() -> None:
    try:
        box = BubblewrapSandbox(LIMITS)
    except SandboxUnavailable as exc:
        pytest.skip(f"bubblewrap unavailable: {exc}")
    box.close()
    box.close()  # idempotent
    with pytest.raises(SandboxError, match="closed"):
        box.run(add_job("def add(a, b):\n    return a + b\n"))


def test_missing_parts_are_refused_with_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(SandboxUnavailable, match="apt install bubblewrap"):
        BubblewrapSandbox(LIMITS, python=f"{tmp_path}/no-python")
    outside = tmp_path / "python3"  # executable, but outside the only tree the sandbox sees
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="under /usr"):
        BubblewrapSandbox(LIMITS, python=str(outside))


def test_bwrap_is_missing_from_path(monkeypatch: pytest.MonkeyPatch, tmp_path: str) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="apt install bubblewrap"):
        BubblewrapSandbox(LIMITS)


def test_argv_seals_the_root_after_every_mount() -> None:
    argv = bwrap_argv("bwrap", "/usr/bin/python3", LIMITS, 3, {"/etc/passwd": 4})
    for flag in (
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--clearenv",
    ):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    mounts = {"--bind", "--ro-bind", "--tmpfs", "--ro-bind-data", "--dev", "--proc", "--symlink"}
    last_mount = max(i for i, a in enumerate(argv) if a in mounts)
    sealed = {argv[i + 1]: i for i, a in enumerate(argv) if a == "--remount-ro"}
    # bwrap's own tmpfs (the root, /dev with /dev/shm) is sandbox-owned: read-only, last.
    assert sealed["/"] > last_mount and sealed["/dev"] > last_mount
    size = argv[argv.index(WORKDIR_IN_SANDBOX) - 5 : argv.index(WORKDIR_IN_SANDBOX)]
    assert size[:2] == ["--size", str(LIMITS.workdir_mb * 1024 * 1024)]
    binds = [argv[i + 1] for i, a in enumerate(argv) if a in {"--bind", "--ro-bind"}]
    assert not [b for b in binds if b.startswith(("/home", "/root", "/work", "/tmp", "/var"))]
    assert "--bind" not in argv  # nothing of the host is writable
    assert RUNNER_IN_SANDBOX in argv


def test_probe_says_yes_here() -> None:
    works, reason = probe()
    if not works and os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        pytest.skip(f"bubblewrap unavailable: {reason}")
    assert works, reason

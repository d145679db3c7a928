"""Fallback sandbox for machines without a Docker engine: the same runner under bubblewrap.

Every job gets a brand-new sandbox — ``bwrap`` starts ``runner.py`` as PID 1 of fresh
user, pid, mount, network, ipc, uts and cgroup namespaces, the runner runs the one job,
and the whole namespace dies with it. Nothing survives from one job to the next, so
there is no pool to recycle. A start (bwrap plus the runner's Python) is cheaper than
a Docker container; `bench/sandbox.py` measures both.

What the sandbox sees: the host's ``/usr`` (and the ``/bin``, ``/lib*`` links or dirs
next to it) read-only, with ``/usr/local`` hidden; a few generated files under ``/etc``
(no ``/etc/shadow``, no host users); a private ``/proc`` and a minimal read-only ``/dev``;
the runner read-only at ``/opt/coderepair/runner.py``; a size-capped tmpfs at ``/work``.
The root itself is read-only, ``/home``, ``/root``, ``/work`` of the host and every
socket are simply absent. The network namespace holds only its own loopback. The
environment is cleared. All capabilities are dropped, no further user namespaces may
be created, and the job runs as uid/gid 65534 inside its user namespace.

Limits, compared with the Docker backend (`SandboxLimits` means the same in both; the
runner applies the per-process rlimits identically in both):

- ``timeout_s``: identical — the runner kills the job's process group at the deadline,
  and the host kills the whole sandbox if the runner itself does not answer in time.
- ``pids``: ``pids`` + `EXTRA_PIDS` (the runner and judge), as in Docker, but as
  RLIMIT_NPROC inside the sandbox's own user namespace. Since Linux 5.14 the
  kernel counts it per (user namespace, uid), so it caps exactly the processes of this
  sandbox, like Docker's pids cgroup (older kernels count every process of the uid,
  so concurrent sandboxes share the limit there). The kernel never applies RLIMIT_NPROC to the
  host's real root, so when the worker runs as root, bwrap is started as uid 65534
  (``nobody``) on the host: the sandbox is then also nobody outside its namespace.
  util-linux's ``setpriv`` makes that switch, not ``Popen(user=...)``: with a uid or
  gid to set, Python forks instead of vforking, and a fork of a process with gRPC
  threads (every worker and coordinator) runs gRPC's fork handlers in the child. Once
  in a full test run such a child died before bwrap ran, with gRPC's "epoll_wait error:
  Bad file descriptor" in bwrap's stderr. Without ``setpriv`` the fork is used.
- ``memory_mb``: RLIMIT_AS per process, as in Docker. There is **no cgroup** over the
  sandbox as a whole; instead a host-side guard (`_MemoryGuard`) sums the anonymous
  resident memory of the sandbox's processes every 20 ms and, past ``memory_mb`` +
  `RUNNER_OVERHEAD_MB` (Docker's container limit), SIGKILLs the largest job process,
  as the cgroup OOM killer would. Unlike a cgroup it acts after the fact: between two
  polls a fast allocator can overshoot by what it allocates in 20 ms.
- ``workdir_mb``: the ``/work`` tmpfs size and RLIMIT_FSIZE, as in Docker. The root,
  ``/dev`` and ``/usr`` are read-only, so there is no other writable place.
- ``cpus``: **not enforced** (no cgroup CPU quota); RLIMIT_CPU = timeout bounds each
  process's CPU time instead, and ``pids`` bounds how many run at once.
- ``output_bytes``: identical (the runner caps what it captures).

Also unlike Docker: no seccomp filter (Docker applies its default profile), so the
kernel's syscall surface is wider; nested user namespaces, the usual door to it, are
disabled. The sandbox's Python and pytest are the host's Debian ``python3`` and
``python3-pytest`` (read-only), not the image's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from coderepair.worker.sandbox.base import (
    Job,
    JobResult,
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxUnavailable,
)
from coderepair.worker.sandbox.channel import RUNNER_PATH, FdTransport, RunnerChannel

SANDBOX_UID = 65534
"""uid/gid inside the sandbox, and on the host when the worker is root (``nobody``)."""
RUNNER_IN_SANDBOX = "/opt/coderepair/runner.py"
WORKDIR_IN_SANDBOX = "/work"
DEFAULT_PYTHON = "/usr/bin/python3"
STARTUP_TIMEOUT_S = 30.0
"""How long a fresh sandbox may take to greet (a loaded 2-core machine needs ~1 s)."""
EXIT_GRACE_S = 5.0
"""How long the sandbox may take to exit after its stdin closes before it is killed."""
EXTRA_PIDS = 4
"""The runner, the judge and slack on top of the job's own `pids` (as in Docker's cgroup)."""
RUNNER_OVERHEAD_MB = 256
"""Memory for the runner and the judge on top of `memory_mb` (as in Docker's cgroup)."""
MEMORY_POLL_S = 0.02
"""How often the memory guard sums the sandbox's memory (bounds its overshoot)."""
_STDERR_TAIL = 4000
_PAGE = os.sysconf("SC_PAGE_SIZE")

_INSTALL_HINT = (
    "install bubblewrap and Debian's python3 with pytest (`apt install bubblewrap python3 "
    "python3-pytest`), or install a Docker engine (`apt install docker.io`)"
)

# Files under /etc that a job may need; the host's own are never bound (no users, no
# shadow, no resolver config pointing at the host's network).
_ETC_FILES = {
    "/etc/passwd": (
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"nobody:x:{SANDBOX_UID}:{SANDBOX_UID}:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "/etc/group": f"root:x:0:\nnogroup:x:{SANDBOX_UID}:\n",
    "/etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "/etc/hostname": "sandbox\n",
}
# Read-only from the host where present: the loader cache (speed) and the alternatives
# links that some /usr/bin commands point at.
_ETC_BINDS = ("/etc/ld.so.cache", "/etc/alternatives")
# Top-level entries a Debian system keeps next to /usr; merged-/usr hosts have links.
_ROOT_ENTRIES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class BubblewrapSandbox(Sandbox):
    """Runs each job in a fresh bubblewrap sandbox with the shared in-sandbox runner.

    Thread-safe: every `run` call owns its sandbox. `close` kills any sandbox still
    running and makes later `run` calls fail.
    """

    name = "bubblewrap"

    def __init__(
        self,
        limits: SandboxLimits,
        *,
        python: str = DEFAULT_PYTHON,
        bwrap: str | None = None,
    ) -> None:
        found = bwrap or shutil.which("bwrap")
        if found is None:
            raise SandboxUnavailable(f"bubblewrap (`bwrap`) is not on PATH; {_INSTALL_HINT}")
        if not os.access(python, os.X_OK) or not python.startswith("/usr/"):
            raise SandboxUnavailable(
                f"the sandbox needs the system Python at {python} (under /usr, which is "
                f"the only host tree the sandbox sees); {_INSTALL_HINT}"
            )
        self.limits = limits
        self.python = python
        self.bwrap = found
        # See the module docstring (`pids`): root hands bwrap to nobody through setpriv.
        self._setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
        self._runner_source = RUNNER_PATH.read_bytes()
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    # -- the Sandbox interface
    def run(self, job: Job) -> JobResult:
        proc, stderr = self._start()
        budget = (self.limits.memory_mb + RUNNER_OVERHEAD_MB) * 1024 * 1024
        guard = _MemoryGuard(proc.pid, budget)
        guard.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            channel = RunnerChannel(
                FdTransport(proc.stdin.fileno(), proc.stdout.fileno()), backend=self.name
            )
            try:
                channel.hello(timeout_s=STARTUP_TIMEOUT_S)
            except SandboxError as exc:
                raise SandboxError(
                    f"the bubblewrap sandbox did not start: {exc}; "
                    f"bwrap said: {_tail(stderr) or '(nothing)'}"
                ) from exc
            # RLIMIT_NPROC counts this sandbox's user namespace only (module docstring).
            result = channel.run(job, self.limits, nproc=self.limits.pids + EXTRA_PIDS)
        finally:
            guard.stop()
            self._finish(proc, stderr)
        if guard.kills:
            result = dataclasses.replace(result, anomalies=(*result.anomalies, *guard.kills))
        return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live = list(self._live)
        for proc in live:
            _kill(proc)

    # -- one sandbox
    def _start(self) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        with self._lock:
            if self._closed:
                raise SandboxError("this BubblewrapSandbox is closed; create a new one")
        data_fds: list[int] = []
        # bwrap's own diagnostics (never job output); a file cannot fill up and block bwrap.
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in _finish)
        try:
            runner_fd = _memfd("runner.py", self._runner_source)
            data_fds.append(runner_fd)
            etc_fds = {}
            for path, text in _ETC_FILES.items():
                etc_fds[path] = _memfd(Path(path).name, text.encode())
                data_fds.append(etc_fds[path])
            argv = bwrap_argv(self.bwrap, self.python, self.limits, runner_fd, etc_fds)
            # The kernel exempts the host's real root from RLIMIT_NPROC, so root hands
            # the sandbox to `nobody` first (module docstring, `pids`), by setpriv where
            # there is one, so that Popen can vfork and run no fork handlers.
            as_root = os.geteuid() == 0
            if as_root and self._setpriv is not None:
                argv = [*drop_to_nobody(self._setpriv), *argv]
            switch_in_popen = as_root and self._setpriv is None
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                pass_fds=data_fds,
                close_fds=True,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True,
                user=SANDBOX_UID if switch_in_popen else None,
                group=SANDBOX_UID if switch_in_popen else None,
                extra_groups=[] if switch_in_popen else None,
            )
        except OSError as exc:
            stderr.close()
            raise SandboxError(f"could not start bwrap ({self.bwrap}): {exc}") from exc
        finally:
            for fd in data_fds:
                os.close(fd)
        with self._lock:
            self._live.add(proc)
        return proc, stderr

    def _finish(self, proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
        """EOF ends the runner, and with PID 1 the whole namespace; kill it if it lingers."""
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill(proc)
        proc.stdout.close()
        stderr.close()
        with self._lock:
            self._live.discard(proc)


class _MemoryGuard(threading.Thread):
    """Stands in for a cgroup memory limit: kills the largest job process of a sandbox
    whose processes together hold more than `budget` bytes of anonymous memory.

    The sandbox's processes are found from the host as descendants of bwrap; the
    runner (bwrap's child, PID 1 inside) is never the victim, so it reports the job as
    crashed like after an OOM kill in Docker. tmpfs pages are not counted here: the
    tmpfs has its own size limit.
    """

    def __init__(self, bwrap_pid: int, budget: int) -> None:
        super().__init__(name=f"bwrap-memory-guard-{bwrap_pid}", daemon=True)
        self.bwrap_pid = bwrap_pid
        self.budget = budget
        self.killed = 0
        self.peak = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.wait(MEMORY_POLL_S):
            runners = _children(self.bwrap_pid)
            jobs = [pid for runner in runners for pid in _descendants(runner)]
            usage = {pid: _anon_rss(pid) for pid in [*runners, *jobs]}
            total = sum(usage.values())
            if total <= self.budget or not jobs:
                continue
            victim = max(jobs, key=lambda pid: usage[pid])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(victim, signal.SIGKILL)
            self.killed += 1
            self.peak = max(self.peak, total)

    @property
    def kills(self) -> tuple[str, ...]:
        """The anomaly to report, if the guard had to act."""
        if not self.killed:
            return ()
        return (
            f"sandbox memory reached {self.peak >> 20} MiB, over {self.budget >> 20} MiB: "
            f"the memory guard killed {self.killed} job process(es)",
        )


def _children(pid: int) -> list[int]:
    """Children of every thread of `pid` (/proc/PID/task/TID/children); [] once gone.

    Kernels built without CONFIG_PROC_CHILDREN lack that file: scan /proc by ppid then.
    """
    found: list[int] = []
    try:
        tids = [t.name for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return found
    for tid in tids:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except FileNotFoundError:
            if Path(f"/proc/{pid}").exists():
                return _children_by_scan(pid)
        except (OSError, ValueError):
            pass
    return found


def _children_by_scan(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = _children(pid)
    while todo and len(out) < 100_000:
        child = todo.pop()
        out.append(child)
        todo += _children(child)
    return out


def _anon_rss(pid: int) -> int:
    """Resident memory not backed by files (statm resident − shared), in bytes."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
        return max(int(fields[1]) - int(fields[2]), 0) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def drop_to_nobody(setpriv: str) -> list[str]:
    """The ``setpriv`` prefix that runs the rest of a command line as uid and gid
    `SANDBOX_UID` with no supplementary groups (and so no capabilities)."""
    return [
        setpriv,
        f"--reuid={SANDBOX_UID}",
        f"--regid={SANDBOX_UID}",
        "--clear-groups",
        "--",
    ]


def bwrap_argv(
    bwrap: str,
    python: str,
    limits: SandboxLimits,
    runner_fd: int,
    etc_fds: dict[str, int],
) -> list[str]:
    """The bwrap command line; each ``--ro-bind-data`` fd must be passed to the child."""
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",  # --unshare-all only *tries* the user namespace; require it
        "--disable-userns",  # no nested user namespace to regain capabilities in
        "--die-with-parent",
        "--new-session",  # no controlling terminal: no TIOCSTI into the host's tty
        "--as-pid-1",  # the runner is init: unkillable from inside, its exit ends all
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--hostname",
        "sandbox",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    argv += _root_entries()
    if Path("/usr/local").is_dir():
        # pip's system-wide installs live here: hide them so the sandbox's Python sees
        # only Debian's packages, like the Docker image.
        argv += ["--size", "65536", "--tmpfs", "/usr/local", "--remount-ro", "/usr/local"]
    for path in _ETC_BINDS:
        argv += ["--ro-bind-try", path, path]
    for path, fd in etc_fds.items():
        argv += ["--ro-bind-data", str(fd), path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += [
        "--size",
        str(limits.workdir_mb * 1024 * 1024),
        "--perms",
        "0700",
        "--tmpfs",
        WORKDIR_IN_SANDBOX,
        "--perms",
        "0444",
        "--ro-bind-data",
        str(runner_fd),
        RUNNER_IN_SANDBOX,
        # Everything bwrap created (/, /dev and its /dev/shm) is a tmpfs owned by the
        # sandbox's uid and as large as host memory: make it read-only, last.
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        WORKDIR_IN_SANDBOX,
        python,
        "-s",
        "-B",
        RUNNER_IN_SANDBOX,
        "--workdir",
        WORKDIR_IN_SANDBOX,
    ]
    return argv


def _root_entries() -> list[str]:
    """Mirror the host's /bin, /lib64, ... as links (merged /usr) or read-only binds."""
    args: list[str] = []
    for name in _ROOT_ENTRIES:
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", str(path.readlink()), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def _memfd(name: str, data: bytes) -> int:
    """An anonymous file holding `data`, positioned at 0, for bwrap's ``--*-data`` options."""
    fd = os.memfd_create(name, 0)  # not CLOEXEC: bwrap must inherit it
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL bwrap's session; --die-with-parent then takes the namespace down."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=EXIT_GRACE_S)


def _tail(stream: IO[bytes]) -> str:
    with contextlib.suppress(OSError, ValueError):
        stream.seek(0, os.SEEK_END)
        size = stream.tell()
        stream.seek(max(size - _STDERR_TAIL, 0))
        return stream.read().decode("utf-8", "replace").strip()
    return ""


def probe(python: str = DEFAULT_PYTHON, timeout_s: float = 60.0) -> tuple[bool, str]:
    """Can this machine run the bubblewrap backend? Returns (works, reason).

    Runs two real jobs — a function job and a pytest job — through a fresh sandbox, so a
    "yes" means user namespaces, the runner and the sandbox's pytest all work here.
    """
    try:
        limits = SandboxLimits(timeout_s=min(timeout_s, 30.0))
        sandbox = BubblewrapSandbox(limits, python=python)
    except SandboxUnavailable as exc:
        return False, str(exc)
    checks: Sequence[tuple[str, Job]] = (
        (
            "a function job",
            Job(
                kind="function",
                files={"m.py": "def f(x):\n    return x + 1\n"},
                tests={"t.py": "def check(candidate):\n    assert candidate(1) == 2\n"},
                entry_point="m.py:f",
            ),
        ),
        (
            "a pytest job",
            Job(
                kind="pytest",
                files={"m.py": "def f(x):\n    return x + 1\n"},
                tests={"test_m.py": "from m import f\n\ndef test_f():\n    assert f(1) == 2\n"},
                test_ids=("test_m.py::test_f",),
            ),
        ),
    )
    started = time.monotonic()
    with sandbox:
        for what, job in checks:
            try:
                result = sandbox.run(job)
            except SandboxError as exc:
                hint = ""
                if "user namespace" in str(exc) or "setting up uid map" in str(exc):
                    hint = " (enable unprivileged user namespaces: sysctl kernel."
                    hint += "unprivileged_userns_clone=1 / user.max_user_namespaces)"
                return False, f"bubblewrap could not run {what}: {exc}{hint}; {_INSTALL_HINT}"
            if not result.all_passed:
                if "No module named pytest" in result.log:
                    why = "the sandbox's python3 has no pytest"
                else:
                    why = f"status {result.status}, anomalies {list(result.anomalies)}, "
                    why += f"log {result.log[-300:]!r}"
                return False, f"bubblewrap ran {what} but it did not pass: {why}; {_INSTALL_HINT}"
    return True, f"bubblewrap {sandbox.bwrap} works ({time.monotonic() - started:.2f} s probe)"

"""Hostile patches against every sandbox backend: contained, survivable, no trace left.

Each case is a candidate for a trivial HumanEval-style task (``add(a, b)``) that does
something hostile and returns the right answer *only if the attack worked*, so a
passing test inside the sandbox means containment failed. For every case, on the
Docker warm pool (one container, so the next job provably reuses it) and on the
bubblewrap backend:

1. the hostile job comes back as a result (not a crash of this process) with no test
   passed, and with the expected status where it is forced (timeouts);
2. nothing it tried is visible on the host (files, processes, connections);
3. the next verifications in the same sandbox give the right answers — a correct
   candidate passes, a wrong one fails.

Network probes never send a packet past loopback even if containment fails: the
route to 1.1.1.1 is looked up with a UDP ``connect()`` (no datagram is sent), and a
TCP connect is tried only after that failed, i.e. only when there is no route.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
from hostile_support import (
    LIMITS,
    SECRET,
    SECRET_ENV,
    assert_contained,
    assert_sandbox_healthy,
    function_job,
    host_processes_with,
)

from coderepair.worker.sandbox import Sandbox

# ------------------------------------------------------------------ resource exhaustion
FORK_BOMB = """\
import os, time

def add(a, b):
    spawned = 0
    for _ in range(2000):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            while True:  # every child forks too
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.01)
        spawned += 1
    return a + b if spawned >= 2000 else None
"""

MEMORY_BOMB = """\
def add(a, b):
    hoard = []
    try:
        for _ in range(64):  # 4 GiB of touched pages, far past memory_mb
            hoard.append(b"\\x01" * (64 * 1024 * 1024))
    except MemoryError:
        return None
    return a + b
"""

MEMORY_BOMB_FORKED = """\
import os, time

def add(a, b):
    # Each process stays under memory_mb; together they would hold 1.8 GiB.
    r, w = os.pipe()
    pids = []
    for i in range(12):
        pid = os.fork()
        if pid == 0:
            try:
                hold = b"\\x01" * (150 * 1024 * 1024)
                os.write(w, bytes([i]))  # allocated and touched
                time.sleep(30)
            finally:
                os._exit(0)
        pids.append(pid)
    os.set_blocking(r, False)
    holders = set()
    deadline = time.monotonic() + 5  # the job's timeout is 8 s
    while len(holders) < 12 and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            holders.update(os.read(r, 64))
        except BlockingIOError:
            pass
    time.sleep(0.2)  # give a memory limit time to act on the last allocation
    alive = [i for i, pid in enumerate(pids) if os.waitpid(pid, os.WNOHANG) == (0, 0)]
    return a + b if len(holders.intersection(alive)) >= 10 else None
"""

DISK_FILL = """\
import os, tempfile

def add(a, b):
    chunk = b"\\0" * (1 << 20)
    best = 0
    for target in ("fill.bin", os.path.join(tempfile.gettempdir(), "fill.bin"),
                   "/work/fill.bin", "/tmp/fill.bin", "/var/tmp/fill.bin", "/dev/shm/fill.bin"):
        written = 0
        try:
            with open(target, "wb") as fh:
                for _ in range(1024):  # 1 GiB, far past workdir_mb
                    fh.write(chunk)
                    written += len(chunk)
        except OSError:
            pass
        best = max(best, written)
    return a + b if best >= 1024 * len(chunk) else None
"""

INFINITE_LOOP = "def add(a, b):\n    while True:\n        pass\n"
SLEEP = "import time\n\ndef add(a, b):\n    time.sleep(3600)\n    return a + b\n"

FLOOD = """\
import os, sys, threading

def _spew():
    while True:
        try:
            os.write(2, b"e" * 65536)
        except OSError:
            return

def add(a, b):
    threading.Thread(target=_spew, daemon=True).start()
    chunk = "x" * 65536
    for _ in range(2048):  # 128 MiB on stdout while a thread floods stderr
        sys.stdout.write(chunk)
    sys.stdout.flush()
    return None
"""

CLOSE_STDOUT = """\
import os, sys

def add(a, b):
    sys.stdout.close()
    sys.stderr.close()
    for fd in (0, 1, 2):
        os.close(fd)
    return None
"""

CLOSE_EVERYTHING = "import os\n\ndef add(a, b):\n    os.closerange(0, 4096)\n    return a + b\n"


@pytest.mark.parametrize(
    ("source", "status"),
    [
        pytest.param(FORK_BOMB, None, id="fork-bomb"),
        pytest.param(MEMORY_BOMB, None, id="memory-bomb"),
        pytest.param(MEMORY_BOMB_FORKED, None, id="memory-bomb-across-processes"),
        pytest.param(DISK_FILL, None, id="disk-fill"),
        pytest.param(INFINITE_LOOP, "timeout", id="infinite-loop"),
        pytest.param(SLEEP, "timeout", id="sleep-past-timeout"),
        pytest.param(FLOOD, None, id="flood-stdout-stderr"),
        pytest.param(CLOSE_STDOUT, None, id="close-stdout"),
        pytest.param(CLOSE_EVERYTHING, None, id="close-every-fd"),
    ],
)
def test_exhaustion_is_contained(sandbox: Sandbox, source: str, status: str | None) -> None:
    started = time.monotonic()
    result = sandbox.run(function_job(source))
    assert_contained(result, status)
    assert len(result.log.encode()) <= LIMITS.output_bytes + 64 * 1024
    # The host waits at most the job's timeout plus the backends' grace, never forever.
    assert time.monotonic() - started < LIMITS.timeout_s + 30
    assert_sandbox_healthy(sandbox)


def test_flood_is_truncated_and_reported(sandbox: Sandbox) -> None:
    result = sandbox.run(function_job(FLOOD))
    assert_contained(result)
    assert len(result.log.encode()) <= LIMITS.output_bytes + 64 * 1024
    assert any("truncated" in a for a in result.anomalies), result.anomalies


# ------------------------------------------------------------------------------ network
NETWORK = """\
import socket

PORT = @PORT@
TOKEN = @TOKEN@
ABSTRACT = @ABSTRACT@

def _reached_host_loopback():
    for family, addr in ((socket.AF_INET, ("127.0.0.1", PORT)), (socket.AF_INET6, ("::1", PORT))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(addr)
                if s.recv(64) == TOKEN:
                    return True
        except OSError:
            pass
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(ABSTRACT)
            return True
    except OSError:
        return False

def _route_to_internet():
    # A UDP connect() only looks the route up: no datagram leaves even if it succeeds.
    for family, addr in ((socket.AF_INET, ("1.1.1.1", 53)),
                         (socket.AF_INET6, ("2606:4700:4700::1111", 53))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                return True
        except OSError:
            pass
    # No route at all, so this TCP connect fails locally without sending anything.
    try:
        with socket.create_connection(("1.1.1.1", 53), timeout=1):
            return True
    except OSError:
        return False

def add(a, b):
    return a + b if _reached_host_loopback() or _route_to_internet() else None
"""


def test_network_is_unreachable(sandbox: Sandbox) -> None:
    token = secrets.token_hex(8).encode()
    accepted: list[object] = []
    listener = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = b"\0coderepair-hostile-" + token
    abstract.bind(abstract_name)
    abstract.listen()
    stop = threading.Event()

    def serve(sock: socket.socket) -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, peer = sock.accept()
            except OSError:
                continue
            accepted.append(peer)
            with conn:
                conn.sendall(token)

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in (listener, abstract)]
    for thread in threads:
        thread.start()
    try:
        source = (
            NETWORK.replace("@PORT@", str(listener.getsockname()[1]))
            .replace("@TOKEN@", repr(token))
            .replace("@ABSTRACT@", repr(abstract_name))
        )
        result = sandbox.run(function_job(source))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        listener.close()
        abstract.close()
    assert_contained(result)
    assert accepted == [], f"the sandbox reached this process: {accepted}"
    assert_sandbox_healthy(sandbox)


# ------------------------------------------------------------------ host files, secrets
HOST_FILES = """\
import os

PATHS = @PATHS@
HOME = @HOME@
HOME_ENTRIES = @HOME_ENTRIES@
SECRET = @SECRET@

def _read_anything():
    for path in PATHS:
        try:
            with open(path, "rb") as fh:
                if fh.read(64):
                    return True
        except OSError:
            pass
    try:
        if set(os.listdir(HOME)) & set(HOME_ENTRIES):
            return True
    except OSError:
        pass
    return False

def _secret_visible():
    if any(SECRET in v or SECRET in k for k, v in os.environ.items()):
        return True
    for pid in os.listdir("/proc"):
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as fh:
                    if SECRET.encode() in fh.read():
                        return True
            except OSError:
                pass
    return False

def _docker_socket():
    import socket
    for path in ("/var/run/docker.sock", "/run/docker.sock"):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                return True
        except OSError:
            pass
    return False

def add(a, b):
    return a + b if _read_anything() or _secret_visible() or _docker_socket() else None
"""


def test_host_files_and_secrets_are_invisible(sandbox: Sandbox, host_dir: Path) -> None:
    secret_file = host_dir / "host-secret.txt"
    secret_file.write_text("host secret\n")
    secret_file.chmod(0o644)
    home = Path.home()
    try:
        home_entries = sorted(p.name for p in home.iterdir())[:20]
    except OSError:
        home_entries = []
    paths = [
        "/etc/shadow",
        str(secret_file),
        str(Path(__file__).resolve()),  # the host's checkout (/work/... here)
        str(Path(os.__file__).resolve()),  # the host's Python, wherever it lives
        f"/proc/{os.getpid()}/environ",  # this process, if its pid were visible
    ]
    source = (
        HOST_FILES.replace("@PATHS@", repr(paths))
        .replace("@HOME@", repr(str(home)))
        .replace("@HOME_ENTRIES@", repr(home_entries))
        .replace("@SECRET@", repr(SECRET))
    )
    assert os.environ[SECRET_ENV] == SECRET  # the bait is really there, on the host
    result = sandbox.run(function_job(source))
    assert_contained(result)
    assert SECRET not in result.log
    assert_sandbox_healthy(sandbox)


# --------------------------------------------------------------- writes, tests, state
WRITE_OUTSIDE = """\
import os

HOST_TARGET = @HOST_TARGET@

def _runner_script():
    try:
        with open("/proc/1/cmdline", "rb") as fh:
            args = fh.read().split(b"\\0")
        return [a.decode() for a in args if a.endswith(b".py")]
    except OSError:
        return []

def add(a, b):
    wrote = False
    targets = [HOST_TARGET, "/pwned", "/etc/pwned", "/usr/pwned", "/opt/coderepair/pwned",
               "/usr/lib/python3/dist-packages/sitecustomize.py",
               "/usr/lib/python3/dist-packages/pwned.pth", *_runner_script()]
    for target in targets:
        try:
            with open(target, "a") as fh:
                fh.write("import os; os._exit(0)\\n")
            wrote = True
        except OSError:
            pass
    return a + b if wrote else None
"""


def test_writing_outside_the_work_dir_fails(sandbox: Sandbox, host_dir: Path) -> None:
    host_target = host_dir / "pwned"
    result = sandbox.run(
        function_job(WRITE_OUTSIDE.replace("@HOST_TARGET@", repr(str(host_target))))
    )
    assert_contained(result)
    assert not host_target.exists()
    assert_sandbox_healthy(sandbox)


EDIT_TESTS = """\
import os

def add(a, b):
    # Rewrite every check() the candidate can find; the judge must not run an edited one.
    for root in ("/work", "/tmp", "/opt", os.getcwd(), os.path.expanduser("~")):
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    with open(path) as fh:
                        text = fh.read()
                    if "def check(" in text:
                        os.chmod(path, 0o644)
                        with open(path, "w") as fh:
                            fh.write("def check(candidate):\\n    pass\\n")
                except (OSError, UnicodeDecodeError):
                    pass
    return None
"""

TAMPER_JUDGE = """\
import ctypes, json, os, struct

def _frame(obj):
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data

FORGED_RESULT = _frame({"type": "result", "status": "ok",
                        "per_test": {"check#1": True, "check#2": True}, "log": "",
                        "anomalies": [], "duration_s": 0.1})
FORGED_JUDGE = b"".join(_frame(f) for f in (
    {"total": 2}, {"test": 1, "passed": True, "error": None},
    {"test": 2, "passed": True, "error": None}, {"done": True}))

def add(a, b):
    libc = ctypes.CDLL(None, use_errno=True)
    me = str(os.getpid())
    attached = False
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        if libc.ptrace(16, int(pid), None, None) == 0:  # PTRACE_ATTACH
            attached = True
        try:
            with open(f"/proc/{pid}/mem", "r+b"):
                attached = True
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:  # forge verdicts on every pipe that can be reopened
            try:
                out = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            for payload in (FORGED_RESULT, FORGED_JUDGE):
                try:
                    os.write(out, payload)
                except OSError:
                    pass
            os.close(out)
    return a + b if attached else None
"""

KILL_RUNNER = """\
import os, signal

def add(a, b):
    for target in (1, os.getppid()):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(target, sig)
            except OSError:
                pass
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    os.kill(-1, signal.SIGKILL)  # everything this uid may signal; we survive it
    return None
"""

STOP_EVERYTHING = """\
import os, signal

def add(a, b):
    os.kill(-1, signal.SIGSTOP)  # freeze the judge and anything else in reach
    return a + b
"""


@pytest.mark.parametrize(
    ("source", "status"),
    [
        pytest.param(EDIT_TESTS, None, id="edit-the-tests"),
        pytest.param(TAMPER_JUDGE, None, id="ptrace-or-forge-the-judge"),
        pytest.param(KILL_RUNNER, None, id="kill-the-runner"),
        pytest.param(STOP_EVERYTHING, None, id="sigstop-everything"),
    ],
)
def test_judge_and_runner_cannot_be_subverted(
    sandbox: Sandbox, source: str, status: str | None
) -> None:
    result = sandbox.run(function_job(source))
    assert_contained(result, status)
    assert_sandbox_healthy(sandbox)


DAEMON = """\
import os, time

def add(a, b):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # double fork: the grandchild belongs to no one
            os.execv("/bin/sleep", ["sleep", @MARK@])
        os._exit(0)
    time.sleep(0.3)
    return None
"""

DAEMON_SEEKER = """\
import os

def add(a, b):
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if @MARK@.encode() in fh.read():
                    return a + b
        except OSError:
            pass
    return None
"""


def test_daemon_does_not_outlive_its_job(sandbox: Sandbox) -> None:
    mark = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(10**6)}"  # a sleep time
    result = sandbox.run(function_job(DAEMON.replace("@MARK@", repr(mark))))
    assert_contained(result)
    assert host_processes_with(mark) == [], "the daemon survived its job on the host"
    seeker = sandbox.run(function_job(DAEMON_SEEKER.replace("@MARK@", repr(mark))))
    assert_contained(seeker)
    assert host_processes_with(mark) == []
    assert_sandbox_healthy(sandbox)


LEAVE_STATE = """\
import os, tempfile

MARK = @MARK@

def add(a, b):
    places = {os.getcwd(), os.path.dirname(os.getcwd()), os.path.expanduser("~"),
              tempfile.gettempdir(), "/work", "/tmp", "/var/tmp", "/dev/shm", "/opt/coderepair"}
    for place in places:
        try:
            with open(os.path.join(place, "." + MARK), "w") as fh:
                fh.write(MARK)
        except OSError:
            pass
    return None
"""

FIND_STATE = """\
import os

MARK = @MARK@

def add(a, b):
    for root in ("/work", "/tmp", "/var/tmp", "/dev/shm", "/opt", "/"):
        for dirpath, _, names in os.walk(root):
            if dirpath.startswith(("/proc", "/sys", "/usr")):
                continue
            if "." + MARK in names:
                return a + b
    return None
"""


def test_no_state_carries_over_to_the_next_job(sandbox: Sandbox) -> None:
    mark = "leftover-" + secrets.token_hex(6)
    sandbox.run(function_job(LEAVE_STATE.replace("@MARK@", repr(mark))))
    finder = sandbox.run(function_job(FIND_STATE.replace("@MARK@", repr(mark))))
    assert_contained(finder)
    assert_sandbox_healthy(sandbox)


# ------------------------------------------------------- exit codes and monkeypatching
EXIT_IN_CALL = "import os\n\ndef add(a, b):\n    os._exit(0)\n"
EXIT_AT_IMPORT = "import sys\nsys.exit(0)\n\ndef add(a, b):\n    return None\n"
EXIT_IN_ATEXIT = """\
import atexit, os, sys

atexit.register(lambda: os._exit(0))
atexit.register(lambda: sys.exit(0))

def add(a, b):
    raise SystemExit(0)
"""

MONKEYPATCH = """\
import builtins, sys

class _Passes(Exception):
    pass

builtins.AssertionError = _Passes
builtins.isinstance = lambda *a: True
builtins.len = lambda *a: 0
sys.modules["builtins"].print = lambda *a, **k: None

class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __hash__(self):
        return 0
    def __reduce__(self):  # if anything unpickled this, it would evaluate to 5
        return (eval, ("2 + 3",))

def add(a, b):
    return AlwaysEqual()
"""

SUBCLASS_EQ = """\
class Int(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__

class List(list):
    def __eq__(self, other):
        return True

def add(a, b):
    return Int(0) if a > 0 else List([0])
"""


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(EXIT_IN_CALL, id="os-exit-0-in-call"),
        pytest.param(EXIT_AT_IMPORT, id="sys-exit-0-at-import"),
        pytest.param(EXIT_IN_ATEXIT, id="exit-0-in-atexit"),
        pytest.param(MONKEYPATCH, id="patch-builtins-always-equal"),
        pytest.param(SUBCLASS_EQ, id="int-and-list-subclass-eq"),
    ],
)
def test_exit_codes_and_monkeypatching_do_not_pass(sandbox: Sandbox, source: str) -> None:
    result = sandbox.run(function_job(source))
    assert_contained(result)
    assert_sandbox_healthy(sandbox)

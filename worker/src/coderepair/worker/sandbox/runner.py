"""The in-sandbox runner: a resident, stdlib-only judge that runs verification jobs.

This file is copied or bind-mounted into a sandbox and run by the sandbox's own
``python3``. It never imports coderepair (the sandbox has none) and is one file on
purpose, even though it is long: a single read-only file is all a backend has to place.

How a backend drives it
=======================
Start it as PID 1 of a fresh pid namespace, as an unprivileged uid, with a writable
(tmpfs) work dir and nothing else writable::

    python3 -s -B /opt/coderepair/runner.py --workdir /work

- Docker: it is the container's command (no ``--init``), so it is PID 1.
- bubblewrap: ``bwrap --unshare-all --die-with-parent --as-pid-1 ... python3 -s -B
  RUNNER --workdir /work``. ``--as-pid-1`` matters: the runner refuses to start
  unless it is PID 1, because its clean-up is ``kill(-1, SIGKILL)`` (every process in
  the namespace but itself), which outside a pid namespace would hit the whole uid.
- Use ``/work`` in every backend: tracebacks in the log name ``/work/job/src/...``, and
  the log's sha256 is compared by audits that may run in another backend.
- The directory holding this file is on ``sys.path`` of pytest jobs: keep it private to
  the runner. Function jobs run with ``-S`` and only their own dir on ``sys.path``.

The channel is the runner's stdin/stdout. Every message, both ways, is a frame: a
4-byte big-endian length, then that many bytes of UTF-8 JSON (an object). The runner
first writes ``{"type": "ready", "protocol": 1, "uid": ..., "python": ...}``, then
loops: read one job frame, write one reply frame. EOF on stdin ends it. Stderr carries
only diagnostics. ``coderepair.worker.sandbox.channel.RunnerChannel`` is the host side.

Job frame::

    {"type": "job", "kind": "function"|"pytest", "files": {path: text},
     "tests": {path: text}, "entry_point": "pkg/mod.py:func", "test_ids": [...],
     "limits": {"timeout_s", "memory_mb", "output_bytes", "workdir_mb", "nproc", "nofile"}}

``nproc`` > 0 sets RLIMIT_NPROC; only use it where the uid is private to the sandbox (a
user namespace), since the kernel counts it per uid. Reply frame: ``{"type": "result",
"status": "ok"|"timeout"|"crashed", "per_test": {name: bool}, "log": str,
"anomalies": [str], "duration_s": float}``, or ``{"type": "error", "fault":
"job"|"runner", "error": str}``. An anomaly means the job did something a clean run
never does (a stray process, files outside the job dir, a tampered test file, output
past the cap...): the host should recycle the sandbox.

Isolation inside the sandbox
============================
The runner is PID 1 and non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): job processes run
as the same uid but cannot signal it (the kernel drops signals to a namespace's init
that it has no handler for, and it installs none), ptrace it, or open its
``/proc/1/fd``/``mem``. Every job process is exec'ed fresh (never a bare fork of the
runner, whose memory holds the trusted tests), in its own session, with rlimits
(address space, file size, open files, CPU time, no core), a fixed environment, no
inherited fds but its own pipes, a high OOM score, and stdout+stderr on one pipe the
runner drains with a byte cap (flooding or closing it is harmless). The wall-clock
timeout kills the process group; after every job ``kill(-1, SIGKILL)`` removes
everything else, the work dir and the writable scratch dirs are wiped, and what was
found is reported as anomalies.

Latency: the next function job's candidate process is started right after a job is
answered (a fresh exec of the small "candidate core" at the top of this file, idle until
told which module to import), so Python's start-up is off the critical path.

kind="function" (HumanEval): the candidate process only imports the candidate module
and answers calls. The trusted ``check(candidate)`` runs in a judge process forked from
the runner (never imports candidate code, non-dumpable); ``candidate`` is a proxy that
sends arguments over a pipe through a strict type-tagged codec (None, bool, int, float
incl. nan/inf, str, bytes, list, tuple, dict, set, frozenset) and rebuilds results as
plain builtins; builtin exceptions cross by name, anything else as ``CandidateError``.
Exit codes, printed "PASS" lines, monkeypatching, ``__eq__`` tricks and reading the
tests (they are never written to disk) cannot make a test pass. Each top-level
statement of ``check`` that uses the candidate is one test (``check#1``, ``check#2``,
...), so partial credit exists; other statements are set-up. Names that ``tests`` uses
but does not define (HumanEval's ``poly``, ``encode_cyclic``) resolve to the candidate
module: put a trusted copy into ``tests`` when the patch must not change a helper.

kind="pytest" (repositories): pytest runs in the candidate process, so code imported by
the tests runs in the same interpreter as pytest. Mitigations: results come only from
a trusted plugin that reports over a pipe, authenticated (HMAC) with a per-run key read
from an fd that is closed before collection -- not from exit codes, output, or a junit
XML file, which the candidate could simply overwrite; trusted test files are written
read-only and checked by hash before each module is collected and at the end; candidate
``conftest.py`` files (not in ``tests``), ``.pyc`` files and ``__pycache__`` dirs are
dropped (a planted pyc would replace a trusted test); pytest's own functions are
recorded at start and compared at the end. Any finding fails every test and is an
anomaly. Residual risk, written down on purpose: code running inside the pytest
process can in principle find the key in memory or patch pytest in a way the check does
not cover, and a thread could swap a test file between the hash check and its import.
Prefer kind="function" where a task allows it.
"""

from __future__ import annotations

# The candidate core: everything up to CORE_END is all a candidate process runs (sent
# as `python3 -c`), so it imports little and compiles fast. Keep it self-contained.
import base64
import builtins
import json
import os
import struct
import sys
from typing import Any

PROTOCOL = 1
MAX_FRAME = 256 * 1024 * 1024
"""Largest frame the runner accepts on its channel (a repository snapshot fits)."""
MAX_CALL_FRAME = 16 * 1024 * 1024
"""Largest argument/result message between judge and candidate."""
MAX_DEPTH = 100
"""Deepest nesting the value codec accepts (deeper values are refused, not recursed)."""


class CodecError(Exception):
    """A value cannot cross the sandbox boundary (unsupported type, too deep, malformed)."""


class FrameError(Exception):
    """The channel carried something that is not a valid frame."""


# ----------------------------------------------------------------------------- framing
def write_frame(fd: int, obj: dict[str, Any]) -> None:
    # ASCII-only JSON: a lone surrogate (legal in a JSON string) can never break encoding.
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    _write_all(fd, struct.pack(">I", len(data)) + data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise FrameError(f"channel closed after {got} of {n} bytes of a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, limit: int = MAX_FRAME) -> dict[str, Any] | None:
    """Read one frame; None on a clean EOF between frames."""
    header = _read_exact(fd, 4)
    if header is None:
        return None
    (size,) = struct.unpack(">I", header)
    if size > limit:
        raise FrameError(f"frame of {size} bytes exceeds the {limit}-byte limit")
    body = _read_exact(fd, size) or b""
    if len(body) != size:
        raise FrameError("channel closed inside a frame")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame holds a {type(obj).__name__}, expected an object")
    return obj


# ------------------------------------------------------------------------ value codec
def encode_value(value: Any, depth: int = 0) -> list[Any]:
    """Encode a plain value as type-tagged JSON; anything else raises `CodecError`."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None:
        return ["N"]
    if isinstance(value, bool):
        return ["b", bool(value)]
    if isinstance(value, int):
        return ["i", int.__repr__(value)]
    if isinstance(value, float):
        return ["f", float.__repr__(value)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, bytes):
        return ["y", base64.b64encode(bytes(value)).decode("ascii")]
    d = depth + 1
    if isinstance(value, list):
        return ["l", [encode_value(v, d) for v in list.__iter__(value)]]
    if isinstance(value, tuple):
        return ["t", [encode_value(v, d) for v in tuple.__iter__(value)]]
    if isinstance(value, dict):
        return ["d", [[encode_value(k, d), encode_value(v, d)] for k, v in dict.items(value)]]
    if isinstance(value, frozenset):
        return ["F", [encode_value(v, d) for v in frozenset.__iter__(value)]]
    if isinstance(value, set):
        return ["S", [encode_value(v, d) for v in set.__iter__(value)]]
    raise CodecError(f"a {type(value).__name__} cannot cross the sandbox boundary")


_FLOAT_WORDS = {"nan", "inf", "-inf"}


def decode_value(tagged: Any, depth: int = 0) -> Any:
    """Rebuild a value from `encode_value` output as real builtins, strictly."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
    if not isinstance(tagged, list) or not tagged or not isinstance(tagged[0], str):
        raise CodecError("malformed value: expected [tag, payload]")
    tag = tagged[0]
    if tag == "N" and len(tagged) == 1:
        return None
    if len(tagged) != 2:
        raise CodecError(f"malformed value with tag {tag!r}")
    payload = tagged[1]
    if tag == "b" and isinstance(payload, bool):
        return payload
    if tag == "i" and isinstance(payload, str):
        try:
            return int(payload)
        except ValueError as exc:
            raise CodecError(f"bad int: {exc}") from None
    if tag == "f" and isinstance(payload, str):
        if payload not in _FLOAT_WORDS and not _is_float_literal(payload):
            raise CodecError("bad float literal")
        return float(payload)
    if tag == "s" and isinstance(payload, str):
        return payload
    if tag == "y" and isinstance(payload, str):
        try:
            return base64.b64decode(payload.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise CodecError("bad base64 bytes") from None
    if not isinstance(payload, list):
        raise CodecError(f"unknown tag {tag!r} or wrong payload type")
    d = depth + 1
    try:
        if tag == "l":
            return [decode_value(v, d) for v in payload]
        if tag == "t":
            return tuple(decode_value(v, d) for v in payload)
        if tag == "S":
            return {decode_value(v, d) for v in payload}
        if tag == "F":
            return frozenset(decode_value(v, d) for v in payload)
        if tag == "d":
            out: dict[Any, Any] = {}
            for pair in payload:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise CodecError("malformed dict item")
                out[decode_value(pair[0], d)] = decode_value(pair[1], d)
            return out
    except TypeError as exc:  # an unhashable key or set member
        raise CodecError(f"bad value: {exc}") from None
    raise CodecError(f"unknown tag {tag!r}")


def _is_float_literal(text: str) -> bool:
    if not 0 < len(text) <= 40:
        return False
    return all(c in "0123456789.e+-" for c in text)


def encode_message(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(data)) + data


# --------------------------------------------------------------- candidate process side
_EXCEPTIONS = {
    name: obj
    for name, obj in vars(builtins).items()
    if isinstance(obj, type)
    and issubclass(obj, Exception)
    and not issubclass(obj, Warning)
    and name not in {"ExceptionGroup", "BaseExceptionGroup"}
}
"""Builtin exceptions a candidate may raise across the boundary, rebuilt by name."""


def serve_candidate(call_fd: int, reply_fd: int) -> None:
    """Candidate process main: wait for the import request, then answer calls until EOF.

    It is started before the job arrives (the runner keeps one spare, already
    exec'ed, with the next job's work dir as cwd), so its start-up is off the
    critical path; the first request names the module to import.
    """
    sys.path.insert(0, os.getcwd())
    module: Any = None
    import_error: tuple[str, str] | None = None
    while True:
        try:
            request = read_frame(call_fd, MAX_CALL_FRAME)
        except FrameError:
            return
        if request is None:
            return
        if request.get("op") == "import":
            module, import_error = _import_candidate(str(request.get("module")))
            reply: dict[str, Any] = {"imported": import_error is None}
        else:
            try:
                reply = _answer(module, import_error, request)
            except Exception as exc:  # an unencodable result (or one that lies about its type)
                reply = {"exc": "TypeError", "msg": _short(str(exc))}
        # What the call printed reaches the log before its answer does: the runner kills
        # this process as soon as the judge is done, and the log must not depend on timing.
        for stream in (sys.stdout, sys.stderr):
            try:  # noqa: SIM105  (candidate core: no contextlib import for this)
                stream.flush()
            except Exception:  # the candidate closed or replaced it
                pass
        _write_all(reply_fd, encode_message(reply))


def _import_candidate(module_file: str) -> tuple[Any, tuple[str, str] | None]:
    import importlib  # noqa: PLC0415  (candidate core: import only what is used)

    name = module_file[:-3].replace("/", ".")
    if name.endswith(".__init__"):
        name = name[: -len(".__init__")]
    try:
        return importlib.import_module(name), None
    except BaseException as exc:  # the candidate's failure becomes every call's answer
        _print_exception()
        return None, (_exception_name(exc), f"importing {module_file} failed: {exc!r}")


def _answer(module: Any, import_error: tuple[str, str] | None, request: dict[str, Any]) -> Any:
    if import_error is not None:
        return {"exc": import_error[0], "msg": import_error[1]}
    name = request.get("name")
    if module is None or not isinstance(name, str) or not hasattr(module, name):
        return {"exc": "NameError", "msg": f"name {name!r} is not defined by the candidate"}
    target = getattr(module, name)
    if request.get("op") == "resolve":
        if callable(target):
            return {"callable": True}
        return {"value": encode_value(target)}
    try:
        args = decode_value(request.get("args"))
        kwargs = decode_value(request.get("kwargs"))
        result = target(*args, **kwargs)
    except BaseException as exc:
        _print_exception()
        return {"exc": _exception_name(exc), "msg": _short(str(exc))}
    return {"value": encode_value(result)}


def _print_exception() -> None:
    import traceback  # noqa: PLC0415  (candidate core: only on the error path)

    traceback.print_exc()
    sys.stdout.flush()


def _exception_name(exc: BaseException) -> str:
    name = type(exc).__name__
    return name if _EXCEPTIONS.get(name) is type(exc) else "CandidateError"


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


CORE_END = "# ==== end of the candidate core ===="
# ==== end of the candidate core ====
# The runner, judge and pytest launcher below never run in a candidate process.
# ruff: noqa: E402, PTH100, PTH101, PTH103, PTH108, PTH109, PTH112, PTH114, PTH118, PTH120, PTH123, PTH208
# (E402: the imports above are all the candidate core may pay for at start-up. PTH: this
# is fd- and /proc-level code that works on str paths and os calls throughout.)
import ast
import contextlib
import ctypes
import hashlib
import hmac
import math
import resource
import select
import shutil
import signal
import stat
import subprocess
import time
import traceback
import types

SCRATCH_DIRS = ("/dev/shm", "/tmp", "/var/tmp")
"""Writable places outside the work dir that a job might use to leave files behind."""
JOB_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
PR_SET_DUMPABLE = 4


class JobError(Exception):
    """The job message itself is malformed (the host's fault, not the candidate's)."""


class CandidateError(Exception):
    """The candidate raised something that is not a builtin exception, or broke the channel."""


# ------------------------------------------------------------------- judge (trusted side)
class CandidateProxy:
    """Stands for a candidate function in the judge; calls cross the pipe as plain data."""

    def __init__(self, name: str, channel: _CallChannel) -> None:
        self._name = name
        self._channel = channel

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reply = self._channel.ask(
            {
                "op": "call",
                "name": self._name,
                "args": encode_value(list(args)),
                "kwargs": encode_value(kwargs),
            }
        )
        if "exc" in reply:
            raise _rebuild_exception(reply)
        return decode_value(reply.get("value"))

    def __repr__(self) -> str:
        return f"<candidate {self._name}>"


class _CallChannel:
    def __init__(self, call_fd: int, reply_fd: int) -> None:
        self.call_fd = call_fd
        self.reply_fd = reply_fd

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            _write_all(self.call_fd, encode_message(request))
            reply = read_frame(self.reply_fd, MAX_CALL_FRAME)
        except (OSError, FrameError) as exc:
            raise CandidateError(f"candidate process is gone: {exc}") from None
        if reply is None:
            raise CandidateError("candidate process exited during a call")
        return reply


def _rebuild_exception(reply: dict[str, Any]) -> Exception:
    name, msg = reply.get("exc"), reply.get("msg")
    text = _short(msg if isinstance(msg, str) else "")
    cls = _EXCEPTIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        return CandidateError(f"{name}: {text}")
    try:
        return cls(text)
    except Exception:  # e.g. UnicodeDecodeError needs five arguments
        return CandidateError(f"{name}: {text}")


def plan_check(test_source: str) -> tuple[ast.Module, int, set[str]]:
    """Split ``check`` into tests; return the instrumented module, test count, free names.

    Each top-level statement of ``check`` that mentions ``candidate`` (or a free name,
    i.e. a helper the candidate module defines) becomes one test wrapped in
    try/except that reports its outcome; the other statements run as set-up.
    """
    tree = ast.parse(test_source, filename="<tests>")
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        raise JobError("tests of a function job must define exactly one check(candidate)")
    check = checks[0]
    free = _free_names(tree)
    param = check.args.args[0].arg
    watched = free | {param}
    body: list[ast.stmt] = []
    count = 0
    for stmt in check.body:
        names = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        if not names & watched:
            body.append(stmt)
            continue
        count += 1
        body.append(_wrap_test(stmt, count))
    check.body = body
    ast.fix_missing_locations(tree)
    return tree, count, free


def _wrap_test(stmt: ast.stmt, index: int) -> ast.stmt:
    wrapper = ast.parse(
        "try:\n    pass\n"
        f"except Exception as __judge_exc:\n    __judge_report({index}, __judge_exc)\n"
        f"else:\n    __judge_report({index}, None)\n"
    ).body[0]
    assert isinstance(wrapper, ast.Try)
    wrapper.body = [stmt]
    return ast.copy_location(wrapper, stmt)


def _free_names(tree: ast.Module) -> set[str]:
    loaded: set[str] = set()
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound - set(dir(builtins))


def run_judge(
    plan: tuple[ast.Module, int, set[str]],
    module_file: str,
    entry: str,
    channel: _CallChannel,
    report_fd: int,
) -> None:
    """Judge process main (forked from the runner): run check(candidate), stream outcomes."""

    def report(index: int, exc: BaseException | None) -> None:
        message = None if exc is None else _short(f"{type(exc).__name__}: {exc}")
        write_frame(report_fd, {"test": index, "passed": exc is None, "error": message})

    tree, _count, free = plan
    channel.ask({"op": "import", "module": module_file})
    namespace: dict[str, Any] = {"__name__": "__judge__", "__judge_report": report}
    for name in sorted(free):
        reply = channel.ask({"op": "resolve", "name": name})
        if reply.get("callable"):
            namespace[name] = CandidateProxy(name, channel)
        elif "value" in reply:
            namespace[name] = decode_value(reply["value"])
    exec(compile(tree, "<tests>", "exec"), namespace)
    namespace["check"](CandidateProxy(entry, channel))
    write_frame(report_fd, {"done": True})


# ------------------------------------------------------------------------ pytest launcher
def run_pytest_launcher(config_fd: int) -> int:
    """Candidate process main for kind="pytest": pytest with the trusted result plugin.

    The config (key, report fd, test ids, expected test hashes) is read from `config_fd`,
    which is closed before pytest imports anything of the candidate's.
    """
    with os.fdopen(config_fd, "rb") as stream:
        config = json.loads(stream.read().decode("utf-8"))
    import pytest  # noqa: PLC0415  (only this mode needs it; the runner must start without)

    root = os.getcwd()
    sys.path.insert(0, root)  # what `python -m pytest` does: the repository is importable
    plugin = _ResultPlugin(
        bytes.fromhex(config.pop("key")), config["report_fd"], config["tests"], root
    )
    # `-c` names the runner's own ini file, so the candidate's pytest.ini, pyproject.toml,
    # setup.cfg or tox.ini cannot add options (e.g. `-p <candidate module>` as a plugin).
    args = ["-c", config["ini"], "-p", "no:cacheprovider", "-q", "--rootdir", root]
    args += config["test_ids"]
    return int(pytest.main(args, plugins=[plugin]))


class _ResultPlugin:
    """Records per-node outcomes and reports them, authenticated, when the session ends."""

    def __init__(self, key: bytes, report_fd: int, tests: dict[str, str], root: str) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256).copy
        self._report_fd = report_fd
        self._tests = tests
        self._root = root
        self._outcomes: dict[str, bool] = {}
        self._problems: list[str] = []
        self._fingerprint = _pytest_fingerprint()

    def _verify_tests(self, when: str) -> None:
        for rel, digest in self._tests.items():
            try:
                with open(os.path.join(self._root, rel), "rb") as fh:
                    ok = hashlib.sha256(fh.read()).hexdigest() == digest
            except OSError:
                ok = False
            if not ok:
                self._problems.append(f"trusted test file {rel} was changed ({when})")

    def pytest_collectstart(self, collector: Any) -> None:
        self._verify_tests("before collecting " + str(getattr(collector, "nodeid", "")))

    def pytest_runtest_logreport(self, report: Any) -> None:
        # A node passes when its call passed and neither set-up nor teardown failed;
        # skips and xfails are not passes.
        if report.when == "call":
            self._outcomes[report.nodeid] = self._outcomes.get(report.nodeid, True) and bool(
                report.passed
            )
        elif not report.passed:
            self._outcomes[report.nodeid] = False

    def pytest_sessionfinish(self, session: Any) -> None:
        self._verify_tests("at the end")
        replaced = _replaced(self._fingerprint)
        if replaced:
            names = ", ".join(sorted(replaced)[:5])
            self._problems.append(f"pytest's own functions were replaced during the run: {names}")
        body = json.dumps({"outcomes": self._outcomes, "problems": self._problems}).encode()
        mac = self._mac()
        mac.update(body)
        frame = {"body": body.decode(), "mac": mac.hexdigest()}
        with contextlib.suppress(OSError):
            _write_all(self._report_fd, encode_message(frame))


def _pytest_fingerprint() -> list[tuple[Any, str, Any]]:
    """(namespace, name, object) for the functions and classes pytest and pluggy define."""
    marks: list[tuple[Any, str, Any]] = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name.startswith(("_pytest.", "pluggy")) or name == "pytest"):
            continue
        for attr, value in list(vars(mod).items()):
            if not isinstance(value, (type, types.FunctionType)):
                continue
            if getattr(value, "__module__", None) != name:
                continue
            marks.append((mod, attr, value))
            if isinstance(value, type):
                for key, member in list(vars(value).items()):
                    if isinstance(member, (types.FunctionType, classmethod, staticmethod)):
                        marks.append((value, key, member))
    return marks


def _replaced(marks: list[tuple[Any, str, Any]]) -> list[str]:
    """Names whose object was replaced by one defined outside pytest since `marks`
    (pytest's own plugins patch a few of its classes, e.g. legacypath)."""
    found = []
    for owner, attr, old in marks:
        new = vars(owner).get(attr, old)
        if new is not old:
            origin = str(getattr(getattr(new, "__func__", new), "__module__", ""))
            if not origin.startswith(("_pytest.", "pluggy")):
                found.append(f"{getattr(owner, '__name__', owner)}.{attr}")
    return found


# --------------------------------------------------------------------------- the runner
class _Spare:
    """A candidate process started ahead of the next function job (see `Runner`)."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        job_dir: str,
        limits: dict[str, Any],
        call_w: int,
        reply_r: int,
    ) -> None:
        self.proc = proc
        self.job_dir = job_dir
        self.limits = limits
        self.call_w = call_w
        self.reply_r = reply_r


class Runner:
    """The resident loop: one job at a time, everything cleaned up between jobs.

    After each job (and its clean-up) the runner starts the next function job's
    candidate process ahead of time: a fresh exec of the candidate core, in its own
    session, with the last job's limits, idle until the judge asks it to import the
    candidate. It holds nothing of any job. If the next job has other limits or is a
    pytest job, the spare is killed and a new process started as usual.
    """

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.script = os.path.abspath(__file__)
        self.python = sys.executable or "/usr/bin/python3"
        with open(self.script, encoding="utf-8") as fh:
            source = fh.read()
        marker = "\n" + CORE_END + "\n"
        self.core = source[: source.index(marker)]
        self.core += "\nserve_candidate(int(sys.argv[1]), int(sys.argv[2]))\n"
        self.spare: _Spare | None = None

    def serve(self, in_fd: int, out_fd: int) -> None:
        write_frame(
            out_fd,
            {
                "type": "ready",
                "protocol": PROTOCOL,
                "uid": os.getuid(),
                "python": sys.version.split()[0],
            },
        )
        while True:
            try:
                job = read_frame(in_fd)
            except FrameError as exc:
                error = f"bad frame: {exc}"
                write_frame(out_fd, {"type": "error", "fault": "runner", "error": error})
                return  # the stream is out of sync; the host must recycle
            if job is None:
                return
            try:
                reply = self.run_job(job)
            except JobError as exc:
                self.cleanup([])
                reply = {"type": "error", "fault": "job", "error": str(exc)}
            except Exception:  # a runner bug: report it, the host recycles the sandbox
                self.cleanup([])
                error = "runner failed: " + traceback.format_exc()
                reply = {"type": "error", "fault": "runner", "error": error}
            write_frame(out_fd, reply)
            if reply.get("type") == "result" and job.get("kind") == "function":
                with contextlib.suppress(JobError, OSError):
                    self.spare = self._start_candidate(job["limits"])

    # -- one job
    def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        spare, self.spare = self.spare, None
        try:
            kind = job.get("kind")
            limits = _check_limits(job.get("limits"))
            files = _check_files(job.get("files"), "files")
            tests = _check_files(job.get("tests"), "tests")
            if kind == "function":
                entry = job.get("entry_point")
                if not isinstance(entry, str) or entry.count(":") != 1:
                    raise JobError("entry_point must be 'path/to/module.py:function'")
                module_file, func = entry.split(":")
                if module_file not in files or not module_file.endswith(".py"):
                    raise JobError(f"entry_point module {module_file!r} is not among the files")
                if len(tests) != 1:
                    raise JobError("a function job needs exactly one tests module")
                try:
                    plan = plan_check(next(iter(tests.values())))
                except (SyntaxError, ValueError, RecursionError) as exc:
                    raise JobError(f"tests do not parse: {exc}") from None
                if spare is None or spare.limits != limits:
                    _discard(spare)
                    spare = None
                    spare = self._start_candidate(limits)
                job_dir = spare.job_dir
                _write_tree(os.path.join(job_dir, "src"), files)
                candidate, spare = spare, None  # from here on _run_function owns it
                outcome = self._run_function(candidate, plan, module_file, func, limits)
            elif kind == "pytest":
                _discard(spare)
                spare = None
                ids = job.get("test_ids")
                if (
                    not isinstance(ids, list)
                    or not ids
                    or not all(isinstance(i, str) and i and not i.startswith("-") for i in ids)
                ):
                    raise JobError("a pytest job needs test_ids: node ids, none starting '-'")
                job_dir = self._new_job_dir()
                outcome = self._run_pytest(job_dir, files, tests, ids, limits)
            else:
                raise JobError(f"unknown job kind {kind!r}; expected 'function' or 'pytest'")
        finally:
            _discard(spare)
        status, per_test, log, anomalies = outcome
        anomalies.extend(self.cleanup([job_dir]))
        return {
            "type": "result",
            "status": status,
            "per_test": per_test,
            "log": log,
            "anomalies": anomalies,
            "duration_s": round(time.monotonic() - started, 6),
        }

    def _new_job_dir(self) -> str:
        # Always the same path: logs (tracebacks name files) and so their digests must
        # not depend on how many jobs a sandbox ran, or audits in a fresh one disagree.
        job_dir = os.path.join(self.workdir, "job")
        os.makedirs(os.path.join(job_dir, "tmp"))
        return job_dir

    def _start_candidate(self, limits: dict[str, Any]) -> _Spare:
        job_dir = self._new_job_dir()
        src = os.path.join(job_dir, "src")
        os.makedirs(src)
        call_r, call_w = os.pipe()
        reply_r, reply_w = os.pipe()
        cmd = [self.python, "-S", "-s", "-B", "-c", self.core, str(call_r), str(reply_w)]
        try:
            proc = self._spawn(cmd, src, job_dir, limits, (call_r, reply_w))
        finally:
            os.close(call_r)
            os.close(reply_w)
        return _Spare(proc, job_dir, limits, call_w, reply_r)

    def _run_function(
        self,
        candidate: _Spare,
        plan: tuple[ast.Module, int, set[str]],
        module_file: str,
        func: str,
        limits: dict[str, Any],
    ) -> tuple[str, dict[str, bool], str, list[str]]:
        report_r, report_w = os.pipe()
        call_w, reply_r = candidate.call_w, candidate.reply_r
        judge = os.fork()
        if judge == 0:  # the judge: trusted, never imports candidate code
            code = 0
            try:
                _enter_judge(limits, keep=(call_w, reply_r, report_w))
                channel = _CallChannel(call_w, reply_r)
                run_judge(plan, module_file, func, channel, report_w)
            except CandidateError as exc:  # the candidate process died or broke the pipe
                code = 1
                with contextlib.suppress(BaseException):
                    write_frame(report_w, {"fatal": str(exc)})
            except BaseException:  # the trusted test code itself failed outside a test
                code = 1
                with contextlib.suppress(BaseException):
                    tb = _short(traceback.format_exc(), 2000)
                    write_frame(report_w, {"fatal": tb})
            os._exit(code)
        os.close(call_w)
        os.close(reply_r)
        os.close(report_w)
        raw, timed_out, log, truncated = self._watch(candidate.proc, limits, report_r, judge)
        reports = _split_frames(raw)
        total = plan[1]
        names = [f"check#{i}" for i in range(1, total + 1)] if total else ["check"]
        per_test = dict.fromkeys(names, False)
        done = any("done" in r for r in reports)
        lines = []
        for r in reports:
            name = f"check#{r.get('test')}"
            if name in per_test:
                per_test[name] = r.get("passed") is True
                if r.get("passed") is not True:
                    lines.append(f"judge: {name} failed: {r.get('error')}")
            elif "fatal" in r:
                lines.append("judge: check() stopped early: " + str(r["fatal"]).strip())
        if not total:
            per_test["check"] = done
        if timed_out:
            lines.append(f"runner: timed out after {limits['timeout_s']} s; job killed")
        status = "timeout" if timed_out else ("ok" if done else "crashed")
        notes = ["output truncated"] if truncated else []
        return status, per_test, _join_log(log, lines), notes

    def _run_pytest(
        self,
        job_dir: str,
        files: dict[str, str],
        tests: dict[str, str],
        test_ids: list[str],
        limits: dict[str, Any],
    ) -> tuple[str, dict[str, bool], str, list[str]]:
        repo = os.path.join(job_dir, "repo")
        dropped = [
            p
            for p in files
            if p.endswith((".pyc", ".pyo"))
            or "__pycache__" in p.split("/")
            or (p.rsplit("/", 1)[-1] == "conftest.py" and p not in tests)
        ]
        kept = {p: t for p, t in files.items() if p not in dropped and p not in tests}
        os.makedirs(repo)
        _write_tree(repo, kept)
        _write_tree(repo, tests, mode=0o444)
        ini = os.path.join(job_dir, "trusted-pytest.ini")
        _write_tree(job_dir, {"trusted-pytest.ini": "[pytest]\n"}, mode=0o444)
        key = os.urandom(32)
        config_r, config_w = os.pipe()
        report_r, report_w = os.pipe()
        config = {
            "key": key.hex(),
            "report_fd": report_w,
            "test_ids": test_ids,
            "ini": ini,
            "tests": {p: hashlib.sha256(t.encode()).hexdigest() for p, t in tests.items()},
        }
        cmd = [self.python, "-s", "-B", self.script, "--pytest", str(config_r)]
        try:
            proc = self._spawn(cmd, repo, job_dir, limits, (config_r, report_w))
        except JobError:
            for fd in (config_w, report_r):
                os.close(fd)
            raise
        finally:
            os.close(config_r)
            os.close(report_w)
        _write_all(config_w, json.dumps(config).encode())
        os.close(config_w)
        del config
        raw, timed_out, log, truncated = self._watch(proc, limits, report_r, None)
        per_test = dict.fromkeys(test_ids, False)
        notes = ["output truncated"] if truncated else []
        reports = _split_frames(raw)
        verified: list[dict[str, Any]] = []
        for frame in reports:
            body, mac = frame.get("body"), frame.get("mac")
            if not isinstance(body, str) or not isinstance(mac, str):
                continue
            expect = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
            if hmac.compare_digest(expect, mac):
                with contextlib.suppress(ValueError):
                    verified.append(json.loads(body))
        if len(reports) != len(verified) or len(verified) > 1:
            notes.append("forged or repeated result reports on the report pipe")
            verified = []
        lines = [f"runner: dropped candidate file {p} (not trusted here)" for p in dropped]
        status = "timeout" if timed_out else ("ok" if verified else "crashed")
        if verified:
            outcomes = verified[0].get("outcomes", {})
            problems = verified[0].get("problems", [])
            if problems:
                notes.extend(str(p) for p in problems)
            else:
                for node in test_ids:
                    per_test[node] = outcomes.get(node) is True
        return status, per_test, _join_log(log, lines), notes

    # -- processes
    def _spawn(
        self,
        cmd: list[str],
        cwd: str,
        job_dir: str,
        limits: dict[str, Any],
        keep_fds: tuple[int, ...],
    ) -> subprocess.Popen[bytes]:
        tmp = os.path.join(job_dir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        env = {
            "PATH": JOB_ENV_PATH,
            "HOME": job_dir,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        }
        try:
            return subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                close_fds=True,
                pass_fds=keep_fds,
                start_new_session=True,
                preexec_fn=lambda: _apply_rlimits(limits),  # noqa: PLW1509 (no threads here)
            )
        except OSError as exc:
            raise JobError(f"could not start the job process: {exc}") from None

    def _watch(
        self,
        proc: subprocess.Popen[bytes],
        limits: dict[str, Any],
        report_fd: int,
        judge: int | None,
    ) -> tuple[bytes, bool, bytes, bool]:
        """Drain output and reports until the job ends or its deadline passes.

        The job ends when the judge exits (function) or the pytest process exits
        (pytest); a daemon that keeps the pipes open cannot stretch it.
        """
        assert proc.stdout is not None
        out_fd = proc.stdout.fileno()
        deadline = time.monotonic() + float(limits["timeout_s"])
        sink = _Sink(out_fd, report_fd, int(limits["output_bytes"]))
        timed_out = False
        while True:
            if judge is not None:
                # Only the judge holds the report pipe: EOF there means it has finished.
                if report_fd not in sink.open:
                    os.waitpid(judge, 0)
                    judge = None
                    break
            elif proc.poll() is not None:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            sink.pump(min(remaining, 0.05) if sink.open else min(remaining, 0.005))
        _kill_group(proc.pid)
        if judge is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(judge, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(judge, 0)
        sink.drain(time.monotonic() + 0.5)
        os.close(report_fd)
        proc.stdout.close()
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        return bytes(sink.report), timed_out, bytes(sink.log), sink.truncated

    # -- between jobs
    def cleanup(self, job_dirs: list[str]) -> list[str]:
        """Kill every other process, wipe writable places; return what was found."""
        found: list[str] = []
        strays = _other_processes()
        if strays:
            found.append("stray processes outlived the job: " + ", ".join(strays[:10]))
        if not _kill_everything_else():
            found.append("could not kill every stray process")
        for entry in sorted(os.listdir(self.workdir)):
            path = os.path.join(self.workdir, entry)
            if path not in job_dirs:
                found.append(f"job wrote outside its work dir: {path}")
            if not _wipe(path):
                found.append(f"could not wipe {path}")
        for scratch in SCRATCH_DIRS:
            if not os.path.isdir(scratch) or not os.access(scratch, os.W_OK):
                continue
            for entry in os.listdir(scratch):
                path = os.path.join(scratch, entry)
                found.append(f"job left files in {path}")
                _wipe(path)
        found.extend(_sysv_ipc_leftovers())
        return found


def _discard(spare: _Spare | None) -> None:
    """Kill an unused spare candidate process and remove its work dir, quietly."""
    if spare is None:
        return
    _kill_group(spare.proc.pid)
    for fd in (spare.call_w, spare.reply_r):
        with contextlib.suppress(OSError):
            os.close(fd)
    if spare.proc.stdout is not None:
        spare.proc.stdout.close()
    with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
        spare.proc.wait(timeout=5)
    _wipe(spare.job_dir)


class _Sink:
    """Reads the job's output (capped) and the judge's report pipe without blocking."""

    def __init__(self, out_fd: int, report_fd: int, cap: int) -> None:
        self.out_fd = out_fd
        self.cap = cap
        self.open = {out_fd, report_fd}
        self.log = bytearray()
        self.report = bytearray()
        self.truncated = False

    def pump(self, timeout: float) -> bool:
        """Read what is ready within `timeout`; False when nothing was."""
        if not self.open:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select(list(self.open), [], [], timeout)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                self.open.discard(fd)
            elif fd == self.out_fd:
                room = max(self.cap - len(self.log), 0)
                self.log += chunk[:room]
                self.truncated = self.truncated or len(chunk) > room
            elif len(self.report) < MAX_CALL_FRAME:
                self.report += chunk
        return bool(ready)

    def drain(self, deadline: float) -> None:
        """After the job: take what is already buffered, bounded in time (a flooding
        daemon could otherwise keep the pipe busy forever)."""
        while self.open and time.monotonic() < deadline and self.pump(0):
            pass


def _split_frames(data: bytes) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    offset = 0
    while offset + 4 <= len(data):
        (size,) = struct.unpack(">I", data[offset : offset + 4])
        body = data[offset + 4 : offset + 4 + size]
        if len(body) != size:
            break
        with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
            obj = json.loads(body.decode("utf-8"))
            if isinstance(obj, dict):
                frames.append(obj)
        offset += 4 + size
    return frames


def _join_log(raw: bytes, lines: list[str]) -> str:
    text = raw.decode("utf-8", errors="replace")
    lines = [line for line in lines if line][:50]
    if lines:
        text += ("" if not text or text.endswith("\n") else "\n") + "\n".join(lines) + "\n"
    return text


def _readable(fd: int, timeout: float) -> bool:
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    except (OSError, ValueError):
        return False
    return bool(ready)


def _apply_rlimits(limits: dict[str, Any]) -> None:
    """In the child before exec: resource limits and a high OOM score (die first)."""
    mem = int(limits["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = int(limits["workdir_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    nofile = int(limits["nofile"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = math.ceil(float(limits["timeout_s"])) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    nproc = int(limits["nproc"])
    if nproc > 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as fh:
        fh.write("1000")


def _enter_judge(limits: dict[str, Any], keep: tuple[int, ...]) -> None:
    """The judge keeps the runner's non-dumpable flag and drops the runner's channel."""
    _set_non_dumpable()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    mem = max(int(limits["memory_mb"]), 256) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def _set_non_dumpable() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _other_processes() -> list[str]:
    """Live (non-zombie) processes other than the runner, as 'pid (comm)'."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat_line = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        comm = stat_line[stat_line.find("(") + 1 : stat_line.rfind(")")]
        state = stat_line[stat_line.rfind(")") + 2 :][:1]
        if state != "Z":
            found.append(f"{entry} ({comm})")
    return found


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_everything_else() -> bool:
    """kill(-1, SIGKILL) until only the runner is left; True when that is reached."""
    for _ in range(200):
        _reap()
        if not _other_processes():
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        time.sleep(0.005)
    _reap()
    return not _other_processes()


def _wipe(path: str) -> bool:
    def make_writable(func: Any, target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target) or "/", stat.S_IRWXU)
            os.chmod(target, stat.S_IRWXU)
        func(target)

    try:
        if os.path.isdir(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.chmod(path, stat.S_IRWXU)
            shutil.rmtree(path, onerror=make_writable)
        else:
            os.unlink(path)
    except OSError:
        return False
    return not os.path.lexists(path)


def _sysv_ipc_leftovers() -> list[str]:
    found = []
    for kind in ("shm", "msg", "sem"):
        with contextlib.suppress(OSError), open(f"/proc/sysvipc/{kind}") as fh:
            rows = fh.read().splitlines()[1:]
            if rows:
                found.append(f"job left {len(rows)} System V {kind} object(s)")
    return found


def _write_tree(root: str, files: dict[str, str], mode: int = 0o644) -> None:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                os.unlink(path)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(path, mode)
        except OSError as exc:  # a path clash or a tree larger than the work dir
            raise JobError(f"cannot write {rel!r} into the work dir: {exc}") from None


def _check_files(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise JobError(f"{what} must be an object mapping relative paths to text")
    for path, text in value.items():
        if not isinstance(text, str):
            raise JobError(f"{what}[{path!r}] must be text")
        parts = path.split("/")
        bad = (
            not path
            or path.startswith("/")
            or "\x00" in path
            or any(p in ("", ".", "..") or len(p) > 255 for p in parts)
        )
        if bad:
            raise JobError(f"{what} path {path!r} must be relative, normalised, without '..'")
    return value


_LIMIT_KEYS = ("timeout_s", "memory_mb", "output_bytes", "workdir_mb", "nproc", "nofile")


def _check_limits(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != set(_LIMIT_KEYS):
        raise JobError(f"limits must be an object with exactly the keys {_LIMIT_KEYS}")
    for key in _LIMIT_KEYS:
        v = value[key]
        least = 0 if key == "nproc" else 1e-3  # nproc 0 means "not set"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < least:
            raise JobError(f"limits.{key} must be a number of at least {least}")
    return value


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--pytest":
        return run_pytest_launcher(int(argv[1]))
    workdir = "/work"
    if len(argv) == 2 and argv[0] == "--workdir":
        workdir = argv[1]
    elif argv:
        print(f"usage: runner.py [--workdir DIR]; got {argv}", file=sys.stderr)
        return 2
    if os.getpid() != 1:
        print(
            "runner: refusing to start: not PID 1 of a pid namespace (its clean-up kills "
            "every other process it can signal). Docker: no --init; bwrap: --as-pid-1.",
            file=sys.stderr,
        )
        return 2
    if not os.path.isdir(workdir) or not os.access(workdir, os.W_OK):
        print(f"runner: work dir {workdir} is missing or not writable", file=sys.stderr)
        return 2
    _set_non_dumpable()
    # PID 1 ignores signals it has no handler for; Python installs one for SIGINT.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    stdin_fd, stdout_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # a stray print() must never corrupt the channel
    Runner(workdir).serve(stdin_fd, stdout_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

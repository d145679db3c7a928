"""`coderepair-worker doctor`: what this machine has, what is missing, and what to do.

Each check returns a `CheckResult` (name, status, detail, fix) instead of raising, so one
broken part never hides the others. Statuses:

- ``ok``: works as configured;
- ``warn``: works, but worse than it could (Docker missing so bubblewrap is used, low
  disk, no identity yet);
- ``fail``: `join` cannot work until it is fixed (no sandbox, no engine, coordinator
  unreachable, wrong trainer key, key file readable by others);
- ``skip``: cannot be determined (clock skew, or anything behind an unreachable
  coordinator).

Every probe is real: the sandbox check runs the sandbox module's own probes (Docker
engine and image, or a real job under bubblewrap), the coordinator check is a gRPC
health check plus the unsigned ``GetStatus`` call. Nothing here changes state
anywhere: the doctor never registers, never creates a key, never writes a file.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from coderepair.worker.config import WorkerConfig

__all__ = [
    "CheckResult",
    "CheckStatus",
    "CoordinatorProbe",
    "check_clock",
    "check_coordinator",
    "check_cpu_memory",
    "check_disk",
    "check_engine",
    "check_gpu",
    "check_identity",
    "check_platform",
    "check_run",
    "check_sandbox",
    "probe_coordinator",
    "run_checks",
    "worst",
]

COORDINATOR_TIMEOUT_S = 3.0
"""How long the coordinator gets to answer each doctor call (a healthy one takes ms)."""
DISK_FAIL_BYTES = 1 << 30
"""Below this much free space in the cache dir not even a small policy fits."""
DISK_WARN_BYTES = 10 << 30
"""Below this a policy of a few billion parameters (plus one delta chain) may not fit."""
RAM_WARN_BYTES = 4 << 30
"""Below this the HF engine with even a small model and two sandboxes runs out of memory."""


class CheckStatus(enum.StrEnum):
    """Outcome of one check, from best to worst (``skip``: could not be determined)."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """One line of the doctor's report."""

    name: str
    status: CheckStatus
    detail: str
    fix: str = ""
    """What to do about it; empty when there is nothing to do."""

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready dict (for ``doctor --json``)."""
        out = asdict(self)
        out["status"] = self.status.value
        return out


def _ok(name: str, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(name, CheckStatus.OK, detail, fix)


def _warn(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, CheckStatus.WARN, detail, fix)


def _fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, CheckStatus.FAIL, detail, fix)


def _skip(name: str, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(name, CheckStatus.SKIP, detail, fix)


def _dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- machine


def check_platform(config: WorkerConfig) -> CheckResult:
    """Python version and operating system (the sandboxes need Linux)."""
    py = ".".join(str(part) for part in sys.version_info[:3])
    where = f"Python {py} on {platform.system()} {platform.release()} ({platform.machine()})"
    if platform.system() != "Linux":
        return _warn(
            "platform",
            where + ": the sandboxes are tested on Linux only",
            "run the worker on Linux, in WSL2 on Windows, or in a Linux VM",
        )
    return _ok("platform", where)


def _memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes; None where this OS does not say."""
    total = available = None
    try:
        with Path("/proc/meminfo").open(encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    available = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            total = None
    return total, available


def _usable_cpus() -> int:
    # The affinity mask, not cpu_count: containers and taskset limit what we may use.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_cpu_memory(config: WorkerConfig) -> CheckResult:
    """Usable cores and RAM, against the configured thread and sandbox caps."""
    cores = _usable_cpus()
    total, available = _memory_bytes()
    ram = "RAM unknown"
    if total is not None:
        ram = f"{total / 2**30:.1f} GiB RAM"
        if available is not None:
            ram += f" ({available / 2**30:.1f} GiB available)"
    detail = f"{cores} usable CPU core(s), {ram}"
    if config.cpu_threads is not None and config.cpu_threads > cores:
        return _warn(
            "cpu & memory",
            f"{detail}; cpu_threads={config.cpu_threads} is more than the cores",
            f"set cpu_threads to at most {cores} (or leave it unset to use every core)",
        )
    if total is not None and total < RAM_WARN_BYTES:
        return _warn(
            "cpu & memory",
            f"{detail}: under {RAM_WARN_BYTES >> 30} GiB, only the smallest models fit",
            "use a machine with more memory, or set max_sandboxes = 1",
        )
    return _ok("cpu & memory", detail)


def check_gpu(config: WorkerConfig) -> CheckResult:
    """CUDA GPUs as torch sees them; nvidia-smi only to explain a CPU-only torch."""
    if importlib.util.find_spec("torch") is None:
        return _fail(
            "gpu",
            "torch is not installed, so no engine can run",
            "reinstall the worker: `pip install coderepair-worker` brings torch",
        )
    import torch  # noqa: PLC0415  (seconds to import: only when the check runs)

    if torch.cuda.is_available():
        gpus = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cap = props.total_memory * config.gpu_memory_fraction
            gpus.append(
                f"cuda:{index} {props.name} {props.total_memory / 2**30:.1f} GiB "
                f"(engine may use {cap / 2**30:.1f} GiB)"
            )
        return _ok(
            "gpu", f"torch {torch.__version__} (CUDA {torch.version.cuda}): " + "; ".join(gpus)
        )
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listed = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        if listed:
            return _warn(
                "gpu",
                f"nvidia-smi lists {listed.count('GPU ')} GPU(s) but torch {torch.__version__} "
                "cannot use CUDA (a CPU-only build, or a driver older than its CUDA)",
                "install a CUDA build of torch (https://pytorch.org/get-started/locally/) "
                "or update the NVIDIA driver",
            )
    return _ok("gpu", f"no CUDA GPU (torch {torch.__version__}): generation runs on the CPU")


def _vllm_available() -> tuple[bool, str]:
    """`vllm_available` from the vLLM engine module, tolerating a build without it."""
    try:
        from coderepair.worker.engines.vllm import vllm_available  # noqa: PLC0415
    except ImportError as exc:
        return False, f"this build of coderepair-worker has no vLLM engine ({exc})"
    return vllm_available()


def _hf_available() -> tuple[bool, str]:
    missing = [dist for dist in ("torch", "transformers") if importlib.util.find_spec(dist) is None]
    if missing:
        return False, f"{' and '.join(missing)} not installed"
    return True, f"transformers {_dist_version('transformers')} with torch {_dist_version('torch')}"


def check_engine(config: WorkerConfig) -> CheckResult:
    """Which engine `join` would load (per ``engine``), and why not the other."""
    if config.engine == "hf":
        works, why = _hf_available()
        if works:
            return _ok("engine", f"HF (as configured): {why}")
        return _fail("engine", f"HF engine configured but {why}", "reinstall coderepair-worker")
    vllm_works, vllm_why = _vllm_available()
    if vllm_works:
        return _ok("engine", f"vLLM: {vllm_why}")
    if config.engine == "vllm":
        return _fail(
            "engine",
            f"vLLM engine configured but it cannot run: {vllm_why}",
            "install vLLM as the reason says, or set engine = 'auto' to fall back to HF",
        )
    hf_works, hf_why = _hf_available()
    if hf_works:
        return _ok("engine", f"HF: {hf_why} (vLLM not used: {vllm_why})")
    return _fail(
        "engine",
        f"no engine can run: vLLM: {vllm_why}; HF: {hf_why}",
        "reinstall coderepair-worker (it brings torch and transformers)",
    )


def check_sandbox(config: WorkerConfig) -> CheckResult:
    """The backend `select_sandbox` would pick, probed for real (preferred one first)."""
    # Imported here: the docker SDK and the sandbox modules are not needed for --help.
    from coderepair.worker.sandbox.select import (  # noqa: PLC0415
        BACKENDS,
        BackendProbe,
        probe_bubblewrap,
        probe_docker,
    )

    prefer = None if config.sandbox == "auto" else config.sandbox
    # The same order as select_sandbox: the preferred backend, then the others.
    order = ([prefer] if prefer else []) + [name for name in BACKENDS if name != prefer]
    refused: list[BackendProbe] = []
    for name in order:
        probe = probe_docker() if name == "docker" else probe_bubblewrap()
        if not probe.available:
            refused.append(probe)
            continue
        detail = f"{name}: {probe.reason}"
        if not refused:
            return _ok("sandbox", detail)
        why_not = "; ".join(f"{p.name} unavailable: {p.reason}" for p in refused)
        fix = f"to use {refused[0].name}, fix what the detail says about it"
        if name == "bubblewrap":
            fix += " (bubblewrap has no seccomp filter and no CPU quota, Docker has both)"
        return _warn("sandbox", f"{detail} (fallback; {why_not})", fix)
    return _fail(
        "sandbox",
        "no sandbox works here, and model-written code never runs unsandboxed: "
        + "; ".join(f"{p.name}: {p.reason}" for p in refused),
        "install a Docker engine (`apt install docker.io`, then `make sandbox-image`) or "
        "bubblewrap (`apt install bubblewrap python3-pytest`)",
    )


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def check_disk(config: WorkerConfig) -> CheckResult:
    """Free space where the weights go (the cache dir, or the ancestor that exists)."""
    where = _existing_ancestor(config.cache_dir)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return _fail(
            "disk",
            f"cannot read free space at {where}: {exc.strerror}",
            "set cache_dir to a directory this user can write",
        )
    if not os.access(where, os.W_OK):
        return _fail(
            "disk",
            f"{where} (for cache dir {config.cache_dir}) is not writable by this user",
            "set cache_dir (or --cache-dir) to a directory this user can write",
        )
    detail = f"{free / 2**30:.1f} GiB free for {config.cache_dir}"
    if free < DISK_FAIL_BYTES:
        return _fail("disk", detail, f"free at least {DISK_WARN_BYTES >> 30} GiB or move cache_dir")
    if free < DISK_WARN_BYTES:
        return _warn(
            "disk", detail, f"models over ~2B parameters need {DISK_WARN_BYTES >> 30} GiB+"
        )
    return _ok("disk", detail)


def check_identity(config: WorkerConfig) -> CheckResult:
    """The key file: present, a private key, readable by its owner only."""
    from coderepair.protocol.identity import (  # noqa: PLC0415
        Identity,
        InsecureKeyFile,
        KeyFileError,
        KeyFileNotFound,
    )

    path = config.key_path
    try:
        identity = Identity.load(path)
    except KeyFileNotFound:
        return _warn(
            "identity",
            f"no key at {path} yet",
            "`coderepair-worker join` creates it on first run "
            "(or `coderepair-worker keys rotate` now)",
        )
    except InsecureKeyFile as exc:
        return _fail("identity", str(exc), f"chmod 600 {path}")
    except KeyFileError as exc:
        return _fail(
            "identity",
            str(exc),
            f"restore {path} from a backup, or `coderepair-worker keys rotate` for a new key",
        )
    mode = path.stat().st_mode & 0o777
    return _ok("identity", f"worker id {identity.key_id}, key {path} (mode {mode:04o})")


# ---------------------------------------------------------------- coordinator


@dataclass(frozen=True)
class CoordinatorProbe:
    """What one doctor visit to the coordinator found."""

    address: str
    reachable: bool
    """A gRPC server answered and says the worker service is SERVING."""
    problem: str = ""
    """Why it is not reachable (or not usable), for the user."""
    runs: tuple[Any, ...] = field(default=())
    """``coderepair.v1.RunSummary`` messages from the unsigned GetStatus call."""
    status_error: str = ""
    """Why GetStatus failed when the health check passed (an old or foreign server)."""


def probe_coordinator(address: str, timeout_s: float = COORDINATOR_TIMEOUT_S) -> CoordinatorProbe:
    """Health-check the worker service at ``address``, then ask for the runs offered."""
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    from coderepair.protocol import rpc  # noqa: PLC0415
    from coderepair.v1 import worker_pb2, worker_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(address, options=rpc.channel_options()) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=rpc.WORKER_SERVICE), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return CoordinatorProbe(address, False, _explain_rpc_error(address, exc, timeout_s))
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            return CoordinatorProbe(
                address,
                False,
                f"the coordinator at {address} answers but its worker service is {state} "
                "(starting up, draining or shutting down)",
            )
        try:
            status = worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(
                worker_pb2.GetStatusRequest(), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return CoordinatorProbe(
                address, True, status_error=_explain_rpc_error(address, exc, timeout_s)
            )
        return CoordinatorProbe(address, True, runs=tuple(status.runs))


def _explain_rpc_error(address: str, exc: Any, timeout_s: float) -> str:
    import grpc  # noqa: PLC0415

    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"no coordinator answers at {address} (unreachable: {details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the coordinator at {address} did not answer within {timeout_s:g} s (unreachable)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"something answers gRPC at {address} but not as a coderepair coordinator "
            f"(UNIMPLEMENTED: {details})"
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return f"the gRPC server at {address} does not serve the coderepair worker service"
    name = code.name if code is not None else type(exc).__name__
    return f"the coordinator at {address} answered {name}: {details}"


_COORDINATOR_FIX = (
    "check the address (--coordinator, or coordinator in worker.toml), that the coordinator "
    "is running, and that no firewall blocks the port"
)


def check_coordinator(config: WorkerConfig, probe: CoordinatorProbe | None) -> CheckResult:
    """Reachability of the configured coordinator (None: none configured)."""
    if probe is None:
        return _fail(
            "coordinator",
            "no coordinator configured",
            "pass --coordinator HOST:PORT, or set coordinator = 'HOST:PORT' in worker.toml",
        )
    if not probe.reachable:
        return _fail("coordinator", probe.problem, _COORDINATOR_FIX)
    if probe.status_error:
        return _warn(
            "coordinator",
            f"{probe.address} is healthy, but GetStatus failed: {probe.status_error}",
            "the coordinator may run another protocol version: upgrade the older side",
        )
    return _ok("coordinator", f"{probe.address} is serving; {len(probe.runs)} run(s) offered")


def check_run(config: WorkerConfig, probe: CoordinatorProbe | None) -> CheckResult:
    """The run `join` would work for, and its trainer key against the pinned one."""
    if probe is None or not probe.reachable or probe.status_error:
        return _skip("run & trainer key", "needs an answering coordinator (see above)")
    offered = {run.run_id: run for run in probe.runs}
    names = ", ".join(sorted(offered)) or "none"
    if config.run_id is not None:
        run = offered.get(config.run_id)
        if run is None:
            return _fail(
                "run & trainer key",
                f"run {config.run_id!r} is not offered by {probe.address} (offered: {names})",
                "set run_id (or --run-id) to one of the runs offered",
            )
    elif not offered:
        return _warn(
            "run & trainer key",
            f"{probe.address} offers no run yet",
            "wait for the operator to start one; join waits too",
        )
    elif len(offered) > 1:
        return _warn(
            "run & trainer key",
            f"{probe.address} offers {len(offered)} runs: {names}",
            "choose one with --run-id or run_id in worker.toml",
        )
    else:
        run = next(iter(offered.values()))
    announced = bytes(run.trainer_public_key).hex()
    if config.trainer_public_key is None:
        return _ok(
            "run & trainer key",
            f"run {run.run_id!r}, policy v{run.latest_policy_version}; trainer key not pinned "
            f"yet: join will show and pin {announced}",
        )
    if config.trainer_public_key != announced:
        return _fail(
            "run & trainer key",
            f"WRONG trainer key for run {run.run_id!r}: you pinned "
            f"{config.trainer_public_key}, the coordinator announces {announced}; "
            "policies signed by it would be refused",
            "ask the operator which key is right; only if they rotated it, update "
            "trainer_public_key (a coordinator announcing a new key may be impersonated)",
        )
    return _ok(
        "run & trainer key",
        f"run {run.run_id!r}, policy v{run.latest_policy_version}; trainer key matches the pin",
    )


def check_clock(config: WorkerConfig, probe: CoordinatorProbe | None) -> CheckResult:
    """Clock skew against the coordinator: unknown without a signed call.

    The unsigned answers the doctor may ask for (health, GetStatus) carry no clock;
    only Register and Heartbeat do, and the doctor changes nothing at the coordinator.
    """
    if probe is None or not probe.reachable:
        return _skip("clock skew", "needs an answering coordinator (see above)")
    return _skip(
        "clock skew",
        "unknown: the coordinator's unsigned answers carry no time; join measures the skew "
        "when it registers and warns before envelopes would be refused",
        "keep the system clock synchronised (NTP / systemd-timesyncd)",
    )


# ---------------------------------------------------------------- all of them


def _guarded(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    try:
        return check()
    except Exception as exc:  # a doctor reports a broken check instead of dying on it
        return _fail(
            name,
            f"the check itself failed: {type(exc).__name__}: {exc}",
            "report this at the coderepair issue tracker with the output of --json",
        )


def run_checks(
    config: WorkerConfig,
    *,
    coordinator_timeout_s: float = COORDINATOR_TIMEOUT_S,
) -> list[CheckResult]:
    """Every check, in the order a volunteer fixes things: machine, engine, sandbox, network."""
    results = [
        _guarded("platform", lambda: check_platform(config)),
        _guarded("cpu & memory", lambda: check_cpu_memory(config)),
        _guarded("gpu", lambda: check_gpu(config)),
        _guarded("engine", lambda: check_engine(config)),
        _guarded("sandbox", lambda: check_sandbox(config)),
        _guarded("disk", lambda: check_disk(config)),
        _guarded("identity", lambda: check_identity(config)),
    ]
    probe: CoordinatorProbe | None = None
    if config.coordinator is not None:
        address = config.coordinator
        try:
            probe = probe_coordinator(address, coordinator_timeout_s)
        except Exception as exc:  # same reason as in _guarded
            probe = CoordinatorProbe(address, False, f"probing {address} failed: {exc}")
    results += [
        _guarded("coordinator", lambda: check_coordinator(config, probe)),
        _guarded("run & trainer key", lambda: check_run(config, probe)),
        _guarded("clock skew", lambda: check_clock(config, probe)),
    ]
    return results


def worst(results: Sequence[CheckResult]) -> CheckStatus:
    """``fail`` if any check failed, else ``warn`` if any warned, else ``ok``."""
    statuses = {result.status for result in results}
    for status in (CheckStatus.FAIL, CheckStatus.WARN):
        if status in statuses:
            return status
    return CheckStatus.OK

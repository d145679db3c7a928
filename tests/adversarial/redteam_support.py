"""The red-team world: a real coordinator process, simulated parties, and the figures.

Shared by the red-team tests (`test_redteam_*`) and `bench/redteam.py`. Everything is
real: `coderepair-coordinator serve` as a subprocess over loopback gRPC (helpers of
``tests/integration/coordinator``: `coordinator_processes`, `service_support`), SQLite,
the local object store, and -- in the detection world -- the model auditor holding the
tiny model (TOPLOC prefill, sampling replay, reward re-run in the coordinator's own
sandbox). Workers and the trainer are processes of `redteam_agents`, each with its own
Ed25519 key file; what they were told (acknowledged batches, refusals) is journalled
by them and compared here with what the coordinator's database holds.

Policy versions: the trainer publishes version 1 (the tiny model, seed 0, which is also
``audit.policy_dir``) and version 2 (other weights, seed 1); leases name version 2, and
the stale worker generates with version 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coderepair.protocol.identity import Identity
from coderepair.protocol.task import RepairTask, TaskSet, write_taskset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration" / "coordinator"))

from coordinator_processes import free_port, start_command, wait_serving, write_toml  # noqa: E402
from service_support import Clients, Keys, make_config  # noqa: E402

AGENTS = HERE / "redteam_agents.py"
GROUP_SIZE = 2
MAX_NEW_TOKENS = 64
SAMPLE_CHEATS = (
    "wrong_model",
    "perturbed_weights",
    "hinted_prompt",
    "edited_tokens",
    "injected_text",
    "best_of_n",
    "inflated_reward",
    "tampered_sandbox",
)
HONEST_STRATEGIES = frozenset({"honest", "synthetic"})
LOOP_CHEATS = (
    "replayed_batch",
    "copied",
    "stale_policy",
    "sybil",
    "garbage",
    "streak_then_cheat",
)
STRATEGIES = ("honest", *SAMPLE_CHEATS, *LOOP_CHEATS)


def make_tasks(path: Path, n: int) -> Path:
    """``n`` small function-repair tasks (the buggy function is off by one)."""
    tasks = [
        RepairTask.create(
            kind="function",
            source="jsonl",
            problem_id=f"redteam/{i}",
            split="train",
            description=f"f(x) must return x + {i}.",
            files={"sol.py": f"def f(x):\n    return x + {i + 1}\n"},
            tests={"test_sol.py": f"def check(f):\n    assert f(1) == {i + 1}\n"},
            entry_point="sol.py:f",
            oracle={"sol.py": f"def f(x):\n    return x + {i}\n"},
        )
        for i in range(n)
    ]
    write_taskset(TaskSet.from_tasks(tasks, builder_version="redteam", split_rule="all"), path)
    return path


@dataclass
class World:
    """Models, tasks and keys of one red-team run, under ``root``."""

    root: Path
    policies: dict[int, Path]
    shards: dict[int, Path]
    tasks: Path
    keys: Keys
    n_keys: int = 0

    def key(self, name: str) -> Path:
        path = self.root / "keys" / f"{name}.pem"
        if not path.exists():
            Identity.create(path)
        return path


def build_world(root: Path, *, n_tasks: int = 96) -> World:
    from coderepair.worker.models import build_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    v1 = build_tiny_model(root / "policy-v1", seed=0)
    v2 = build_tiny_model(root / "policy-v2", seed=1, tokenizer_dir=v1)
    shards = {}
    for version, policy in ((1, v1), (2, v2)):
        shards[version] = root / f"shards-v{version}"
        shards[version].mkdir(exist_ok=True)
        shutil.copy(policy / "model.safetensors", shards[version] / "model.safetensors")
    keys = Keys(
        trainer=Identity.create(root / "keys" / "trainer.pem"),
        admin=Identity.create(root / "keys" / "admin.pem"),
    )
    tasks = make_tasks(root / "tasks.jsonl", n_tasks)
    return World(root, {1: v1, 2: v2}, shards, tasks, keys)


class CoordinatorProcess:
    """`coderepair-coordinator serve` on a fixed loopback port; kill -9 and restart."""

    def __init__(
        self,
        world: World,
        name: str,
        *,
        model_audits: bool,
        window_s: float = 600.0,
        lease_ttl_s: float = 120.0,
        objects: Path | None = None,
    ) -> None:
        self.dir = world.root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        audit: dict[str, Any] = {"window_s": window_s, "poll_s": 0.05, "max_failed_audits": 3}
        if model_audits:
            audit |= {
                "kinds": ["proof", "sampling", "reward"],
                "policy_dir": str(world.policies[1]),
                "model_threads": 1,
                "sandbox_workers": 1,
                "weights_cache_dir": str(self.dir / "weights"),
            }
        self.config = make_config(
            self.dir,
            {"tokenizer": world.policies[1], "tasks": world.tasks},
            world.keys,
            server={"listen": self.address, "sweep_interval_s": 0.5},
            run={
                "tokenizer_path": str(world.policies[1]),
                "group_size": GROUP_SIZE,
                "max_new_tokens": MAX_NEW_TOKENS,
                "max_tasks_per_lease": 1,
                "max_policy_lag": 1,
                "lease_ttl_s": lease_ttl_s,
            },
            audit=audit,
            object_store={"kind": "local", "path": str(objects or self.dir / "objects")},
        )
        self.config_path = write_toml(
            self.dir / "coordinator.toml", self.config.model_dump(mode="json", exclude_none=True)
        )
        self.log = self.dir / "coordinator.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.world = world

    @property
    def database_url(self) -> str:
        return self.config.database.url

    async def start(self) -> None:
        args = ["serve", "--config", str(self.config_path), "--log-level", "WARNING"]
        self.process = start_command(args, self.log)
        await wait_serving(self.address, self.process, self.log)

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    async def publish(self, versions: Iterable[int] = (1, 2)) -> None:
        clients = Clients(self.address)
        try:
            for version in versions:
                answer = await clients.publish(
                    self.world.keys.trainer, self.world.shards[version], version
                )
                assert answer.accepted, answer.rejection.message
        finally:
            await clients.close()


# ---------------------------------------------------------------- agents


@dataclass
class Agent:
    """A running simulated party: its process, spec and journal."""

    name: str
    strategy: str
    process: subprocess.Popen[bytes]
    journal: Path
    log: Path
    keys: list[Path] = field(default_factory=list)

    def kill9(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def spawn(
    world: World,
    address: str,
    name: str,
    strategy: str,
    *,
    n_keys: int = 1,
    batches: int = 4,
    seconds: float = 60.0,
    role: str = "worker",
    key_paths: list[Path] | None = None,
    group: Sequence[tuple[str, int] | tuple[str, int, int]] = (),
    **extra: Any,
) -> Agent:
    """Start one agent process with its own key file(s) (or ``key_paths``); ``group``:
    several simulated workers in this one process, (strategy, number of keys[, batches])."""
    adir = world.root / "agents"
    adir.mkdir(exist_ok=True)
    keys = key_paths or [world.key(f"{name}-{i}") for i in range(n_keys)]
    groups = [
        {"strategy": s, "keys": [str(world.key(f"{name}-{s}-{i}")) for i in range(n)]}
        | ({"batches": more[0]} if more else {})
        for s, n, *more in group
    ]
    spec = {
        "address": address,
        "strategy": strategy,
        "keys": [str(k) for k in keys],
        "key": str(keys[0]),
        "batches": batches,
        "seconds": seconds,
        "policy": str(world.policies[2]),
        "stale_policy": str(world.policies[1]),
        "workdir": str(adir),
        "leak_dir": str(_leak(world)),
        "group_size": GROUP_SIZE,
        "out": str(adir / f"{name}.jsonl"),
        "seed": abs(hash(name)) % 10_000,
        "agents": groups,
        **extra,
    }
    spec_path = adir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log = adir / f"{name}.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, str(AGENTS), role, "--spec", str(spec_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=HERE,
        )
    return Agent(name, strategy, process, Path(spec["out"]), log, keys)


def _leak(world: World) -> Path:
    path = world.root / "leak"
    path.mkdir(exist_ok=True)
    return path


async def wait_agents(agents: Sequence[Agent], timeout_s: float, *, strict: bool = True) -> int:
    """Until every agent exited; past ``timeout_s`` the rest are killed (-9) and, unless
    ``strict`` is false, that fails. Returns how many had to be killed."""
    deadline = time.monotonic() + timeout_s
    while any(a.process.poll() is None for a in agents):
        if time.monotonic() > deadline:
            stragglers = sum(a.process.poll() is None for a in agents)
            for agent in agents:
                agent.kill9()
            if strict:
                raise AssertionError(f"agents still running after {timeout_s:.0f} s")
            return stragglers
        await asyncio.sleep(0.2)
    for agent in agents:
        if agent.process.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(f"agent {agent.name} failed: {agent.log.read_text()[-3000:]}")
    return 0


def events(agents: Iterable[Agent]) -> list[dict[str, Any]]:
    out = []
    for agent in agents:
        if agent.journal.exists():
            for line in agent.journal.read_text().splitlines():
                if line.strip():
                    out.append({"agent": agent.name, **json.loads(line)})
    return out


# ---------------------------------------------------------------- the database


@dataclass(frozen=True)
class Stored:
    """What the coordinator's database says about batches and keys."""

    batches: dict[str, dict[str, Any]]
    workers: dict[str, dict[str, Any]]  # by public key hex
    rows: Counter[str]
    pending_audits: int


def read_store(database_url: str) -> Stored:
    from sqlalchemy import func, select

    from coderepair.coordinator.storage.db import Database
    from coderepair.coordinator.storage.models import (
        AuditJob,
        AuditState,
        Batch,
        BatchState,
        Rollout,
        Worker,
    )

    db = Database.open(database_url)
    try:
        with db.read() as session:
            batches = {
                b.batch_id: {
                    "state": b.state.value,
                    "reason": b.rejection_reason,
                    "samples": b.n_samples,
                    "worker": b.worker_id,
                    "object_key": b.object_key,
                }
                for b in session.scalars(select(Batch))
            }
            workers = {
                w.public_key.hex(): {
                    "id": w.worker_id,
                    "state": w.state.value,
                    "failed": w.audits_failed,
                }
                for w in session.scalars(select(Worker))
            }
            rows = Counter(
                dict(
                    session.execute(
                        select(Rollout.batch_id, func.count()).group_by(Rollout.batch_id)
                    ).all()
                )
            )
            # Jobs of a batch already voided (or a banned key's) are never run: not pending.
            pending = session.scalar(
                select(func.count())
                .select_from(AuditJob)
                .join(Batch, Batch.batch_id == AuditJob.batch_id)
                .where(
                    AuditJob.state.in_([AuditState.PENDING, AuditState.CLAIMED, AuditState.ERROR]),
                    Batch.state == BatchState.PENDING_AUDIT,
                )
            )
    finally:
        db.close()
    return Stored(batches, workers, rows, int(pending or 0))


async def wait_audits(database_url: str, timeout_s: float) -> Stored:
    """Until no audit job is pending (bounded); the store as it then is."""
    deadline = time.monotonic() + timeout_s
    while True:
        stored = await asyncio.to_thread(read_store, database_url)
        if not stored.pending_audits or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.5)


def lost_acknowledged(evts: Iterable[dict[str, Any]], stored: Stored) -> dict[str, int]:
    """Acknowledged batches (and their rollouts) the store does not hold in full."""
    acked = [e for e in evts if e["event"] == "ack" and e.get("samples")]
    lost = [
        e
        for e in acked
        if e["batch_id"] not in stored.batches
        or stored.batches[e["batch_id"]]["state"] == "rejected"
        or stored.rows[e["batch_id"]] != e["samples"]
    ]
    return {
        "acknowledged_batches": len(acked),
        "acknowledged_rollouts": sum(e["samples"] for e in acked),
        "lost_batches": len(lost),
        "lost_rollouts": sum(e["samples"] for e in lost),
    }


# ---------------------------------------------------------------- detection figures


def detection(evts: Sequence[dict[str, Any]], stored: Stored) -> dict[str, Any]:
    """Per strategy: cheating batches voided or refused, keys banned, honest harm."""
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "batches": 0,
            "detected": 0,
            "samples": 0,
            "samples_detected": 0,
            "how": Counter(),
            "keys": set(),
            "after_ban": 0,
        }
    )
    attempts_before_ban: dict[str, int] = Counter()
    replicas = 0
    for e in evts:
        if e["event"] == "replica":
            replicas += 1
            continue
        if e["event"] not in ("ack", "rejected", "refused"):
            continue
        if not e.get("cheat") and not e.get("samples"):
            continue  # a probe (the replay agent's first signed copy), not a batch
        if not e.get("cheat") and e.get("strategy") not in HONEST_STRATEGIES:
            # A cheater's own honest batch (the one the replay agent then replays): not
            # a cheat to catch, and voiding it when its key is banned harms no honest worker.
            continue
        fig = per[e["strategy"] if e.get("cheat") else "honest"]
        if e["event"] == "refused" and e.get("reason") == "REJECTION_REASON_BANNED":
            fig["after_ban"] += 1
            continue
        key = e.get("key", "")
        fig["keys"].add(key)
        attempts_before_ban[key] += 1
        state = stored.batches.get(e.get("batch_id", ""), {})
        if e["event"] == "ack" and state.get("state") not in ("voided", "rejected"):
            how = None
        elif e["event"] == "ack":
            how = f"voided:{state.get('reason')}"
        else:
            how = f"{e['event']}:{e.get('reason')}"
        n = int(e.get("samples") or 0)
        fig["batches"] += 1
        fig["samples"] += n
        if how is not None:
            fig["detected"] += 1
            fig["samples_detected"] += n
            fig["how"][how] += 1
    out: dict[str, Any] = {}
    for name, fig in sorted(per.items()):
        keys = sorted(k for k in fig["keys"] if k)
        banned = [k for k in keys if stored.workers.get(k, {}).get("state") == "banned"]
        out[name] = {
            "batches": fig["batches"],
            "detected": fig["detected"],
            "rate": fig["detected"] / fig["batches"] if fig["batches"] else None,
            "samples": fig["samples"],
            "samples_detected": fig["samples_detected"],
            "keys": len(keys),
            "keys_banned": len(banned),
            "max_batches_before_ban": max((attempts_before_ban[k] for k in banned), default=None),
            "refused_after_ban": fig["after_ban"],
            "how": dict(fig["how"]),
        }
    out["_sybil_replicas_held"] = replicas
    return out

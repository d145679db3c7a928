"""Coordinator ingest: rollouts/s and submit latency over real gRPC, SQLite vs PostgreSQL.

What is measured. A coordinator runs alone in its own process (`multiprocessing`, spawn)
exactly as `coderepair-coordinator serve` would run it: grpc.aio, the configured
database, the local object store (fsynced Parquet files), the sweep, one batch-preparing
helper process (`server.prepare_processes = 1`, as deploy/coordinator.toml;
`--prepare-processes N` for another count) and, where asked, the in-process audit loop.
Simulated workers are real gRPC clients in separate client processes (one grpc.aio
channel per worker), so their signing and serialisation never run on the server's event
loop. Each worker registers with its own Ed25519 key, leases its tasks through
`LeaseTasks` and builds its batches *before* the timed window (one lease per batch, G =
16 samples of each of its tasks (one task per lease unless --tasks-per-batch says more),
200 completion tokens, TOPLOC proofs of the right size); inside the window it signs each
batch afresh (new nonce and timestamp, so the server verifies a new signature and
records a new nonce every time) and calls `SubmitRollouts` one batch after the other.
Every batch must come back accepted: an accepted answer means the batch passed the
structural checks, the signature and replay checks, the duplicate check, and was
committed (the coordinator answers only after the commit).

Figures, per database, audit loop off: for 1, 50 and 200 concurrent workers submitting
back to back (closed loop: the most the coordinator ingests), ingested rollouts per
second (accepted rollouts / wall time of the window) and p50/p99 latency of one
SubmitRollouts call; for 50 and 200 workers paced so that together they offer the target
2,000 rollouts/s (open loop, as real workers whose next batch is ready when their GPU
says so: each worker's submissions fall at uniformly random times of the window, a
Poisson process given their number, so clumps of arrivals differ from cycle to cycle),
the same figures, and whether the target (2,000 r/s, p99 < 100 ms at 200 workers) was
met, with the busiest second's arrivals beside the mean rate: a run's p99 is mostly its
largest clump of arrivals (in one run, 23 of the 27 submits over 80 ms came in the 2 s
that held 87 arrivals against 62.5 on average). Side by side, the 200-worker paced phase
again on a coordinator without helpers (``prepare_processes = 0``: the checks and the
encoding in a thread of the serving process). Back to back, N workers queue N requests,
so their latency is N / throughput by Little's law; the paced rows are the latency
figure. Each row also gives the server's CPU time per batch (all its threads and its
helper processes) and the rollouts per second of server CPU: the rate one dedicated core
would sustain, whatever else this shared machine runs. Then, with the audit loop on (200
paced workers, fresh keys: BOINC audits each of a worker's first 10 batches), the same
ingest figures side by side with the audit-off ones, and the audit throughput: audits
finished per second during ingest and while draining the backlog afterwards.

PostgreSQL is a private server started from the machine's binaries (`initdb`, `pg_ctl`,
as the `postgres` user when run as root) with its durable defaults (fsync,
synchronous_commit on); SQLite runs in WAL mode with synchronous=FULL (the default).

Last, apart from the server: the CPU time of encoding one batch as Parquet, as the
submit path does, on each Arrow memory pool (mimalloc, Arrow's default; jemalloc, which
the coordinator uses; the system allocator), one fresh process each. And the commit of
one batch's rollout rows on SQLite as the one multi-row INSERT the coordinator sends vs
the driver's executemany, alone and beside a CPU-bound thread (GIL hand-offs, one per
statement step).

Run: .venv/bin/python bench/coordinator.py [--quick] [--replicas N] [--tasks-per-batch
K] [--profile DIR] [--prepare-processes N] (--replicas N: N coordinator processes on one
database, sharing the port; --tasks-per-batch K: leases of K tasks, so each batch
carries K x 16 rollouts, as a GPU worker that generates several tasks' groups in one
engine call submits them.) The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import pwd
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

G = 16  # samples per task; a batch carries G x tasks-per-batch rollouts
COMPLETION_TOKENS = 200
MAX_NEW_TOKENS = 256
WORKER_COUNTS = (1, 50, 200)
# Batches per phase: enough for a few seconds of the target rate (125 batches/s).
BATCHES: dict[int | str, int] = {1: 100, 50: 500, 200: 600, "paced": 1000}
QUICK_BATCHES: dict[int | str, int] = {1: 40, 50: 200, 200: 400, "paced": 400}
# Parquet encodes per Arrow memory pool (where mimalloc stalls, about one in a thousand).
ENCODES, QUICK_ENCODES = 5000, 1000
# The target load of the paced phases: 2,000 rollouts/s offered by all workers together,
# and the latency target at 200 workers.
TARGET_ROLLOUTS = 2000
TARGET_P99_MS = 100.0
PACED_WORKER_COUNTS = (50, 200)
N_TASKS = 1400
CLIENT_PROCESSES = 2
AUDIT_DRAIN_LIMIT_S = 30.0
TOKENIZER_SHA = "c" * 64
BASE_MODEL = "bench-model"
_SUBMIT = "/coderepair.v1.WorkerService/SubmitRollouts"


# ---------------------------------------------------------------- assets


def build_assets(root: Path, n_tasks: int) -> dict[str, Path]:
    """A byte-level tokenizer, a task set of small function tasks, one policy shard."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from coderepair.protocol.task import RepairTask, TaskSet, write_taskset
    from coderepair.worker.models import CHAT_TEMPLATE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(alphabet)])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(root / "tokenizer")
    tasks = []
    for i in range(n_tasks):
        buggy = f"def f(x):\n    return x + {i + 1}\n"
        tasks.append(
            RepairTask.create(
                kind="function",
                source="jsonl",
                problem_id=f"bench/{i}",
                split="train",
                description=f"f(x) must return x + {i}.",
                files={"sol.py": buggy},
                tests={"test_sol.py": f"def check(f):\n    assert f(1) == {i + 1}\n"},
                entry_point="sol.py:f",
                oracle={"sol.py": f"def f(x):\n    return x + {i}\n"},
            )
        )
    tasks_path = root / "tasks.jsonl"
    write_taskset(TaskSet.from_tasks(tasks, builder_version="bench", split_rule="all"), tasks_path)
    shards = root / "policy-v1"
    shards.mkdir()
    (shards / "model.safetensors").write_bytes(b"weights of version 1")
    return {"tokenizer": root / "tokenizer", "tasks": tasks_path, "shards": shards}


def make_keys(root: Path, n_workers: int) -> dict[str, Any]:
    from coderepair.protocol.identity import Identity

    directory = root / "keys"
    trainer = Identity.create(directory / "trainer.pem")
    workers = [directory / f"worker{i}.pem" for i in range(n_workers)]
    for path in workers:
        Identity.create(path)
    return {"trainer": directory / "trainer.pem", "trainer_hex": trainer.public_key_hex,
            "workers": workers}  # fmt: skip


def coordinator_overrides(  # noqa: PLR0917
    root: Path,
    assets: dict[str, Path],
    keys: dict[str, Any],
    url: str,
    audits: bool,
    tasks_per_batch: int = 1,
    prepare_processes: int = 1,
) -> dict[str, Any]:
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "sweep_interval_s": 1.0,
            # As deploy/coordinator.toml: one helper checks and encodes batches.
            "prepare_processes": prepare_processes,
        },
        # The dashboard stays on (it is part of the service), on any free port.
        "dashboard": {"port": 0},
        "database": {"url": url},
        "object_store": {"kind": "local", "path": str(root / "objects")},
        # A zero window: streaks grow as soon as a batch's audits pass.
        "audit": {"in_process": audits, "window_s": 0.0, "poll_s": 0.05},
        "runs": [
            {
                "run_id": "r1",
                "trainer_public_key": keys["trainer_hex"],
                "base_model_id": BASE_MODEL,
                "tokenizer_path": str(assets["tokenizer"]),
                "tokenizer_sha256": TOKENIZER_SHA,
                "tasks_path": str(assets["tasks"]),
                "group_size": G,
                "max_policy_lag": 1,
                "max_new_tokens": MAX_NEW_TOKENS,
                "max_tasks_per_lease": tasks_per_batch,
            }
        ],
    }


# ---------------------------------------------------------------- PostgreSQL


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return str(candidates[-1]) if candidates else None


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--", *command]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Postgres:
    """A private PostgreSQL server with its durable defaults."""

    pg_ctl: str
    data: Path
    root: Path
    port: int

    @classmethod
    def start(cls) -> Postgres | None:
        initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            return None
        root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        data, sockets = root / "data", root / "sock"
        sockets.mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (root, sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        port = _free_port()
        subprocess.run(
            _as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E",
                          "UTF8", "--no-sync", "--no-instructions"]),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=200"
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"),
                          "-w", "-t", "60", "start"]),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return cls(pg_ctl, data, root, port)

    def create_database(self) -> str:
        import psycopg

        name = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- server process


def _server_main(overrides: dict[str, Any], conn: Connection, profile: str | None) -> None:
    """The coordinator process: serve until the parent says stop."""
    import cProfile

    profiler = cProfile.Profile() if profile else None

    async def serve() -> None:
        from coderepair.coordinator.config import load_config
        from coderepair.coordinator.service.server import Coordinator, tune_serving_process

        coordinator = Coordinator(load_config(None, overrides), seed=0)
        try:
            await coordinator.start()
        except Exception as exc:
            conn.send(f"error: {type(exc).__name__}: {exc}")
            raise
        tune_serving_process()  # as `Coordinator.run` (coderepair-coordinator serve) does
        conn.send(coordinator.address)
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "profile-on" and profiler is not None:
                profiler.enable()
            elif command == "profile-off" and profiler is not None:
                profiler.disable()
            elif command == "stop":
                break
            elif command == "cpu":
                # Every thread of the process (the event loop, database and I/O threads)
                # and its batch-preparing helpers.
                conn.send(time.process_time() + _cpu_of(coordinator.preparer.pids()))
                continue
            conn.send("ok")
        await coordinator.shutdown()

    asyncio.run(serve())
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    conn.send("stopped")


def _cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) the live processes `pids` have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            # Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


class Server:
    """A coordinator in its own process."""

    def __init__(self, overrides: dict[str, Any], profile: str | None) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_server_main, args=(overrides, child, profile))
        self._process.start()
        self.address: str = self._conn.recv()
        if self.address.startswith("error:"):
            self._process.join(30)
            raise RuntimeError(f"the coordinator did not start: {self.address}")

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def command(self, what: str) -> Any:
        self._conn.send(what)
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        with contextlib.suppress(EOFError):
            self._conn.recv()
        self._process.join(30)


class Replicas:
    """`n` coordinators on one database sharing one port (`server.reuse_port`): the
    kernel spreads the workers' connections across them, and each replica's event loop
    has a core of its own; a worker's lease and its submit travel over its one channel,
    so they reach the same replica. One replica is a plain coordinator."""

    def __init__(self, overrides: dict[str, Any], n: int, profile: str | None) -> None:
        def with_server(**server: Any) -> dict[str, Any]:
            return {**overrides, "server": {**overrides["server"], **server}}

        first = Server(with_server(reuse_port=n > 1), profile)
        self._servers = [first]
        try:
            for _ in range(n - 1):
                self._servers.append(
                    Server(with_server(reuse_port=True, listen=first.address), None)
                )
        except BaseException:
            self.stop()
            raise
        self.address = first.address

    @property
    def pid(self) -> int | None:
        return self._servers[0].pid

    def command(self, what: str) -> Any:
        answers = [server.command(what) for server in self._servers]
        # CPU time of all replicas together: the deployment's cost per batch.
        return sum(answers) if what == "cpu" else answers[0]

    def stop(self) -> None:
        for server in self._servers:
            server.stop()


# ---------------------------------------------------------------- client processes


def _signed(identity: Any, method: str, payload: Any) -> bytes:
    from coderepair.protocol import rpc

    purpose = rpc.SIGNED_RPCS[method].purpose
    data: bytes = identity.sign(purpose, payload.SerializeToString()).to_bytes()
    return data


def _samples(lease: Any) -> list[Any]:
    """G structurally valid samples of the lease's task: random 200-token completions
    (unique, so the duplicate check passes), logprobs, proofs of the right size."""
    from coderepair.protocol.proofs import proof_size
    from coderepair.v1 import common_pb2

    chunks = 1 + math.ceil(COMPLETION_TOKENS / 32)
    proof = bytes(proof_size() * chunks)
    samples = []
    for task in lease.tasks:
        for index in range(lease.group_size):
            ids = [3 + b for b in secrets.token_bytes(COMPLETION_TOKENS)]
            samples.append(
                common_pb2.RolloutSample(
                    task_id=task.task_id,
                    sample_index=index,
                    seed=task.seeds[index],
                    prompt_token_ids=task.prompt_token_ids,
                    completion_token_ids=ids,
                    behaviour_logprobs=[-0.25 - (i % 7) / 8 for i in range(COMPLETION_TOKENS)],
                    completion_text="<solution>\n" + "x = 1\n" * 120 + "</solution>",
                    patch="### sol.py\n<<<<<<< SEARCH\n    return x + 1\n=======\n"
                    "    return x\n>>>>>>> REPLACE\n",
                    reward=0.0,
                    reward_components={"fail": 0.0},
                    test_log_sha256=secrets.token_hex(32),
                    proof=proof,
                    finish_reason=common_pb2.FINISH_REASON_STOP,
                    timings=common_pb2.SampleTimings(generate_ms=900, reward_ms=300, proof_ms=5),
                )
            )
    return samples


async def _client_async(  # noqa: PLR0917  (the argument list of a spawned process)
    address: str,
    key_paths: list[str],
    per_worker: int,
    register: bool,
    interval: float,
    ready: Barrier,
    go: Event,
    tasks_per_batch: int = 1,
) -> dict[str, Any]:
    import random

    import grpc

    from coderepair.protocol import rpc
    from coderepair.protocol.identity import Identity
    from coderepair.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    identities = [Identity.load(p) for p in key_paths]
    channels = [
        grpc.aio.insecure_channel(address, options=rpc.channel_options()) for _ in key_paths
    ]
    stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    method = "/" + rpc.WORKER_SERVICE + "/"
    if register:
        payload = worker_pb2.RegisterPayload(
            display_name="bench worker",
            client_version="0.1.0",
            capabilities=common_pb2.WorkerCapabilities(engine="hf", max_concurrent_samples=16),
        )
        await asyncio.gather(
            *(
                stub.Register(
                    worker_pb2.RegisterRequest(envelope=_signed(me, method + "Register", payload))
                )
                for me, stub in zip(identities, stubs, strict=True)
            )
        )

    async def prepare(me: Any, stub: Any) -> list[bytes]:
        payloads = []
        lease_payload = worker_pb2.LeasePayload(run_id="r1", max_tasks=tasks_per_batch)
        for _ in range(per_worker):
            for _attempt in range(100):
                answer = await stub.LeaseTasks(
                    worker_pb2.LeaseTasksRequest(
                        envelope=_signed(me, method + "LeaseTasks", lease_payload)
                    )
                )
                if answer.HasField("lease") and len(answer.lease.tasks) == tasks_per_batch:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the coordinator had no task to lease: raise N_TASKS")
            lease = answer.lease
            submit = worker_pb2.SubmitPayload(
                lease_id=lease.lease_id,
                idempotency_key=uuid.uuid4().hex,
                policy_version=lease.policy_version,
                samples=_samples(lease),
            )
            payloads.append(submit.SerializeToString())
        return payloads

    prepared = await asyncio.gather(
        *(prepare(me, stub) for me, stub in zip(identities, stubs, strict=True))
    )
    request_bytes = sum(len(p) for p in prepared[0][:1])
    latencies: list[float] = []
    sent: list[float] = []  # wall-clock send times, to find the phase's busiest second
    rejected: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ready.wait)
    await loop.run_in_executor(None, go.wait)

    from coderepair.protocol.identity import Envelope  # noqa: F401  (warm import)

    purpose = rpc.SIGNED_RPCS[_SUBMIT].purpose

    async def submit_all(me: Any, stub: Any, payloads: list[bytes]) -> int:
        accepted = 0
        # Open loop when paced: each submission is due when the worker's GPU says so,
        # whatever the answers' latency. The k submissions fall at uniformly random
        # times of the window [0, k * interval), which is a Poisson process of the
        # worker's rate given k arrivals (so Poisson arrivals in all, over a window of
        # known length): fixed gaps would replay the same clumps of arrivals in every
        # cycle, and p99 would be those few clumps' alone.
        start = time.perf_counter()
        window = interval * len(payloads)
        dues = sorted(start + random.uniform(0, window) for _ in payloads)
        for data, due in zip(payloads, dues, strict=True):
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            # Signed now: a fresh nonce and timestamp the server must verify.
            request = worker_pb2.SubmitRolloutsRequest(envelope=me.sign(purpose, data).to_bytes())
            sent.append(time.time())
            start = time.perf_counter()
            answer = await stub.SubmitRollouts(request)
            latencies.append(time.perf_counter() - start)
            if answer.accepted:
                accepted += 1
            else:
                name = common_pb2.RejectionReason.Name(answer.rejection.reason)
                rejected[name] = rejected.get(name, 0) + 1
        return accepted

    done = await asyncio.gather(
        *(
            submit_all(me, stub, payloads)
            for me, stub, payloads in zip(identities, stubs, prepared, strict=True)
        )
    )
    end = time.time()
    for channel in channels:
        await channel.close()
    return {
        "accepted_batches": sum(done),
        "latencies": latencies,
        "rejected": rejected,
        "end": end,
        "payload_bytes": request_bytes,
        "sent": sent,
    }


def _client_main(  # noqa: PLR0917  (multiprocessing passes positional args)
    address: str,
    key_paths: list[str],
    per_worker: int,
    register: bool,
    interval: float,
    ready: Barrier,
    go: Event,
    results: Any,
    tasks_per_batch: int,
) -> None:
    try:
        results.put(
            asyncio.run(
                _client_async(
                    address, key_paths, per_worker, register, interval, ready, go, tasks_per_batch
                )
            )
        )
    except BaseException as exc:
        ready.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


# ---------------------------------------------------------------- phases


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _busiest_second(times: list[float]) -> int:
    """The most of `times` that fall in any one-second window."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(ordered):
        while t - ordered[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def run_phase(
    server: Replicas,
    key_paths: list[Path],
    n_workers: int,
    n_batches: int,
    *,
    register: bool,
    paced: bool = False,
    profile: bool = False,
    tasks_per_batch: int = 1,
) -> dict[str, Any]:
    """Lease and prepare, then submit every batch with `n_workers` concurrent workers:
    back to back (the most the coordinator takes), or `paced` so that all workers
    together offer `TARGET_ROLLOUTS` rollouts/s (open loop: latency at that load)."""
    per_batch = G * tasks_per_batch
    rate = TARGET_ROLLOUTS / per_batch if paced else None
    ctx = mp.get_context("spawn")
    n_procs = min(CLIENT_PROCESSES, n_workers)
    per_worker = max(1, n_batches // n_workers)
    interval = n_workers / rate if rate else 0.0
    ready, go, results = ctx.Barrier(n_procs + 1), ctx.Event(), ctx.Queue()
    keys = [str(p) for p in key_paths[:n_workers]]
    procs = [
        ctx.Process(
            target=_client_main,
            args=(
                server.address,
                keys[i::n_procs],
                per_worker,
                register,
                interval,
                ready,
                go,
                results,
                tasks_per_batch,
            ),
        )
        for i in range(n_procs)
    ]
    for proc in procs:
        proc.start()
    ready.wait(timeout=300)
    if profile:
        server.command("profile-on")
    time.sleep(0.2)  # let the client processes park on `go`
    cpu_before = server.command("cpu")
    started = time.time()
    go.set()
    outcomes = [results.get(timeout=300) for _ in procs]
    server_cpu = server.command("cpu") - cpu_before
    if profile:
        server.command("profile-off")
    for proc in procs:
        proc.join(30)
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise RuntimeError(f"a client process failed: {errors[0]}")
    elapsed = max(o["end"] for o in outcomes) - started
    latencies = [x for o in outcomes for x in o["latencies"]]
    accepted = sum(o["accepted_batches"] for o in outcomes)
    rejected: dict[str, int] = {}
    for o in outcomes:
        for name, count in o["rejected"].items():
            rejected[name] = rejected.get(name, 0) + count
    return {
        "workers": n_workers,
        "rollouts_per_batch": per_batch,
        "offered_rollouts_per_s": round(rate * per_batch, 1) if rate else None,
        "batches": len(latencies),
        "accepted_batches": accepted,
        "rejected": rejected,
        "seconds": round(elapsed, 3),
        "rollouts_per_s": round(accepted * per_batch / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        # Server CPU per batch (all its threads): what a dedicated core would give,
        # whatever else this shared machine runs at the time.
        "server_cpu_ms_per_batch": round(server_cpu * 1000 / max(1, accepted), 2),
        "rollouts_per_server_cpu_s": (
            round(accepted * per_batch / server_cpu, 1) if server_cpu else None
        ),
        "payload_bytes": outcomes[0]["payload_bytes"],
        # Arrivals in the busiest second, against accepted / elapsed on average.
        "busiest_second_batches": _busiest_second([t for o in outcomes for t in o["sent"]]),
        "mean_batches_per_s": round(accepted / elapsed, 1),
    }


def publish_policy(address: str, keys: dict[str, Any], shards: Path) -> None:
    import grpc

    from coderepair.protocol import rpc
    from coderepair.protocol.identity import Identity
    from coderepair.protocol.manifest import build_manifest_for_dir, sign_manifest
    from coderepair.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

    trainer = Identity.load(keys["trainer"])
    manifest = build_manifest_for_dir(
        shards, run_id="r1", version=1, base_model=BASE_MODEL, tokenizer_sha256=TOKENIZER_SHA,
        kind="full", trainer_key=trainer.public_key,
    )  # fmt: skip
    payload = trainer_pb2.PublishPayload(
        run_id="r1",
        version=1,
        manifest_json=sign_manifest(manifest, trainer).to_bytes(),
        shards=[
            common_pb2.ShardLocation(
                name=s.name, urls=[(shards / s.name).as_uri()], size_bytes=s.size, sha256=s.sha256
            )
            for s in manifest.shards
        ],
        trainer_step=1,
    )
    method = f"/{rpc.TRAINER_SERVICE}/PublishPolicy"
    with grpc.insecure_channel(address, options=rpc.channel_options()) as channel:
        answer = trainer_pb2_grpc.TrainerServiceStub(channel).PublishPolicy(
            trainer_pb2.PublishPolicyRequest(envelope=_signed(trainer, method, payload))
        )
    if not answer.accepted:
        raise RuntimeError(f"policy not published: {answer.rejection.message}")


def audit_counts(url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql+psycopg", "postgresql+psycopg"))
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT state, count(*) FROM audit_jobs GROUP BY state"))
            return {str(state): int(n) for state, n in rows}
    finally:
        engine.dispose()


def _pending(counts: dict[str, int]) -> int:
    return sum(n for state, n in counts.items() if state.lower() in ("pending", "claimed"))


def _finished(counts: dict[str, int]) -> int:
    return sum(n for state, n in counts.items() if state.lower() not in ("pending", "claimed"))


def bench_database(  # noqa: PLR0917
    label: str,
    url_factory: Any,
    root: Path,
    assets: dict[str, Path],
    keys: dict[str, Any],
    batches: dict[int | str, int],
    profile_dir: Path | None,
    only_ingest: bool = False,
    replicas: int = 1,
    tasks_per_batch: int = 1,
    prepare_processes: int = 1,
) -> dict[str, Any]:
    """Audits off: the most each worker count gets ingested (back to back), then the
    latency at the target load (paced), then, where the coordinator has helpers, the
    200-worker paced phase again on one without (side by side); audits on: 200 paced
    workers, then the drain."""
    out: dict[str, Any] = {"phases": [], "paced": [], "paced_without_helpers": None}
    url = url_factory()
    prof = str(profile_dir / f"{label}.prof") if profile_dir else None

    def overrides(name: str, url: str, audits: bool, helpers: int) -> dict[str, Any]:
        return coordinator_overrides(
            root / f"{label}-{name}", assets, keys, url, audits, tasks_per_batch, helpers
        )

    server = Replicas(overrides("off", url, False, prepare_processes), replicas, prof)
    try:
        publish_policy(server.address, keys, assets["shards"])
        registered = 0
        for n in WORKER_COUNTS:
            phase = run_phase(
                server, keys["workers"], n, batches[n], register=n > registered,
                profile=prof is not None and n == WORKER_COUNTS[-1],
                tasks_per_batch=tasks_per_batch,
            )  # fmt: skip
            registered = max(registered, n)
            out["phases"].append(phase)
            print(f"  {label:10s} audits off {_row(phase)}", file=sys.stderr, flush=True)
            if os.environ.get("BENCH_SERVER_PID_FILE"):
                Path(os.environ["BENCH_SERVER_PID_FILE"]).write_text(str(server.pid))
        for n in PACED_WORKER_COUNTS:
            phase = run_phase(
                server, keys["workers"], n, batches["paced"], register=False, paced=True,
                tasks_per_batch=tasks_per_batch,
            )  # fmt: skip
            out["paced"].append(phase)
            print(f"  {label:10s} audits off {_row(phase)}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    if prepare_processes:
        server = Replicas(overrides("nohelpers", url_factory(), False, 0), replicas, None)
        try:
            publish_policy(server.address, keys, assets["shards"])
            phase = run_phase(
                server, keys["workers"], PACED_WORKER_COUNTS[-1], batches["paced"],
                register=True, paced=True, tasks_per_batch=tasks_per_batch,
            )  # fmt: skip
            out["paced_without_helpers"] = phase
            print(f"  {label:10s} no helpers {_row(phase)}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    if only_ingest:
        return out
    url = url_factory()
    server = Replicas(overrides("on", url, True, prepare_processes), replicas, None)
    try:
        publish_policy(server.address, keys, assets["shards"])
        n = WORKER_COUNTS[-1]
        before = audit_counts(url)
        phase = run_phase(
            server, keys["workers"], n, batches["paced"], register=True, paced=True,
            tasks_per_batch=tasks_per_batch,
        )  # fmt: skip
        after = audit_counts(url)
        print(f"  {label:10s} audits on  {_row(phase)}", file=sys.stderr, flush=True)
        during = _finished(after) - _finished(before)
        drain_start, backlog = time.time(), _pending(after)
        start_done = _finished(after)
        counts = after
        while _pending(counts) and time.time() - drain_start < AUDIT_DRAIN_LIMIT_S:
            time.sleep(0.25)
            counts = audit_counts(url)
        drain_s = time.time() - drain_start
        drained = _finished(counts) - start_done
        out["audit_on"] = phase
        out["audits"] = {
            "jobs_queued": _pending(after) + _finished(after),
            "finished_during_ingest": during,
            "per_s_during_ingest": round(during / phase["seconds"], 1),
            "backlog_after_ingest": backlog,
            "drain_seconds": round(drain_s, 2),
            "per_s_draining": round(drained / drain_s, 1) if drain_s > 0 and drained else 0.0,
            "left_pending": _pending(counts),
            "states": counts,
        }
    finally:
        server.stop()
    return out


# ---------------------------------------------------------------- Parquet encode


ARROW_POOLS = ("mimalloc", "jemalloc", "system")


def _encode_probe(pool: str, n: int, tasks_per_batch: int, results: Any) -> None:
    """In a fresh process on Arrow pool `pool`: encode one checked batch `n` times the
    way the submit path does (`CheckedBatch.parquet_bytes`); per-encode CPU times."""
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = pool  # read when pyarrow is imported
    from coderepair.coordinator.service.validation import LeaseView, check_batch
    from coderepair.coordinator.service.wire import SubmitView
    from coderepair.coordinator.storage.models import Lease, LeaseState
    from coderepair.coordinator.storage.repo import LeaseTask
    from coderepair.protocol.reward import RewardSpec
    from coderepair.v1 import worker_pb2

    @dataclass
    class _Task:
        task_id: str
        seeds: list[int]
        prompt_token_ids: list[int]

    @dataclass
    class _Lease:
        tasks: list[_Task]
        group_size: int = G

    tasks = [
        _Task(
            f"t{k}", list(range(100 * k, 100 * k + G)), [3 + (7 * i + k) % 250 for i in range(700)]
        )
        for k in range(tasks_per_batch)
    ]
    raw = worker_pb2.SubmitPayload(
        lease_id="L1", idempotency_key="k" * 16, policy_version=1, samples=_samples(_Lease(tasks))
    ).SerializeToString()
    lease = Lease(
        lease_id="L1",
        run_id="r1",
        worker_id="w1",
        policy_version=1,
        tasks_json="[]",
        n_tasks=len(tasks),
        issued_unix_ms=0,
        deadline_unix_ms=1,
        state=LeaseState.OPEN,
    )
    view = LeaseView(
        lease=lease,
        tasks=[LeaseTask(t.task_id, t.seeds) for t in tasks],
        prompts={t.task_id: t.prompt_token_ids for t in tasks},
    )
    spec = RewardSpec()

    def checked() -> Any:
        return check_batch(
            SubmitView.FromString(raw),
            view,
            run_id="r1",
            worker_key_hex="b" * 64,
            group_size=G,
            max_new_tokens=MAX_NEW_TOKENS,
            reward_spec=spec,
            reward_spec_hash=spec.spec_hash(),
            now_ms=0,
        )

    import pyarrow as pa

    checked().parquet_bytes()  # the first encode loads Parquet's code: not a steady figure
    # Each round checks the batch afresh, as each submit does, so the pool sees the
    # submit path's pattern of allocations; only the encode is timed. CPU time, not wall
    # time: on a shared machine a wall-clock tail is mostly the scheduler, while the
    # allocator's stalls are CPU spent.
    times = []
    for _ in range(n):
        batch = checked()
        start = time.process_time()
        batch.parquet_bytes()
        times.append(time.process_time() - start)
    results.put({"pool": pa.default_memory_pool().backend_name, "times": times})


def bench_parquet_pools(n: int, tasks_per_batch: int) -> dict[str, Any]:
    """The Parquet encoding of one batch on each Arrow memory pool, one process each:
    the medians are alike; the tails differ on some machines (`steady_arrow_memory_pool`)."""
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {}
    for pool in ARROW_POOLS:
        results = ctx.Queue()
        proc = ctx.Process(target=_encode_probe, args=(pool, n, tasks_per_batch, results))
        proc.start()
        got = results.get(timeout=600)
        proc.join(30)
        times = got["times"]
        out[pool] = {
            "backend": got["pool"],
            "encodes": len(times),
            "p50_ms": round(_percentile(times, 0.50) * 1000, 2),
            "p999_ms": round(_percentile(times, 0.999) * 1000, 2),
            "max_ms": round(max(times) * 1000, 2),
            "over_20_ms": sum(t > 0.020 for t in times),
        }
        print(f"  parquet encode on {pool:9s} {out[pool]}", file=sys.stderr, flush=True)
    return out


def _insert_times(engine: Any, insert_rows: Callable[[Any], Any], n: int) -> list[float]:
    from sqlalchemy import delete

    from coderepair.coordinator.storage.models import Rollout

    times = []
    for _ in range(n):
        started = time.perf_counter()
        with engine.begin() as connection:
            insert_rows(connection)
        times.append(time.perf_counter() - started)
        with engine.begin() as connection:
            connection.execute(delete(Rollout.__table__))
    return times


def bench_rollout_insert(n: int, per_batch: int) -> dict[str, Any]:
    """One batch's rollout rows committed on SQLite, as one multi-row INSERT (what
    `storage.batches` sends) vs the driver's executemany, alone and beside one
    CPU-bound thread: sqlite3 hands the GIL over at every statement step, and a thread
    taking it back from a busy one waits up to a switch interval (5 ms) each time.

    The effect needs the busy thread on a core of its own: on an otherwise idle machine
    executemany took 5-7x longer beside it; in one quick run beside the test suite, with
    both cores taken by other processes, it was the faster of the two."""
    import threading

    from sqlalchemy import event, insert

    from coderepair.coordinator.storage import batches
    from coderepair.coordinator.storage.db import make_engine
    from coderepair.coordinator.storage.migrate import upgrade_to_head
    from coderepair.coordinator.storage.models import Rollout

    folder = Path(tempfile.mkdtemp(prefix="bench-insert-"))
    engine = make_engine(f"sqlite:///{folder / 'insert.db'}", pool_size=1)
    upgrade_to_head(engine)
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _no_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
        # After the coordinator's own set-up: the rows' run and batch need not exist.
        dbapi_connection.execute("PRAGMA foreign_keys = OFF")

    rows = [
        {
            "run_id": "r1",
            "cursor": 1 + i,
            "batch_id": "b" * 32,
            "row_index": i,
            "task_id": f"t{i // G}",
            "sample_index": i % G,
            "worker_id": "w" * 64,
            "policy_version": 0,
            "completion_sha256": f"{i:064x}",
            "n_completion_tokens": COMPLETION_TOKENS,
            "reward": 1.0,
            "accepted_unix_ms": 0,
            "voided": False,
        }
        for i in range(per_batch)
    ]
    as_tuples = [tuple(row[c] for c in batches._ROLLOUT_COLUMNS) for row in rows]
    forms: dict[str, Callable[[Any], Any]] = {
        "one_statement": lambda c: batches._insert_rollouts(c, as_tuples),
        "executemany": lambda c: c.execute(insert(Rollout.__table__), rows),
    }
    out: dict[str, Any] = {}
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    try:
        for beside in ("alone", "beside_busy_thread"):
            spinner = threading.Thread(target=spin) if beside != "alone" else None
            if spinner is not None:
                spinner.start()
            for form, insert_rows in forms.items():
                times = _insert_times(engine, insert_rows, n)
                out[f"{form}_{beside}_p50_ms"] = round(_percentile(times, 0.5) * 1000, 2)
            if spinner is not None:
                stop.set()
                spinner.join()
    finally:
        engine.dispose()
        shutil.rmtree(folder, ignore_errors=True)
    out["executemany_over_one_statement_beside_busy"] = round(
        out["executemany_beside_busy_thread_p50_ms"]
        / max(out["one_statement_beside_busy_thread_p50_ms"], 1e-9),
        1,
    )
    print(f"  rollout insert {out}", file=sys.stderr, flush=True)
    return out


def _row(p: dict[str, Any]) -> str:
    rej = f" rejected={p['rejected']}" if p["rejected"] else ""
    offered = p["offered_rollouts_per_s"]
    mode = f"paced {offered:.0f}/s" if offered else "back to back"
    burst = (
        f" busiest 1 s: {p['busiest_second_batches']} batches (mean {p['mean_batches_per_s']})"
        if offered
        else ""
    )
    return (
        f"{mode:>14s} {p['workers']:4d} workers {p['batches']:5d} batches {p['seconds']:6.2f}s "
        f"{p['rollouts_per_s']:8.1f} rollouts/s p50 {p['p50_ms']:7.2f} ms "
        f"p99 {p['p99_ms']:7.2f} ms cpu {p['server_cpu_ms_per_batch']:5.2f} ms/batch{burst}{rej}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    parser.add_argument("--only", choices=["sqlite", "postgresql"], help="one database only")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of the server here")
    parser.add_argument(
        "--only-ingest", action="store_true", help="leave out the audit-on phase (profiling)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="coordinator processes on one database sharing one port (default 1)",
    )
    parser.add_argument(
        "--tasks-per-batch",
        type=int,
        default=1,
        help=f"tasks per lease, so {G} x K rollouts per batch (default 1)",
    )
    parser.add_argument(
        "--prepare-processes",
        type=int,
        default=1,
        help="the coordinator's server.prepare_processes (default 1, as deploy/coordinator.toml);"
        " above 0, the 200-worker paced phase also runs on a coordinator without helpers",
    )
    args = parser.parse_args()
    if args.prepare_processes < 0:
        parser.error(f"--prepare-processes must be at least 0, got {args.prepare_processes}")
    if args.replicas < 1:
        parser.error(f"--replicas must be at least 1, got {args.replicas}")
    if not 1 <= args.tasks_per_batch <= 16:
        parser.error(f"--tasks-per-batch must be 1..16, got {args.tasks_per_batch}")
    batches = QUICK_BATCHES if args.quick else BATCHES
    t0 = time.time()
    root = Path(tempfile.mkdtemp(prefix="bench-coordinator-"))
    postgres: Postgres | None = None
    results: dict[str, Any] = {}
    try:
        # Every prepared lease holds its tasks until its batch is in.
        assets = build_assets(root, N_TASKS * args.tasks_per_batch)
        keys = make_keys(root, max(WORKER_COUNTS))
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        databases: list[tuple[str, Any]] = []
        if args.only != "postgresql":
            databases.append(("sqlite", lambda: f"sqlite:///{root}/db-{uuid.uuid4().hex[:8]}.db"))
        if args.only != "sqlite":
            postgres = Postgres.start()
            if postgres is None:
                print("PostgreSQL binaries not found: skipping it", file=sys.stderr)
            else:
                databases.append(("postgresql", postgres.create_database))
        for label, factory in databases:
            results[label] = bench_database(
                label,
                factory,
                root,
                assets,
                keys,
                batches,
                args.profile,
                args.only_ingest,
                args.replicas,
                args.tasks_per_batch,
                args.prepare_processes,
            )
    finally:
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(root, ignore_errors=True)
    pools = bench_parquet_pools(QUICK_ENCODES if args.quick else ENCODES, args.tasks_per_batch)
    insert = bench_rollout_insert(10 if args.quick else 30, G * args.tasks_per_batch)
    print_report(
        results,
        G * args.tasks_per_batch,
        time.time() - t0,
        args.replicas,
        pools=pools,
        insert=insert,
        prepare_processes=args.prepare_processes,
    )


def _target_met(p: dict[str, Any]) -> bool:
    """At least 98% of the offered rate ingested (open loop: the window also holds the
    last answers' latency) and p99 under the target."""
    return bool(
        p["rollouts_per_s"] >= 0.98 * TARGET_ROLLOUTS
        and p["p99_ms"] < TARGET_P99_MS
        and p["accepted_batches"] == p["batches"]
    )


def _cells(p: dict[str, Any]) -> str:
    return (
        f" | {p['rollouts_per_s']:>10.1f} {p['p50_ms']:>9.2f} {p['p99_ms']:>9.2f}"
        f" {p['rollouts_per_server_cpu_s'] or 0:>10.0f}"
    )


def print_report(
    results: dict[str, Any],
    per_batch: int,
    total_s: float,
    replicas: int = 1,
    *,
    pools: dict[str, Any] | None = None,
    insert: dict[str, Any] | None = None,
    prepare_processes: int = 1,
) -> None:
    labels = list(results)
    print(
        f"\nCoordinator ingest: {per_batch} rollouts/batch, {COMPLETION_TOKENS} completion "
        "tokens, one SubmitRollouts per batch, every batch accepted and committed before "
        f"its answer; {replicas} coordinator replica(s) sharing the port, "
        f"{prepare_processes} batch-preparing helper process(es) each"
    )
    header = f"{'workers':>22}" + "".join(
        f" | {label[:10] + ' r/s':>14} {'p50 ms':>9} {'p99 ms':>9} {'r/cpu-s':>10}"
        for label in labels
    )
    print(header)
    print("-" * len(header))
    for i, n in enumerate(WORKER_COUNTS):
        print(f"{'back to back':>13} {n:>8}" + "".join(
            _cells(results[label]["phases"][i]) for label in labels))  # fmt: skip
    for i, n in enumerate(PACED_WORKER_COUNTS):
        print(f"{f'paced {TARGET_ROLLOUTS}/s':>13} {n:>8}" + "".join(
            _cells(results[label]["paced"][i]) for label in labels))  # fmt: skip
    n = PACED_WORKER_COUNTS[-1]
    if any(results[label].get("paced_without_helpers") for label in labels):
        print(f"{'no helpers':>13} {n:>8}" + "".join(
            _cells(results[label]["paced_without_helpers"]) for label in labels))  # fmt: skip
    print("r/s: ingested rollouts per wall second; r/cpu-s: per second of server CPU time, "
          "helpers included (the rate one dedicated core would sustain)")  # fmt: skip
    verdicts = {label: _target_met(results[label]["paced"][-1]) for label in labels}
    print(f"target at {n} workers paced ({TARGET_ROLLOUTS} r/s, p99 < {TARGET_P99_MS:.0f} ms): "
          + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in verdicts.items()))  # fmt: skip
    print(f"\nAudit loop on vs off ({n} workers paced at {TARGET_ROLLOUTS} rollouts/s; fresh "
          "keys, so every batch is audited)")  # fmt: skip
    for label in labels:
        if "audit_on" not in results[label]:
            print(f"  {label:10s} not measured (--only-ingest)")
            continue
        off, on, audits = (
            results[label]["paced"][-1],
            results[label]["audit_on"],
            results[label]["audits"],
        )
        print(
            f"  {label:10s} off {off['rollouts_per_s']:7.1f} r/s p99 {off['p99_ms']:7.2f} ms"
            f" | on {on['rollouts_per_s']:7.1f} r/s p99 {on['p99_ms']:7.2f} ms"
            f" | audits {audits['per_s_during_ingest']:6.1f}/s during ingest, "
            f"{audits['per_s_draining']:6.1f}/s draining ({audits['backlog_after_ingest']} "
            f"backlog, {audits['left_pending']} left)"
        )
    if pools:
        print(
            f"\nParquet encode of one {per_batch}-rollout batch, per Arrow memory pool "
            "(CPU time; one process each; the coordinator uses jemalloc, else system)"
        )
        for pool, p in pools.items():
            print(
                f"  {pool:9s} p50 {p['p50_ms']:6.2f} ms  p99.9 {p['p999_ms']:7.2f} ms  "
                f"max {p['max_ms']:7.2f} ms  {p['over_20_ms']} of {p['encodes']} over 20 ms"
            )
    if insert:
        print(
            f"\nOne batch's {per_batch} rollout rows committed on SQLite (p50, ms): "
            f"one multi-row INSERT {insert['one_statement_alone_p50_ms']:.2f} alone, "
            f"{insert['one_statement_beside_busy_thread_p50_ms']:.2f} beside a CPU-bound "
            f"thread; the driver's executemany {insert['executemany_alone_p50_ms']:.2f} "
            f"alone, {insert['executemany_beside_busy_thread_p50_ms']:.2f} beside it "
            f"({insert['executemany_over_one_statement_beside_busy']}x)"
        )
    print(f"\ntotal bench time {total_s:.0f} s")
    summary = {
        "parquet_encode_by_pool": pools,
        "rollout_insert_sqlite": insert,
        "group_size": G,
        "rollouts_per_batch": per_batch,
        "replicas": replicas,
        "completion_tokens": COMPLETION_TOKENS,
        "target_rollouts_per_s": TARGET_ROLLOUTS,
        "target_p99_ms": TARGET_P99_MS,
        "prepare_processes": prepare_processes,
        "total_s": round(total_s, 1),
        **{
            label: {
                "back_to_back": {str(p["workers"]): p for p in r["phases"]},
                "paced": {str(p["workers"]): p for p in r["paced"]},
                "paced_200_without_helpers": r.get("paced_without_helpers"),
                "target_met_paced_200": verdicts[label],
                "audit_on_paced_200": r.get("audit_on"),
                "audits": r.get("audits"),
            }
            for label, r in results.items()
        },
    }
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()

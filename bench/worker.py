"""Worker efficiency: the real work loop's completion tokens/s ÷ the engine's alone.

What is measured. A real coordinator runs in its own process (spawned, as
`coderepair-coordinator serve` would run it: gRPC on loopback, SQLite, local object store,
the consistency auditor), so its CPU is not the worker's event loop's. The tiny test
model (and SmolLM2-135M-Instruct when its GGUF is installed) is published to it as a
signed full policy. In this process the worker's own pieces run exactly as `join` wires
them: `CoordinatorClient`, `PolicyWeights` (download and verify the policy),
`PolicyHolder`, the HF engine, the sandbox `select_sandbox` finds (Docker, else
bubblewrap) and the pipelined `WorkLoop` (lease → generate → verify in the sandbox →
prove → submit a signed batch), until ``--leases`` batches were accepted.

* **end to end**: completion tokens of the first N accepted batches ÷ wall time from the
  loop's start to the N-th ``batch_accepted``;
* **engine only**: the very request lists the loop's engine got for those N leases
  (recorded by a thin `HFEngine` subclass that times each real ``generate`` call), given
  again to the same engine, same model, same batch, one after the other;
* **efficiency** = end to end ÷ engine only (target ≥ 0.9).

Where the rest goes, per model: the engine's busy share of the loop's wall time (the
loop's own cost between generations: lease RPCs, queue hand-offs, the pipeline's tail)
and the in-loop slowdown of ``generate`` itself (what the verify and submit stages,
running meanwhile, take from it on this machine's cores).

Two variants per model, side by side: the engine **as shipped**, and with torch's thread
count **pinned per call** (``torch.set_num_threads`` at the start of every ``generate``).
The count is OpenMP's per OS thread: ``load`` sets it in the thread that loads, the loop
generates in asyncio's executor threads, and a matmul of the tiny model's size ran 3-9x
slower in a thread that never set it than in one that did, on this 2-core machine.

Torch runs on ``--threads`` threads (default 1: the shared 2-core machine this was
written on). The tiny model writes no well-formed patch, so its rollouts take the spec's
malformed reward without a sandbox job; the table says how many sandbox jobs ran.

Origin egress (one new version delivered to 8 workers with and without peers) is
measured by bench/worker_egress.py; its figure is merged here later (``"egress": null``).

Run: .venv/bin/python bench/worker.py [--leases N] [--no-smollm2]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from coderepair.protocol import rpc
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import build_manifest_for_dir, sign_manifest
from coderepair.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from coderepair.worker.engines.base import Generation, GenerationRequest
from coderepair.worker.engines.hf import HFEngine

TOKENIZER_SHA = "d" * 64
RUN_ID = "bench"
TARGET = 0.9


# ---------------------------------------------------------------- the coordinator


def _coordinator_config(root: Path, model: Path, trainer_hex: str, port: int, **run: Any) -> dict:
    return {
        "server": {"listen": f"127.0.0.1:{port}", "heartbeat_interval_s": 5.0},
        "database": {"url": f"sqlite:///{root / 'coordinator.db'}"},
        "object_store": {"kind": "local", "path": str(root / "objects")},
        "audit": {"auditor": "consistency", "poll_s": 0.5},
        "dashboard": {"enabled": False},
        "runs": [
            {
                "run_id": RUN_ID,
                "trainer_public_key": trainer_hex,
                "base_model_id": str(model),
                "tokenizer_path": str(model),
                "tokenizer_sha256": TOKENIZER_SHA,
                "tasks_path": str(root / "tasks.jsonl"),
                "max_policy_lag": 1,
                "lease_ttl_s": 600,
                **run,
            }
        ],
    }


def _serve(config: dict, stop: Any) -> None:
    """Child process: a coordinator serving until ``stop`` (an mp.Event) is set."""
    from coderepair.coordinator.config import load_config
    from coderepair.coordinator.service.server import Coordinator

    async def main() -> None:
        coordinator = Coordinator(load_config(None, config), seed=0)
        await coordinator.start()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await coordinator.shutdown(grace_s=1.0)

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_serving(address: str, proc: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 120
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not proc.is_alive():
                raise RuntimeError(f"the coordinator exited with code {proc.exitcode}")
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                return
            except grpc.RpcError:
                await asyncio.sleep(0.3)
    raise RuntimeError(f"the coordinator at {address} did not serve within 120 s")


async def _publish(address: str, trainer: Identity, shards: Path, base: Path) -> None:
    """Publish ``shards`` as the run's signed full policy v1 (the trainer's call)."""
    manifest = build_manifest_for_dir(
        shards,
        run_id=RUN_ID,
        version=1,
        base_model=str(base),
        tokenizer_sha256=TOKENIZER_SHA,
        kind="full",
        trainer_key=trainer.public_key,
        parent_version=None,
    )
    payload = trainer_pb2.PublishPayload(
        run_id=RUN_ID,
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
    purpose = rpc.SIGNED_RPCS[f"/{rpc.TRAINER_SERVICE}/PublishPolicy"].purpose
    envelope = trainer.sign(purpose, payload.SerializeToString()).to_bytes()
    async with grpc.aio.insecure_channel(address, options=rpc.channel_options()) as channel:
        answer = await trainer_pb2_grpc.TrainerServiceStub(channel).PublishPolicy(
            trainer_pb2.PublishPolicyRequest(envelope=envelope)
        )
    if not answer.accepted:
        raise RuntimeError(f"policy refused: {answer.rejection.message}")


# ---------------------------------------------------------------- the worker


@dataclass
class _Call:
    requests: list[GenerationRequest]
    started: float
    seconds: float
    tokens: int
    rows: int


class RecordingEngine(HFEngine):
    """The real HF engine; each ``generate`` call's requests and wall time are kept.

    ``pin_threads``: the proposed fix, tried side by side with the engine as shipped.
    ``torch.set_num_threads`` sets OpenMP's thread count of the calling OS thread only;
    `HFEngine.load` calls it in whatever thread loads, while the work loop calls
    ``generate`` from asyncio's executor threads, where OpenMP keeps one thread per core.
    Pinned, each ``generate`` sets the count in its own thread first.
    """

    def __init__(self, *, pin_threads: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pin_threads = pin_threads
        self.calls: list[_Call] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if self.pin_threads and self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        started = time.perf_counter()
        gens = super().generate(requests)
        elapsed = time.perf_counter() - started
        tokens = sum(len(g.completion_ids) for g in gens)
        self.calls.append(_Call(list(requests), started, elapsed, tokens, len(gens)))
        return gens


@dataclass
class _Recorder:
    """A `View` that only timestamps events (the bench prints its own table)."""

    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self.events.append((time.perf_counter(), kind, fields))
        self.changed.set()

    def download(self, name: str, total_bytes: int) -> None: ...

    def downloaded(self, name: str, done_bytes: int) -> None: ...

    def refresh(self) -> None: ...

    def of(self, kind: str) -> list[tuple[float, str, dict[str, Any]]]:
        return [e for e in self.events if e[1] == kind]


async def _run_loop(
    *,
    address: str,
    root: Path,
    base: Path,
    trainer_hex: str,
    leases: int,
    threads: int,
    pin_threads: bool,
) -> dict[str, Any]:
    from coderepair.worker.client import CoordinatorClient
    from coderepair.worker.loop import LoopConfig, PolicyHolder, WorkLoop
    from coderepair.worker.sandbox import SandboxLimits, select_sandbox
    from coderepair.worker.view import WorkerStats
    from coderepair.worker.weights import PolicyWeights, WeightsConfig

    identity = Identity.create(root / "worker.pem")
    engine = RecordingEngine(num_threads=threads, pin_threads=pin_threads)
    await asyncio.to_thread(engine.load, base)
    stats = WorkerStats()
    view = _Recorder()
    sandbox = await asyncio.to_thread(select_sandbox, SandboxLimits(), None, pool_size=2)
    async with CoordinatorClient(address, identity) as client:
        answer = await client.register("bench", "0.1.0", common_pb2.WorkerCapabilities())
        weights = PolicyWeights(
            WeightsConfig(trainer_key=trainer_hex, cache_dir=root / "worker-cache")
        )
        policy = PolicyHolder(client, weights, engine, run_id=RUN_ID, view=view, stats=stats)
        await policy.fetch()
        await policy.swap()
        loop = WorkLoop(
            client=client,
            engine=engine,
            sandbox=sandbox,
            policy=policy,
            config=LoopConfig(
                run_id=RUN_ID,
                max_tasks=1,
                heartbeat_s=max(0.5, answer.heartbeat_interval_ms / 1000.0),
                policy_poll_s=600.0,
            ),
            stats=stats,
            view=view,
        )
        task = asyncio.create_task(loop.run())
        try:
            while len(view.of("batch_accepted")) < leases + 1:
                if task.done():
                    task.result()
                    raise RuntimeError("the work loop ended before enough batches were accepted")
                view.changed.clear()
                await asyncio.wait_for(view.changed.wait(), 600)
                if view.events[-1][1] == "batch_accepted":
                    _note(f"  batch {len(view.of('batch_accepted'))}/{leases + 1} accepted")
        finally:
            loop.drain()
            await task
            await asyncio.to_thread(sandbox.close)
    rejected = view.of("batch_rejected")
    if rejected:
        raise RuntimeError(f"batches were rejected: {rejected[0][2]}")
    # The first lease warms the engine up (allocations, first kernels): it is left out
    # of both sides. The window opens when its generation returned, so it holds every
    # later lease's whole path: lease RPC, generate, verify, submit; it closes when the
    # last counted batch was accepted (the pipeline's tail included).
    accepted = view.of("batch_accepted")[1 : leases + 1]
    calls = engine.calls[1 : leases + 1]
    if [e[2]["rollouts"] for e in accepted] != [c.rows for c in calls]:
        raise RuntimeError("accepted batches do not match the generate calls one to one")
    first = engine.calls[0]
    wall = accepted[-1][0] - (first.started + first.seconds)
    tokens = sum(c.tokens for c in calls)

    _note("  engine-only replay of the same requests (2 passes)")
    # Engine only: the same requests again, twice, keeping the faster pass. On a shared
    # machine this errs towards a faster engine, i.e. a lower (conservative) efficiency.
    passes = []
    for _ in range(2):
        replay_s = 0.0
        replay_tokens = 0
        for call in calls:
            t0 = time.perf_counter()
            gens = HFEngine.generate(engine, call.requests)
            replay_s += time.perf_counter() - t0
            replay_tokens += sum(len(g.completion_ids) for g in gens)
        if replay_tokens != tokens:
            raise RuntimeError(f"replay made {replay_tokens} tokens, the loop {tokens}")
        passes.append(replay_s)
    replay_s = min(passes)
    in_loop_s = sum(c.seconds for c in calls)
    return {
        "leases": leases,
        "rows_per_lease": calls[0].rows,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "end_to_end_tps": round(tokens / wall, 2),
        "engine_only_tps": round(tokens / replay_s, 2),
        "efficiency": round(replay_s / wall, 4),
        "in_loop_generate_s": round(in_loop_s, 3),
        "engine_only_s": round(replay_s, 3),
        "engine_busy_share": round(in_loop_s / wall, 4),
        "in_loop_slowdown": round(in_loop_s / replay_s, 4),
        "sandbox": sandbox.name,
        "sandbox_jobs": stats.sandbox_jobs,
        "mean_reward": round(stats.mean_reward, 4),
    }


def bench_model(
    name: str, base: Path, leases: int, threads: int, pin_threads: bool, **run: Any
) -> dict[str, Any]:
    """Coordinator process + in-process worker loop on ``base``: one row of the table."""
    with tempfile.TemporaryDirectory(prefix=f"bench-worker-{name}-") as tmp:
        root = Path(tmp)
        from coderepair.coordinator.tasks.repo import load_fixtures
        from coderepair.protocol.task import TaskSet, write_taskset

        tasks = load_fixtures()
        taskset = TaskSet.from_tasks(tasks, builder_version="bench", split_rule="fixtures")
        write_taskset(taskset, root / "tasks.jsonl")
        shards = root / "policy-v1"
        shards.mkdir()
        for item in base.glob("*.safetensors"):
            shutil.copy(item, shards / item.name)
        trainer = Identity.create(root / "trainer.pem")
        port = _free_port()
        config = _coordinator_config(root, base, trainer.public_key_hex, port, **run)
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        proc = ctx.Process(target=_serve, args=(config, stop), daemon=True)
        proc.start()
        address = f"127.0.0.1:{port}"
        _note(f"{name}: coordinator starting at {address}")

        async def main() -> dict[str, Any]:
            await _wait_serving(address, proc)
            await _publish(address, trainer, shards, base)
            _note(f"{name}: policy v1 published; the worker starts")
            return await _run_loop(
                address=address,
                root=root,
                base=base,
                trainer_hex=trainer.public_key_hex,
                leases=leases,
                threads=threads,
                pin_threads=pin_threads,
            )

        try:
            variant = "threads pinned per call" if pin_threads else "as shipped"
            return {"model": name, "variant": variant, **run, **asyncio.run(main())}
        finally:
            stop.set()
            proc.join(30)
            if proc.is_alive():
                proc.kill()


# ---------------------------------------------------------------- the report


def _note(text: str) -> None:
    """Progress on stderr (stdout holds the table and the JSON line)."""
    print(text, file=sys.stderr, flush=True)


COLUMNS = (
    ("model", "model", "{}"),
    ("variant", "variant", "{}"),
    ("new tok", "max_new_tokens", "{}"),
    ("rows/lease", "rows_per_lease", "{}"),
    ("leases", "leases", "{}"),
    ("tokens", "completion_tokens", "{}"),
    ("e2e tok/s", "end_to_end_tps", "{:.1f}"),
    ("engine tok/s", "engine_only_tps", "{:.1f}"),
    ("efficiency", "efficiency", "{:.3f}"),
    ("engine busy", "engine_busy_share", "{:.3f}"),
    ("in-loop slowdown", "in_loop_slowdown", "{:.3f}"),
    ("sandbox jobs", "sandbox_jobs", "{}"),
)


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (head, _, _) in enumerate(COLUMNS)]
    print("  ".join(head.rjust(w) for (head, _, _), w in zip(COLUMNS, widths, strict=True)))
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
    print(
        "efficiency = e2e tok/s / engine tok/s (target >= 0.9); engine busy = in-loop "
        "generate time / loop wall time; in-loop slowdown = in-loop generate time / "
        "engine-only time of the same requests"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=12, help="Leases timed, tiny model.")
    parser.add_argument("--smollm2-leases", type=int, default=4, help="Leases timed, SmolLM2.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads.")
    parser.add_argument("--tiny-tokens", type=int, default=64, help="Tiny model max_new_tokens.")
    parser.add_argument("--smollm2-tokens", type=int, default=16, help="SmolLM2 max_new_tokens.")
    parser.add_argument("--group-size", type=int, default=8, help="Samples per leased task.")
    parser.add_argument("--no-smollm2", action="store_true", help="Only the tiny model.")
    parser.add_argument("--no-tiny", action="store_true", help="Only SmolLM2.")
    parser.add_argument(
        "--variant",
        choices=("both", "shipped", "pinned"),
        default="both",
        help="The engine as shipped, with threads pinned per generate call, or both.",
    )
    args = parser.parse_args()

    from coderepair.worker.models import ModelUnavailableError, build_tiny_model, convert_smollm2

    torch.set_num_threads(args.threads)
    pins = {"both": (False, True), "shipped": (False,), "pinned": (True,)}[args.variant]
    run = {"group_size": args.group_size, "max_tasks_per_lease": 1}
    rows = []
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench-worker-tiny-model-") as tmp:
        models: list[tuple[str, Path, int, int]] = []
        if not args.no_tiny:
            tiny = build_tiny_model(Path(tmp) / "tiny")
            models.append(("tiny", tiny, args.leases, args.tiny_tokens))
        if not args.no_smollm2:
            try:
                smol = convert_smollm2()
            except ModelUnavailableError as exc:
                notes.append(f"SmolLM2-135M skipped: {exc}")
            else:
                models.append(("smollm2-135m", smol, args.smollm2_leases, args.smollm2_tokens))
        for name, base, leases, tokens in models:
            for pin in pins:
                rows.append(
                    bench_model(name, base, leases, args.threads, pin, max_new_tokens=tokens, **run)
                )
    print_table(rows)
    for note in notes:
        print(note)
    shipped = [row["efficiency"] for row in rows if row["variant"] == "as shipped"]
    pinned = [row["efficiency"] for row in rows if row["variant"] != "as shipped"]
    worst = min(shipped) if shipped else None
    print(
        json.dumps(
            {
                "bench": "worker",
                "threads": args.threads,
                "target_efficiency": TARGET,
                "worker_efficiency": worst,
                "meets_target": worst is not None and worst >= TARGET,
                "worker_efficiency_threads_pinned": min(pinned) if pinned else None,
                "models": rows,
                "egress": None,
                "egress_note": "origin egress with and without peers: bench/worker_egress.py "
                "(merged here by the lead)",
            }
        )
    )


if __name__ == "__main__":
    main()

"""Simulated parties of the red-team runs, each a real process: workers and a trainer.

Run as ``python redteam_agents.py worker --spec SPEC.json`` or ``... trainer --spec ...``.
A worker talks to the coordinator through the worker's own `CoordinatorClient` (signed
envelopes per attempt, retries with the same idempotency key), with its own Ed25519
key(s), and follows one strategy:

* ``honest`` and the sample cheats of `redteam_cheats` (wrong model, perturbed weights,
  hinted prompt, edited tokens, injected text, best-of-n, inflated reward, tampered
  sandbox): lease, generate with the tiny model, submit;
* ``synthetic``: honest-shaped samples without a model (`service_support.make_samples`),
  for the fault and load runs whose coordinator audits no model;
* ``replayed_batch``: one honest batch, then that batch again (the same signed bytes,
  the same payload under a new key, its samples on a new lease);
* ``copied``: another worker's leaked completions for the task, on its own lease;
* ``stale_policy``: generates with version 1 while leases name version 2;
* ``sybil``: several keys of one operator that try to hold the same task at once, then
  cheat (edited tokens) with every key;
* ``garbage``: malformed, oversized and out-of-range requests;
* ``streak_then_cheat``: honest batches until audits thin out, then edited tokens.

Every outcome is one JSON line in the spec's ``out`` file, written and fsynced before
the next call: ``ack`` (the coordinator accepted the batch: it must be stored),
``rejected`` (refused in-band), ``refused`` (a gRPC status), ``replica`` (a Sybil key got
a task another key of its operator held).

The trainer reads the accepted-rollout stream with the trainer's `CoordinatorSource`
from the cursor it last recorded, logs each cursor (fsynced) and acks it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "coordinator"))

import grpc

from coderepair.protocol import rpc
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from coderepair.worker.client import (
    CoordinatorClient,
    CoordinatorRefusal,
    CoordinatorUnavailable,
    RetryPolicy,
)

R = common_pb2.RejectionReason
_SUBMIT = f"/{rpc.WORKER_SERVICE}/SubmitRollouts"


class Journal:
    """JSON lines, each fsynced before the caller goes on (survives kill -9 of anyone)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, **event: Any) -> None:
        self._file.write(json.dumps({"t": time.time(), **event}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


class Agent:
    """One simulated worker key running one strategy."""

    def __init__(self, spec: dict[str, Any], identity: Identity, journal: Journal) -> None:
        self.spec = spec
        self.strategy: str = spec["strategy"]
        self.label = self.strategy  # what the journal calls it (a Sybil cheats as another)
        self.identity = identity
        self.journal = journal
        self.client = CoordinatorClient(
            spec["address"],
            identity,
            retry=RetryPolicy(max_elapsed_s=spec.get("retry_s", 90.0), call_timeout_s=15.0),
        )
        self.maker: Any = None
        self.leak = Path(spec["leak_dir"]) if spec.get("leak_dir") else None
        self.deadline = time.monotonic() + spec.get("seconds", 60.0)
        self.banned = False

    def note(self, event: str, **fields: Any) -> None:
        self.journal.write(
            event=event, key=self.identity.public_key_hex, strategy=self.label, **fields
        )

    async def register(self) -> None:
        caps = common_pb2.WorkerCapabilities(engine="hf", max_concurrent_samples=4)
        await self.client.register("red team", "0.1.0", caps)

    async def lease(self) -> common_pb2.Lease | None:
        while time.monotonic() < self.deadline:
            try:
                answer = await self.client.lease("r1", 1)
            except CoordinatorRefusal as exc:
                self._refused(exc)
                return None
            if answer.HasField("lease"):
                return answer.lease
            await asyncio.sleep(0.1)
        return None

    def _refused(self, exc: CoordinatorRefusal, **fields: Any) -> None:
        self.banned = self.banned or exc.reason == R.REJECTION_REASON_BANNED
        self.note("refused", reason=exc.reason_name, message=str(exc)[:300], **fields)

    async def submit(
        self, payload: worker_pb2.SubmitPayload, *, cheat: bool
    ) -> worker_pb2.SubmitRolloutsResponse | None:
        fields = {
            "idempotency_key": payload.idempotency_key,
            "samples": len(payload.samples),
            "cheat": cheat,
            "lease_id": payload.lease_id,
        }
        started = time.perf_counter()
        try:
            answer = await self.client.submit(payload)
        except CoordinatorRefusal as exc:
            self._refused(exc, **fields)
            return None
        fields["ms"] = round((time.perf_counter() - started) * 1000, 3)
        if answer.accepted:
            self.note("ack", batch_id=answer.batch_id, **fields)
        else:
            reason = R.Name(answer.rejection.reason)
            self.note("rejected", batch_id=answer.batch_id, reason=reason, **fields)
        return answer

    def payload(self, lease: common_pb2.Lease, samples: list[Any]) -> worker_pb2.SubmitPayload:
        return worker_pb2.SubmitPayload(
            lease_id=lease.lease_id,
            idempotency_key=uuid.uuid4().hex,
            policy_version=lease.policy_version,
            samples=samples,
        )

    def make(self, lease: common_pb2.Lease, strategy: str | None = None) -> list[Any]:
        if self.strategy == "synthetic":
            from service_support import make_samples

            return make_samples(lease, salt=uuid.uuid4().hex, n_tokens=8)
        return self.load().samples(strategy or self.strategy, lease)  # type: ignore[no-any-return]

    def load(self) -> Any:
        """The model(s) of this worker; loaded before the first lease, as a worker does."""
        if self.maker is None:
            from redteam_cheats import Maker

            policy = self.spec["stale_policy"] if self.strategy == "stale_policy" else None
            self.maker = Maker(
                Path(policy or self.spec["policy"]),
                self.strategy,
                Path(self.spec["workdir"]),
                self.spec.get("seed", 0),
            )
        return self.maker

    # ------------------------------------------------------------ strategies

    async def run(self) -> None:
        await self.register()
        if self.strategy != "synthetic":
            await asyncio.to_thread(self.load)
        runner = getattr(self, f"_run_{self.strategy}", self._run_plain)
        await runner()

    async def _run_plain(self) -> None:
        cheat = self.strategy not in ("honest", "synthetic")
        for _ in range(self.spec["batches"]):
            lease = await self.lease()
            if lease is None or self.banned:
                return
            samples = await asyncio.to_thread(self.make, lease)
            answer = await self.submit(self.payload(lease, samples), cheat=cheat)
            if self.spec.get("pause_s"):
                await asyncio.sleep(self.spec["pause_s"])
            if answer is not None and answer.accepted and self.leak and self.strategy == "honest":
                from redteam_cheats import leak_record

                for sample in samples:
                    path = self.leak / f"{sample.task_id}.{sample.sample_index}.json"
                    path.write_text(json.dumps(leak_record(sample)))
            if self.banned:
                return

    async def _run_streak_then_cheat(self) -> None:
        # BOINC's weak spot: after `always_below_streak` valid batches only 1/streak are
        # audited. Build a streak honestly (cover batches, not counted either way), then
        # edit tokens in every batch and see how many get through.
        for _ in range(self.spec.get("streak", 14)):
            lease = await self.lease()
            if lease is None or self.banned:
                return
            samples = await asyncio.to_thread(self.make, lease, "honest")
            await self.submit(self.payload(lease, samples), cheat=False)
        # The streak counts batches whose audits passed and whose window closed: wait
        # for it, as a patient cheater would.
        target = min(self.spec.get("streak", 14), 12)
        for _ in range(600):
            status = await self.client.status()
            streak = int(status.worker.valid_streak) if status.HasField("worker") else 0
            if streak >= target:
                break
            await asyncio.sleep(0.5)
        self.note("streak", message=f"valid streak {streak} before cheating")
        for _ in range(self.spec["batches"]):
            lease = await self.lease()
            if lease is None or self.banned:
                return
            samples = await asyncio.to_thread(self.make, lease, "edited_tokens")
            await self.submit(self.payload(lease, samples), cheat=True)
            if self.banned:
                return

    async def _run_stale_policy(self) -> None:
        for n in range(self.spec["batches"]):
            lease = await self.lease()
            if lease is None or self.banned:
                return
            samples = await asyncio.to_thread(self.make, lease, "honest")
            payload = self.payload(lease, samples)
            if n % 2:  # say so: claim the version it really generated with
                payload.policy_version = max(1, lease.policy_version - 1)
            await self.submit(payload, cheat=True)

    async def _lease_task(self, wanted: set[str], tries: int = 30) -> common_pb2.Lease | None:
        """Lease, and release until a lease holds one of the ``wanted`` tasks."""
        got = []
        for _ in range(tries):
            lease = await self.lease()
            if lease is None:
                return None
            if any(t.task_id in wanted for t in lease.tasks):
                return lease
            got += [t.task_id[-6:] for t in lease.tasks]
            await self.client.release(lease.lease_id, "not the task I wanted")
        self.note("gave_up", message=f"wanted {sorted(t[-6:] for t in wanted)}, got {got}")
        return None

    async def _run_copied(self) -> None:
        assert self.leak is not None, "the copier needs the leak directory"
        done = 0
        while done < self.spec["batches"] and time.monotonic() < self.deadline:
            leaked: dict[str, list[dict[str, Any]]] = {}
            for path in self.leak.glob("*.json"):
                item = json.loads(path.read_text())
                leaked.setdefault(item["task_id"], []).append(item)
            group = self.spec.get("group_size", 2)
            full = {t for t, items in leaked.items() if len(items) >= group}
            if not full:
                await asyncio.sleep(0.5)
                continue
            lease = await self._lease_task(full)
            if self.banned or time.monotonic() > self.deadline:
                return
            if lease is None:  # the leaked tasks were all held by others: look again
                await asyncio.sleep(0.2)
                continue
            from redteam_cheats import copied

            samples = []
            for task in lease.tasks:
                samples += copied(leaked.get(task.task_id, []), task)
            await self.submit(self.payload(lease, samples), cheat=True)
            done += 1

    async def _run_replayed_batch(self) -> None:
        lease = await self.lease()
        if lease is None:
            return
        samples = await asyncio.to_thread(self.make, lease, "honest")
        first = self.payload(lease, samples)
        answer = await self.submit(first, cheat=False)
        if answer is None or not answer.accepted:
            return
        envelope = self.identity.sign(
            rpc.SIGNED_RPCS[_SUBMIT].purpose, first.SerializeToString(deterministic=True)
        ).to_bytes()
        await self._raw_submit(envelope, "fresh signature")  # the first use of this nonce
        for n in range(self.spec["batches"] - 1):
            kind = n % 3
            if kind == 0:  # the same signed bytes again: the nonce was seen
                await self._raw_submit(envelope, "replayed envelope")
                continue
            again = worker_pb2.SubmitPayload()
            again.CopyFrom(first)
            again.idempotency_key = uuid.uuid4().hex
            if kind == 2:  # its samples on a new lease (of the same task when one comes)
                new = await self._lease_task({t.task_id for t in lease.tasks}, tries=3)
                new = new or await self.lease()
                if new is None:
                    return
                again.lease_id = new.lease_id
                await self.submit(again, cheat=True)
                await self.client.release(new.lease_id, "replayed onto it; done")
                continue
            await self.submit(again, cheat=True)

    async def _raw_submit(self, envelope: bytes, what: str) -> None:
        cheat = what != "fresh signature"
        async with grpc.aio.insecure_channel(
            self.spec["address"], options=rpc.channel_options()
        ) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            try:
                answer = await stub.SubmitRollouts(
                    worker_pb2.SubmitRolloutsRequest(envelope=envelope), timeout=15
                )
            except grpc.aio.AioRpcError as exc:
                reason = _status_reason(exc)
                self.note("refused", reason=reason, message=what, cheat=cheat, samples=0)
                return
        if answer.accepted:
            self.note(
                "ack",
                batch_id=answer.batch_id,
                message=what,
                cheat=cheat,
                samples=0,
                replayed=answer.replayed_response,
            )
        else:
            reason = R.Name(answer.rejection.reason)
            self.note(
                "rejected",
                batch_id=answer.batch_id,
                reason=reason,
                message=what,
                cheat=cheat,
                samples=0,
            )

    async def _run_garbage(self) -> None:
        from redteam_garbage import garbage_requests

        lease = await self.lease()
        if lease is None:
            return
        samples = await asyncio.to_thread(self.make, lease, "honest")
        for what, request in garbage_requests(self.identity, lease, samples):
            await self._raw_request(what, request)

    async def _raw_request(self, what: str, request: bytes) -> None:
        options = rpc.channel_options(max_message_bytes=256 << 20)
        async with grpc.aio.insecure_channel(self.spec["address"], options=options) as channel:
            call = channel.unary_unary(_SUBMIT)
            try:
                raw = await call(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                reason = _status_reason(exc)
                self.note("refused", reason=reason, message=what, cheat=True, samples=0)
                return
        answer = worker_pb2.SubmitRolloutsResponse.FromString(raw)
        event = "ack" if answer.accepted else "rejected"
        self.note(
            event,
            batch_id=answer.batch_id,
            reason=R.Name(answer.rejection.reason),
            message=what,
            cheat=True,
            samples=0,
        )


def _status_reason(exc: grpc.aio.AioRpcError) -> str:
    """The `Rejection` reason a refusal by status carries, else the status code's name:
    after a ban, the key's requests are refused with REJECTION_REASON_BANNED."""
    with contextlib.suppress(ProtocolError):
        rejection = rpc.rejection_from_metadata(exc.trailing_metadata())
        if rejection is not None and rejection.reason == R.REJECTION_REASON_BANNED:
            return R.Name(rejection.reason)
    return exc.code().name


async def run_sybil(spec: dict[str, Any], journal: Journal) -> None:
    """Keys of one operator: hold the same task with two keys at once, then cheat."""
    agents = [Agent(spec, Identity.load(Path(p)), journal) for p in spec["keys"]]
    for agent in agents:
        agent.label = "sybil"
        await agent.register()
        await asyncio.to_thread(agent.load)
    held: dict[str, str] = {}  # task id -> key holding it
    first, rest = agents[0], agents[1:]
    for _round in range(spec.get("replica_rounds", 3)):
        lease = await first.lease()
        if lease is None:
            break
        held = {t.task_id: first.identity.public_key_hex for t in lease.tasks}
        for agent in rest:
            for _ in range(spec.get("replica_tries", 10)):
                other = await agent.lease()
                if other is None:
                    break
                got = [t.task_id for t in other.tasks if t.task_id in held]
                if got:
                    agent.note("replica", task_ids=got, lease_id=other.lease_id)
                await agent.client.release(other.lease_id, "looking for a sibling's task")
        await first.client.release(lease.lease_id, "round over")
    for agent in agents:
        agent.strategy = "edited_tokens"
        agent.spec = {**spec, "strategy": "edited_tokens"}
    await asyncio.gather(*(a._run_plain() for a in agents))
    for agent in agents:
        await agent.client.close()


async def run_workers(spec: dict[str, Any]) -> None:
    """Every simulated worker of the spec's ``agents`` (or the one it names), at once."""
    journal = Journal(Path(spec["out"]))

    async def one(sub: dict[str, Any], key: str) -> None:
        agent = Agent(sub, Identity.load(Path(key)), journal)
        try:
            await agent.run()
        except CoordinatorUnavailable as exc:
            agent.note("unavailable", message=str(exc)[:300])
        finally:
            await agent.client.close()

    jobs = []
    for group in spec.get("agents") or [{"strategy": spec["strategy"], "keys": spec["keys"]}]:
        sub = {**spec, **group}
        if group["strategy"] == "sybil":
            jobs.append(run_sybil(sub, journal))
        else:
            jobs += [one(sub, key) for key in group["keys"]]
    await asyncio.gather(*jobs)


def run_trainer(spec: dict[str, Any]) -> None:
    """Stream rows from the last recorded cursor; record each (fsynced), then ack it."""
    from coderepair.trainer.stream import CoordinatorSource

    log = Path(spec["out"])
    seen = (
        [json.loads(line)["cursor"] for line in log.read_text().splitlines()]
        if log.exists()
        else []
    )
    journal = Journal(log)
    source = CoordinatorSource(
        spec["address"], "r1", Identity.load(Path(spec["key"])), follow=True, reconnect_max_s=60.0
    )
    source.open(max(seen, default=0))
    deadline = time.monotonic() + spec.get("seconds", 60.0)
    try:
        while time.monotonic() < deadline:
            rows = source.read(16, 0.5)
            if rows is None:
                break
            for row in rows:
                journal.write(cursor=row.cursor, batch=row.record.lease_id)
            if rows:
                source.ack(rows[-1].cursor)
    finally:
        source.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["worker", "trainer"])
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args()
    if os.environ.get("REDTEAM_LOG"):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(name)s %(message)s")
    spec = json.loads(args.spec.read_text())
    if args.role == "trainer":
        run_trainer(spec)
    else:
        asyncio.run(run_workers(spec))


if __name__ == "__main__":
    main()

"""Preparing a submitted batch (`service.prepare`): the same answers as the checks it
wraps, refusals that survive a process boundary, and helper processes that start, die,
are replaced and stop."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coderepair.coordinator.service.gate import Refusal
from coderepair.coordinator.service.prepare import (
    BatchPreparer,
    PreparedBatch,
    PrepareJob,
    PreparerBrokenError,
    payload_digest,
    portable_store,
    prepare_batch,
)
from coderepair.coordinator.service.validation import LeaseView, check_batch
from coderepair.coordinator.service.wire import SubmitView
from coderepair.coordinator.storage.batches import completion_digest
from coderepair.coordinator.storage.models import Lease
from coderepair.coordinator.storage.objects import LocalObjectStore, ObjectStoreError
from coderepair.coordinator.storage.repo import LeaseTask
from coderepair.protocol.proofs import proof_size
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.rollout import from_parquet_bytes
from coderepair.v1 import common_pb2, worker_pb2

R = common_pb2.RejectionReason
SPEC = RewardSpec()
TASKS = (LeaseTask("t1", [11, 12]), LeaseTask("t2", [21, 22]))
PROMPTS = {"t1": (5, 6, 7), "t2": (8, 9)}


def _payload(*, corrupt: bool = False) -> worker_pb2.SubmitPayload:
    samples = []
    for task in TASKS:
        for index, seed in enumerate(task.seeds):
            ids = [3 + index, 40 + len(task.task_id), 7]
            samples.append(
                common_pb2.RolloutSample(
                    task_id=task.task_id,
                    sample_index=index,
                    seed=seed,
                    prompt_token_ids=PROMPTS[task.task_id],
                    completion_token_ids=ids if task.task_id == "t1" else ids[:2],
                    behaviour_logprobs=[-0.5] * (3 if task.task_id == "t1" else 2),
                    patch="p",
                    reward=0.0,
                    reward_components={"fail": 0.0},
                    test_log_sha256="a" * 64,
                    proof=bytes(proof_size() * 2),
                    finish_reason=common_pb2.FINISH_REASON_STOP,
                )
            )
    if corrupt:
        samples[3].seed = 999  # t2 sample 1: not the leased seed
    return worker_pb2.SubmitPayload(
        lease_id="L1", idempotency_key="k" * 16, policy_version=3, samples=samples
    )


def _job(payload: worker_pb2.SubmitPayload) -> PrepareJob:
    return PrepareJob(
        payload=payload.SerializeToString(),
        lease_id="L1",
        lease_policy_version=3,
        tasks=TASKS,
        prompts=PROMPTS,
        run_id="r1",
        worker_key_hex="b" * 64,
        group_size=2,
        max_new_tokens=8,
        reward_spec=SPEC,
        reward_spec_hash=SPEC.spec_hash(),
        now_ms=5,
    )


def _checked(payload: worker_pb2.SubmitPayload) -> Any:
    """check_batch itself, with the arguments `_job` gives the helper."""
    job = _job(payload)
    lease = Lease(lease_id=job.lease_id, policy_version=job.lease_policy_version)
    return check_batch(
        SubmitView.FromString(job.payload),
        LeaseView(lease=lease, tasks=job.tasks, prompts=job.prompts),
        **{k: getattr(job, k) for k in _CHECK_ARGS},
    )


_CHECK_ARGS = (
    "run_id",
    "worker_key_hex",
    "group_size",
    "max_new_tokens",
    "reward_spec",
    "reward_spec_hash",
    "now_ms",
)


def test_a_prepared_batch_is_what_check_batch_and_the_digests_give() -> None:
    payload = _payload()
    prepared = prepare_batch(_job(payload))
    assert prepared.refusal is None
    expected = hashlib.sha256(payload.SerializeToString(deterministic=True)).hexdigest()
    assert prepared.payload_sha256 == expected == payload_digest(payload)
    assert prepared.task_ids == ("t1", "t1", "t2", "t2")
    assert prepared.sample_indices == (0, 1, 0, 1)
    assert prepared.n_completion_tokens == (3, 3, 2, 2) and prepared.n_tokens == 10
    assert prepared.completion_sha256 == tuple(
        completion_digest(s.task_id, list(s.completion_token_ids)) for s in payload.samples
    )
    assert prepared.rewards == (0.0,) * 4 and len(prepared) == 4
    records = from_parquet_bytes(prepared.parquet)
    assert records == _checked(payload).records()
    assert [r.prompt_ids for r in records] == [[5, 6, 7]] * 2 + [[8, 9]] * 2


def test_a_local_store_gets_the_object_written_by_prepare(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    assert portable_store(store) is store
    job = dataclasses.replace(_job(_payload()), object_prefix="runs/r1/batches/w1/", store=store)
    prepared = prepare_batch(job)
    assert prepared.object_key == f"runs/r1/batches/w1/{prepared.payload_sha256}.parquet"
    assert prepared.parquet == b""  # written, not handed back
    assert from_parquet_bytes(store.get(prepared.object_key)) == _checked(_payload()).records()
    # Without a store the bytes come back for the caller to write, under the same key.
    kept = prepare_batch(dataclasses.replace(job, store=None))
    assert kept.object_key == prepared.object_key
    assert kept.parquet == store.get(prepared.object_key)


def test_only_a_plain_local_store_is_handed_to_helpers(tmp_path: Path) -> None:
    class Failing(LocalObjectStore):
        def put(self, key: str, data: bytes) -> None:
            raise OSError("disk full")

    assert portable_store(Failing(tmp_path)) is None


def test_a_refused_batch_comes_back_as_data_with_its_digest_and_pointer() -> None:
    payload = _payload(corrupt=True)
    prepared = prepare_batch(_job(payload))
    with pytest.raises(Refusal) as raised:
        _checked(payload)
    refusal = prepared.refusal
    assert refusal is not None and prepared.parquet == b"" and len(prepared) == 0
    assert (refusal.reason, refusal.message) == (raised.value.reason, raised.value.message)
    assert (refusal.task_id, refusal.sample_index) == ("t2", 1)
    assert prepared.payload_sha256 == payload_digest(payload)


_REASONS = st.sampled_from([v.number for v in R.DESCRIPTOR.values])


@given(
    reason=_REASONS,
    message=st.text(max_size=200),
    task_id=st.none() | st.text(max_size=40),
    sample_index=st.none() | st.integers(0, 2**31),
    retry_after_ms=st.none() | st.integers(0, 2**31),
)
def test_a_refusal_pickles_whole(
    reason: int,
    message: str,
    task_id: str | None,
    sample_index: int | None,
    retry_after_ms: int | None,
) -> None:
    refusal = Refusal(
        reason,
        message,
        task_id=task_id,
        sample_index=sample_index,
        retry_after_ms=retry_after_ms,
    )
    back = pickle.loads(pickle.dumps(refusal))
    assert isinstance(back, Refusal)
    assert back.to_proto() == refusal.to_proto()
    assert (back.reason, back.message, back.task_id, back.sample_index, back.retry_after_ms) == (
        reason,
        message,
        task_id,
        sample_index,
        retry_after_ms,
    )


# ---------------------------------------------------------------- helper processes
# Module-level so that a spawned helper can import them by name.


def _die_unless_marked(job: PrepareJob) -> PreparedBatch:
    """Kill this helper the first time (the marker is the job's run_id), then work."""
    marker = Path(job.run_id)
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return prepare_batch(job)


def _always_die(job: PrepareJob) -> PreparedBatch:
    os._exit(1)


def _stall(job: PrepareJob) -> PreparedBatch:
    time.sleep(60)
    return prepare_batch(job)


def _where(job: PrepareJob) -> PreparedBatch:
    return PreparedBatch(payload_sha256=str(os.getpid()))


async def test_without_helpers_it_prepares_in_a_thread_of_this_process() -> None:
    preparer = BatchPreparer(0)
    await preparer.start()
    assert preparer.pids() == []
    assert await preparer.prepare(_job(_payload())) == prepare_batch(_job(_payload()))
    await preparer.shutdown()
    await preparer.shutdown()  # idempotent


@pytest.mark.slow
async def test_a_helper_prepares_the_same_batch_in_another_process() -> None:
    preparer = BatchPreparer(1)
    try:
        await preparer.start()
        (pid,) = preparer.pids()
        assert pid != os.getpid()
        assert await preparer.prepare(_job(_payload())) == prepare_batch(_job(_payload()))
        refused = await preparer.prepare(_job(_payload(corrupt=True)))
        assert refused.refusal is not None and refused.refusal.sample_index == 1
    finally:
        await preparer.shutdown()
    assert preparer.pids() == []
    with pytest.raises(PreparerBrokenError, match="shutting down"):
        await preparer.prepare(_job(_payload()))


@pytest.mark.slow
async def test_a_killed_helper_is_replaced_and_the_next_job_runs() -> None:
    preparer = BatchPreparer(1, fn=_where)
    try:
        await preparer.start()
        (first,) = preparer.pids()
        assert (await preparer.prepare(_job(_payload()))).payload_sha256 == str(first)
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.2)  # the pool notices the death and breaks
        answer = await preparer.prepare(_job(_payload()))
        assert answer.payload_sha256 not in ("", str(first))
        assert preparer.pids() == [int(answer.payload_sha256)]
    finally:
        await preparer.shutdown()


@pytest.mark.slow
async def test_a_job_whose_helper_dies_runs_again_on_a_fresh_one(tmp_path: Path) -> None:
    preparer = BatchPreparer(1, fn=_die_unless_marked)
    marker = tmp_path / "died-once"
    job = dataclasses.replace(_job(_payload()), run_id=str(marker))
    try:
        await preparer.start()
        prepared = await preparer.prepare(job)
        assert marker.exists()  # the first helper died on it
        assert prepared.refusal is None and len(prepared) == 4
    finally:
        await preparer.shutdown()


@pytest.mark.slow
async def test_a_job_that_kills_every_helper_fails_as_broken() -> None:
    dying = BatchPreparer(1, fn=_always_die)
    try:
        with pytest.raises(PreparerBrokenError, match="died twice"):
            await dying.prepare(_job(_payload()))
    finally:
        await dying.shutdown()


@pytest.mark.slow
async def test_shutdown_fails_a_job_its_killed_helper_still_held() -> None:
    preparer = BatchPreparer(1, fn=_stall)
    await preparer.start()
    stuck = asyncio.create_task(preparer.prepare(_job(_payload())))
    await asyncio.sleep(0.3)  # the job is in the helper
    await preparer.shutdown(timeout_s=0.5)  # the helper does not exit: killed
    with pytest.raises(PreparerBrokenError):
        await asyncio.wait_for(stuck, 10)


def _keyed_job(key: str, store: LocalObjectStore) -> PrepareJob:
    payload = _payload()
    payload.idempotency_key = key
    return dataclasses.replace(_job(payload), object_prefix=f"runs/r1/batches/{key}/", store=store)


@pytest.mark.slow
async def test_a_helper_writes_each_object_before_answering_and_answers_in_order(
    tmp_path: Path,
) -> None:
    # The helper's writer thread writes the objects while the helper checks the next
    # job; each answer must still be its own job's, sent once its object is on disk.
    store = LocalObjectStore(tmp_path / "objects")
    jobs = [_keyed_job(f"k{i:015d}", store) for i in range(6)]
    preparer = BatchPreparer(1)
    try:
        await preparer.start()
        answers = await asyncio.gather(*(preparer.prepare(job) for job in jobs))
    finally:
        await preparer.shutdown()
    for job, answer in zip(jobs, answers, strict=True):
        expected = prepare_batch(dataclasses.replace(job, store=None))
        assert answer == dataclasses.replace(expected, parquet=b"")
        assert store.get(answer.object_key) == expected.parquet


@pytest.mark.slow
async def test_a_failed_object_write_fails_its_job_alone(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    # A file where the job's folder should be: that job's write fails.
    (tmp_path / "objects" / "runs" / "r1" / "batches").mkdir(parents=True)
    (tmp_path / "objects" / "runs" / "r1" / "batches" / "k000000000000bad").touch()
    preparer = BatchPreparer(1)
    try:
        await preparer.start()
        (pid,) = preparer.pids()
        bad, good = await asyncio.gather(
            preparer.prepare(_keyed_job("k000000000000bad", store)),
            preparer.prepare(_keyed_job("k00000000000good", store)),
            return_exceptions=True,
        )
        assert isinstance(bad, ObjectStoreError) and "clashes" in str(bad)
        assert isinstance(good, PreparedBatch) and store.get(good.object_key)
        assert preparer.pids() == [pid]  # the helper lives on
    finally:
        await preparer.shutdown()


def test_a_negative_helper_count_is_refused() -> None:
    with pytest.raises(ValueError, match="processes must be >= 0"):
        BatchPreparer(-1)

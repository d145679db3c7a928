"""Structural checks of submitted batches, the BOINC audit rate, and the model-free
reward audit, without a server."""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.config import AuditConfig
from coderepair.coordinator.service.audit import AuditRequest, ConsistencyAuditor
from coderepair.coordinator.service.gate import Refusal
from coderepair.coordinator.service.validation import (
    CheckedBatch,
    LeaseView,
    audit_probability,
    check_batch,
    check_policy_window,
    should_audit,
)
from coderepair.coordinator.service.wire import SubmitView, encode_ids
from coderepair.coordinator.storage.batches import completion_digest
from coderepair.coordinator.storage.models import AuditKind, Lease, LeaseState
from coderepair.coordinator.storage.repo import LeaseTask
from coderepair.protocol.proofs import proof_size
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.rollout import (
    RolloutRecord,
    RolloutSchemaError,
    _table,
    from_parquet_bytes,
)
from coderepair.v1 import common_pb2, worker_pb2

SPEC = RewardSpec()
PROMPT = [5, 6, 7]
SEEDS = [11, 22]


def _view() -> LeaseView:
    lease = Lease(
        lease_id="L1",
        run_id="r1",
        worker_id="w1",
        policy_version=3,
        tasks_json="[]",
        n_tasks=1,
        issued_unix_ms=0,
        deadline_unix_ms=10,
        state=LeaseState.OPEN,
    )
    return LeaseView(lease=lease, tasks=[LeaseTask("t1", SEEDS)], prompts={"t1": PROMPT})


def _payload() -> worker_pb2.SubmitPayload:
    samples = [
        common_pb2.RolloutSample(
            task_id="t1",
            sample_index=i,
            seed=SEEDS[i],
            prompt_token_ids=PROMPT,
            completion_token_ids=[1, 2, 3],
            behaviour_logprobs=[-0.1, -0.2, -0.3],
            patch="p",
            reward=0.0,
            reward_components={"fail": 0.0},
            test_log_sha256="a" * 64,
            proof=bytes(proof_size() * 2),
            finish_reason=common_pb2.FINISH_REASON_STOP,
        )
        for i in range(2)
    ]
    return worker_pb2.SubmitPayload(
        lease_id="L1", idempotency_key="k" * 16, policy_version=3, samples=samples
    )


def _check(payload: worker_pb2.SubmitPayload) -> list[object]:
    return list(_check_batch(payload).records())


def _check_batch(payload: worker_pb2.SubmitPayload | Any) -> CheckedBatch:
    """The payload as the coordinator reads it (through the wire view), checked."""
    if isinstance(payload, worker_pb2.SubmitPayload):
        payload = SubmitView.FromString(payload.SerializeToString())
    return check_batch(
        payload,
        _view(),
        run_id="r1",
        worker_key_hex="b" * 64,
        group_size=2,
        max_new_tokens=8,
        reward_spec=SPEC,
        reward_spec_hash=SPEC.spec_hash(),
        now_ms=5,
    )


def test_a_valid_batch_becomes_records() -> None:
    records = _check(_payload())
    assert len(records) == 2


def _wire_view() -> Any:
    return SubmitView.FromString(_payload().SerializeToString())


@pytest.mark.parametrize(
    ("field", "data", "match"),
    [
        ("completion_token_ids", b"\x01\x80", "ends inside a varint"),
        ("completion_token_ids", b"\x80\x80\x80\x80\x80\x01", "a uint32 takes at most 5"),
        ("completion_token_ids", encode_ids([1, 1 << 31, 3]), "an id above"),
        ("behaviour_logprobs", b"\x00" * 11, "11 bytes, not whole floats"),
        ("behaviour_logprobs", b"\x00" * 8, "has 2 behaviour logprobs for 3 tokens"),
        ("prompt_token_ids", b"\x05\x06\x87\x80", "ends inside a varint|differ"),
        ("prompt_token_ids", encode_ids([5, 6]), "prompt_token_ids differ"),
    ],
)
def test_token_fields_the_wire_view_reads_are_refused_when_malformed(
    field: str, data: bytes, match: str
) -> None:
    view = _wire_view()
    setattr(view.samples[1], field, data)
    with pytest.raises(Refusal, match=match) as info:
        _check_batch(view)
    assert (info.value.reason_name, info.value.sample_index) == ("STRUCTURAL", 1)


def test_a_prompt_in_longer_varints_than_needed_is_the_same_prompt() -> None:
    # protobuf reads 0x85 0x00 as 5; so does the check, though the bytes differ.
    view = _wire_view()
    view.samples[0].prompt_token_ids = b"\x85\x00\x06\x87\x80\x00"
    assert _check_batch(view).records()[0].prompt_ids == PROMPT


_TOKENS = st.lists(
    st.tuples(
        st.integers(0, (1 << 31) - 1), st.floats(max_value=0.0, width=32, allow_infinity=False)
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=100, deadline=None)
@given(st.tuples(_TOKENS, _TOKENS))
def test_the_columns_encode_as_their_records_do(tokens: tuple[list[Any], list[Any]]) -> None:
    """The Parquet file built from the batch's numpy columns is the one its records
    give, and the digests are `completion_digest` of each record."""
    payload = _payload()
    for sample, pairs in zip(payload.samples, tokens, strict=True):
        sample.completion_token_ids[:] = [i for i, _ in pairs]
        sample.behaviour_logprobs[:] = [lp for _, lp in pairs]
    batch = _check_batch(payload)
    records = batch.records()
    for record, sample in zip(records, payload.samples, strict=True):
        assert record.completion_ids == list(sample.completion_token_ids)
        assert record.behaviour_logprobs == list(sample.behaviour_logprobs)
        _full_check(record)
    assert batch.table().equals(_table(records))
    assert from_parquet_bytes(batch.parquet_bytes()) == records
    assert batch.digests() == [completion_digest(r.task_id, r.completion_ids) for r in records]
    assert batch.lengths() == [len(r.completion_ids) for r in records]
    assert batch.n_tokens == sum(batch.lengths())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p.samples.pop(), "STRUCTURAL"),
        (lambda p: setattr(p.samples[0], "seed", 99), "STRUCTURAL"),
        (lambda p: p.samples[0].prompt_token_ids.append(1), "STRUCTURAL"),
        (lambda p: setattr(p.samples[1], "sample_index", 0), "STRUCTURAL"),
        (lambda p: setattr(p.samples[0], "task_id", "other"), "STRUCTURAL"),
        (lambda p: p.samples[0].behaviour_logprobs.append(-1.0), "STRUCTURAL"),
        (lambda p: p.samples[0].behaviour_logprobs.__setitem__(1, math.nan), "STRUCTURAL"),
        (lambda p: p.samples[0].behaviour_logprobs.__setitem__(2, -math.inf), "STRUCTURAL"),
        (lambda p: p.samples[0].behaviour_logprobs.__setitem__(0, 0.5), "STRUCTURAL"),
        (lambda p: setattr(p.samples[0], "reward", 2.0), "STRUCTURAL"),
        (lambda p: setattr(p.samples[0], "reward", math.nan), "STRUCTURAL"),
        (lambda p: setattr(p.samples[0], "proof", b"123"), "STRUCTURAL"),
        (lambda p: setattr(p.samples[0], "test_log_sha256", "nope"), "STRUCTURAL"),
        (lambda p: p.samples[0].completion_token_ids.extend(range(9)), "STRUCTURAL"),
        (lambda p: p.samples[0].completion_token_ids.__setitem__(0, 1 << 31), "STRUCTURAL"),
        (lambda p: p.samples[0].reward_components.update({"": 0.0}), "STRUCTURAL"),
        (lambda p: setattr(p.samples[0], "finish_reason", 0), "STRUCTURAL"),
        (lambda p: setattr(p, "policy_version", 4), "STALE_POLICY"),
    ],
)
def test_each_flaw_is_refused_with_its_reason(mutate: object, reason: str) -> None:
    payload = _payload()
    mutate(payload)  # type: ignore[operator]
    with pytest.raises(Refusal) as info:
        _check(payload)
    assert info.value.reason_name == reason
    assert info.value.message


def test_the_largest_finite_logprobs_are_accepted() -> None:
    # The fast check sums the logprobs; float32's most negative finite values must pass.
    payload = _payload()
    payload.samples[0].behaviour_logprobs[:] = [-3.4e38, -3.4e38, -3.4e38]
    records = _check(payload)
    assert records[0].behaviour_logprobs == list(payload.samples[0].behaviour_logprobs)
    assert all(math.isfinite(lp) for lp in records[0].behaviour_logprobs)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=10_000))
def test_random_and_truncated_payloads_are_records_or_refusals(noise: bytes, cut: int) -> None:
    good = _payload().SerializeToString()
    for data in (noise, good[: cut % (len(good) + 1)]):
        try:
            payload = worker_pb2.SubmitPayload.FromString(data)
        except Exception:  # the wire decoder's own error: tested in protocol
            continue
        with contextlib.suppress(Refusal):
            _check(payload)


def _full_check(record: RolloutRecord) -> None:
    """Run the constructor's own checks on a record `check_batch` built without them."""
    RolloutRecord(**{f.name: getattr(record, f.name) for f in fields(RolloutRecord)})


_IDS = st.lists(st.integers(min_value=0, max_value=(1 << 32) - 1), min_size=0, max_size=10)
_FLOATS = st.floats(allow_nan=True, allow_infinity=True)


def _set_components(sample: common_pb2.RolloutSample, components: dict[str, float]) -> None:
    sample.reward_components.clear()
    sample.reward_components.update(components)
    # The reward a worker would report for them, so that this check does not hide others.
    try:
        total = math.fsum(components.values()) if components else 0.0
    except OverflowError:  # finite terms, infinite sum: the check must refuse it
        total = math.inf
    if math.isfinite(total):
        sample.reward = min(SPEC.pass_reward, max(SPEC.malformed_reward, total))


# One field a worker controls, set to anything its wire type allows; the rest stay valid.
_MUTATIONS = st.one_of(
    _IDS.map(lambda v: lambda s: s.completion_token_ids.__setitem__(slice(None), v)),
    st.lists(_FLOATS, max_size=10).map(
        lambda v: lambda s: s.behaviour_logprobs.__setitem__(slice(None), v)
    ),
    _FLOATS.map(lambda v: lambda s: setattr(s, "reward", v)),
    st.dictionaries(st.text(max_size=3), _FLOATS, max_size=3).map(
        lambda v: lambda s: _set_components(s, v)
    ),
    st.one_of(st.text(max_size=70), st.text("0123456789abcdef", min_size=64, max_size=64)).map(
        lambda v: lambda s: setattr(s, "test_log_sha256", v)
    ),
    st.text(max_size=20).map(lambda v: lambda s: setattr(s, "completion_text", v)),
    st.text(max_size=20).map(lambda v: lambda s: setattr(s, "patch", v)),
    st.binary(max_size=200).map(lambda v: lambda s: setattr(s, "proof", v)),
    st.integers(0, (1 << 32) - 1).map(lambda v: lambda s: setattr(s.timings, "generate_ms", v)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_MUTATIONS, min_size=1, max_size=3))
def test_records_built_without_their_own_checks_would_pass_them(mutations: list[object]) -> None:
    """`check_batch` builds records with `RolloutRecord.prechecked`: whatever a worker
    puts in the fields it controls, the batch is refused or every record it yields
    passes the checks the constructor would have made."""
    payload = _payload()
    for mutate in mutations:
        mutate(payload.samples[0])  # type: ignore[operator]
    try:
        records = _check(payload)
    except Refusal:
        return
    for record in records:
        _full_check(record)  # type: ignore[arg-type]


def test_prechecked_records_need_every_field() -> None:
    record = _check(_payload())[0]
    values = {f.name: getattr(record, f.name) for f in fields(RolloutRecord)}
    _full_check(RolloutRecord.prechecked(**values))
    del values["proof"]
    with pytest.raises(RolloutSchemaError, match="missing \\['proof'\\]"):
        RolloutRecord.prechecked(**values)
    with pytest.raises(RolloutSchemaError, match="unknown \\['extra'\\]"):
        RolloutRecord.prechecked(**values, proof=b"", extra=1)


def test_policy_window() -> None:
    check_policy_window(5, 5, 2)
    check_policy_window(3, 5, 2)
    for version in (2, 6):
        with pytest.raises(Refusal) as info:
            check_policy_window(version, 5, 2)
        assert info.value.reason_name == "STALE_POLICY"


def test_boinc_rate() -> None:
    config = AuditConfig(min_rate=0.05, always_below_streak=10)
    assert [audit_probability(s, config) for s in (0, 9)] == [1.0, 1.0]
    assert audit_probability(10, config) == pytest.approx(0.1)
    assert audit_probability(1000, config) == 0.05
    rng = random.Random(0)
    draws = sum(should_audit(16, config, rng) for _ in range(4000))
    assert 180 < draws < 320  # p = 1/16, expected 250
    floor = sum(should_audit(400, config, rng) for _ in range(4000))
    assert 140 < floor < 260  # the floor, 0.05: expected 200


def _audit(records: list[object]) -> str:
    request = AuditRequest(
        job_id="j",
        kind=AuditKind.REWARD,
        batch_id="b",
        worker_id="w",
        run_id="r1",
        policy_version=3,
        reward_spec=SPEC,
        records=records,  # type: ignore[arg-type]
    )
    return ConsistencyAuditor()(request).verdict


def test_consistency_auditor() -> None:
    records = _check(_payload())
    assert _audit(records) == "passed"
    from dataclasses import replace

    cheat = replace(records[0], reward_components={"pass": 1.0}, reward=1.0)  # type: ignore[type-var]
    assert _audit([cheat]) == "passed"  # only the sandbox re-run can catch this one
    made_up = replace(records[0], reward_components={"bonus": 1.0}, reward=1.0)  # type: ignore[type-var]
    assert _audit([made_up]) == "failed"
    unparsed = replace(records[0], patch="")  # type: ignore[type-var]
    assert _audit([unparsed]) == "failed"
    request = AuditRequest("j", AuditKind.PROOF, "b", "w", "r1", 3, SPEC, records)  # type: ignore[arg-type]
    assert ConsistencyAuditor()(request).verdict == "error"

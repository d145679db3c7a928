"""The reward spec: each rule, the bounds, validators, and the hash a lease names."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coderepair.protocol.errors import DecodeError, ProtocolError
from coderepair.protocol.reward import (
    RewardError,
    RewardInputError,
    RewardSpec,
    VerificationOutcome,
    compute_reward,
    similarity,
)

MALFORMED = VerificationOutcome(format_ok=False, completion_tokens=50)
NOT_APPLIED = VerificationOutcome(
    format_ok=True, search_blocks_found=1, search_blocks_total=2, similarity=0.5
)


def _applied(passed: int, total: int, **extra: object) -> VerificationOutcome:
    return VerificationOutcome(
        format_ok=True,
        applied=True,
        tests_passed=passed,
        tests_total=total,
        search_blocks_found=2,
        search_blocks_total=2,
        **extra,
    )


# ---------------------------------------------------------------- the rules, defaults


def test_default_rules_match_design() -> None:
    spec = RewardSpec()
    assert compute_reward(spec, _applied(3, 3)).total == 1.0
    assert compute_reward(spec, _applied(0, 3)).total == 0.0
    assert compute_reward(spec, MALFORMED).total == -1.0
    assert compute_reward(spec, MALFORMED).components == {"malformed": -1.0}
    # Well-formed edits that do not apply count as malformed by default (as in SWE-RL).
    assert compute_reward(spec, NOT_APPLIED).total == -1.0
    assert compute_reward(spec, NOT_APPLIED).components == {"not_applied": -1.0}


def test_partial_tests() -> None:
    spec = RewardSpec()
    reward = compute_reward(spec, _applied(1, 4))
    assert reward.total == 0.25
    assert reward.components == {"fail": 0.0, "tests": 0.25}
    off = RewardSpec(partial_tests=False)
    assert compute_reward(off, _applied(3, 4)).total == 0.0
    assert compute_reward(off, _applied(4, 4)).total == 1.0


def test_timeout_and_no_tests_never_pass() -> None:
    spec = RewardSpec()
    timed_out = _applied(3, 4, timed_out=True)
    assert compute_reward(spec, timed_out).components == {"fail": 0.0}
    assert not _applied(4, 4, timed_out=True).passed
    assert compute_reward(spec, _applied(0, 0)).total == 0.0


def test_swe_rl_similarity_for_tasks_without_tests() -> None:
    spec = RewardSpec(similarity_weight=1.0)
    outcome = _applied(0, 0, similarity=0.75)
    assert compute_reward(spec, outcome).total == 0.75
    assert compute_reward(spec, MALFORMED).total == -1.0
    with pytest.raises(RewardError, match="similarity"):
        compute_reward(spec, _applied(0, 0))
    # A passing patch gets the full reward whatever its similarity to the oracle.
    assert compute_reward(spec, _applied(2, 2, similarity=0.1)).total == 1.0


def test_dense_shaping_stays_below_pass() -> None:
    spec = RewardSpec(
        not_applied_reward=-0.5,
        well_formed_weight=0.1,
        search_found_weight=0.2,
        similarity_weight=0.3,
    )
    reward = compute_reward(spec, NOT_APPLIED)
    assert reward.components == {
        "not_applied": -0.5,
        "well_formed": 0.1,
        "search_found": 0.1,
        "similarity": 0.15,
    }
    assert reward.total == pytest.approx(-0.15)
    failing = compute_reward(spec, _applied(3, 4, similarity=1.0))
    # Partial test credit fills only the gap the shaping terms leave: 0.4 * 3/4.
    assert failing.components["tests"] == pytest.approx(0.3)
    assert failing.total == pytest.approx(0.9)
    assert failing.total < compute_reward(spec, _applied(4, 4, similarity=0.0)).total
    assert compute_reward(spec, MALFORMED).total == -1.0
    # The order of outcomes is preserved: malformed < not applied < applied < passing.
    bare = VerificationOutcome(format_ok=True, search_blocks_total=1, similarity=0.0)
    assert (
        compute_reward(spec, MALFORMED).total
        < compute_reward(spec, bare).total
        < compute_reward(spec, NOT_APPLIED).total
    )


def test_length_penalty() -> None:
    spec = RewardSpec(
        length_budget_tokens=100, length_penalty_per_token=0.01, length_penalty_max=0.5
    )
    within = _applied(1, 1, completion_tokens=100)
    assert compute_reward(spec, within).components == {"pass": 1.0, "length_penalty": 0.0}
    over = compute_reward(spec, _applied(1, 1, completion_tokens=120))
    assert over.total == pytest.approx(0.8)
    capped = compute_reward(spec, _applied(1, 1, completion_tokens=10_000))
    assert capped.total == pytest.approx(0.5)
    # It never pushes a well-formed outcome below the malformed minimum.
    clamped = compute_reward(spec, NOT_APPLIED.model_copy(update={"completion_tokens": 10_000}))
    assert clamped.total == -1.0
    assert compute_reward(spec, MALFORMED.model_copy(update={"completion_tokens": 10_000})) == (
        compute_reward(spec, MALFORMED)
    )


def test_similarity_helper() -> None:
    assert similarity("abc", "abc") == 1.0
    assert similarity("", "xyz") == 0.0
    assert similarity("return a + b", "return a - b") == pytest.approx(11 / 12)
    long_a = "    x = x + 1\n" * 40
    long_b = long_a.replace("+ 1", "- 1", 1)
    # autojunk is off: one changed character in 560 keeps the score near 1.
    assert similarity(long_a, long_b) > 0.99
    with pytest.raises(RewardError):
        similarity("a", None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- validators


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"malformed_reward": 0.5}, "reorder"),
        ({"not_applied_reward": 0.5}, "reorder"),
        ({"pass_reward": 0.0}, "must exceed fail_reward"),
        ({"similarity_weight": 0.8, "well_formed_weight": 0.3}, "could outscore"),
        ({"length_budget_tokens": 10}, "per-token penalty"),
        ({"length_penalty_per_token": 0.1}, "token budget"),
        ({"pass_reward": float("inf")}, "finite"),
        ({"well_formed_weight": -0.1}, "greater than or equal"),
        ({"length_budget_tokens": 0}, "greater than or equal"),
        ({"bonus": 1.0}, "Extra inputs"),
    ],
)
def test_spec_validators_say_what_to_change(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RewardSpec(**fields)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"tests_passed": 3, "tests_total": 2, "applied": True}, "exceeds tests_total"),
        ({"search_blocks_found": 2, "search_blocks_total": 1}, "exceeds search_blocks_total"),
        ({"format_ok": False, "applied": True}, "requires format_ok"),
        ({"tests_passed": 1, "tests_total": 1}, "did not apply"),
        ({"timed_out": True}, "did not apply"),
        ({"similarity": 1.5}, "less than or equal"),
        ({"completion_tokens": -1}, "greater than or equal"),
    ],
)
def test_outcome_validators(fields: dict[str, object], match: str) -> None:
    data: dict[str, object] = {"format_ok": True, **fields}
    with pytest.raises(RewardInputError, match=match):
        VerificationOutcome.from_mapping(data)


def test_decoders_raise_typed_errors() -> None:
    assert issubclass(RewardInputError, DecodeError)
    assert issubclass(RewardError, ProtocolError)
    spec = RewardSpec(similarity_weight=0.5)
    assert RewardSpec.from_json(spec.model_dump_json()) == spec
    for text in ("", "{", "[]", '{"pass_reward": "x"}', '{"pass_reward": NaN}'):
        with pytest.raises(RewardInputError):
            RewardSpec.from_json(text)
    with pytest.raises(RewardInputError):
        VerificationOutcome.from_mapping("not a mapping")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_spec_from_random_text_is_typed(text: str) -> None:
    # Random text rarely decodes; when it does it must be a valid spec, else a typed error.
    try:
        spec = RewardSpec.from_json(text)
    except RewardInputError:
        return
    assert isinstance(spec, RewardSpec)


# ---------------------------------------------------------------- the hash


def test_hash_is_canonical_and_stable() -> None:
    spec = RewardSpec(similarity_weight=0.25, partial_tests=False)
    digest = spec.spec_hash()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert RewardSpec(partial_tests=False, similarity_weight=0.25).spec_hash() == digest
    reordered = json.dumps(dict(reversed(list(spec.model_dump().items()))))
    assert RewardSpec.from_json(reordered).spec_hash() == digest
    # Same hash in a fresh interpreter (no dependence on hash seeds or dict order).
    code = (
        "from coderepair.protocol.reward import RewardSpec;"
        "print(RewardSpec(similarity_weight=0.25, partial_tests=False).spec_hash())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == digest
    # Pinned: changing the canonical form or the defaults changes every lease's spec name.
    assert RewardSpec().spec_hash() == RewardSpec().spec_hash()
    assert RewardSpec().spec_hash() == PINNED_DEFAULT_HASH


PINNED_DEFAULT_HASH = "6e252ac0c40054f04f29baec36755b1c30799c62b7b8a5c597680bb9125597e3"


_CHANGES: dict[str, object] = {
    "pass_reward": 2.0,
    "fail_reward": -0.5,
    "not_applied_reward": -0.75,
    "malformed_reward": -2.0,
    "partial_tests": False,
    "well_formed_weight": 0.1,
    "search_found_weight": 0.1,
    "similarity_weight": 0.1,
    "length_budget_tokens": 512,
    "length_penalty_per_token": 0.001,
    "length_penalty_max": 0.5,
}


def test_hash_changes_with_every_field() -> None:
    assert set(_CHANGES) == set(RewardSpec.model_fields), "cover every field"
    seen = {RewardSpec().spec_hash()}
    for name, value in _CHANGES.items():
        fields: dict[str, object] = {name: value}
        if name == "length_budget_tokens":
            fields["length_penalty_per_token"] = 0.001
        if name == "length_penalty_per_token":
            fields["length_budget_tokens"] = 2048
        seen.add(RewardSpec(**fields).spec_hash())
    assert len(seen) == len(_CHANGES) + 1


# ---------------------------------------------------------------- properties


@st.composite
def outcomes(draw: st.DrawFn) -> VerificationOutcome:
    format_ok = draw(st.booleans())
    applied = format_ok and draw(st.booleans())
    total = draw(st.integers(0, 50))
    passed = draw(st.integers(0, total)) if applied else 0
    blocks = draw(st.integers(0, 5))
    return VerificationOutcome(
        format_ok=format_ok,
        applied=applied,
        tests_passed=passed,
        tests_total=total if applied else 0,
        timed_out=applied and draw(st.booleans()),
        similarity=draw(st.floats(0.0, 1.0)),
        search_blocks_found=draw(st.integers(0, blocks)),
        search_blocks_total=blocks,
        completion_tokens=draw(st.integers(0, 5000)),
    )


@st.composite
def specs(draw: st.DrawFn) -> RewardSpec:
    malformed = draw(st.floats(-5.0, 0.0))
    not_applied = draw(st.floats(malformed, 0.0))
    fail = draw(st.floats(not_applied, 0.5))
    passing = draw(st.floats(fail + 0.01, 3.0))
    gap = passing - fail
    weights = [draw(st.floats(0.0, 1.0)) for _ in range(3)]
    # 0.999: keep clear of the validator's bound, which float rounding could cross.
    scale = gap / max(sum(weights), 1.0) * draw(st.floats(0.0, 0.999))
    budget = draw(st.none() | st.integers(1, 4000))
    return RewardSpec(
        pass_reward=passing,
        fail_reward=fail,
        not_applied_reward=not_applied,
        malformed_reward=malformed,
        partial_tests=draw(st.booleans()),
        well_formed_weight=weights[0] * scale,
        search_found_weight=weights[1] * scale,
        similarity_weight=weights[2] * scale,
        length_budget_tokens=budget,
        length_penalty_per_token=0.0 if budget is None else draw(st.floats(1e-6, 1.0)),
        length_penalty_max=draw(st.floats(0.0, 10.0)),
    )


@settings(max_examples=200, deadline=None)
@given(spec=specs(), outcome=outcomes())
def test_reward_is_bounded_and_reproducible(spec: RewardSpec, outcome: VerificationOutcome) -> None:
    reward = compute_reward(spec, outcome)
    assert spec.min_reward <= reward.total <= spec.max_reward
    if not outcome.format_ok:
        assert reward.total == spec.min_reward
    elif not outcome.passed:
        # A failing outcome never outscores a passing one of the same length.
        passing = outcome.model_copy(
            update={"applied": True, "timed_out": False, "tests_total": 1, "tests_passed": 1}
        )
        assert reward.total <= compute_reward(spec, passing).total
    # An auditor recomputing from the serialized spec and outcome gets the same bits.
    again = compute_reward(
        RewardSpec.from_json(spec.model_dump_json()),
        VerificationOutcome.from_mapping(json.loads(outcome.model_dump_json())),
    )
    assert again == reward


_CANCELLING_HUGE_TERMS = (
    8.988465674311579e307,
    8.98846567431158e307,
    -8.988465674311579e307,
    -8.98846567431158e307,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=6))
# Found by this test: a partial sum overflows, yet the terms cancel to 0 (a float sum
# said inf, clamped to the maximum reward).
@example([*_CANCELLING_HUGE_TERMS])
def test_clamped_total_is_the_exact_sum_clamped_even_when_it_overflows(terms: list[float]) -> None:
    spec = RewardSpec()
    total = spec.clamped_total(terms)
    assert spec.min_reward <= total <= spec.max_reward
    exact = sum(map(Fraction, terms), Fraction(0))
    assert total == _clamp(exact, spec)


def _clamp(exact: Fraction, spec: RewardSpec) -> float:
    return float(min(Fraction(spec.max_reward), max(Fraction(spec.min_reward), exact)))


def test_finite_terms_whose_sum_overflows_clamp_like_their_infinity() -> None:
    spec = RewardSpec()
    assert spec.clamped_total([1.7e308, 1.7e308]) == spec.max_reward
    assert spec.clamped_total([-1.7e308, -1.7e308, 1.0]) == spec.min_reward

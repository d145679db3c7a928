"""Tests of coderepair.protocol.proofs on its own (compatibility with the reference
``toploc`` package lives in tests/integration/test_toploc_reference.py).

Activations here are random normal arrays: what matters to the proof format is the
distribution of magnitudes and the ties of bf16 values, which random data exercises
more than a model's hidden states do.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coderepair.protocol.errors import DecodeError, ProtocolError
from coderepair.protocol.proofs import (
    FIELD_PRIME,
    ChunkVerification,
    Proof,
    ProofDecodeError,
    ProofInputError,
    ProofMismatchError,
    ProofThresholds,
    build_proofs,
    check,
    chunk_count,
    decode_proof,
    encode_proof,
    proof_size,
    verify_proofs,
)

HIDDEN = 256


def make_activations(seed: int, prompt_len: int = 5, decode_steps: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    prefill = rng.standard_normal((prompt_len, HIDDEN)).astype(np.float32)
    return [prefill] + [rng.standard_normal(HIDDEN).astype(np.float32) for _ in range(decode_steps)]


@pytest.fixture(scope="module")
def activations() -> list[np.ndarray]:
    return make_activations(seed=1)


@pytest.fixture(scope="module")
def proofs(activations: list[np.ndarray]) -> list[bytes]:
    return build_proofs(activations)


# ------------------------------------------------------------------ format


def test_one_258_byte_proof_per_chunk(activations: list[np.ndarray], proofs: list[bytes]) -> None:
    # prefill + ceil(40 / 32) decode chunks
    assert len(proofs) == 3 == chunk_count(len(activations))
    assert {len(p) for p in proofs} == {258} == {proof_size()}


def test_decode_encode_round_trip(proofs: list[bytes]) -> None:
    for raw in proofs:
        proof = decode_proof(raw)
        assert proof.modulus == FIELD_PRIME  # every chunk here has < 65497 values
        assert len(proof.coeffs) == 128
        assert encode_proof(proof) == raw == proof.to_bytes()


def test_chunking_follows_prefill_then_batches() -> None:
    assert chunk_count(1) == 1
    assert chunk_count(33) == 2
    assert chunk_count(34) == 3
    assert chunk_count(32, skip_prefill=True) == 1
    assert chunk_count(33, skip_prefill=True) == 2
    acts = make_activations(seed=2, decode_steps=33)
    assert len(build_proofs(acts, skip_prefill=True)) == chunk_count(34, skip_prefill=True)
    assert len(build_proofs(acts, decode_batching_size=8)) == chunk_count(
        34, decode_batching_size=8
    )


def test_2d_array_rows_are_steps(activations: list[np.ndarray]) -> None:
    stacked = np.stack(activations[1:])
    assert build_proofs(stacked, skip_prefill=True) == build_proofs(
        activations[1:], skip_prefill=True
    )


# ------------------------------------------------------------------ verification


def test_honest_recomputation_verifies_exactly(
    activations: list[np.ndarray], proofs: list[bytes]
) -> None:
    results = verify_proofs(activations, proofs)
    assert [r.index for r in results] == [0, 1, 2]
    assert all(r.exp_mismatches == 0 and r.mant_err_mean == 0 for r in results)
    verdict = check(results, ProofThresholds())
    assert verdict.passed and verdict.failing_chunk is None and verdict.chunks == 3


def test_small_noise_passes_and_large_noise_or_other_data_fails(
    activations: list[np.ndarray], proofs: list[bytes]
) -> None:
    rng = np.random.default_rng(7)
    noisy = [a * (1 + 1e-3 * rng.standard_normal(a.shape)) for a in activations]
    assert check(verify_proofs(noisy, proofs), ProofThresholds()).passed

    very_noisy = [a * (1 + 0.2 * rng.standard_normal(a.shape)) for a in activations]
    assert not check(verify_proofs(very_noisy, proofs), ProofThresholds()).passed

    other = make_activations(seed=99)
    verdict = check(verify_proofs(other, proofs), ProofThresholds())
    assert not verdict.passed
    assert verdict.failing_chunk is not None and verdict.failing_chunk.index == 0
    assert "chunk 0" in verdict.reason


def test_large_chunks_use_a_smaller_injective_modulus() -> None:
    """Over 65497 values per chunk, indices can collide mod 65497: the modulus drops."""
    rng = np.random.default_rng(3)
    chunk = rng.standard_normal((32, 4096)).astype(np.float32) * 0.01
    flat = chunk.reshape(-1)
    flat[:128] = 0  # keep the first 128 slots small...
    flat[5] = 50.0  # ...except two large values that collide mod 65497
    flat[5 + FIELD_PRIME] = -60.0
    proofs = build_proofs(list(chunk), skip_prefill=True)
    proof = decode_proof(proofs[0])
    assert proof.modulus < FIELD_PRIME
    results = verify_proofs(list(chunk), proofs, skip_prefill=True)
    assert results[0].exp_mismatches == 0 and results[0].mant_err_mean == 0


def test_wrong_modulus_for_a_small_chunk_fails_verification(
    activations: list[np.ndarray], proofs: list[bytes]
) -> None:
    forged = Proof(modulus=FIELD_PRIME - 1, coeffs=decode_proof(proofs[1]).coeffs)
    tampered = [proofs[0], forged.to_bytes(), proofs[2]]
    results = verify_proofs(activations, tampered)
    assert results[1].exp_mismatches == 128
    assert not check(results, ProofThresholds()).passed


def test_wrong_number_of_proofs_is_a_mismatch(
    activations: list[np.ndarray], proofs: list[bytes]
) -> None:
    with pytest.raises(ProofMismatchError, match="3 chunks but 2 proofs"):
        verify_proofs(activations, proofs[:2])
    with pytest.raises(ProofMismatchError, match="list of bytes"):
        verify_proofs(activations, proofs[0])  # type: ignore[arg-type]  # bytes, not a list


def test_every_bit_flip_is_detected(activations: list[np.ndarray], proofs: list[bytes]) -> None:
    """Exhaustive over the 2,064 bits of one proof.

    A flip either makes the proof undecodable, or changes the polynomial, which then
    differs from the committed values at one of the 128 points at least (a nonzero
    polynomial of degree < 128 has fewer than 128 roots), so the statistics are never
    those of an exact match. Flips of the lowest four bits of the constant coefficient
    shift every value by at most 8 mantissa units, which the thresholds accept as
    honest noise by design; every other flip fails them.
    """
    thresholds = ProofThresholds()
    for byte in range(258):
        for bit in range(8):
            flipped = bytearray(proofs[1])
            flipped[byte] ^= 1 << bit
            try:
                results = verify_proofs(activations, [proofs[0], bytes(flipped), proofs[2]])
            except ProofDecodeError:
                continue
            chunk = results[1]
            assert (chunk.exp_mismatches, chunk.mant_err_mean) != (0, 0.0), (byte, bit)
            if (byte, bit) not in {(3, 0), (3, 1), (3, 2), (3, 3)}:
                assert not check(results, thresholds).passed, (byte, bit)


# ------------------------------------------------------------------ top-k ties


@pytest.mark.parametrize("size", [200, 3000, 8191, 8192, 20000])
@pytest.mark.parametrize("k", [1, 3, 128])
def test_topk_ties_resolve_like_torch_cpu(size: int, k: int) -> None:
    """Which of several equal magnitudes makes the top-k decides the proof bytes."""
    torch = pytest.importorskip("torch")
    from coderepair.protocol.proofs import _topk_indices

    generator = torch.Generator().manual_seed(size * 1000 + k)
    for values in (
        torch.randn(size, generator=generator).to(torch.bfloat16),
        torch.randint(-4, 5, (size,), generator=generator).to(torch.bfloat16),
    ):
        bits = values.view(torch.int16).numpy().view(np.uint16)
        expected = set(values.abs().topk(k).indices.tolist())
        assert set(_topk_indices(bits, k).tolist()) == expected


def test_torch_tensors_and_numpy_arrays_give_the_same_proofs(
    activations: list[np.ndarray], proofs: list[bytes]
) -> None:
    torch = pytest.importorskip("torch")
    tensors = [torch.from_numpy(a) for a in activations]
    assert build_proofs(tensors) == proofs
    bf16 = [t.to(torch.bfloat16) for t in tensors]
    assert build_proofs(bf16) == proofs  # fp32 inputs are rounded to bf16 like torch
    assert check(verify_proofs(bf16, proofs), ProofThresholds()).passed


def test_fp32_rounds_to_bf16_like_torch() -> None:
    torch = pytest.importorskip("torch")
    from coderepair.protocol.proofs import _bf16_bits

    rng = np.random.default_rng(5)
    values = np.concatenate(
        [rng.standard_normal(10_000), rng.standard_normal(100) * 1e30, [0.0, -0.0, 1e-40]]
    ).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(_bf16_bits(values), expected.view(np.uint16))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "258 bytes, got 0"),
        (bytes(257), "258 bytes, got 257"),
        (bytes(259), "258 bytes, got 259"),
        (bytes(258), "null proof"),
        (b"\x00\x7f" + bytes(256), "cannot make 128 indices distinct"),
        (b"\xff\xda" + bytes(256), "cannot make 128 indices distinct"),
        (b"\xff\xd9" + b"\xff\xd9" + bytes(254), "not an element of GF"),
    ],
)
def test_decode_rejects_malformed_proofs(data: bytes, message: str) -> None:
    with pytest.raises(ProofDecodeError, match=message):
        decode_proof(data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(ProofDecodeError, match="must be bytes"):
        decode_proof("AAAA")  # type: ignore[arg-type]


def test_decode_error_is_a_protocol_decode_error() -> None:
    assert issubclass(ProofDecodeError, DecodeError)
    assert issubclass(ProofInputError, ProtocolError)


@pytest.mark.parametrize(
    ("activations", "message"),
    [
        ([], "no activations"),
        ("text", "sequence of arrays"),
        (np.zeros(300, dtype=np.float32), "must be 2-D"),
        ([np.zeros((2, 256), dtype=np.int32)], "floating point"),
        ([np.full((2, 256), np.nan, dtype=np.float32)], "inf or NaN"),
        ([np.full((2, 256), 3.4e38, dtype=np.float32)], "inf or NaN"),  # overflows bf16
        ([np.full((2, 256), 1e300)], "inf or NaN"),  # fp64 beyond fp32
        ([np.ones((1, 64), dtype=np.float32)], "fewer than topk=128"),
    ],
)
def test_build_rejects_bad_activations(activations: object, message: str) -> None:
    with pytest.raises(ProofInputError, match=message):
        build_proofs(activations)


def test_build_rejects_bad_parameters(activations: list[np.ndarray]) -> None:
    with pytest.raises(ProofInputError, match="decode_batching_size"):
        build_proofs(activations, decode_batching_size=0)
    with pytest.raises(ProofInputError, match="topk"):
        build_proofs(activations, topk=0)
    with pytest.raises(ProofInputError, match="decode_batching_size"):
        chunk_count(3, decode_batching_size=0)


def test_mixing_tensors_and_arrays_is_rejected(activations: list[np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    mixed = [torch.from_numpy(activations[0]), *activations[1:]]
    with pytest.raises(ProofInputError, match="mix of torch tensors"):
        build_proofs(mixed, decode_batching_size=64)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_decode_or_raise_typed_error(data: bytes) -> None:
    try:
        proof = decode_proof(data)
    except ProofDecodeError:
        return
    assert proof.to_bytes() == data  # only well-formed proofs decode, losslessly


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(min_size=250, max_size=262), min_size=3, max_size=3))
def test_random_proofs_never_verify(
    activations: list[np.ndarray], proofs: list[bytes], forged: list[bytes]
) -> None:
    try:
        results = verify_proofs(activations, forged)
    except ProofDecodeError:
        return
    assert not check(results, ProofThresholds()).passed


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=257))
def test_truncated_proofs_raise_typed_error(
    activations: list[np.ndarray], proofs: list[bytes], which: int, length: int
) -> None:
    truncated = list(proofs)
    truncated[which] = proofs[which][:length]
    with pytest.raises(ProofDecodeError, match=f"proof {which}:"):
        verify_proofs(activations, truncated)


# ------------------------------------------------------------------ thresholds and verdicts


def chunk(index: int, exp: int, mean: float, median: float) -> ChunkVerification:
    return ChunkVerification(index, exp, mean, median)


def test_thresholds_are_inclusive_and_report_the_first_failing_chunk() -> None:
    thresholds = ProofThresholds()
    assert (thresholds.max_exp_mismatches, thresholds.max_mant_err_mean) == (90, 10.0)
    assert thresholds.max_mant_err_median == 8.0
    at_limit = [chunk(0, 90, 10.0, 8.0)]
    assert check(at_limit, thresholds).passed
    results = [chunk(0, 1, 1.0, 1.0), chunk(1, 91, 1.0, 1.0), chunk(2, 0, 11.0, 9.0)]
    verdict = check(results, thresholds)
    assert not verdict.passed
    assert verdict.failing_chunk == results[1]
    assert "91 exponent mismatches > 90" in verdict.reason
    assert (verdict.worst_exp_mismatches, verdict.worst_mant_err_mean) == (91, 11.0)
    assert verdict.worst_mant_err_median == 9.0
    only_median = check([chunk(0, 0, 1.0, 8.5)], thresholds)
    assert not only_median.passed and "median 8.5 > 8" in only_median.reason


def test_no_chunks_never_pass() -> None:
    verdict = check([], ProofThresholds())
    assert not verdict.passed and verdict.chunks == 0


def test_nan_statistics_fail() -> None:
    assert not check([chunk(0, 0, float("nan"), 0.0)], ProofThresholds()).passed


def test_thresholds_validate_and_document_every_field() -> None:
    with pytest.raises(ValidationError):
        ProofThresholds(max_exp_mismatches=-1)
    with pytest.raises(ValidationError):
        ProofThresholds(max_mant_err_mean=1.0, unknown=2)  # type: ignore[call-arg]
    for name, field in ProofThresholds.model_fields.items():
        assert field.description, name

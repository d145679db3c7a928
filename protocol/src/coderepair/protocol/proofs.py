"""TOPLOC-style proofs of inference, byte-compatible with the reference ``toploc`` 0.1.6.

A worker commits to the last hidden states it computed while generating a completion.
The states are cut into chunks (the prefill, then groups of ``decode_batching_size``
decode steps); of each chunk the ``topk`` entries of largest magnitude are kept, and the
points (flat index, bf16 bit pattern of the value) are interpolated by a polynomial over
GF(65497). The proof of a chunk is that polynomial: a 2-byte modulus that makes the
indices distinct, then ``topk`` 2-byte coefficients, big-endian (258 bytes for k=128).

A validator recomputes the hidden states by prefilling prompt + completion with the
same policy, takes the top-k of each chunk again, evaluates the proof polynomial at the
recomputed indices and compares the result with the recomputed values: how many
exponents differ, and how far the mantissas of the others are apart (mean, median).
Honest work on other hardware stays within small thresholds; another model, a changed
prompt or perturbed activations do not.

What the reference does, and what this module reproduces bit for bit:

* Values are bf16. The reference interpolates the raw bit pattern of the values; it
  refuses float32 (its ``build_proofs`` then returns "null" proofs). Here float inputs of
  any width are rounded to bf16 first (round to nearest even, as ``tensor.to(bfloat16)``),
  so ours(x) == reference(x.to(torch.bfloat16)).
* The prefill chunk is the whole first item, flattened; each decode chunk is the
  concatenation of the next ``decode_batching_size`` items. ``skip_prefill`` chunks all
  items as decode steps.
* Top-k ties: the set of indices is what ``torch.topk`` on CPU selects (libstdc++
  ``partial_sort`` when ``64 * k <= n``, else ``nth_element``). Tensors given as torch
  tensors go through ``torch.topk`` on their own device, exactly like the reference;
  NumPy arrays go through an exact simulation of the CPU algorithm, so that torch is
  never needed.
* Verification compares exponent bits (``(b >> 7) & 0xFF``; the sign is ignored) and
  mantissa bits (``b & 0x7F``); mean and median as ``statistics.mean/median`` of the
  mantissa differences where exponents agree, ``2**64`` for both when none agree.
  The reference's Python verifier evaluates at the raw index while its C++ verifier
  reduces the index by the proof's modulus first; both agree whenever the modulus is
  65497 (every chunk under 65497 entries). This module reduces by the modulus, which is
  the only variant under which honest proofs of large chunks verify.

Bad inputs raise ``ProofInputError`` (activations) or ``ProofDecodeError`` (proof bytes),
and a proof list that does not fit the activations raises ``ProofMismatchError``.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from coderepair.protocol.errors import DecodeError, ProtocolError, VerificationError

__all__ = [
    "DEFAULT_DECODE_BATCHING_SIZE",
    "DEFAULT_TOPK",
    "FIELD_PRIME",
    "ChunkVerification",
    "Proof",
    "ProofDecodeError",
    "ProofInputError",
    "ProofMismatchError",
    "ProofThresholds",
    "ProofVerdict",
    "build_proofs",
    "check",
    "chunk_count",
    "decode_proof",
    "encode_proof",
    "proof_size",
    "verify_proofs",
]

FIELD_PRIME = 65497
"""The prime of the field the polynomial lives in (the largest prime below 2**16 - 38)."""
DEFAULT_TOPK = 128
DEFAULT_DECODE_BATCHING_SIZE = 32

_BF16_EXP_MASK = 0x7F80
_BF16_MANT_MASK = 0x007F
_BF16_ABS_MASK = 0x7FFF
# Sentinel of the reference for "no mantissa to compare": every exponent differed.
_NO_MANTISSA_ERROR = float(2**64)
# Below this ratio torch's CPU top-k uses partial_sort, above it nth_element.
_PARTIAL_SORT_FACTOR = 64
_HEAP_SCAN_BLOCK = 4096
_MODULUS_BATCH = 512


class ProofInputError(ProtocolError):
    """Activations cannot be turned into proofs (wrong type, shape, dtype, non-finite)."""


class ProofDecodeError(DecodeError):
    """Proof bytes are not a well-formed TOPLOC polynomial."""


class ProofMismatchError(VerificationError):
    """The proofs do not fit the activations (e.g. a different number of chunks)."""


# ------------------------------------------------------------------ proof encoding


@dataclass(frozen=True)
class Proof:
    """One chunk's polynomial: ``coeffs[i]`` is the coefficient of x**i over GF(65497)."""

    modulus: int
    coeffs: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return encode_proof(self)


def proof_size(topk: int = DEFAULT_TOPK) -> int:
    """Bytes of one chunk's proof: 2 for the modulus, 2 per coefficient."""
    return 2 + 2 * topk


def encode_proof(proof: Proof) -> bytes:
    """The reference's wire format: modulus then coefficients, each big-endian uint16."""
    if not 0 < proof.modulus <= FIELD_PRIME:
        raise ProofInputError(
            f"proof modulus {proof.modulus} is outside 1..{FIELD_PRIME}; "
            "build proofs with build_proofs instead of assembling them by hand"
        )
    coeffs = np.asarray(proof.coeffs, dtype=np.int64)
    if coeffs.size and (coeffs.min() < 0 or coeffs.max() >= FIELD_PRIME):
        raise ProofInputError(f"proof coefficients must lie in 0..{FIELD_PRIME - 1}")
    return proof.modulus.to_bytes(2, "big") + coeffs.astype(">u2").tobytes()


def decode_proof(data: bytes, *, topk: int = DEFAULT_TOPK) -> Proof:
    """Parse one chunk's proof; raises `ProofDecodeError` on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProofDecodeError(f"a proof must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != proof_size(topk):
        raise ProofDecodeError(
            f"a proof for top-{topk} is {proof_size(topk)} bytes, got {len(raw)}: "
            "the proof is truncated or was built with another topk"
        )
    modulus = int.from_bytes(raw[:2], "big")
    if modulus == 0:
        raise ProofDecodeError(
            "null proof (modulus 0): the prover failed to build this proof; reject the rollout"
        )
    if not topk <= modulus <= FIELD_PRIME:
        raise ProofDecodeError(
            f"proof modulus {modulus} cannot make {topk} indices distinct "
            f"(it must lie in {topk}..{FIELD_PRIME}): the proof is corrupt"
        )
    coeffs = np.frombuffer(raw, dtype=">u2", offset=2).astype(np.int64)
    if coeffs.max(initial=0) >= FIELD_PRIME:
        raise ProofDecodeError(
            f"proof coefficient {int(coeffs.max())} is not an element of GF({FIELD_PRIME}): "
            "the proof is corrupt"
        )
    return Proof(modulus=modulus, coeffs=tuple(coeffs.tolist()))


# ------------------------------------------------------------------ activations -> chunks


def chunk_count(
    num_items: int,
    *,
    decode_batching_size: int = DEFAULT_DECODE_BATCHING_SIZE,
    skip_prefill: bool = False,
) -> int:
    """How many proofs a list of ``num_items`` activations yields."""
    if decode_batching_size < 1:
        raise ProofInputError(f"decode_batching_size must be >= 1, got {decode_batching_size}")
    if skip_prefill:
        return -(-num_items // decode_batching_size)
    return 1 + -(-(num_items - 1) // decode_batching_size) if num_items else 0


def _torch_module() -> Any | None:
    # torch is optional: an input can only be a tensor if torch was already imported.
    return sys.modules.get("torch")


def _is_tensor(x: object) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def _split_items(activations: object) -> list[Any]:
    """A sequence of per-step arrays, or a >=2-D array whose rows are the steps."""
    if _is_tensor(activations) or isinstance(activations, np.ndarray):
        if activations.ndim < 2:  # type: ignore[attr-defined]
            raise ProofInputError(
                "an activations array must be 2-D (steps, hidden) or more; "
                f"got shape {tuple(activations.shape)}"  # type: ignore[attr-defined]
            )
        return list(activations)  # type: ignore[call-overload]
    if isinstance(activations, str | bytes) or not isinstance(activations, Sequence):
        raise ProofInputError(
            "activations must be a sequence of arrays (prefill, then one per decode step) "
            f"or a 2-D array; got {type(activations).__name__}"
        )
    return list(activations)


def _chunk_items(
    activations: object, decode_batching_size: int, skip_prefill: bool
) -> list[list[Any]]:
    if decode_batching_size < 1:
        raise ProofInputError(f"decode_batching_size must be >= 1, got {decode_batching_size}")
    items = _split_items(activations)
    if not items:
        raise ProofInputError("no activations: a completion needs at least one hidden state")
    tensors = sum(_is_tensor(item) for item in items)
    if 0 < tensors < len(items):
        # One kind per call, so that every chunk's top-k runs where the reference's would.
        raise ProofInputError("mix of torch tensors and other arrays: pass one kind only")
    chunks: list[list[Any]] = []
    start = 0
    if not skip_prefill:
        chunks.append(items[:1])
        start = 1
    chunks.extend(
        items[i : i + decode_batching_size] for i in range(start, len(items), decode_batching_size)
    )
    return chunks


def _bf16_bits(array: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """Flat bf16 bit patterns; floats are rounded to nearest even like torch."""
    if array.dtype.name == "bfloat16" and array.dtype.itemsize == 2:  # ml_dtypes
        return np.ascontiguousarray(array).reshape(-1).view(np.uint16)
    if array.dtype.kind != "f":
        raise ProofInputError(
            f"activations must be floating point (bf16, fp16, fp32, fp64), got {array.dtype}"
        )
    # fp64 goes through fp32 first, as torch's bf16 conversion does.
    with np.errstate(over="ignore"):  # fp64 beyond fp32's range becomes inf, rejected later
        u = np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.uint32)
    rounded = (u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _numpy_chunk(items: list[Any]) -> npt.NDArray[np.uint16]:
    arrays = []
    for item in items:
        if _is_tensor(item):
            raise ProofInputError("mix of torch tensors and other arrays: pass one kind only")
        try:
            arrays.append(np.asarray(item))
        except (TypeError, ValueError) as exc:
            raise ProofInputError(f"an activation is not an array: {exc}") from exc
    if len(arrays) == 1:
        bits = _bf16_bits(arrays[0])
    elif len({array.dtype for array in arrays}) == 1:
        # One conversion of the concatenation is much cheaper than one per decode step.
        bits = _bf16_bits(np.concatenate([array.reshape(-1) for array in arrays]))
    else:
        bits = np.concatenate([_bf16_bits(array) for array in arrays])
    if ((bits & _BF16_EXP_MASK) == _BF16_EXP_MASK).any():
        raise ProofInputError(
            "activations contain inf or NaN (after rounding to bf16): "
            "the model produced no usable hidden state"
        )
    return bits


# ------------------------------------------------------------------ torch-compatible top-k


def _heap_select(keys: npt.NDArray[np.int32], heap_len: int) -> list[int]:
    """Positions kept by libstdc++ ``__heap_select`` with ``comp = a > b``.

    The heap is a min-heap of the best ``heap_len`` values seen so far; a later value
    enters only if strictly greater than the heap's top, and which of several equal
    values leaves is decided by the heap's layout, so the sift steps are replayed exactly.
    Only values above the current top can enter, which NumPy filters block by block.
    """
    hv: list[int] = keys[:heap_len].tolist()
    hi: list[int] = list(range(heap_len))
    n = heap_len

    def adjust(hole: int, value: int, index: int) -> None:
        top = hole
        second = hole
        while second < (n - 1) // 2:
            second = 2 * (second + 1)
            if hv[second] > hv[second - 1]:
                second -= 1
            hv[hole] = hv[second]
            hi[hole] = hi[second]
            hole = second
        if n % 2 == 0 and second == (n - 2) // 2:
            second = 2 * (second + 1)
            hv[hole] = hv[second - 1]
            hi[hole] = hi[second - 1]
            hole = second - 1
        parent = (hole - 1) // 2
        while hole > top and hv[parent] > value:
            hv[hole] = hv[parent]
            hi[hole] = hi[parent]
            hole = parent
            parent = (hole - 1) // 2
        hv[hole] = value
        hi[hole] = index

    if n >= 2:
        for parent in range((n - 2) // 2, -1, -1):
            adjust(parent, hv[parent], hi[parent])
    for block in range(heap_len, keys.size, _HEAP_SCAN_BLOCK):
        window = keys[block : block + _HEAP_SCAN_BLOCK]
        candidates = np.flatnonzero(window > hv[0])
        if candidates.size == 0:
            continue
        values = window[candidates].tolist()
        for offset, value in zip(candidates.tolist(), values, strict=True):
            if value > hv[0]:
                adjust(0, value, block + offset)
    return hi


def _nth_element_topk(keys: npt.NDArray[np.int32], k: int) -> npt.NDArray[np.int64]:
    """Positions ``[0, k)`` after libstdc++ ``nth_element(nth = k - 1)``, ``comp = a > b``.

    Introselect with median-of-three pivots and Hoare partitioning; each partition is
    replayed in one vectorised step (the swaps pair the i-th left stop with the i-th
    right stop until they cross), the final <= 3 elements by insertion sort.
    """
    vals = keys.astype(np.int64)
    idx = np.arange(keys.size, dtype=np.int64)
    nth = k - 1
    first, last = 0, keys.size
    depth = 2 * (keys.size.bit_length() - 1)

    def swap(a: int, b: int) -> None:
        vals[a], vals[b] = vals[b], vals[a]
        idx[a], idx[b] = idx[b], idx[a]

    while last - first > 3:
        if depth == 0:
            kept = _heap_select(vals[first:last].astype(np.int32), nth + 1 - first)
            tail = idx[first:last][np.asarray(kept, dtype=np.int64)]
            return np.concatenate([idx[:first], tail])
        depth -= 1
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        if vals[a] > vals[b]:
            if vals[b] > vals[c]:
                swap(first, b)
            elif vals[a] > vals[c]:
                swap(first, c)
            else:
                swap(first, a)
        elif vals[a] > vals[c]:
            swap(first, a)
        elif vals[b] > vals[c]:
            swap(first, c)
        else:
            swap(first, b)
        pivot = vals[first]
        left = np.flatnonzero(vals[first + 1 : last] <= pivot) + (first + 1)
        right = (np.flatnonzero(vals[first:last] >= pivot) + first)[::-1]
        m = min(left.size, right.size)
        crossed = np.flatnonzero(left[:m] >= right[:m])
        j = int(crossed[0]) if crossed.size else m
        if j:
            lpos, rpos = left[:j], right[:j]
            vals[lpos], vals[rpos] = vals[rpos].copy(), vals[lpos].copy()
            idx[lpos], idx[rpos] = idx[rpos].copy(), idx[lpos].copy()
            next_left = int(left[j]) if j < left.size else keys.size
            cut = min(next_left, int(right[j - 1]))
        else:
            cut = int(left[0])
        if cut <= nth:
            first = cut
        else:
            last = cut
    for i in range(first + 1, last):  # insertion sort of the last <= 3 elements
        value, index = vals[i], idx[i]
        if value > vals[first]:
            vals[first + 1 : i + 1] = vals[first:i].copy()
            idx[first + 1 : i + 1] = idx[first:i].copy()
            vals[first], idx[first] = value, index
        else:
            hole = i
            while value > vals[hole - 1]:
                vals[hole], idx[hole] = vals[hole - 1], idx[hole - 1]
                hole -= 1
            vals[hole], idx[hole] = value, index
    return idx[:k]


def _topk_indices(bits: npt.NDArray[np.uint16], k: int) -> npt.NDArray[np.int64]:
    """The index set ``torch.topk(|x|, k)`` selects on CPU, for bf16 bit patterns ``bits``."""
    # For finite non-negative floats the bit pattern orders like the value.
    keys = (bits & _BF16_ABS_MASK).astype(np.int32)
    n = keys.size
    threshold = np.partition(keys, n - k)[n - k]
    above = keys > threshold
    if int(above.sum()) + int((keys == threshold).sum()) == k:
        return np.flatnonzero(keys >= threshold)  # no tie at the boundary
    if k * _PARTIAL_SORT_FACTOR <= n:
        return np.asarray(_heap_select(keys, k), dtype=np.int64)
    return _nth_element_topk(keys, k)


@dataclass(frozen=True)
class _TopK:
    indices: npt.NDArray[np.int64]
    bits: npt.NDArray[np.uint16]
    chunk_size: int


def _select(chunk: list[Any], k: int) -> _TopK:
    """Indices and bf16 bits of the top-k magnitudes of one chunk."""
    if any(_is_tensor(item) for item in chunk):
        return _select_torch(chunk, k)
    bits = _numpy_chunk(chunk)
    _check_chunk_size(bits.size, k)
    indices = _topk_indices(bits, k)
    return _TopK(indices, bits[indices], bits.size)


def _check_chunk_size(n: int, k: int) -> None:
    if n < k:
        raise ProofInputError(
            f"a chunk holds {n} values, fewer than topk={k}: use a smaller topk "
            "or a larger decode_batching_size"
        )
    if n >= 2**31:
        raise ProofInputError(f"a chunk of {n} values is too large for 32-bit indices")


def _select_torch(chunk: list[Any], k: int) -> _TopK:
    torch = _torch_module()
    assert torch is not None  # _is_tensor found a tensor
    for item in chunk:
        if not isinstance(item, torch.Tensor):
            raise ProofInputError("mix of torch tensors and other arrays: pass one kind only")
        if not item.is_floating_point():
            raise ProofInputError(f"activations must be floating point, got {item.dtype}")
    if len({item.dtype for item in chunk}) == 1:
        flat = torch.cat([item.detach().reshape(-1) for item in chunk]).to(torch.bfloat16)
    else:
        flat = torch.cat([item.detach().reshape(-1).to(torch.bfloat16) for item in chunk])
    _check_chunk_size(flat.numel(), k)
    if not bool(torch.isfinite(flat).all()):
        raise ProofInputError("activations contain inf or NaN (after rounding to bf16)")
    # topk on the tensor's own device, as the reference does: same device, same ties.
    indices = flat.abs().topk(k).indices
    values = flat[indices].cpu().view(torch.int16).numpy().view(np.uint16)
    return _TopK(indices.cpu().numpy().astype(np.int64), values, int(flat.numel()))


# ------------------------------------------------------------------ GF(65497) polynomials


@functools.cache
def _inverse_table() -> npt.NDArray[np.int64]:
    """Multiplicative inverses of GF(65497) by Fermat (a**(p-2)); 0 maps to 0.

    Cached because it is a constant of the field, computed once per process (~5 ms).
    """
    base = np.arange(FIELD_PRIME, dtype=np.int64)
    result = np.ones(FIELD_PRIME, dtype=np.int64)
    exponent = FIELD_PRIME - 2
    while exponent:
        if exponent & 1:
            result = result * base % FIELD_PRIME
        base = base * base % FIELD_PRIME
        exponent >>= 1
    result[0] = 0
    result.flags.writeable = False
    return result


def _injective_modulus(indices: npt.NDArray[np.int64]) -> int:
    """The largest m <= 65497 under which the indices stay distinct (as the reference)."""
    if int(indices.max()) < FIELD_PRIME:
        return FIELD_PRIME
    for high in range(FIELD_PRIME, 0, -_MODULUS_BATCH):
        moduli = np.arange(high, max(high - _MODULUS_BATCH, 0), -1, dtype=np.int64)
        residues = np.sort(indices[None, :] % moduli[:, None], axis=1)
        distinct = (np.diff(residues, axis=1) != 0).all(axis=1)
        if distinct.any():
            return int(moduli[int(np.argmax(distinct))])
    raise ProofInputError("no modulus <= 65497 keeps the top-k indices distinct")


def _interpolate(xs: npt.NDArray[np.int64], ys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Coefficients (ascending) of the polynomials through (xs[c], ys[c]) for every row c.

    Newton's divided differences, then expansion into the monomial basis; each step is
    vectorised over the points and over all chunks. The interpolating polynomial of
    degree < k is unique, so this equals the reference's result whatever the point order.
    """
    inverse = _inverse_table()
    p = FIELD_PRIME
    k = xs.shape[1]
    dd = ys % p
    for step in range(1, k):
        numerator = (dd[:, step:] - dd[:, step - 1 : -1]) % p
        denominator = (xs[:, step:] - xs[:, :-step]) % p
        dd[:, step:] = numerator * inverse[denominator] % p
    coeffs = np.zeros_like(dd)
    factor = np.zeros_like(dd)
    factor[:, 0] = 1
    for i in range(k):
        coeffs[:, : i + 1] = (coeffs[:, : i + 1] + dd[:, i : i + 1] * factor[:, : i + 1]) % p
        if i + 1 < k:
            shifted = factor * ((-xs[:, i : i + 1]) % p)
            shifted[:, 1 : i + 2] += factor[:, : i + 1]
            factor = shifted % p
    return coeffs


def _evaluate(coeffs: npt.NDArray[np.int64], xs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Horner evaluation of each row's polynomial at that row's points."""
    result = np.repeat(coeffs[:, -1:], xs.shape[1], axis=1)
    for i in range(coeffs.shape[1] - 2, -1, -1):
        result = (result * xs + coeffs[:, i : i + 1]) % FIELD_PRIME
    return result


# ------------------------------------------------------------------ build and verify


def _validate_topk(topk: int) -> None:
    if not 1 <= topk <= FIELD_PRIME:
        raise ProofInputError(f"topk must lie in 1..{FIELD_PRIME}, got {topk}")


def build_proofs(
    activations: object,
    *,
    decode_batching_size: int = DEFAULT_DECODE_BATCHING_SIZE,
    topk: int = DEFAULT_TOPK,
    skip_prefill: bool = False,
) -> list[bytes]:
    """Proof bytes for each chunk of the last hidden states of one completion.

    ``activations``: the prefill states (any shape, e.g. ``(prompt_len, hidden)``) followed
    by one state per decode step, as a sequence of NumPy arrays or torch tensors; or one
    2-D array whose rows are the steps. Same bytes as the reference's
    ``build_proofs_bytes(activations, decode_batching_size, topk, skip_prefill)``.
    """
    _validate_topk(topk)
    chunks = _chunk_items(activations, decode_batching_size, skip_prefill)
    selected = [_select(chunk, topk) for chunk in chunks]
    moduli = np.array([_injective_modulus(top.indices) for top in selected], dtype=np.int64)
    xs = np.stack([top.indices for top in selected]) % moduli[:, None]
    ys = np.stack([top.bits for top in selected]).astype(np.int64)
    coeffs = _interpolate(xs, ys)
    header = moduli.astype(">u2").reshape(-1, 1).view(np.uint8)
    body = coeffs.astype(">u2").view(np.uint8)
    return [bytes(row) for row in np.concatenate([header, body], axis=1)]


@dataclass(frozen=True)
class ChunkVerification:
    """How far one chunk's recomputed top-k is from the proof (larger is worse)."""

    index: int
    exp_mismatches: int
    mant_err_mean: float
    mant_err_median: float


def verify_proofs(
    activations: object,
    proofs: Sequence[bytes],
    *,
    decode_batching_size: int = DEFAULT_DECODE_BATCHING_SIZE,
    topk: int = DEFAULT_TOPK,
    skip_prefill: bool = False,
) -> list[ChunkVerification]:
    """Compare recomputed hidden states with the prover's proofs, chunk by chunk.

    Raises `ProofDecodeError` for a malformed proof and `ProofMismatchError` when the
    number of proofs differs from the number of chunks; judge the result with `check`.
    Stricter than the reference in one point: a modulus other than 65497 on a chunk of at
    most 65497 values (which no honest prover emits) counts as every exponent differing.
    """
    _validate_topk(topk)
    chunks = _chunk_items(activations, decode_batching_size, skip_prefill)
    if isinstance(proofs, bytes | bytearray | str) or not isinstance(proofs, Sequence):
        raise ProofMismatchError(
            f"proofs must be a list of bytes (one per chunk), got {type(proofs).__name__}"
        )
    if len(proofs) != len(chunks):
        raise ProofMismatchError(
            f"the activations make {len(chunks)} chunks but {len(proofs)} proofs were given: "
            "the completion's length or the prover's chunking differs"
        )
    decoded = []
    for position, raw in enumerate(proofs):
        try:
            decoded.append(decode_proof(raw, topk=topk))
        except ProofDecodeError as exc:
            raise ProofDecodeError(f"proof {position}: {exc}") from exc
    selected = [_select(chunk, topk) for chunk in chunks]
    moduli = np.array([proof.modulus for proof in decoded], dtype=np.int64)
    # A chunk of at most 65497 values has distinct indices under 65497 itself, and the
    # reference picks the largest injective modulus: any other modulus is not honest.
    small = np.array([top.chunk_size <= FIELD_PRIME for top in selected])
    impossible = small & (moduli != FIELD_PRIME)
    coeffs = np.array([proof.coeffs for proof in decoded], dtype=np.int64)
    xs = np.stack([top.indices for top in selected]) % moduli[:, None]
    claimed = _evaluate(coeffs, xs)
    actual = np.stack([top.bits for top in selected]).astype(np.int64)
    exp_differs = (claimed & _BF16_EXP_MASK) != (actual & _BF16_EXP_MASK)
    mant_err = np.abs((claimed & _BF16_MANT_MASK) - (actual & _BF16_MANT_MASK))
    exp_differs[impossible] = True
    results = []
    for row in range(len(chunks)):
        errors = mant_err[row][~exp_differs[row]]
        if errors.size:
            # Exact integer sum then one division: what statistics.mean returns.
            mean = int(errors.sum()) / errors.size
            median = float(np.median(errors))
        else:
            mean = median = _NO_MANTISSA_ERROR
        results.append(
            ChunkVerification(
                index=row,
                exp_mismatches=int(exp_differs[row].sum()),
                mant_err_mean=mean,
                mant_err_median=median,
            )
        )
    return results


# ------------------------------------------------------------------ judging


class ProofThresholds(BaseModel):
    """Acceptance limits for one chunk; a chunk passes when it is at or below all three.

    The defaults are the values TOPLOC's authors use for bf16 with top-128 (paper and
    reference integrations): honest recomputation on different GPUs, kernels or batch
    sizes stays well inside them, a different model or prompt does not.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    max_exp_mismatches: int = Field(default=90, ge=0)
    """Most top-k entries whose bf16 exponent may differ from the proof (of topk=128).
    Raise it only for models whose hidden states change scale under benign noise."""

    max_mant_err_mean: float = Field(default=10.0, ge=0)
    """Largest allowed mean |mantissa difference| (in bf16 units of the 7-bit mantissa)
    over the entries whose exponent matched."""

    max_mant_err_median: float = Field(default=8.0, ge=0)
    """Largest allowed median |mantissa difference| over the entries whose exponent
    matched; robust to a few outliers that the mean would punish."""

    @classmethod
    def same_hardware(cls) -> ProofThresholds:
        """Tight limits for a validator that recomputes on the prover's kind of hardware,
        dtype and kernels (e.g. the embedded CPU set-up).

        The defaults tolerate GPU-to-GPU nondeterminism and therefore also accept a 1 %
        perturbation of the model (mantissa error mean ~1-3, median 1-3). Honest
        recomputation on the same hardware differs from the proof only in a few rounded
        entries (median 0, mean < 0.5), so a median above 0.5 marks a changed model.
        """
        return cls(max_exp_mismatches=16, max_mant_err_mean=1.0, max_mant_err_median=0.5)


@dataclass(frozen=True)
class ProofVerdict:
    """The outcome of checking all chunks of one completion."""

    passed: bool
    reason: str
    chunks: int
    failing_chunk: ChunkVerification | None
    worst_exp_mismatches: int
    worst_mant_err_mean: float
    worst_mant_err_median: float


def check(results: Sequence[ChunkVerification], thresholds: ProofThresholds) -> ProofVerdict:
    """Pass only if there is at least one chunk and every chunk is within the thresholds."""
    if not results:
        return ProofVerdict(False, "no chunks were verified", 0, None, 0, math.nan, math.nan)
    failing = None
    reason = "all chunks within thresholds"
    for result in results:
        problems = []
        if result.exp_mismatches > thresholds.max_exp_mismatches:
            problems.append(
                f"{result.exp_mismatches} exponent mismatches > {thresholds.max_exp_mismatches}"
            )
        if not result.mant_err_mean <= thresholds.max_mant_err_mean:
            problems.append(
                f"mantissa error mean {result.mant_err_mean:g} > {thresholds.max_mant_err_mean:g}"
            )
        if not result.mant_err_median <= thresholds.max_mant_err_median:
            problems.append(
                f"mantissa error median {result.mant_err_median:g} > "
                f"{thresholds.max_mant_err_median:g}"
            )
        if problems:
            failing = result
            reason = f"chunk {result.index}: " + "; ".join(problems)
            break
    return ProofVerdict(
        passed=failing is None,
        reason=reason,
        chunks=len(results),
        failing_chunk=failing,
        worst_exp_mismatches=max(r.exp_mismatches for r in results),
        worst_mant_err_mean=max(r.mant_err_mean for r in results),
        worst_mant_err_median=max(r.mant_err_median for r in results),
    )

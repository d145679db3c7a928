"""Seeded Gumbel-max sampling: the half of a rollout's proof that TOPLOC cannot give.

A worker does not draw tokens from an RNG of its own. It samples token ``t`` at position
``p`` of sample ``i`` of a lease whose seed is ``s`` as

    t = argmax_v ( float32(logits[v]) + float32(T) * g(s, i, p, v) )        (T > 0)
    t = argmax_v ( logits[v] )                                              (T = 0)

where ``g`` is the Gumbel noise specified below and ``p = len(prompt) + len(output so
far)``. Because ``argmax(l/T + g) == argmax(l + T*g)`` and ``g`` is Gumbel(0, 1), each token
is an exact sample of ``softmax(logits / T)`` (the Gumbel-max trick), so nothing is lost
against ordinary sampling. Because the coordinator chooses ``s``, a validator that
prefills prompt + completion with the same policy can re-run the argmax on its own
logits (``replay``) and count how many claimed tokens it reproduces: an honest worker
reproduces (nearly) all of them, while cherry-picking among several seeds, a different
temperature, injected text or another model only reproduce tokens that were nearly
certain anyway. Ties in the argmax go to the lowest token id (numpy and torch agree).

## The noise function (normative)

Words are unsigned 32-bit; ``*``, ``+`` and ``^`` wrap modulo 2**32.

    mix32(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    key  = mix32(mix32(mix32(mix32(lo32(s) ^ 0x9E3779B9) ^ hi32(s)) ^ i) ^ p)
    bits = mix32(key ^ v)
    u    = (2 * (bits >> 8) + 1) * 2**-25          # 24 random bits; exact in binary64; 0 < u < 1
    g    = float32( -LOG(-LOG(u)) )                # LOG evaluated in binary64 as below

``mix32`` is Chris Wellons' "lowbias32" integer hash (a bijection on 32-bit words with
very low avalanche bias). There is no RNG state: any (seed, sample, position, token) can be
evaluated on its own, on any device, in any order, which is what lets a validator check a
single position of a long completion.

## Why CPU and GPU give bit-identical noise

The integer part is exact by construction: words are held in int64 and every product is
split so that no intermediate exceeds 2**49 (``_mul32``), so no backend ever overflows or
needs unsigned 64-bit arithmetic (which torch lacks on some devices).

The float part is the delicate one: ``log`` from libm or CUDA is not correctly rounded and
differs between platforms in the last bit, and rounding such a float64 result to float32
would still flip a bit whenever the value lies within an ulp of a float32 rounding
boundary (rare, but "rare" is not "never"). So ``LOG`` is *not* a library log: it is the
fixed algorithm in ``_log_from_parts`` — an exact ``frexp`` range reduction, then
``2*atanh(s)`` with ``s = (m-1)/(m+1)`` as a fixed Horner polynomial, then ``e*ln2`` in
Cody-Waite hi/lo parts. It uses only IEEE-754 binary64 ``+ - * /`` on whole arrays (each
correctly rounded on every IEEE device, CUDA included) in a fixed order, plus exact
operations (``frexp``, doubling, selection, int->float of values below 2**53, negation).
Every step is therefore determined bit for bit, and so is the final rounding to float32.
Its accuracy (relative error below 1e-13) only matters for the sampling distribution,
not for reproducibility. Two rules keep this true:

* never divide by a Python scalar (torch's CUDA kernel turns that into a multiplication
  by the reciprocal): all constants are multipliers, and the one division is array/array;
* never fuse these operations (``torch.compile``, ``jit`` or fast-math may contract
  ``a*b + c`` into an FMA): the torch path runs in eager mode and is excluded from
  compilation with ``torch.compiler.disable``.

The score ``float32(logits) + float32(T) * g`` is likewise two correctly rounded float32
operations; engines that sample this way (a vLLM logits processor, an HF loop) must form it
in exactly this order. What can still differ between a worker and a validator is the
logits themselves (kernels, batch shapes, precision); that only flips tokens whose top two
perturbed scores nearly tie, which is why ``SamplingCheck`` asks for a rate, not 100 %.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coderepair.protocol.errors import ProtocolError, VerificationError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ReplayReport",
    "SamplingCheck",
    "SamplingCheckError",
    "SamplingError",
    "behaviour_logprobs",
    "check",
    "derive_sample_seed",
    "gumbel_noise",
    "replay",
    "sample_tokens",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_SEED_SALT = 0x9E3779B9
_MIX_C1 = 0x7FEB352D
_MIX_C2 = 0x846CA68B
_TWO_POW_M25 = 2.0**-25
_SQRT_HALF = math.sqrt(0.5)  # only a branch point: any fixed value near it would do
# Cody-Waite split of ln 2 (fdlibm): _LN2_HI has 32 trailing zero bits, so e * _LN2_HI is
# exact for every exponent that occurs here.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
# 2*atanh(s) = 2s * (1 + z/3 + z^2/5 + ...), z = s^2 <= 0.0295 after the reduction;
# eight terms leave a relative error below 1e-13. The coefficients are Python's correctly
# rounded 1/(2k+1), identical on every platform.
_ATANH_COEFFS = tuple(1.0 / (2 * k + 1) for k in range(8))
# An upper bound of every noise value: the largest u is 1 - 2**-25, where g = 17.33 (the
# own log is accurate to ~1e-13, far inside the margin).
_G_BOUND = np.float32(17.5)
# Rows per chunk in `replay`: bounds the [rows, vocab] int64 temporaries to ~100 MB.
_REPLAY_CHUNK_ELEMENTS = 1 << 23


class SamplingError(ProtocolError):
    """Arguments to the sampler or the replay are out of their documented domain."""


class SamplingCheckError(VerificationError):
    """A replay reproduced too few of the claimed tokens: the sampling proof failed."""


# ---------------------------------------------------------------- the noise function


def _mul32(x: Any, c: int) -> Any:
    """``x * c mod 2**32`` for int64 words ``x < 2**32`` without any intermediate >= 2**49.

    Works unchanged on Python ints, numpy int64 arrays and torch int64 tensors.
    """
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Any) -> Any:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_C2)
    return x ^ (x >> 16)


def _seed_word(seed: int) -> int:
    """The part of the row key that depends on the seed alone (Python ints)."""
    return int(_mix32(_mix32((seed & _MASK32) ^ _SEED_SALT) ^ (seed >> 32)))


def _row_key(seed_word: Any, sample_index: Any, position: Any) -> Any:
    return _mix32(_mix32(seed_word ^ sample_index) ^ position)


def _log_from_parts(m: Any, e: Any) -> Any:
    """``log(m * 2**e)`` for ``m`` in [sqrt(1/2), sqrt(2)), float64 ``e``: fixed IEEE steps."""
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = z * _ATANH_COEFFS[-1]
    for coeff in reversed(_ATANH_COEFFS[1:-1]):
        p = (p + coeff) * z
    p = p + _ATANH_COEFFS[0]
    return e * _LN2_HI + (e * _LN2_LO + (s + s) * p)


def _log_numpy(x: np.ndarray) -> np.ndarray:
    m, e = np.frexp(x)
    small = m < _SQRT_HALF
    m = np.where(small, m + m, m)
    ef = e.astype(np.float64) - small.astype(np.float64)
    return np.asarray(_log_from_parts(m, ef))


def _log_torch(x: torch.Tensor) -> torch.Tensor:
    th = _torch()
    m, e = th.frexp(x)
    small = m < _SQRT_HALF
    m = th.where(small, m + m, m)
    ef = e.to(th.float64) - small.to(th.float64)
    result: torch.Tensor = _log_from_parts(m, ef)
    return result


def _check_word_range(name: str, lo: int, hi: int, bound: int) -> None:
    if lo < 0 or hi >= bound:
        raise SamplingError(
            f"{name} must lie in [0, {bound}) but ranges over [{lo}, {hi}]; "
            "pass non-negative values that fit the protocol's word size"
        )


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise SamplingError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    _check_word_range("seed", seed, seed, 1 << 64)
    return seed


def _noise_numpy(keys: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    bits = _mix32(keys ^ token_ids)
    u = ((bits >> 8) * 2 + 1).astype(np.float64) * _TWO_POW_M25
    return (-_log_numpy(-_log_numpy(u))).astype(np.float32)


def _noise_torch(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    th = _torch()
    bits = _mix32(keys ^ token_ids)
    u = ((bits >> 8) * 2 + 1).to(th.float64) * _TWO_POW_M25
    return (-_log_torch(-_log_torch(u))).to(th.float32)


def _torch() -> ModuleType:
    # torch is optional (the `torch` extra): imported only once a tensor is passed in.
    import torch  # noqa: PLC0415

    return torch


def _is_torch(x: object) -> bool:
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(x, torch_module.Tensor)


def _as_int64_numpy(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise SamplingError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.size:
        _check_word_range(name, int(arr.min()), int(arr.max()), 1 << 32)
    return arr.astype(np.int64)


def _as_int64_torch(name: str, values: Any, device: torch.device) -> torch.Tensor:
    th = _torch()
    t = th.as_tensor(values, device=device)
    if t.dtype == th.bool or t.is_floating_point() or t.is_complex():
        raise SamplingError(f"{name} must be integers, got dtype {t.dtype}")
    t = t.to(th.int64)
    if t.numel():
        _check_word_range(name, int(t.min()), int(t.max()), 1 << 32)
    return t


def gumbel_noise(seed: int, sample_index: int, position: Any, token_ids: Any) -> Any:
    """The protocol's Gumbel(0, 1) noise for (seed, sample index, position, token id).

    ``position`` and ``token_ids`` are ints or arrays that broadcast together; the result
    is float32 of the broadcast shape. A torch tensor in either gives a torch tensor on its
    device, anything else a numpy array; both are bit-identical (see the module docstring).
    ``seed`` is a uint64, the other arguments uint32 words.
    """
    seed_word = _seed_word(_check_seed(seed))
    if isinstance(sample_index, bool) or not isinstance(sample_index, int | np.integer):
        raise SamplingError(f"sample_index must be an int, got {type(sample_index).__name__}")
    _check_word_range("sample_index", int(sample_index), int(sample_index), 1 << 32)
    if _is_torch(token_ids) or _is_torch(position):
        return _gumbel_noise_torch(seed_word, int(sample_index), position, token_ids)
    pos = _as_int64_numpy("position", position)
    tok = _as_int64_numpy("token_ids", token_ids)
    pos, tok = np.broadcast_arrays(pos, tok)
    shape = pos.shape
    keys = _row_key(seed_word, int(sample_index), pos.reshape(-1))
    return _noise_numpy(keys, tok.reshape(-1)).reshape(shape)


def _gumbel_noise_torch(seed_word: int, sample_index: int, position: Any, token_ids: Any) -> Any:
    th = _torch()
    device = next(x.device for x in (token_ids, position) if isinstance(x, th.Tensor))
    pos = _as_int64_torch("position", position, device)
    tok = _as_int64_torch("token_ids", token_ids, device)
    pos, tok = th.broadcast_tensors(pos, tok)
    keys = _row_key(seed_word, sample_index, pos)
    return _noise_torch_eager(keys, tok)


def _noise_torch_eager(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    result: torch.Tensor = _uncompiled_noise_torch()(keys, token_ids)
    return result


@functools.cache
def _uncompiled_noise_torch() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    # Fusion (FMA contraction) inside a compiled graph would change the bits, so the torch
    # path stays eager even when a caller compiles around it. Wrapped once: wrapping costs
    # more than the noise itself.
    th = _torch()
    return th.compiler.disable(_noise_torch)


def derive_sample_seed(lease_seed: int, sample_index: int) -> int:
    """A uint64 seed for one sample, derived from a lease seed with splitmix64.

    For coordinators that hand out one seed per lease but want independent-looking
    per-sample seeds to show; ``gumbel_noise`` already separates samples by index.
    """
    seed = _check_seed(lease_seed)
    if isinstance(sample_index, bool) or not isinstance(sample_index, int) or sample_index < 0:
        raise SamplingError(f"sample_index must be a non-negative int, got {sample_index!r}")
    z = (seed + (sample_index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# ---------------------------------------------------------------- sampling


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
        raise SamplingError(f"temperature must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t < 0.0:
        raise SamplingError(
            f"temperature must be finite and >= 0 (0 means greedy), got {temperature!r}"
        )
    return t


def _per_row(name: str, values: int | Sequence[int] | Any, rows: int) -> list[int]:
    if isinstance(values, int | np.integer) and not isinstance(values, bool):
        return [int(values)] * rows
    try:
        listed = values.tolist() if _is_torch(values) else values  # type: ignore[union-attr]
        # A flat list of Python ints is taken as is: numpy would turn a mix of small
        # seeds and seeds >= 2**63 into floats and lose their low bits.
        if isinstance(listed, list | tuple) and all(type(v) is int for v in listed):
            out = list(listed)
        else:
            out = list(np.asarray(listed).reshape(-1).tolist())
    except (TypeError, ValueError) as exc:
        raise SamplingError(f"{name} must be one int or {rows} ints, got {values!r}") from exc
    if len(out) != rows or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise SamplingError(
            f"{name} must be one int or {rows} ints (one per logits row), got {values!r}"
        )
    return out


def _row_keys(seeds: list[int], samples: list[int], positions: list[int]) -> list[int]:
    for s in samples:
        _check_word_range("sample_index", s, s, 1 << 32)
    for p in positions:
        _check_word_range("position", p, p, 1 << 32)
    return [
        int(_row_key(_seed_word(_check_seed(s)), i, p))
        for s, i, p in zip(seeds, samples, positions, strict=True)
    ]


def sample_tokens(
    logits: Any,
    *,
    seed: int | Sequence[int],
    sample_index: int | Sequence[int],
    positions: int | Sequence[int],
    temperature: float,
) -> Any:
    """Sample one token per row of ``logits`` ([V] or [B, V]) the protocol's way.

    ``argmax(float32(logits) + float32(T) * g)`` per row, or plain ``argmax`` at ``T = 0``.
    ``seed``, ``sample_index`` and ``positions`` are one value for all rows or one per row;
    the position of a generated token is ``len(prompt) + len(output so far)``. Returns
    int64 of shape ``logits.shape[:-1]`` (numpy in, numpy out; torch in, torch out).
    Noise is computed only for tokens that can still win, which gives exactly the same
    tokens at a fraction of the cost on peaked (real) logits.
    """
    t = _check_temperature(temperature)
    if _is_torch(logits):
        return _sample_torch(logits, seed, sample_index, positions, t)
    arr = np.asarray(logits)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0 or not np.issubdtype(arr.dtype, np.number):
        raise SamplingError(
            f"logits must be a numeric [V] or [B, V] array with V > 0, got shape {arr.shape} "
            f"and dtype {arr.dtype}"
        )
    rows = arr.reshape(-1, arr.shape[-1]).astype(np.float32)
    if np.isnan(rows).any():
        raise SamplingError("logits contain NaN; the model output is broken, not sampleable")
    if t > 0.0:
        n = rows.shape[0]
        keys = np.asarray(
            _row_keys(
                _per_row("seed", seed, n),
                _per_row("sample_index", sample_index, n),
                _per_row("positions", positions, n),
            ),
            dtype=np.int64,
        )
        out = _perturbed_argmax_numpy(rows, keys, np.float32(t))
    else:
        out = np.argmax(rows, axis=-1).astype(np.int64)
    return out.reshape(arr.shape[:-1])


def _perturbed_argmax_numpy(rows: np.ndarray, keys: np.ndarray, t32: np.float32) -> np.ndarray:
    """``argmax(rows + t32 * g)`` per row, evaluating ``g`` only where it can matter.

    Exact, not approximate: ``g <= _G_BOUND`` and float rounding is monotone, so a token
    with ``rows[v] + t32*_G_BOUND < score(argmax of rows)`` cannot reach the maximum (nor
    tie it). Skipping those tokens saves most of the hashing and logs on peaked logits.
    """
    n = np.arange(rows.shape[0])
    top = np.argmax(rows, axis=-1)
    reference = rows[n, top] + t32 * _noise_numpy(keys, top)
    bound = np.float32(t32 * _G_BOUND)
    r_idx, v_idx = np.nonzero(rows + bound >= reference[:, None])
    scores = np.full(rows.shape, -np.inf, dtype=np.float32)
    scores[r_idx, v_idx] = rows[r_idx, v_idx] + t32 * _noise_numpy(keys[r_idx], v_idx)
    out: np.ndarray = np.argmax(scores, axis=-1).astype(np.int64)
    return out


def _sample_torch(logits: Any, seed: Any, sample_index: Any, positions: Any, t: float) -> Any:
    th = _torch()
    if logits.dim() not in (1, 2) or logits.shape[-1] == 0 or logits.is_complex():
        raise SamplingError(
            f"logits must be a real [V] or [B, V] tensor with V > 0, got shape "
            f"{tuple(logits.shape)}"
        )
    rows = logits.reshape(-1, logits.shape[-1]).to(th.float32)
    if bool(th.isnan(rows).any()):
        raise SamplingError("logits contain NaN; the model output is broken, not sampleable")
    if t > 0.0:
        n = rows.shape[0]
        keys = th.tensor(
            _row_keys(
                _per_row("seed", seed, n),
                _per_row("sample_index", sample_index, n),
                _per_row("positions", positions, n),
            ),
            dtype=th.int64,
            device=rows.device,
        )
        out = _perturbed_argmax_torch(rows, keys, np.float32(t))
    else:
        out = th.argmax(rows, dim=-1)
    return out.reshape(logits.shape[:-1])


def _perturbed_argmax_torch(rows: torch.Tensor, keys: torch.Tensor, t32: np.float32) -> Any:
    """The torch twin of `_perturbed_argmax_numpy` (same float32 operations, same result)."""
    th = _torch()
    # Python floats holding float32 values: torch computes in float32 exactly like numpy.
    scale, bound = float(t32), float(np.float32(t32 * _G_BOUND))
    n = th.arange(rows.shape[0], device=rows.device)
    top = th.argmax(rows, dim=-1)
    reference = rows[n, top] + _noise_torch_eager(keys, top) * scale
    r_idx, v_idx = th.nonzero(rows + bound >= reference[:, None], as_tuple=True)
    scores = th.full(rows.shape, -math.inf, dtype=th.float32, device=rows.device)
    scores[r_idx, v_idx] = rows[r_idx, v_idx] + _noise_torch_eager(keys[r_idx], v_idx) * scale
    return th.argmax(scores, dim=-1)


# ---------------------------------------------------------------- replay and check


@dataclass(frozen=True)
class ReplayReport:
    """How many claimed tokens a validator's own logits reproduce under the leased seed."""

    n_tokens: int
    n_agree: int
    agreement_rate: float
    """``n_agree / n_tokens``; 1.0 for an empty completion (nothing contradicts it)."""
    first_mismatch: int | None
    """Index into the completion of the first token not reproduced, or None."""


def _claimed_tokens(tokens: Any, length: int, vocab: int) -> np.ndarray:
    if _is_torch(tokens):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise SamplingError(
            f"tokens must be a flat sequence of {length} ids (one per logits row), "
            f"got shape {arr.shape}"
        )
    if length and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise SamplingError(f"tokens must be integer ids, got dtype {arr.dtype}")
    if length and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
        raise SamplingError(
            f"token ids must lie in [0, {vocab}) for these logits, got range "
            f"[{int(arr.min())}, {int(arr.max())}]: the completion is not from this vocabulary"
        )
    return arr.astype(np.int64)


def replay(
    logits: Any,
    tokens: Any,
    *,
    seed: int,
    sample_index: int,
    start_position: int,
    temperature: float,
) -> ReplayReport:
    """Re-sample a completion on the validator's logits ([L, V]) and count agreements.

    Row ``j`` of ``logits`` must be the distribution the validator's model gives for
    completion token ``j`` (teacher forcing on prompt + claimed completion), whose
    position is ``start_position + j`` (``start_position = len(prompt)``).
    """
    t = _check_temperature(temperature)
    shape = tuple(logits.shape) if _is_torch(logits) else np.shape(logits)
    if len(shape) != 2 or shape[1] == 0:
        raise SamplingError(f"logits must be [L, V] with V > 0, got shape {shape}")
    length, vocab = shape
    claimed = _claimed_tokens(tokens, length, vocab)
    if isinstance(start_position, bool) or not isinstance(start_position, int):
        raise SamplingError(f"start_position must be an int, got {start_position!r}")
    _check_word_range("positions", start_position, start_position + max(length - 1, 0), 1 << 32)
    chunk = max(1, _REPLAY_CHUNK_ELEMENTS // vocab)
    parts: list[np.ndarray] = []
    for lo in range(0, length, chunk):
        hi = min(length, lo + chunk)
        sampled = sample_tokens(
            logits[lo:hi],
            seed=seed,
            sample_index=sample_index,
            positions=list(range(start_position + lo, start_position + hi)),
            temperature=t,
        )
        if _is_torch(sampled):
            sampled = sampled.cpu().numpy()
        parts.append(np.asarray(sampled, dtype=np.int64))
    agree = np.concatenate(parts) == claimed if parts else np.zeros(0, dtype=bool)
    n_agree = int(agree.sum())
    mismatches = np.flatnonzero(~agree)
    return ReplayReport(
        n_tokens=length,
        n_agree=n_agree,
        agreement_rate=n_agree / length if length else 1.0,
        first_mismatch=int(mismatches[0]) if mismatches.size else None,
    )


def behaviour_logprobs(logits: Any, tokens: Any, temperature: float) -> Any:
    """``log_softmax(logits / T)`` at the chosen tokens: what a worker reports per token.

    ``logits`` is [L, V], ``tokens`` [L]. At ``T = 0`` (greedy) the sampling distribution
    is the limit one-hot: 0.0 where the token is the argmax, ``-inf`` elsewhere. Returns
    float32 ([L]; numpy in, numpy out; torch in, torch out).
    """
    t = _check_temperature(temperature)
    shape = tuple(logits.shape) if _is_torch(logits) else np.shape(logits)
    if len(shape) != 2 or shape[1] == 0:
        raise SamplingError(f"logits must be [L, V] with V > 0, got shape {shape}")
    claimed = _claimed_tokens(tokens, shape[0], shape[1])
    if _is_torch(logits):
        th = _torch()
        rows = logits.to(th.float32)
        if bool(th.isnan(rows).any()):
            raise SamplingError("logits contain NaN; no distribution to report logprobs of")
        index = th.as_tensor(claimed, device=rows.device)[:, None]
        if t == 0.0:
            best = th.argmax(rows, dim=-1, keepdim=True)
            zero = th.zeros(index.shape, dtype=th.float32, device=rows.device)
            return th.where(best == index, zero, zero - math.inf)[:, 0]
        logp = th.log_softmax(rows / t, dim=-1)
        return th.gather(logp, -1, index)[:, 0]
    rows64 = np.asarray(logits, dtype=np.float64)
    if np.isnan(rows64).any():
        raise SamplingError("logits contain NaN; no distribution to report logprobs of")
    if t == 0.0:
        best = np.argmax(rows64, axis=-1)
        return np.where(best == claimed, 0.0, -np.inf).astype(np.float32)
    scaled = rows64 / t
    top = scaled.max(axis=-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=-1))
    picked = np.take_along_axis(scaled, claimed[:, None], axis=-1)[:, 0]
    return (picked - logz).astype(np.float32)


class SamplingCheck(BaseModel):
    """Thresholds of the sampling-replay audit (part of the coordinator's validation config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_agreement_rate: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description=(
            "Smallest fraction of claimed tokens the validator's replay must reproduce. "
            "Honest workers lose only near-ties caused by logit differences between engines "
            "(fp32 vLLM-CPU vs HF reproduced 1024/1024 tokens); a wrong seed keeps only the "
            "tokens that were nearly certain anyway. Lower it for low-precision (bf16) "
            "workers, raise it when worker and validator run the same engine and precision."
        ),
    )


def check(report: ReplayReport, cfg: SamplingCheck) -> None:
    """Raise ``SamplingCheckError`` unless the replay agreed often enough."""
    if report.agreement_rate < cfg.min_agreement_rate:
        raise SamplingCheckError(
            f"sampling replay reproduced {report.n_agree} of {report.n_tokens} tokens "
            f"(rate {report.agreement_rate:.4f} < required {cfg.min_agreement_rate}); first "
            f"mismatch at completion index {report.first_mismatch}. The tokens were not "
            "sampled with the leased seed, temperature and policy: resubmit samples "
            "generated with the lease's sampling parameters"
        )

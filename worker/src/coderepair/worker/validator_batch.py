"""The validator's checks over many completions at once: sampling replay and proofs.

`coderepair.worker.validator` prefills a batch of submissions and hands the hidden rows
here. Both checks give exactly what the protocol's own functions give one completion
at a time, for a fraction of the cost:

* `replay_claims`: the token `sampling.sample_tokens` picks on every row, the score gap
  of the claimed token, and its recomputed behaviour logprob. The sampler's token is
  found from the claimed token's side: only tokens whose logit plus the largest possible
  noise reaches the better of the claimed and the top-logit token's score can win; of
  those, only the ones whose noise, estimated with torch's own log from the protocol's
  hash, comes within a safe slack get the protocol's exact noise. A few exact noise
  values per row instead of thousands (SmolLM2: ~9,000 tokens pass the first filter).
* `verify_claimed_proofs`: `proofs.verify_proofs` for every submission, with one
  ``topk`` per chunk size and one polynomial evaluation for the whole batch.

A test pins both to the protocol (`sample_tokens`, `verify_proofs`) on random inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from coderepair.protocol import proofs, sampling
from coderepair.protocol.errors import ProtocolError
from coderepair.worker.engines.base import PROOF_DECODE_BATCHING_SIZE, PROOF_TOPK

__all__ = ["Claim", "ValidatorError", "replay_claims", "verify_claimed_proofs"]

# Rows x vocabulary of logits held at once (16 MB of float32): bounded memory, and
# lm_head still runs as a GEMM large enough for full speed.
_LOGIT_CHUNK_ELEMENTS = 1 << 22
# An upper bound of the protocol's Gumbel noise (at most 17.33, see sampling._G_BOUND):
# any bound at or above the true one keeps the replay exact, a larger one only slower.
_G_BOUND = np.float32(17.5)
# The protocol's hash constants (normative text in coderepair.protocol.sampling), used
# only to skip tokens that cannot win; a test pins them to the protocol's noise.
_MASK32 = 0xFFFFFFFF
_SEED_SALT = 0x9E3779B9
_MIX_C1 = 0x7FEB352D
_MIX_C2 = 0x846CA68B
# bf16 fields and the "no exponent matched" sentinel, as in coderepair.protocol.proofs.
_BF16_EXP_MASK = 0x7F80
_BF16_MANT_MASK = 0x007F
_NO_MANTISSA_ERROR = float(2**64)


class ValidatorError(ProtocolError):
    """The validator cannot judge what it was given (caller error, not a worker's)."""


@dataclass(frozen=True)
class Claim:
    """What the checks need of one submission (already validated by the validator)."""

    prompt_len: int
    completion: Sequence[int]
    seed: int
    sample_index: int
    temperature: float
    proof: Sequence[bytes]


# ---------------------------------------------------------------- sampling replay


def replay_claims(
    model: Any, hidden: list[torch.Tensor], batch: list[Claim]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every completion row of the batch: the token the leased sampler picks on the
    validator's logits, the score gap ``score(picked) - score(claimed)`` (0 where they
    agree) and the claimed token's recomputed behaviour logprob.

    The picked token is exactly `sampling.sample_tokens`'s, but found from the claimed
    token's side: only tokens whose logit plus the largest possible noise reaches the
    better of the claimed and the top-logit token's score can win, and of those only the
    ones whose estimated noise comes close get exact noise. The logits exist one chunk
    of rows at a time (bounded memory).
    """
    rows = torch.cat(hidden)
    n_rows = rows.shape[0]
    vocab = int(model.config.vocab_size)
    claimed = torch.tensor([t for p in batch for t in p.completion], dtype=torch.long)
    positions = np.concatenate(
        [np.arange(p.prompt_len, p.prompt_len + len(p.completion)) for p in batch]
    ).astype(np.int64)
    scale = torch.tensor(
        [np.float32(p.temperature) for p in batch for _ in p.completion], dtype=torch.float32
    )
    bound = torch.tensor(
        [np.float32(np.float32(p.temperature) * _G_BOUND) for p in batch for _ in p.completion],
        dtype=torch.float32,
    )
    starts = np.cumsum([0] + [len(p.completion) for p in batch])
    sampled = torch.empty(n_rows, dtype=torch.long)
    gaps = torch.empty(n_rows, dtype=torch.float32)
    logprobs = torch.empty(n_rows, dtype=torch.float32)
    step = max(1, _LOGIT_CHUNK_ELEMENTS // vocab)
    for lo in range(0, n_rows, step):
        hi = min(n_rows, lo + step)
        weight = model.lm_head.weight
        logits = model.lm_head(rows[lo:hi].to(weight.dtype)).float().cpu()
        if not bool(torch.isfinite(logits.sum())):  # one pass, cheaper than isnan().any()
            raise ValidatorError(
                "the policy's logits contain NaN or inf: the loaded weights are broken; reload them"
            )
        part = slice(lo, hi)
        noise = _NoiseSource(batch, starts, positions, lo, hi)
        sampled[part], gaps[part] = _pick(logits, claimed[part], scale[part], bound[part], noise)
        for temperature in {p.temperature for p in _overlapping(batch, starts, lo, hi)}:
            mine = torch.nonzero(scale[part] == float(np.float32(temperature)))[:, 0]
            whole = mine.numel() == hi - lo
            logprobs[lo + mine] = _logprobs(
                logits if whole else logits[mine], claimed[lo + mine], temperature
            )
    return sampled, gaps, logprobs


def _logprobs(logits: torch.Tensor, claimed: torch.Tensor, temperature: float) -> torch.Tensor:
    """`sampling.behaviour_logprobs` (same torch expressions) without its input checks."""
    if temperature == 0.0:  # greedy: all the mass on the argmax
        best = torch.argmax(logits, dim=-1) == claimed
        return torch.where(best, 0.0, -math.inf)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, claimed[:, None])[:, 0]


def _pick(
    logits: torch.Tensor,
    claimed: torch.Tensor,
    scale: torch.Tensor,
    bound: torch.Tensor,
    noise: _NoiseSource,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's token per row and its score's lead over the claimed token's."""
    n = torch.arange(logits.shape[0])
    top = torch.argmax(logits, dim=-1)
    # Scores formed exactly like the sampler's: float32(logit) + float32(T) * g.
    claimed_score = logits[n, claimed] + noise(n, claimed) * scale
    top_score = logits[n, top] + noise(n, top) * scale
    reference = torch.maximum(claimed_score, top_score)
    # g <= _G_BOUND and rounding is monotone: a token below this line cannot win or tie.
    r_idx, v_idx = torch.nonzero(logits + bound[:, None] >= reference[:, None], as_tuple=True)
    # Of those, keep the ones whose noise, approximated with the library log (error
    # ~1e-15, far inside the slack that also covers the three float32 roundings of a
    # score), reaches the reference: exact noise for a few tokens per row, not thousands.
    picked_logits = logits[r_idx, v_idx].double()
    ref = reference[r_idx].double()
    row_scale = scale[r_idx].double()
    slack = 1e-4 + 1e-6 * (ref.abs() + picked_logits.abs() + float(_G_BOUND) * row_scale)
    keep = picked_logits + row_scale * noise.approximate(r_idx, v_idx) + slack >= ref
    r_idx, v_idx = r_idx[keep], v_idx[keep]
    scores = logits[r_idx, v_idx] + noise(r_idx, v_idx) * scale[r_idx]
    best = torch.full((logits.shape[0],), -math.inf).scatter_reduce(
        0, r_idx, scores, "amax", include_self=True
    )
    # Ties go to the lowest token id, as argmax does.
    tied = torch.where(scores == best[r_idx], v_idx, logits.shape[1])
    picked = torch.full_like(top, logits.shape[1]).scatter_reduce(
        0, r_idx, tied, "amin", include_self=True
    )
    gaps = torch.where(picked == claimed, torch.zeros_like(best), best - claimed_score)
    return picked, gaps


class _NoiseSource:
    """``gumbel_noise`` for (row, token) pairs of one logits chunk, each row under its
    own submission's seed, sample index and position; 0 for greedy rows."""

    def __init__(
        self,
        batch: list[Claim],
        starts: npt.NDArray[np.int64],
        positions: npt.NDArray[np.int64],
        lo: int,
        hi: int,
    ) -> None:
        self._positions = positions[lo:hi]
        # Per-row key of the protocol's hash, for `approximate`.
        keys = np.zeros(hi - lo, dtype=np.int64)
        for claim, first, end in self._segments_of(batch, starts, lo, hi):
            seed = claim.seed
            word = _mix32(_mix32((seed & _MASK32) ^ _SEED_SALT) ^ (seed >> 32))
            keys[first:end] = _mix32(_mix32(word ^ claim.sample_index) ^ self._positions[first:end])
        self._keys = torch.from_numpy(keys)
        self._segments = self._segments_of(batch, starts, lo, hi)

    @staticmethod
    def _segments_of(
        batch: list[Claim], starts: npt.NDArray[np.int64], lo: int, hi: int
    ) -> list[tuple[Claim, int, int]]:
        """(submission, first row, end row) of each submission in the chunk, chunk-relative."""
        return [
            (batch[s], max(int(starts[s]), lo) - lo, min(int(starts[s + 1]), hi) - lo)
            for s in range(len(batch))
            if starts[s] < hi and starts[s + 1] > lo
        ]

    def approximate(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float64 ``-log(-log(u))`` of each pair with torch's own log: within ~1e-15 of
        the protocol's noise, at a fraction of the cost of its fixed log algorithm."""
        bits = _mix32(self._keys[rows] ^ tokens)
        u = ((bits >> 8) * 2 + 1).double() * 2.0**-25
        return -torch.log(-torch.log(u))

    def __call__(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Noise per pair; ``rows`` must be sorted (as from ``arange`` or ``nonzero``)."""
        row_np = rows.numpy()
        token_np = tokens.numpy()
        out = np.zeros(row_np.shape[0], dtype=np.float32)
        for claim, first, end in self._segments:
            if claim.temperature == 0.0:
                continue
            a, b = np.searchsorted(row_np, [first, end])
            if a < b:
                out[a:b] = sampling.gumbel_noise(
                    claim.seed, claim.sample_index, self._positions[row_np[a:b]], token_np[a:b]
                )
        return torch.from_numpy(out)


def _mix32(x: Any) -> Any:
    """The protocol's ``mix32`` hash (normative text: `coderepair.protocol.sampling`) on
    Python ints, numpy or torch int64 words; products split so nothing exceeds 2**49."""
    for shift, factor in ((16, _MIX_C1), (15, _MIX_C2)):
        x = x ^ (x >> shift)
        x = (x * (factor & 0xFFFF) + (((x * (factor >> 16)) & 0xFFFF) << 16)) & _MASK32
    return x ^ (x >> 16)


def _overlapping(
    batch: list[Claim], starts: npt.NDArray[np.int64], lo: int, hi: int
) -> list[Claim]:
    return [p for s, p in enumerate(batch) if starts[s] < hi and starts[s + 1] > lo]


# ---------------------------------------------------------------- proof verification


def verify_claimed_proofs(
    hidden: list[torch.Tensor], batch: list[Claim]
) -> list[list[proofs.ChunkVerification] | str]:
    """`proofs.verify_proofs` for every submission, with one top-k per chunk size.

    Chunks of equal size from all submissions are stacked, so the batch pays a handful
    of ``topk`` calls and one polynomial evaluation instead of per-chunk Python. Same
    figures as the protocol's torch path: bf16 rounding, ``abs().topk`` on the hidden
    rows' device (per-row top-k of a stacked tensor is the same algorithm as of each row
    alone), evaluation at the indices reduced by the proof's modulus. Proof lists of the
    wrong length or with malformed bytes go to the protocol's own verifier, whose error
    text becomes the reason (a string).
    """
    size = PROOF_DECODE_BATCHING_SIZE
    results: list[list[proofs.ChunkVerification] | str] = []
    groups: dict[int, list[tuple[int, int, torch.Tensor, proofs.Proof]]] = {}
    for sub_index, (rows, claim) in enumerate(zip(hidden, batch, strict=True)):
        claimed = list(claim.proof)
        decoded = _decode_all(claimed, len(rows))
        results.append([])
        if decoded is None:
            results[-1] = _slow_verify(rows, claimed)
            continue
        for chunk, proof in enumerate(decoded):
            flat = rows[chunk * size : (chunk + 1) * size].reshape(-1)
            groups.setdefault(flat.numel(), []).append((sub_index, chunk, flat, proof))
    for chunk_size, members in groups.items():
        flat = torch.stack([m[2] for m in members]).to(torch.bfloat16)
        if not bool(torch.isfinite(flat).all()):
            raise ValidatorError(
                "the policy's hidden states contain inf or NaN (after rounding to bf16): "
                "the loaded weights are broken; reload them"
            )
        indices = flat.abs().topk(PROOF_TOPK, dim=-1).indices
        bits = flat.gather(-1, indices).cpu().view(torch.int16).numpy().view(np.uint16)
        figures = _chunk_figures(
            indices.cpu().numpy().astype(np.int64),
            bits.astype(np.int64),
            np.array([m[3].modulus for m in members], dtype=np.int64),
            np.array([m[3].coeffs for m in members], dtype=np.int64),
            chunk_size,
        )
        for (sub_index, chunk, _, _), (exp, mean, median) in zip(members, figures, strict=True):
            entry = results[sub_index]
            assert not isinstance(entry, str)  # decodable submissions only
            entry.append(proofs.ChunkVerification(chunk, exp, mean, median))
    for entry in results:
        if not isinstance(entry, str):
            entry.sort(key=lambda c: c.index)
    return results


def _decode_all(claimed: list[bytes], n_rows: int) -> list[proofs.Proof] | None:
    """The decoded proofs, or None when their number or any of their bytes is wrong."""
    expected = proofs.chunk_count(
        n_rows, decode_batching_size=PROOF_DECODE_BATCHING_SIZE, skip_prefill=True
    )
    if len(claimed) != expected:
        return None
    try:
        return [proofs.decode_proof(raw, topk=PROOF_TOPK) for raw in claimed]
    except proofs.ProofDecodeError:
        return None


def _slow_verify(rows: torch.Tensor, claimed: list[bytes]) -> list[proofs.ChunkVerification] | str:
    try:
        return proofs.verify_proofs(
            rows,
            claimed,
            decode_batching_size=PROOF_DECODE_BATCHING_SIZE,
            topk=PROOF_TOPK,
            skip_prefill=True,
        )
    except (proofs.ProofDecodeError, proofs.ProofMismatchError) as exc:
        return str(exc)


def _chunk_figures(
    indices: npt.NDArray[np.int64],
    actual: npt.NDArray[np.int64],
    moduli: npt.NDArray[np.int64],
    coeffs: npt.NDArray[np.int64],
    chunk_size: int,
) -> list[tuple[int, float, float]]:
    """(exponent mismatches, mantissa error mean, median) per chunk, as `verify_proofs`."""
    xs = indices % moduli[:, None]
    claimed = np.repeat(coeffs[:, -1:], xs.shape[1], axis=1)
    for i in range(coeffs.shape[1] - 2, -1, -1):  # Horner over GF(65497)
        claimed = (claimed * xs + coeffs[:, i : i + 1]) % proofs.FIELD_PRIME
    exp_differs = (claimed & _BF16_EXP_MASK) != (actual & _BF16_EXP_MASK)
    # An honest prover of a chunk of <= 65497 values always uses the modulus 65497.
    if chunk_size <= proofs.FIELD_PRIME:
        exp_differs[moduli != proofs.FIELD_PRIME] = True
    mant_err = np.abs((claimed & _BF16_MANT_MASK) - (actual & _BF16_MANT_MASK))
    counts = (~exp_differs).sum(axis=1)
    sums = np.where(exp_differs, 0, mant_err).sum(axis=1)
    ordered = np.sort(np.where(exp_differs, np.iinfo(np.int64).max, mant_err), axis=1)
    figures = []
    for row, count in enumerate(counts.tolist()):
        if count == 0:
            figures.append((int(exp_differs.shape[1]), _NO_MANTISSA_ERROR, _NO_MANTISSA_ERROR))
            continue
        low, high = ordered[row, (count - 1) // 2], ordered[row, count // 2]
        median = (int(low) + int(high)) / 2
        figures.append((int(exp_differs[row].sum()), int(sums[row]) / count, median))
    return figures

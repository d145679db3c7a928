"""The model auditor: re-runs a batch on the claimed policy and in the coordinator's sandbox.

`ModelAuditor` implements the `Auditor` interface of `service.audit` for the three audit
kinds, each a re-computation the worker cannot fake:

- **proof** and **sampling**: the batch's completions go through
  `coderepair.worker.validator.Validator` holding the policy version the batch claims.
  ``proof`` fails when a TOPLOC chunk does not match the validator's hidden states;
  ``sampling`` when the seeded sampler does not reproduce the tokens or the behaviour
  logprobs deviate. Prompts are the ones the coordinator leased (from the run's pool),
  not the worker's copy. Both kinds of one batch share one prefill (a one-batch cache).
- **reward**: the completion text must be the decoding of its token ids; it is parsed
  as a patch, applied to the task's snapshot and the task's tests run in the
  coordinator's own sandbox; `protocol.reward.compute_reward` of that outcome must give
  the claimed total and terms.

The policy is loaded by `PolicyLoader` from what the trainer published: the base model's
directory (``audit.policy_dir``: architecture, tokenizer) gives the model once, then each
audited version's chain (a full checkpoint and the deltas after it, fetched from the
shard URLs stored with the version and verified against the run's trainer key by
`coderepair.worker.weights.PolicyWeights`) is applied with `Validator.apply_weights`.
The version held is kept, so consecutive audits of one version load nothing.

Verdicts: ``failed`` when the worker's claim is wrong (its detail is what the worker
sees as the void reason), ``error`` when the audit itself could not run (a version
whose shards cannot be fetched, a broken sandbox): errors are retried and never held
against the worker.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coderepair.coordinator.config import AuditConfig, CoordinatorConfig
from coderepair.coordinator.service.audit import (
    Auditor,
    AuditRequest,
    AuditResult,
    ConsistencyAuditor,
)
from coderepair.coordinator.service.scheduler import PooledTask
from coderepair.coordinator.storage import repo
from coderepair.coordinator.storage.db import Database
from coderepair.coordinator.storage.models import AuditKind, PolicyVersion
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.patch import (
    PatchApplyError,
    PatchFormatError,
    apply_edits,
    parse_response,
    unified_diff,
)
from coderepair.protocol.proofs import proof_size
from coderepair.protocol.reward import (
    Reward,
    RewardSpec,
    VerificationOutcome,
    compute_reward,
    similarity,
)
from coderepair.protocol.rollout import RolloutRecord
from coderepair.protocol.task import RepairTask

if TYPE_CHECKING:  # torch and the sandbox load only when a model auditor is built
    from coderepair.worker.sandbox.base import JobResult, Sandbox
    from coderepair.worker.validator import Validator, ValidatorConfig, Verdict

__all__ = [
    "AuditorSetupError",
    "ModelAuditor",
    "PolicyLoader",
    "PolicySource",
    "build_auditor",
    "close_auditor",
    "policy_chain",
]

log = logging.getLogger(__name__)

_TOLERANCE = 1e-9
# Failed checks of `Verdict` that condemn each kind ("input": malformed proofs or ids).
_CHECKS = {
    AuditKind.PROOF: frozenset({"proof", "input"}),
    AuditKind.SAMPLING: frozenset({"sampling", "logprobs", "input"}),
}


class AuditorSetupError(ProtocolError):
    """The model auditor cannot be built or cannot load a policy version (not the
    worker's fault: the audit is retried)."""


# ---------------------------------------------------------------- policy versions


@dataclass(frozen=True)
class PolicySource:
    """One published version as the loader needs it: signed manifest and shard URLs."""

    version: int
    manifest_json: bytes
    shard_urls: Mapping[str, Sequence[str]]


def policy_chain(db: Database, run_id: str, version: int) -> list[PolicySource]:
    """The versions to apply, oldest first, to hold ``version``: back to a full one."""
    chain: list[PolicySource] = []
    wanted = version
    while True:
        row: PolicyVersion | None = repo.get_policy(db, run_id, wanted)
        if row is None:
            raise AuditorSetupError(
                f"policy version {wanted} of run {run_id} is not in the store: the batch "
                "names a version that was never published here"
            )
        urls = {s["name"]: tuple(s["urls"]) for s in json.loads(row.shards_json)}
        chain.append(PolicySource(row.version, row.manifest_json, urls))
        if row.kind.value == "full" or row.parent_version is None:
            return chain[::-1]
        wanted = row.parent_version


class PolicyLoader:
    """Holds one `Validator` and loads the policy versions it is asked for.

    Not thread-safe: the `ModelAuditor` serialises calls.
    """

    def __init__(
        self,
        base_dir: Path,
        chain: Callable[[str, int], Sequence[PolicySource]],
        trainer_keys: Mapping[str, str],
        cache_dir: Path,
        *,
        config: ValidatorConfig | None = None,
        num_threads: int | None = None,
    ) -> None:
        self._base_dir = base_dir
        self._chain = chain
        self._trainer_keys = dict(trainer_keys)
        self._cache_dir = cache_dir
        self._config = config
        self._threads = num_threads
        self._validator: Validator | None = None
        self._held: tuple[str, int] | None = None
        self._weights: Any = None  # PolicyWeights of the run held

    @property
    def held(self) -> tuple[str, int] | None:
        """(run id, version) the validator holds now, None before the first load."""
        return self._held

    def validator(self, run_id: str, version: int) -> Validator:
        """The validator holding ``version`` of ``run_id`` (loaded if needed)."""
        from coderepair.worker.validator import Validator  # noqa: PLC0415
        from coderepair.worker.weights import PolicyWeights, WeightsConfig  # noqa: PLC0415

        if self._validator is None:
            if not (self._base_dir / "config.json").is_file():
                raise AuditorSetupError(
                    f"audit.policy_dir {self._base_dir} holds no config.json: point it at the "
                    "base model's Hugging Face directory"
                )
            self._validator = Validator(
                self._base_dir, self._config, num_threads=self._threads, policy_version=None
            )
        if self._held == (run_id, version):
            return self._validator
        key = self._trainer_keys.get(run_id)
        if key is None:
            raise AuditorSetupError(f"run {run_id} is not configured on this auditor")
        chain = list(self._chain(run_id, version))
        held_run_version = self._held[1] if self._held and self._held[0] == run_id else None
        start = next((i + 1 for i, s in enumerate(chain) if s.version == held_run_version), None)
        try:
            if start is None or self._weights is None:
                # Not on the held chain: start over from the chain's full version.
                self._weights = PolicyWeights(
                    WeightsConfig(trainer_key=key, cache_dir=self._cache_dir)
                )
                start = 0
            changed: dict[str, Any] = {}
            for source in chain[start:]:
                update = self._weights.apply(source.manifest_json, source.shard_urls)
                changed.update(update.tensors)
            self._held = None  # a failure below leaves the validator in an unknown state
            self._validator.apply_weights(changed, policy_version=version)
        except ProtocolError as exc:
            self._weights = None
            raise AuditorSetupError(
                f"cannot load policy version {version} of run {run_id}: {exc}"
            ) from exc
        self._held = (run_id, version)
        log.info("auditor holds policy version %d of run %s", version, run_id)
        return self._validator


# ---------------------------------------------------------------- the auditor


class ModelAuditor:
    """Proof, sampling and reward audits on the real model and sandbox (module docstring)."""

    def __init__(
        self,
        policies: PolicyLoader,
        sandbox: Callable[[], Sandbox],
        *,
        sandbox_workers: int = 2,
    ) -> None:
        """``sandbox``: opens the sandbox on the first reward audit (kept until `close`)."""
        self._policies = policies
        self._open_sandbox = sandbox
        self._sandbox: Sandbox | None = None
        self._sandbox_workers = sandbox_workers
        self._lock = threading.Lock()
        self._last: tuple[tuple[str, int], list[Verdict]] | None = None

    def __call__(self, request: AuditRequest) -> AuditResult:
        with self._lock:
            if request.kind is AuditKind.REWARD:
                return self._reward(request)
            return self._model(request)

    def close(self) -> None:
        """Release the sandbox (idempotent)."""
        with self._lock:
            sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            sandbox.close()

    # ------------------------------------------------------------ proof and sampling

    def _model(self, request: AuditRequest) -> AuditResult:
        from coderepair.worker.validator import Submission, ValidatorError  # noqa: PLC0415

        key = (request.batch_id, request.policy_version)
        if self._last is not None and self._last[0] == key:
            verdicts = self._last[1]
        else:
            submissions = []
            for record in request.records:
                pooled = request.tasks.get(record.task_id)
                if pooled is None:
                    return AuditResult(
                        "error", f"task {record.task_id} is not in the run's pool here"
                    )
                submissions.append(
                    Submission(
                        prompt_ids=pooled.prompt_ids,
                        completion_ids=record.completion_ids,
                        seed=record.seed,
                        sample_index=record.sample_index,
                        temperature=request.temperature,
                        proof=_proof_chunks(record.proof),
                        behaviour_logprobs=record.behaviour_logprobs,
                        policy_version=request.policy_version,
                    )
                )
            try:
                validator = self._policies.validator(request.run_id, request.policy_version)
                verdicts = validator.validate_many(submissions)
            except (AuditorSetupError, ValidatorError) as exc:
                return AuditResult("error", str(exc))
            self._last = (key, verdicts)
        condemning = _CHECKS[request.kind]
        figures = _statistics(request.kind, verdicts)
        for record, verdict in zip(request.records, verdicts, strict=True):
            failed = [
                reason
                for check, reason in zip(verdict.failed_checks, verdict.reasons, strict=True)
                if check in condemning
            ]
            if failed:
                return AuditResult(
                    "failed",
                    f"task {record.task_id} sample {record.sample_index}: {'; '.join(failed)}",
                    figures,
                )
        return AuditResult(
            "passed",
            f"{len(verdicts)} completions reproduced on policy version {request.policy_version}",
            figures,
        )

    # ------------------------------------------------------------ reward

    def _reward(self, request: AuditRequest) -> AuditResult:
        try:
            validator = self._policies.validator(request.run_id, request.policy_version)
        except AuditorSetupError as exc:
            return AuditResult("error", str(exc))
        tokenizer = validator.engine.tokenizer
        spec = request.reward_spec
        plans: list[tuple[RolloutRecord, _Plan]] = []
        for record in request.records:
            pooled = request.tasks.get(record.task_id)
            if pooled is None:
                return AuditResult("error", f"task {record.task_id} is not in the run's pool here")
            text = tokenizer.decode(record.completion_ids, skip_special_tokens=True)
            if text != record.completion_text:
                return AuditResult(
                    "failed",
                    f"task {record.task_id} sample {record.sample_index}: the completion text "
                    "is not the decoding of its token ids; report the text the tokens decode to",
                )
            plans.append((record, _plan(record, _task(pooled), spec)))
        try:
            results = self._run_jobs([plan for _, plan in plans])
        except Exception as exc:  # the sandbox broke: not the worker's fault
            log.warning("reward audit %s: sandbox failed: %s", request.job_id, exc)
            return AuditResult("error", f"the coordinator's sandbox failed: {exc}")
        worst = 0.0
        for record, plan in plans:
            reward = plan.reward(results.get(id(plan)), spec)
            delta = abs(reward.total - record.reward)
            worst = max(worst, delta)
            problem = _compare(record, reward, delta)
            if problem is not None:
                return AuditResult(
                    "failed",
                    f"task {record.task_id} sample {record.sample_index}: {problem}",
                    {"reward_delta": delta},
                )
        return AuditResult(
            "passed",
            f"{len(plans)} rewards reproduced in the coordinator's sandbox",
            {"reward_delta": worst},
        )

    def _run_jobs(self, plans: Sequence[_Plan]) -> dict[int, JobResult]:
        from coderepair.coordinator.tasks.verify import run_all  # noqa: PLC0415

        runnable = [plan for plan in plans if plan.job is not None]
        if not runnable:
            return {}
        if self._sandbox is None:
            self._sandbox = self._open_sandbox()
        results = run_all(
            self._sandbox,
            [plan.job for plan in runnable if plan.job is not None],
            workers=self._sandbox_workers,
        )
        return {id(plan): result for plan, result in zip(runnable, results, strict=True)}


@dataclass(frozen=True)
class _Plan:
    """What one completion's reward needs: the outcome so far and the job to run, if any."""

    outcome: dict[str, Any]
    job: Any  # coderepair.worker.sandbox.base.Job, or None when nothing is to run

    def reward(self, result: JobResult | None, spec: RewardSpec) -> Reward:
        fields = dict(self.outcome)
        if result is not None:
            fields.update(
                tests_passed=result.tests_passed,
                tests_total=result.tests_total,
                timed_out=result.status == "timeout",
            )
        return compute_reward(spec, VerificationOutcome(**fields))


def _task(pooled: PooledTask) -> RepairTask:
    return RepairTask.model_validate_json(pooled.task_json)


def _plan(record: RolloutRecord, task: RepairTask, spec: RewardSpec) -> _Plan:
    from coderepair.coordinator.tasks.verify import function_job, repo_job  # noqa: PLC0415

    tokens = len(record.completion_ids)
    try:
        parsed = parse_response(record.completion_text)
    except PatchFormatError:
        return _Plan({"format_ok": False, "completion_tokens": tokens}, None)
    searched = [e for e in parsed.edits if e.search]
    found = sum(1 for e in searched if e.search in task.files.get(e.path, ""))
    base: dict[str, Any] = {
        "format_ok": True,
        "search_blocks_found": found,
        "search_blocks_total": len(searched),
        "completion_tokens": tokens,
    }
    try:
        patched = apply_edits(task.files, parsed.edits, protected=tuple(task.tests))
    except PatchApplyError:
        if spec.similarity_weight > 0.0:
            base["similarity"] = 0.0
        return _Plan(base, None)
    if spec.similarity_weight > 0.0:
        base["similarity"] = similarity(
            unified_diff(task.files, patched), unified_diff(task.files, task.oracle)
        )
    base["applied"] = True
    if task.kind == "function":
        job = function_job(patched, task.tests, task.entry_point)
    else:
        job = repo_job(patched, task.tests, task.fail_to_pass + task.pass_to_pass)
    return _Plan(base, job)


def _compare(record: RolloutRecord, reward: Reward, delta: float) -> str | None:
    if delta > _TOLERANCE * max(1.0, abs(reward.total)):
        return (
            f"claimed reward {record.reward} but the coordinator's re-run gives "
            f"{reward.total} ({_terms(reward.components)})"
        )
    claimed = record.reward_components
    if set(claimed) != set(reward.components) or any(
        abs(claimed[k] - v) > _TOLERANCE * max(1.0, abs(v)) for k, v in reward.components.items()
    ):
        return (
            f"claimed reward terms ({_terms(claimed)}) differ from the re-run's "
            f"({_terms(reward.components)})"
        )
    return None


def _terms(components: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in components.items()) or "none"


def _proof_chunks(proof: bytes) -> list[bytes]:
    # A record stores its chunk proofs back to back; each is proof_size() bytes. A tail
    # of another length is kept as its own chunk so the validator reports it malformed.
    size = proof_size()
    return [proof[i : i + size] for i in range(0, len(proof), size)]


def _statistics(kind: AuditKind, verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Worst figures of the batch for ``kind`` (finite values only)."""
    if kind is AuditKind.PROOF:
        worst = {
            "exp_mismatches": max(
                (float(v.statistics.exp_mismatches) for v in verdicts), default=0
            ),
            "mant_err_mean": _max(v.statistics.mant_err_mean for v in verdicts),
            "mant_err_median": _max(v.statistics.mant_err_median for v in verdicts),
        }
    else:
        rates = [v.statistics.agreement_rate for v in verdicts]
        finite = [r for r in rates if math.isfinite(r)]
        worst = {
            "agreement_rate": min(finite) if finite else math.nan,
            "max_score_gap": _max(v.statistics.max_score_gap for v in verdicts),
            "logprob_deviation": _max(v.statistics.logprob_deviation for v in verdicts),
        }
    return {k: v for k, v in worst.items() if math.isfinite(v)}


def _max(values: Any) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


# ---------------------------------------------------------------- construction


def build_auditor(config: CoordinatorConfig, db: Database) -> Auditor:
    """The auditor ``audit.auditor`` names (see `AuditConfig`), ready to use."""
    audit: AuditConfig = config.audit
    if audit.resolved_auditor() == "consistency":
        return ConsistencyAuditor()
    assert audit.policy_dir is not None  # the config's validator guarantees it
    from coderepair.coordinator.tasks.sandboxes import open_sandbox  # noqa: PLC0415

    loader = PolicyLoader(
        audit.policy_dir,
        lambda run_id, version: policy_chain(db, run_id, version),
        {run.run_id: run.trainer_public_key for run in config.runs},
        audit.weights_cache_dir,
        num_threads=audit.model_threads,
    )
    return ModelAuditor(
        loader,
        lambda: open_sandbox(audit.sandbox, workers=audit.sandbox_workers),
        sandbox_workers=audit.sandbox_workers,
    )


def close_auditor(auditor: Auditor) -> None:
    """Release what an auditor holds (its sandbox), if it holds anything."""
    close = getattr(auditor, "close", None)
    if callable(close):
        close()

"""pass@k on the held-out repair tasks, through the same sandbox the workers use.

For each held-out task, ``n`` completions are sampled (the worker's HF engine, seeded
sampling; the prompt is rendered exactly as the coordinator renders it for a lease), each
is parsed, applied and tested in the sandbox (`coderepair.worker.verify.plan`), and the
number ``c`` of completions that pass every test is counted. pass@k is the unbiased
estimator of Chen et al. (2021), averaged over tasks::

    pass@k = 1 - C(n - c, k) / C(n, k)

reported for k in {1, 8, 64} up to n. Both ends matter for RL: pass@1 is what training
raises, large-k coverage is what it is known to trade away.

Model-written code runs only inside the sandbox; this module never executes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coderepair.protocol.errors import ProtocolError
from coderepair.trainer.config import EvalConfig

__all__ = [
    "DEFAULT_KS",
    "EvalError",
    "EvalReport",
    "TaskResult",
    "evaluate",
    "pass_at_k",
    "report_ks",
]

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 8, 64)


class EvalError(ProtocolError):
    """An evaluation was asked for something impossible (k > n, no held-out tasks...)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with ``c`` correct among ``n`` samples.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which equals
    ``1 - C(n-c, k) / C(n, k)`` without the huge binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EvalError(f"{name} must be an int, got {value!r}")
    if n < 1 or k < 1:
        raise EvalError(f"n={n} and k={k} must be >= 1")
    if not 0 <= c <= n:
        raise EvalError(f"c={c} correct samples must lie in [0, n={n}]")
    if k > n:
        raise EvalError(f"pass@{k} needs at least {k} samples per task, got n={n}: lower k")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def report_ks(n: int, ks: Sequence[int] = DEFAULT_KS) -> tuple[int, ...]:
    """The ks reported for ``n`` samples per task: those <= n (at least k = 1)."""
    return tuple(sorted({k for k in ks if 1 <= k <= n} | {1}))


@dataclass(frozen=True)
class TaskResult:
    """One task's samples: how many there were and how many passed every test."""

    task_id: str
    n: int
    correct: int
    well_formed: int
    """Completions that parsed as a patch (a random model mostly writes none)."""


@dataclass(frozen=True)
class EvalReport:
    """pass@k averaged over tasks, and the per-task counts it came from."""

    model: str
    samples: int
    pass_at: dict[int, float]
    tasks: list[TaskResult] = field(default_factory=list)

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["pass_at"] = {f"pass@{k}": v for k, v in self.pass_at.items()}
        return json.dumps(data, sort_keys=True)


def summarise(model: str, n: int, results: Sequence[TaskResult]) -> EvalReport:
    """Mean pass@k over ``results`` for every reportable k."""
    if not results:
        raise EvalError("no task results to summarise")
    ks = report_ks(n)
    pass_at = {k: sum(pass_at_k(r.n, r.correct, k) for r in results) / len(results) for k in ks}
    return EvalReport(model=model, samples=n, pass_at=pass_at, tasks=list(results))


def _seed(base: int, task_id: str) -> int:
    digest = hashlib.sha256(f"{base}/{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def evaluate(model_dir: str | Path, cfg: EvalConfig) -> EvalReport:
    """Sample ``cfg.samples`` completions per held-out task and score them in the sandbox."""
    # Heavy and cross-distribution imports stay here: `--help` and the estimator need none.
    from coderepair.coordinator.tasks.prompts import render_prompt  # noqa: PLC0415
    from coderepair.coordinator.tasks.repo import load_fixtures  # noqa: PLC0415
    from coderepair.protocol.reward import RewardSpec  # noqa: PLC0415
    from coderepair.protocol.task import read_taskset  # noqa: PLC0415
    from coderepair.worker.engines.base import GenerationRequest, SamplingParams  # noqa: PLC0415
    from coderepair.worker.engines.hf import HFEngine  # noqa: PLC0415
    from coderepair.worker.sandbox.base import SandboxLimits  # noqa: PLC0415
    from coderepair.worker.sandbox.select import select_sandbox  # noqa: PLC0415
    from coderepair.worker.verify import plan  # noqa: PLC0415

    if cfg.tasks_path is not None:
        tasks = list(read_taskset(cfg.tasks_path).in_split("heldout"))
    else:
        tasks = [t for t in load_fixtures() if t.split == "heldout"]
    if cfg.max_tasks is not None:
        tasks = tasks[: cfg.max_tasks]
    if not tasks:
        raise EvalError(
            f"no held-out tasks in {cfg.tasks_path or 'the bundled fixtures'}: build a task "
            "set with a held-out split (`coderepair-coordinator tasks build`)"
        )
    engine = HFEngine()
    engine.load(model_dir)
    tokenizer = engine.tokenizer
    spec = RewardSpec()
    params = SamplingParams(
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=engine.stop_token_ids,
    )
    results: list[TaskResult] = []
    with select_sandbox(SandboxLimits(timeout_s=cfg.timeout_s), cfg.sandbox_backend) as sandbox:
        for task in tasks:
            messages = [dict(m) for m in render_prompt(task).messages]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            prompt_ids = tuple(
                int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]
            )
            seed = _seed(cfg.seed, task.task_id)
            request = GenerationRequest(
                prompt_ids=prompt_ids,
                seeds=tuple((seed + i) % (1 << 64) for i in range(cfg.samples)),
                sample_indices=tuple(range(cfg.samples)),
                params=params,
            )
            correct = well_formed = 0
            for generation in engine.generate([request]):
                p = plan(task, generation.text, len(generation.completion_ids), spec)
                well_formed += bool(p.outcome.get("format_ok"))
                if p.job is None:
                    continue
                result = sandbox.run(p.job)
                correct += result.all_passed
            results.append(TaskResult(task.task_id, cfg.samples, correct, well_formed))
            log.info("%s: %d/%d passed", task.task_id, correct, cfg.samples)
    return summarise(str(model_dir), cfg.samples, results)

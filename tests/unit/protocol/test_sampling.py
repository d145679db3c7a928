"""Seeded Gumbel-max sampling: the noise function, the sampler, replay and its check.

All randomness here comes from fixed seeds, so the statistical tests are deterministic:
they cannot flake, and their thresholds leave a wide margin on both sides.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.protocol.errors import ProtocolError, VerificationError
from coderepair.protocol.sampling import (
    ReplayReport,
    SamplingCheck,
    SamplingCheckError,
    SamplingError,
    behaviour_logprobs,
    check,
    derive_sample_seed,
    gumbel_noise,
    replay,
    sample_tokens,
)

torch = pytest.importorskip("torch")

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


def _mix32_reference(x: int) -> int:
    """Wellons' lowbias32 written directly from the module docstring, with Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform_reference(seed: int, sample: int, position: int, token: int) -> float:
    key = _mix32_reference((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    key = _mix32_reference(key ^ (seed >> 32))
    key = _mix32_reference(_mix32_reference(key ^ sample) ^ position)
    bits = _mix32_reference(key ^ token)
    return (2 * (bits >> 8) + 1) * 2.0**-25


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


# ---------------------------------------------------------------- the noise function


def test_noise_is_pinned() -> None:
    # The noise function is normative: workers and validators of different releases must
    # agree on it, so any change to these bits is a protocol change.
    assert _bits(gumbel_noise(0, 0, 0, np.arange(4))).tolist() == [
        -1081705120,
        1019712239,
        1077304243,
        -1097855358,
    ]
    edge = gumbel_noise(2**64 - 1, 2**32 - 1, 2**32 - 1, np.array([0, 2**32 - 1]))
    assert _bits(edge).tolist() == [1062011492, 1057196167]


def test_noise_is_deterministic_and_stateless() -> None:
    tokens = np.arange(1000)
    first = gumbel_noise(7, 3, 11, tokens)
    np.testing.assert_array_equal(first, gumbel_noise(7, 3, 11, tokens))
    # Evaluating a subset, in another order, gives the same values: there is no state.
    picked = np.array([999, 5, 500])
    np.testing.assert_array_equal(gumbel_noise(7, 3, 11, picked), first[picked])
    # Each coordinate changes the noise.
    for other in (
        gumbel_noise(8, 3, 11, tokens),
        gumbel_noise(7, 4, 11, tokens),
        gumbel_noise(7, 3, 12, tokens),
    ):
        assert np.mean(other == first) < 0.01


@settings(max_examples=200, deadline=None)
@given(seed=U64, sample=U32, position=U32, token=U32)
def test_noise_matches_reference_formula(seed: int, sample: int, position: int, token: int) -> None:
    u = _uniform_reference(seed, sample, position, token)
    assert 0.0 < u < 1.0
    expected = -math.log(-math.log(u))
    got = float(gumbel_noise(seed, sample, position, np.array([token]))[0])
    # Within one float32 ulp of the exact value (the own log is accurate to ~1e-13).
    assert abs(got - expected) <= float(np.spacing(np.float32(abs(expected)))) + 1e-12


def test_noise_numpy_and_torch_are_bit_identical_cpu() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(20):
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        sample = int(rng.integers(0, 2**32))
        positions = rng.integers(0, 2**32, size=(64, 1), dtype=np.int64)
        tokens = rng.integers(0, 2**32, size=(1, 512), dtype=np.int64)
        expected = gumbel_noise(seed, sample, positions, tokens)
        got = gumbel_noise(seed, sample, torch.from_numpy(positions), torch.from_numpy(tokens))
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(_bits(expected), _bits(got.numpy()))


@settings(max_examples=200, deadline=None)
@given(seed=U64, sample=U32, positions=st.lists(U32, min_size=1, max_size=8), token=U32)
def test_noise_numpy_and_torch_agree_everywhere(
    seed: int, sample: int, positions: list[int], token: int
) -> None:
    pos = np.array(positions, dtype=np.int64)
    expected = gumbel_noise(seed, sample, pos, np.array(token))
    got = gumbel_noise(seed, sample, torch.tensor(pos), torch.tensor(token))
    np.testing.assert_array_equal(_bits(expected), _bits(got.numpy()))


@pytest.mark.gpu
def test_noise_cuda_matches_numpy() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(5)
    positions = rng.integers(0, 2**32, size=(256, 1), dtype=np.int64)
    tokens = np.arange(50_000, dtype=np.int64)[None, :]
    expected = gumbel_noise(99, 1, positions, tokens)
    got = gumbel_noise(99, 1, torch.from_numpy(positions).cuda(), torch.from_numpy(tokens).cuda())
    np.testing.assert_array_equal(_bits(expected), _bits(got.cpu().numpy()))


def test_noise_is_standard_gumbel() -> None:
    g = gumbel_noise(1, 0, np.arange(200)[:, None], np.arange(1000)[None, :]).astype(np.float64)
    assert abs(g.mean() - np.euler_gamma) < 0.01  # standard error ~0.003
    assert abs(g.var() - math.pi**2 / 6) < 0.03
    # Neighbouring positions and tokens are uncorrelated (standard error ~0.0025).
    assert abs(np.corrcoef(g[:-1].ravel(), g[1:].ravel())[0, 1]) < 0.015
    assert abs(np.corrcoef(g[:, :-1].ravel(), g[:, 1:].ravel())[0, 1]) < 0.015


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("seed", (-1, 0, 0, np.arange(2))),
        ("seed", (2**64, 0, 0, np.arange(2))),
        ("sample_index", (0, -1, 0, np.arange(2))),
        ("sample_index", (0, 2**32, 0, np.arange(2))),
        ("position", (0, 0, -5, np.arange(2))),
        ("token_ids", (0, 0, 0, np.array([0, 2**32]))),
        ("token_ids", (0, 0, 0, np.array([0.5]))),
    ],
)
def test_noise_rejects_out_of_domain(name: str, args: tuple[object, ...]) -> None:
    with pytest.raises(SamplingError, match=name):
        gumbel_noise(*args)  # type: ignore[arg-type]


def test_derive_sample_seed() -> None:
    seeds = {derive_sample_seed(12345, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**64 for s in seeds)
    assert derive_sample_seed(12345, 0) == 2454886589211414944  # pinned: part of the protocol
    with pytest.raises(SamplingError):
        derive_sample_seed(12345, -1)


# ---------------------------------------------------------------- sampling


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize(("temperature", "seed"), [(0.7, 1), (1.0, 2), (1.6, 3)])
def test_sampling_follows_softmax(temperature: float, seed: int) -> None:
    logits = np.array([0.0, 0.5, 1.0, 1.5, -1.0, 2.0], dtype=np.float32)
    n = 30_000
    rows = np.broadcast_to(logits, (n, logits.size))
    tokens = sample_tokens(
        rows, seed=seed, sample_index=0, positions=list(range(n)), temperature=temperature
    )
    counts = np.bincount(tokens, minlength=logits.size)
    expected = n * _softmax(logits.astype(np.float64) / temperature)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: a correct sampler lands near 5; 30 has p < 2e-5. Sampling at
    # a wrong temperature (T vs 1) gives chi2 in the hundreds at this n.
    assert chi2 < 30.0
    wrong_t = n * _softmax(logits.astype(np.float64) / (temperature * 1.3))
    assert float(((counts - wrong_t) ** 2 / wrong_t).sum()) > 100.0


def _brute_force(logits: np.ndarray, seed: int, sample: int, start: int, t: float) -> np.ndarray:
    """The defining formula with the noise of every token (no pruning)."""
    positions = np.arange(start, start + logits.shape[0])[:, None]
    noise = gumbel_noise(seed, sample, positions, np.arange(logits.shape[1])[None, :])
    return np.argmax(logits.astype(np.float32) + np.float32(t) * noise, axis=-1)


@pytest.mark.parametrize("temperature", [0.05, 0.8, 3.0])
def test_sampler_equals_the_defining_formula(temperature: float) -> None:
    # sample_tokens skips tokens that provably cannot win; that must change nothing,
    # including on ties, infinities and rows without any finite logit.
    rng = np.random.default_rng(int(temperature * 100))
    logits = (rng.standard_t(3, size=(40, 300)) * 4).astype(np.float32)
    logits[:, :50] = np.round(logits[:, :50])  # many exact ties
    logits[1, 7] = logits[2, :] = np.inf
    logits[3, :] = -np.inf
    logits[4, :100] = -np.inf
    logits[5, :] = 3.0e38
    expected = _brute_force(logits, 77, 1, 1000, temperature)
    kwargs = {"seed": 77, "sample_index": 1, "positions": list(range(1000, 1040))}
    got = sample_tokens(logits, temperature=temperature, **kwargs)  # type: ignore[arg-type]
    got_t = sample_tokens(torch.from_numpy(logits), temperature=temperature, **kwargs)  # type: ignore[arg-type]
    assert got.tolist() == expected.tolist() == got_t.tolist()


def test_temperature_zero_is_argmax_and_ties_go_low() -> None:
    logits = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]], dtype=np.float32)
    got = sample_tokens(logits, seed=1, sample_index=0, positions=[0, 1], temperature=0.0)
    assert got.tolist() == [1, 0]
    got_t = sample_tokens(
        torch.from_numpy(logits), seed=1, sample_index=0, positions=[0, 1], temperature=0.0
    )
    assert got_t.tolist() == [1, 0]


def test_sample_tokens_numpy_and_torch_agree() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(32, 4096)) * 3).astype(np.float32)
    kwargs = {"seed": 2**63 + 9, "sample_index": 4, "positions": list(range(100, 132))}
    a = sample_tokens(logits, temperature=0.8, **kwargs)  # type: ignore[arg-type]
    b = sample_tokens(torch.from_numpy(logits), temperature=0.8, **kwargs)  # type: ignore[arg-type]
    assert a.shape == (32,)
    assert a.tolist() == b.tolist()
    one = sample_tokens(logits[5], seed=2**63 + 9, sample_index=4, positions=105, temperature=0.8)
    assert one.shape == () and int(one) == a[5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"positions": [0, 1, 2]}, "positions"),
        ({"seed": [1]}, "seed"),
        ({"seed": None}, "seed"),
        ({"positions": [[0], [1, 2]]}, "positions"),
        ({"sample_index": [0, 1.5]}, "sample_index"),
    ],
)
def test_sample_tokens_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"seed": 1, "sample_index": 0, "positions": [0, 1]}
    args.update({"temperature": 1.0, **kwargs})
    with pytest.raises(SamplingError, match=match):
        sample_tokens(np.zeros((2, 8), dtype=np.float32), **args)  # type: ignore[arg-type]


def test_sample_tokens_rejects_nan_and_bad_shapes() -> None:
    bad = np.zeros((2, 8), dtype=np.float32)
    bad[1, 3] = np.nan
    for logits in (bad, torch.from_numpy(bad)):
        with pytest.raises(SamplingError, match="NaN"):
            sample_tokens(logits, seed=1, sample_index=0, positions=[0, 1], temperature=1.0)
    for shape in ((2, 3, 4), (0,), (2, 0)):
        with pytest.raises(SamplingError, match="logits"):
            sample_tokens(np.zeros(shape), seed=1, sample_index=0, positions=0, temperature=1.0)


# ---------------------------------------------------------------- replay


LENGTH, VOCAB, TEMP, LEASE_SEED, START = 400, 64, 0.8, 0xC0DE_2026, 37


def _model_logits(seed: int = 0) -> np.ndarray:
    """Per-position logits of a stand-in model (a fixed table: teacher forcing is trivial)."""
    return (np.random.default_rng(seed).normal(size=(LENGTH, VOCAB)) * 2.0).astype(np.float32)


def _generate(logits: np.ndarray, seed: int, temperature: float = TEMP) -> np.ndarray:
    positions = list(range(START, START + logits.shape[0]))
    return np.asarray(
        sample_tokens(
            logits, seed=seed, sample_index=2, positions=positions, temperature=temperature
        )
    )


def _replay(logits: object, tokens: object, seed: int = LEASE_SEED) -> ReplayReport:
    return replay(logits, tokens, seed=seed, sample_index=2, start_position=START, temperature=TEMP)


def test_honest_replay_agrees_fully() -> None:
    logits = _model_logits()
    tokens = _generate(logits, LEASE_SEED)
    report = _replay(logits, tokens)
    assert report == ReplayReport(LENGTH, LENGTH, 1.0, None)
    assert _replay(torch.from_numpy(logits), torch.from_numpy(tokens)) == report
    check(report, SamplingCheck())


def test_replay_tolerates_engine_noise() -> None:
    # A validator's logits differ from the worker's in the last bits (other kernels):
    # only near-ties may flip, so the rate stays far above the default threshold.
    logits = _model_logits()
    tokens = _generate(logits, LEASE_SEED)
    jitter = np.random.default_rng(1).normal(size=logits.shape).astype(np.float32) * 1e-3
    report = _replay(logits + jitter, tokens)
    assert report.agreement_rate >= 0.99
    check(report, SamplingCheck())


def test_replay_catches_wrong_seed_temperature_and_model() -> None:
    logits = _model_logits()
    cfg = SamplingCheck()
    cases = {
        "other seed": _replay(logits, _generate(logits, LEASE_SEED + 1)),
        "other temperature": _replay(logits, _generate(logits, LEASE_SEED, temperature=1.6)),
        "other model": _replay(_model_logits(seed=99), _generate(logits, LEASE_SEED)),
    }
    for name, report in cases.items():
        assert report.agreement_rate < 0.8, name
        assert report.first_mismatch is not None
        with pytest.raises(SamplingCheckError, match="sampling replay reproduced"):
            check(report, cfg)


def test_replay_pinpoints_changed_and_injected_tokens() -> None:
    logits = _model_logits()
    tokens = _generate(logits, LEASE_SEED)
    changed = tokens.copy()
    changed[123] = (changed[123] + 1) % VOCAB
    report = _replay(logits, changed)
    assert (report.n_agree, report.first_mismatch) == (LENGTH - 1, 123)
    injected = tokens.copy()
    injected[200:240] = np.arange(40) % VOCAB  # text the model did not sample
    report = _replay(logits, injected)
    assert report.first_mismatch is not None and report.first_mismatch >= 200
    assert report.n_agree <= LENGTH - 30


def test_best_of_four_is_caught() -> None:
    # A cheater samples with four seeds of its own and submits the "best" completion
    # (here: the one with the highest total logit). The leased seed was not among them.
    logits = _model_logits()
    candidates = [_generate(logits, seed) for seed in (11, 12, 13, 14)]
    best = max(candidates, key=lambda toks: float(logits[np.arange(LENGTH), toks].sum()))
    report = _replay(logits, best)
    assert report.agreement_rate < 0.8
    with pytest.raises(SamplingCheckError):
        check(report, SamplingCheck())
    # Had it used the leased seed, the same replay passes.
    check(_replay(logits, _generate(logits, LEASE_SEED)), SamplingCheck())


def test_replay_rejects_malformed_claims() -> None:
    logits = _model_logits()[:10]
    with pytest.raises(SamplingError, match="10 ids"):
        _replay(logits, np.zeros(9, dtype=np.int64))
    with pytest.raises(SamplingError, match="vocabulary"):
        _replay(logits, np.full(10, VOCAB))
    with pytest.raises(SamplingError, match="integer"):
        _replay(logits, np.zeros(10, dtype=np.float32))
    with pytest.raises(SamplingError, match=r"\[L, V\]"):
        _replay(logits[0], np.zeros(1, dtype=np.int64))


def test_replay_of_empty_completion_is_vacuous() -> None:
    report = _replay(np.zeros((0, VOCAB), dtype=np.float32), np.zeros(0, dtype=np.int64))
    assert report == ReplayReport(0, 0, 1.0, None)


def test_check_threshold_and_errors() -> None:
    assert issubclass(SamplingCheckError, VerificationError)
    assert issubclass(SamplingError, ProtocolError)
    report = ReplayReport(n_tokens=100, n_agree=96, agreement_rate=0.96, first_mismatch=4)
    check(report, SamplingCheck(min_agreement_rate=0.96))
    with pytest.raises(SamplingCheckError, match="first mismatch at completion index 4"):
        check(report, SamplingCheck(min_agreement_rate=0.97))
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="min_agreement_rate"):
            SamplingCheck(min_agreement_rate=bad)
    with pytest.raises(ValueError, match="extra"):
        SamplingCheck(min_rate=0.9)  # type: ignore[call-arg]


# ---------------------------------------------------------------- behaviour logprobs


def test_behaviour_logprobs() -> None:
    logits = _model_logits()[:50]
    tokens = _generate(logits, LEASE_SEED)[:50]
    got = behaviour_logprobs(logits, tokens, TEMP)
    scaled = logits.astype(np.float64) / TEMP
    expected = scaled[np.arange(50), tokens] - np.log(np.exp(scaled).sum(axis=-1))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    got_t = behaviour_logprobs(torch.from_numpy(logits), torch.from_numpy(tokens), TEMP)
    np.testing.assert_allclose(got_t.numpy(), expected, rtol=1e-5, atol=1e-5)
    greedy = behaviour_logprobs(logits, np.argmax(logits, axis=-1), 0.0)
    assert greedy.tolist() == [0.0] * 50
    other = behaviour_logprobs(logits, (np.argmax(logits, axis=-1) + 1) % VOCAB, 0.0)
    assert np.isneginf(other).all()
    with pytest.raises(SamplingError, match="vocabulary"):
        behaviour_logprobs(logits, np.full(50, VOCAB), TEMP)


def test_per_row_seeds_above_2_63_sample_like_one_row_at_a_time() -> None:
    """A list mixing small seeds and seeds >= 2**63 must not be coerced through floats."""
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    seeds = [1, 2**63 + 5, 2**64 - 1]
    batched = sample_tokens(
        logits, seed=seeds, sample_index=[0, 1, 2], positions=[5, 5, 5], temperature=0.8
    )
    one_by_one = [
        int(
            sample_tokens(
                logits[i : i + 1], seed=seeds[i], sample_index=i, positions=5, temperature=0.8
            )[0]
        )
        for i in range(3)
    ]
    assert batched.tolist() == one_by_one

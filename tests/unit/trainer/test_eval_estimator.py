"""The unbiased pass@k estimator against the combinatorial definition and known values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.trainer.eval import EvalError, TaskResult, pass_at_k, report_ks, summarise


@st.composite
def nck(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(1, 200))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(max_examples=200, deadline=None)
@given(nck())
def test_matches_the_binomial_definition(args: tuple[int, int, int]) -> None:
    n, c, k = args
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)
    assert 0.0 <= pass_at_k(n, c, k) <= 1.0


@settings(max_examples=100, deadline=None)
@given(nck())
def test_monotone_in_k_and_c(args: tuple[int, int, int]) -> None:
    n, c, k = args
    if k < n:
        assert pass_at_k(n, c, k + 1) >= pass_at_k(n, c, k) - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= pass_at_k(n, c, k) - 1e-12


def test_known_values() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(64, 0, 64) == 0.0
    assert pass_at_k(64, 1, 64) == 1.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(64, 1, 8) == pytest.approx(8 / 64)


@settings(max_examples=200, deadline=None)
@given(st.integers(-5, 70), st.integers(-5, 70), st.integers(-5, 70))
def test_bad_arguments_are_typed_errors(n: int, c: int, k: int) -> None:
    valid = n >= 1 and 1 <= k <= n and 0 <= c <= n
    if valid:
        assert 0.0 <= pass_at_k(n, c, k) <= 1.0
    else:
        with pytest.raises(EvalError):
            pass_at_k(n, c, k)


def test_non_int_arguments_are_typed_errors() -> None:
    for bad in (True, 1.0, "3", None):
        with pytest.raises(EvalError):
            pass_at_k(bad, 1, 1)  # type: ignore[arg-type]


def test_reported_ks_are_capped_by_samples() -> None:
    assert report_ks(64) == (1, 8, 64)
    assert report_ks(10) == (1, 8)
    assert report_ks(3) == (1,)


def test_summary_averages_tasks() -> None:
    report = summarise("m", 8, [TaskResult("a", 8, 8, 8), TaskResult("b", 8, 0, 0)])
    assert report.pass_at == {1: pytest.approx(0.5), 8: pytest.approx(0.5)}
    assert '"pass@8"' in report.to_json()
    with pytest.raises(EvalError):
        summarise("m", 8, [])

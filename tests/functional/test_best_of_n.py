"""Best-of-n: the expected maximum over subsets, and the closed-form KL."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kltune.functional as KF
from strategies import assert_bad_input, without_runtime_typecheck

finite = st.floats(-10, 10, allow_nan=False, width=32)


@st.composite
def scores_and_n(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    p, m = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    values = draw(st.lists(finite, min_size=p * m, max_size=p * m))
    return torch.tensor(values, dtype=torch.float64).reshape(p, m), draw(st.integers(1, m))


@given(scores_and_n())
def test_equals_the_average_maximum_over_all_subsets(case: tuple[torch.Tensor, int]) -> None:
    scores, n = case
    brute = [
        sum(max(row[list(c)].tolist()) for c in itertools.combinations(range(len(row)), n))
        / math.comb(len(row), n)
        for row in scores
    ]
    assert torch.allclose(
        KF.expected_best_of_n(scores, n), torch.tensor(brute, dtype=torch.float64), atol=1e-9
    )


@given(scores_and_n())
def test_one_is_the_mean_all_is_the_max_and_it_grows_with_n(case: tuple[torch.Tensor, int]) -> None:
    scores, _ = case
    m = scores.shape[1]
    assert torch.allclose(KF.expected_best_of_n(scores, 1), scores.mean(-1), atol=1e-9)
    assert torch.allclose(KF.expected_best_of_n(scores, m), scores.max(-1).values, atol=1e-9)
    values = [KF.expected_best_of_n(scores, n) for n in range(1, m + 1)]
    for lower, higher in itertools.pairwise(values):
        assert bool((higher >= lower - 1e-9).all())


@given(scores_and_n(), st.randoms())
def test_order_of_the_samples_does_not_matter(case: tuple[torch.Tensor, int], rng) -> None:
    scores, n = case
    order = list(range(scores.shape[1]))
    rng.shuffle(order)
    assert torch.allclose(
        KF.expected_best_of_n(scores[:, order], n), KF.expected_best_of_n(scores, n), atol=1e-9
    )


def test_large_sample_counts_stay_exact() -> None:
    scores = torch.linspace(0, 1, 2000, dtype=torch.float64)[None]
    # the max of n uniform draws from a fine grid on [0, 1] has mean ≈ n / (n + 1)
    for n in (1, 8, 64, 512):
        assert float(KF.expected_best_of_n(scores, n)) == pytest.approx(n / (n + 1), abs=1e-3)


def _best_of_n_distribution(p: torch.Tensor, n: int) -> torch.Tensor:
    """Exact best-of-n over a categorical whose outcome i has reward i (no ties)."""
    cdf = p.cumsum(0)
    below = torch.cat([torch.zeros(1, dtype=p.dtype), cdf[:-1]])
    return cdf**n - below**n


@given(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=12), st.integers(1, 16))
def test_closed_form_kl_bounds_the_exact_kl(weights: list[float], n: int) -> None:
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    q = _best_of_n_distribution(p, n)
    exact = float((q * (q.clamp_min(1e-300).log() - p.log())).sum())
    assert exact <= KF.best_of_n_kl(n) + 1e-9


def test_closed_form_kl_is_reached_by_a_reward_with_no_ties() -> None:
    p = torch.full((100_000,), 1e-5, dtype=torch.float64)  # fine: almost continuous
    for n in (1, 2, 4, 16, 64):
        q = _best_of_n_distribution(p, n)
        exact = float((q * (q.clamp_min(1e-300).log() - p.log())).sum())
        assert exact == pytest.approx(KF.best_of_n_kl(n), abs=2e-3)
    assert KF.best_of_n_kl(1) == 0.0


def test_bad_input_is_named() -> None:
    good = torch.zeros(2, 4)
    assert_bad_input(
        lambda: KF.expected_best_of_n(good.long(), 1), message="floating", argument="scores"
    )
    assert_bad_input(
        lambda: KF.expected_best_of_n(torch.zeros(4), 1), message="shape", argument="scores"
    )
    with pytest.raises(ValueError, match="empty"):
        KF.expected_best_of_n(torch.zeros(0, 4), 1)
    with pytest.raises(ValueError, match="NaN"):
        KF.expected_best_of_n(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="more than the M = 4"):
        KF.expected_best_of_n(good, 5)
    with pytest.raises(ValueError, match="n must be >= 1"):
        KF.best_of_n_kl(0)
    with without_runtime_typecheck(), pytest.raises(TypeError, match="n must be an int"):
        KF.best_of_n_kl(2.0)  # type: ignore[arg-type]


@given(scores_and_n(), st.randoms())
def test_values_average_the_value_of_the_best_scored_sample(case, rng) -> None:
    scores, n = case
    p, m = scores.shape
    scores = scores + torch.arange(m, dtype=torch.float64) * 1e-3  # distinct: one best
    values = torch.tensor([[rng.uniform(-1, 1) for _ in range(m)] for _ in range(p)])
    values = values.double()
    brute = [
        sum(
            float(values[row, max(c, key=lambda j, row=row: float(scores[row, j]))])
            for c in itertools.combinations(range(m), n)
        )
        / math.comb(m, n)
        for row in range(p)
    ]
    got = KF.expected_best_of_n(scores, n, values=values)
    assert torch.allclose(got, torch.tensor(brute, dtype=torch.float64), atol=1e-9)
    # the scores as their own values give the plain estimate
    assert torch.allclose(
        KF.expected_best_of_n(scores, n, values=scores), KF.expected_best_of_n(scores, n)
    )


def test_values_must_match_the_scores() -> None:
    assert_bad_input(
        lambda: KF.expected_best_of_n(torch.zeros(2, 3), 1, values=torch.zeros(2, 2)),
        message="shape",
        argument="values",
    )
    with pytest.raises(ValueError, match="NaN"):
        KF.expected_best_of_n(torch.zeros(1, 2), 1, values=torch.tensor([[0.0, math.nan]]))

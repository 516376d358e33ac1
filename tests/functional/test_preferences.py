"""Bradley–Terry, DPO and the over-optimisation fits: properties and oracles."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kltune.functional as KF
from strategies import assert_bad_input, finite_floats


@st.composite
def pairs(
    draw: st.DrawFn, lo: float = -20.0, hi: float = 20.0, k: int = 2
) -> tuple[torch.Tensor, ...]:
    """``k`` aligned [B] tensors (chosen and rejected scores), B in 1..6, float64."""
    b = draw(st.integers(1, 6))
    values = draw(st.lists(finite_floats(lo, hi), min_size=k * b, max_size=k * b))
    return tuple(torch.tensor(values, dtype=torch.float64).reshape(k, b))


@given(pairs())
def test_swapping_chosen_and_rejected_negates_the_logit(case) -> None:
    chosen, rejected = case
    assert torch.equal(
        KF.preference_logits(rejected, chosen), -KF.preference_logits(chosen, rejected)
    )
    # so the two losses differ by the mean logit: softplus(x) - softplus(-x) = x
    forward = KF.bradley_terry_loss(chosen, rejected)
    swapped = KF.bradley_terry_loss(rejected, chosen)
    assert torch.allclose(swapped - forward, (chosen - rejected).mean(), atol=1e-9)
    accuracy = KF.preference_accuracy(chosen, rejected)
    assert torch.allclose(KF.preference_accuracy(rejected, chosen), 1 - accuracy)


@given(pairs(), finite_floats(-50, 50))
def test_only_the_score_difference_matters(case, shift: float) -> None:
    chosen, rejected = case
    assert torch.allclose(
        KF.bradley_terry_loss(chosen + shift, rejected + shift),
        KF.bradley_terry_loss(chosen, rejected),
        atol=1e-9,
    )


@given(pairs(-5, 5))
def test_the_loss_falls_to_zero_as_the_chosen_score_pulls_ahead(case) -> None:
    chosen, rejected = case
    losses = [float(KF.bradley_terry_loss(chosen + t, rejected)) for t in (0, 5, 20, 60)]
    assert all(b < a or a == b == 0 for a, b in itertools.pairwise(losses))
    assert losses[-1] < 1e-15
    assert float(KF.preference_accuracy(chosen + 20, rejected)) == 1.0
    # and it is positive and log 2 at a tie
    assert losses[0] > 0
    assert math.isclose(float(KF.bradley_terry_loss(chosen, chosen)), math.log(2))


@given(pairs(), finite_floats(0, 3), finite_floats(0, 2))
def test_gradient_matches_the_closed_form(case, margin: float, centring: float) -> None:
    chosen, rejected = (x.clone().requires_grad_() for x in case)
    loss = KF.bradley_terry_loss(chosen, rejected, margin=margin, centring=centring)
    loss.backward()
    b = chosen.shape[0]
    # d/dc softplus(-(c - r - m)) = -σ(-(c - r - m)); the centring term adds 2λ(c + r)
    logit = (case[0] - case[1] - margin).detach()
    expected = -torch.sigmoid(-logit) / b + 2 * centring * (case[0] + case[1]) / b
    assert torch.allclose(chosen.grad, expected, atol=1e-9)
    centre = 2 * centring * (case[0] + case[1]) / b
    assert torch.allclose(rejected.grad, torch.sigmoid(-logit) / b + centre, atol=1e-9)


@given(pairs(-5, 5), finite_floats(0, 3))
def test_a_margin_is_a_shift_of_the_rejected_score(case, margin: float) -> None:
    chosen, rejected = case
    per_pair = torch.full_like(chosen, margin)
    assert torch.allclose(
        KF.bradley_terry_loss(chosen, rejected, margin=per_pair),
        KF.bradley_terry_loss(chosen, rejected + margin),
        atol=1e-12,
    )


def test_centring_pulls_the_scores_mean_to_zero_without_changing_the_order() -> None:
    chosen = torch.tensor([5.0, 6.0], requires_grad=True)
    rejected = torch.tensor([4.0, 3.0], requires_grad=True)
    optimiser = torch.optim.SGD([chosen, rejected], lr=0.1)
    for _ in range(300):
        optimiser.zero_grad()
        KF.bradley_terry_loss(chosen, rejected, centring=1.0).backward()
        optimiser.step()
    assert abs(float((chosen + rejected).detach().mean())) < 0.05
    assert bool((chosen > rejected).all())


@given(pairs(-30, 0, k=4), finite_floats(0.01, 5))
def test_dpo_is_the_bradley_terry_loss_of_its_implicit_rewards(logprobs, beta) -> None:
    chosen, rejected, ref_chosen, ref_rejected = logprobs
    assert torch.allclose(
        KF.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta),
        KF.bradley_terry_loss(
            KF.dpo_implicit_rewards(chosen, ref_chosen, beta=beta),
            KF.dpo_implicit_rewards(rejected, ref_rejected, beta=beta),
        ),
        atol=1e-12,
    )
    # at the reference the loss is log 2 and its gradient favours the chosen completion
    at_ref = ref_chosen.clone().requires_grad_()
    loss = KF.dpo_loss(at_ref, ref_rejected, ref_chosen, ref_rejected, beta=beta)
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-9)
    loss.backward()
    assert bool((at_ref.grad < 0).all())  # descent raises log π(chosen)


@given(pairs(-30, 0), finite_floats(0.01, 5))
def test_dpo_gradient_matches_the_oracle(policy, beta) -> None:
    chosen, rejected = (x.clone().requires_grad_() for x in policy)
    ref = torch.zeros_like(policy[0])
    KF.dpo_loss(chosen, rejected, ref, ref, beta=beta).backward()
    logit = beta * (policy[0] - policy[1])
    # ∇ log π(y_c) of L_DPO = -β σ(-logit) / B (Rafailov et al., eq. 7)
    expected = -beta * torch.sigmoid(-logit) / policy[0].shape[0]
    assert torch.allclose(chosen.grad, expected, atol=1e-9)
    assert torch.allclose(rejected.grad, -expected, atol=1e-9)


@given(st.sampled_from(["best_of_n", "rl"]), finite_floats(0.1, 3), finite_floats(0.05, 1))
def test_fit_recovers_the_coefficients_of_a_noiseless_curve(form, alpha, beta) -> None:
    d = torch.tensor([0.0, 0.3, 0.8, 1.5, 2.2, 3.0], dtype=torch.float64)
    truth = torch.tensor([alpha, beta], dtype=torch.float64)
    gains = KF.overoptimisation_curve(d, truth, form)
    assert torch.allclose(KF.overoptimisation_coefficients(d, gains, form), truth, atol=1e-7)


def test_the_curves_peak_where_the_docstring_says() -> None:
    d = torch.linspace(0.01, 10, 100_000, dtype=torch.float64)
    alpha, beta = 1.0, 0.4
    coefficients = torch.tensor([alpha, beta])
    bon = KF.overoptimisation_curve(d, coefficients, "best_of_n")
    rl = KF.overoptimisation_curve(d, coefficients, "rl")
    assert math.isclose(float(d[bon.argmax()]), alpha / (2 * beta), rel_tol=1e-3)
    assert math.isclose(float(d[rl.argmax()]), math.exp(alpha / beta - 1), rel_tol=1e-3)
    assert float(KF.overoptimisation_curve(torch.zeros(1), coefficients, "rl")[0]) == 0.0


@pytest.mark.parametrize(
    ("call", "message", "argument"),
    [
        (lambda: KF.bradley_terry_loss(torch.zeros(3), torch.zeros(2)), "shape", "rejected_scores"),
        (lambda: KF.bradley_terry_loss(torch.zeros(0), torch.zeros(0)), "empty batch", "x"),
        (
            lambda: KF.bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1)),
            r"\[B\]",
            "chosen_scores",
        ),
        (
            lambda: KF.bradley_terry_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2)),
            "floating",
            "chosen_scores",
        ),
        (
            lambda: KF.bradley_terry_loss(torch.zeros(2), torch.zeros(2), centring=-1.0),
            "centring",
            "centring",
        ),
        (
            lambda: KF.bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3)),
            "margin",
            "margin",
        ),
        (lambda: KF.dpo_loss(*[torch.zeros(2)] * 4, beta=0.0), "beta", "beta"),
        (
            lambda: KF.dpo_loss(*[torch.zeros(2)] * 3, torch.zeros(1), beta=0.1),
            "shape",
            "ref_rejected_logprobs",
        ),
        (
            lambda: KF.overoptimisation_coefficients(torch.ones(1), torch.ones(1), "rl"),
            "2 points",
            "sqrt_kl",
        ),
        (
            lambda: KF.overoptimisation_coefficients(-torch.ones(2), torch.ones(2), "rl"),
            "negative",
            "sqrt_kl",
        ),
        (
            lambda: KF.overoptimisation_coefficients(torch.ones(2), torch.ones(2), "ppo"),
            "form",
            "form",
        ),
        (
            lambda: KF.overoptimisation_curve(torch.ones(2), torch.ones(3), "rl"),
            "alpha, beta",
            "coefficients",
        ),
    ],
)
def test_bad_input_names_the_problem(call, message: str, argument: str) -> None:
    assert_bad_input(call, message=message, argument=argument)


def test_loss_is_stable_for_huge_score_gaps() -> None:
    chosen = torch.tensor([1e4, -1e4])
    loss = KF.bradley_terry_loss(chosen, torch.zeros(2))
    assert torch.isfinite(loss)
    assert math.isclose(float(loss), 1e4 / 2, rel_tol=1e-6)
    assert torch.allclose(loss, F.softplus(-chosen).mean())

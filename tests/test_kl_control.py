"""Tests for kltune.kl_control: KL controllers and the placement of the KL penalty."""

import json
import math
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kltune.functional as KF
from kltune.functional import kl_k1, kl_k2, kl_k3, kl_k3_st
from kltune.kl_control import (
    GRADIENTS,
    SOUND,
    AdaptiveKLController,
    ConstraintKLController,
    FixedKLController,
    KLController,
    KLPenalty,
    KLPenaltyWarning,
    controller_from_state,
)


def _controllers() -> list[KLController]:
    return [
        FixedKLController(beta=0.05),
        AdaptiveKLController(beta=0.1, target=6.0, horizon=10000),
        ConstraintKLController(beta=0.1, target=2.0, step_size=0.05),
        ConstraintKLController(beta=0.1, target=2.0, step_size=0.05, beta_max=1.0),
    ]


# --- conformance: every shipped controller -------------------------------------------------


@pytest.mark.parametrize("controller", _controllers(), ids=repr)
def test_update_returns_a_new_controller_and_leaves_the_old(controller: KLController) -> None:
    assert isinstance(controller, KLController)
    before = controller.state_dict()
    new = controller.update(observed_kl=3.0, n_samples=64)
    assert new is not controller and type(new) is type(controller)
    assert controller.state_dict() == before
    assert new.beta >= 0.0
    with pytest.raises(AttributeError):
        controller.beta = 1.0  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("controller", _controllers(), ids=repr)
def test_state_round_trips_through_plain_data(controller: KLController) -> None:
    for _ in range(3):
        state = controller.state_dict()
        assert isinstance(state["kind"], str)
        assert all(isinstance(v, float) for k, v in state.items() if k != "kind")
        assert controller_from_state(state) == controller
        assert controller_from_state(json.loads(json.dumps(state))) == controller
        controller = controller.update(observed_kl=5.0, n_samples=128)


@pytest.mark.parametrize("controller", _controllers(), ids=repr)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_kl_is_rejected(controller: KLController, bad: float) -> None:
    with pytest.raises(ValueError, match="observed_kl must be finite"):
        controller.update(observed_kl=bad, n_samples=8)
    with pytest.raises(ValueError, match="n_samples"):
        controller.update(observed_kl=1.0, n_samples=0)


# --- fixed -----------------------------------------------------------------------------------


def test_fixed_controller_never_moves() -> None:
    controller = FixedKLController(beta=0.2)
    for kl in (0.0, 1.0, 100.0, -3.0):
        assert controller.update(kl, 16) == controller
    assert controller.state_dict() == {"kind": "fixed", "beta": 0.2}
    assert FixedKLController(beta=0.0).beta == 0.0
    for beta in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            FixedKLController(beta=beta)


# --- adaptive (Ziegler et al. 2019) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("observed_kl", "expected_beta"),
    [
        (9.0, 0.1 * (1 + 0.2 * 512 / 10000)),  # KL/target - 1 = 0.5, clipped to 0.2
        (100.0, 0.1 * (1 + 0.2 * 512 / 10000)),
        (6.6, 0.1 * (1 + 0.1 * 512 / 10000)),  # 0.1, inside the clip
        (6.0, 0.1),  # on target: no change
        (5.4, 0.1 * (1 - 0.1 * 512 / 10000)),
        (0.0, 0.1 * (1 - 0.2 * 512 / 10000)),  # -1 clipped to -0.2
        (-4.0, 0.1 * (1 - 0.2 * 512 / 10000)),
    ],
)
def test_adaptive_hand_numbers(observed_kl: float, expected_beta: float) -> None:
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert controller.update(observed_kl, 512).beta == pytest.approx(expected_beta, rel=1e-12)


def test_adaptive_written_out_values() -> None:
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert controller.update(9.0, 512).beta == pytest.approx(0.101024, rel=1e-12)
    assert controller.update(3.0, 512).beta == pytest.approx(0.098976, rel=1e-12)
    assert controller.update(6.6, 512).beta == pytest.approx(0.100512, rel=1e-12)


@given(
    beta=st.floats(1e-4, 10.0),
    target=st.floats(1e-3, 20.0),
    horizon=st.integers(1, 100_000),
    kl=st.floats(-5.0, 100.0),
    n=st.integers(1, 10**6),
)
def test_adaptive_follows_the_rule(
    beta: float, target: float, horizon: int, kl: float, n: int
) -> None:
    assume(n < 5 * horizon)
    new = AdaptiveKLController(beta=beta, target=target, horizon=horizon).update(kl, n)
    error = min(max(kl / target - 1, -0.2), 0.2)
    assert new.beta == pytest.approx(beta * (1 + error * n / horizon), rel=1e-12)
    assert new.beta > 0
    # raises β when the KL is above target and lowers it below
    if kl > target:
        assert new.beta >= beta
    if kl < target:
        assert new.beta <= beta
    if abs(error) * n / horizon > 1e-9:
        assert (new.beta > beta) == (kl > target)


def test_adaptive_drives_a_toy_kl_toward_target() -> None:
    # KL(β) = c / (β + b): a policy that drifts less as β grows. Target 2 ⇒ β* = 0.45.
    def kl_of(beta: float) -> float:
        return 1.0 / (beta + 0.05)

    for beta0 in (0.05, 2.0):
        controller = AdaptiveKLController(beta=beta0, target=2.0, horizon=10000)
        for _ in range(1500):
            controller = controller.update(kl_of(controller.beta), n_samples=512)
        assert kl_of(controller.beta) == pytest.approx(2.0, rel=0.02)


def test_adaptive_argument_errors() -> None:
    with pytest.raises(ValueError, match="beta"):
        AdaptiveKLController(beta=0.0, target=1.0)
    with pytest.raises(ValueError, match="beta"):
        AdaptiveKLController(beta=-1.0, target=1.0)
    for target in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="target"):
            AdaptiveKLController(beta=0.1, target=target)
    for horizon in (0, -10):
        with pytest.raises(ValueError, match="horizon"):
            AdaptiveKLController(beta=0.1, target=1.0, horizon=horizon)
    with pytest.raises(ValueError, match="5 \\* horizon"):
        AdaptiveKLController(beta=0.1, target=1.0, horizon=100).update(0.0, 500)


# --- constraint (dual ascent) ----------------------------------------------------------------


@given(
    beta=st.floats(0.0, 10.0),
    target=st.floats(1e-3, 20.0),
    step=st.floats(1e-4, 10.0),
    kl=st.floats(-5.0, 100.0),
    beta_max=st.one_of(st.just(math.inf), st.floats(10.0, 100.0)),
)
def test_constraint_follows_projected_dual_ascent(
    beta: float, target: float, step: float, kl: float, beta_max: float
) -> None:
    controller = ConstraintKLController(beta, target, step, beta_max)
    new = controller.update(kl, 32)
    assert new.beta == min(beta_max, max(0.0, beta + step * (kl - target)))
    assert 0.0 <= new.beta <= beta_max


def test_constraint_hand_numbers() -> None:
    controller = ConstraintKLController(beta=0.1, target=2.0, step_size=0.05)
    assert controller.update(3.0, 8).beta == pytest.approx(0.15)  # +0.05 per nat above
    assert controller.update(1.0, 8).beta == pytest.approx(0.05)  # -0.05 per nat below
    assert controller.update(0.0, 8).beta == 0.0  # 0.1 - 0.1: clamped at 0, never negative
    assert controller.update(-10.0, 8).beta == 0.0
    capped = ConstraintKLController(beta=0.9, target=2.0, step_size=1.0, beta_max=1.0)
    assert capped.update(50.0, 8).beta == 1.0


def test_constraint_argument_errors() -> None:
    for kwargs, name in [
        ({"beta": -0.1}, "beta"),
        ({"target": 0.0}, "target"),
        ({"target": -2.0}, "target"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": math.inf}, "step_size"),
        ({"beta_max": 0.0}, "beta_max"),
        ({"beta": 2.0, "beta_max": 1.0}, "beta_max"),
    ]:
        args = {"beta": 0.1, "target": 1.0, "step_size": 0.1, **kwargs}
        with pytest.raises(ValueError, match=name):
            ConstraintKLController(**args)


# The toy problem: a tabular softmax policy over 4 actions, reward r, reference π_ref.
# Its KL-penalised optimum is π_β ∝ π_ref·exp(r/β), so KL(π_β ‖ π_ref) falls as β grows
# from log(1/π_ref(best)) = log 10 at β = 0 to 0 as β → ∞.
PI_REF = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
REWARD = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
TARGET = 0.5


def _best_response(beta: float) -> torch.Tensor:
    """log π_β, the exact maximiser of E_π[r] − β KL(π ‖ π_ref)."""
    return torch.log_softmax(PI_REF.log() + REWARD / max(beta, 1e-12), dim=-1)


def _kl(logp: torch.Tensor) -> float:
    return float((logp.exp() * (logp - PI_REF.log())).sum())


def _beta_star() -> float:
    low, high = 1e-6, 1e3  # bisection on the decreasing KL(β)
    for _ in range(200):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if _kl(_best_response(mid)) > TARGET else (low, mid)
    return low


@pytest.mark.parametrize("beta0", [0.01, 20.0], ids=["from_above", "from_below"])
def test_dual_ascent_reaches_target_with_a_best_responding_policy(beta0: float) -> None:
    controller = ConstraintKLController(beta=beta0, target=TARGET, step_size=0.5)
    first_kl = _kl(_best_response(beta0))
    assert (first_kl > TARGET) == (beta0 < 1.0)  # starts above (small β) or below (large β)
    for _ in range(200):
        controller = controller.update(_kl(_best_response(controller.beta)), n_samples=1)
        assert controller.beta >= 0.0
    assert _kl(_best_response(controller.beta)) == pytest.approx(TARGET, abs=1e-6)
    assert controller.beta == pytest.approx(_beta_star(), rel=1e-4)


def _train(beta0: float, init_logits: torch.Tensor, steps: int = 300) -> tuple[list, list]:
    """Primal-dual: a few Adam steps on the penalised objective, then one dual step on a
    sampled k3 estimate of the KL (256 samples from an explicit generator)."""
    generator = torch.Generator().manual_seed(0)
    logits = init_logits.clone().requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=0.1)
    controller = ConstraintKLController(beta=beta0, target=TARGET, step_size=0.05)
    kls, betas = [], []
    for _ in range(steps):
        for _ in range(3):
            logp = torch.log_softmax(logits, dim=-1)
            kl = (logp.exp() * (logp - PI_REF.log())).sum()
            loss = -((logp.exp() * REWARD).sum() - controller.beta * kl)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logp = torch.log_softmax(logits, dim=-1)
            actions = torch.multinomial(logp.exp(), 256, replacement=True, generator=generator)
            sampled = kl_k3(logp[actions][None], PI_REF.log()[actions][None]).mean()
        kls.append(_kl(logp))
        betas.append(controller.beta)
        controller = controller.update(float(sampled), n_samples=256)
    return kls, betas


@pytest.mark.parametrize(
    ("beta0", "init_logits"),
    [(0.01, PI_REF.log() + REWARD / 0.1), (5.0, PI_REF.log())],
    ids=["from_above", "from_below"],
)
def test_dual_ascent_reaches_target_while_the_policy_trains(
    beta0: float, init_logits: torch.Tensor
) -> None:
    kls, betas = _train(beta0, init_logits)
    assert (kls[0] > TARGET + 1.0) if beta0 < 1 else (kls[0] < TARGET - 0.4)
    assert min(betas) >= 0.0
    tail = kls[-50:]
    assert sum(tail) / len(tail) == pytest.approx(TARGET, abs=0.02)
    assert max(abs(k - TARGET) for k in tail) < 0.05
    assert betas[-1] == pytest.approx(_beta_star(), rel=0.05)


def test_inactive_constraint_drives_beta_to_exactly_zero() -> None:
    # The largest KL any policy reaches here is log 10 ≈ 2.3 nats: a target of 3 never binds.
    controller = ConstraintKLController(beta=1.0, target=3.0, step_size=0.5)
    for _ in range(50):
        controller = controller.update(_kl(_best_response(controller.beta)), n_samples=1)
        assert controller.beta >= 0.0
    assert controller.beta == 0.0
    assert _kl(_best_response(controller.beta)) <= 3.0


# --- controller_from_state -------------------------------------------------------------------


def test_controller_from_state_errors() -> None:
    with pytest.raises(ValueError, match="unknown controller kind 'pid'"):
        controller_from_state({"kind": "pid", "beta": 0.1})
    with pytest.raises(ValueError, match="needs keys"):
        controller_from_state({"kind": "adaptive", "beta": 0.1})
    with pytest.raises(ValueError, match="needs keys"):
        controller_from_state({"kind": "fixed", "beta": 0.1, "target": 1.0})
    with pytest.raises(ValueError, match="whole number"):
        controller_from_state({"kind": "adaptive", "beta": 0.1, "target": 1.0, "horizon": 10.5})
    with pytest.raises(ValueError, match="beta"):
        controller_from_state({"kind": "fixed", "beta": -1.0})
    restored = controller_from_state(
        {"kind": "adaptive", "beta": 0.1, "target": 1.0, "horizon": 500.0}
    )
    assert isinstance(restored, AdaptiveKLController) and restored.horizon == 500


# --- KLPenalty: in the reward vs in the loss ---------------------------------------------------


def _logprob_pair() -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]])).requires_grad_()
    return lp, ref


def test_kl_penalty_defaults_and_reward_side_is_detached() -> None:
    penalty = KLPenalty()
    assert penalty.estimator is kl_k1 and penalty.placement == "reward"
    assert penalty.in_reward and not penalty.in_loss
    old, ref = _logprob_pair()
    kl = penalty.reward_kl(old, ref)
    assert not kl.requires_grad
    torch.testing.assert_close(kl, kl_k1(old, ref).detach())
    expected = torch.tensor([[0.0, 0.6931, -0.6931], [-0.6931, 0.0, 0.6931]])
    torch.testing.assert_close(kl, expected, atol=1e-4, rtol=0)


def test_each_placement_gets_its_sound_estimator_by_default() -> None:
    assert KLPenalty(placement="loss").estimator is kl_k3_st
    both = KLPenalty(placement="reward+loss")
    assert both.estimator is KF.kl_exact and both.in_reward and both.in_loss and both.exact


@pytest.mark.parametrize(("name", "placement"), sorted(GRADIENTS))
def test_a_biased_or_zero_gradient_warns_unless_asked_for(name: str, placement: str) -> None:
    estimator = getattr(KF, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KLPenalty(estimator=estimator, placement=placement)  # type: ignore[arg-type]
    warned = [w for w in caught if issubclass(w.category, KLPenaltyWarning)]
    assert bool(warned) == ((name, placement) not in SOUND)
    if warned:
        message = str(warned[0].message)
        assert name in message and "allow_biased=True" in message and "Use " in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KLPenalty(estimator=estimator, placement=placement, allow_biased=True)  # type: ignore[arg-type]


def test_a_users_own_estimator_is_not_classified() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        penalty = KLPenalty(estimator=lambda lp, ref: lp - ref, placement="loss")
    assert penalty.name == "<lambda>"


def test_an_unknown_placement_is_refused() -> None:
    # (under the test suite's runtime type checker the annotation refuses it first)
    with pytest.raises((ValueError, TypeError), match=r"placement"):
        KLPenalty(placement="advantage")  # type: ignore[arg-type]


def test_the_exact_kl_is_refused_where_only_logprobs_are_given() -> None:
    lp, ref = _logprob_pair()
    with pytest.raises(TypeError, match="exact KL needs next-token heads"):
        KLPenalty(placement="reward+loss").reward_kl(lp, ref)


def test_kl_penalty_loss_side_has_gradient_into_logprobs_only() -> None:
    logprobs, ref = _logprob_pair()
    kl = KLPenalty(placement="loss").loss_kl(logprobs, ref)
    assert kl.requires_grad
    kl.sum().backward()
    assert logprobs.grad is not None and bool(logprobs.grad.abs().sum() > 0)
    assert ref.grad is None  # the reference is never trained
    torch.testing.assert_close(kl.detach(), kl_k3(logprobs, ref).detach())


@pytest.mark.parametrize(
    ("estimator", "target_kl"),
    [
        (kl_k2, "reverse"),  # ∇ KL(π ‖ π_ref): what we want to penalise
        (kl_k3_st, "reverse"),
        (kl_k3, "forward"),  # ∇ KL(π_ref ‖ π): the bias the docstring warns about
        (kl_k1, "zero"),  # no signal at all
    ],
)
def test_expected_loss_gradient_of_each_estimator(estimator, target_kl: str) -> None:
    # Exact expectation over a tabular policy: Σ_a π(a) ∇θ k(log π_θ(a), log π_ref(a)),
    # with π(a) as the (non-differentiated) sampling weight.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, generator=generator, dtype=torch.float64).requires_grad_()
    ref = torch.log_softmax(torch.randn(5, generator=generator, dtype=torch.float64), dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    penalty = KLPenalty(estimator=estimator, placement="loss", allow_biased=True)
    kl = penalty.loss_kl(logp[None], ref[None])
    (expected_grad,) = torch.autograd.grad((logp.exp().detach() * kl[0]).sum(), logits)

    if target_kl == "zero":
        truth = torch.zeros_like(logits)
    else:
        fresh = torch.log_softmax(logits, dim=-1)  # a new graph: the first one is freed
        p, q = (fresh, ref) if target_kl == "reverse" else (ref, fresh)
        (truth,) = torch.autograd.grad((p.exp() * (p - q)).sum(), logits)
    torch.testing.assert_close(expected_grad, truth, atol=1e-12, rtol=1e-9)

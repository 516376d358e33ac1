"""The KL penalty matrix: every estimator in every placement, by exact enumeration.

For a penalty β·KL(π‖π_ref) what counts is the expected gradient it gives the
policy. Each cell's expected gradient is computed here with no sampling: every
completion of a small vocabulary is enumerated and weighted by its probability,
and the penalty goes through the library's own code (``KLPenalty``,
``shaped_rewards``, ``reward_to_go``, ``clipped_surrogate_loss``), as the loop
uses it on-policy (first epoch, ratio 1, no baseline). It is compared with
autograd of the exact KL of the whole completion,

    KL(π‖π_ref) = Σ_y π(y) Σ_t [log π(y_t | y_<t) − log π_ref(y_t | y_<t)],

on a categorical (one token) and on three-token completions of a tiny Llama,
where a token also changes the KL of the tokens after it.
"""

import warnings

import pytest
import torch

import kltune.functional as KF
from kltune.kl_control import GRADIENTS, SOUND, KLPenalty
from kltune.kl_gradients import (
    EnumeratedCompletions,
    cosine_and_norm_ratio,
    flat_gradient,
    perturbed_sequences,
)

VOCAB = 5
CELLS = sorted(GRADIENTS)


def _penalty(name: str, placement: str) -> KLPenalty:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KLPenalty(estimator=getattr(KF, name), placement=placement)  # type: ignore[arg-type]


# ── one token: a categorical ─────────────────────────────────────────────────


def _categorical(epsilon: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    noise = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    return (ref + epsilon * noise).requires_grad_(), ref


def _categorical_gradients(name: str, placement: str, epsilon: float) -> dict[str, torch.Tensor]:
    theta, ref = _categorical(epsilon)
    table = EnumeratedCompletions.categorical(theta, ref)
    got = flat_gradient(table.penalty_objective(_penalty(name, placement)), [theta])
    p, q = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
    reverse = flat_gradient((p.exp() * (p - q)).sum(), [theta])
    forward = flat_gradient((q.exp() * (q - torch.log_softmax(theta, -1))).sum(), [theta])
    return {"got": got, "reverse": reverse, "forward": forward}


#: What each cell's expected gradient is on one token, as a combination of
#: ∇KL(π‖π_ref) ("reverse") and ∇KL(π_ref‖π) ("forward").
ONE_TOKEN = {
    ("kl_k1", "reward"): (1, 0),
    ("kl_k1", "loss"): (0, 0),
    ("kl_k1", "reward+loss"): (1, 0),
    ("kl_k2", "loss"): (1, 0),
    ("kl_k3", "reward"): (1, -1),
    ("kl_k3", "loss"): (0, 1),
    ("kl_k3", "reward+loss"): (1, 0),
    ("kl_k3_st", "reward"): (1, -1),
    ("kl_k3_st", "loss"): (1, 0),
    ("kl_k3_st", "reward+loss"): (2, -1),
    ("kl_exact", "reward"): (0, 0),
    ("kl_exact", "loss"): (1, 0),
    ("kl_exact", "reward+loss"): (1, 0),
}


@pytest.mark.parametrize(("name", "placement"), CELLS, ids=lambda c: str(c))
@pytest.mark.parametrize("epsilon", [0.1, 1.0])
def test_each_cell_on_one_token(name: str, placement: str, epsilon: float) -> None:
    grads = _categorical_gradients(name, placement, epsilon)
    if (name, placement) not in ONE_TOKEN:  # k2 in the reward: E[½Δ² ∇log π], no KL's gradient
        theta, ref = _categorical(epsilon)
        p, q = torch.log_softmax(theta, -1).detach(), torch.log_softmax(ref, -1)
        score = torch.eye(VOCAB, dtype=torch.float64) - p.exp()  # ∇_θ log π(a), row a
        half_square = 0.5 * (p - q) ** 2
        expected = (p.exp() * half_square) @ score
        if placement == "reward+loss":
            expected = expected + grads["reverse"]
        torch.testing.assert_close(grads["got"], expected, rtol=1e-9, atol=1e-12)
        return
    a, b = ONE_TOKEN[(name, placement)]
    expected = a * grads["reverse"] + b * grads["forward"]
    torch.testing.assert_close(grads["got"], expected, rtol=1e-9, atol=1e-12)


def test_k3_in_the_reward_has_almost_no_pull_near_the_reference() -> None:
    # The failure this matrix exists for: ∇KL(π‖π_ref) − ∇KL(π_ref‖π) cancels to first order.
    near = _categorical_gradients("kl_k3", "reward", 0.1)
    _, ratio = cosine_and_norm_ratio(near["got"], near["reverse"])
    assert ratio < 0.1
    default = _categorical_gradients("kl_k1", "reward", 0.1)
    assert cosine_and_norm_ratio(default["got"], default["reverse"]) == pytest.approx(
        (1.0, 1.0), abs=1e-9
    )


# ── three tokens: a tiny Llama, where a token changes the KL after it ────────


@pytest.fixture(scope="module")
def sequence_gradients() -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each cell's expected gradient, with ∇KL and its token-local part, at ε = 0.5."""
    out = {}
    for cell in CELLS:
        table, params = perturbed_sequences(0.5)
        got = flat_gradient(table.penalty_objective(_penalty(*cell)), params)
        truth = flat_gradient(table.true_kl(), params)
        local = flat_gradient(table.local_kl(), params)
        out[cell] = (got, truth, local)
    return out


@pytest.mark.parametrize(("name", "placement"), CELLS, ids=lambda c: str(c))
def test_each_cell_on_three_token_completions(sequence_gradients, name, placement) -> None:
    got, truth, local = sequence_gradients[(name, placement)]
    later = truth - local  # the part a token has through the KL of the tokens after it
    assert later.norm() > 0.05 * truth.norm()  # the test can tell the parts apart
    expected = {
        ("kl_k1", "reward"): truth,
        ("kl_k1", "loss"): torch.zeros_like(truth),
        ("kl_k1", "reward+loss"): truth,
        ("kl_k2", "loss"): local,
        ("kl_k3", "reward+loss"): truth,  # the loss's ∇KL(π_ref‖π) cancels the reward's
        ("kl_k3_st", "loss"): local,
        ("kl_exact", "loss"): local,
        ("kl_exact", "reward"): later,
        ("kl_exact", "reward+loss"): truth,
    }.get((name, placement))
    if expected is not None:
        # Llama's RMSNorm computes in float32 even in a float64 model, so gradients
        # through it carry float32 rounding (~1e-7 relative), though the identities are exact.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(truth.norm()))
    else:  # the biased cells: not ∇KL, and not its token-local part either
        assert not torch.allclose(got, truth, rtol=1e-3) and not torch.allclose(got, local)


def test_the_sound_cells_pull_toward_the_reference(sequence_gradients) -> None:
    for cell in SOUND:
        got, truth, _ = sequence_gradients[cell]
        cosine, _ = cosine_and_norm_ratio(got, truth)
        assert cosine > 0.5, (cell, cosine)  # a step against `got` lowers the KL


# ── later PPO epochs: samples from the behaviour policy ──────────────────────


@pytest.mark.parametrize("name", ["kl_k2", "kl_k3_st"])
@pytest.mark.parametrize("weighted", [True, False])
def test_importance_weighting_keeps_the_current_policys_gradient(name, weighted) -> None:
    # Tokens drawn from π_old ≠ π_θ (a later epoch): E_{π_old}[∇ sg(ρ)·k] = ∇KL(π_θ‖π_ref).
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    old = ref + 0.5 * torch.randn(VOCAB, generator=g, dtype=torch.float64)
    theta = (old + 0.5 * torch.randn(VOCAB, generator=g, dtype=torch.float64)).requires_grad_()
    logp, ref_lp, old_lp = (torch.log_softmax(x, -1) for x in (theta, ref, old))
    penalty = KLPenalty(estimator=getattr(KF, name), placement="loss", importance_weighted=weighted)
    term = penalty.loss_kl(logp[None], ref_lp[None], old_lp[None])[0]
    got = flat_gradient((old_lp.exp() * term).sum(), [theta])
    truth = flat_gradient((logp.exp() * (logp - ref_lp)).sum(), [theta])
    if weighted:
        torch.testing.assert_close(got, truth, rtol=1e-9, atol=1e-12)
    else:  # the uncorrected term follows π_old's weights: off by a visible margin
        assert not torch.allclose(got, truth, rtol=1e-2)

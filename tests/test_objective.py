"""PPOObjective on a fake scorer: which terms enter the loss, and that computing it changes nothing."""

import dataclasses

import pytest
import torch

import kltune
from helpers import synthetic_rollout
from kltune import functional as KF


@dataclasses.dataclass
class FakeScorer:
    """Returns fixed logprobs (a leaf with grad) instead of running a model."""

    logprobs: torch.Tensor
    values: torch.Tensor | None = None

    def score(self, rollout, *, entropy_with_grad=False, with_head=False):
        entropy = torch.full_like(self.logprobs, 0.5)
        return kltune.PolicyOutput(self.logprobs, entropy, self.values)


def _minibatch(with_values: bool = False) -> kltune.Rollout:
    rollout = synthetic_rollout(with_values=with_values)
    advantages, returns = kltune.MeanBaseline().advantages(rollout)
    return rollout.replace(advantages=advantages, returns=returns)


def test_loss_is_the_clipped_surrogate_token_mean_by_hand() -> None:
    batch = _minibatch()
    logprobs = (batch.old_logprobs + 0.1).requires_grad_()
    loss, metrics = kltune.PPOObjective(value_coef=0.0)(FakeScorer(logprobs), batch, beta=0.3)
    expected = KF.token_mean(
        KF.clipped_surrogate_loss(logprobs, batch.old_logprobs, batch.advantages, 0.2),  # type: ignore[arg-type]
        batch.response_mask,
    )
    assert torch.allclose(loss, expected)
    assert "kl/loss_term" not in metrics  # KL in the reward: not in the loss
    assert all(v.requires_grad is False for v in metrics.values())


def test_kl_in_the_loss_adds_beta_times_the_estimate() -> None:
    batch = _minibatch()
    logprobs = (batch.old_logprobs + 0.1).requires_grad_()
    plain, _ = kltune.PPOObjective(value_coef=0.0)(FakeScorer(logprobs), batch, beta=0.3)
    k3 = KF.kl_k3(logprobs, batch.ref_logprobs)  # type: ignore[arg-type]
    ratio = torch.exp(logprobs - batch.old_logprobs).detach()
    for weighted, per_token in ((False, k3), (True, ratio * k3)):
        kl = kltune.KLPenalty(placement="loss", importance_weighted=weighted)
        with_kl, metrics = kltune.PPOObjective(value_coef=0.0, kl=kl)(
            FakeScorer(logprobs), batch, beta=0.3
        )
        term = KF.token_mean(per_token, batch.response_mask)
        assert torch.allclose(with_kl - plain, 0.3 * term)
        assert torch.allclose(metrics["kl/loss_term"], term)


def test_value_and_entropy_terms_enter_with_their_coefficients() -> None:
    batch = _minibatch(with_values=True)
    logprobs = batch.old_logprobs.clone().requires_grad_()
    values = (batch.old_values + 0.5).requires_grad_()  # type: ignore[operator]
    scorer = FakeScorer(logprobs, values)
    base, _ = kltune.PPOObjective(value_coef=0.0)(scorer, batch, beta=0.0)
    full, metrics = kltune.PPOObjective(value_coef=0.5, entropy_coef=0.1)(scorer, batch, 0.0)
    value_loss = KF.token_mean(
        KF.clipped_value_loss(values, batch.old_values, batch.returns, 0.2),  # type: ignore[arg-type]
        batch.response_mask,
    )
    assert torch.allclose(full - base, 0.5 * value_loss - 0.1 * 0.5)
    assert torch.allclose(metrics["value/loss"], value_loss)


def test_objective_rejects_bad_coefficients() -> None:
    with pytest.raises(ValueError, match="clip_eps"):
        kltune.PPOObjective(clip_eps=0.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        kltune.PPOObjective(entropy_coef=-1.0)


def test_missing_advantages_is_a_clear_error() -> None:
    batch = synthetic_rollout()
    with pytest.raises(ValueError, match="advantages"):
        kltune.PPOObjective()(FakeScorer(batch.old_logprobs.clone()), batch, beta=0.1)

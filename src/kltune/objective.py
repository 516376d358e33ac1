r"""PPOObjective: the loss of one minibatch, and its metrics.

.. math::
    \mathcal{L} = \operatorname{agg}(\ell^\text{clip})
        + c_V \operatorname{agg}(\ell^V)
        + c_H \operatorname{agg}(-H)
        + \beta \operatorname{agg}(k)\ [\text{KL in the loss only}]

``agg`` is :func:`~kltune.functional.token_mean` by default (or
:func:`~kltune.functional.sequence_mean`, :func:`~kltune.functional.token_sum`).
Computing the loss changes nothing: β comes in as an argument, metrics go out.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, final, runtime_checkable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

import kltune.functional as KF
from kltune.kl_control import KLPenalty
from kltune.policy import PolicyOutput
from kltune.rollout import Rollout

Aggregate = Callable[[Tensor, Tensor], Tensor]


@runtime_checkable
class Scorer(Protocol):
    """The narrow view of a policy that a loss needs: score given tokens."""

    def score(
        self,
        rollout: Rollout,
        *,
        entropy_with_grad: bool = False,
        with_head: bool = False,
    ) -> PolicyOutput: ...


def _need(value: Tensor | None, name: str) -> Tensor:
    if value is None:
        raise ValueError(f"the minibatch has no {name}; run the loop's earlier stages first")
    return value


@final
@dataclass(frozen=True)
class PPOObjective:
    """Clipped-surrogate PPO loss with optional value, entropy and KL terms.

    Args:
        clip_eps: ε of the policy ratio clip.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens (None: off).
        value_coef: weight c_V of the value loss (used when the policy has a value head).
        value_clip_eps: ε of the value clip around the rollout's values (None: off).
        entropy_coef: weight c_H of the entropy bonus (0: off, and entropy is not
            kept in the graph).
        kl: the KL penalty (estimator and placement); when it is in the loss, the
            term β·agg(k) joins the loss.
        aggregate: how per-token losses become a scalar.

    The precision the policy's forward runs in is the policy's own
    (``Policy(autocast_dtype=...)``), the same for sampling and scoring; the
    loss itself is float32.

    Raises:
        ValueError: ``clip_eps`` or ``value_clip_eps`` not a finite number > 0,
            ``dual_clip`` not a finite number > 1, a coefficient negative or not
            finite; when called, β negative or not finite.
        TypeError: ``aggregate`` is not callable.
    """

    clip_eps: float = 0.2
    dual_clip: float | None = None
    value_coef: float = 0.1
    value_clip_eps: float | None = 0.2
    entropy_coef: float = 0.0
    kl: KLPenalty = field(default_factory=KLPenalty)
    aggregate: Aggregate = KF.token_mean

    def __post_init__(self) -> None:
        # Checked here, so that a bad setting fails when the objective is built,
        # not at the first minibatch after a whole rollout.
        for name in ("clip_eps", "value_clip_eps"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.dual_clip is not None and not (
            self.dual_clip > 1 and math.isfinite(self.dual_clip)
        ):
            raise ValueError(f"dual_clip must be a finite number > 1 or None, got {self.dual_clip}")
        for name in ("value_coef", "entropy_coef"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not callable(self.aggregate):
            raise TypeError(
                f"aggregate must be a function (loss, mask) -> scalar, got {self.aggregate!r}"
            )

    def __call__(
        self, policy: Scorer, minibatch: Rollout, beta: float
    ) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
        """The loss of ``minibatch`` under ``policy`` (with gradient) and detached metrics.

        Raises:
            ValueError: β is negative or not finite (a negative β would pay the
                policy for moving away from π_ref when the KL is in the loss), or
                the minibatch lacks a field an enabled term needs.
        """
        if not (math.isfinite(float(beta)) and float(beta) >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {float(beta)}")
        mask = minibatch.response_mask
        advantages = _need(minibatch.advantages, "advantages")
        out = policy.score(
            minibatch,
            entropy_with_grad=self.entropy_coef > 0,
            with_head=self.kl.in_loss and self.kl.exact,
        )
        surrogate = KF.clipped_surrogate_loss(
            out.logprobs, minibatch.old_logprobs, advantages, self.clip_eps, self.dual_clip
        )
        loss = self.aggregate(surrogate, mask)
        metrics = _policy_metrics(out, minibatch, self.clip_eps, loss)
        if out.values is not None and minibatch.old_values is not None and self.value_coef > 0:
            value_loss = self.aggregate(self._value_loss(out.values, minibatch), mask)
            loss = loss + self.value_coef * value_loss
            metrics["value/loss"] = value_loss.detach()
        if self.entropy_coef > 0:
            loss = loss + self.entropy_coef * self.aggregate(KF.entropy_bonus(out.entropy), mask)
        if self.kl.in_loss:
            kl_term = self.aggregate(self._loss_kl(out, minibatch), mask)
            loss = loss + beta * kl_term
            metrics["kl/loss_term"] = kl_term.detach()
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def _loss_kl(self, out: PolicyOutput, minibatch: Rollout) -> Tensor:
        if self.kl.exact:
            if out.head is None:
                raise ValueError("the policy returned no next-token head for the exact KL")
            ref_head = minibatch.ref_head
            if ref_head is None:
                raise ValueError(
                    "the minibatch has no ref_head; run score_reference with this penalty"
                )
            return self.kl.exact_kl(out.head, ref_head, minibatch.temperature)
        ref = _need(minibatch.ref_logprobs, "ref_logprobs")
        return self.kl.loss_kl(out.logprobs, ref, minibatch.old_logprobs)

    def _value_loss(self, values: Tensor, minibatch: Rollout) -> Tensor:
        returns = _need(minibatch.returns, "returns")
        old_values = _need(minibatch.old_values, "old_values")
        return KF.clipped_value_loss(values, old_values, returns, self.value_clip_eps)


def _policy_metrics(
    out: PolicyOutput, minibatch: Rollout, clip_eps: float, loss: Tensor
) -> dict[str, Tensor]:
    mask: Bool[Tensor, "B T"] = minibatch.response_mask
    ratio = torch.exp((out.logprobs - minibatch.old_logprobs).detach())
    return {
        "policy/loss": loss.detach(),
        "policy/clipfrac": KF.clip_fraction(out.logprobs, minibatch.old_logprobs, mask, clip_eps),
        "policy/approx_kl": KF.approx_kl(out.logprobs, minibatch.old_logprobs, mask),
        "policy/ratio_mean": KF.masked_mean(ratio, mask),
        "policy/ratio_error": (ratio - 1).abs().masked_fill(~mask, 0.0).max(),
        "policy/entropy": KF.masked_mean(out.entropy.detach(), mask),
    }

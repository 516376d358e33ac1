r"""Baselines: turn shaped per-token rewards into advantages and returns.

Every baseline sees a :class:`~kltune.rollout.Rollout` whose ``rewards`` are
filled (score on the last token, −β·kl on every token when the KL is in the
reward). Sequence-level baselines work on the return-to-go

.. math::
    G_t = \sum_{k \ge t} \gamma^{k-t} r_k, \qquad A_t = G_t - b

with one baseline value :math:`b` per completion; the token-level
:class:`GAEBaseline` uses the value head's per-token predictions instead.

A baseline that keeps running statistics returns a new baseline from
``update`` (the loop rebinds it); learned baselines are ``nn.Module``\ s whose
training loss is exposed as ``loss`` so the loop optimises it explicitly.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Protocol, final, runtime_checkable

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

import kltune.functional as KF
from kltune._checks import check_discount
from kltune.rollout import Rollout


@runtime_checkable
class Baseline(Protocol):
    """Advantages and returns from a rollout with shaped rewards."""

    def advantages(self, rollout: Rollout) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
        """``(advantages, returns)``, both zero on padding."""
        ...

    def update(self, rollout: Rollout) -> "Baseline":
        """The baseline after seeing ``rollout`` (itself when it keeps no statistics)."""
        ...


@runtime_checkable
class LearnedBaseline(Baseline, Protocol):
    """A baseline with parameters, trained by the loop on ``loss``."""

    def loss(self, rollout: Rollout) -> Float[Tensor, ""]:
        """The regression loss whose minimisation fits the baseline to ``rollout``."""
        ...

    def parameters(self) -> object:
        """The trainable parameters (as ``nn.Module.parameters``)."""
        ...


def _rewards(rollout: Rollout) -> Tensor:
    if rollout.rewards is None:
        raise ValueError("the rollout has no shaped rewards yet: run shaped_rewards first")
    return rollout.rewards


def _returns(rollout: Rollout, gamma: float) -> Tensor:
    return KF.reward_to_go(_rewards(rollout), rollout.response_mask, gamma)


def _minus(returns: Tensor, baseline: Tensor, rollout: Rollout) -> Tensor:
    """``returns − baseline`` per token, zero on padding."""
    centred = returns - einops.rearrange(baseline, "B -> B 1")
    return torch.where(rollout.response_mask, centred, torch.zeros_like(centred))


def _group_size(rollout: Rollout) -> int:
    """G, checking that every prompt has G contiguous rows (as ``Policy.rollout`` makes them)."""
    index = rollout.prompt_index
    if int(index.min()) < 0:
        raise ValueError(
            f"rollout.prompt_index must be >= 0, got {int(index.min())}; it numbers the "
            "distinct prompts 0, 1, 2, ..."
        )
    counts = torch.bincount(index)
    counts = counts[counts > 0]
    runs = 1 + (index[1:] != index[:-1]).sum()  # contiguous groups: one run per prompt
    low, high, n_runs = torch.stack([counts.min(), counts.max(), runs]).tolist()
    if low != high:
        raise ValueError(
            "group baselines need the same number of completions for every prompt, got "
            f"between {low} and {high} (rollout.prompt_index)"
        )
    if n_runs != counts.numel():
        raise ValueError(
            "group baselines need the rows of each prompt to be contiguous "
            "(rollout.prompt_index like [0, 0, 1, 1]), as Policy.rollout makes them"
        )
    size = int(low)
    if size < 2:
        raise ValueError(
            "group baselines need several completions per prompt "
            "(Sampling(completions_per_prompt=G) with G >= 2, or "
            "Policy.rollout(..., completions_per_prompt=G)); got 1"
        )
    return size


@final
@dataclass(frozen=True)
class MeanBaseline:
    r"""The batch mean of the sequence returns: :math:`b = \frac1B\sum_i G_{i,0}`.

    Args:
        gamma: discount of the returns (1 for RLHF's single end-of-sequence score).
    """

    gamma: float = 1.0

    def __post_init__(self) -> None:
        check_discount(self.gamma)

    def advantages(self, rollout: Rollout) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
        returns = _returns(rollout, self.gamma)
        baseline = returns[:, 0].mean().expand(returns.shape[0])
        return _minus(returns, baseline, rollout), returns

    def update(self, rollout: Rollout) -> "MeanBaseline":
        return self


@final
@dataclass(frozen=True)
class EMABaseline:
    r"""An exponential moving average of past batch-mean returns.

    .. math::
        b_{k+1} = \alpha\, b_k + (1 - \alpha)\, \bar G^{(k)}

    The advantage of a batch uses the average of *earlier* batches only (the
    first batch uses its own mean), so the baseline does not depend on the
    batch it is applied to.

    Args:
        decay: α in [0, 1).
        value: the current average (None before the first batch).
        gamma: discount of the returns.
    """

    decay: float = 0.9
    value: float | None = None
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay}")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"value must be finite or None, got {self.value}")
        check_discount(self.gamma)

    def advantages(self, rollout: Rollout) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
        returns = _returns(rollout, self.gamma)
        current = returns[:, 0].mean() if self.value is None else self.value
        baseline = torch.as_tensor(current, dtype=returns.dtype).expand(returns.shape[0])
        return _minus(returns, baseline, rollout), returns

    def update(self, rollout: Rollout) -> "EMABaseline":
        mean = float(_returns(rollout, self.gamma)[:, 0].mean())
        value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        return dataclasses.replace(self, value=value)


@final
@dataclass(frozen=True)
class LeaveOneOutBaseline:
    r"""Per-prompt leave-one-out (RLOO): each completion's baseline is the mean return of
    the *other* completions of its prompt, :math:`b_i = \frac{1}{G-1}\sum_{j\ne i} G_{j,0}`.

    Needs ``completions_per_prompt`` ≥ 2.

    Raises:
        ValueError: (in :meth:`advantages`) one completion per prompt, groups of
            unequal size, or groups that are not contiguous rows.
    """

    gamma: float = 1.0

    def __post_init__(self) -> None:
        check_discount(self.gamma)

    def advantages(self, rollout: Rollout) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
        returns = _returns(rollout, self.gamma)
        totals = returns[:, 0]
        centred = KF.rloo_advantages(totals, _group_size(rollout))
        return _minus(returns, totals - centred, rollout), returns

    def update(self, rollout: Rollout) -> "LeaveOneOutBaseline":
        return self


@final
@dataclass(frozen=True)
class GRPOBaseline:
    r"""Group-relative advantages (GRPO): each prompt's scores standardised within its group.

    With the KL in the reward, a return is the score plus the KL shaping,
    :math:`G_{i,t} = S_{i,t} + K_{i,t}`. Only the scores are standardised; the KL
    part is centred on the group, as a group-mean baseline would:

    .. math::
        A_{i,t} = \frac{S_{i,t} - \bar S_{g,0}}{\operatorname{std}_g(S_{\cdot,0}) + \epsilon}
            + \bigl(K_{i,t} - \bar K_{g,0}\bigr)

    so a group whose scores all tie carries no score signal (advantage 0 from the
    score) and keeps the small KL differences at their own scale, instead of
    having them divided by a std of ~0 and blown up to unit size. With the KL in
    the loss (or β = 0), :math:`K = 0` and this is DeepSeekMath's GRPO. Needs
    ``completions_per_prompt`` >= 2 (``Sampling(completions_per_prompt=G)``).

    Args:
        gamma: discount of the returns.
        scale: divide the scores by their group's std (False: only centre the
            whole return, as Dr. GRPO recommends).
        eps: added to the std, > 0.

    Raises:
        ValueError: ``gamma`` outside [0, 1] or ``eps`` not a finite number > 0;
            in :meth:`advantages`, the rollout has no scores, one completion per
            prompt, groups of unequal size, or groups that are not contiguous rows.
    """

    gamma: float = 1.0
    scale: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_discount(self.gamma)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")

    def advantages(self, rollout: Rollout) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
        returns = _returns(rollout, self.gamma)
        size = _group_size(rollout)

        def group_mean(values: Tensor) -> Tensor:
            groups = einops.rearrange(values, "(N G) -> N G", G=size)
            return einops.repeat(groups.mean(-1), "N -> (N G)", G=size)

        if not self.scale:
            return _minus(returns, group_mean(returns[:, 0]), rollout), returns
        if rollout.scores is None:
            raise ValueError("GRPOBaseline needs rollout.scores: run compute_scores first")
        mask = rollout.response_mask
        last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask  # the last real token
        score_rewards = torch.where(last, rollout.scores[:, None].to(returns.dtype), 0.0)
        scores = KF.reward_to_go(score_rewards, mask, self.gamma)  # S_t
        shaping = returns - scores  # K_t: the KL part of the return
        std = einops.rearrange(scores[:, 0], "(N G) -> N G", G=size).std(-1)
        std = einops.repeat(std, "N -> (N G)", G=size)
        standardised = _minus(scores, group_mean(scores[:, 0]), rollout) / einops.rearrange(
            std + self.eps, "B -> B 1"
        )
        return standardised + _minus(shaping, group_mean(shaping[:, 0]), rollout), returns

    def update(self, rollout: Rollout) -> "GRPOBaseline":
        return self


class GroupNormBaseline:
    """Deprecated name of :class:`GRPOBaseline` (it read as ``torch.nn.GroupNorm``);
    removed in the next release."""

    def __new__(cls, *args: object, **kwargs: object) -> GRPOBaseline:  # type: ignore[misc]
        warnings.warn(
            "GroupNormBaseline is renamed GRPOBaseline; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return GRPOBaseline(*args, **kwargs)  # type: ignore[arg-type]


@final
class PromptValueBaseline(nn.Module):
    r"""A learned V(prompt): predicts the expected sequence return from the prompt alone.

    .. math::
        b_i = V_\phi(x_i) = w^\top \operatorname{mean}_{p \in x_i} e_p + c

    the mean of learned embeddings of the real prompt tokens of the prompt followed by a linear layer
    (a deliberately small network, separate from the policy, so it adds no
    forward pass through the LM). It is trained online by regression on the
    observed returns; :meth:`loss` is the objective the loop minimises with
    its own optimiser. The baseline depends only on the prompt, so the policy
    gradient stays unbiased.

    Args:
        vocab_size: the policy tokenizer's vocabulary size.
        dim: embedding width.
        gamma: discount of the returns.
    """

    def __init__(self, vocab_size: int, dim: int = 64, gamma: float = 1.0) -> None:
        for name, value in (("vocab_size", vocab_size), ("dim", dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check_discount(gamma)
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.gamma = gamma

    def forward(self, rollout: Rollout) -> Float[Tensor, " B"]:
        """V(prompt) for each row.

        Raises:
            ValueError: a prompt token id is outside ``[0, vocab_size)``.
        """
        ids = rollout.prompt_ids
        vocab = self.embedding.num_embeddings
        low, high = torch.stack([ids.min(), ids.max()]).tolist()
        if low < 0 or high >= vocab:
            raise ValueError(
                f"prompt token ids run from {low} to {high}, outside the baseline's "
                f"vocab_size of {vocab}: build PromptValueBaseline with the policy "
                "tokenizer's len(tokenizer)"
            )
        weights = rollout.prompt_mask.to(self.head.weight.dtype)
        embedded = self.embedding(ids)
        pooled = (embedded * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled).squeeze(-1)

    def advantages(self, rollout: Rollout) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
        returns = _returns(rollout, self.gamma)
        with torch.no_grad():
            baseline = self(rollout).to(returns.dtype)
        return _minus(returns, baseline, rollout), returns

    def update(self, rollout: Rollout) -> "PromptValueBaseline":
        return self

    def loss(self, rollout: Rollout) -> Float[Tensor, ""]:
        """Half the mean squared error between V(prompt) and the observed sequence returns."""
        target = _returns(rollout, self.gamma)[:, 0].detach().to(self.head.weight.dtype)
        return KF.value_regression_loss(self(rollout), target)


@final
@dataclass(frozen=True)
class GAEBaseline:
    r"""Token-level advantages from the policy's value head, with GAE(γ, λ).

    Uses ``rollout.old_values`` (the value head's predictions recorded at
    rollout time) and :func:`kltune.functional.gae`. The value head itself is
    trained by :class:`~kltune.objective.PPOObjective`'s (clipped) value loss
    on the returns computed here.
    """

    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self) -> None:
        check_discount(self.gamma, self.lam)

    def advantages(self, rollout: Rollout) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
        if rollout.old_values is None:
            raise ValueError(
                "GAEBaseline needs rollout.old_values: build the Policy with value_head=True"
            )
        return KF.gae(
            _rewards(rollout), rollout.old_values, rollout.response_mask, self.gamma, self.lam
        )

    def update(self, rollout: Rollout) -> "GAEBaseline":
        return self

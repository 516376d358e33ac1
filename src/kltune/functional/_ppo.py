"""PPO losses per token, ways to aggregate them, and the statistics the loop logs."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kltune._checks import (
    check_floating,
    check_mask,
    check_nonempty_batch,
    check_positive,
    check_rank,
    check_rows_nonempty,
    check_same_shape,
)
from kltune.functional._masked import masked_mean, masked_sum, masked_var


def _check_loss(loss: Tensor, mask: Tensor) -> None:
    check_rank(loss, 2, name="loss", axes="B T")
    check_floating(loss=loss)
    check_mask(mask, loss, like_name="loss")


def _check_pair(mask: Tensor, **tensors: Tensor) -> None:
    """Aligned floating [B, T] tensors and a bool mask of their shape."""
    check_floating(**tensors)
    check_same_shape(**tensors)
    name, first = next(iter(tensors.items()))
    check_rank(first, 2, name=name, axes="B T")
    check_mask(mask, first, like_name=name)


def clipped_surrogate_loss(
    logprobs: Float[Tensor, "B T"],
    old_logprobs: Float[Tensor, "B T"],
    advantages: Float[Tensor, "B T"],
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
) -> Float[Tensor, "B T"]:
    r"""PPO's clipped surrogate policy loss, per token (to be minimised).

    .. math::
        \rho_t = e^{\log\pi(y_t) - \log\pi_\text{old}(y_t)}, \qquad
        \ell_t = \max\bigl(-A_t\rho_t,\; -A_t \operatorname{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\bigr)

    With ``dual_clip`` = c > 1, tokens with :math:`A_t < 0` are further bounded,
    :math:`\ell_t \leftarrow \min(\ell_t, -c A_t)`, so a huge ratio on a bad
    token cannot dominate the batch.

    Args:
        logprobs: log π of the taken tokens under the current weights (with grad).
        old_logprobs: log π_old from the rollout (no grad needed).
        advantages: per-token advantages (broadcast a per-sequence advantage
            with ``einops.repeat(a, "B -> B T", T=T)`` first).
        clip_eps: ε > 0.
        dual_clip: c > 1, or None for the standard loss.

    Returns:
        Per-token loss; aggregate with :func:`token_mean` or friends. Mixed float
        dtypes are promoted as torch promotes them; an empty batch gives an
        empty loss (the aggregation then refuses it).

    Raises:
        ValueError: an input is not floating, shapes differ (a per-sequence
            ``advantages`` of shape [B] included), ε is not a finite number > 0,
            or ``dual_clip`` is not > 1.

    References:
        Schulman et al., "Proximal Policy Optimization Algorithms", 2017,
        https://arxiv.org/abs/1707.06347; Ye et al., "Mastering Complex Control
        in MOBA Games with Deep RL" (dual clip), 2020,
        https://arxiv.org/abs/1912.09729.

    Example:
        >>> lp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
        >>> old = torch.zeros(2, 3)
        >>> adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
        >>> clipped_surrogate_loss(lp, old, adv, clip_eps=0.2)
        tensor([[-1.0000, -1.2000, -0.5000],
                [ 1.0000,  1.5000,  0.8000]])
    """
    check_floating(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    check_positive(clip_eps, name="clip_eps")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def clipped_value_loss(
    values: Float[Tensor, "B T"],
    old_values: Float[Tensor, "B T"],
    returns: Float[Tensor, "B T"],
    clip_eps: float | None = 0.2,
) -> Float[Tensor, "B T"]:
    r"""Value-function loss with PPO-style clipping around the rollout's values.

    .. math::
        \ell_t = \tfrac12 \max\bigl((V_t - R_t)^2,\;
            (V_\text{old,t} + \operatorname{clip}(V_t - V_\text{old,t}, -\epsilon, \epsilon) - R_t)^2\bigr)

    Args:
        values: current value predictions (with grad).
        old_values: the predictions recorded at rollout time.
        returns: targets (e.g. from :func:`gae`).
        clip_eps: ε > 0, or None for the plain squared error.

    Returns:
        Per-token loss.

    Raises:
        ValueError: an input is not floating, shapes differ, or ``clip_eps`` is
            not None and not a finite number > 0.

    Example:
        >>> v = torch.tensor([[1.0, 0.0, 0.5]])
        >>> old = torch.tensor([[0.0, 0.0, 0.0]])
        >>> ret = torch.tensor([[1.0, 1.0, 0.0]])
        >>> clipped_value_loss(v, old, ret, clip_eps=0.2)
        tensor([[0.3200, 0.5000, 0.1250]])
    """
    check_floating(values=values, old_values=old_values, returns=returns)
    check_same_shape(values=values, old_values=old_values, returns=returns)
    plain = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * plain
    check_positive(clip_eps, name="clip_eps")
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * torch.maximum(plain, (clipped - returns) ** 2)


def value_regression_loss(
    predictions: Float[Tensor, " B"], targets: Float[Tensor, " B"]
) -> Float[Tensor, ""]:
    r"""Mean squared error of a per-sequence value model, halved.

    .. math::
        \mathcal{L} = \frac{1}{2B}\sum_i (\hat V_i - s_i)^2

    The training loss of a learned V(prompt) baseline.

    Example:
        >>> value_regression_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
        tensor(0.2500)
    """
    check_floating(predictions=predictions, targets=targets)
    check_same_shape(predictions=predictions, targets=targets)
    check_rank(predictions, 1, name="predictions", axes="B")
    if predictions.shape[0] == 0:
        raise ValueError("predictions is an empty batch")
    return 0.5 * ((predictions - targets) ** 2).mean()


def entropy_bonus(entropy: Float[Tensor, "B T"]) -> Float[Tensor, "B T"]:
    r"""Per-token entropy bonus as a loss term: :math:`\ell_t = -H_t`.

    Minimising ``coef · entropy_bonus`` raises the policy's entropy.

    Example:
        >>> entropy_bonus(torch.tensor([[0.5, 1.0, 0.0]]))
        tensor([[-0.5000, -1.0000, -0.0000]])
    """
    check_floating(entropy=entropy)
    return -entropy


def token_mean(loss: Float[Tensor, "B T"], mask: Bool[Tensor, "B T"]) -> Float[Tensor, ""]:
    r"""Mean over every real token of the batch: :math:`\sum m\ell / \sum m`.

    Long completions weigh more (each token counts once). The default. A row
    with no real token simply contributes nothing.

    Raises:
        ValueError: ``loss`` is not a floating [B, T] tensor, ``mask`` is not a
            bool tensor of its shape, or the mask selects no token at all (an
            empty batch included).

    Example:
        >>> loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> token_mean(loss, mask)
        tensor(1.7500)
    """
    _check_loss(loss, mask)
    return masked_mean(loss, mask)


def sequence_mean(loss: Float[Tensor, "B T"], mask: Bool[Tensor, "B T"]) -> Float[Tensor, ""]:
    r"""Mean over sequences of each sequence's token mean.

    .. math::
        \frac{1}{B}\sum_i \frac{\sum_t m_{it}\ell_{it}}{\sum_t m_{it}}

    Every completion weighs the same whatever its length (the original GRPO).

    Raises:
        ValueError: ``loss`` is not a floating [B, T] tensor, ``mask`` is not a
            bool tensor of its shape, the batch is empty, or a row has no real
            token (its mean would be undefined).

    Example:
        >>> loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> sequence_mean(loss, mask)
        tensor(2.5000)
    """
    _check_loss(loss, mask)
    check_nonempty_batch(loss, name="loss")
    check_rows_nonempty(mask)
    return masked_mean(loss, mask, dim=1).mean()


def token_sum(loss: Float[Tensor, "B T"], mask: Bool[Tensor, "B T"]) -> Float[Tensor, ""]:
    r"""Sum over each sequence's tokens, averaged over sequences: :math:`\frac1B\sum_{i,t} m\ell`.

    The REINFORCE sequence loss; its scale does not depend on how the batch is
    split into minibatches of equal size. A row with no real token adds 0 but
    still counts in :math:`B`.

    Raises:
        ValueError: ``loss`` is not a floating [B, T] tensor, ``mask`` is not a
            bool tensor of its shape, or the batch is empty.

    Example:
        >>> loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> token_sum(loss, mask)
        tensor(3.5000)
    """
    _check_loss(loss, mask)
    if loss.shape[0] == 0:
        raise ValueError("loss is an empty batch")
    return masked_sum(loss, mask) / loss.shape[0]


def approx_kl(
    logprobs: Float[Tensor, "B T"],
    old_logprobs: Float[Tensor, "B T"],
    mask: Bool[Tensor, "B T"],
) -> Float[Tensor, ""]:
    r"""k3 estimate of KL(π_old ‖ π) over real tokens: how far one update moved.

    .. math::
        \widehat{\mathrm{KL}} = \operatorname{mean}_m\bigl(\rho - 1 - \log\rho\bigr),
        \quad \rho = \pi/\pi_\text{old}

    Samples come from π_old (the rollout), so this is the unbiased, non-negative
    k3 estimator with the roles of the two policies as PPO needs them. Detached.

    Raises:
        ValueError: inputs not floating [B, T] tensors of one shape, a bad mask,
            or no real token at all.

    Example:
        >>> lp = torch.log(torch.tensor([[1.0, 2.0, 0.5]]))
        >>> approx_kl(lp, torch.zeros(1, 3), torch.tensor([[True, True, False]]))
        tensor(0.1534)
    """
    _check_pair(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    log_ratio = (logprobs - old_logprobs).detach()
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def clip_fraction(
    logprobs: Float[Tensor, "B T"],
    old_logprobs: Float[Tensor, "B T"],
    mask: Bool[Tensor, "B T"],
    clip_eps: float = 0.2,
) -> Float[Tensor, ""]:
    r"""Fraction of real tokens whose ratio lies outside [1 − ε, 1 + ε].

    .. math::
        \operatorname{mean}_m\, \mathbb{1}\bigl[|\rho_t - 1| > \epsilon\bigr]

    Raises:
        ValueError: inputs not floating [B, T] tensors of one shape, a bad mask,
            no real token at all, or ε not a finite number > 0.

    Example:
        >>> lp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
        >>> clip_fraction(lp, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
        tensor(0.6667)
    """
    _check_pair(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    check_positive(clip_eps, name="clip_eps")
    ratio = torch.exp((logprobs - old_logprobs).detach())
    outside = ((ratio - 1.0).abs() > clip_eps).to(ratio.dtype)
    return masked_mean(outside, mask)


def explained_variance(
    values: Float[Tensor, "B T"], returns: Float[Tensor, "B T"], mask: Bool[Tensor, "B T"]
) -> Float[Tensor, ""]:
    r"""How much of the returns' variance the values explain: :math:`1 - \operatorname{var}(R - V)/\operatorname{var}(R)`.

    1 is a perfect value function, 0 no better than a constant, negative worse.
    NaN when the returns are constant over the real tokens (the ratio is 0/0 or
    x/0 there). Detached.

    Raises:
        ValueError: inputs not floating [B, T] tensors of one shape, a bad mask,
            or no real token at all.

    Example:
        >>> r = torch.tensor([[1.0, 2.0, 3.0]])
        >>> explained_variance(r.clone(), r, torch.ones(1, 3, dtype=torch.bool))
        tensor(1.)
    """
    _check_pair(mask, values=values, returns=returns)
    values, returns = values.detach(), returns.detach()
    spread = masked_var(returns, mask)
    explained = 1.0 - masked_var(returns - values, mask) / spread
    return torch.where(spread > 0, explained, torch.full_like(explained, float("nan")))

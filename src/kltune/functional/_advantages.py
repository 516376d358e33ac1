"""Returns and advantages: reward-to-go, GAE, and group (per-prompt) advantages.

Episodes end at the last real response token of each row: there is no state
after it, so every value past it is 0 (no bootstrap). Padding never enters a
result: rewards and values under the mask are replaced by 0 before use. A row
with no real token is an empty episode: its returns and advantages are all 0.
Empty batches (B = 0 or T = 0) give empty results.
"""

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kltune._checks import (
    check_discount,
    check_finite,
    check_floating,
    check_group_size,
    check_mask,
    check_nonempty_batch,
    check_rank,
)


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_tokens(mask: Tensor, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        check_rank(tensor, 2, name=name, axes="B T")
        check_floating(**{name: tensor})
        check_mask(mask, tensor, like_name=name)


def reward_to_go(
    rewards: Float[Tensor, "B T"], mask: Bool[Tensor, "B T"], gamma: float = 1.0
) -> Float[Tensor, "B T"]:
    r"""Discounted sum of the rewards from each token to the end of its sequence.

    .. math::
        G_t = \sum_{k \ge t} \gamma^{k-t} m_k r_k

    Args:
        rewards: per-token rewards (e.g. from :func:`shaped_rewards`).
        mask: True on real response tokens.
        gamma: discount γ in [0, 1].

    Returns:
        Returns-to-go, 0 at masked positions (all 0 on a row with no real token).

    Raises:
        ValueError: ``rewards`` is not a floating [B, T] tensor, ``mask`` is
            not a bool tensor of its shape, or γ is outside [0, 1].

    Example:
        >>> r = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
        >>> m = torch.tensor([[True, True, True], [True, True, False]])
        >>> reward_to_go(r, m, gamma=0.5)
        tensor([[0.2500, 0.5000, 1.0000],
                [2.0000, 2.0000, 0.0000]])
    """
    _check_tokens(mask, rewards=rewards)
    check_discount(gamma)
    rewards = _zero_padding(rewards, mask)
    if rewards.shape[1] == 0:
        return rewards
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out.append(running)
    return _zero_padding(torch.stack(out[::-1], dim=1), mask)


def gae(
    rewards: Float[Tensor, "B T"],
    values: Float[Tensor, "B T"],
    mask: Bool[Tensor, "B T"],
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
    r"""Generalised advantage estimation over response tokens.

    .. math::
        \delta_t = r_t + \gamma\, m_{t+1} V_{t+1} - V_t, \qquad
        A_t = \delta_t + \gamma\lambda\, m_{t+1} A_{t+1}, \qquad
        R_t = A_t + V_t

    with :math:`m_{T} = 0`: past the last real token the value is 0, because
    the episode ends there (the reward model scored the completion as it is).

    Args:
        rewards: per-token rewards.
        values: V(s_t), the value of the state before token t.
        mask: True on real response tokens.
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1]; λ = 1 gives reward-to-go minus values, λ = 0 the
            one-step TD error.

    Returns:
        ``(advantages, returns)``, both 0 at masked positions (all 0 on a row
        with no real token). Returns are the value-function targets. Mixed float
        dtypes are promoted as torch promotes them.

    Raises:
        ValueError: ``rewards`` or ``values`` is not a floating [B, T] tensor,
            ``mask`` is not a bool tensor of their shape, or γ or λ is outside [0, 1].

    References:
        Schulman et al., "High-Dimensional Continuous Control Using Generalized
        Advantage Estimation", 2016, https://arxiv.org/abs/1506.02438.

    Example:
        >>> r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        >>> v = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 9.0]])
        >>> m = torch.tensor([[True, True, True], [True, True, False]])
        >>> adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
        >>> adv
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.0000]])
        >>> ret
        tensor([[1., 1., 1.],
                [1., 1., 0.]])
    """
    _check_tokens(mask, rewards=rewards, values=values)
    check_discount(gamma, lam)
    rewards = _zero_padding(rewards, mask)
    values = _zero_padding(values, mask)
    if rewards.shape[1] == 0:
        empty = rewards + values  # the promoted dtype, as below
        return empty, empty.clone()
    real = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * real[:, t]
        next_value = values[:, t]
        out.append(next_adv)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, _zero_padding(advantages + values, mask)


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    check_rank(scores, 1, name="scores", axes="B")
    check_floating(scores=scores)
    check_nonempty_batch(scores, name="scores")
    check_group_size(scores.shape[0], group_size)
    return einops.rearrange(scores, "(N G) -> N G", G=group_size)


def rloo_advantages(scores: Float[Tensor, " B"], group_size: int) -> Float[Tensor, " B"]:
    r"""Leave-one-out advantages: each score minus the mean of the others of its prompt.

    .. math::
        A_i = s_i - \frac{1}{G-1}\sum_{j \ne i} s_j = \frac{G}{G-1}(s_i - \bar s)

    Completions of one prompt are contiguous: rows ``[k·G, (k+1)·G)`` share
    prompt ``k``. The baseline of each sample does not depend on that sample,
    so the policy gradient stays unbiased.

    Args:
        scores: one score per completion.
        group_size: G ≥ 2, completions per prompt.

    Returns:
        Advantages; they sum to 0 within each group. A NaN score makes its whole
        group NaN (validate scores first, as :func:`kltune.rewards.score_completions` does).

    Raises:
        ValueError: ``scores`` is not a non-empty floating [B] tensor, G < 2,
            or B is not a multiple of G.
        TypeError: ``group_size`` is not an int.

    References:
        Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style
        Optimization for Learning from Human Feedback in LLMs", 2024,
        https://arxiv.org/abs/2402.14740.

    Example:
        >>> rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0]), group_size=3)
        tensor([-1.5000,  0.0000,  1.5000, -1.5000, -1.5000,  3.0000])
    """
    groups = _grouped(scores, group_size)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return einops.rearrange(groups - others_mean, "N G -> (N G)")


def grpo_advantages(
    scores: Float[Tensor, " B"], group_size: int, scale: bool = True, eps: float = 1e-6
) -> Float[Tensor, " B"]:
    r"""Group-normalised advantages (GRPO): standardise scores within each prompt.

    .. math::
        A_i = \frac{s_i - \operatorname{mean}_g(s)}{\operatorname{std}_g(s) + \epsilon}

    with the unbiased standard deviation over the G completions of the prompt.

    Args:
        scores: one score per completion, groups contiguous as in
            :func:`rloo_advantages`.
        group_size: G ≥ 2.
        scale: divide by the group's std; False keeps only the centring (as Dr.
            GRPO recommends, to avoid favouring groups with tiny spread).
        eps: added to the std, >= 0.

    Returns:
        Advantages. A group whose scores are all equal gets advantages 0 (0/0,
        NaN, with ``scale`` and ``eps = 0``).

    Raises:
        ValueError: ``scores`` is not a non-empty floating [B] tensor, G < 2,
            B is not a multiple of G, or ``eps`` is negative or not finite.
        TypeError: ``group_size`` is not an int.

    References:
        Shao et al., "DeepSeekMath", 2024, https://arxiv.org/abs/2402.03300;
        Liu et al., "Understanding R1-Zero-Like Training", 2025,
        https://arxiv.org/abs/2503.20783.

    Example:
        >>> grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
        tensor([-1.0000,  0.0000,  1.0000,  0.0000,  0.0000,  0.0000])
    """
    check_finite(eps, name="eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    groups = _grouped(scores, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return einops.rearrange(centred, "N G -> (N G)")


def within_group_var(scores: Float[Tensor, " B"], group_size: int) -> Float[Tensor, ""]:
    r"""The pooled within-prompt variance of the scores: the floor of any prompt baseline.

    .. math::
        \bar s^2_\text{within} = \frac1N \sum_{n=1}^{N} \frac{1}{G-1}
            \sum_{i \in n} (s_i - \bar s_n)^2

    For a baseline :math:`b(x)` that depends on the prompt only, the advantage
    variance is :math:`\mathbb{E}[\operatorname{Var}(s\mid x)] + \mathbb{E}[(V(x) -
    b(x))^2]`, smallest for the oracle :math:`b = V(x) = \mathbb{E}[s\mid x]`. This
    statistic is an unbiased estimate of that floor, :math:`\mathbb{E}[\operatorname{Var}
    (s\mid x)]`, from the batch itself, with no extra samples: what a perfect learned
    V(prompt) would reach. (Leave-one-out reaches :math:`G/(G-1)` times it.)

    Args:
        scores: one score (or sequence return) per completion, the G completions of
            each prompt contiguous as in :func:`rloo_advantages`.
        group_size: G >= 2.

    Returns:
        The pooled unbiased variance (a scalar). Adding any per-prompt constant to
        the scores leaves it unchanged.

    Raises:
        ValueError: ``scores`` is not a non-empty floating [B] tensor, G < 2, or B
            is not a multiple of G.
        TypeError: ``group_size`` is not an int.

    Example:
        >>> within_group_var(torch.tensor([0.0, 2.0, 10.0, 10.0]), group_size=2)
        tensor(1.)
    """
    return _grouped(scores, group_size).var(dim=-1).mean()

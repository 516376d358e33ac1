r"""Best-of-n sampling from the reference: the no-training point of comparison for RLHF.

Draw :math:`n` completions from :math:`\pi_\text{ref}` and keep the one with the
highest reward. This policy needs no gradient step, and its KL to the reference
is known in closed form (for a reward with no ties):

.. math::
    \mathrm{KL}(\pi_{\text{best-of-}n} \,\|\, \pi_\text{ref}) = \log n - \frac{n-1}{n}

With ties (a reward that takes few values) the true KL is below this value, so
the formula is an upper bound (Beirami et al. 2024). Its expected reward is
estimated from :math:`m \ge n` scored samples per prompt, without bias, as the
average over all :math:`\binom{m}{n}` subsets of the subset's maximum.

A PPO run that reaches a reward at a KL no better than best-of-n has bought
nothing with its training; Gao et al. (2022) plot both on one reward–KL frontier.

References:
    Leo Gao, John Schulman, Jacob Hilton, "Scaling Laws for Reward Model
    Overoptimization", 2022, https://arxiv.org/abs/2210.10760.
    Ahmad Beirami et al., "Theoretical guarantees on the best-of-n alignment
    policy", 2024, https://arxiv.org/abs/2401.01879.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from kltune._checks import check_count, check_floating, check_rank, check_same_shape


def best_of_n_kl(n: int) -> float:
    r"""KL(best-of-n ‖ π_ref) in nats: :math:`\log n - (n-1)/n` (an upper bound with ties).

    Args:
        n: completions drawn per prompt (>= 1).

    Returns:
        The KL of the best-of-n policy to the sampling policy; 0 for n = 1.

    Raises:
        TypeError: ``n`` is not an int.
        ValueError: ``n`` < 1.

    Example:
        >>> round(best_of_n_kl(4), 4)
        0.6363
    """
    n = check_count(n, name="n")
    return math.log(n) - (n - 1) / n


def expected_best_of_n(
    scores: Float[Tensor, "P M"], n: int, values: Float[Tensor, "P M"] | None = None
) -> Float[Tensor, " P"]:
    r"""Expected reward of best-of-n, per prompt, from ``M >= n`` samples of each.

    With the scores of one prompt sorted ascending, :math:`s_{(1)} \le \dots \le
    s_{(M)}`, the maximum of a uniformly drawn n-subset is :math:`s_{(i)}` with
    probability :math:`\binom{i-1}{n-1} / \binom{M}{n}`, so

    .. math::
        \widehat{R}_n = \sum_{i=n}^{M} \frac{\binom{i-1}{n-1}}{\binom{M}{n}}\, s_{(i)}

    the exact average of the maximum over all n-subsets: an unbiased estimate of
    best-of-n's expected reward, with less variance than one draw of n.

    With ``values``, the same weights average :math:`v_{(i)}`, the value of the
    sample ranked :math:`i` by score: the expected *gold* reward of best-of-n
    chosen by a *proxy* score, which is how reward over-optimisation is measured
    (Gao et al. 2022). Samples with equal scores are ranked by their order.

    Args:
        scores: rewards of ``M`` completions sampled from the reference for each
            of ``P`` prompts.
        n: the best of how many (1 <= n <= M).
        values: what to average instead of the scores (aligned with ``scores``);
            ``None`` averages the scores themselves.

    Returns:
        The expected best-of-n reward (or value) of each prompt (float64).

    Raises:
        TypeError: ``n`` is not an int.
        ValueError: ``scores`` (or ``values``) is not a finite floating [P, M]
            tensor with P >= 1, or ``n`` is outside 1..M.

    Example:
        >>> scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> expected_best_of_n(scores, 1)  # the mean
        tensor([1.5000], dtype=torch.float64)
        >>> expected_best_of_n(scores, 2)  # (1 + 2 + 2 + 3 + 3 + 3) / 6
        tensor([2.3333], dtype=torch.float64)
        >>> gold = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # the proxy's top two are bad
        >>> expected_best_of_n(scores, 2, values=gold)  # P(the best of 2 is in the top two)
        tensor([0.1667], dtype=torch.float64)
    """
    check_floating(scores=scores)
    check_rank(scores, 2, name="scores", axes="P M")
    prompts, m = scores.shape
    if prompts == 0 or m == 0:
        raise ValueError(f"scores is empty (shape {tuple(scores.shape)}); need [P >= 1, M >= 1]")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores holds NaN or infinite values")
    if values is not None:
        check_floating(values=values)
        check_same_shape(scores=scores, values=values)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values holds NaN or infinite values")
    n = check_count(n, name="n")
    if n > m:
        raise ValueError(f"n = {n} is more than the M = {m} samples per prompt in scores")
    ranks = torch.arange(1, m + 1, dtype=torch.float64)
    # C(i-1, n-1) / C(M, n) through log-gamma: exact enough for M in the thousands.
    log_weight = (
        torch.lgamma(ranks)
        - torch.lgamma(torch.tensor(float(n)))
        - torch.lgamma(ranks - n + 1).where(ranks >= n, torch.tensor(0.0, dtype=torch.float64))
        - (math.lgamma(m + 1) - math.lgamma(n + 1) - math.lgamma(m - n + 1))
    )
    weight = torch.where(ranks >= n, log_weight.exp(), torch.zeros_like(ranks))
    weight = weight / weight.sum()  # exactly 1 in exact arithmetic; removes rounding
    order = scores.double().sort(dim=-1, stable=True).indices
    ordered = (scores if values is None else values).double().gather(-1, order)
    return ordered @ weight

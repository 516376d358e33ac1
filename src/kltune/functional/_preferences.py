r"""Learning from preferences: the Bradley–Terry loss, DPO, and reward over-optimisation.

A preference is a pair of completions of one prompt where a judge preferred
``chosen`` over ``rejected``. The Bradley–Terry model says the judge prefers
:math:`y_c` to :math:`y_r` with probability :math:`\sigma(r(y_c) - r(y_r))` for
some reward :math:`r`; fitting :math:`r_\phi` by maximum likelihood gives the
reward model's loss

.. math::
    \mathcal{L}_\text{BT} = -\frac{1}{B}\sum_i \log\sigma\bigl(s^c_i - s^r_i - m_i\bigr)
        \;+\; \lambda\,\frac{1}{B}\sum_i \bigl(s^c_i + s^r_i\bigr)^2

with an optional margin :math:`m` (Llama 2's graded preferences) and reward
centring :math:`\lambda` (Eisenstein et al. 2023), which pins the free offset
of the scores near 0 so that a KL-penalised policy sees a reward of stable scale.

DPO (Rafailov et al. 2023) skips the reward model: the policy that maximises
:math:`r - \beta\,\mathrm{KL}(\pi\|\pi_\text{ref})` satisfies
:math:`r(x, y) = \beta \log\frac{\pi(y|x)}{\pi_\text{ref}(y|x)} + \text{const}(x)`,
so the Bradley–Terry loss of these *implicit rewards* trains the policy directly.

Gao et al. (2022) found that the *gold* reward gained by optimising a learned
proxy follows, in :math:`d = \sqrt{\mathrm{KL}(\pi\|\pi_\text{ref})}`,

.. math::
    R_\text{bon}(d) = d\,(\alpha - \beta d), \qquad
    R_\text{RL}(d) = d\,(\alpha - \beta \log d)

for best-of-n and for RL: it rises, peaks and falls as the policy exploits the
proxy's errors. Both are linear in :math:`(\alpha, \beta)`, so least squares fits them.

References:
    Rafael Rafailov et al., "Direct Preference Optimization: Your Language Model
    is Secretly a Reward Model", 2023, https://arxiv.org/abs/2305.18290.
    Leo Gao, John Schulman, Jacob Hilton, "Scaling Laws for Reward Model
    Overoptimization", 2022, https://arxiv.org/abs/2210.10760.
    Jacob Eisenstein et al., "Helping or Herding? Reward Model Ensembles Mitigate
    but do not Eliminate Reward Hacking", 2023, https://arxiv.org/abs/2312.09244.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from kltune._checks import (
    check_floating,
    check_nonempty_batch,
    check_positive,
    check_rank,
    check_same_shape,
)

OverOptimisationForm = Literal["best_of_n", "rl"]
_FORMS = ("best_of_n", "rl")


def _check_pairs(**scores: Tensor) -> None:
    check_floating(**scores)
    for name, tensor in scores.items():
        check_rank(tensor, 1, name=name, axes="B")
        check_nonempty_batch(tensor, name=name)
    check_same_shape(**scores)


def preference_logits(
    chosen_scores: Float[Tensor, " B"],
    rejected_scores: Float[Tensor, " B"],
    margin: Float[Tensor, " B"] | float = 0.0,
) -> Float[Tensor, " B"]:
    r"""The Bradley–Terry logit of each pair: :math:`s^c - s^r - m`.

    :math:`\sigma` of it is the modelled probability that the judge prefers
    ``chosen``; swapping chosen and rejected (with no margin) negates it.

    Args:
        chosen_scores: the reward of each preferred completion.
        rejected_scores: the reward of each dispreferred completion.
        margin: how much higher the chosen score must be (a float or one per pair).

    Raises:
        ValueError: the scores are not aligned, non-empty floating [B] tensors, or
            ``margin`` is a tensor of another shape.
    """
    _check_pairs(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    if isinstance(margin, Tensor):
        check_same_shape(chosen_scores=chosen_scores, margin=margin)
    return chosen_scores - rejected_scores - margin


def bradley_terry_loss(
    chosen_scores: Float[Tensor, " B"],
    rejected_scores: Float[Tensor, " B"],
    *,
    margin: Float[Tensor, " B"] | float = 0.0,
    centring: float = 0.0,
) -> Float[Tensor, ""]:
    r"""The reward model's loss: mean :math:`-\log\sigma(s^c - s^r - m)` plus centring.

    Args:
        chosen_scores: the reward model's score of each preferred completion.
        rejected_scores: its score of each dispreferred completion.
        margin: required score gap (a float, or one per pair).
        centring: :math:`\lambda \ge 0`, weight of :math:`\overline{(s^c + s^r)^2}`,
            which keeps the scores' mean near 0 (TRL's ``center_rewards_coefficient``).

    Returns:
        The mean loss over the pairs; :math:`\log 2` when every pair ties.

    Raises:
        ValueError: bad shapes (see :func:`preference_logits`), or ``centring`` < 0.

    Example:
        >>> chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
        >>> bradley_terry_loss(chosen, rejected)  # (softplus(-2) + log 2) / 2
        tensor(0.4100)
    """
    if not centring >= 0:
        raise ValueError(f"centring must be >= 0, got {centring}")
    logits = preference_logits(chosen_scores, rejected_scores, margin)
    loss = F.softplus(-logits).mean()  # -log σ(x) = softplus(-x), stable for any x
    if centring:
        loss = loss + centring * (chosen_scores + rejected_scores).square().mean()
    return loss


def preference_accuracy(
    chosen_scores: Float[Tensor, " B"], rejected_scores: Float[Tensor, " B"]
) -> Float[Tensor, ""]:
    """The fraction of pairs the scores rank correctly; a tie counts one half.

    Example:
        >>> preference_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]))
        tensor(0.5000)
    """
    logits = preference_logits(chosen_scores, rejected_scores)
    return ((logits > 0).float() + 0.5 * (logits == 0).float()).mean()


def dpo_implicit_rewards(
    logprobs: Float[Tensor, " B"], ref_logprobs: Float[Tensor, " B"], *, beta: float
) -> Float[Tensor, " B"]:
    r"""DPO's implicit reward of a completion: :math:`\beta(\log\pi(y|x) - \log\pi_\text{ref}(y|x))`.

    Args:
        logprobs: the policy's log-probability of each whole completion (the
            masked sum of its token logprobs, e.g. :func:`masked_sum`).
        ref_logprobs: the reference's log-probability of the same completions.
        beta: :math:`\beta > 0`, the KL weight DPO's policy is optimal for.

    Raises:
        ValueError: the tensors are not aligned, non-empty floating [B] tensors, or
            ``beta`` is not a finite number > 0.
    """
    check_positive(beta, name="beta")
    _check_pairs(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return beta * (logprobs - ref_logprobs)


def dpo_loss(
    chosen_logprobs: Float[Tensor, " B"],
    rejected_logprobs: Float[Tensor, " B"],
    ref_chosen_logprobs: Float[Tensor, " B"],
    ref_rejected_logprobs: Float[Tensor, " B"],
    *,
    beta: float,
) -> Float[Tensor, ""]:
    r"""The DPO loss: the Bradley–Terry loss of the implicit rewards.

    .. math::
        \mathcal{L}_\text{DPO} = -\frac{1}{B}\sum_i \log\sigma\Bigl(
            \beta\log\frac{\pi(y^c_i|x_i)}{\pi_\text{ref}(y^c_i|x_i)}
          - \beta\log\frac{\pi(y^r_i|x_i)}{\pi_\text{ref}(y^r_i|x_i)}\Bigr)

    Args:
        chosen_logprobs: the policy's sequence logprob of each preferred completion.
        rejected_logprobs: the policy's sequence logprob of each dispreferred one.
        ref_chosen_logprobs: the reference's logprob of each preferred completion.
        ref_rejected_logprobs: the reference's logprob of each dispreferred one.
        beta: :math:`\beta > 0`; larger keeps the policy closer to the reference.

    Returns:
        The mean loss; :math:`\log 2` while the policy equals the reference.

    Raises:
        ValueError: bad shapes (see :func:`dpo_implicit_rewards`).

    Example:
        >>> same = torch.tensor([-5.0, -7.0])
        >>> dpo_loss(same, same - 1, same, same - 1, beta=0.1)  # policy = reference
        tensor(0.6931)
    """
    _check_pairs(
        chosen_logprobs=chosen_logprobs,
        rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs,
        ref_rejected_logprobs=ref_rejected_logprobs,
    )
    return bradley_terry_loss(
        dpo_implicit_rewards(chosen_logprobs, ref_chosen_logprobs, beta=beta),
        dpo_implicit_rewards(rejected_logprobs, ref_rejected_logprobs, beta=beta),
    )


def _features(sqrt_kl: Tensor, form: str) -> Tensor:
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    d = sqrt_kl.double()
    # R = α·d − β·g(d): linear in (α, β); d·log d → 0 as d → 0 (xlogy's convention)
    g = d.square() if form == "best_of_n" else torch.xlogy(d, d)
    return torch.stack([d, -g], dim=-1)


def overoptimisation_coefficients(
    sqrt_kl: Float[Tensor, " N"],
    gains: Float[Tensor, " N"],
    form: OverOptimisationForm,
) -> Float[Tensor, "2"]:
    r"""Least-squares :math:`(\alpha, \beta)` of Gao et al.'s gold-reward curve.

    Fits :math:`R(d) = d(\alpha - \beta d)` (``"best_of_n"``) or
    :math:`R(d) = d(\alpha - \beta\log d)` (``"rl"``) to measured points, where
    :math:`R` is the gold reward *gained* over the reference (so :math:`R(0) = 0`).
    The fitted best-of-n curve peaks at :math:`d^* = \alpha / 2\beta`, the RL
    curve at :math:`d^* = e^{\alpha/\beta - 1}` (for :math:`\beta > 0`).

    Args:
        sqrt_kl: :math:`d = \sqrt{\mathrm{KL}(\pi\|\pi_\text{ref})}` of each point (≥ 0).
        gains: the gold reward of each point minus the reference's.
        form: ``"best_of_n"`` or ``"rl"``.

    Returns:
        ``tensor([alpha, beta])`` in float64.

    Raises:
        ValueError: the inputs are not aligned finite [N] tensors with N >= 2, a
            ``sqrt_kl`` is negative, or ``form`` is unknown.

    Example:
        >>> d = torch.tensor([0.5, 1.0, 2.0, 3.0])
        >>> overoptimisation_coefficients(d, d * (1.0 - 0.25 * d), "best_of_n")
        tensor([1.0000, 0.2500], dtype=torch.float64)
    """
    check_floating(sqrt_kl=sqrt_kl, gains=gains)
    check_rank(sqrt_kl, 1, name="sqrt_kl", axes="N")
    check_same_shape(sqrt_kl=sqrt_kl, gains=gains)
    if sqrt_kl.shape[0] < 2:
        raise ValueError(f"need at least 2 points to fit 2 coefficients, got {sqrt_kl.shape[0]}")
    if not bool(torch.isfinite(sqrt_kl).all() and torch.isfinite(gains).all()):
        raise ValueError("sqrt_kl and gains must be finite (no NaN or inf)")
    if bool((sqrt_kl < 0).any()):
        raise ValueError("sqrt_kl holds negative values; it is the square root of a KL")
    features = _features(sqrt_kl, form)
    return torch.linalg.lstsq(features, gains.double()[:, None]).solution[:, 0]


def overoptimisation_curve(
    sqrt_kl: Float[Tensor, " N"], coefficients: Float[Tensor, "2"], form: OverOptimisationForm
) -> Float[Tensor, " N"]:
    r"""Gao et al.'s gold-reward gain at each :math:`d`, from fitted :math:`(\alpha, \beta)`.

    Example:
        >>> overoptimisation_curve(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.25]), "best_of_n")
        tensor([0., 1.], dtype=torch.float64)
    """
    check_rank(coefficients, 1, name="coefficients", axes="2")
    if coefficients.shape[0] != 2:
        raise ValueError(
            f"coefficients must be [alpha, beta], got shape {tuple(coefficients.shape)}"
        )
    return _features(sqrt_kl, form) @ coefficients.double()

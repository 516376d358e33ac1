r"""KL estimators between the policy π and the reference π_ref, and KL-shaped rewards.

All estimators take samples :math:`y \sim \pi` (the response tokens) and the
log-ratio :math:`\Delta = \log \pi_\text{ref}(y) - \log \pi(y)`.

===========  =====================================  ================  ======================================
estimator    per-token value                        value unbiased?   gradient when used in a loss
===========  =====================================  ================  ======================================
``kl_k1``    :math:`-\Delta`                        yes               :math:`\mathbb{E}[\nabla\log\pi] = 0`:
                                                                      no signal (use it in the reward)
``kl_k2``    :math:`\tfrac12\Delta^2`               no (biased up     :math:`\nabla\,\mathrm{KL}(\pi\|\pi_\text{ref})`
                                                    when far apart)   exactly, in expectation
``kl_k3``    :math:`e^{\Delta} - 1 - \Delta \ge 0`  yes               :math:`\nabla\,\mathrm{KL}(\pi_\text{ref}\|\pi)`:
                                                                      the *forward* KL, biased
``kl_k3_st`` k3's value                             yes               k2's gradient (straight-through)
``kl_exact`` :math:`\sum_v \pi\log(\pi/\pi_\text{ref})`  exact        exact
===========  =====================================  ================  ======================================

The gradient column is for one token in the loss. In the reward, what counts is
the score-function gradient :math:`\mathbb{E}[k\,\nabla\log\pi]`: exactly
:math:`\nabla\mathrm{KL}(\pi\|\pi_\text{ref})` for k1 (the library's default), and
almost nothing near the reference for k3. The whole estimator × placement matrix
is :data:`kltune.kl_control.GRADIENTS`, checked in ``tests/test_kl_matrix.py``.

References:
    John Schulman, "Approximating KL Divergence", 2020,
    http://joschu.net/blog/kl-approx.html.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kltune._checks import (
    check_finite,
    check_floating,
    check_mask,
    check_rank,
    check_rows_nonempty,
    check_same_shape,
)
from kltune.functional._logprobs import DEFAULT_CHUNK_TOKENS, _check_logits, _row_chunks, _scaled


# Mixed float dtypes (float32 with float64) are promoted as torch promotes them; the
# estimators are elementwise, so a batch of any shape, empty included, maps to its like.
def _log_ratio(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    check_floating(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return ref_logprobs - logprobs


def kl_k1(
    logprobs: Float[Tensor, "B T"], ref_logprobs: Float[Tensor, "B T"]
) -> Float[Tensor, "B T"]:
    r"""Per-token k1 estimate of KL(π ‖ π_ref): the log-ratio.

    .. math::
        k_1 = \log \pi(y) - \log \pi_\text{ref}(y), \quad y \sim \pi

    Unbiased for the KL value, but of high variance and often negative for a
    single token. As a loss term its expected gradient is zero (it is
    :math:`\nabla \log \pi` times a constant 1), so k1 belongs in the reward.

    Args:
        logprobs: log π of the sampled tokens.
        ref_logprobs: log π_ref of the same tokens.

    Returns:
        k1 per token.

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
        >>> ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]]))
        >>> kl_k1(lp, ref)
        tensor([[ 0.0000,  0.6931, -0.6931],
                [-0.6931,  0.0000,  0.6931]])
    """
    _log_ratio(logprobs, ref_logprobs)  # validates
    return logprobs - ref_logprobs


def kl_k2(
    logprobs: Float[Tensor, "B T"], ref_logprobs: Float[Tensor, "B T"]
) -> Float[Tensor, "B T"]:
    r"""Per-token k2 estimate of KL(π ‖ π_ref): half the squared log-ratio.

    .. math::
        k_2 = \tfrac12 (\log \pi(y) - \log \pi_\text{ref}(y))^2

    Biased for the value (low variance, close to the KL when π ≈ π_ref). Its
    gradient, :math:`(\log\pi - \log\pi_\text{ref})\nabla\log\pi`, is in
    expectation the exact gradient of KL(π ‖ π_ref): the right estimator to put
    **in the loss**.

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
        >>> ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]]))
        >>> kl_k2(lp, ref)
        tensor([[0.0000, 0.2402, 0.2402],
                [0.2402, 0.0000, 0.2402]])
    """
    return 0.5 * _log_ratio(logprobs, ref_logprobs) ** 2


def kl_k3(
    logprobs: Float[Tensor, "B T"], ref_logprobs: Float[Tensor, "B T"]
) -> Float[Tensor, "B T"]:
    r"""Per-token k3 estimate of KL(π ‖ π_ref): unbiased and never negative.

    .. math::
        k_3 = e^{\Delta} - 1 - \Delta, \quad \Delta = \log \pi_\text{ref}(y) - \log \pi(y)

    Unbiased for the value (:math:`\mathbb{E}_\pi[e^\Delta] = 1`) and ≥ 0 token
    by token, with lower variance than k1: a good *value* to log. Not for the
    reward alone: there its score-function gradient is
    :math:`\nabla\mathrm{KL}(\pi\|\pi_\text{ref}) - \nabla\mathrm{KL}(\pi_\text{ref}\|\pi)`,
    almost nothing near the reference (use :func:`kl_k1`). As a loss term it is biased: its expected gradient
    :math:`\mathbb{E}_\pi[(1 - \pi_\text{ref}/\pi)\nabla\log\pi]` is the gradient
    of the *forward* KL(π_ref ‖ π). Use :func:`kl_k3_st` or
    :func:`kl_k2` in the loss.

    Notes:
        ``expm1`` keeps precision when Δ is near 0. Δ is not clamped: a huge
        positive Δ (π far below π_ref) overflows to inf, which the loop's
        non-finite checks report rather than hide.

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
        >>> ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]]))
        >>> kl_k3(lp, ref)
        tensor([[0.0000, 0.1931, 0.3069],
                [0.3069, 0.0000, 0.1931]])
    """
    delta = _log_ratio(logprobs, ref_logprobs)
    return torch.expm1(delta) - delta


def kl_k3_st(
    logprobs: Float[Tensor, "B T"], ref_logprobs: Float[Tensor, "B T"]
) -> Float[Tensor, "B T"]:
    r"""k3's value with k2's gradient (straight-through): an unbiased KL loss term.

    .. math::
        k_{3,\text{st}} = k_2 + \operatorname{sg}(k_3 - k_2)

    where sg stops the gradient. The forward value is exactly :func:`kl_k3`
    (unbiased, ≥ 0, what gets logged); the backward is :func:`kl_k2`'s, whose
    expectation is the true gradient of KL(π ‖ π_ref).

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
        >>> ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]]))
        >>> torch.allclose(kl_k3_st(lp, ref), kl_k3(lp, ref))
        True
    """
    k2 = kl_k2(logprobs, ref_logprobs)
    return k2 + (kl_k3(logprobs, ref_logprobs) - k2).detach()


def kl_exact(
    logits: Float[Tensor, "B T V"],
    ref_logits: Float[Tensor, "B T V"],
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Float[Tensor, "B T"]:
    r"""Exact per-position KL(π ‖ π_ref) summed over the vocabulary.

    .. math::
        \mathrm{KL}_t = \sum_v \pi_t(v)\,\bigl(\log \pi_t(v) - \log \pi_{\text{ref},t}(v)\bigr)

    with both distributions ``softmax(logits / temperature)``. No sampling noise
    and ≥ 0, at the price of both full logit tensors. Computed in float32 chunks
    (float64 for float64 logits); an empty batch gives an empty result.

    Raises:
        ValueError: the logits are not floating [B, T, V] tensors of one shape
            with V >= 1, τ is not a finite number > 0, or ``chunk_tokens`` < 1.

    Example:
        >>> logits = torch.zeros(2, 3, 2)
        >>> ref = torch.tensor([[[0.0, 0.0]] * 3, [[0.0, 1.0]] * 3])
        >>> kl_exact(logits, ref)
        tensor([[0.0000, 0.0000, 0.0000],
                [0.1201, 0.1201, 0.1201]])
    """
    _check_logits(logits, temperature, chunk_tokens)
    check_floating(ref_logits=ref_logits)
    check_same_shape(logits=logits, ref_logits=ref_logits)
    flat = logits.reshape(-1, logits.shape[-1])
    flat_ref = ref_logits.reshape(-1, ref_logits.shape[-1])
    pieces = []
    for start, stop in _row_chunks(flat, chunk_tokens):
        log_p = torch.log_softmax(_scaled(flat[start:stop], temperature), dim=-1)
        log_q = torch.log_softmax(_scaled(flat_ref[start:stop], temperature), dim=-1)
        # clamp: rounding can leave a KL of -1e-9 for identical rows.
        pieces.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0))
    return torch.cat(pieces).reshape(logits.shape[:2])


def shaped_rewards(
    scores: Float[Tensor, " B"],
    kl: Float[Tensor, "B T"],
    mask: Bool[Tensor, "B T"],
    beta: float | Float[Tensor, ""],
) -> Float[Tensor, "B T"]:
    r"""Per-token rewards: the KL penalty on every token, the score on the last.

    .. math::
        r_t = -\beta\,\mathrm{kl}_t + \mathbb{1}[t = t_\text{last}]\,s

    where :math:`t_\text{last}` is the last real response token of the row (the
    EOS token when the completion ended, else the last token before truncation).

    Args:
        scores: one score per completion (from a ``RewardFn``).
        kl: per-token KL estimate (e.g. :func:`kl_k1`, the default in the reward).
        mask: True on real response tokens; each row must hold at least one.
        beta: KL coefficient β ≥ 0.

    Returns:
        Per-token rewards, 0 at masked positions, in the dtype of ``kl``
        (``scores`` is cast to it). An empty batch (B = 0) gives an empty result.

    Raises:
        ValueError: ``scores`` or ``kl`` is not floating, shapes disagree, a row
            has no real token (there is no last token to carry the score), or β
            is negative or not finite.

    Example:
        >>> scores = torch.tensor([1.0, -1.0])
        >>> kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
        >>> mask = torch.tensor([[True, True, True], [True, True, False]])
        >>> shaped_rewards(scores, kl, mask, beta=0.5)
        tensor([[-0.0500, -0.1000,  0.8500],
                [-0.2000, -1.2500,  0.0000]])
    """
    check_floating(scores=scores, kl=kl)
    check_rank(kl, 2, name="kl", axes="B T")
    check_mask(mask, kl, like_name="kl")
    check_rank(scores, 1, name="scores", axes="B")
    if scores.shape[0] != kl.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} entries but kl has {kl.shape[0]} rows")
    check_finite(float(beta), name="beta")
    if float(beta) < 0:
        raise ValueError(f"beta must be >= 0, got {float(beta)}")
    check_rows_nonempty(mask)
    if kl.shape[0] == 0:
        return torch.zeros_like(kl)
    last = mask.long().cumsum(-1).argmax(-1, keepdim=True)  # index of the last True
    rewards = torch.where(mask, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    return rewards.scatter_add(-1, last, scores[:, None].to(kl.dtype))

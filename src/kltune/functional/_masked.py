"""Masked reductions: sums, means, variances and whitening over real tokens."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kltune._checks import check_dim, check_floating, check_mask


def masked_sum(
    x: Float[Tensor, "*batch"], mask: Bool[Tensor, "*batch"], dim: int | None = None
) -> Float[Tensor, "..."]:
    r"""Sum of ``x`` over the positions where ``mask`` is True.

    .. math::
        \operatorname{sum}_m(x) = \sum_i m_i x_i

    Masked positions are replaced by zero before summing (not multiplied by 0),
    so a NaN or inf in padding never leaks into the result or its gradient.

    Args:
        x: values, any shape.
        mask: True where ``x`` holds a real value; same shape as ``x``.
        dim: reduce this axis only; ``None`` reduces every axis.

    Returns:
        A scalar, or ``x`` with axis ``dim`` removed. With no real position (an
        all-False mask, or an empty tensor) the sum is 0, the empty sum.

    Raises:
        ValueError: ``x`` is not floating, ``mask`` is not bool or its shape
            differs from ``x``, or ``dim`` is not an axis of ``x``.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> m = torch.tensor([[True, True, False], [True, False, False]])
        >>> masked_sum(x, m)
        tensor(7.)
        >>> masked_sum(x, m, dim=1)
        tensor([3., 4.])
    """
    check_floating(x=x)
    check_mask(mask, x)
    check_dim(x, dim)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(
    x: Float[Tensor, "*batch"], mask: Bool[Tensor, "*batch"], dim: int | None = None
) -> Float[Tensor, "..."]:
    r"""Mean of ``x`` over the positions where ``mask`` is True.

    .. math::
        \operatorname{mean}_m(x) = \frac{\sum_i m_i x_i}{\sum_i m_i}

    Args:
        x: values, any shape.
        mask: True where ``x`` holds a real value; same shape as ``x``.
        dim: reduce this axis only; ``None`` reduces every axis.

    Returns:
        A scalar, or ``x`` with axis ``dim`` removed. Along ``dim``, a slice with
        no real position has mean 0 (a fully padded row does not poison the batch).

    Raises:
        ValueError: ``x`` is not floating, ``mask`` is not bool, shapes differ,
            ``dim`` is not an axis of ``x``, or (with ``dim=None``) the mask
            selects no position at all (an empty batch included).

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> m = torch.tensor([[True, True, False], [False, False, False]])
        >>> masked_mean(x, m)
        tensor(1.5000)
        >>> masked_mean(x, m, dim=1)
        tensor([1.5000, 0.0000])
    """
    total = masked_sum(x, mask, dim)
    if dim is None:
        count = mask.sum()
        if int(count) == 0:
            raise ValueError(f"mask selects no element of a tensor of shape {tuple(x.shape)}")
        return total / count
    return total / mask.sum(dim=dim).clamp(min=1)


def masked_var(
    x: Float[Tensor, "*batch"], mask: Bool[Tensor, "*batch"], unbiased: bool = False
) -> Float[Tensor, ""]:
    r"""Variance of ``x`` over all real positions.

    .. math::
        \operatorname{var}_m(x) = \frac{\sum_i m_i (x_i - \bar x)^2}{n - c},
        \quad n = \sum_i m_i,\ \bar x = \operatorname{mean}_m(x)

    with :math:`c = 1` when ``unbiased`` (Bessel's correction) and 0 otherwise.

    Args:
        x: values, any shape.
        mask: True where ``x`` holds a real value.
        unbiased: divide by ``n - 1`` instead of ``n``.

    Returns:
        The variance, a scalar. Rows without a real position simply contribute
        nothing.

    Raises:
        ValueError: ``x`` not floating, bad mask, no real position (an empty
            batch included), or ``unbiased`` with one position.

    Example:
        >>> x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, 100.0]])
        >>> m = torch.tensor([[True, True, False], [True, True, False]])
        >>> masked_var(x, m)
        tensor(5.)
    """
    # Zero the padding first: (NaN - mean)² would otherwise send NaN gradients
    # through the mean into the real positions.
    check_floating(x=x)
    check_mask(mask, x)
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = masked_mean(x, mask)
    squares = masked_sum((x - mean) ** 2, mask)
    count = mask.sum()
    if unbiased:
        if int(count) < 2:
            raise ValueError("unbiased variance needs at least two real positions")
        return squares / (count - 1)
    return squares / count


def masked_whiten(
    x: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"],
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Float[Tensor, "*batch"]:
    r"""Standardise ``x`` over its real positions: mean 0 and variance 1.

    .. math::
        w_i = \frac{x_i - \bar x}{\sqrt{\operatorname{var}_m(x) + \epsilon}}
        \;(+\ \bar x \text{ if not } \mathtt{shift\_mean})

    Statistics use the real positions only (population variance); the result is
    0 at masked positions.

    Args:
        x: values, any shape.
        mask: True where ``x`` holds a real value.
        shift_mean: subtract the mean; with False the mean is added back, so
            only the scale changes (used for rewards, whose sign carries meaning).
        eps: added to the variance before the square root.

    Returns:
        ``x`` whitened, same shape; zeros where ``mask`` is False (so a row with
        no real position comes back all zeros, and does not enter the statistics).

    Raises:
        ValueError: ``x`` not floating, bad mask, or no real position at all
            (an empty batch included).

    Example:
        >>> x = torch.tensor([[1.0, 3.0, 9.0], [5.0, 7.0, 9.0]])
        >>> m = torch.tensor([[True, True, False], [True, True, False]])
        >>> masked_whiten(x, m)
        tensor([[-1.3416, -0.4472,  0.0000],
                [ 0.4472,  1.3416,  0.0000]])
    """
    check_floating(x=x)
    check_mask(mask, x)
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))  # as in masked_var
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))

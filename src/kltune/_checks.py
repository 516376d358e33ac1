"""The input checks of the whole package, in one place: tensors, numbers, texts.

They raise ``ValueError`` (or ``TypeError`` for a wrong type) naming the argument
and the expected versus actual shape, dtype or value, so a user sees the problem
at the call instead of deep inside torch. jaxtyping checks the same annotations
during the tests; these checks run for users too. Importing this module does not
load ``transformers``: the functional core uses it.
"""

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor


def check_mask(mask: Tensor, like: Tensor, *, name: str = "mask", like_name: str = "x") -> None:
    """Raise unless ``mask`` is a bool tensor with the shape of ``like``."""
    if mask.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a bool tensor (True = real token), got dtype {mask.dtype}; "
            f"convert with `{name}.bool()` if it holds 0/1 values"
        )
    check_same_shape(**{like_name: like, name: mask})


def check_same_shape(**tensors: Tensor) -> None:
    """Raise unless every tensor given has the same shape."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}; they must be aligned"
            )


def check_floating(**tensors: Tensor) -> None:
    """Raise unless every tensor given has a floating dtype."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")


def check_integer_dtype(tensor: Tensor, *, name: str) -> None:
    """Raise unless ``tensor`` holds integers (ids or indices), not floats or bools."""
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (token ids), got dtype {tensor.dtype}")


def check_rank(tensor: Tensor, rank: int, *, name: str, axes: str) -> None:
    """Raise unless ``tensor`` has ``rank`` dimensions (named by ``axes``, e.g. "B T")."""
    if tensor.dim() != rank:
        raise ValueError(
            f"{name} must have shape [{axes}] ({rank} dims), got shape {tuple(tensor.shape)}"
        )


def check_nonempty_batch(tensor: Tensor, *, name: str) -> None:
    """Raise when the batch (first) axis is empty."""
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(tensor.shape)})")


def check_rows_nonempty(mask: Tensor, *, name: str = "mask") -> None:
    """Raise when a row of a [B, T] mask has no real token."""
    empty = ~mask.any(dim=-1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"{name} has rows with no real token: rows {rows[:10]}")


def check_positive(value: float, *, name: str) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_nonnegative(value: float, *, name: str) -> None:
    """Raise unless ``value`` is a finite number >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_unit_interval(value: float, *, name: str) -> None:
    """Raise unless ``value`` lies in [0, 1] (a discount γ or a GAE λ); NaN does not."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_discount(gamma: float, lam: float = 1.0) -> None:
    """Raise unless the discount γ and the GAE λ lie in [0, 1]."""
    check_unit_interval(gamma, name="gamma")
    check_unit_interval(lam, name="lam")


def check_finite(value: float, *, name: str) -> None:
    """Raise unless ``value`` is finite (not NaN, not ±inf)."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_count(value: object, *, name: str, minimum: int | None = 1) -> int:
    """Return ``value`` as an int; raise unless it is an integer (not a bool) >= ``minimum``
    (any integer when ``minimum`` is None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_dim(tensor: Tensor, dim: int | None, *, name: str = "x") -> None:
    """Raise unless ``dim`` is None or a valid axis of ``tensor``."""
    if dim is not None and not -max(tensor.dim(), 1) <= dim < max(tensor.dim(), 1):
        raise ValueError(
            f"dim={dim} is out of range for {name} of shape {tuple(tensor.shape)} "
            f"({tensor.dim()} dims)"
        )


def check_group_size(batch: int, group_size: int) -> None:
    """Raise unless a batch of ``batch`` rows splits into groups of ``group_size`` >= 2."""
    check_count(group_size, name="group_size", minimum=None)  # >= 2 below, with the reason
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (several completions per prompt), got {group_size}; "
            "a group advantage compares completions of the same prompt"
        )
    if batch % group_size != 0:
        raise ValueError(f"batch of {batch} completions does not split into groups of {group_size}")


def check_texts(
    texts: object, *, name: str, allow_empty: bool = False, encodable: bool = False
) -> None:
    """Raise unless ``texts`` is a sequence (not one string) of ``str``.

    Args:
        texts: what was passed.
        name: the argument's name, for the message.
        allow_empty: accept an empty sequence.
        encodable: also refuse a str a tokenizer cannot encode (a lone surrogate,
            e.g. from a bad decode), naming its index.
    """
    if isinstance(texts, str | bytes):
        raise TypeError(
            f"{name} must be a sequence of strings, got a single {type(texts).__name__}; "
            "wrap it in a list"
        )
    if not isinstance(texts, Sequence):
        raise TypeError(
            f"{name} must be a sequence of strings (a list or tuple), got a {type(texts).__name__}"
        )
    if len(texts) == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: pass at least one")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}")
        if encodable:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"{name}[{i}] is not valid Unicode: {error.reason} at position "
                    f"{error.start}; a tokenizer cannot encode it (decode its bytes with "
                    "errors='replace')"
                ) from None

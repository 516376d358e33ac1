"""Cheap input checks shared by the functional core.

They raise ``ValueError`` naming the argument and the expected versus actual
shape or dtype, so a user sees the problem at the call instead of deep inside
torch. jaxtyping checks the same annotations during the tests; these checks run
for users too.
"""

import math
import numbers

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


def check_finite(value: float, *, name: str) -> None:
    """Raise unless ``value`` is finite (not NaN, not ±inf)."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_count(value: object, *, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int; raise unless it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
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
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(
            f"group_size must be an int, got {type(group_size).__name__} {group_size!r}"
        )
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (several completions per prompt), got {group_size}; "
            "a group advantage compares completions of the same prompt"
        )
    if batch % group_size != 0:
        raise ValueError(f"batch of {batch} completions does not split into groups of {group_size}")

"""Shared hypothesis strategies, and a few helpers, for the functional tests.

Values are drawn as float64 numpy arrays and converted to torch tensors; shapes
stay small (B in 1..6, T in 1..12, V in 2..6) so that a failure shrinks to
something a person can read. Strategies that need a shape take it as an
argument; tests draw a shape first (``shapes()``) and then aligned tensors.

Speed matters: the functional suite runs a few hundred examples per property
in about a minute, so a tensor costs a handful of hypothesis draws, not one per
element (see :func:`tensors`).
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jaxtyping
import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import Tensor

MAX_B = 6
MAX_T = 12
MAX_V = 6
LOGPROB_MIN = -20.0

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- values


def finite_floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Finite floats in [lo, hi], no subnormals."""
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def _sparse_arrays(draw: st.DrawFn, shape: Shape, lo: float, hi: float, k: int = 1) -> np.ndarray:
    # ``k`` slices along the first axis (k = 1: the whole array), each one fill
    # value, then a few elements overwritten one by one: ties, constants and edge
    # values in a handful of draws.
    out = np.empty((k, *shape), dtype=np.float64)
    for i in range(k):
        out[i] = draw(finite_floats(lo, hi))
    flat = out.reshape(-1)
    for _ in range(draw(st.integers(0, min(flat.size, 8)))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(finite_floats(lo, hi))
    return out if k > 1 else out[0]


def tensors(
    shape: Shape, lo: float = -10.0, hi: float = 10.0, k: int = 1
) -> st.SearchStrategy[Tensor]:
    """Float64 tensors of ``shape`` with finite values in [lo, hi].

    With ``k > 1``: ``k`` such tensors stacked along a new first axis, drawn at
    once (cheaper than ``k`` draws).

    One draw in three is sparse: one fill value (per slice) with a few elements
    drawn one by one, so ties, constants and edge values (0, lo, hi) come up
    and shrink to readable numbers. The others are i.i.d. uniform from a
    hypothesis-drawn seed: every element different, at the cost of one draw.
    Drawing every element through hypothesis covers the same ground at several
    times the run time, which the suite's time budget cannot afford.
    """
    return _arrays(shape, lo, hi, k).map(lambda a: torch.tensor(a, dtype=torch.float64))


@st.composite
def _arrays(draw: st.DrawFn, shape: Shape, lo: float, hi: float, k: int) -> np.ndarray:
    if draw(st.integers(0, 2)) == 0:  # shrinks towards the sparse, readable kind
        return draw(_sparse_arrays(shape, lo, hi, k))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).uniform(lo, hi, (k, *shape) if k > 1 else shape)


def shapes(
    min_b: int = 1, max_b: int = MAX_B, min_t: int = 1, max_t: int = MAX_T
) -> st.SearchStrategy[tuple[int, int]]:
    """(B, T) with B in [min_b, max_b] and T in [min_t, max_t]."""
    return st.tuples(st.integers(min_b, max_b), st.integers(min_t, max_t))


def logprobs(shape: Shape) -> st.SearchStrategy[Tensor]:
    """Finite float64 log-probabilities in [-20, 0]."""
    return tensors(shape, LOGPROB_MIN, 0.0)


@st.composite
def logprob_pairs(draw: st.DrawFn, shape: Shape, kind: str | None = None) -> tuple[Tensor, Tensor]:
    """Two aligned logprob tensors, either near (|Δ| ≤ 0.1) or far apart (independent).

    ``kind`` is "near", "far" or None (either).
    """
    kind = draw(st.sampled_from(["near", "far"])) if kind is None else kind
    first = draw(logprobs(shape))
    if kind == "near":
        second = (first + draw(tensors(shape, -0.1, 0.1))).clamp(max=0.0)
    else:
        second = draw(logprobs(shape))
    return first, second


def logits(shape: tuple[int, int], max_v: int = MAX_V) -> st.SearchStrategy[Tensor]:
    """Float64 logits [B, T, V] in [-10, 10] with a small vocabulary V in [2, max_v]."""
    return st.integers(2, max_v).flatmap(lambda v: tensors((*shape, v), -10.0, 10.0))


# --------------------------------------------------------------------------- masks


@st.composite
def right_padded_masks(
    draw: st.DrawFn, shape: tuple[int, int], allow_empty_rows: bool = False
) -> Tensor:
    """Bool [B, T] masks, True on a prefix of each row.

    Each row holds at least one real token unless ``allow_empty_rows``. The B
    lengths are the digits of one drawn integer (one draw instead of B); it
    shrinks to 0, i.e. the shortest rows.
    """
    b, t = shape
    low = 0 if allow_empty_rows else 1
    base = t - low + 1
    code = draw(st.integers(0, base**b - 1))
    lengths = [low + (code // base**i) % base for i in range(b)]
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


@st.composite
def any_masks(draw: st.DrawFn, shape: Shape) -> Tensor:
    """Bool masks of any pattern (holes allowed) with at least one True somewhere.

    A third are right padded; the rest i.i.d. with a drawn density, from a seed.
    """
    if len(shape) == 2 and draw(st.integers(0, 2)) == 0:
        return draw(right_padded_masks(shape))
    density = draw(st.sampled_from([0.1, 0.3, 0.5, 0.8, 0.95]))
    mask = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(shape) < density
    mask.reshape(-1)[draw(st.integers(0, mask.size - 1))] = True
    return torch.tensor(mask)


NONFINITE = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]


@st.composite
def garbage(draw: st.DrawFn, shape: Shape, nonfinite: bool = True) -> Tensor:
    """Float64 values to put under padding: large, and NaN/±inf when ``nonfinite``.

    Either one value everywhere (shrinks to something readable) or a seeded mix.
    Finite garbage stays in [-50, 50] so that ``exp`` of it is still finite: it
    is what tests use for functions that do not promise to survive NaN.
    """
    pool = NONFINITE if nonfinite else [50.0, -50.0, 0.0]
    if draw(st.integers(0, 2)) == 0:
        value = draw(st.sampled_from(pool) | finite_floats(-50.0, 50.0))
        return torch.full(shape, value, dtype=torch.float64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.uniform(-50.0, 50.0, shape)
    special = rng.random(shape) < 0.5
    values[special] = rng.choice(pool, size=int(special.sum()))
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- rollouts


class Rollout(NamedTuple):
    """Aligned per-token tensors of one batch, sharing one right-padded mask."""

    mask: Tensor  # bool [B, T], at least one real token per row
    logprobs: Tensor  # log π of the taken tokens, current weights
    old_logprobs: Tensor  # log π_old from the rollout, near ``logprobs``
    ref_logprobs: Tensor  # log π_ref, near or far from ``logprobs``
    advantages: Tensor  # [B, T]
    values: Tensor  # [B, T]
    old_values: Tensor  # [B, T], near ``values``
    returns: Tensor  # [B, T]
    rewards: Tensor  # [B, T]
    scores: Tensor  # [B]


@st.composite
def rollouts(draw: st.DrawFn, min_b: int = 1, max_b: int = MAX_B, max_t: int = MAX_T) -> Rollout:
    """A :class:`Rollout` of float64 tensors; padding holds ordinary finite values."""
    shape = draw(shapes(min_b=min_b, max_b=max_b, max_t=max_t))
    mask = draw(right_padded_masks(shape))
    u = draw(tensors(shape, -1.0, 1.0, k=8))  # each field an affine map of one slice
    logprobs_ = 10.0 * (u[0] - 1.0)  # [-20, 0]
    near = draw(st.booleans())  # π_ref near π (|Δ| ≤ 0.1) or anywhere in [-20, 0]
    ref = (logprobs_ + 0.1 * u[1]).clamp(max=0.0) if near else 10.0 * (u[1] - 1.0)
    # Ratios in [e^-0.5, e^0.5] ≈ [0.61, 1.65]: both sides of a 0.2 clip range.
    old = (logprobs_ + 0.5 * u[2]).clamp(max=0.0)
    values = 5.0 * u[3]
    return Rollout(
        mask=mask,
        logprobs=logprobs_,
        old_logprobs=old,
        ref_logprobs=ref,
        advantages=5.0 * u[4],
        values=values,
        old_values=values + 0.5 * u[5],
        returns=5.0 * u[6],
        rewards=2.0 * u[7],
        scores=draw(tensors((shape[0],), -1.0, 1.0)),
    )


# --------------------------------------------------------------------------- helpers


def fewer_examples(divisor: int) -> settings:
    """The active profile's settings with ``max_examples`` divided (for slow properties)."""
    return settings(max_examples=max(10, settings.default.max_examples // divisor))


def fill_padding(x: Tensor, mask: Tensor, fill: Tensor | float) -> Tensor:
    """``x`` with every masked-out position replaced by ``fill`` (broadcast over V)."""
    while mask.dim() < x.dim():
        mask = mask[..., None]
    fill = torch.as_tensor(fill, dtype=x.dtype).expand_as(x)
    return torch.where(mask, x, fill)


def pad_right(x: Tensor, extra: int, fill: float | bool = 0.0) -> Tensor:
    """Append ``extra`` columns (axis 1) of ``fill``: more padding after the tokens."""
    shape = list(x.shape)
    shape[1] = extra
    return torch.cat([x, torch.full(shape, fill, dtype=x.dtype)], dim=1)


@contextlib.contextmanager
def without_runtime_typecheck() -> Iterator[None]:
    """Turn off the tests' jaxtyping/beartype hook: call the code as a user's program does."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


def assert_bad_input(call: Callable[[], Any], *, message: str, argument: str) -> None:
    """Check that ``call`` rejects its input, naming ``argument``.

    Under the test-time hook, jaxtyping may reject a wrong shape or dtype first
    (a TypeError naming the parameter). Without the hook, as users run it, our
    own check must raise a ValueError matching ``message``.
    """
    with pytest.raises((ValueError, TypeError), match=rf"{message}|parameter '{argument}'"):
        call()
    with without_runtime_typecheck(), pytest.raises(ValueError, match=message):
        call()

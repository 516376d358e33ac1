"""Rollout: the one data type that flows between blocks; RolloutBuffer: minibatches of it.

Shape letters: ``B`` completions, ``P`` prompt tokens (left padded), ``T``
response tokens (right padded).
"""

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, final

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

import kltune.functional as KF
from kltune._checks import check_count

_TOKEN_FIELDS = ("old_logprobs", "ref_logprobs", "old_values", "rewards", "advantages", "returns")
_SEQUENCE_FIELDS = ("scores", "prompt_index", "ended")


def _check(field: str, tensor: Tensor, shape: tuple[int, ...], kind: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"Rollout.{field} must have shape {shape}, got {tuple(tensor.shape)}")
    ok = {
        "float": tensor.is_floating_point(),
        "int": not tensor.is_floating_point() and tensor.dtype != torch.bool,
        "bool": tensor.dtype == torch.bool,
    }[kind]
    if not ok:
        raise ValueError(f"Rollout.{field} must be a {kind} tensor, got dtype {tensor.dtype}")


def _check_texts(rollout: "Rollout") -> None:
    for name in ("prompts", "completions"):
        texts = getattr(rollout, name)
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(
                f"Rollout.{name} must be a tuple of strings, one per row, "
                f"got a {type(texts).__name__}"
            )


def _check_response_mask(mask: Tensor) -> None:
    """Every row a non-empty prefix: True from the first token, no True after a False."""
    starts = mask[:, 0].all()
    holes = (mask[:, 1:] & ~mask[:, :-1]).any()
    starts_ok, has_holes = torch.stack([starts, holes]).tolist()  # one host sync for both
    if not starts_ok:
        raise ValueError("every response must start with a real token (response_mask[:, 0])")
    if has_holes:
        raise ValueError(
            "response_mask must be right padded: True on a prefix of each row (the "
            "response up to its EOS), never True again after a False"
        )


@final
@dataclass(frozen=True)
class NextTokenHead:
    """A model's next-token distributions at the response positions, kept small.

    ``softmax((hidden @ weight.T + bias) / τ)`` is the distribution that predicts
    each response token: [B, T, D] hidden states and a handle on the output
    layer instead of [B, T, V] logits (V is tens of thousands), so that the
    exact KL can be computed a chunk at a time
    (:func:`kltune.functional.kl_exact_from_hidden`). For a model whose logits
    are not a plain linear map of its last hidden state, ``hidden`` holds the
    logits themselves and ``weight`` is None.

    Attributes:
        hidden: [B, T, D] last hidden states (or [B, T, V] logits).
        weight: the output layer's [V, D] weight, or None.
        bias: the output layer's bias, or None.
    """

    hidden: Float[Tensor, "B T D"]
    weight: Float[Tensor, "V D"] | None = None
    bias: Float[Tensor, " V"] | None = None

    def __post_init__(self) -> None:
        if self.hidden.dim() != 3 or not self.hidden.is_floating_point():
            raise ValueError(
                "NextTokenHead.hidden must be a floating [B, T, D] tensor, got "
                f"shape {tuple(self.hidden.shape)} and dtype {self.hidden.dtype}"
            )

    def select(self, take: Tensor) -> "NextTokenHead":
        """The rows at ``take`` (an index tensor); the output layer is shared."""
        return dataclasses.replace(self, hidden=self.hidden.index_select(0, take))

    def to(self, device: torch.device | str) -> "NextTokenHead":
        """The hidden states on ``device`` (the output layer stays with its model)."""
        return dataclasses.replace(self, hidden=self.hidden.to(device))


@final
@dataclass(frozen=True)
class Rollout:
    """A batch of prompts and sampled completions, plus what later stages add.

    Every tensor is batch-first. Prompts are left padded (``prompt_mask`` True on
    real tokens), responses right padded: ``response_mask`` is True from the
    first response token up to and including the first EOS (the EOS token is a
    response token: the policy chose to stop), False after it.

    Attributes:
        prompt_ids: prompt token ids.
        prompt_mask: True on real prompt tokens.
        response_ids: sampled token ids (padding after EOS).
        response_mask: True on real response tokens; every row has at least one.
        old_logprobs: behaviour logprobs log π_old of the sampled tokens,
            under ``softmax(logits / temperature)``.
        prompts: the prompt texts, one per row.
        completions: the decoded completions, one per row.
        temperature: the sampling temperature; scoring must use the same.
        top_k: the top-k truncation sampling used (None: none); scoring uses the same.
        top_p: the top-p (nucleus) truncation sampling used (None: none); likewise.
        prompt_index: which distinct prompt each row came from (rows of one
            prompt are contiguous); used by group baselines.
        ended: True where the completion ended with EOS (not truncated).
        ref_logprobs: log π_ref of the sampled tokens (filled by a Reference).
        scores: one reward per completion (filled by a RewardFn).
        old_values: value predictions at rollout time (with a value head).
        rewards: per-token shaped rewards.
        advantages: per-token advantages.
        returns: per-token value targets.
        ref_head: the reference's next-token distributions at the response
            positions (filled only for the exact-KL penalty).

    Raises:
        ValueError: (on construction, and so on every ``replace``) an empty
            batch, T = 0, a field of the wrong shape or dtype, texts not one per
            row, a temperature that is not a finite number > 0, or a
            ``response_mask`` that is not right padded with at least one real
            token per row.
        TypeError: ``prompts`` or ``completions`` is a single string.
    """

    prompt_ids: Int[Tensor, "B P"]
    prompt_mask: Bool[Tensor, "B P"]
    response_ids: Int[Tensor, "B T"]
    response_mask: Bool[Tensor, "B T"]
    old_logprobs: Float[Tensor, "B T"]
    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    temperature: float
    prompt_index: Int[Tensor, " B"]
    ended: Bool[Tensor, " B"]
    ref_logprobs: Float[Tensor, "B T"] | None = None
    scores: Float[Tensor, " B"] | None = None
    old_values: Float[Tensor, "B T"] | None = None
    rewards: Float[Tensor, "B T"] | None = None
    advantages: Float[Tensor, "B T"] | None = None
    returns: Float[Tensor, "B T"] | None = None
    ref_head: NextTokenHead | None = None
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_ids", "response_ids"):
            ids = getattr(self, name)
            if ids.dim() != 2:
                raise ValueError(f"Rollout.{name} must have shape [B, L], got {tuple(ids.shape)}")
        batch, prompt_len = self.prompt_ids.shape[0], self.prompt_ids.shape[-1]
        length = self.response_ids.shape[-1]
        if batch == 0:
            raise ValueError("a Rollout needs at least one completion (got an empty batch)")
        if length == 0:
            raise ValueError("a Rollout needs at least one response token per row (got T = 0)")
        _check("prompt_ids", self.prompt_ids, (batch, prompt_len), "int")
        _check("prompt_mask", self.prompt_mask, (batch, prompt_len), "bool")
        _check("response_ids", self.response_ids, (batch, length), "int")
        _check("response_mask", self.response_mask, (batch, length), "bool")
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None:
                _check(name, value, (batch, length), "float")
        _check("prompt_index", self.prompt_index, (batch,), "int")
        _check("ended", self.ended, (batch,), "bool")
        if self.scores is not None:
            _check("scores", self.scores, (batch,), "float")
        if self.ref_head is not None and tuple(self.ref_head.hidden.shape[:2]) != (batch, length):
            raise ValueError(
                f"Rollout.ref_head must cover [B, T] = {(batch, length)} positions, got "
                f"{tuple(self.ref_head.hidden.shape[:2])}"
            )
        _check_texts(self)
        if len(self.prompts) != batch or len(self.completions) != batch:
            raise ValueError(
                f"Rollout has {batch} rows but {len(self.prompts)} prompts and "
                f"{len(self.completions)} completions"
            )
        if not (isinstance(self.temperature, numbers.Real) and self.temperature > 0):
            raise ValueError(f"Rollout.temperature must be > 0, got {self.temperature}")
        if not math.isfinite(self.temperature):
            raise ValueError(f"Rollout.temperature must be finite, got {self.temperature}")
        if self.top_k is not None:
            check_count(self.top_k, name="Rollout.top_k")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Rollout.top_p must lie in (0, 1] or None, got {self.top_p}")
        _check_response_mask(self.response_mask)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def replace(self, **changes: Any) -> "Rollout":
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    def select(self, index: Int[Tensor, " N"] | slice) -> "Rollout":
        """The rows at ``index`` (a slice or a 1-D integer index tensor), as a new Rollout.

        Raises:
            ValueError: ``index`` is a boolean mask or a float tensor (a bool mask's
                ``tolist()`` would silently select rows 0 and 1), or selects no row.
            IndexError: an index outside ``[0, len(self))``.
        """
        if isinstance(index, Tensor) and (index.is_floating_point() or index.dtype == torch.bool):
            raise ValueError(
                f"select needs a slice or an integer index tensor, got dtype {index.dtype}; "
                "for a boolean mask pass mask.nonzero().squeeze(-1)"
            )
        rows = list(range(len(self))[index] if isinstance(index, slice) else index.tolist())
        outside = [i for i in rows if not 0 <= i < len(self)]
        if outside:  # rows is a host list already, so this costs no device sync
            raise IndexError(
                f"select index {outside[0]} is out of range for a Rollout of {len(self)} rows"
            )
        take = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor | NextTokenHead):
                changes[field.name] = (
                    value.index_select(0, take) if isinstance(value, Tensor) else value.select(take)
                )
        changes["prompts"] = tuple(self.prompts[i] for i in take.tolist())
        changes["completions"] = tuple(self.completions[i] for i in take.tolist())
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "Rollout":
        """The same rollout with every tensor on ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor | NextTokenHead)
        }
        return dataclasses.replace(self, **changes)

    @property
    def device(self) -> torch.device:
        """Where the rollout's tensors live (those of its response tokens)."""
        return self.response_ids.device

    @property
    def lengths(self) -> Int[Tensor, " B"]:
        """Number of real response tokens per row."""
        return self.response_mask.sum(-1)

    @staticmethod
    def concat(rollouts: Sequence["Rollout"]) -> "Rollout":
        """Stack rollouts along the batch axis, re-padding prompts (left) and responses (right).

        ``prompt_index`` is offset so that groups of different rollouts stay apart.

        Raises:
            ValueError: an empty list, different temperatures, or a field filled
                in some rollouts and not others.
        """
        if not rollouts:
            raise ValueError("concat needs at least one rollout")
        if len({(r.temperature, r.top_k, r.top_p) for r in rollouts}) != 1:
            raise ValueError(
                "cannot concat rollouts sampled with different temperatures or top-k/top-p"
            )
        prompt_len = max(r.prompt_ids.shape[1] for r in rollouts)
        length = max(r.response_ids.shape[1] for r in rollouts)
        offset, parts = 0, []
        for r in rollouts:
            parts.append(_padded(r, prompt_len, length, offset))
            offset += int(r.prompt_index.max()) + 1
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(Rollout):
            values = [p[field.name] for p in parts]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                raise ValueError(f"cannot concat: {field.name} is set in some rollouts only")
            if isinstance(values[0], Tensor):
                changes[field.name] = torch.cat(values)
            elif isinstance(values[0], tuple):
                changes[field.name] = tuple(x for v in values for x in v)
            elif isinstance(values[0], NextTokenHead):
                if any(v.weight is not values[0].weight for v in values):
                    raise ValueError("cannot concat: ref_head comes from different output layers")
                hidden = torch.cat([v.hidden for v in values])
                changes[field.name] = dataclasses.replace(values[0], hidden=hidden)
        return dataclasses.replace(rollouts[0], **changes)


def _padded(r: Rollout, prompt_len: int, length: int, offset: int) -> dict[str, Any]:
    """The fields of ``r`` as a dict, padded to the given lengths."""
    out: dict[str, Any] = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    left = prompt_len - r.prompt_ids.shape[1]
    right = length - r.response_ids.shape[1]
    out["prompt_ids"] = torch.nn.functional.pad(r.prompt_ids, (left, 0))
    out["prompt_mask"] = torch.nn.functional.pad(r.prompt_mask, (left, 0))
    for name in ("response_ids", "response_mask", *_TOKEN_FIELDS):
        if out[name] is not None:
            out[name] = torch.nn.functional.pad(out[name], (0, right))
    if r.ref_head is not None:
        hidden = torch.nn.functional.pad(r.ref_head.hidden, (0, 0, 0, right))
        out["ref_head"] = dataclasses.replace(r.ref_head, hidden=hidden)
    out["prompt_index"] = r.prompt_index + offset
    return out


@final
@dataclass(frozen=True)
class RolloutBuffer:
    """Rollouts held for several epochs of shuffled minibatches.

    Args:
        rollout: one Rollout, or several concatenated with :meth:`Rollout.concat`.

    Example:
        >>> ids = torch.zeros(4, 2, dtype=torch.long)
        >>> rollout = Rollout(
        ...     prompt_ids=ids, prompt_mask=ids == 0, response_ids=ids,
        ...     response_mask=ids == 0, old_logprobs=torch.zeros(4, 2),
        ...     prompts=("p",) * 4, completions=("c",) * 4, temperature=1.0,
        ...     prompt_index=torch.arange(4), ended=torch.ones(4, dtype=torch.bool))
        >>> gen = torch.Generator().manual_seed(0)
        >>> [len(mb) for mb in RolloutBuffer(rollout).minibatches(2, epochs=2, generator=gen)]
        [2, 2, 2, 2]
    """

    rollout: Rollout
    #: What whitening multiplied the advantages by (1/σ; 1 before whitening). A KL
    #: penalty in the reward *and* the loss scales its loss term by it, so that the
    #: two parts keep the balance that makes their sum ∇KL.
    advantage_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.rollout)

    def whitened(
        self,
        shift_mean: bool = True,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> "RolloutBuffer":
        """The buffer with advantages whitened over all real tokens of the whole buffer.

        Args:
            shift_mean: subtract the mean (False: only rescale).
            all_reduce: in a data-parallel run, sums a tensor over processes, so
                that the mean and variance are those of every process's tokens
                (what one process holding the whole batch would compute).

        Raises:
            ValueError: the rollout has no advantages yet.
        """
        advantages, mask = self.rollout.advantages, self.rollout.response_mask
        if advantages is None:
            raise ValueError("whitened() needs advantages; run a Baseline first")
        if all_reduce is None:
            whitened = KF.masked_whiten(advantages, mask, shift_mean)
            scale = float(torch.rsqrt(KF.masked_var(advantages.double(), mask) + 1e-8))
        else:
            whitened, scale = _whiten_over_processes(advantages, mask, shift_mean, all_reduce)
        return RolloutBuffer(
            self.rollout.replace(advantages=whitened), self.advantage_scale * scale
        )

    def minibatches(
        self, minibatch_size: int, epochs: int = 1, generator: torch.Generator | None = None
    ) -> Iterator[Rollout]:
        """Yield shuffled minibatches, ``epochs`` passes over the buffer.

        Each epoch is a fresh permutation drawn from ``generator`` (the same seed
        gives the same minibatches). Every row appears once per epoch.

        Raises:
            ValueError: ``minibatch_size`` < 1, larger than the buffer, or not a
                divisor of its size (unequal minibatches would weigh rows unequally);
                ``epochs`` < 1.
            TypeError: ``minibatch_size`` or ``epochs`` is not an int.
        """
        # Checked here, not inside the generator, so that a bad size fails at the call.
        check_count(minibatch_size, name="minibatch_size", minimum=None)  # range below
        check_count(epochs, name="epochs")
        size = len(self)
        if minibatch_size < 1 or minibatch_size > size:
            raise ValueError(
                f"minibatch_size must be in [1, {size}] (the buffer holds {size} rows), "
                f"got {minibatch_size}"
            )
        if size % minibatch_size != 0:
            raise ValueError(
                f"minibatch_size {minibatch_size} does not divide the buffer size {size}"
            )
        return self._minibatches(minibatch_size, epochs, generator)

    def _minibatches(
        self, minibatch_size: int, epochs: int, generator: torch.Generator | None
    ) -> Iterator[Rollout]:
        for _ in range(epochs):
            device = "cpu" if generator is None else generator.device
            order = torch.randperm(len(self), generator=generator, device=device)
            for start in range(0, len(self), minibatch_size):
                yield self.rollout.select(order[start : start + minibatch_size])


def _whiten_over_processes(
    x: Tensor, mask: Tensor, shift_mean: bool, all_reduce: Callable[[Tensor], Tensor]
) -> tuple[Tensor, float]:
    """:func:`kltune.functional.masked_whiten` with statistics summed over processes
    (two passes: the mean, then the squared deviations from it), and 1/σ."""
    x64 = x.double()
    total, count = all_reduce(torch.stack([KF.masked_sum(x64, mask), mask.sum().double()]))
    if count == 0:
        raise ValueError("no real token to whiten over, on any process")
    mean = total / count
    variance = all_reduce(KF.masked_sum((x64 - mean) ** 2, mask)) / count
    scale = torch.rsqrt(variance + 1e-8)
    out = (x64 - mean) * scale
    if not shift_mean:
        out = out + mean
    return out.to(x.dtype).masked_fill(~mask, 0.0), float(scale)

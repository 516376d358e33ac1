"""Drawing completions: the :class:`Sampler` protocol and kltune's own sampler.

:meth:`kltune.Policy.rollout` encodes the prompts, hands the token ids to its
sampler, and turns what comes back into a :class:`~kltune.rollout.Rollout`. A
sampler owns only the decoding loop, so another engine (transformers'
``generate``, vLLM on a GPU) fits in its place. What it must get right is the
contract below: the logprobs it returns are those of the distribution it drew
each token from, or PPO's ratio compares two different policies. The loop
checks it every iteration: ``policy/first_ratio_error`` is the largest
``|ratio − 1|`` of the first minibatch, before any update, and
:func:`kltune.loop.warn_if_unhealthy` warns when it exceeds
:data:`kltune.loop.MAX_FIRST_RATIO_ERROR`.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, final, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

import kltune.functional as KF
from kltune._decoding import Decoding, LlamaDecoding, decoding_for
from kltune._forwards import weight_major_linears

if TYPE_CHECKING:
    from kltune.policy import Policy


def position_ids_from_mask(mask: Bool[Tensor, "B L"]) -> Int[Tensor, "B L"]:
    """Positions that count only real tokens: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@final
@dataclass(frozen=True)
class Sampled:
    """What a sampler returns for ``B`` rows of ``T`` new tokens at most.

    Attributes:
        tokens: the drawn token ids (anything after a row's end is padding).
        logprobs: log q(token) under the distribution each token was drawn from:
            ``softmax(truncated_logits(logits, temperature, top_k, top_p))``
            (:func:`kltune.functional.truncated_logits`), float32, 0 on padding.
        mask: True on real tokens (up to and including a row's EOS).
        ended: True where the row ended with EOS.
        values: V(s_t) from the policy's value head in the same pass (None
            without one).
    """

    tokens: Int[Tensor, "B T"]
    logprobs: Float[Tensor, "B T"]
    mask: Bool[Tensor, "B T"]
    ended: Bool[Tensor, " B"]
    values: Float[Tensor, "B T"] | None


@runtime_checkable
class Sampler(Protocol):
    """Draws completions of left-padded prompts for a policy.

    Contract: ``logprobs`` are those of the distribution the tokens were drawn
    from, after temperature and top-k/top-p (:class:`Sampled`), computed in the
    policy's precision (``policy.autocast_dtype``); rows are independent; the
    same ``generator`` state gives the same completions. With ``stop_at_eos``
    a row ends at its EOS token, which is a real token.
    """

    def __call__(
        self,
        policy: "Policy",
        prompt_ids: Int[Tensor, "B P"],
        prompt_mask: Bool[Tensor, "B P"],
        *,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
        stop_at_eos: bool,
    ) -> Sampled: ...


class KVCacheSampler:
    """kltune's sampler: one forward per drawn token with a key/value cache.

    The prompt is fed once (only its last position's logits are kept), then
    one token per row per step. The forward is a *decoding* from
    ``kltune._decoding``: the lean one for a model whose
    :func:`kltune.accel.fast_paths` allow it (on a CPU, no autocast, unless
    ``Policy(lean_decoding=False)``), else the model's own forward with its
    linears run weight-major on a CPU. Tokens are drawn by inverse-CDF sampling
    from the truncated distribution; the values come from the same pass.
    """

    def __call__(
        self,
        policy: "Policy",
        prompt_ids: Int[Tensor, "B P"],
        prompt_mask: Bool[Tensor, "B P"],
        *,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
        stop_at_eos: bool,
    ) -> Sampled:
        decoding, layout = self.decoding(policy, prompt_ids.shape, max_new_tokens)
        with policy.precision(), layout:
            return self._sample(
                policy, decoding, prompt_ids, prompt_mask, max_new_tokens,
                lambda logits: KF.truncated_logits(logits.float(), temperature, top_k, top_p),
                generator, stop_at_eos,
            )  # fmt: skip

    def decoding(
        self, policy: "Policy", prompt_shape: torch.Size, max_new_tokens: int
    ) -> tuple[Decoding, AbstractContextManager[Any]]:
        """The decoding loop's forward and the layout its linears run in."""
        rows, width = prompt_shape
        decoding = decoding_for(
            policy.model,
            rows,
            width + max_new_tokens,
            hidden=policy.value_head is not None,
            lean=policy.lean_decoding and policy.autocast_dtype is None,
        )
        if isinstance(decoding, LlamaDecoding):
            return decoding, nullcontext()
        return decoding, weight_major_linears(policy)

    def step(
        self, decoding: Decoding, ids: Tensor, mask: Tensor, position: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """One forward: the last position's logits (and last hidden state),
        extending the decoding's key/value cache."""
        return decoding(ids, mask, position)

    def _sample(
        self,
        policy: "Policy",
        decoding: Decoding,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        max_new_tokens: int,
        scaled: Callable[[Tensor], Tensor],
        generator: torch.Generator | None,
        stop_at_eos: bool,
    ) -> Sampled:
        eos = policy.eos_token_id if stop_at_eos else None
        mask = prompt_mask.long()
        position = position_ids_from_mask(prompt_mask)
        # Only the last prompt position predicts a token: no [B, P, V] logits for the prompt.
        logits, hidden = self.step(decoding, prompt_ids, mask, position)
        position = position[:, -1:]
        done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        # Health flags stay on the device: checking them costs no host sync of its own.
        has_mass = torch.ones((), dtype=torch.bool, device=prompt_ids.device)
        finite = torch.ones((), dtype=torch.bool, device=prompt_ids.device)
        steps: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
        for _ in range(max_new_tokens):
            log_p = torch.log_softmax(scaled(logits), dim=-1)
            token, mass = _draw(log_p, generator)
            chosen = log_p.gather(-1, token[:, None]).squeeze(-1)
            has_mass = has_mass & mass
            finite = finite & torch.isfinite(chosen).all()
            value = None if hidden is None else policy.values_from_hidden(hidden)
            token = token.masked_fill(done, policy.pad_token_id)
            steps.append((token, chosen, ~done, value))
            if eos is not None:
                done = done | (token == eos)
            if len(steps) == max_new_tokens:
                break  # (no forward for a token that will not be drawn)
            if eos is not None:
                # The one host sync per token: have all rows ended? The health
                # flags ride along, so bad weights stop sampling at once.
                finished, *health = torch.stack([done.all(), has_mass, finite]).tolist()
                _check_health(*health)
                if finished:
                    break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            logits, hidden = self.step(decoding, token[:, None], mask, position)
        _check_health(*torch.stack([has_mass, finite]).tolist())
        return _stack_steps(steps, done)


def _stack_steps(
    steps: list[tuple[Tensor, Tensor, Tensor, Tensor | None]], done: Tensor
) -> Sampled:
    """The loop's per-step (token, logprob, real, value) as [B, T] tensors, with
    logprobs and values 0 after a row's EOS."""
    tokens, logprobs, real, values = zip(*steps, strict=True)
    mask = torch.stack(real, dim=1)
    stacked_values = None
    if values[0] is not None:
        stacked_values = torch.stack(values, dim=1).masked_fill(~mask, 0.0)
    return Sampled(
        tokens=torch.stack(tokens, dim=1),
        logprobs=torch.stack(logprobs, dim=1).masked_fill(~mask, 0.0),
        mask=mask,
        ended=done,
        values=stacked_values,
    )


def _check_health(has_mass: bool, finite: bool) -> None:
    """Refuse a next-token distribution without mass or with NaN/inf logits, with a cause.

    Checking the drawn tokens' logprobs is enough for the second: a NaN or +inf
    logit makes the row's log-normaliser non-finite, hence every logprob of the
    row, and a token left out by truncation has probability 0 and is never drawn.
    """
    if not has_mass:
        raise FloatingPointError("a next-token distribution has no mass (all logits −inf or NaN)")
    if not finite:
        raise FloatingPointError(
            "the policy produced NaN/inf logits while sampling: its weights are "
            "probably corrupted (a learning rate too high, or a non-finite update)"
        )


def draw(log_p: Float[Tensor, "B V"], generator: torch.Generator | None) -> Int[Tensor, " B"]:
    """Sample one token per row from ``exp(log_p)``.

    Inverse-CDF sampling: one uniform number per row against the cumulative
    probabilities (float64). ``torch.multinomial`` draws an exponential variate
    for every vocabulary entry, which on a CPU costs more than the rest of the
    step outside the model (18 ms against 1 ms for 16 × 49k). A token of
    probability 0 (left out by top-k/top-p) is never drawn.

    Raises:
        FloatingPointError: a row has no mass (all logits −inf or NaN).
    """
    token, has_mass = _draw(log_p, generator)
    _check_health(bool(has_mass), True)
    return token


def _draw(
    log_p: Float[Tensor, "B V"], generator: torch.Generator | None
) -> tuple[Int[Tensor, " B"], Bool[Tensor, ""]]:
    """:func:`draw` without a host sync: the token, and whether every row had mass."""
    cdf = torch.cumsum(log_p.exp().double(), dim=-1)
    total = cdf[:, -1:]
    # Drawn where the generator lives. A generator on the model's device (what
    # kltune.train makes) keeps the draw there; a CPU generator also drives a GPU
    # model, at the cost of a host-to-device copy per token.
    device = generator.device if generator is not None else cdf.device
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=device, dtype=cdf.dtype)
    u = u.to(cdf.device)
    # The first index whose cumulative mass exceeds u·total: P(i) = p_i / total,
    # and a token of probability 0 (flat cdf) is never the first to exceed it.
    token = torch.searchsorted(cdf, u * total, right=True)
    return token.clamp(max=cdf.shape[-1] - 1).squeeze(-1), (total > 0).all()

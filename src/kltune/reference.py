"""The frozen reference π_ref: what every KL in kltune is measured against.

:class:`Reference` is all the loop needs (log π_ref of the sampled tokens);
:class:`HeadReference` adds the whole next-token distributions, which the exact
KL needs. Two are shipped: :class:`FrozenReference`, a frozen copy of the policy
at the start, and :class:`AdapterOffReference`, the base model under a LoRA
adapter with the adapter switched off (no copy). Both score the full,
untruncated distribution at the rollout's temperature, whatever top-k/top-p the
policy sampled with: π_ref is the model, not the sampler.
"""

import copy
from contextlib import AbstractContextManager
from typing import Any, Protocol, final, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

import kltune.functional as KF
from kltune.functional._head import logprobs_only_from_hidden
from kltune.policy import Policy, _response_forward, next_token_head
from kltune.rollout import NextTokenHead, Rollout


@runtime_checkable
class Reference(Protocol):
    """The frozen π_ref: logprobs of a rollout's response tokens, never trained."""

    def logprobs(self, rollout: Rollout) -> Float[Tensor, "B T"]:
        """log π_ref of the response tokens, under the rollout's temperature."""
        ...


@runtime_checkable
class HeadReference(Reference, Protocol):
    """A reference that can also give its whole next-token distributions, which the
    exact-KL penalty needs (:class:`FrozenReference` and :class:`AdapterOffReference` can)."""

    def next_token_head(self, rollout: Rollout) -> NextTokenHead:
        """π_ref's next-token distributions at the response positions (no gradient)."""
        ...


def _reference_logprobs(model: nn.Module, rollout: Rollout) -> Tensor:
    head = next_token_head(model, rollout)
    if head.weight is not None:  # no [B, T, V] logits held, as in Policy.score
        return logprobs_only_from_hidden(
            head.hidden, head.weight, rollout.response_ids, rollout.temperature, head.bias
        )
    return KF.logprobs_from_logits(head.hidden, rollout.response_ids, rollout.temperature)


@final
class FrozenReference:
    """π_ref as a frozen deep copy of the policy's initial weights.

    Costs a second copy of the weights; with a LoRA policy prefer
    :class:`AdapterOffReference`. The copy may live on another device than the
    policy (the CPU beside a GPU policy, or a second GPU): each rollout's tokens
    go to the reference and its logprobs come back, so the models never move.

    Args:
        policy: the policy whose current weights become π_ref.
        device: where the copy lives (None: the policy's device).
    """

    def __init__(self, policy: Policy, device: torch.device | str | None = None) -> None:
        self.model = copy.deepcopy(policy.model)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _here(self, rollout: Rollout) -> Rollout:
        return rollout if rollout.device == self.device else rollout.to(self.device)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> Float[Tensor, "B T"]:
        logprobs = _reference_logprobs(self.model, self._here(rollout))
        return logprobs.to(rollout.device)

    @torch.no_grad()
    def logits(self, rollout: Rollout) -> Float[Tensor, "B T V"]:
        return _response_forward(self.model, self._here(rollout)).logits.to(rollout.device)

    @torch.no_grad()
    def next_token_head(self, rollout: Rollout) -> NextTokenHead:
        # On another device the output layer's weight travels with the hidden states
        # (the exact KL needs the whole distribution): prefer k1 there.
        head = next_token_head(self.model, self._here(rollout))
        return head if self.device == rollout.device else head.to(rollout.device)


@final
class AdapterOffReference:
    """π_ref as the policy's own weights with its LoRA adapter switched off.

    No second copy of the base weights: the reference is the base model the
    adapter was added to, evaluated inside peft's ``disable_adapter()``.

    Args:
        policy: a Policy whose model is a ``peft.PeftModel``.

    Raises:
        TypeError: the policy's model has no adapter to switch off.
    """

    def __init__(self, policy: Policy) -> None:
        disable = getattr(type(policy.model), "disable_adapter", None)
        if disable is None:
            raise TypeError(
                "AdapterOffReference needs a policy whose model is a peft.PeftModel; "
                "use FrozenReference for a fully trained policy"
            )
        self.policy = policy

    def _adapter_off(self) -> AbstractContextManager[None]:
        model: Any = self.policy.model
        return model.disable_adapter()

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> Float[Tensor, "B T"]:
        with self._adapter_off():
            return _reference_logprobs(self.policy.model, rollout)

    @torch.no_grad()
    def logits(self, rollout: Rollout) -> Float[Tensor, "B T V"]:
        with self._adapter_off():
            return _response_forward(self.policy.model, rollout).logits

    @torch.no_grad()
    def next_token_head(self, rollout: Rollout) -> NextTokenHead:
        # The base model's output layer is the policy's own (weights shared): for the
        # KL only its current values matter, and the adapter is off while they are read.
        with self._adapter_off():
            return next_token_head(self.policy.model, rollout)

"""The Sampler protocol: another engine plugs in, and a broken one is caught at once."""

import dataclasses
import warnings

import pytest
import torch

import kltune
from helpers import tiny_blocks
from kltune.loop import TrainingHealthWarning
from kltune.sampler import KVCacheSampler, Sampled, Sampler

PROMPTS = ["The movie", "A film about", "I think"]


class Shifted:
    """A sampler whose logprobs are off by ``shift`` (a contract breach when ≠ 0)."""

    def __init__(self, shift: float) -> None:
        self.shift, self.calls = shift, 0
        self.inner = KVCacheSampler()

    def __call__(self, policy, prompt_ids, prompt_mask, **settings) -> Sampled:
        self.calls += 1
        sampled = self.inner(policy, prompt_ids, prompt_mask, **settings)
        logprobs = (sampled.logprobs + self.shift).masked_fill(~sampled.mask, 0.0)
        return dataclasses.replace(sampled, logprobs=logprobs)


def _one_iteration(sampler: Sampler | None) -> dict[str, float]:
    blocks, state = tiny_blocks()
    if sampler is not None:
        blocks.policy.sampler = sampler
    _, _, metrics = kltune.ppo_iteration(
        PROMPTS,
        blocks,
        state,
        kltune.Sampling(max_new_tokens=5, completions_per_prompt=2, top_k=20),
        kltune.Updates(minibatch_size=3),
        torch.Generator().manual_seed(0),
    )
    return metrics


def test_the_default_sampler_keeps_the_contract_and_the_loop_reports_it() -> None:
    assert isinstance(KVCacheSampler(), Sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingHealthWarning)
        metrics = _one_iteration(None)
    assert metrics["policy/first_ratio_error"] < 1e-4


def test_a_plugged_in_sampler_is_used_and_a_faithful_one_passes() -> None:
    sampler = Shifted(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingHealthWarning)
        metrics = _one_iteration(sampler)
    assert sampler.calls == 1 and metrics["policy/first_ratio_error"] < 1e-4


def test_a_sampler_whose_logprobs_are_not_its_distributions_is_caught() -> None:
    with pytest.warns(TrainingHealthWarning, match="before any update"):
        metrics = _one_iteration(Shifted(-0.1))
    assert metrics["policy/first_ratio_error"] == pytest.approx(torch.e**0.1 - 1, rel=1e-3)


def test_policy_takes_a_sampler_at_construction() -> None:
    model, tokenizer = kltune.tiny_random_model("llama")
    sampler = Shifted(0.0)
    policy = kltune.Policy(model, tokenizer, sampler=sampler)
    rollout = policy.rollout(["ab"], max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert sampler.calls == 1 and rollout.response_ids.shape == (1, 3)

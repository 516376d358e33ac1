"""Tests for kltune.fluency: the reference's perplexity of completions."""

import math

import pytest
import torch

import kltune
from kltune.fluency import reference_perplexity


def _setup(scale: float = 1.0) -> tuple[kltune.Policy, kltune.FrozenReference]:
    model, tokenizer = kltune.tiny_random_model("llama", seed=0)
    with torch.no_grad():  # scale > 1 sharpens the random model's next-token distributions
        model.get_output_embeddings().weight.mul_(scale)
    policy = kltune.Policy(model, tokenizer)
    return policy, kltune.FrozenReference(policy)


def test_perplexity_is_the_exponentiated_mean_token_nll() -> None:
    policy, reference = _setup()
    prompts = ["The movie", "A film about", "I think"]
    completions = [" was a delight.", " nothing", " it is great, great, great"]
    got = reference_perplexity(reference, policy, prompts, completions, batch_size=2)
    # Oracle: one plain forward of the reference per pair, no padding.
    tokenizer, total, count = policy.tokenizer, 0.0, 0
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer(prompt).input_ids
        c = tokenizer(completion, add_special_tokens=False).input_ids
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = reference.model(input_ids=ids).logits[0, len(p) - 1 : -1]
        total += float(torch.log_softmax(logits.double(), -1)[torch.arange(len(c)), c].sum())
        count += len(c)
    assert got == pytest.approx(math.exp(-total / count), rel=1e-5)


def test_degenerate_text_scores_worse_than_the_references_own_samples() -> None:
    policy, reference = _setup(scale=30.0)
    prompts = ["The movie"] * 8
    rollout = policy.rollout(prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
    own = reference_perplexity(reference, policy, prompts, list(rollout.completions))
    degenerate = reference_perplexity(reference, policy, prompts, ["great " * 4] * 8)
    assert 1.0 <= own < degenerate


def test_bad_input_and_empty_completions() -> None:
    policy, reference = _setup()
    with pytest.raises(ValueError, match="one prompt per completion"):
        reference_perplexity(reference, policy, ["a"], ["b", "c"])
    assert math.isnan(reference_perplexity(reference, policy, ["a"], [""]))

"""The KL penalty alone pulls the policy back to the reference, through the whole loop.

A tiny policy is moved away from its frozen reference, the task reward is 0 for
every completion (so the penalty is the only signal) and ``ppo_iteration`` runs
with β = 1. The exact KL(π‖π_ref) (summed over the vocabulary at every position
of the policy's own completions) must fall by at least half for each placement's
default estimator. k3 in the reward, the old default, is the counter-example:
its gradient is ∇KL(π‖π_ref) − ∇KL(π_ref‖π), and the KL grows.
"""

import warnings

import pytest
import torch

import kltune
import kltune.functional as KF
from kltune.loop import ppo_iteration

PROMPTS = ["The movie", "A film about", "I think", "Acting"]
ITERATIONS = 40


def exact_kl(policy: kltune.Policy, reference: kltune.FrozenReference) -> float:
    """Exact KL per completion on a fixed sample of 32 of the policy's completions."""
    with torch.no_grad():
        rollout = policy.rollout(
            PROMPTS,
            max_new_tokens=8,
            completions_per_prompt=8,
            generator=torch.Generator().manual_seed(123),
        )
        head, ref = policy.next_token_head(rollout), reference.next_token_head(rollout)
        kl = KF.kl_exact_from_hidden(head.hidden, head.weight, ref.hidden, ref.weight)
        return float(KF.masked_sum(kl, rollout.response_mask) / len(rollout))


def pull_back(penalty: kltune.KLPenalty) -> list[float]:
    """The exact KL before and after each of ITERATIONS iterations with a zero reward."""
    model, tokenizer = kltune.tiny_random_model("llama", seed=0)
    policy = kltune.Policy(model, tokenizer)
    reference = kltune.FrozenReference(policy)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=noise))
    blocks = kltune.Blocks(
        policy=policy,
        reference=reference,
        reward_fn=lambda prompts, completions: [0.0] * len(completions),
        objective=kltune.PPOObjective(kl=penalty),
        optimizer=torch.optim.Adam(policy.parameters(), lr=3e-3),
    )
    state = kltune.LoopState(
        controller=kltune.FixedKLController(beta=1.0), baseline=kltune.MeanBaseline()
    )
    sampling = kltune.Sampling(max_new_tokens=8, completions_per_prompt=4)
    optimisation = kltune.Optimisation(minibatch_size=8)
    generator = torch.Generator().manual_seed(0)
    kls = [exact_kl(policy, reference)]
    for _ in range(ITERATIONS):
        state, _, _ = ppo_iteration(PROMPTS, blocks, state, sampling, optimisation, generator)
        kls.append(exact_kl(policy, reference))
    return kls


@pytest.mark.parametrize("placement", ["reward", "loss", "reward+loss"])
def test_the_default_penalty_of_each_placement_halves_the_kl(placement: str) -> None:
    penalty = kltune.KLPenalty(placement=placement)  # type: ignore[arg-type]
    kls = pull_back(penalty)
    assert kls[0] > 0.2  # moved away from the reference to start with
    assert kls[-1] < 0.5 * kls[0], kls[::5]


def test_k3_in_the_reward_does_not_pull_back() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        penalty = kltune.KLPenalty(estimator=KF.kl_k3)
    kls = pull_back(penalty)
    assert kls[-1] > kls[0], kls[::5]  # it even pushes away

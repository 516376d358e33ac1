"""Small builders shared by the block tests: synthetic rollouts and tiny set-ups."""

import torch

import kltune
from kltune import Rollout


def synthetic_rollout(
    batch: int = 6,
    prompt_len: int = 3,
    length: int = 5,
    group: int = 2,
    seed: int = 0,
    with_values: bool = False,
) -> Rollout:
    """A scored, KL-shaped rollout with random numbers (no model), rows of one prompt contiguous."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old_logprobs = -torch.rand(batch, length, generator=g) * 3
    ref_logprobs = old_logprobs + 0.3 * torch.randn(batch, length, generator=g)
    scores = torch.randn(batch, generator=g)
    kl = kltune.functional.kl_k3(old_logprobs, ref_logprobs)
    rollout = Rollout(
        prompt_ids=torch.randint(0, 50, (batch, prompt_len), generator=g),
        prompt_mask=torch.ones(batch, prompt_len, dtype=torch.bool),
        response_ids=torch.randint(0, 50, (batch, length), generator=g),
        response_mask=mask,
        old_logprobs=old_logprobs.masked_fill(~mask, 0.0),
        prompts=tuple(f"prompt {i // group}" for i in range(batch)),
        completions=tuple(f"completion {i}" for i in range(batch)),
        temperature=1.0,
        prompt_index=torch.arange(batch) // group,
        ended=lengths < length,
        ref_logprobs=ref_logprobs.masked_fill(~mask, 0.0),
        scores=scores,
        old_values=torch.randn(batch, length, generator=g) if with_values else None,
    )
    return rollout.replace(rewards=kltune.functional.shaped_rewards(scores, kl, mask, 0.1))


def tiny_blocks(
    *,
    architecture: str = "llama",
    baseline: kltune.Baseline | None = None,
    value_head: bool = False,
    kl: kltune.KLPenalty | None = None,
    controller: kltune.KLController | None = None,
    lr: float = 1e-2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[kltune.Blocks, kltune.LoopState]:
    """A tiny random policy on ``device`` with a frozen reference and a reward that likes
    the letter 'a'."""
    model, tokenizer = kltune.tiny_random_model(architecture, seed=seed)
    model.to(device)
    torch.manual_seed(seed)
    policy = kltune.Policy(model, tokenizer, value_head=value_head)
    blocks = kltune.Blocks(
        policy=policy,
        reference=kltune.FrozenReference(policy),
        reward_fn=letter_reward,
        objective=kltune.PPOObjective(kl=kl or kltune.KLPenalty()),
        optimizer=torch.optim.Adam(policy.parameters(), lr=lr),
    )
    state = kltune.LoopState(
        controller=controller or kltune.FixedKLController(beta=0.1),
        baseline=baseline or kltune.MeanBaseline(),
    )
    return blocks, state


def letter_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Fraction of 'a' characters: a reward a tiny byte-level model can learn fast."""
    return [c.count("a") / max(len(c), 1) for c in completions]

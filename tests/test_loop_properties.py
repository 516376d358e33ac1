"""What the reference loop does to the parameters, on a tiny random model.

- zero advantages and β = 0 leave every weight bit-identical (and a real reward,
  or a β with the KL in the loss, does move them: the controls);
- the KL the controller is given is the logged ``kl/mean`` (the KL per completion);
- one ``ppo_iteration`` is its stages called by hand, to the bit.

The KL penalty alone pulling the policy back to the reference is
tests/test_kl_pullback.py.
"""

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import kltune
import kltune.functional as KF
from helpers import tiny_blocks
from kltune.loop import (
    collect_rollout,
    compute_scores,
    estimate_advantages,
    estimate_kl,
    optimise,
    score_reference,
    shape_with_kl,
    update_controller,
)

PROMPTS = ["The movie", "A film about", "I think"]
SAMPLING = kltune.Sampling(max_new_tokens=6, completions_per_prompt=2)
PLACEMENTS = ["reward", "loss", "reward+loss"]  # k1, k3 straight-through, the exact KL


def _perturb(policy: kltune.Policy, seed: int = 1, noise: float = 0.05) -> None:
    """Move the policy away from its reference (taken before), so that the KL is not ~0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(noise * torch.randn(param.shape, generator=generator))


def _bits(policy: kltune.Policy) -> dict[str, torch.Tensor]:
    """Every parameter's bit pattern (so that 0.0 and -0.0, or two NaNs, are told apart)."""
    out = {}
    for name, param in policy.named_parameters():
        assert param.dtype == torch.float32, name
        out[name] = param.detach().clone().view(torch.int32)
    return out


def _moved(before: dict[str, torch.Tensor], policy: kltune.Policy) -> list[str]:
    after = _bits(policy)
    assert after.keys() == before.keys()
    return [name for name, bits in before.items() if not torch.equal(bits, after[name])]


def _iterate(blocks, state, updates, n=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rollouts, metrics = [], []
    for _ in range(n):
        state, rollout, m = kltune.ppo_iteration(
            PROMPTS, blocks, state, SAMPLING, updates, generator
        )
        rollouts.append(rollout)
        metrics.append(m)
    return state, rollouts, metrics


def _distinct_letters(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward that differs between completions of a random model (unlike 'a' counts)."""
    return [float(len(set(completion))) for completion in completions]


class ZeroAdvantages:
    """A baseline whose advantages are exact zeros (returns as the mean baseline's).

    A constant reward with :class:`kltune.MeanBaseline` gives zeros only when the
    batch mean of the constant rounds back to it; this stub gives them always.
    """

    def advantages(self, rollout: kltune.Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        advantages, returns = kltune.MeanBaseline().advantages(rollout)
        return torch.zeros_like(advantages), returns

    def update(self, rollout: kltune.Rollout) -> "ZeroAdvantages":
        return self


# ── 1. zero advantages and β = 0 move nothing ───────────────────────────────


def _zero_signal_run(placement: str, beta: float, whiten: bool, reward=None, baseline=None):
    """Two epochs of three minibatch steps with Adam, from a policy off its reference;
    returns the names of the parameters that moved and the rollout."""
    blocks, state = tiny_blocks(
        kl=kltune.KLPenalty(placement=placement),  # type: ignore[arg-type]
        controller=kltune.FixedKLController(beta),
        baseline=baseline or ZeroAdvantages(),
        lr=1e-3,
    )
    _perturb(blocks.policy)
    if reward is not None:
        blocks = dataclasses.replace(blocks, reward_fn=reward)
    updates = kltune.Updates(minibatch_size=2, epochs=2, whiten_advantages=whiten)
    before = _bits(blocks.policy)
    state, (rollout,), (metrics,) = _iterate(blocks, state, updates)
    assert state.total_skips == 0 and metrics["policy/skipped_steps"] == 0
    return _moved(before, blocks.policy), rollout


@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whitened"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_advantages_and_no_penalty_leave_every_parameter_bit_identical(
    placement: str, whiten: bool
) -> None:
    moved, rollout = _zero_signal_run(placement, beta=0.0, whiten=whiten)
    assert rollout.advantages is not None and not rollout.advantages.any()
    assert moved == []


def test_control_a_reward_that_varies_moves_the_parameters() -> None:
    moved, rollout = _zero_signal_run(
        "reward", beta=0.0, whiten=False, reward=_distinct_letters, baseline=kltune.MeanBaseline()
    )
    assert rollout.scores is not None and float(rollout.scores.std()) > 0
    assert "model.lm_head.weight" in moved, moved


@pytest.mark.parametrize("placement", ["loss", "reward+loss"])
def test_control_a_penalty_in_the_loss_moves_the_parameters_without_advantages(
    placement: str,
) -> None:
    # The same run as the zero case but β > 0: the KL term alone has a gradient,
    # so the zero case passes because β = 0 switches it off, not by accident.
    moved, _ = _zero_signal_run(placement, beta=0.5, whiten=False)
    assert len(moved) > 1, moved


def test_control_the_penalty_in_the_reward_alone_moves_the_parameters() -> None:
    # A constant score, β > 0 and the KL in the reward: the only advantages are the
    # penalty's (the mean baseline is used, not the zero stub).
    moved, _ = _zero_signal_run(
        "reward",
        beta=0.5,
        whiten=False,
        reward=lambda prompts, completions: [0.5] * len(completions),
        baseline=kltune.MeanBaseline(),
    )
    assert len(moved) > 1, moved


# ── 2. the controller sees the logged KL ────────────────────────────────────


@dataclass(frozen=True)
class Recording:
    """A KL controller that records what each ``update`` receives, then delegates."""

    inner: kltune.KLController
    seen: list[tuple[float, int]] = field(default_factory=list)

    @property
    def beta(self) -> float:
        return self.inner.beta

    def update(self, observed_kl: float, n_samples: int) -> "Recording":
        self.seen.append((observed_kl, n_samples))
        return Recording(self.inner.update(observed_kl, n_samples), self.seen)

    def state_dict(self) -> dict[str, float | str]:
        return self.inner.state_dict()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_controller_sees_the_logged_kl_per_completion(placement: str) -> None:
    # An adaptive controller aiming low, so that β changes at each update.
    inner = kltune.AdaptiveKLController(beta=0.2, target=0.01, horizon=16)
    recording = Recording(inner)
    blocks, state = tiny_blocks(
        kl=kltune.KLPenalty(placement=placement),  # type: ignore[arg-type]
        controller=recording,
    )
    _perturb(blocks.policy)
    updates = kltune.Updates(minibatch_size=3)
    state, rollouts, metrics = _iterate(blocks, state, updates, n=3)
    assert len(recording.seen) == 3
    beta = inner.beta
    for (observed, n_samples), rollout, m in zip(recording.seen, rollouts, metrics, strict=True):
        assert n_samples == len(rollout) == len(PROMPTS) * SAMPLING.completions_per_prompt
        # Both are the KL per completion (summed over its tokens), averaged over the batch.
        assert observed == pytest.approx(m["kl/mean"], rel=1e-5, abs=1e-7)
        assert m["kl/per_token"] == pytest.approx(
            m["kl/mean"] / float(rollout.lengths.float().mean()), rel=1e-4
        )
        assert m["kl/mean"] > 0.05  # off the reference: the comparison is not of two zeros
        assert m["kl/beta"] == beta  # the β of this iteration is the last update's
        inner = inner.update(observed, n_samples)
        beta = inner.beta
        assert rollout.scores is not None and rollout.rewards is not None
        if placement == "reward":
            # what the controller sees is what each completion's reward was docked, per β
            kl_seq = (rollout.old_logprobs - rollout.ref_logprobs).masked_fill(
                ~rollout.response_mask, 0.0
            )
            assert observed == pytest.approx(float(kl_seq.sum(1).mean()), rel=1e-5)
            docked = rollout.scores - KF.masked_sum(rollout.rewards, rollout.response_mask, dim=1)
            assert float(docked.mean()) == pytest.approx(m["kl/beta"] * observed, rel=1e-4)
    assert state.controller.beta == inner.beta != 0.2


# ── 3. ppo_iteration is its stages ──────────────────────────────────────────


def _by_hand(prompts, blocks, state, sampling, updates, generator):
    """``ppo_iteration``'s stages, called one by one (without its metrics)."""
    beta = state.controller.beta
    rollout = collect_rollout(blocks.policy, prompts, sampling, generator)
    rollout = score_reference(blocks.reference, rollout, blocks.objective.kl)
    rollout = compute_scores(blocks.reward_fn, rollout)
    kl_tokens = estimate_kl(blocks.policy, rollout, blocks.objective.kl)
    rollout = shape_with_kl(rollout, kl_tokens, blocks.objective.kl, beta)
    rollout = estimate_advantages(state.baseline, rollout)
    buffer = kltune.RolloutBuffer(rollout)
    if updates.whiten_advantages:
        buffer = buffer.whitened(all_reduce=blocks.data_parallel.all_reduce)
    state, _ = optimise(blocks, buffer, beta, updates, generator, state)
    controller = update_controller(
        state.controller, kl_tokens, rollout, blocks.data_parallel.all_reduce
    )
    state = dataclasses.replace(
        state,
        controller=controller,
        baseline=state.baseline.update(rollout),
        iteration=state.iteration + 1,
    )
    return state, rollout


_BASELINES = {
    "ema": kltune.EMABaseline,
    "grpo": kltune.GRPOBaseline,
    "leave_one_out": kltune.LeaveOneOutBaseline,
}


# No shrinking: a failing case is already small, and shrinking it costs minutes.
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(
    seed=st.integers(0, 2**16),
    placement=st.sampled_from(PLACEMENTS),
    baseline=st.sampled_from(sorted(_BASELINES)),
    minibatch_size=st.sampled_from([2, 3, 6]),
    epochs=st.integers(1, 2),
    whiten=st.booleans(),
)
def test_an_iteration_is_its_stages_called_by_hand(
    seed: int, placement: str, baseline: str, minibatch_size: int, epochs: int, whiten: bool
) -> None:
    updates = kltune.Updates(minibatch_size=minibatch_size, epochs=epochs, whiten_advantages=whiten)
    runs = []
    for loop in (kltune.ppo_iteration, _by_hand):
        blocks, state = tiny_blocks(
            kl=kltune.KLPenalty(placement=placement),  # type: ignore[arg-type]
            controller=kltune.AdaptiveKLController(beta=0.1, target=0.01, horizon=16),
            baseline=_BASELINES[baseline](),
            lr=1e-3,
        )
        _perturb(blocks.policy, seed=seed + 1)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(2):  # the second iteration uses the updated β, baseline and Adam state
            state, rollout, *_ = loop(PROMPTS, blocks, state, SAMPLING, updates, generator)
        runs.append((blocks, state, rollout, generator.get_state()))
    (blocks, state, rollout, gen), (hand_blocks, hand_state, hand_rollout, hand_gen) = runs
    for (name, param), hand in zip(
        blocks.policy.named_parameters(), hand_blocks.policy.parameters(), strict=True
    ):
        assert torch.equal(param, hand), name
    assert hand_state.controller.beta == state.controller.beta != 0.1
    assert hand_state.baseline == state.baseline
    assert (hand_state.iteration, hand_state.total_skips) == (state.iteration, state.total_skips)
    assert torch.equal(hand_rollout.advantages, rollout.advantages)  # type: ignore[arg-type]
    assert torch.equal(hand_gen, gen)  # the generator was drawn from alike

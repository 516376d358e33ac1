"""Conformance: every shipped RewardFn, Baseline and KLController honours its Protocol.

A new implementation joins by adding one line to the lists below.
"""

import copy
import dataclasses
import json

import pytest
import torch

import kltune
from helpers import synthetic_rollout
from kltune import functional as KF

REWARD_FNS = [
    kltune.VaderSentiment(),
    kltune.VaderSentiment(include_prompt=True),
    kltune.LengthReward(),
    kltune.LengthReward(target_words=3),
    kltune.RepetitionPenalty(n=2),
    kltune.weighted_sum((kltune.VaderSentiment(), 1.0), (kltune.LengthReward(target_words=3), 0.5)),
    kltune.clipped(kltune.LengthReward(), 0.0, 2.0),
]

BASELINES = [
    kltune.MeanBaseline(),
    kltune.EMABaseline(decay=0.5),
    kltune.LeaveOneOutBaseline(),
    kltune.GRPOBaseline(),
    kltune.GRPOBaseline(scale=False),
    kltune.GAEBaseline(gamma=1.0, lam=0.9),
    kltune.PromptValueBaseline(vocab_size=50, dim=8),
]

CONTROLLERS = [
    kltune.FixedKLController(beta=0.1),
    kltune.AdaptiveKLController(beta=0.1, target=6.0, horizon=100),
    kltune.ConstraintKLController(beta=0.1, target=2.0, step_size=0.05),
]

PROMPTS = ["The film was", "I think", "Overall"]
COMPLETIONS = ["a wonderful, great story", "terrible acting and a bad plot", "fine fine fine"]


@pytest.mark.parametrize("reward_fn", REWARD_FNS, ids=repr)
def test_reward_fn_gives_one_finite_float_per_completion(reward_fn: kltune.RewardFn) -> None:
    scores = kltune.score_completions(reward_fn, PROMPTS, COMPLETIONS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("reward_fn", REWARD_FNS, ids=repr)
def test_reward_fn_is_deterministic_and_does_not_mutate(reward_fn: kltune.RewardFn) -> None:
    prompts, completions = list(PROMPTS), list(COMPLETIONS)
    first = kltune.score_completions(reward_fn, prompts, completions)
    second = kltune.score_completions(copy.deepcopy(reward_fn), prompts, completions)
    assert torch.equal(first, second)
    assert prompts == PROMPTS and completions == COMPLETIONS


def _inputs(baseline: kltune.Baseline) -> kltune.Rollout:
    return synthetic_rollout(with_values=isinstance(baseline, kltune.GAEBaseline))


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: type(b).__name__)
def test_baseline_shapes_dtypes_and_padding(baseline: kltune.Baseline) -> None:
    rollout = _inputs(baseline)
    advantages, returns = baseline.advantages(rollout)
    assert advantages.shape == returns.shape == rollout.response_mask.shape
    assert advantages.dtype == returns.dtype == torch.float32
    padding = ~rollout.response_mask
    assert bool((advantages[padding] == 0).all()) and bool((returns[padding] == 0).all())
    assert bool(torch.isfinite(advantages).all())


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: type(b).__name__)
def test_baseline_is_deterministic_and_leaves_its_input(baseline: kltune.Baseline) -> None:
    rollout = _inputs(baseline)
    rewards = rollout.rewards.clone()  # type: ignore[union-attr]
    first = baseline.advantages(rollout)
    second = baseline.advantages(rollout)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(rollout.rewards, rewards)  # type: ignore[arg-type]


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: type(b).__name__)
def test_baseline_update_returns_state_and_round_trips(baseline: kltune.Baseline) -> None:
    rollout = _inputs(baseline)
    before = copy.deepcopy(baseline)
    updated = baseline.update(rollout)
    assert type(updated) is type(baseline)
    if dataclasses.is_dataclass(baseline):
        assert baseline == before  # the old state is untouched
        state = json.loads(json.dumps(dataclasses.asdict(updated)))
        assert dataclasses.replace(baseline, **state) == updated
    else:
        assert isinstance(baseline, torch.nn.Module)
        restored = copy.deepcopy(before)
        restored.load_state_dict(updated.state_dict())
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                restored.state_dict().values(), updated.state_dict().values(), strict=True
            )
        )


@pytest.mark.parametrize("controller", CONTROLLERS, ids=lambda c: type(c).__name__)
def test_controller_update_is_new_and_state_round_trips(controller: kltune.KLController) -> None:
    before = controller.state_dict()
    new = controller.update(observed_kl=9.0, n_samples=16)
    assert new is not controller and controller.state_dict() == before
    assert new.beta >= 0
    assert kltune.controller_from_state(json.loads(json.dumps(new.state_dict()))) == new


@pytest.mark.parametrize("controller", CONTROLLERS[1:], ids=lambda c: type(c).__name__)
def test_feedback_controllers_raise_beta_above_target_and_lower_below(
    controller: kltune.KLController,
) -> None:
    target = float(controller.state_dict()["target"])
    assert controller.update(target * 2, 16).beta > controller.beta
    assert controller.update(target / 2, 16).beta < controller.beta


def test_group_baselines_reject_one_completion_per_prompt() -> None:
    rollout = synthetic_rollout(batch=4, group=1)
    for baseline in (kltune.LeaveOneOutBaseline(), kltune.GRPOBaseline()):
        with pytest.raises(ValueError, match="several completions per prompt"):
            baseline.advantages(rollout)


def test_grpo_without_kl_shaping_is_the_functional_grpo() -> None:
    rollout = synthetic_rollout(batch=6, group=3)
    assert rollout.scores is not None
    unshaped = rollout.replace(
        rewards=KF.shaped_rewards(rollout.scores, torch.zeros(6, 5), rollout.response_mask, 0.0)
    )
    advantages, _ = kltune.GRPOBaseline().advantages(unshaped)
    expected = KF.grpo_advantages(rollout.scores, 3)[:, None].expand(6, 5)
    assert torch.allclose(advantages, expected * rollout.response_mask, atol=1e-5)


def test_grpo_with_tied_scores_keeps_the_kl_part_at_its_own_scale() -> None:
    # All scores of every group equal: the score carries no signal, and the KL part
    # is centred as a group-mean baseline centres it, not divided by a std of ~0.
    rollout = synthetic_rollout(batch=6, group=3)
    tied = rollout.replace(scores=torch.full((6,), 0.5))
    kl = KF.kl_k3(rollout.old_logprobs, rollout.ref_logprobs)  # type: ignore[arg-type]
    tied = tied.replace(rewards=KF.shaped_rewards(tied.scores, kl, tied.response_mask, 0.1))  # type: ignore[arg-type]
    advantages, returns = kltune.GRPOBaseline().advantages(tied)
    group_means = returns[:, 0].reshape(2, 3).mean(-1).repeat_interleave(3)
    expected = (returns - group_means[:, None]) * tied.response_mask
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert float(advantages.abs().max()) < 1.0  # KL differences at β = 0.1, not unit-size


def test_the_old_grpo_name_warns_and_builds_the_new_class() -> None:
    with pytest.warns(DeprecationWarning, match="renamed GRPOBaseline"):
        baseline = kltune.GroupNormBaseline(scale=False)
    assert baseline == kltune.GRPOBaseline(scale=False)


def test_leave_one_out_advantages_sum_to_zero_per_group_on_the_first_token() -> None:
    rollout = synthetic_rollout(batch=6, group=3)
    advantages, _ = kltune.LeaveOneOutBaseline().advantages(rollout)
    assert torch.allclose(advantages[:, 0].reshape(2, 3).sum(-1), torch.zeros(2), atol=1e-6)


def test_mean_baseline_is_returns_minus_batch_mean_by_hand() -> None:
    rollout = synthetic_rollout()
    advantages, returns = kltune.MeanBaseline().advantages(rollout)
    expected = KF.reward_to_go(rollout.rewards, rollout.response_mask)  # type: ignore[arg-type]
    assert torch.allclose(returns, expected)
    centred = (expected - expected[:, 0].mean()) * rollout.response_mask
    assert torch.allclose(advantages, centred)


def test_prompt_value_baseline_learns_per_prompt_returns() -> None:
    rollout = synthetic_rollout(batch=6, group=2)
    baseline = kltune.PromptValueBaseline(vocab_size=50, dim=16)
    optimizer = torch.optim.Adam(baseline.parameters(), lr=0.05)
    first = float(baseline.loss(rollout).detach())
    for _ in range(200):
        optimizer.zero_grad()
        baseline.loss(rollout).backward()
        optimizer.step()
    assert float(baseline.loss(rollout).detach()) < 0.2 * first


def test_gae_baseline_needs_values() -> None:
    with pytest.raises(ValueError, match="value_head=True"):
        kltune.GAEBaseline().advantages(synthetic_rollout(with_values=False))

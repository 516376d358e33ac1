"""The reference loop on a tiny random causal LM: stages, placements, baselines, faults."""

import copy

import pytest
import torch

import kltune
from helpers import tiny_blocks
from kltune import functional as KF
from kltune.loop import (
    NonFiniteLossError,
    collect_rollout,
    compute_scores,
    estimate_advantages,
    estimate_kl,
    score_reference,
    shape_with_kl,
)

PROMPTS = ["The movie", "A film about", "I think"]
SAMPLING = kltune.Sampling(max_new_tokens=6, completions_per_prompt=2)


def _iterate(blocks, state, n=2, updates=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    metrics = []
    for _ in range(n):
        state, rollout, m = kltune.ppo_iteration(
            PROMPTS, blocks, state, SAMPLING, updates or kltune.Updates(), generator
        )
        metrics.append(m)
    return state, rollout, metrics


def test_smoke_two_iterations_train_the_policy_and_not_the_reference() -> None:
    # The smoke test of STYLE.md: finite loss, policy changed, reference unchanged, KL >= 0.
    blocks, state = tiny_blocks()
    policy_before = copy.deepcopy(blocks.policy.model.state_dict())
    reference_before = copy.deepcopy(blocks.reference.model.state_dict())  # type: ignore[attr-defined]
    state, _, metrics = _iterate(blocks, state)
    assert state.iteration == 2
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in metrics)
    changed = [
        not torch.equal(v, blocks.policy.model.state_dict()[k]) for k, v in policy_before.items()
    ]
    assert any(changed)
    for key, value in reference_before.items():
        assert torch.equal(value, blocks.reference.model.state_dict()[key])  # type: ignore[attr-defined]
    # k1 (the default) is unbiased but can be negative in a small batch; far below 0
    # would mean sampling and scoring disagree.
    assert all(m["kl/mean"] > -0.05 for m in metrics)
    assert abs(metrics[0]["kl/mean"]) < 1e-5  # the first rollout comes from pi_ref itself


def test_stages_fill_the_rollout_in_order() -> None:
    blocks, state = tiny_blocks()
    generator = torch.Generator().manual_seed(0)
    rollout = collect_rollout(blocks.policy, PROMPTS, SAMPLING, generator)
    assert rollout.ref_logprobs is None and rollout.scores is None
    rollout = score_reference(blocks.reference, rollout)
    # before any update the policy is the reference: identical logprobs
    assert torch.allclose(rollout.ref_logprobs, rollout.old_logprobs, atol=1e-5)  # type: ignore[arg-type]
    rollout = compute_scores(blocks.reward_fn, rollout)
    kl = estimate_kl(blocks.policy, rollout, blocks.objective.kl)
    rollout = shape_with_kl(rollout, kl, blocks.objective.kl, beta=0.5)
    expected = KF.shaped_rewards(rollout.scores, kl, rollout.response_mask, 0.5)  # type: ignore[arg-type]
    assert torch.equal(rollout.rewards, expected)  # type: ignore[arg-type]
    rollout = estimate_advantages(state.baseline, rollout)
    assert rollout.advantages is not None and rollout.returns is not None


def test_kl_in_the_loss_leaves_rewards_unpenalised_and_adds_a_loss_term() -> None:
    kl = kltune.KLPenalty(placement="loss")
    blocks, state = tiny_blocks(kl=kl, controller=kltune.FixedKLController(beta=1.0))
    generator = torch.Generator().manual_seed(0)
    rollout = collect_rollout(blocks.policy, PROMPTS, SAMPLING, generator)
    rollout = compute_scores(blocks.reward_fn, score_reference(blocks.reference, rollout))
    kl_tokens = estimate_kl(blocks.policy, rollout, kl)
    shaped = shape_with_kl(rollout, kl_tokens, kl, beta=1.0)
    assert torch.allclose(shaped.rewards.sum(-1), rollout.scores)  # type: ignore[union-attr]
    _, _, metrics = _iterate(blocks, state, n=2)
    assert "kl/loss_term" in metrics[-1]


@pytest.mark.parametrize(
    "baseline",
    [
        kltune.MeanBaseline(),
        kltune.EMABaseline(),
        kltune.LeaveOneOutBaseline(),
        kltune.GRPOBaseline(),
        kltune.GAEBaseline(),
    ],
    ids=lambda b: type(b).__name__,
)
def test_every_baseline_runs_in_the_loop(baseline: kltune.Baseline) -> None:
    value_head = isinstance(baseline, kltune.GAEBaseline)
    blocks, state = tiny_blocks(baseline=baseline, value_head=value_head)
    state, _, metrics = _iterate(blocks, state)
    assert all(m["policy/skipped_steps"] == 0 for m in metrics)
    if value_head:
        assert "value/loss" in metrics[-1]
        assert blocks.policy.value_head is not None
        assert blocks.policy.value_head.weight.abs().sum() > 0  # trained away from zero init


def test_baseline_metrics_measure_against_the_oracle_floor() -> None:
    # Leave-one-out's advantages have mean square G/(G-1) times the within-prompt floor.
    blocks, state = tiny_blocks(baseline=kltune.LeaveOneOutBaseline())
    updates = kltune.Updates(minibatch_size=2)
    _, rollout, metrics = _iterate(blocks, state, n=1, updates=updates)
    m = metrics[-1]
    assert rollout.rewards is not None and rollout.advantages is not None
    returns = KF.masked_sum(rollout.rewards, rollout.response_mask, dim=1)
    first = rollout.advantages[:, 0]
    assert m["advantage/oracle_floor"] == pytest.approx(float(KF.within_group_var(returns, 2)))
    # leave-one-out advantages have mean 0, so their variance is their mean square
    assert m["advantage/sequence_var"] == pytest.approx(float((first**2).mean()), rel=1e-4)
    assert m["advantage/sequence_var"] == pytest.approx(2 * m["advantage/oracle_floor"], rel=1e-4)
    assert m["policy/grad_norm_var"] > 0  # three minibatch steps, three different gradients
    # one completion per prompt: no group, no floor
    one = kltune.Sampling(max_new_tokens=6)
    blocks, state = tiny_blocks()
    generator = torch.Generator().manual_seed(0)
    _, _, m = kltune.ppo_iteration(PROMPTS, blocks, state, one, kltune.Updates(), generator)
    assert "advantage/oracle_floor" not in m and "advantage/sequence_var" in m


def test_grpo_with_tied_scores_and_no_penalty_leaves_the_policy_alone() -> None:
    # Every completion scores the same and β = 0: GRPO's advantages are exactly 0, so
    # an iteration must not move a single weight (zero advantages move nothing; the
    # tied-score case with a KL part is tested in test_conformance.py).
    blocks, state = tiny_blocks(
        baseline=kltune.GRPOBaseline(), controller=kltune.FixedKLController(beta=0.0)
    )
    blocks = kltune.Blocks(**{**blocks.__dict__, "reward_fn": lambda p, c: [0.5] * len(c)})
    before = copy.deepcopy(blocks.policy.state_dict())
    _, rollout, _ = _iterate(blocks, state, n=1)
    assert rollout.advantages is not None and float(rollout.advantages.abs().max()) == 0.0
    for key, value in blocks.policy.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_learned_prompt_baseline_is_fitted_by_the_loop() -> None:
    blocks, state = tiny_blocks()
    value = kltune.PromptValueBaseline(vocab_size=len(blocks.policy.tokenizer), dim=8)
    fit = kltune.ValueFit(value, torch.optim.Adam(value.parameters(), lr=0.1), steps=2)
    blocks = kltune.Blocks(**{**blocks.__dict__, "value_fit": fit})
    state = kltune.LoopState(controller=state.controller, baseline=value)
    _, _, metrics = _iterate(blocks, state)
    assert "baseline/loss" in metrics[-1]
    assert value.head.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "estimator", [KF.kl_k1, KF.kl_k2, KF.kl_k3, KF.kl_k3_st, KF.kl_exact], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("placement", ["reward", "loss", "reward+loss"])
def test_every_estimator_in_every_placement_runs(estimator, placement) -> None:
    penalty = kltune.KLPenalty(estimator=estimator, placement=placement, allow_biased=True)
    blocks, state = tiny_blocks(kl=penalty)
    _, _, metrics = _iterate(blocks, state)
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in metrics)


def test_gradient_accumulation_matches_one_big_step_for_sequence_sums() -> None:
    # With token_sum aggregation, 2 micro-batches of 3 give the gradient of one batch of 6.
    grads = []
    for steps in (1, 2):
        blocks, state = tiny_blocks()
        objective = kltune.PPOObjective(aggregate=KF.token_sum)
        blocks = kltune.Blocks(**{**blocks.__dict__, "objective": objective})
        generator = torch.Generator().manual_seed(0)
        rollout = collect_rollout(blocks.policy, PROMPTS, SAMPLING, generator)
        rollout = compute_scores(blocks.reward_fn, score_reference(blocks.reference, rollout))
        kl_tokens = estimate_kl(blocks.policy, rollout, objective.kl)
        rollout = shape_with_kl(rollout, kl_tokens, objective.kl, 0.1)
        rollout = estimate_advantages(state.baseline, rollout)
        from kltune.loop import _accumulate_gradients

        _accumulate_gradients(blocks, rollout, 0.1, kltune.Updates(grad_accumulation_steps=steps))
        grads.append(
            torch.cat([p.grad.flatten() for p in blocks.policy.parameters() if p.grad is not None])
        )
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def _scoring_nan(monkeypatch):
    """Tiny blocks whose policy scores every token NaN, and its weights before training."""
    blocks, state = tiny_blocks()
    score = blocks.policy.score

    def nan_score(rollout, **kwargs):
        out = score(rollout, **kwargs)
        return kltune.PolicyOutput(out.logprobs * float("nan"), out.entropy, out.values)

    monkeypatch.setattr(blocks.policy, "score", nan_score)
    return blocks, state, copy.deepcopy(blocks.policy.model.state_dict())


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_cause(monkeypatch) -> None:
    # A NaN loss never reaches the weights; K skips in a row stop the run with a reason.
    blocks, state, before = _scoring_nan(monkeypatch)
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        _iterate(blocks, state, n=4, updates=kltune.Updates(max_consecutive_skips=2))
    for key, value in before.items():
        assert torch.equal(value, blocks.policy.model.state_dict()[key])


def test_one_non_finite_step_is_counted_and_skipped(monkeypatch) -> None:
    blocks, state = tiny_blocks()
    score = blocks.policy.score
    calls = {"n": 0}

    def sometimes_nan(rollout, **kwargs):
        out = score(rollout, **kwargs)
        calls["n"] += 1
        scale = float("nan") if calls["n"] == 1 else 1.0
        return kltune.PolicyOutput(out.logprobs * scale, out.entropy, out.values)

    monkeypatch.setattr(blocks.policy, "score", sometimes_nan)
    state, _, metrics = _iterate(blocks, state, n=2)
    assert metrics[-1]["policy/skipped_steps"] == 1 and state.consecutive_skips == 0


def test_health_warnings_name_the_likely_cause() -> None:
    from kltune.loop import TrainingHealthWarning, warn_if_unhealthy

    with pytest.warns(TrainingHealthWarning, match="learning rate"):
        warn_if_unhealthy({"policy/approx_kl": 0.9, "policy/clipfrac": 0.1, "kl/mean": 1.0})
    with pytest.warns(TrainingHealthWarning, match="negative"):
        warn_if_unhealthy({"policy/approx_kl": 0.0, "policy/clipfrac": 0.0, "kl/mean": -1.0})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unhealthy({"policy/approx_kl": 0.01, "policy/clipfrac": 0.1, "kl/mean": 0.5})
        # k1's batch mean can be below 0 by noise: no warning within 4 standard errors
        warn_if_unhealthy({"kl/mean": -0.3, "kl/mean_stderr": 0.1})
    with pytest.warns(TrainingHealthWarning, match="temperature"):
        warn_if_unhealthy({"kl/mean": -0.5, "kl/mean_stderr": 0.1})


def test_the_exact_kl_needs_a_reference_with_heads_when_blocks_are_built() -> None:
    blocks, _ = tiny_blocks()

    class LogprobsOnly:
        def logprobs(self, rollout: kltune.Rollout) -> torch.Tensor:
            return blocks.reference.logprobs(rollout)

    objective = kltune.PPOObjective(kl=kltune.KLPenalty(placement="reward+loss"))
    fields = {**blocks.__dict__, "objective": objective, "reference": LogprobsOnly()}
    with pytest.raises(TypeError, match=r"exact-KL penalty needs a reference with next_token_head"):
        kltune.Blocks(**fields)
    kltune.Blocks(**{**fields, "objective": kltune.PPOObjective()})  # k1 needs logprobs only


def test_the_reference_head_travels_with_minibatches_and_concat() -> None:
    blocks, _ = tiny_blocks(kl=kltune.KLPenalty(placement="reward+loss"))
    rollout = collect_rollout(blocks.policy, PROMPTS, SAMPLING, torch.Generator().manual_seed(0))
    rollout = score_reference(blocks.reference, rollout, blocks.objective.kl)
    assert rollout.ref_head is not None
    part = rollout.select(torch.tensor([4, 1]))
    assert part.ref_head is not None
    assert torch.equal(part.ref_head.hidden, rollout.ref_head.hidden[[4, 1]])
    assert part.ref_head.weight is rollout.ref_head.weight
    both = kltune.Rollout.concat([rollout, part])
    assert both.ref_head is not None and both.ref_head.hidden.shape[0] == len(rollout) + 2
    with pytest.raises(ValueError, match="ref_head must cover"):
        rollout.replace(ref_head=part.ref_head)

"""The reference PPO loop: one short function per stage, in DESIGN.md's order.

Read :func:`ppo_iteration` top to bottom; it is the algorithm. Copy this file
and change one stage to try an idea: every stage takes blocks and a Rollout and
returns a new Rollout (or metrics), nothing hidden in between.
"""

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, final, runtime_checkable

import torch
from torch import Tensor

import kltune.functional as KF
from kltune.baselines import Baseline, LearnedBaseline
from kltune.kl_control import KLController, KLPenalty
from kltune.objective import PPOObjective
from kltune.policy import Policy, Reference
from kltune.rewards import RewardFn, score_completions
from kltune.rollout import Rollout, RolloutBuffer

Metrics = dict[str, float]


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive optimiser steps were skipped for NaN/inf."""


@final
@dataclass(frozen=True)
class Sampling:
    """How completions are drawn (see :meth:`kltune.Policy.rollout`)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    completions_per_prompt: int = 1
    autocast_dtype: torch.dtype | None = None


@final
@dataclass(frozen=True)
class Optimisation:
    """How one batch of rollouts is turned into optimiser steps.

    Args:
        epochs: passes over the batch.
        minibatch_size: rows per optimiser step (None: the whole batch).
        grad_accumulation_steps: split each minibatch into this many
            micro-batches, accumulating gradients (same step, less memory).
        max_grad_norm: clip the global gradient norm (None: no clipping).
        whiten_advantages: standardise advantages over the whole batch.
        max_consecutive_skips: stop after this many steps in a row are skipped
            for a non-finite loss or gradient.
    """

    epochs: int = 1
    minibatch_size: int | None = None
    grad_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    whiten_advantages: bool = True
    max_consecutive_skips: int = 3


@final
@dataclass(frozen=True)
class ValueFit:
    """Online training of a learned baseline: its optimiser and steps per iteration."""

    baseline: LearnedBaseline
    optimizer: torch.optim.Optimizer
    steps: int = 1


@runtime_checkable
class Backward(Protocol):
    """How a loss is backpropagated (plain ``loss.backward`` or an accelerator's)."""

    def __call__(self, loss: Tensor) -> None: ...


def _plain_backward(loss: Tensor) -> None:
    loss.backward()


@final
@dataclass(frozen=True)
class Blocks:
    """The blocks one PPO iteration wires together."""

    policy: Policy
    reference: Reference
    reward_fn: RewardFn
    objective: PPOObjective
    optimizer: torch.optim.Optimizer
    value_fit: ValueFit | None = None
    backward: Backward = _plain_backward


@final
@dataclass(frozen=True)
class LoopState:
    """What changes from one iteration to the next: plain data, to log and checkpoint."""

    controller: KLController
    baseline: Baseline
    iteration: int = 0
    consecutive_skips: int = 0
    total_skips: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ── stages ──────────────────────────────────────────────────────────────────


def collect_rollout(
    policy: Policy, prompts: Sequence[str], sampling: Sampling, generator: torch.Generator
) -> Rollout:
    """Sample completions (with the value head's predictions when there is one)."""
    with torch.no_grad():
        return policy.rollout(
            prompts,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            completions_per_prompt=sampling.completions_per_prompt,
            generator=generator,
            autocast_dtype=sampling.autocast_dtype,
        )


def score_reference(reference: Reference, rollout: Rollout) -> Rollout:
    """Add log π_ref of the sampled tokens."""
    with torch.no_grad():
        return rollout.replace(ref_logprobs=reference.logprobs(rollout))


def compute_scores(reward_fn: RewardFn, rollout: Rollout) -> Rollout:
    """Add one score per completion from the reward function (validated)."""
    scores = score_completions(reward_fn, rollout.prompts, rollout.completions)
    return rollout.replace(scores=scores.to(rollout.old_logprobs.device))


def shape_with_kl(rollout: Rollout, kl: KLPenalty, beta: float) -> tuple[Rollout, Tensor]:
    """Per-token rewards: −β·kl on each token (KL in the reward) plus the score on the last.

    Returns the rollout with ``rewards`` and the per-token KL estimate (for logging
    and the controller, whatever the placement).
    """
    assert rollout.ref_logprobs is not None and rollout.scores is not None
    kl_tokens = kl.reward_kl(rollout.old_logprobs, rollout.ref_logprobs)
    beta_in_reward = 0.0 if kl.in_loss else beta
    rewards = KF.shaped_rewards(rollout.scores, kl_tokens, rollout.response_mask, beta_in_reward)
    return rollout.replace(rewards=rewards), kl_tokens


def estimate_advantages(baseline: Baseline, rollout: Rollout) -> Rollout:
    """Add advantages and returns from the baseline."""
    with torch.no_grad():
        advantages, returns = baseline.advantages(rollout)
    return rollout.replace(advantages=advantages, returns=returns)


def optimise(
    blocks: Blocks,
    buffer: RolloutBuffer,
    beta: float,
    optimisation: Optimisation,
    generator: torch.Generator,
    state: LoopState,
) -> tuple[LoopState, list[dict[str, Tensor]]]:
    """PPO epochs over shuffled minibatches; a non-finite step is skipped, never applied."""
    size = optimisation.minibatch_size or len(buffer)
    history = []
    for minibatch in buffer.minibatches(size, optimisation.epochs, generator):
        metrics = _accumulate_gradients(blocks, minibatch, beta, optimisation)
        grad_norm = _clipped_grad_norm(blocks.policy, optimisation.max_grad_norm)
        metrics["policy/grad_norm"] = grad_norm
        if torch.isfinite(grad_norm) and torch.isfinite(metrics["loss/total"]):
            blocks.optimizer.step()
            state = _replace(state, consecutive_skips=0)
        else:
            state = _skip(state, optimisation)
        blocks.optimizer.zero_grad(set_to_none=True)
        history.append(metrics)
    return state, history


def fit_value_baseline(value_fit: ValueFit, rollout: Rollout) -> Metrics:
    """Regress a learned baseline on this batch's returns (after it was used on them)."""
    losses = []
    for _ in range(value_fit.steps):
        loss = value_fit.baseline.loss(rollout)
        value_fit.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value_fit.optimizer.step()
        losses.append(float(loss.detach()))
    return {"baseline/loss": losses[-1]}


def update_controller(
    controller: KLController, kl_tokens: Tensor, rollout: Rollout
) -> KLController:
    """β's update from the observed KL per sequence (summed over response tokens)."""
    observed = float(KF.masked_sum(kl_tokens, rollout.response_mask) / len(rollout))
    return controller.update(observed, len(rollout))


# ── one iteration ───────────────────────────────────────────────────────────


def ppo_iteration(
    prompts: Sequence[str],
    blocks: Blocks,
    state: LoopState,
    sampling: Sampling,
    optimisation: Optimisation,
    generator: torch.Generator,
) -> tuple[LoopState, Rollout, Metrics]:
    """One PPO iteration: sample, score, shape with KL, advantages, optimise, update β."""
    beta = state.controller.beta
    rollout = collect_rollout(blocks.policy, prompts, sampling, generator)
    rollout = score_reference(blocks.reference, rollout)
    rollout = compute_scores(blocks.reward_fn, rollout)
    rollout, kl_tokens = shape_with_kl(rollout, blocks.objective.kl, beta)
    rollout = estimate_advantages(state.baseline, rollout)
    buffer = RolloutBuffer(rollout)
    if optimisation.whiten_advantages:
        buffer = buffer.whitened()
    state, history = optimise(blocks, buffer, beta, optimisation, generator, state)
    metrics = rollout_metrics(rollout, kl_tokens, beta) | _mean_metrics(history)
    if blocks.value_fit is not None:
        metrics |= fit_value_baseline(blocks.value_fit, rollout)
    warn_if_unhealthy(metrics)
    controller = update_controller(state.controller, kl_tokens, rollout)
    state = _replace(
        state,
        controller=controller,
        baseline=state.baseline.update(rollout),
        iteration=state.iteration + 1,
    )
    metrics |= {"iteration": float(state.iteration), "policy/skipped_steps": state.total_skips}
    return state, rollout, metrics


class TrainingHealthWarning(RuntimeWarning):
    """A metric outside the range where PPO behaves (see :func:`warn_if_unhealthy`)."""


#: Bounds past which :func:`warn_if_unhealthy` warns.
MAX_APPROX_KL = 0.5
MAX_CLIPFRAC = 0.5


def warn_if_unhealthy(metrics: Metrics) -> None:
    """Warn when one update moved the policy too far, or when the KL estimate is negative.

    - ``policy/approx_kl`` > 0.5 nats or ``policy/clipfrac`` > 0.5: the optimiser
      moves the policy much further per step than the clipped objective can
      correct; the usual cause is a learning rate too high (or too many epochs).
    - ``kl/mean`` below −0.05 nats per completion (beyond estimator noise): the
      per-token estimate is negative on average, which the true KL never is. With
      k1 it means the sampled tokens are more likely under π_ref than under π —
      a sign that sampling and scoring disagree (temperature, top-k/top-p, or
      generation settings that change the distribution); with the KL in the
      reward, a negative KL is paid out as a *bonus*, the classic failure.
      k3 is never negative and avoids it.
    """
    approx_kl = metrics.get("policy/approx_kl", 0.0)
    clipfrac = metrics.get("policy/clipfrac", 0.0)
    if approx_kl > MAX_APPROX_KL or clipfrac > MAX_CLIPFRAC:
        warnings.warn(
            f"large policy update: approx KL(old‖new) = {approx_kl:.3f} nats per token, "
            f"clip fraction = {clipfrac:.2f}. The learning rate is probably too high "
            "(or there are too many PPO epochs): lower it.",
            TrainingHealthWarning,
            stacklevel=2,
        )
    if metrics.get("kl/mean", 0.0) < -0.05:
        warnings.warn(
            f"the KL estimate to the reference is negative ({metrics['kl/mean']:.3f} nats per "
            "completion). The true KL is never negative: sampling and scoring probably use "
            "different distributions (temperature, top-k/top-p), and with the KL in the "
            "reward the policy is being paid to move away. Use kl_k3 (never negative) and "
            "sample with the temperature used for scoring.",
            TrainingHealthWarning,
            stacklevel=2,
        )


# ── helpers ─────────────────────────────────────────────────────────────────


def rollout_metrics(rollout: Rollout, kl_tokens: Tensor, beta: float) -> Metrics:
    """Reward, KL and length statistics of a scored rollout."""
    assert rollout.scores is not None and rollout.advantages is not None
    mask = rollout.response_mask
    kl_per_sequence = KF.masked_sum(kl_tokens, mask, dim=1)
    advantages = rollout.advantages
    return {
        "reward/score_mean": float(rollout.scores.mean()),
        "reward/score_std": float(rollout.scores.std()) if len(rollout) > 1 else 0.0,
        "kl/mean": float(kl_per_sequence.mean()),
        "kl/per_token": float(KF.masked_mean(kl_tokens, mask)),
        "kl/beta": float(beta),
        "reward/shaped_return_mean": float(
            KF.masked_sum(rollout.rewards, mask) / len(rollout)  # type: ignore[arg-type]
        ),
        "advantage/mean": float(KF.masked_mean(advantages, mask)),
        "advantage/var": float(KF.masked_var(advantages, mask)),
        "completion/length_mean": float(rollout.lengths.float().mean()),
        "completion/ended_fraction": float(rollout.ended.float().mean()),
    }


def _accumulate_gradients(
    blocks: Blocks, minibatch: Rollout, beta: float, optimisation: Optimisation
) -> dict[str, Tensor]:
    steps = optimisation.grad_accumulation_steps
    if steps < 1 or len(minibatch) % steps != 0:
        raise ValueError(
            f"grad_accumulation_steps={steps} must be >= 1 and divide the minibatch of "
            f"{len(minibatch)} rows"
        )
    rows = len(minibatch) // steps
    sums: dict[str, Tensor] = {}
    for start in range(0, len(minibatch), rows):
        part = minibatch.select(slice(start, start + rows))
        loss, metrics = blocks.objective(blocks.policy, part, beta)
        if torch.isfinite(loss):
            blocks.backward(loss / steps)
        for key, value in metrics.items():
            sums[key] = sums.get(key, torch.zeros(())) + value.float().cpu() / steps
    return sums


def _clipped_grad_norm(policy: Policy, max_norm: float | None) -> Tensor:
    params = [p for p in policy.parameters() if p.grad is not None]
    if not params:
        return torch.tensor(float("nan"))
    limit = math.inf if max_norm is None else max_norm
    return torch.nn.utils.clip_grad_norm_(params, limit).detach().float().cpu()


def _skip(state: LoopState, optimisation: Optimisation) -> LoopState:
    state = _replace(
        state, consecutive_skips=state.consecutive_skips + 1, total_skips=state.total_skips + 1
    )
    if state.consecutive_skips >= optimisation.max_consecutive_skips:
        raise NonFiniteLossError(
            f"{state.consecutive_skips} optimiser steps in a row had a non-finite loss or "
            "gradient and were skipped. Likely causes: rewards on a huge scale (normalise "
            "them, e.g. RunningNormalizer), a learning rate too high, or a KL estimate that "
            "overflowed (k3 with a policy far from the reference)."
        )
    return state


def _replace(state: LoopState, **changes: Any) -> LoopState:
    return dataclasses.replace(state, **changes)


def _mean_metrics(history: list[dict[str, Tensor]]) -> Metrics:
    keys = {key for metrics in history for key in metrics}
    out = {}
    for key in sorted(keys):
        values = [float(m[key]) for m in history if key in m]
        out[key] = sum(values) / len(values)
    if "policy/grad_norm" in keys:
        norms = [float(m["policy/grad_norm"]) for m in history]
        out["policy/grad_norm_max"] = max(norms)
    return out

"""The reference PPO loop: one short function per stage, in DESIGN.md's order.

Read :func:`ppo_iteration` top to bottom; it is the algorithm. Copy this file
and change one stage to try an idea: every stage takes blocks and a Rollout and
returns a new Rollout (or metrics), nothing hidden in between.
"""

import dataclasses
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, final, runtime_checkable

import torch
from torch import Tensor

import kltune.functional as KF
from kltune._checks import check_count
from kltune.baselines import Baseline, LearnedBaseline, _group_size
from kltune.distributed import ONE_PROCESS, AllReduce, DataParallel, one_process
from kltune.kl_control import KLController, KLPenalty
from kltune.objective import PPOObjective
from kltune.policy import Policy, check_sampling
from kltune.reference import HeadReference, Reference
from kltune.rewards import RewardFn, score_completions
from kltune.rollout import Rollout, RolloutBuffer

Metrics = dict[str, float]


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive optimiser steps were skipped for NaN/inf."""


@final
@dataclass(frozen=True)
class Sampling:
    """How completions are drawn each iteration (see :meth:`kltune.Policy.rollout`).

    Args:
        max_new_tokens: the most tokens a completion may have (>= 1); 32 by
            default. Sampling time grows linearly with it.
        temperature: τ > 0; the logits are divided by it (1: the model's own
            distribution). The KL and the PPO ratio use the same τ.
        top_k: sample only among the k most likely tokens (None: all).
        top_p: nucleus sampling: the smallest set of tokens with this much mass
            (None: all). With either, the policy *is* the truncated, renormalised
            distribution: the behaviour logprobs, the PPO ratio and the KL to the
            reference are all taken under it (the exact-KL penalty refuses it).
        completions_per_prompt: G, completions drawn for each prompt (1 by
            default; >= 2 for the group baselines, leave-one-out and GRPO). A
            batch has ``prompts_per_iteration × G`` completions.
        stop_at_eos: end a completion at its EOS token (True, the default);
            False: every completion has exactly ``max_new_tokens`` tokens.

    Raises:
        ValueError: a value out of range (see :meth:`kltune.Policy.rollout`).
        TypeError: a count that is not an int, or ``stop_at_eos`` not a bool.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    completions_per_prompt: int = 1
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        """The checks of :meth:`kltune.Policy.rollout`, when the settings are made."""
        if not isinstance(self.stop_at_eos, bool):
            raise TypeError(f"stop_at_eos must be a bool, got {type(self.stop_at_eos).__name__}")
        check_sampling(
            self.max_new_tokens,
            self.temperature,
            self.top_k,
            self.top_p,
            self.completions_per_prompt,
        )


def Optimisation(*args: Any, **kwargs: Any) -> "Updates":
    """Deprecated name of :class:`Updates` (it read as a twin of ``Blocks.optimizer``);
    removed in the next release."""
    warnings.warn(
        "Optimisation is renamed Updates (and train(optimisation=...) is train(updates=...)); "
        "the old names go in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return Updates(*args, **kwargs)


@final
@dataclass(frozen=True)
class Updates:
    """How one batch of rollouts is turned into optimiser steps (PPO's update phase).

    The optimiser itself (and its learning rate) is ``Blocks.optimizer``; these
    settings say how the batch is cut and passed to it.

    Args:
        epochs: passes over the batch (1 by default; PPO papers use 1 to 4).
        minibatch_size: rows (completions) per optimiser step; it must divide
            the batch of ``prompts_per_iteration × completions_per_prompt``
            (None, the default: the whole batch, one step per epoch).
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

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accumulation_steps", "max_consecutive_skips"):
            check_count(getattr(self, name), name=name)
        size = self.minibatch_size
        if size is not None:
            check_count(size, name="minibatch_size")
            if size % self.grad_accumulation_steps:
                raise ValueError(
                    f"grad_accumulation_steps={self.grad_accumulation_steps} must divide "
                    f"minibatch_size={size}"
                )
        norm = self.max_grad_norm
        if norm is not None and not (math.isfinite(norm) and norm > 0):
            raise ValueError(
                f"max_grad_norm must be a finite number > 0 or None, got {norm} "
                "(a negative norm would flip the gradients)"
            )


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


@runtime_checkable
class SteppingBackward(Backward, Protocol):
    """A backward that applies the optimiser itself, parameter by parameter, as
    gradients complete (:class:`kltune.accel.StepInBackward`): the loop then reads
    the gradient norm from it instead of from the (freed) gradients."""

    def grad_norm(self) -> Tensor: ...


@final
@dataclass(frozen=True)
class Blocks:
    """The blocks one PPO iteration wires together.

    ``backward`` is ``loss.backward()`` unless an engine or
    :class:`kltune.accel.StepInBackward` provides its own. ``data_parallel``
    matters only for a run over several processes, and
    :func:`kltune.distributed.prepare` sets it (with ``backward``).
    """

    policy: Policy
    reference: Reference
    reward_fn: RewardFn
    objective: PPOObjective
    optimizer: torch.optim.Optimizer
    value_fit: ValueFit | None = None
    backward: Backward = _plain_backward
    data_parallel: DataParallel = ONE_PROCESS

    def __post_init__(self) -> None:
        if self.objective.kl.exact and not isinstance(self.reference, HeadReference):
            raise TypeError(
                "the exact-KL penalty needs a reference with next_token_head(rollout) "
                f"(FrozenReference and AdapterOffReference have it); {type(self.reference).__name__} "
                "has only logprobs: use KLPenalty() (k1 in the reward) with it"
            )


@final
@dataclass(frozen=True)
class LoopState:
    """What changes from one iteration to the next: plain data, to log and checkpoint."""

    controller: KLController
    baseline: Baseline
    iteration: int = 0
    consecutive_skips: int = 0
    total_skips: int = 0


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
            stop_at_eos=sampling.stop_at_eos,
        )


def score_reference(reference: Reference, rollout: Rollout, kl: KLPenalty | None = None) -> Rollout:
    """Add log π_ref of the sampled tokens (and π_ref's whole next-token
    distributions, for the exact-KL penalty)."""
    with torch.no_grad():
        rollout = rollout.replace(ref_logprobs=reference.logprobs(rollout))
        if kl is not None and kl.exact:
            if not isinstance(reference, HeadReference):
                raise TypeError("the exact KL needs a reference with next_token_head")
            rollout = rollout.replace(ref_head=reference.next_token_head(rollout))
    return rollout


def compute_scores(reward_fn: RewardFn, rollout: Rollout) -> Rollout:
    """Add one score per completion from the reward function (validated)."""
    scores = score_completions(reward_fn, rollout.prompts, rollout.completions)
    return rollout.replace(scores=scores.to(rollout.old_logprobs.device))


def estimate_kl(policy: Policy, rollout: Rollout, kl: KLPenalty) -> Tensor:
    """Per-token KL(π_old ‖ π_ref) of the sampled completions, detached: what the
    reward carries (KL in the reward), what is logged and what the controller sees.

    The exact KL needs the behaviour policy's whole next-token distributions: one
    more forward of the policy, without gradient.
    """
    if rollout.ref_logprobs is None:
        raise ValueError("estimate_kl needs ref_logprobs: run score_reference first")
    if not kl.exact:
        return kl.reward_kl(rollout.old_logprobs, rollout.ref_logprobs)
    if rollout.ref_head is None:
        raise ValueError("the exact KL needs ref_head: run score_reference with this penalty")
    if rollout.top_k is not None or rollout.top_p is not None:
        raise ValueError(
            "the exact KL sums over the whole vocabulary and does not know the top-k/top-p "
            "truncation this rollout was sampled with: sample without it, or use a "
            "sampled-token estimator (KLPenalty(), k1)"
        )
    with torch.no_grad():
        head = policy.next_token_head(rollout)
        return kl.exact_kl(head, rollout.ref_head, rollout.temperature)


def shape_with_kl(rollout: Rollout, kl_tokens: Tensor, kl: KLPenalty, beta: float) -> Rollout:
    """Per-token rewards: −β·kl on each token (when the KL is in the reward) plus
    the score on the last."""
    if rollout.scores is None:
        raise ValueError("shape_with_kl needs scores: run compute_scores first")
    beta_in_reward = beta if kl.in_reward else 0.0
    rewards = KF.shaped_rewards(rollout.scores, kl_tokens, rollout.response_mask, beta_in_reward)
    return rollout.replace(rewards=rewards)


def estimate_advantages(baseline: Baseline, rollout: Rollout) -> Rollout:
    """Add advantages and returns from the baseline."""
    with torch.no_grad():
        advantages, returns = baseline.advantages(rollout)
    return rollout.replace(advantages=advantages, returns=returns)


def optimise(
    blocks: Blocks,
    buffer: RolloutBuffer,
    beta: float,
    updates: Updates,
    generator: torch.Generator,
    state: LoopState,
) -> tuple[LoopState, list[dict[str, Tensor]]]:
    """PPO epochs over shuffled minibatches; a non-finite step is skipped, never applied.

    With the KL penalty in both the reward and the loss, the loss term's β is
    multiplied by the whitening scale of the advantages, keeping the two parts'
    balance (their sum is ∇KL only at equal scale)."""
    if blocks.objective.kl.in_reward and blocks.objective.kl.in_loss:
        beta = beta * buffer.advantage_scale
    size = len(buffer) if updates.minibatch_size is None else updates.minibatch_size
    stepping = isinstance(blocks.backward, SteppingBackward)
    if stepping and (updates.grad_accumulation_steps != 1 or updates.max_grad_norm is not None):
        raise ValueError(
            "a backward that steps the optimiser itself needs grad_accumulation_steps=1 and "
            f"max_grad_norm=None (got {updates.grad_accumulation_steps} and "
            f"{updates.max_grad_norm}): each parameter is updated as soon as its gradient is complete"
        )
    history = []
    for minibatch in buffer.minibatches(size, updates.epochs, generator):
        blocks.optimizer.zero_grad(set_to_none=True)
        metrics = _accumulate_gradients(blocks, minibatch, beta, updates)
        if isinstance(blocks.backward, SteppingBackward):  # applied inside backward
            grad_norm = blocks.backward.grad_norm()
        else:
            grad_norm = _clipped_grad_norm(blocks.policy, updates.max_grad_norm)
        metrics["policy/grad_norm"] = grad_norm
        if bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(metrics["loss/total"])):
            blocks.optimizer.step()  # (after a stepping backward no gradient is left)
            state = _replace(state, consecutive_skips=0)
        else:
            state = _skip(state, updates)
        blocks.optimizer.zero_grad(set_to_none=True)
        history.append(metrics)
    if history and "policy/ratio_error" in history[0]:  # scored before any update
        history[0]["policy/first_ratio_error"] = history[0]["policy/ratio_error"]
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
    controller: KLController,
    kl_tokens: Tensor,
    rollout: Rollout,
    all_reduce: AllReduce = one_process,
) -> KLController:
    """β's update from the observed KL per sequence (summed over response tokens),
    over the rollouts of every process."""
    local = torch.stack(
        [
            KF.masked_sum(kl_tokens, rollout.response_mask).float().cpu(),
            torch.tensor(float(len(rollout))),
        ]
    )
    total, rows = all_reduce(local.to(kl_tokens.device)).tolist()
    return controller.update(total / rows, int(rows))


# ── one iteration ───────────────────────────────────────────────────────────


def ppo_iteration(
    prompts: Sequence[str],
    blocks: Blocks,
    state: LoopState,
    sampling: Sampling,
    updates: Updates,
    generator: torch.Generator,
) -> tuple[LoopState, Rollout, Metrics]:
    """One PPO iteration: sample, score, shape with KL, advantages, optimise, update β."""
    beta = state.controller.beta
    rollout = collect_rollout(blocks.policy, prompts, sampling, generator)
    rollout = score_reference(blocks.reference, rollout, blocks.objective.kl)
    rollout = compute_scores(blocks.reward_fn, rollout)
    kl_tokens = estimate_kl(blocks.policy, rollout, blocks.objective.kl)
    rollout = shape_with_kl(rollout, kl_tokens, blocks.objective.kl, beta)
    rollout = estimate_advantages(state.baseline, rollout)
    buffer = RolloutBuffer(rollout)
    if updates.whiten_advantages:
        buffer = buffer.whitened(all_reduce=blocks.data_parallel.all_reduce)
    state, history = optimise(blocks, buffer, beta, updates, generator, state)
    metrics = rollout_metrics(rollout, kl_tokens, beta) | _mean_metrics(history)
    if blocks.value_fit is not None:
        metrics |= fit_value_baseline(blocks.value_fit, rollout)
    metrics = mean_over_processes(metrics, blocks.data_parallel.all_reduce)
    warn_if_unhealthy(metrics)
    target = getattr(state.controller, "target", None)
    if isinstance(target, float | int):  # the controllers that aim at a KL
        metrics |= {"kl/target": float(target), "kl/tracking_error": metrics["kl/mean"] - target}
    controller = update_controller(
        state.controller, kl_tokens, rollout, blocks.data_parallel.all_reduce
    )
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
#: Largest ``|ratio − 1|`` on the first minibatch, before any update, that float
#: rounding explains (float32: about 1e-5; bf16 autocast, where sampling with the
#: KV cache and scoring the whole sequence round differently: up to about 2e-2 seen).
#: A sampler that breaks its contract (the full softmax for a top-k draw, another
#: temperature) is off by 0.1 and more.
MAX_FIRST_RATIO_ERROR = 0.05


def warn_if_unhealthy(metrics: Metrics) -> None:
    """Warn when one update moved the policy too far, or when the KL estimate is negative.

    - ``policy/approx_kl`` > 0.5 nats or ``policy/clipfrac`` > 0.5: the optimiser
      moves the policy much further per step than the clipped objective can
      correct; the usual cause is a learning rate too high (or too many epochs).
    - ``kl/mean`` below −0.05 nats per completion and more than four standard
      errors (``kl/mean_stderr``) below 0, so beyond the estimator's noise: the
      sampled tokens are on average more likely under π_ref than under the π
      that is said to have drawn them, which cannot happen when the behaviour
      logprobs are those of the sampling distribution (the k1 mean is then an
      unbiased estimate of a KL ≥ 0). Sampling and scoring disagree: a
      temperature, top-k/top-p or other generation setting that changed the
      distribution the tokens came from, or behaviour logprobs from another
      model or precision. With the KL in the reward the policy is then paid for
      the mismatch.
    - ``policy/first_ratio_error`` > 0.05: before any update the policy's scoring
      disagrees with the behaviour logprobs, which a sampler that keeps its
      contract (:class:`kltune.sampler.Sampler`) never lets happen beyond float
      rounding.
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
    first = metrics.get("policy/first_ratio_error", 0.0)
    if first > MAX_FIRST_RATIO_ERROR:
        warnings.warn(
            f"before any update, the policy's logprobs differ from the behaviour logprobs "
            f"(largest |ratio − 1| = {first:.3g}): the sampler did not return the logprobs "
            "of the distribution it drew from, at the policy's temperature, top-k/top-p "
            "and precision (kltune.sampler.Sampler); PPO is then off-policy from the start.",
            TrainingHealthWarning,
            stacklevel=2,
        )
    kl_mean = metrics.get("kl/mean", 0.0)
    if kl_mean < -0.05 and kl_mean < -4 * metrics.get("kl/mean_stderr", 0.0):
        warnings.warn(
            f"the KL estimate to the reference is negative ({metrics['kl/mean']:.3f} nats per "
            "completion), which a KL never is: the tokens were not drawn from the "
            "distribution their behaviour logprobs describe. Check that sampling and scoring "
            "use the same temperature, that no top-k/top-p or other generation setting "
            "reshapes the distribution after the logprobs are taken, and that the behaviour "
            "logprobs come from the policy itself at the same precision.",
            TrainingHealthWarning,
            stacklevel=2,
        )


# ── helpers ─────────────────────────────────────────────────────────────────


def mean_over_processes(metrics: Metrics, all_reduce: AllReduce) -> Metrics:
    """Each metric averaged over processes, with one collective call (a no-op in one process)."""
    if all_reduce is one_process:
        return metrics
    local = torch.tensor([*metrics.values(), 1.0], dtype=torch.float64)
    summed = all_reduce(local)
    return {key: float(summed[i] / summed[-1]) for i, key in enumerate(metrics)}


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
        "kl/mean_stderr": float(kl_per_sequence.std() / math.sqrt(len(rollout)))
        if len(rollout) > 1
        else 0.0,
        "kl/per_token": float(KF.masked_mean(kl_tokens, mask)),
        "kl/beta": float(beta),
        "reward/shaped_return_mean": float(
            KF.masked_sum(rollout.rewards, mask) / len(rollout)  # type: ignore[arg-type]
        ),
        "advantage/mean": float(KF.masked_mean(advantages, mask)),
        "advantage/var": float(KF.masked_var(advantages, mask)),
        "completion/length_mean": float(rollout.lengths.float().mean()),
        "completion/ended_fraction": float(rollout.ended.float().mean()),
    } | _sequence_advantage_metrics(rollout)


def _sequence_advantage_metrics(rollout: Rollout) -> Metrics:
    """The baseline's quality per completion: the variance of its first-token advantage
    (return minus b(prompt)), and, with several completions per prompt, the floor no
    prompt baseline can beat (:func:`kltune.functional.within_group_var` of the returns)."""
    assert rollout.rewards is not None and rollout.advantages is not None
    first = rollout.advantages[:, 0]
    out = {"advantage/sequence_var": float(first.var(correction=0))}
    try:
        group = _group_size(rollout)
    except ValueError:  # one completion per prompt (or rows not grouped): no floor
        return out
    returns = KF.masked_sum(rollout.rewards, rollout.response_mask, dim=1)
    return out | {"advantage/oracle_floor": float(KF.within_group_var(returns, group))}


def _accumulate_gradients(
    blocks: Blocks, minibatch: Rollout, beta: float, updates: Updates
) -> dict[str, Tensor]:
    steps = updates.grad_accumulation_steps
    if steps < 1 or len(minibatch) % steps != 0:
        raise ValueError(
            f"grad_accumulation_steps={steps} must be >= 1 and divide the minibatch of "
            f"{len(minibatch)} rows"
        )
    rows = len(minibatch) // steps
    sums: dict[str, Tensor] = {}
    for start in range(0, len(minibatch), rows):
        part = minibatch.select(slice(start, start + rows))
        loss, metrics = blocks.objective(blocks.data_parallel.scorer or blocks.policy, part, beta)
        # A non-finite loss is still backpropagated: its NaN gradients make the
        # step be skipped, on every process alike once gradients are synchronised,
        # and no process waits forever for another's backward.
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


def _skip(state: LoopState, updates: Updates) -> LoopState:
    state = _replace(
        state, consecutive_skips=state.consecutive_skips + 1, total_skips=state.total_skips + 1
    )
    if state.consecutive_skips >= updates.max_consecutive_skips:
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
        finite = [norm for norm in norms if math.isfinite(norm)]
        if len(finite) > 1:  # how much the minibatch gradients of one iteration disagree
            out["policy/grad_norm_var"] = statistics.variance(finite)
    return out

"""kltune: typed, composable RLHF building blocks.

PPO on a causal LM against any reward, under a KL penalty or constraint to a
frozen reference. The maths lives in :mod:`kltune.functional`; the blocks are
re-exported here.

The blocks are imported on first use, so that ``import kltune.functional`` (the
pure maths) never loads ``transformers``.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kltune import checkpoint as checkpoint
    from kltune import diagnostics as diagnostics
    from kltune import distributed as distributed
    from kltune import functional as functional
    from kltune import loop as loop
    from kltune import plots as plots
    from kltune import preferences as preferences
    from kltune.baselines import (
        Baseline as Baseline,
    )
    from kltune.baselines import (
        EMABaseline as EMABaseline,
    )
    from kltune.baselines import (
        GAEBaseline as GAEBaseline,
    )
    from kltune.baselines import (
        GroupNormBaseline as GroupNormBaseline,
    )
    from kltune.baselines import (
        GRPOBaseline as GRPOBaseline,
    )
    from kltune.baselines import (
        LearnedBaseline as LearnedBaseline,
    )
    from kltune.baselines import (
        LeaveOneOutBaseline as LeaveOneOutBaseline,
    )
    from kltune.baselines import (
        MeanBaseline as MeanBaseline,
    )
    from kltune.baselines import (
        PromptValueBaseline as PromptValueBaseline,
    )
    from kltune.driver import train as train
    from kltune.kl_control import (
        AdaptiveKLController as AdaptiveKLController,
    )
    from kltune.kl_control import (
        ConstraintKLController as ConstraintKLController,
    )
    from kltune.kl_control import (
        FixedKLController as FixedKLController,
    )
    from kltune.kl_control import (
        KLController as KLController,
    )
    from kltune.kl_control import (
        KLPenalty as KLPenalty,
    )
    from kltune.kl_control import (
        KLPenaltyWarning as KLPenaltyWarning,
    )
    from kltune.kl_control import (
        controller_from_state as controller_from_state,
    )
    from kltune.loading import (
        load_model as load_model,
    )
    from kltune.loading import (
        movie_review_prompts as movie_review_prompts,
    )
    from kltune.loading import (
        tiny_random_model as tiny_random_model,
    )
    from kltune.loop import (
        Blocks as Blocks,
    )
    from kltune.loop import (
        LoopState as LoopState,
    )
    from kltune.loop import (
        Optimisation as Optimisation,
    )
    from kltune.loop import (
        Sampling as Sampling,
    )
    from kltune.loop import (
        Updates as Updates,
    )
    from kltune.loop import (
        ValueFit as ValueFit,
    )
    from kltune.loop import (
        ppo_iteration as ppo_iteration,
    )
    from kltune.objective import PPOObjective as PPOObjective
    from kltune.policy import (
        AdapterOffReference as AdapterOffReference,
    )
    from kltune.policy import (
        FrozenReference as FrozenReference,
    )
    from kltune.policy import (
        Policy as Policy,
    )
    from kltune.policy import (
        PolicyOutput as PolicyOutput,
    )
    from kltune.policy import (
        Reference as Reference,
    )
    from kltune.preferences import (
        Preference as Preference,
    )
    from kltune.preferences import (
        RewardModel as RewardModel,
    )
    from kltune.preferences import (
        fit_dpo as fit_dpo,
    )
    from kltune.preferences import (
        fit_reward_model as fit_reward_model,
    )
    from kltune.preferences import (
        judge_pairs as judge_pairs,
    )
    from kltune.rewards import (
        ClassifierReward as ClassifierReward,
    )
    from kltune.rewards import (
        LengthReward as LengthReward,
    )
    from kltune.rewards import (
        RepetitionPenalty as RepetitionPenalty,
    )
    from kltune.rewards import (
        RewardFn as RewardFn,
    )
    from kltune.rewards import (
        RunningNormalizer as RunningNormalizer,
    )
    from kltune.rewards import (
        VaderSentiment as VaderSentiment,
    )
    from kltune.rewards import (
        clipped as clipped,
    )
    from kltune.rewards import (
        missing_eos_penalty as missing_eos_penalty,
    )
    from kltune.rewards import (
        score_completions as score_completions,
    )
    from kltune.rewards import (
        weighted_sum as weighted_sum,
    )
    from kltune.rollout import Rollout as Rollout
    from kltune.rollout import RolloutBuffer as RolloutBuffer

_EXPORTS = {
    "AdapterOffReference": "kltune.policy",
    "AdaptiveKLController": "kltune.kl_control",
    "Baseline": "kltune.baselines",
    "Blocks": "kltune.loop",
    "ClassifierReward": "kltune.rewards",
    "clipped": "kltune.rewards",
    "ConstraintKLController": "kltune.kl_control",
    "controller_from_state": "kltune.kl_control",
    "EMABaseline": "kltune.baselines",
    "fit_dpo": "kltune.preferences",
    "fit_reward_model": "kltune.preferences",
    "FixedKLController": "kltune.kl_control",
    "FrozenReference": "kltune.policy",
    "GAEBaseline": "kltune.baselines",
    "GroupNormBaseline": "kltune.baselines",
    "GRPOBaseline": "kltune.baselines",
    "judge_pairs": "kltune.preferences",
    "KLController": "kltune.kl_control",
    "KLPenalty": "kltune.kl_control",
    "KLPenaltyWarning": "kltune.kl_control",
    "LearnedBaseline": "kltune.baselines",
    "LeaveOneOutBaseline": "kltune.baselines",
    "LengthReward": "kltune.rewards",
    "load_model": "kltune.loading",
    "LoopState": "kltune.loop",
    "MeanBaseline": "kltune.baselines",
    "missing_eos_penalty": "kltune.rewards",
    "movie_review_prompts": "kltune.loading",
    "Optimisation": "kltune.loop",
    "Policy": "kltune.policy",
    "PolicyOutput": "kltune.policy",
    "ppo_iteration": "kltune.loop",
    "PPOObjective": "kltune.objective",
    "Preference": "kltune.preferences",
    "PromptValueBaseline": "kltune.baselines",
    "Reference": "kltune.policy",
    "RepetitionPenalty": "kltune.rewards",
    "RewardFn": "kltune.rewards",
    "RewardModel": "kltune.preferences",
    "Rollout": "kltune.rollout",
    "RolloutBuffer": "kltune.rollout",
    "RunningNormalizer": "kltune.rewards",
    "Sampling": "kltune.loop",
    "score_completions": "kltune.rewards",
    "tiny_random_model": "kltune.loading",
    "train": "kltune.driver",
    "Updates": "kltune.loop",
    "VaderSentiment": "kltune.rewards",
    "ValueFit": "kltune.loop",
    "weighted_sum": "kltune.rewards",
}


# Submodules reachable as attributes (``kltune.distributed.prepare``), imported on first use.
_SUBMODULES = {
    "checkpoint",
    "diagnostics",
    "distributed",
    "functional",
    "loop",
    "plots",
    "preferences",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kltune.{name}")
    raise AttributeError(f"module 'kltune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "AdapterOffReference",
    "AdaptiveKLController",
    "Baseline",
    "Blocks",
    "ClassifierReward",
    "ConstraintKLController",
    "EMABaseline",
    "FixedKLController",
    "FrozenReference",
    "GAEBaseline",
    "GRPOBaseline",
    "GroupNormBaseline",
    "KLController",
    "KLPenalty",
    "KLPenaltyWarning",
    "LearnedBaseline",
    "LeaveOneOutBaseline",
    "LengthReward",
    "LoopState",
    "MeanBaseline",
    "Optimisation",
    "PPOObjective",
    "Policy",
    "PolicyOutput",
    "Preference",
    "PromptValueBaseline",
    "Reference",
    "RepetitionPenalty",
    "RewardFn",
    "RewardModel",
    "Rollout",
    "RolloutBuffer",
    "RunningNormalizer",
    "Sampling",
    "Updates",
    "VaderSentiment",
    "ValueFit",
    "clipped",
    "controller_from_state",
    "fit_dpo",
    "fit_reward_model",
    "judge_pairs",
    "load_model",
    "missing_eos_penalty",
    "movie_review_prompts",
    "ppo_iteration",
    "score_completions",
    "tiny_random_model",
    "train",
    "weighted_sum",
]

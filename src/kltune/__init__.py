"""kltune: typed, composable RLHF building blocks.

PPO on a causal LM against any reward, under a KL penalty or constraint to a
frozen reference. The maths lives in :mod:`kltune.functional`; the blocks are
re-exported here.

The blocks are imported on first use, so that ``import kltune.functional`` (the
pure maths) never loads ``transformers``.
"""

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kltune import accel as accel
    from kltune import checkpoint as checkpoint
    from kltune import diagnostics as diagnostics
    from kltune import distributed as distributed
    from kltune import encoding as encoding
    from kltune import functional as functional
    from kltune import loop as loop
    from kltune import plots as plots
    from kltune import preferences as preferences
    from kltune import reference as reference
    from kltune import sampler as sampler
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
        Policy as Policy,
    )
    from kltune.policy import (
        PolicyOutput as PolicyOutput,
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
    from kltune.reference import (
        AdapterOffReference as AdapterOffReference,
    )
    from kltune.reference import (
        FrozenReference as FrozenReference,
    )
    from kltune.reference import (
        Reference as Reference,
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


def _listed_exports() -> tuple[dict[str, str], set[str]]:
    """The names and submodules imported under ``TYPE_CHECKING`` above, read from
    this file: the one list of exports, which type checkers also read."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If))
    names, submodules = {}, set()
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names:
            if node.module == "kltune":
                submodules.add(alias.name)
            else:
                names[alias.name] = node.module
    return names, submodules


_EXPORTS, _SUBMODULES = _listed_exports()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kltune.{name}")
    raise AttributeError(f"module 'kltune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)

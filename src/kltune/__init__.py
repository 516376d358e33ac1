"""kltune: typed, composable RLHF building blocks.

PPO on a causal LM against any reward, under a KL penalty or constraint to a
frozen reference. The maths lives in :mod:`kltune.functional`; the blocks are
re-exported here.
"""

from kltune.baselines import (
    Baseline as Baseline,
    EMABaseline as EMABaseline,
    GAEBaseline as GAEBaseline,
    GroupNormBaseline as GroupNormBaseline,
    LearnedBaseline as LearnedBaseline,
    LeaveOneOutBaseline as LeaveOneOutBaseline,
    MeanBaseline as MeanBaseline,
    PromptValueBaseline as PromptValueBaseline,
)
from kltune.driver import train as train
from kltune.kl_control import (
    AdaptiveKLController as AdaptiveKLController,
    ConstraintKLController as ConstraintKLController,
    FixedKLController as FixedKLController,
    KLController as KLController,
    KLPenalty as KLPenalty,
    controller_from_state as controller_from_state,
)
from kltune.loading import (
    load_model as load_model,
    tiny_random_model as tiny_random_model,
)
from kltune.loop import (
    Blocks as Blocks,
    LoopState as LoopState,
    Optimisation as Optimisation,
    Sampling as Sampling,
    ValueFit as ValueFit,
    ppo_iteration as ppo_iteration,
)
from kltune.objective import PPOObjective as PPOObjective
from kltune.policy import (
    AdapterOffReference as AdapterOffReference,
    FrozenReference as FrozenReference,
    Policy as Policy,
    PolicyOutput as PolicyOutput,
    Reference as Reference,
)
from kltune.rewards import (
    ClassifierReward as ClassifierReward,
    LengthReward as LengthReward,
    RepetitionPenalty as RepetitionPenalty,
    RewardFn as RewardFn,
    RunningNormalizer as RunningNormalizer,
    VaderSentiment as VaderSentiment,
    clipped as clipped,
    missing_eos_penalty as missing_eos_penalty,
    score_completions as score_completions,
    weighted_sum as weighted_sum,
)
from kltune.rollout import Rollout as Rollout, RolloutBuffer as RolloutBuffer

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "AdapterOffReference",
    "Baseline",
    "Blocks",
    "ClassifierReward",
    "ConstraintKLController",
    "EMABaseline",
    "FixedKLController",
    "FrozenReference",
    "GAEBaseline",
    "GroupNormBaseline",
    "KLController",
    "KLPenalty",
    "LearnedBaseline",
    "LeaveOneOutBaseline",
    "LengthReward",
    "LoopState",
    "MeanBaseline",
    "Optimisation",
    "PPOObjective",
    "Policy",
    "PolicyOutput",
    "PromptValueBaseline",
    "Reference",
    "RepetitionPenalty",
    "RewardFn",
    "Rollout",
    "RolloutBuffer",
    "RunningNormalizer",
    "Sampling",
    "ValueFit",
    "VaderSentiment",
    "clipped",
    "controller_from_state",
    "load_model",
    "missing_eos_penalty",
    "ppo_iteration",
    "score_completions",
    "tiny_random_model",
    "train",
    "weighted_sum",
]

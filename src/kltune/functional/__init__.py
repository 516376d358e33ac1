"""kltune.functional: the pure tensor maths of PPO with a KL penalty.

Every equation of the library lives here, as a function of tensors with no
state, no models, no randomness and no I/O. Shapes use the letters ``B``
(completions), ``T`` (response tokens) and ``V`` (vocabulary). Import it as::

    import kltune.functional as KF
"""

from kltune.functional._advantages import (
    gae as gae,
)
from kltune.functional._advantages import (
    grpo_advantages as grpo_advantages,
)
from kltune.functional._advantages import (
    reward_to_go as reward_to_go,
)
from kltune.functional._advantages import (
    rloo_advantages as rloo_advantages,
)
from kltune.functional._advantages import (
    within_group_var as within_group_var,
)
from kltune.functional._best_of_n import (
    best_of_n_kl as best_of_n_kl,
)
from kltune.functional._best_of_n import (
    expected_best_of_n as expected_best_of_n,
)
from kltune.functional._head import (
    kl_exact_from_hidden as kl_exact_from_hidden,
)
from kltune.functional._head import (
    logprobs_from_hidden as logprobs_from_hidden,
)
from kltune.functional._kl import (
    kl_exact as kl_exact,
)
from kltune.functional._kl import (
    kl_k1 as kl_k1,
)
from kltune.functional._kl import (
    kl_k2 as kl_k2,
)
from kltune.functional._kl import (
    kl_k3 as kl_k3,
)
from kltune.functional._kl import (
    kl_k3_st as kl_k3_st,
)
from kltune.functional._kl import (
    shaped_rewards as shaped_rewards,
)
from kltune.functional._logprobs import (
    entropy_from_logits as entropy_from_logits,
)
from kltune.functional._logprobs import (
    logprobs_from_logits as logprobs_from_logits,
)
from kltune.functional._logprobs import (
    truncated_logits as truncated_logits,
)
from kltune.functional._masked import (
    masked_mean as masked_mean,
)
from kltune.functional._masked import (
    masked_sum as masked_sum,
)
from kltune.functional._masked import (
    masked_var as masked_var,
)
from kltune.functional._masked import (
    masked_whiten as masked_whiten,
)
from kltune.functional._ppo import (
    approx_kl as approx_kl,
)
from kltune.functional._ppo import (
    clip_fraction as clip_fraction,
)
from kltune.functional._ppo import (
    clipped_surrogate_loss as clipped_surrogate_loss,
)
from kltune.functional._ppo import (
    clipped_value_loss as clipped_value_loss,
)
from kltune.functional._ppo import (
    entropy_bonus as entropy_bonus,
)
from kltune.functional._ppo import (
    explained_variance as explained_variance,
)
from kltune.functional._ppo import (
    sequence_mean as sequence_mean,
)
from kltune.functional._ppo import (
    token_mean as token_mean,
)
from kltune.functional._ppo import (
    token_sum as token_sum,
)
from kltune.functional._ppo import (
    value_regression_loss as value_regression_loss,
)
from kltune.functional._preferences import (
    bradley_terry_loss as bradley_terry_loss,
)
from kltune.functional._preferences import (
    dpo_implicit_rewards as dpo_implicit_rewards,
)
from kltune.functional._preferences import (
    dpo_loss as dpo_loss,
)
from kltune.functional._preferences import (
    overoptimisation_coefficients as overoptimisation_coefficients,
)
from kltune.functional._preferences import (
    overoptimisation_curve as overoptimisation_curve,
)
from kltune.functional._preferences import (
    preference_accuracy as preference_accuracy,
)
from kltune.functional._preferences import (
    preference_logits as preference_logits,
)

__all__ = [
    "approx_kl",
    "best_of_n_kl",
    "bradley_terry_loss",
    "clip_fraction",
    "clipped_surrogate_loss",
    "clipped_value_loss",
    "dpo_implicit_rewards",
    "dpo_loss",
    "entropy_bonus",
    "entropy_from_logits",
    "expected_best_of_n",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "kl_exact",
    "kl_exact_from_hidden",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_st",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overoptimisation_coefficients",
    "overoptimisation_curve",
    "preference_accuracy",
    "preference_logits",
    "reward_to_go",
    "rloo_advantages",
    "sequence_mean",
    "shaped_rewards",
    "token_mean",
    "token_sum",
    "truncated_logits",
    "value_regression_loss",
    "within_group_var",
]

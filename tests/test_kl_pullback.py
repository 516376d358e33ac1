"""The KL penalty alone pulls the policy back to the reference, through the whole loop.

A tiny policy is moved away from its frozen reference, the task reward is 0 for
every completion (so the penalty is the only signal) and ``ppo_iteration`` runs
with β = 1. The exact KL(π‖π_ref) (summed over the vocabulary at every position
of the policy's own completions) must fall by at least half for each placement's
default estimator. k3 in the reward, the old default, is the counter-example:
its gradient is ∇KL(π‖π_ref) − ∇KL(π_ref‖π), and the KL grows.
"""

import warnings

import pytest

import kltune
import kltune.functional as KF
from kltune.kl_gradients import pull_back


@pytest.mark.parametrize("placement", ["reward", "loss", "reward+loss"])
def test_the_default_penalty_of_each_placement_halves_the_kl(placement: str) -> None:
    penalty = kltune.KLPenalty(placement=placement)  # type: ignore[arg-type]
    kls = pull_back(penalty)
    assert kls[0] > 0.2  # moved away from the reference to start with
    assert kls[-1] < 0.5 * kls[0], kls[::5]


def test_k3_in_the_reward_does_not_pull_back() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        penalty = kltune.KLPenalty(estimator=KF.kl_k3)
    kls = pull_back(penalty)
    assert kls[-1] > kls[0], kls[::5]  # it even pushes away

"""The arms of the KL experiments (collapse.py, frontier.py): one definition, shared runs.

Every arm: 16 completions per iteration (8 prompts × 2) of exactly 32 tokens (EOS
is an ordinary token, so a penalty summed over tokens cannot be escaped by ending
early), the KL penalty's default (k1 in the reward), lr 1e-4. An arm's runs live
in ``<out>/<arm name>/seed<N>``, so both scripts reuse each other's finished runs.
"""

import dataclasses

from experiment import Arm

import kltune

TOKENS = 32
#: The collapse arms' controller target (nats per completion): above the KL that
#: the noise of 16-completion gradients alone produces at lr 1e-4 (~9–11 nats over
#: 32 tokens), below where beta = 0 collapses (30–95 nats).
TARGET = 15.0


def _fixed_length(arm: Arm) -> Arm:
    return dataclasses.replace(arm, max_new_tokens=TOKENS, stop_at_eos=False)


def fixed(beta: float) -> Arm:
    name = "beta=0" if beta == 0 else f"fixed beta={beta:g}"
    return _fixed_length(Arm(name=name, controller=lambda: kltune.FixedKLController(beta=beta)))


def adaptive(target: float) -> Arm:
    name = "adaptive KL" if target == TARGET else f"adaptive KL target {target:g}"
    # the default horizon (32 completions): beta may move 10% per iteration at 16
    controller = lambda: kltune.AdaptiveKLController(beta=0.1, target=target)  # noqa: E731
    return _fixed_length(Arm(name=name, controller=controller))


def constraint(target: float) -> Arm:
    name = "KL constraint" if target == TARGET else f"KL constraint target {target:g}"
    controller = lambda: kltune.ConstraintKLController(  # noqa: E731
        beta=0.1, target=target, step_size=0.05
    )
    return _fixed_length(Arm(name=name, controller=controller))


#: beta = 0 against a fixed, an adaptive and a constrained penalty.
COLLAPSE = [fixed(0.0), fixed(0.2), adaptive(TARGET), constraint(TARGET)]
#: The reward–KL frontier: a sweep of fixed beta from collapse to no movement, and
#: both controllers at three targets.
FRONTIER = [
    fixed(0.0),
    fixed(0.05),
    fixed(0.1),
    fixed(0.2),
    fixed(0.5),
    fixed(1.0),
    *(adaptive(t) for t in (10.0, TARGET, 25.0)),
    *(constraint(t) for t in (10.0, TARGET, 25.0)),
]

r"""KL control: who owns β, and where the KL penalty goes.

A :class:`KLController` holds the KL coefficient β and returns a new controller
from each observation of the KL (it never changes in place). The loop rebinds it
on its own line::

    controller = controller.update(observed_kl, n_samples)

=============================== ==========================================================
controller                      update of β after observing the KL
=============================== ==========================================================
:class:`FixedKLController`      none
:class:`AdaptiveKLController`   proportional, multiplicative, toward a target KL (Ziegler
                                et al. 2019)
:class:`ConstraintKLController` dual ascent: β is the Lagrange multiplier of KL ≤ target
=============================== ==========================================================

State is plain data: ``state_dict()`` gives numbers and a ``"kind"`` string, and
:func:`controller_from_state` rebuilds the controller. :class:`KLPenalty` says
where the penalty goes: into the per-token reward (the default) or into the loss.
"""

import dataclasses
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, final, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from kltune.functional import kl_k3

__all__ = [
    "AdaptiveKLController",
    "ConstraintKLController",
    "FixedKLController",
    "KLController",
    "KLPenalty",
    "controller_from_state",
]


# runtime_checkable only so that beartype (which checks annotations during the tests) can
# use KLController in annotations: isinstance then tests that the members exist.
@runtime_checkable
class KLController(Protocol):
    """Owns the KL coefficient β; each update returns a new controller.

    Implement ``beta``, ``update`` and ``state_dict``; a frozen dataclass is the
    natural shape. ``update`` must leave ``self`` unchanged.
    """

    @property
    def beta(self) -> float:
        """The current KL coefficient β ≥ 0."""
        ...

    def update(self, observed_kl: float, n_samples: int) -> "KLController":
        """Return the controller after observing a mean KL over ``n_samples`` completions."""
        ...

    def state_dict(self) -> dict[str, float | str]:
        """The state as plain numbers plus a ``"kind"`` string."""
        ...


def _check_nonnegative(value: float, *, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _check_positive(value: float, *, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_observation(observed_kl: float, n_samples: int) -> None:
    if not math.isfinite(observed_kl):
        raise ValueError(
            f"observed_kl must be finite, got {observed_kl}; a NaN or infinite KL usually "
            "means the policy put ~0 probability on a sampled token"
        )
    if isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples}")


def _state(controller: object, kind: str) -> dict[str, float | str]:
    state: dict[str, float | str] = {"kind": kind}
    for field in dataclasses.fields(controller):  # type: ignore[arg-type]
        state[field.name] = float(getattr(controller, field.name))
    return state


@final
@dataclass(frozen=True)
class FixedKLController:
    """A constant β.

    Args:
        beta: the KL coefficient, ≥ 0 (0 switches the penalty off).

    Example:
        >>> controller = FixedKLController(beta=0.1)
        >>> controller.update(observed_kl=5.0, n_samples=64).beta
        0.1
        >>> controller.state_dict()
        {'kind': 'fixed', 'beta': 0.1}
    """

    kind: ClassVar[str] = "fixed"
    beta: float

    def __post_init__(self) -> None:
        _check_nonnegative(self.beta, name="beta")

    def update(self, observed_kl: float, n_samples: int) -> "FixedKLController":
        """Return an equal controller (a new object); the inputs are only validated."""
        _check_observation(observed_kl, n_samples)
        return dataclasses.replace(self)

    def state_dict(self) -> dict[str, float | str]:
        """``{"kind": "fixed", "beta": β}``."""
        return _state(self, self.kind)


@final
@dataclass(frozen=True)
class AdaptiveKLController:
    r"""Proportional control of β toward a target KL (Ziegler et al., 2019).

    .. math::
        e = \operatorname{clip}\!\left(\frac{\mathrm{KL}}{\mathrm{KL}_\text{target}} - 1,
            -0.2,\ 0.2\right), \qquad
        \beta \leftarrow \beta \left(1 + e\,\frac{n}{H}\right)

    with :math:`n` the number of completions the KL was measured on and
    :math:`H` the horizon. β rises when the KL is above target and falls when it
    is below, by at most a factor :math:`1 \pm 0.2\,n/H` per update: closing a
    20 % error takes about :math:`H` completions. The target is not a
    constraint; the KL oscillates around it.

    Args:
        beta: initial β > 0 (a multiplicative update never leaves 0).
        target: the target KL in nats, > 0.
        horizon: :math:`H` in completions, > 0.

    Raises:
        ValueError: an argument is out of range; in :meth:`update`, a non-finite
            KL, ``n_samples < 1``, or ``n_samples >= 5 * horizon`` (the factor
            could reach 0 or below, which would make β 0 forever or negative).

    Example:
        >>> controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
        >>> round(controller.update(observed_kl=9.0, n_samples=512).beta, 8)  # e = +0.2
        0.101024
        >>> round(controller.update(observed_kl=5.4, n_samples=512).beta, 8)  # e = -0.1
        0.099488

    References:
        Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019,
        https://arxiv.org/abs/1909.08593.
    """

    kind: ClassVar[str] = "adaptive"
    beta: float
    target: float
    horizon: int = 10000

    def __post_init__(self) -> None:
        _check_positive(self.beta, name="beta")
        _check_positive(self.target, name="target")
        if isinstance(self.horizon, bool) or self.horizon <= 0:
            raise ValueError(f"horizon must be an int > 0, got {self.horizon}")

    def update(self, observed_kl: float, n_samples: int) -> "AdaptiveKLController":
        """Return the controller with β moved by the rule above; ``self`` is unchanged."""
        _check_observation(observed_kl, n_samples)
        if n_samples >= 5 * self.horizon:
            raise ValueError(
                f"n_samples ({n_samples}) must be < 5 * horizon ({5 * self.horizon}): "
                "the factor 1 - 0.2 * n_samples / horizon would reach 0 or below"
            )
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        return dataclasses.replace(self, beta=self.beta * (1.0 + error * n_samples / self.horizon))

    def state_dict(self) -> dict[str, float | str]:
        """``{"kind": "adaptive", "beta": β, "target": ..., "horizon": ...}``, numbers as floats."""
        return _state(self, self.kind)


@final
@dataclass(frozen=True)
class ConstraintKLController:
    r"""β as the Lagrange multiplier of the constraint KL ≤ target, moved by dual ascent.

    The policy maximises the Lagrangian

    .. math::
        \mathcal{L}(\pi, \beta) = \mathbb{E}_\pi[s]
            - \beta\,\bigl(\mathrm{KL}(\pi\|\pi_\text{ref}) - \mathrm{KL}_\text{target}\bigr)

    and the controller takes a projected gradient step on β against it:

    .. math::
        \beta \leftarrow \min\!\bigl(\beta_\text{max},\
            \max(0,\ \beta + \eta\,(\mathrm{KL} - \mathrm{KL}_\text{target}))\bigr)

    :math:`-(\mathrm{KL} - \mathrm{KL}_\text{target})` is the gradient of the
    dual function in β, so this is projected gradient descent on the (convex)
    dual. While the KL is above target, β grows; below it, β shrinks, down to
    exactly 0 when the constraint is inactive (the penalty switches off, unlike
    the adaptive controller, which keeps pulling toward the target from
    below). At a fixed point either KL = target, or β = 0 and KL ≤ target.

    The step size :math:`\eta` is in units of β per nat: β moves by ``step_size``
    for each nat of constraint violation, per update. Pick it so that one
    update moves β by a fraction of its typical value for a typical violation:
    with β around 0.1 and violations around 0.5 nat, ``step_size`` ≈ 0.02–0.1.
    Too large a step makes the KL oscillate around the target; too small a
    step lets the constraint be violated for many updates.

    Args:
        beta: initial β ≥ 0.
        target: the KL bound in nats, > 0.
        step_size: :math:`\eta` > 0, in β per nat.
        beta_max: upper bound on β (default no bound); bounding the multiplier
            keeps a target the policy cannot reach from driving β to infinity.

    Raises:
        ValueError: an argument is out of range (β < 0 or > ``beta_max``,
            ``target`` ≤ 0, ``step_size`` ≤ 0, ``beta_max`` ≤ 0 or NaN); in
            :meth:`update`, a non-finite KL or ``n_samples < 1``.

    Example:
        >>> controller = ConstraintKLController(beta=0.1, target=2.0, step_size=0.05)
        >>> controller.update(observed_kl=3.0, n_samples=64).beta  # 0.1 + 0.05 * (3 - 2)
        0.15000000000000002
        >>> controller.update(observed_kl=0.0, n_samples=64).beta  # max(0, 0.1 - 0.05 * 2)
        0.0

    Notes:
        ``n_samples`` does not enter the update: each update is one dual step,
        whatever the batch size. Average the KL over the batch before calling.

    References:
        S. Boyd and L. Vandenberghe, "Convex Optimization", 2004, section 5
        (Lagrange duality); the constrained-RL use of the rule: Tessler et al.,
        "Reward Constrained Policy Optimization", 2019, https://arxiv.org/abs/1805.11074.
    """

    kind: ClassVar[str] = "constraint"
    beta: float
    target: float
    step_size: float
    beta_max: float = math.inf

    def __post_init__(self) -> None:
        _check_nonnegative(self.beta, name="beta")
        _check_positive(self.target, name="target")
        _check_positive(self.step_size, name="step_size")
        if math.isnan(self.beta_max) or self.beta_max <= 0:
            raise ValueError(f"beta_max must be > 0 (inf for no bound), got {self.beta_max}")
        if self.beta > self.beta_max:
            raise ValueError(f"beta ({self.beta}) must be <= beta_max ({self.beta_max})")

    def update(self, observed_kl: float, n_samples: int) -> "ConstraintKLController":
        """Return the controller after one projected dual step; ``self`` is unchanged."""
        _check_observation(observed_kl, n_samples)
        beta = self.beta + self.step_size * (observed_kl - self.target)
        return dataclasses.replace(self, beta=min(self.beta_max, max(0.0, beta)))

    def state_dict(self) -> dict[str, float | str]:
        """``{"kind": "constraint"}`` plus ``beta``, ``target``, ``step_size``, ``beta_max``."""
        return _state(self, self.kind)


_CONTROLLERS = types.MappingProxyType(
    {cls.kind: cls for cls in (FixedKLController, AdaptiveKLController, ConstraintKLController)}
)


def controller_from_state(
    state: Mapping[str, float | str],
) -> FixedKLController | AdaptiveKLController | ConstraintKLController:
    """Rebuild a shipped controller from its ``state_dict()``.

    Args:
        state: a dict with a ``"kind"`` key (``"fixed"``, ``"adaptive"`` or
            ``"constraint"``) and the controller's fields as numbers.

    Returns:
        A controller equal to the one that produced ``state``.

    Raises:
        ValueError: unknown kind, missing or unexpected keys, a non-integral
            ``horizon``, or a value out of range.

    Example:
        >>> controller = AdaptiveKLController(beta=0.1, target=6.0)
        >>> controller_from_state(controller.state_dict()) == controller
        True
    """
    kind = state.get("kind")
    if kind not in _CONTROLLERS:
        raise ValueError(f"unknown controller kind {kind!r}; expected one of {list(_CONTROLLERS)}")
    cls = _CONTROLLERS[str(kind)]
    types_by_name = {field.name: field.type for field in dataclasses.fields(cls)}
    given = {key: value for key, value in state.items() if key != "kind"}
    if set(given) != set(types_by_name):
        raise ValueError(
            f"a {kind!r} controller state needs keys {sorted(types_by_name)}, got {sorted(given)}"
        )
    kwargs: dict[str, float | int] = {}
    for name, value in given.items():
        number = float(value)
        if types_by_name[name] is int:
            if not number.is_integer():
                raise ValueError(f"{name} must be a whole number, got {value}")
            kwargs[name] = int(number)
        else:
            kwargs[name] = number
    return cls(**kwargs)  # type: ignore[arg-type]


@final
@dataclass(frozen=True)
class KLPenalty:
    r"""Where the KL penalty goes, and which estimator computes it.

    Two placements of the same penalty :math:`\beta\,\mathrm{KL}(\pi\|\pi_\text{ref})`:

    - **in the reward** (``in_loss=False``, the default; Ziegler et al. 2019,
      InstructGPT): :meth:`reward_kl` estimates the KL per token from the
      rollout's *behaviour* logprobs, detached, and the loop shapes the rewards
      :math:`r_t = -\beta\,k_t` (plus the score on the last token, see
      :func:`kltune.functional.shaped_rewards`). The penalty then reaches the
      policy through the returns and advantages, with the PPO clipping. Use an
      estimator whose *value* is unbiased: :func:`~kltune.functional.kl_k3`
      (default, ≥ 0, low variance) or :func:`~kltune.functional.kl_k1`.
    - **in the loss** (``in_loss=True``; GRPO): :meth:`loss_kl` estimates it from
      the *current* logprobs, with gradient, and the objective adds
      :math:`\beta \cdot \operatorname{mean}_t k_t` to the loss. Here what
      matters is the estimator's *gradient*:

      .. math::
          \mathbb{E}_{y\sim\pi}[\nabla k_2] = \nabla\,\mathrm{KL}(\pi\|\pi_\text{ref}),\quad
          \mathbb{E}_{y\sim\pi}[\nabla k_3] = \nabla\,\mathrm{KL}(\pi_\text{ref}\|\pi),\quad
          \mathbb{E}_{y\sim\pi}[\nabla k_1] = 0

      so use :func:`~kltune.functional.kl_k3_st` (k3's value, k2's gradient) or
      :func:`~kltune.functional.kl_k2`.

    .. warning::
        With ``in_loss=True`` the default estimator :func:`~kltune.functional.kl_k3`
        gives a **biased** gradient (that of the forward KL(π_ref ‖ π)), and
        :func:`~kltune.functional.kl_k1` gives **zero** gradient in expectation:
        the penalty silently does nothing. Pass ``estimator=kl_k3_st`` or ``kl_k2``.

    Args:
        estimator: per-token KL estimate ``(logprobs, ref_logprobs) -> kl``, e.g.
            from :mod:`kltune.functional`.
        in_loss: False to penalise in the reward, True in the loss. Both methods
            work either way (the loop logs :meth:`reward_kl` in both cases); this
            flag tells the loop which one enters the objective.

    Example:
        >>> import torch
        >>> from kltune.functional import kl_k3_st
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]])).requires_grad_()
        >>> ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]]))
        >>> KLPenalty().reward_kl(lp, ref)
        tensor([[0.0000, 0.1931, 0.3069],
                [0.3069, 0.0000, 0.1931]])
        >>> KLPenalty(estimator=kl_k3_st, in_loss=True).loss_kl(lp, ref).requires_grad
        True

    Notes:
        Over several PPO epochs the samples come from the behaviour policy, not
        the current one, so the loss-side expectation above holds exactly only
        in the first epoch; like GRPO, no importance weight is applied.

    References:
        J. Schulman, "Approximating KL Divergence", 2020,
        http://joschu.net/blog/kl-approx.html; Shao et al., "DeepSeekMath"
        (GRPO), 2024, https://arxiv.org/abs/2402.03300.
    """

    estimator: Callable[[Tensor, Tensor], Tensor] = kl_k3
    in_loss: bool = False

    def __post_init__(self) -> None:
        if not callable(self.estimator):
            raise TypeError(
                "estimator must be a function (logprobs, ref_logprobs) -> per-token KL, "
                f"e.g. kltune.functional.kl_k3; got {self.estimator!r}"
            )

    def reward_kl(
        self, old_logprobs: Float[Tensor, "B T"], ref_logprobs: Float[Tensor, "B T"]
    ) -> Float[Tensor, "B T"]:
        r"""Per-token KL for the reward, from the behaviour logprobs; no gradient.

        .. math::
            k_t = \operatorname{sg}\bigl(k(\log\pi_\text{old}(y_t), \log\pi_\text{ref}(y_t))\bigr)

        Args:
            old_logprobs: log π_old of the response tokens, recorded at rollout.
            ref_logprobs: log π_ref of the same tokens.

        Returns:
            The detached per-token estimate (padding is not masked here).
        """
        return self.estimator(old_logprobs.detach(), ref_logprobs.detach())

    def loss_kl(
        self, logprobs: Float[Tensor, "B T"], ref_logprobs: Float[Tensor, "B T"]
    ) -> Float[Tensor, "B T"]:
        r"""Per-token KL for the loss, from the current logprobs; gradient flows into them.

        .. math::
            k_t = k(\log\pi_\theta(y_t), \operatorname{sg}(\log\pi_\text{ref}(y_t)))

        Args:
            logprobs: log π_θ of the response tokens under the current policy.
            ref_logprobs: log π_ref of the same tokens (detached: the reference
                is never trained).

        Returns:
            The per-token estimate; average it over real tokens, times β, into the loss.
        """
        return self.estimator(logprobs, ref_logprobs.detach())

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
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, final, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

import kltune.functional as KF
from kltune._checks import check_count, check_nonnegative, check_positive
from kltune.rollout import NextTokenHead

__all__ = [
    "AdaptiveKLController",
    "ConstraintKLController",
    "FixedKLController",
    "KLController",
    "KLPenalty",
    "KLPenaltyWarning",
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


def _check_observation(observed_kl: float, n_samples: int) -> None:
    if not math.isfinite(observed_kl):
        raise ValueError(
            f"observed_kl must be finite, got {observed_kl}; a NaN or infinite KL usually "
            "means the policy put ~0 probability on a sampled token"
        )
    check_count(n_samples, name="n_samples")


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
        check_nonnegative(self.beta, name="beta")

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

    The default horizon, 32 completions, lets β move by up to ±10 % per
    iteration at 16 completions per iteration and ±40 % at 64, so that it can
    follow the KL within tens of iterations at the batch sizes a CPU or one GPU
    runs. Ziegler et al.'s 10 000 was for batches of 512 over thousands of
    iterations; at 16 completions it makes β all but constant (a KL 10× the
    target for 10 iterations moves β by 0.3 %).

    Args:
        beta: initial β > 0 (a multiplicative update never leaves 0).
        target: the target KL in nats per completion, > 0.
        horizon: :math:`H` in completions, > 0.

    Raises:
        ValueError: an argument is out of range; in :meth:`update`, a non-finite
            KL, ``n_samples < 1``, or ``n_samples >= 5 * horizon`` (the factor
            could reach 0 or below, which would make β 0 forever or negative).

    Example:
        >>> controller = AdaptiveKLController(beta=0.1, target=6.0)  # horizon 32
        >>> round(controller.update(observed_kl=9.0, n_samples=16).beta, 8)  # e = +0.2
        0.11
        >>> round(controller.update(observed_kl=5.4, n_samples=16).beta, 8)  # e = -0.1
        0.095

    References:
        Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019,
        https://arxiv.org/abs/1909.08593.
    """

    kind: ClassVar[str] = "adaptive"
    beta: float
    target: float
    horizon: int = 32

    def __post_init__(self) -> None:
        check_positive(self.beta, name="beta")
        check_positive(self.target, name="target")
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

        At the start of a run the policy is the reference and the KL is 0: the
        constraint is slack, so β falls by ``step_size * target`` per update,
        to 0 with the defaults of the example above, and stays there until the
        KL first exceeds the target. The first iterations then train without a
        penalty and the KL overshoots the target once. Choose ``step_size *
        target < beta`` to keep a penalty from the start.

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
        check_nonnegative(self.beta, name="beta")
        check_positive(self.target, name="target")
        check_positive(self.step_size, name="step_size")
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


Placement = Literal["reward", "loss", "reward+loss"]

#: What each (estimator, placement) gives as the policy's expected gradient, on-policy,
#: for a penalty β·KL(π‖π_ref) summed over the tokens of a completion. Derived in the
#: docs' KL-estimator page and checked by exact enumeration in tests/test_kl_matrix.py.
GRADIENTS: Mapping[tuple[str, str], str] = types.MappingProxyType(
    {
        ("kl_k1", "reward"): "∇KL(π‖π_ref), unbiased",
        ("kl_k1", "loss"): "zero",
        ("kl_k1", "reward+loss"): "∇KL(π‖π_ref), unbiased (the loss part adds nothing)",
        ("kl_k2", "reward"): "biased: a score-function gradient of E[k2], not ∇KL",
        ("kl_k2", "loss"): "token-local ∇KL(π‖π_ref): each visited state's KL, states held fixed",
        ("kl_k2", "reward+loss"): (
            "biased: token-local ∇KL(π‖π_ref) plus k2's biased score-function term"
        ),
        ("kl_k3", "reward"): "biased: ∇KL(π‖π_ref) − ∇KL(π_ref‖π) per token, ~0 near π_ref",
        ("kl_k3", "loss"): "token-local ∇KL(π_ref‖π): the forward KL",
        ("kl_k3", "reward+loss"): (
            "∇KL(π‖π_ref), unbiased: the loss's ∇KL(π_ref‖π) cancels the reward's"
        ),
        ("kl_k3_st", "reward"): "biased: as kl_k3 (same value)",
        ("kl_k3_st", "loss"): "token-local ∇KL(π‖π_ref), as kl_k2",
        ("kl_k3_st", "reward+loss"): (
            "biased: ∇KL(π‖π_ref) plus the token-local ∇KL(π‖π_ref) − ∇KL(π_ref‖π)"
        ),
        ("kl_exact", "reward"): "only the effect on later tokens' KL (zero for one token)",
        ("kl_exact", "loss"): "token-local ∇KL(π‖π_ref), no sampling noise",
        ("kl_exact", "reward+loss"): "∇KL(π‖π_ref), unbiased",
    }
)

#: Cells whose expected gradient is ∇KL(π‖π_ref) of the whole completion, or its
#: token-local part (which equals it for one-token completions and still pulls each
#: visited state toward π_ref): the combinations KLPenalty accepts without a warning.
SOUND = frozenset(
    {
        ("kl_k1", "reward"),
        ("kl_k1", "reward+loss"),
        ("kl_k2", "loss"),
        ("kl_k3", "reward+loss"),
        ("kl_k3_st", "loss"),
        ("kl_exact", "loss"),
        ("kl_exact", "reward+loss"),
    }
)

#: The estimator a placement gets when none is named.
DEFAULT_ESTIMATOR: Mapping[str, str] = types.MappingProxyType(
    {"reward": "kl_k1", "loss": "kl_k3_st", "reward+loss": "kl_exact"}
)

_ESTIMATORS: Mapping[str, Callable[..., Tensor]] = types.MappingProxyType(
    {
        "kl_k1": KF.kl_k1,
        "kl_k2": KF.kl_k2,
        "kl_k3": KF.kl_k3,
        "kl_k3_st": KF.kl_k3_st,
        "kl_exact": KF.kl_exact,
    }
)


class KLPenaltyWarning(UserWarning):
    """A KL penalty whose expected gradient does not pull the policy toward π_ref."""


def _name_of(estimator: Callable[..., Tensor]) -> str | None:
    """The shipped estimator's name, or None for a user's own function."""
    for name, fn in _ESTIMATORS.items():
        if estimator is fn:
            return name
    return None


@final
@dataclass(frozen=True)
class KLPenalty:
    r"""The KL penalty: which estimator computes it and where it enters PPO.

    What makes a penalty work is the gradient it gives the policy, not whether
    the estimator's *value* is unbiased. For a completion :math:`y \sim \pi` of
    tokens :math:`y_t` with :math:`\Delta_t = \log\pi(y_t) - \log\pi_\text{ref}(y_t)`:

    - **in the reward** (``placement="reward"``, the default; Ziegler et al.
      2019, InstructGPT): each token's reward gets :math:`-\beta k_t`, detached,
      and the penalty reaches the policy through reward-to-go and the advantages,
      so the gradient is the score-function one,
      :math:`\mathbb{E}[\sum_t \nabla\log\pi(y_t) \sum_{t'\ge t} k_{t'}]`. With
      :math:`k = \Delta` (:func:`~kltune.functional.kl_k1`) that is exactly
      :math:`\nabla\,\mathrm{KL}(\pi\|\pi_\text{ref})` of the completion, including
      a token's effect on the KL of the tokens after it. k3 in the reward gives
      :math:`\nabla\mathrm{KL}(\pi\|\pi_\text{ref}) - \nabla\mathrm{KL}(\pi_\text{ref}\|\pi)`
      per token, which nearly cancels near the reference: almost no pull.
    - **in the loss** (``placement="loss"``; GRPO): :math:`\beta \operatorname{agg}(k_t)`
      joins the loss with gradient. k2 and k3 straight-through give
      :math:`\mathbb{E}[\Delta_t \nabla\log\pi(y_t)]`: the gradient of each
      visited state's KL with the states held fixed (token-local; exact for
      one-token completions, it misses the effect on later tokens). k1 gives
      zero, k3 the gradient of the forward KL(π_ref ‖ π).
    - **the exact KL** (:func:`~kltune.functional.kl_exact` over the whole
      vocabulary, no sampling noise): in the loss it gives the token-local
      gradient; in the reward only the effect on later tokens (a state's KL does
      not depend on the token drawn there); ``placement="reward+loss"`` gives both,
      the whole :math:`\nabla\,\mathrm{KL}(\pi\|\pi_\text{ref})`. It costs one more
      policy forward per iteration and both output layers again in each minibatch.

    The whole matrix is :data:`GRADIENTS`. Leave ``estimator`` unset to get the
    sound one for the placement (k1 in the reward, k3 straight-through in the
    loss, the exact KL in both); a combination outside :data:`SOUND` warns
    (:class:`KLPenaltyWarning`) naming the better choice, unless
    ``allow_biased=True`` says it is meant (an ablation). A user's own estimator
    function is not classified and never warns.

    Args:
        estimator: per-token KL ``(logprobs, ref_logprobs) -> kl`` (e.g. from
            :mod:`kltune.functional`), or :func:`kltune.functional.kl_exact`; None
            for the placement's default.
        placement: ``"reward"``, ``"loss"`` or ``"reward+loss"``.
        importance_weighted: in the loss, weight each token's term by the
            detached ratio :math:`\rho_t = \pi_\theta(y_t)/\pi_\text{old}(y_t)`,
            so that in later PPO epochs (samples from the behaviour policy, not the
            current one) the expected gradient is still the current policy's
            (TRL's bias-corrected KL, NeMo-RL's on-policy KL). ρ = 1 in the first
            epoch, so that epoch is unchanged. It corrects the token's own
            distribution, not that of the states before it. No effect on the
            exact KL (nothing is sampled at the token).
        allow_biased: accept a combination outside :data:`SOUND` without a warning.

    Raises:
        TypeError: ``estimator`` is not callable.
        ValueError: an unknown placement.

    Example:
        >>> import torch
        >>> KLPenalty().estimator is KF.kl_k1
        True
        >>> KLPenalty(placement="loss").estimator is KF.kl_k3_st
        True
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
        >>> ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]]))
        >>> KLPenalty().reward_kl(lp, ref)
        tensor([[ 0.0000,  0.6931, -0.6931],
                [-0.6931,  0.0000,  0.6931]])

    References:
        J. Schulman, "Approximating KL Divergence", 2020,
        http://joschu.net/blog/kl-approx.html; Ziegler et al. 2019,
        https://arxiv.org/abs/1909.08593; Shao et al., "DeepSeekMath" (GRPO),
        2024, https://arxiv.org/abs/2402.03300.
    """

    estimator: Callable[..., Tensor] | None = None
    placement: Placement = "reward"
    importance_weighted: bool = True
    allow_biased: bool = False

    def __post_init__(self) -> None:
        if self.placement not in DEFAULT_ESTIMATOR:
            raise ValueError(
                f"placement must be one of {list(DEFAULT_ESTIMATOR)}, got {self.placement!r}"
            )
        if self.estimator is None:
            default = _ESTIMATORS[DEFAULT_ESTIMATOR[self.placement]]
            object.__setattr__(self, "estimator", default)
        if not callable(self.estimator):
            raise TypeError(
                "estimator must be a function (logprobs, ref_logprobs) -> per-token KL, "
                f"e.g. kltune.functional.kl_k1; got {self.estimator!r}"
            )
        name = _name_of(self.estimator)
        if name is not None and (name, self.placement) not in SOUND and not self.allow_biased:
            cell = (name, self.placement)
            better = DEFAULT_ESTIMATOR[self.placement]
            if name == "kl_exact" and self.placement == "reward":
                advice = "placement='reward+loss' for the exact KL"
            elif self.placement == "reward+loss":
                advice = "placement='reward' with kl_k1, or kl_exact in 'reward+loss'"
            else:
                advice = f"estimator={better} in the {self.placement}"
            warnings.warn(
                f"KLPenalty({name} in the {self.placement}): its expected gradient is "
                f"{GRADIENTS[cell]}, so the penalty does not pull the policy toward the "
                f"reference as β·KL(π‖π_ref) would. Use {advice} (or KLPenalty() for k1 in "
                "the reward); pass allow_biased=True if this is meant.",
                KLPenaltyWarning,
                stacklevel=3,
            )

    @property
    def name(self) -> str:
        """The estimator's name (``"kl_k1"``, ...; a user's function: its ``__name__``)."""
        assert self.estimator is not None
        return _name_of(self.estimator) or str(getattr(self.estimator, "__name__", "custom"))

    @property
    def exact(self) -> bool:
        """True for the full-vocabulary KL (needs next-token heads, not logprobs)."""
        return self.estimator is KF.kl_exact

    @property
    def in_reward(self) -> bool:
        """The per-token rewards carry −β·k."""
        return self.placement in ("reward", "reward+loss")

    @property
    def in_loss(self) -> bool:
        """The loss carries β·agg(k) with gradient."""
        return self.placement in ("loss", "reward+loss")

    def reward_kl(
        self, old_logprobs: Float[Tensor, "B T"], ref_logprobs: Float[Tensor, "B T"]
    ) -> Float[Tensor, "B T"]:
        r"""Per-token KL from the behaviour logprobs, detached: what the reward carries,
        what is logged and what the controller sees (not for the exact KL: use
        :meth:`exact_kl`).

        Args:
            old_logprobs: log π_old of the response tokens, recorded at rollout.
            ref_logprobs: log π_ref of the same tokens.

        Returns:
            The detached per-token estimate (padding is not masked here).

        Raises:
            TypeError: the estimator is the exact KL, which needs the whole distributions.
        """
        if self.exact:
            raise TypeError("the exact KL needs next-token heads: call exact_kl")
        assert self.estimator is not None
        return self.estimator(old_logprobs.detach(), ref_logprobs.detach())

    def loss_kl(
        self,
        logprobs: Float[Tensor, "B T"],
        ref_logprobs: Float[Tensor, "B T"],
        old_logprobs: Float[Tensor, "B T"] | None = None,
    ) -> Float[Tensor, "B T"]:
        r"""Per-token KL for the loss, from the current logprobs; gradient flows into them.

        .. math::
            k_t = \operatorname{sg}(\rho_t)\, k(\log\pi_\theta(y_t), \operatorname{sg}(\log\pi_\text{ref}(y_t)))

        with :math:`\rho_t = \pi_\theta(y_t)/\pi_\text{old}(y_t)` when
        ``importance_weighted`` and ``old_logprobs`` are given, else 1.

        Returns:
            The per-token term; average it over real tokens, times β, into the loss.
        """
        if self.exact:
            raise TypeError("the exact KL needs next-token heads: call exact_kl")
        assert self.estimator is not None
        kl = self.estimator(logprobs, ref_logprobs.detach())
        if self.importance_weighted and old_logprobs is not None:
            kl = torch.exp(logprobs.detach() - old_logprobs.detach()) * kl
        return kl

    @staticmethod
    def exact_kl(
        head: NextTokenHead, ref_head: NextTokenHead, temperature: float
    ) -> Float[Tensor, "B T"]:
        """The exact per-position KL(π ‖ π_ref) from two next-token heads, in chunks;
        gradient flows into ``head`` when it has one."""
        return KF.kl_exact_from_hidden(
            head.hidden,
            head.weight,
            ref_head.hidden,
            ref_head.weight,
            temperature,
            bias=head.bias,
            ref_bias=ref_head.bias,
        )

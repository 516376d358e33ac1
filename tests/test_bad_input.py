"""Hostile inputs to every public entry point: a clear error or a documented behaviour.

A clear error is an exception of a sensible type (ValueError for a bad value or
shape, TypeError for a bad type, IndexError for an index out of range) whose
message names the argument and what was expected; never an IndexError or a
RuntimeError from deep inside torch or transformers. A documented behaviour
(an empty batch maps to an empty result, a row with no real token gives 0) is
asserted here and stated in the function's docstring.

Under the tests' jaxtyping/beartype hook an annotation may reject a bad shape or
type first, with a TypeError of its own; users run without the hook, so every
refusal is also checked without it, where the library's own check must speak.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor

import kltune
import kltune.functional as KF
from helpers import synthetic_rollout, tiny_blocks
from kltune import Rollout, RolloutBuffer
from kltune.loading import byte_tokenizer, prepare_tokenizer
from kltune.loop import Sampling, Updates, optimise, ppo_iteration
from kltune.rewards import score_completions
from strategies import fewer_examples, right_padded_masks, shapes, without_runtime_typecheck

NAN, INF = math.nan, math.inf
F64 = torch.float64
HOOK_ERROR = r"Type-check error|violates type hint"


def _refused(call: Callable[[], Any], error: type[Exception], match: str) -> None:
    """``call`` raises ``error`` matching ``match`` as users run it (no hook).

    With the tests' hook, an annotation may refuse first (a TypeError of its own).
    """
    errors: tuple[type[Exception], ...] = (error, TypeError)
    with pytest.raises(errors, match=rf"{match}|{HOOK_ERROR}"):
        call()
    with without_runtime_typecheck(), pytest.raises(error, match=match):
        call()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(lengths: list[int], width: int) -> Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@pytest.fixture(scope="module")
def policy() -> kltune.Policy:
    # Never trained here, so one policy serves the whole module.
    return kltune.Policy(*kltune.tiny_random_model("llama"))


# =========================================================================== functional: empty batches


def _empty_cases(b: int, t: int) -> dict[str, Callable[[], Any]]:
    v = 5
    x, m = torch.zeros(b, t), torch.ones(b, t, dtype=torch.bool)
    logits, tokens = torch.zeros(b, t, v), torch.zeros(b, t, dtype=torch.long)
    return {
        "logprobs_from_logits": lambda: KF.logprobs_from_logits(logits, tokens),
        "entropy_from_logits": lambda: KF.entropy_from_logits(logits),
        "kl_exact": lambda: KF.kl_exact(logits, logits),
        "kl_k1": lambda: KF.kl_k1(x, x),
        "kl_k2": lambda: KF.kl_k2(x, x),
        "kl_k3": lambda: KF.kl_k3(x, x),
        "kl_k3_st": lambda: KF.kl_k3_st(x, x),
        "reward_to_go": lambda: KF.reward_to_go(x, m),
        "gae": lambda: KF.gae(x, x, m)[0],
        "gae_returns": lambda: KF.gae(x, x, m)[1],
        "clipped_surrogate_loss": lambda: KF.clipped_surrogate_loss(x, x, x),
        "clipped_value_loss": lambda: KF.clipped_value_loss(x, x, x),
        "entropy_bonus": lambda: KF.entropy_bonus(x),
    }


@pytest.mark.parametrize(("b", "t"), [(0, 3), (2, 0), (0, 0)], ids=["B=0", "T=0", "B=T=0"])
@pytest.mark.parametrize("name", sorted(_empty_cases(1, 1)))
def test_per_token_functions_map_an_empty_batch_to_an_empty_result(
    name: str, b: int, t: int
) -> None:
    # Documented: an empty batch in, an empty [B, T] float32 result out (torch's own
    # convention for elementwise maps), where torch.cat([]) or x[:, 0] used to crash.
    out = _empty_cases(b, t)[name]()
    assert out.shape == (b, t) and out.dtype == torch.float32


@pytest.mark.parametrize("b", [0, 2])
def test_shaped_rewards_of_an_empty_batch_is_empty(b: int) -> None:
    # B = 0: nothing to shape, an empty result. B = 2 with T = 0: every row lacks the
    # last token that carries the score, which is refused, naming the rows.
    mask = torch.zeros(b, 0, dtype=torch.bool)
    if b == 0:
        assert KF.shaped_rewards(torch.zeros(0), torch.zeros(0, 0), mask, 0.1).shape == (0, 0)
        assert KF.shaped_rewards(torch.zeros(0), torch.zeros(0, 4), _mask([], 4), 0.1).shape == (
            0,
            4,
        )
    else:
        with pytest.raises(ValueError, match=r"mask has rows with no real token: rows \[0, 1\]"):
            KF.shaped_rewards(torch.zeros(b), torch.zeros(b, 0), mask, 0.1)


def test_masked_sum_of_nothing_is_zero() -> None:
    # Documented: the empty sum is 0 (an all-False mask, or an empty batch).
    assert float(KF.masked_sum(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool))) == 0.0
    x = torch.full((2, 3), 7.0)
    assert float(KF.masked_sum(x, torch.zeros(2, 3, dtype=torch.bool))) == 0.0


def _reductions(b: int) -> dict[str, tuple[Callable[[], Any], str]]:
    x, m = torch.zeros(b, 3), torch.ones(b, 3, dtype=torch.bool)
    s = torch.zeros(b)
    nothing = r"mask selects no element of a tensor of shape \(0, 3\)"
    return {
        "masked_mean": (lambda: KF.masked_mean(x, m), nothing),
        "masked_var": (lambda: KF.masked_var(x, m), nothing),
        "masked_whiten": (lambda: KF.masked_whiten(x, m), nothing),
        "token_mean": (lambda: KF.token_mean(x, m), nothing),
        "sequence_mean": (lambda: KF.sequence_mean(x, m), r"loss is an empty batch"),
        "token_sum": (lambda: KF.token_sum(x, m), r"loss is an empty batch"),
        "approx_kl": (lambda: KF.approx_kl(x, x, m), nothing),
        "clip_fraction": (lambda: KF.clip_fraction(x, x, m), nothing),
        "explained_variance": (lambda: KF.explained_variance(x, x, m), nothing),
        "value_regression_loss": (
            lambda: KF.value_regression_loss(s, s),
            r"predictions is an empty batch",
        ),
        "rloo_advantages": (lambda: KF.rloo_advantages(s, 2), r"scores is an empty batch"),
        "grpo_advantages": (lambda: KF.grpo_advantages(s, 2), r"scores is an empty batch"),
        "within_group_var": (lambda: KF.within_group_var(s, 2), r"scores is an empty batch"),
    }


@pytest.mark.parametrize("name", sorted(_reductions(0)))
def test_reductions_refuse_an_empty_batch(name: str) -> None:
    # A mean (or a group statistic) of nothing is undefined: a ValueError, not a NaN
    # (sequence_mean used to return NaN for B = 0).
    call, message = _reductions(0)[name]
    with pytest.raises(ValueError, match=message):
        call()


def test_huge_batches_are_handled_in_one_call() -> None:
    # Many rows, cheap maths: chunked logprobs, group advantages and whitening agree
    # with their plain formulas on a batch far larger than the usual.
    g = _gen()
    logits = torch.randn(4096, 16, 7, generator=g)
    tokens = torch.randint(0, 7, (4096, 16), generator=g)
    lp = KF.logprobs_from_logits(logits, tokens, chunk_tokens=1000)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, expected)
    scores = torch.randn(100_000, generator=g)
    assert float(KF.rloo_advantages(scores, 4).reshape(-1, 4).sum(-1).abs().max()) < 1e-4
    w = KF.masked_whiten(lp, torch.ones_like(tokens, dtype=torch.bool))
    assert abs(float(w.mean())) < 1e-4 and abs(float(w.var(unbiased=False)) - 1.0) < 1e-3


# =========================================================================== functional: shapes and dtypes


@dataclasses.dataclass(frozen=True)
class Spec:
    """A functional-core function and the kinds of its tensor arguments, in order."""

    fn: Callable[..., Any]
    args: tuple[tuple[str, str], ...]  # (name, kind) with kind in KINDS


V = 5


def _valid(kind: str, b: int, t: int, g: torch.Generator) -> Tensor:
    if kind == "float":
        return -torch.rand(b, t, generator=g, dtype=F64)
    if kind == "vector":
        return torch.rand(b, generator=g, dtype=F64)
    if kind == "mask":
        return _mask(torch.randint(1, t + 1, (b,), generator=g).tolist(), t)
    if kind == "tokens":
        return torch.randint(0, V, (b, t), generator=g)
    assert kind == "logits"
    return torch.randn(b, t, V, generator=g, dtype=F64)


def _misaligned(x: Tensor) -> Tensor:
    """One more column on the token axis (or one more entry for a [B] vector)."""
    axis = 1 if x.dim() > 1 else 0
    extra = x.narrow(axis, 0, 1)
    return torch.cat([x, extra], dim=axis)


def _wrong_dtype(kind: str, x: Tensor) -> tuple[Tensor, str]:
    """``x`` in a dtype its kind forbids, and the message that must name it."""
    if kind == "mask":
        return x.double(), "must be a bool tensor"
    if kind == "tokens":
        return x.double(), "must be an integer tensor"
    return x.long(), "must be a floating tensor"


SPECS: dict[str, Spec] = {
    "masked_sum": Spec(KF.masked_sum, (("x", "float"), ("mask", "mask"))),
    "masked_mean": Spec(KF.masked_mean, (("x", "float"), ("mask", "mask"))),
    "masked_var": Spec(KF.masked_var, (("x", "float"), ("mask", "mask"))),
    "masked_whiten": Spec(KF.masked_whiten, (("x", "float"), ("mask", "mask"))),
    "logprobs_from_logits": Spec(
        KF.logprobs_from_logits, (("logits", "logits"), ("tokens", "tokens"))
    ),
    "entropy_from_logits": Spec(KF.entropy_from_logits, (("logits", "logits"),)),
    "kl_exact": Spec(KF.kl_exact, (("logits", "logits"), ("ref_logits", "logits"))),
    "kl_exact_from_hidden": Spec(
        lambda h, r: KF.kl_exact_from_hidden(h, None, r, None),
        (("hidden", "logits"), ("ref_hidden", "logits")),
    ),
    **{
        name: Spec(getattr(KF, name), (("logprobs", "float"), ("ref_logprobs", "float")))
        for name in ("kl_k1", "kl_k2", "kl_k3", "kl_k3_st")
    },
    "shaped_rewards": Spec(
        lambda s, k, m: KF.shaped_rewards(s, k, m, 0.1),
        (("scores", "vector"), ("kl", "float"), ("mask", "mask")),
    ),
    "reward_to_go": Spec(KF.reward_to_go, (("rewards", "float"), ("mask", "mask"))),
    "gae": Spec(KF.gae, (("rewards", "float"), ("values", "float"), ("mask", "mask"))),
    "clipped_surrogate_loss": Spec(
        KF.clipped_surrogate_loss,
        (("logprobs", "float"), ("old_logprobs", "float"), ("advantages", "float")),
    ),
    "clipped_value_loss": Spec(
        KF.clipped_value_loss, (("values", "float"), ("old_values", "float"), ("returns", "float"))
    ),
    "value_regression_loss": Spec(
        KF.value_regression_loss, (("predictions", "vector"), ("targets", "vector"))
    ),
    "entropy_bonus": Spec(KF.entropy_bonus, (("entropy", "float"),)),
    **{
        name: Spec(getattr(KF, name), (("loss", "float"), ("mask", "mask")))
        for name in ("token_mean", "sequence_mean", "token_sum")
    },
    **{
        name: Spec(
            getattr(KF, name), (("logprobs", "float"), ("old_logprobs", "float"), ("mask", "mask"))
        )
        for name in ("approx_kl", "clip_fraction")
    },
    "explained_variance": Spec(
        KF.explained_variance, (("values", "float"), ("returns", "float"), ("mask", "mask"))
    ),
    **{
        name: Spec(getattr(KF, name), (("chosen_scores", "vector"), ("rejected_scores", "vector")))
        for name in ("preference_logits", "bradley_terry_loss", "preference_accuracy")
    },
    "dpo_implicit_rewards": Spec(
        lambda lp, ref: KF.dpo_implicit_rewards(lp, ref, beta=0.1),
        (("logprobs", "vector"), ("ref_logprobs", "vector")),
    ),
    "dpo_loss": Spec(
        lambda c, r, rc, rr: KF.dpo_loss(c, r, rc, rr, beta=0.1),
        (
            ("chosen_logprobs", "vector"),
            ("rejected_logprobs", "vector"),
            ("ref_chosen_logprobs", "vector"),
            ("ref_rejected_logprobs", "vector"),
        ),
    ),
}


def test_every_function_of_the_core_is_covered() -> None:
    # A new function joins the shape and dtype properties below by adding one line to SPECS.
    # tested on their own: with group sizes, and best-of-n's [P, M] scores and counts
    # (tests/functional/test_best_of_n.py)
    group = {"rloo_advantages", "grpo_advantages", "within_group_var"}
    group |= {"expected_best_of_n", "best_of_n_kl"}
    # fits over N >= 2 points of √KL >= 0 (tests/functional/test_preferences.py)
    group |= {"overoptimisation_coefficients", "overoptimisation_curve"}
    # any leading shape [*B, V] (tests/functional/test_logprobs.py)
    group |= {"truncated_logits"}
    # Being written alongside this module (functional/_head.py): it does not check its
    # tokens' dtype yet; join it to SPECS once it does.
    # logprobs_from_hidden takes [B, T, D] states and a [V, D] weight, kinds SPECS has
    # not; its bad inputs are tested in tests/functional/test_head.py.
    pending = {"logprobs_from_hidden"}
    assert set(KF.__all__) - group - pending == set(SPECS)


@st.composite
def _calls(draw: st.DrawFn) -> tuple[str, int, int, int, int]:
    """A function, a shape, a seed and which argument to corrupt."""
    name = draw(st.sampled_from(sorted(SPECS)))
    b, t = draw(shapes(max_b=4, max_t=5))
    return name, b, t, draw(st.integers(0, 2**16)), draw(st.integers(0, 2))


def _arguments(name: str, b: int, t: int, seed: int) -> list[Tensor]:
    g = _gen(seed)
    return [_valid(kind, b, t, g) for _, kind in SPECS[name].args]


@given(_calls())
def test_valid_arguments_are_accepted(call: tuple[str, int, int, int, int]) -> None:
    # The baseline of the two properties below: the same calls, uncorrupted, succeed.
    name, b, t, seed, _ = call
    SPECS[name].fn(*_arguments(name, b, t, seed))


@given(_calls())
def test_a_misaligned_argument_is_refused_naming_it(call: tuple[str, int, int, int, int]) -> None:
    # logprobs [B, T] with a mask [B, T + 1], scores [B + 1] with kl [B, T], ...: a
    # ValueError naming the argument and both shapes, never a broadcast or a crash.
    name, b, t, seed, which = call
    spec = SPECS[name]
    if len(spec.args) == 1:  # nothing to be misaligned with
        return
    which %= len(spec.args)
    args = _arguments(name, b, t, seed)
    args[which] = _misaligned(args[which])
    arg_name = spec.args[which][0]
    _refused(lambda: spec.fn(*args), ValueError, rf"{arg_name}.* has shape|{arg_name} has \d")


@given(_calls())
def test_an_argument_of_the_wrong_dtype_is_refused_naming_it(
    call: tuple[str, int, int, int, int],
) -> None:
    # Integer logprobs, float masks (0/1), float token ids: a ValueError naming the
    # argument and its dtype (int logits used to be silently promoted; float tokens
    # crashed in torch.gather).
    name, b, t, seed, which = call
    spec = SPECS[name]
    which %= len(spec.args)
    args = _arguments(name, b, t, seed)
    arg_name, kind = spec.args[which]
    args[which], problem = _wrong_dtype(kind, args[which])
    _refused(lambda: spec.fn(*args), ValueError, rf"{arg_name} {problem}.*, got dtype torch\.")


@pytest.mark.parametrize(
    "name", ["kl_k1", "kl_k3", "clipped_surrogate_loss", "clipped_value_loss", "gae"]
)
def test_float32_mixed_with_float64_is_promoted_as_documented(name: str) -> None:
    # Documented: mixed float dtypes follow torch's promotion (float64 wins), and the
    # values are those of the all-float64 call.
    spec = SPECS[name]
    args = _arguments(name, 3, 4, seed=1)
    mixed = [a.float() if i == 0 else a for i, a in enumerate(args)]
    expected = spec.fn(*[a.double() if a.is_floating_point() else a for a in mixed])
    got = spec.fn(*mixed)
    got, expected = (got[0], expected[0]) if isinstance(got, tuple) else (got, expected)
    assert got.dtype == F64
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: KF.reward_to_go(torch.zeros(3), torch.ones(3, dtype=torch.bool)), r"rewards must have shape \[B T\] \(2 dims\), got shape \(3,\)"),
        (lambda: KF.reward_to_go(torch.zeros(2, 3, 1), torch.ones(2, 3, 1, dtype=torch.bool)), r"rewards must have shape \[B T\] \(2 dims\), got shape \(2, 3, 1\)"),
        (lambda: KF.gae(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool)), r"rewards must have shape \[B T\]"),
        (lambda: KF.sequence_mean(torch.zeros(3), torch.ones(3, dtype=torch.bool)), r"loss must have shape \[B T\] \(2 dims\), got shape \(3,\)"),
        (lambda: KF.token_sum(torch.zeros(3), torch.ones(3, dtype=torch.bool)), r"loss must have shape \[B T\]"),
        (lambda: KF.masked_mean(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), dim=5), r"dim=5 is out of range for x of shape \(2, 3\) \(2 dims\)"),
        (lambda: KF.masked_sum(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), dim=-3), r"dim=-3 is out of range"),
        (lambda: KF.logprobs_from_logits(torch.zeros(2, 3, 0), torch.zeros(2, 3, dtype=torch.long)), r"logits has an empty vocabulary axis \(shape \(2, 3, 0\)\)"),
        (lambda: KF.entropy_from_logits(torch.zeros(2, 3, 0)), r"logits has an empty vocabulary axis"),
        (lambda: KF.logprobs_from_logits(torch.zeros(2, 3, 5), torch.full((2, 3), 9)), r"tokens must be ids in \[0, 5\) \(the vocabulary of logits\), got ids from 9 to 9"),
        (lambda: KF.logprobs_from_logits(torch.zeros(2, 3, 5), torch.full((2, 3), -1)), r"tokens must be ids in \[0, 5\).*from -1 to -1"),
        (lambda: KF.logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), chunk_tokens=0), r"chunk_tokens must be >= 1, got 0"),
        (lambda: KF.kl_exact(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), chunk_tokens=-4), r"chunk_tokens must be >= 1, got -4"),
        (lambda: KF.shaped_rewards(torch.zeros(2, 1), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.1), r"scores must have shape \[B\] \(1 dims\)"),
        (lambda: KF.clipped_surrogate_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2)), r"advantages has shape \(2,\) but logprobs has shape \(2, 3\)"),
    ],
)  # fmt: skip
def test_wrong_ranks_axes_and_ids_name_the_problem(call: Callable[[], Any], message: str) -> None:
    # Each used to be an IndexError or RuntimeError from torch (x[:, 0] on a 1-D
    # tensor, gather out of bounds, reshape of V = 0), or silently accepted (3-D rewards,
    # chunk_tokens = 0 quietly meaning 1).
    _refused(call, ValueError, message)


def test_group_advantages_refuse_bad_groups_and_scores() -> None:
    for fn in (KF.rloo_advantages, KF.grpo_advantages, KF.within_group_var):
        _refused(lambda fn=fn: fn(torch.zeros(4), 1), ValueError, r"group_size must be >= 2")
        _refused(lambda fn=fn: fn(torch.zeros(5), 2), ValueError, r"batch of 5 completions")
        _refused(
            lambda fn=fn: fn(torch.zeros(4), 2.0),
            TypeError,
            r"group_size must be an int, got float 2\.0",  # used to be accepted
        )
        _refused(
            lambda fn=fn: fn(torch.arange(4), 2),
            ValueError,
            r"scores must be a floating tensor, got dtype torch\.int64",  # grpo: mean() crash
        )
    _refused(
        lambda: KF.grpo_advantages(torch.zeros(4), 2, eps=-0.5),
        ValueError,
        r"eps must be >= 0, got -0\.5",  # used to divide by a zero std + eps = 0 → ±inf
    )
    _refused(
        lambda: KF.grpo_advantages(torch.zeros(4), 2, eps=NAN), ValueError, r"eps must be finite"
    )


@given(st.integers(1, 40), st.integers(-2, 1))
def test_group_advantages_with_one_completion_per_prompt_are_refused(
    batch: int, group: int
) -> None:
    # G <= 1: no other completion of the prompt to compare with.
    for fn in (KF.rloo_advantages, KF.grpo_advantages, KF.within_group_var):
        with pytest.raises(ValueError, match=rf"group_size must be >= 2 .*got {group}"):
            fn(torch.zeros(batch), group)


@given(st.integers(1, 40), st.integers(2, 8))
def test_group_advantages_with_groups_of_unequal_size_are_refused(batch: int, group: int) -> None:
    # A batch that does not split into groups of G: some prompt has fewer completions.
    assume(batch % group != 0)
    for fn in (KF.rloo_advantages, KF.grpo_advantages, KF.within_group_var):
        with pytest.raises(ValueError, match=rf"batch of {batch} completions does not split"):
            fn(torch.zeros(batch), group)


def test_constant_groups_and_nan_scores_give_documented_advantages() -> None:
    # Documented: a group of equal scores gets advantages 0 (GRPO: 0 / (0 + eps));
    # a NaN score makes its own group NaN and leaves the other groups alone.
    scores = torch.tensor([1.0, 1.0, NAN, 0.0, 2.0, 4.0])
    for fn in (KF.rloo_advantages, KF.grpo_advantages):
        out = fn(scores, 2)
        assert out[:2].tolist() == [0.0, 0.0]
        assert bool(out[2:4].isnan().all()) and bool(out[4:].isfinite().all())


def test_explained_variance_of_constant_returns_is_nan() -> None:
    # Documented: NaN when the returns are constant (it used to be -inf when the
    # values were not constant too, and NaN only when they were).
    mask = torch.ones(2, 3, dtype=torch.bool)
    values = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    assert bool(KF.explained_variance(values, torch.ones(2, 3), mask).isnan())
    assert bool(KF.explained_variance(torch.ones(2, 3), torch.ones(2, 3), mask).isnan())


# =========================================================================== functional: empty rows


@st.composite
def _masks_with_an_empty_row(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    """(x, mask) with B >= 2, at least one empty row and at least one real token."""
    b, t = draw(shapes(min_b=2, max_b=5, max_t=6))
    mask = draw(right_padded_masks((b, t), allow_empty_rows=True))
    empty = draw(st.integers(0, b - 1))
    kept = (empty + 1 + draw(st.integers(0, b - 2))) % b
    mask[empty] = False
    mask[kept, 0] = True  # still right padded
    x = torch.randn(b, t, generator=_gen(draw(st.integers(0, 2**16))), dtype=F64)
    return x, mask


@given(_masks_with_an_empty_row())
def test_a_row_with_no_real_token_is_ignored_or_zero_as_documented(
    xm: tuple[Tensor, Tensor],
) -> None:
    # Documented behaviour of an empty row (a completion with no response token):
    # - masked_mean(dim=1), masked_sum(dim=1): 0 for that row;
    # - masked_var / masked_whiten / token_mean: it does not enter the statistics,
    #   and whitening leaves it at 0;
    # - reward_to_go / gae: an empty episode, all 0; the other rows do not change;
    # - token_sum: adds 0 but counts in B;
    # - sequence_mean and shaped_rewards refuse it (no mean, no last token).
    x, mask = xm
    empty, real = ~mask.any(1), mask.any(1)
    assert bool((KF.masked_mean(x, mask, dim=1)[empty] == 0).all())
    assert bool((KF.masked_sum(x, mask, dim=1)[empty] == 0).all())
    rows = real.nonzero().squeeze(-1)
    x_real, m_real = x[rows], mask[rows]
    torch.testing.assert_close(KF.masked_var(x, mask), KF.masked_var(x_real, m_real))
    torch.testing.assert_close(KF.token_mean(x, mask), KF.token_mean(x_real, m_real))
    whitened = KF.masked_whiten(x, mask)
    assert bool((whitened[empty] == 0).all())
    torch.testing.assert_close(whitened[rows], KF.masked_whiten(x_real, m_real))
    returns = KF.reward_to_go(x, mask, gamma=0.9)
    advantages, gae_returns = KF.gae(x, -x, mask, gamma=0.9, lam=0.8)
    for out in (returns, advantages, gae_returns):
        assert bool((out[empty] == 0).all())
    torch.testing.assert_close(returns[rows], KF.reward_to_go(x_real, m_real, gamma=0.9))
    torch.testing.assert_close(
        advantages[rows], KF.gae(x_real, -x_real, m_real, gamma=0.9, lam=0.8)[0]
    )
    torch.testing.assert_close(KF.token_sum(x, mask), KF.masked_sum(x_real, m_real) / x.shape[0])
    with pytest.raises(ValueError, match=r"mask has rows with no real token: rows \["):
        KF.sequence_mean(x, mask)
    with pytest.raises(ValueError, match=r"mask has rows with no real token: rows \["):
        KF.shaped_rewards(torch.zeros(x.shape[0], dtype=F64), x, mask, 0.1)


def test_an_all_empty_mask_is_refused_by_every_mean() -> None:
    x, mask = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    for fn in (KF.masked_mean, KF.masked_var, KF.masked_whiten, KF.token_mean):
        with pytest.raises(ValueError, match=r"mask selects no element of a tensor of shape"):
            fn(x, mask)
    for fn2 in (KF.approx_kl, KF.clip_fraction, KF.explained_variance):
        with pytest.raises(ValueError, match=r"mask selects no element"):
            fn2(x, x, mask)


# =========================================================================== functional: ε, β, τ


_NOT_POSITIVE = st.one_of(st.floats(max_value=0.0), st.just(NAN), st.just(INF), st.just(-INF))


@given(_NOT_POSITIVE)
def test_clip_eps_must_be_a_finite_positive_number(eps: float) -> None:
    # ε <= 0 would flip or void the clip; NaN and inf are refused too.
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    message = r"clip_eps must be a finite number > 0, got"
    for call in (
        lambda: KF.clipped_surrogate_loss(x, x, x, clip_eps=eps),
        lambda: KF.clipped_value_loss(x, x, x, clip_eps=eps),
        lambda: KF.clip_fraction(x, x, m, clip_eps=eps),
        lambda: kltune.PPOObjective(clip_eps=eps),
        lambda: kltune.PPOObjective(value_clip_eps=eps),
    ):
        with pytest.raises(ValueError, match=message.replace("clip_eps", r"(value_)?clip_eps")):
            call()


@given(_NOT_POSITIVE)
def test_temperature_must_be_a_finite_positive_number(temperature: float) -> None:
    logits, tokens = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
        KF.logprobs_from_logits(logits, tokens, temperature=temperature)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
        KF.entropy_from_logits(logits, temperature=temperature)
    with pytest.raises(ValueError, match=r"Rollout\.temperature must be (> 0|finite), got"):
        synthetic_rollout().replace(temperature=temperature)  # used to be accepted


@pytest.mark.parametrize("beta", [-0.1, -INF, NAN, INF])
def test_beta_must_be_finite_and_not_negative(beta: float) -> None:
    # β < 0 pays the policy for moving away from π_ref; NaN/inf poison every reward.
    kl, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    message = r"beta must be (>= 0|finite), got"
    with pytest.raises(ValueError, match=message):
        KF.shaped_rewards(torch.zeros(2), kl, mask, beta)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got"):
        kltune.FixedKLController(beta=beta)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got"):
        kltune.ConstraintKLController(beta=beta, target=1.0, step_size=0.1)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, got"):
        kltune.AdaptiveKLController(beta=beta, target=1.0)


def test_ppo_objective_settings_are_checked_when_it_is_built() -> None:
    # Each of these used to be accepted and to fail (or silently misbehave) only at
    # the first minibatch, after a whole rollout.
    for kwargs, message in [
        ({"clip_eps": INF}, r"clip_eps must be a finite number > 0, got inf"),
        ({"dual_clip": 0.5}, r"dual_clip must be a finite number > 1 or None, got 0\.5"),
        ({"value_clip_eps": 0.0}, r"value_clip_eps must be a finite number > 0, got 0\.0"),
        ({"value_coef": NAN}, r"value_coef must be a finite number >= 0, got nan"),
        ({"entropy_coef": INF}, r"entropy_coef must be a finite number >= 0, got inf"),
        ({"entropy_coef": -1.0}, r"entropy_coef must be a finite number >= 0, got -1\.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            kltune.PPOObjective(**kwargs)
    _refused(lambda: kltune.PPOObjective(aggregate=3), TypeError, r"aggregate must be a function")
    _refused(lambda: kltune.KLPenalty(estimator="k3"), TypeError, r"estimator must be a function")


# =========================================================================== Rollout and RolloutBuffer


def _fields(rollout: Rollout) -> dict[str, Any]:
    return {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}


_TOKEN_FIELDS = ["old_logprobs", "ref_logprobs", "rewards", "response_mask", "response_ids"]


@given(
    st.sampled_from(_TOKEN_FIELDS),
    st.sampled_from(["extra column", "1-D", "wrong dtype"]),
)
def test_a_rollout_field_of_the_wrong_shape_or_dtype_is_refused_naming_it(
    field: str, corruption: str
) -> None:
    base = synthetic_rollout()
    value = getattr(base, field)
    if corruption == "extra column":
        value = _misaligned(value)
        message = rf"Rollout\.{field} must have shape \(6, 5\), got \(6, 6\)"
        if field == "response_ids":  # T comes from response_ids: the mask no longer fits
            message = r"Rollout\.response_mask must have shape \(6, 6\), got \(6, 5\)"
    elif corruption == "1-D":
        value = value[:, 0]
        message = rf"Rollout\.{field} must have shape (\(6, 5\)|\[B, L\]), got \(6,\)"
    else:
        value = value.long() if value.is_floating_point() else value.double()
        message = rf"Rollout\.{field} must be a \w+ tensor, got dtype torch\."
    _refused(lambda: Rollout(**{**_fields(base), field: value}), ValueError, message)


def test_rollout_construction_refuses_what_later_stages_cannot_handle() -> None:
    base = synthetic_rollout()
    fields = _fields(base)
    holed = base.response_mask.clone()
    holed[0] = torch.tensor([True, False, True, True, True])
    empty_row = base.response_mask.clone()
    empty_row[2] = False
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"prompt_ids": torch.tensor(3)}, ValueError, r"Rollout\.prompt_ids must have shape \[B, L\], got \(\)"),  # was IndexError
        ({"response_mask": holed}, ValueError, r"response_mask must be right padded"),  # was accepted
        ({"response_mask": empty_row}, ValueError, r"every response must start with a real token"),
        ({"prompts": "p" * 6}, TypeError, r"Rollout\.prompts must be a tuple of strings.*got a str"),  # was accepted
        ({"prompts": ("p",) * 5}, ValueError, r"6 rows but 5 prompts and 6 completions"),
        ({"temperature": 0.0}, ValueError, r"Rollout\.temperature must be > 0, got 0\.0"),  # was accepted
        ({"prompt_ids": base.prompt_ids[:0], "prompt_mask": base.prompt_mask[:0]}, ValueError, r"at least one completion \(got an empty batch\)"),
    ]  # fmt: skip
    for change, error, message in cases:
        _refused(lambda change=change: Rollout(**{**fields, **change}), error, message)


def test_an_empty_rollout_is_refused_wherever_it_could_come_from() -> None:
    rollout = synthetic_rollout()
    with pytest.raises(ValueError, match=r"at least one completion \(got an empty batch\)"):
        rollout.select(slice(0, 0))
    with pytest.raises(ValueError, match=r"at least one completion"):
        rollout.select(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"concat needs at least one rollout"):
        Rollout.concat([])


def test_select_out_of_range_names_the_index() -> None:
    rollout = synthetic_rollout()
    for index in (torch.tensor([0, 6]), torch.tensor([-1])):
        bad = int(index[-1])
        with pytest.raises(IndexError, match=rf"select index {bad} is out of range for a Rollout of 6 rows"):  # fmt: skip
            rollout.select(index)  # was torch's "index out of range in self"


@pytest.mark.parametrize(
    ("size", "epochs", "error", "message"),
    [
        (0, 1, ValueError, r"minibatch_size must be in \[1, 6\] \(the buffer holds 6 rows\), got 0"),
        (7, 1, ValueError, r"minibatch_size must be in \[1, 6\].*got 7"),
        (4, 1, ValueError, r"minibatch_size 4 does not divide the buffer size 6"),
        (2.0, 1, TypeError, r"minibatch_size must be an int, got float 2\.0"),
        (3, 0, ValueError, r"epochs must be >= 1, got 0"),
        (3, 1.5, TypeError, r"epochs must be an int, got float 1\.5"),
    ],
)  # fmt: skip
def test_minibatch_sizes_that_do_not_fit_the_buffer_are_refused(
    size: Any, epochs: Any, error: type[Exception], message: str
) -> None:
    buffer = RolloutBuffer(synthetic_rollout())
    _refused(lambda: buffer.minibatches(size, epochs=epochs), error, message)


def test_the_loop_refuses_minibatch_and_accumulation_sizes_that_do_not_fit() -> None:
    # Through the loop's optimise stage (no sampling needed): a minibatch larger than
    # the buffer, and grad_accumulation_steps that do not divide the minibatch.
    blocks, state = tiny_blocks()
    rollout = synthetic_rollout()
    rollout = rollout.replace(advantages=torch.zeros_like(rollout.old_logprobs))
    buffer = RolloutBuffer(rollout)
    for updates, message in [
        (Updates(minibatch_size=7), r"minibatch_size must be in \[1, 6\]"),
        (Updates(minibatch_size=4), r"minibatch_size 4 does not divide the buffer size 6"),
    ]:
        with pytest.raises(ValueError, match=message):
            optimise(blocks, buffer, 0.1, updates, _gen(), state)
    # Settings that cannot fit any buffer are refused when made, not at the first step.
    with pytest.raises(ValueError, match=r"grad_accumulation_steps=4 must divide minibatch_size=6"):
        Updates(minibatch_size=6, grad_accumulation_steps=4)
    for bad, message in [
        ({"minibatch_size": 0}, "minibatch_size must be >= 1, got 0"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"max_grad_norm": -1.0}, "flip the gradients"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ]:
        with pytest.raises(ValueError, match=message):
            Updates(**bad)
    for bad, message in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"completions_per_prompt": 0}, "completions_per_prompt"),
    ]:
        with pytest.raises(ValueError, match=message):
            kltune.Sampling(**bad)


# =========================================================================== baselines


def _grouped_rollout(prompt_index: list[int]) -> Rollout:
    return synthetic_rollout().replace(prompt_index=torch.tensor(prompt_index))


@pytest.mark.parametrize("baseline", [kltune.LeaveOneOutBaseline(), kltune.GRPOBaseline()])
@pytest.mark.parametrize(
    ("prompt_index", "message"),
    [
        ([0, 1, 2, 3, 4, 5], r"several completions per prompt .*got 1"),
        ([0, 0, 0, 1, 1, 2], r"same number of completions for every prompt, got between 1 and 3"),
        ([0, 1, 0, 1, 2, 2], r"rows of each prompt to be contiguous"),  # was silently wrong groups
        ([-1, -1, 0, 0, 1, 1], r"prompt_index must be >= 0, got -1"),  # was a bincount crash
    ],
)  # fmt: skip
def test_group_baselines_refuse_groups_they_cannot_use(
    baseline: kltune.Baseline, prompt_index: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        baseline.advantages(_grouped_rollout(prompt_index))


def test_group_baselines_accept_contiguous_groups_in_any_numbering() -> None:
    # Groups need not be numbered 0, 1, 2: only equal size and contiguity matter.
    gapped, plain = _grouped_rollout([5, 5, 0, 0, 9, 9]), _grouped_rollout([0, 0, 1, 1, 2, 2])
    for baseline in (kltune.LeaveOneOutBaseline(), kltune.GRPOBaseline()):
        torch.testing.assert_close(baseline.advantages(gapped), baseline.advantages(plain))


def test_baseline_settings_are_checked_when_built() -> None:
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: kltune.MeanBaseline(gamma=2.0), r"gamma must lie in \[0, 1\], got 2\.0"),
        (lambda: kltune.LeaveOneOutBaseline(gamma=-0.1), r"gamma must lie in \[0, 1\]"),
        (lambda: kltune.GRPOBaseline(eps=-1.0), r"eps must be a finite number > 0, got -1\.0"),
        (lambda: kltune.GRPOBaseline(eps=0.0), r"eps must be a finite number > 0"),
        (lambda: kltune.GAEBaseline(lam=-1.0), r"lam must lie in \[0, 1\], got -1\.0"),
        (lambda: kltune.EMABaseline(value=NAN), r"value must be finite or None, got nan"),
        (lambda: kltune.PromptValueBaseline(vocab_size=0), r"vocab_size must be >= 1, got 0"),
        (lambda: kltune.PromptValueBaseline(10, gamma=NAN), r"gamma must lie in \[0, 1\], got nan"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_a_prompt_value_baseline_too_small_for_the_vocabulary_says_so() -> None:
    # Prompt ids up to 49 against an embedding of 10 rows: was torch's IndexError.
    baseline = kltune.PromptValueBaseline(vocab_size=10)
    with pytest.raises(ValueError, match=r"prompt token ids run from \d+ to \d+, outside the baseline's vocab_size of 10"):  # fmt: skip
        baseline.advantages(synthetic_rollout())


def test_baselines_never_see_an_empty_row() -> None:
    # A Rollout cannot hold a row with no response token (refused on construction),
    # so no baseline has to define its advantage.
    rollout = synthetic_rollout()
    mask = rollout.response_mask.clone()
    mask[3] = False
    with pytest.raises(ValueError, match=r"every response must start with a real token"):
        rollout.replace(response_mask=mask)


# =========================================================================== Policy: prompts and arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperature": INF}, ValueError, r"temperature must be finite, got inf"),  # was accepted
        ({"temperature": -INF}, ValueError, r"temperature must be > 0, got -inf"),
        ({"top_p": NAN}, ValueError, r"top_p must lie in \(0, 1\] or None, got nan"),
        ({"top_p": -0.5}, ValueError, r"top_p must lie in \(0, 1\]"),
        ({"top_k": -2}, ValueError, r"top_k must be >= 1 or None, got -2"),
        ({"top_k": 2.5}, TypeError, r"top_k must be an int, got float 2\.5"),  # was torch.topk's
        ({"max_new_tokens": 2.0}, TypeError, r"max_new_tokens must be an int, got float 2\.0"),
        ({"completions_per_prompt": 2.0}, TypeError, r"completions_per_prompt must be an int"),
        ({"prompts": (p for p in ["a"])}, TypeError, r"prompts must be a sequence of strings \(a list or tuple\), got a generator"),
        ({"prompts": ["ok", "lone \ud800 surrogate"]}, ValueError, r"prompts\[1\] is not valid Unicode: surrogates not allowed at position 5"),
    ],
)  # fmt: skip
def test_bad_sampling_arguments_name_the_problem(
    policy: kltune.Policy, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    # Complements tests/test_policy.py's table: the cases that used to pass the
    # checks and fail in torch, in the tokenizer, or not at all.
    def call() -> Rollout:
        arguments = {"prompts": ["ok"], "max_new_tokens": 3, **kwargs}
        prompts = arguments.pop("prompts")
        return policy.rollout(prompts, generator=_gen(), **arguments)

    with without_runtime_typecheck(), pytest.raises(error, match=message):
        call()


@fewer_examples(5)
@given(st.integers(max_value=0), st.floats(max_value=0.0) | st.just(NAN))
def test_no_rollout_with_max_new_tokens_or_temperature_out_of_range(
    policy: kltune.Policy, max_new_tokens: int, temperature: float
) -> None:
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1|temperature must be > 0"):
        policy.rollout(["ok"], max_new_tokens=max_new_tokens, temperature=temperature)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        policy.rollout(["ok"], max_new_tokens=1, temperature=temperature)


_PRINTABLE_TROUBLE = [
    "nul\x00byte",
    "\x07bell \x1b[31mred\x1b[0m",
    "emoji 😀🎉👍🏽 and zwj 👨‍👩‍👧",
    "\u202eright-to-left\u202c \ufeffbom",
    "\ufffd replacement",
    "tab\tnew\nline\r\n",
    "",
]


def test_control_characters_nul_and_emoji_travel_through_sampling_and_rewards(
    policy: kltune.Policy,
) -> None:
    # Documented: any valid str is a prompt (the byte tokenizer has a token per byte),
    # the texts travel unchanged into the rollout, and the shipped rewards score the
    # completions (valid text decoded from random bytes, U+FFFD included).
    rollout = policy.rollout(_PRINTABLE_TROUBLE, max_new_tokens=6, generator=_gen())
    assert rollout.prompts == tuple(_PRINTABLE_TROUBLE)
    assert all(isinstance(c, str) for c in rollout.completions)
    for reward in (kltune.VaderSentiment(), kltune.LengthReward(), kltune.RepetitionPenalty()):
        scores = score_completions(reward, rollout.prompts, rollout.completions)
        assert scores.shape == (len(rollout),) and bool(scores.isfinite().all())


@fewer_examples(5)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=4))
def test_any_valid_text_encodes_and_the_byte_tokenizer_round_trips_it(
    policy: kltune.Policy, prompts: list[str]
) -> None:
    # st.text() draws control characters, NUL, emoji and astral characters (and, as
    # hypothesis found, the text "<bos>", which the tokenizer reads as the BOS token).
    ids, mask = policy.encode_prompts(prompts)
    for row, real, text in zip(ids, mask, prompts, strict=True):
        assert policy.tokenizer.decode(row[real].tolist()) == (text or "<bos>")


def test_special_token_text_in_a_prompt_is_the_special_token(policy: kltune.Policy) -> None:
    # Documented (encode_prompts): the tokenizer parses special-token strings in the
    # text, as chat templates need; "<eos>" typed in a prompt is the EOS token.
    tokenizer = policy.tokenizer
    ids, _ = policy.encode_prompts(["say <eos> now"])
    assert tokenizer.eos_token_id in ids[0].tolist()


@fewer_examples(5)
@given(st.lists(st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3), min_size=1, max_size=3))  # fmt: skip
def test_a_lone_surrogate_is_refused_before_the_tokenizer(
    policy: kltune.Policy, bad: list[str]
) -> None:
    # A lone surrogate (e.g. from bytes decoded with errors="surrogateescape") is a
    # Python str but not Unicode text: the tokenizer used to fail with "TextEncodeInput
    # must be Union[...]". Now a ValueError names the prompt and the position.
    with pytest.raises(ValueError, match=r"prompts\[1\] is not valid Unicode: surrogates not allowed at position 0"):  # fmt: skip
        policy.encode_prompts(["fine", *bad])


@fewer_examples(2)
@given(st.lists(st.text(st.characters(categories=["Cs"])) | st.text(), min_size=1, max_size=5))
def test_text_rewards_score_any_str_including_lone_surrogates(texts: list[str]) -> None:
    # Documented (kltune.rewards): the text rewards are pure Python and take any str.
    prompts = [""] * len(texts)
    for reward in (
        kltune.VaderSentiment(),
        kltune.VaderSentiment(include_prompt=True),
        kltune.LengthReward(target_words=3),
        kltune.RepetitionPenalty(n=1),
    ):
        scores = score_completions(reward, prompts, texts)
        assert scores.shape == (len(texts),) and bool(scores.isfinite().all())


def test_a_classifier_reward_refuses_text_its_tokenizer_cannot_encode() -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=260, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=64
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(config).eval()
    reward = kltune.ClassifierReward(model, byte_tokenizer(), positive_label=1)
    scores = reward([""] * 3, ["nul\x00", "emoji 😀", ""])
    assert bool(((scores >= 0) & (scores <= 1)).all())
    with pytest.raises(ValueError, match=r"text 1 \('bad \\ud800'\) is not valid Unicode"):
        reward(["", ""], ["fine", "bad \ud800"])  # was the tokenizer's TypeError


@pytest.mark.parametrize(
    ("reward", "call", "error", "message"),
    [
        (kltune.LengthReward(), lambda r: r(["a", "b", "c"], "abc"), TypeError, r"completions must be a sequence of strings, got a single"),
        (kltune.RepetitionPenalty(), lambda r: r(["a"], ["x", "y"]), ValueError, r"got 1 prompts but 2 completions"),
        (kltune.VaderSentiment(include_prompt=True), lambda r: r(["a"], ["x", "y"]), ValueError, r"got 1 prompts but 2 completions"),
        (kltune.RepetitionPenalty(), lambda r: r(["", ""], [b"ab", b"cd"]), TypeError, r"completions\[0\] must be a str, got bytes"),
        (kltune.VaderSentiment(), lambda r: r(["", ""], [b"ab", b"cd"]), TypeError, r"completions\[0\] must be a str, got bytes"),
    ],
)  # fmt: skip
def test_shipped_rewards_called_directly_check_their_texts(
    reward: Any, call: Callable[[Any], Any], error: type[Exception], message: str
) -> None:
    # Called directly (not through score_completions) they used to score the
    # characters of a str, ignore a length mismatch, or fail on bytes with an
    # AttributeError.
    with without_runtime_typecheck(), pytest.raises(error, match=message):
        call(reward)


def test_shipped_rewards_of_an_empty_batch_are_empty() -> None:
    # Documented: called directly, an empty batch gives an empty tensor (through
    # score_completions it is refused).
    for reward in (kltune.VaderSentiment(), kltune.LengthReward(), kltune.RepetitionPenalty()):
        assert reward([], []).shape == (0,)
        with pytest.raises(ValueError, match=r"cannot score an empty batch"):
            score_completions(reward, [], [])


def test_many_prompts_encode_in_one_call(policy: kltune.Policy) -> None:
    prompts = [f"prompt {i} " * (i % 5) for i in range(3000)]
    ids, mask = policy.encode_prompts(prompts)
    assert ids.shape == (3000, max(len(p.encode()) for p in prompts) or 1)
    assert mask.sum(1).tolist()[:6] == [1, 9, 18, 27, 36, 1]  # "" -> BOS


CONTEXT = 16


@pytest.fixture(scope="module")
def short_policy() -> kltune.Policy:
    """A tiny GPT-2 whose config claims a context of 16 positions."""
    model, tokenizer = kltune.tiny_random_model("gpt2")
    model.config.n_positions = CONTEXT
    return kltune.Policy(model, tokenizer)


@fewer_examples(2)
@given(prompt_len=st.integers(1, 24), max_new_tokens=st.integers(0, 24))
def test_prompts_longer_than_the_context_are_refused_before_the_model(
    short_policy: kltune.Policy, prompt_len: int, max_new_tokens: int
) -> None:
    # A prompt that, with the completion, would not fit is refused naming the prompt
    # (a learned-position model would fail with an IndexError); one that fits is encoded.
    prompt = "x" * prompt_len
    if prompt_len + max_new_tokens > CONTEXT:
        with pytest.raises(ValueError, match=rf"prompts\[0\] has {prompt_len} tokens; with max_new_tokens={max_new_tokens} it exceeds the model's context of {CONTEXT} tokens"):  # fmt: skip
            short_policy.encode_prompts([prompt], max_new_tokens)
    else:
        ids, _ = short_policy.encode_prompts([prompt], max_new_tokens)
        assert ids.shape == (1, prompt_len)


def test_a_prompt_that_fills_a_short_context_still_samples(short_policy: kltune.Policy) -> None:
    policy = short_policy
    rollout = policy.rollout(["x" * 10], max_new_tokens=6, generator=_gen())
    assert rollout.response_ids.shape[1] <= 6
    with pytest.raises(ValueError, match=r"with max_new_tokens=7 it exceeds the model's context"):
        policy.rollout(["x" * 10], max_new_tokens=7, generator=_gen())
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 0, got -1"):
        policy.encode_prompts(["x"], max_new_tokens=-1)  # was accepted (a negative budget)


# =========================================================================== tokenizers


def test_a_tokenizer_without_a_pad_token_pads_with_eos() -> None:
    # Documented (Policy, prepare_tokenizer): the EOS token pads; masks exclude it.
    model, _ = kltune.tiny_random_model("llama")
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    policy = kltune.Policy(model, tokenizer)
    rollout = policy.rollout(["a", "abcd"], max_new_tokens=3, generator=_gen())
    assert int(rollout.prompt_ids[0, 0]) == tokenizer.eos_token_id and not rollout.prompt_mask[0, 0]
    prepared = prepare_tokenizer(tokenizer)
    assert prepared.pad_token_id == prepared.eos_token_id and prepared.padding_side == "left"


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused() -> None:
    model, _ = kltune.tiny_random_model("llama")
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token"):
        kltune.Policy(model, tokenizer)
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token; set one"):
        prepare_tokenizer(tokenizer)


def test_a_tokenizer_larger_than_the_model_is_refused_naming_the_token() -> None:
    # A pad token added without resizing the embeddings: torch's "index out of range
    # in self" at the first forward. Now refused when the Policy is built.
    model, _ = kltune.tiny_random_model("llama")
    rows = model.get_input_embeddings().num_embeddings
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<new pad>"})
    with pytest.raises(ValueError, match=rf"pad_token_id is {rows} but the model's embedding has {rows} rows.*resize_token_embeddings"):  # fmt: skip
        kltune.Policy(model, tokenizer)
    # An ordinary added token only shows up in a prompt: refused by encode_prompts.
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    policy = kltune.Policy(model, tokenizer)
    with pytest.raises(ValueError, match=rf"prompts\[1\] encodes to token id {rows}, outside the model's embedding of {rows} rows"):  # fmt: skip
        policy.encode_prompts(["fine", "not <extra> fine"])


def test_tiny_random_model_refuses_a_width_its_heads_cannot_split() -> None:
    # Was transformers' StrictDataclassClassValidationError from inside the config.
    with pytest.raises(ValueError, match=r"hidden_size must be a positive multiple of 4.*got 30"):
        kltune.tiny_random_model(hidden_size=30)


# =========================================================================== rewards and the loop


@pytest.mark.parametrize(
    ("reward_fn", "error", "message"),
    [
        (lambda p, c: [0.5] * (len(c) - 1), ValueError, r"returned \d+ scores for \d+ completions"),
        (lambda p, c: [NAN] * len(c), ValueError, r"returned a non-finite score \(nan\) at index 0"),
        (lambda p, c: torch.full((len(c),), INF), ValueError, r"returned a non-finite score \(inf\) at index 0"),
        (lambda p, c: ["1.0"] * len(c), TypeError, r"returned a str at index 0; each score must be a real number"),
        (lambda p, c: 1 / 0, RuntimeError, r"raised ZeroDivisionError: division by zero"),
        (lambda p, c: None, TypeError, r"returned a NoneType; expected a 1-D tensor"),
        (lambda p, c: torch.zeros(len(c), 1), ValueError, r"returned scores of shape \(\d+, 1\)"),
    ],
)  # fmt: skip
def test_a_bad_reward_stops_the_iteration_before_any_update(
    reward_fn: Callable[..., Any], error: type[Exception], message: str
) -> None:
    # Wrong length, NaN, inf, strings, an exception, None, a 2-D tensor: the loop's
    # scoring stage names the reward function and the problem, and the policy's
    # weights are untouched.
    blocks, state = tiny_blocks()
    blocks = dataclasses.replace(blocks, reward_fn=reward_fn)
    before = [p.detach().clone() for p in blocks.policy.parameters()]
    with pytest.raises(error, match=rf"reward function '<lambda>' {message}"):
        ppo_iteration(["ab", "cd"], blocks, state, Sampling(max_new_tokens=3), Updates(), _gen())
    after = list(blocks.policy.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@dataclasses.dataclass(frozen=True)
class _RogueController:
    """A user's controller that lets β go negative (the shipped ones refuse)."""

    beta: float

    def update(self, observed_kl: float, n_samples: int) -> "_RogueController":
        return self

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": "rogue", "beta": self.beta}


@pytest.mark.parametrize("in_loss", [False, True])
def test_a_negative_beta_from_a_custom_controller_stops_the_loop(in_loss: bool) -> None:
    # KL in the reward: shaped_rewards refuses it. KL in the loss: the objective
    # refuses it (it used to add β·KL < 0 to the loss, paying the policy to drift).
    kl = kltune.KLPenalty(placement="loss") if in_loss else None
    blocks, state = tiny_blocks(kl=kl, controller=_RogueController(beta=-0.1))
    with pytest.raises(ValueError, match=r"beta must be (>= 0|a finite number >= 0), got -0\.1"):
        ppo_iteration(["ab", "cd"], blocks, state, Sampling(max_new_tokens=3), Updates(), _gen())


def test_a_group_baseline_with_one_completion_per_prompt_stops_the_loop() -> None:
    blocks, state = tiny_blocks(baseline=kltune.LeaveOneOutBaseline())
    with pytest.raises(ValueError, match=r"several completions per prompt .*got 1"):
        ppo_iteration(["ab", "cd"], blocks, state, Sampling(max_new_tokens=3), Updates(), _gen())


def test_objective_refuses_a_negative_beta_directly() -> None:
    blocks, _ = tiny_blocks()
    rollout = synthetic_rollout()
    rollout = rollout.replace(advantages=torch.zeros_like(rollout.old_logprobs))
    for beta in (-0.1, NAN):
        with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got"):
            blocks.objective(blocks.policy, rollout, beta)

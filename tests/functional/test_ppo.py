"""PPO losses, loss aggregation and logged statistics."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kltune.functional as KF
from strategies import (
    Rollout,
    assert_bad_input,
    fewer_examples,
    fill_padding,
    garbage,
    pad_right,
    right_padded_masks,
    rollouts,
    shapes,
    tensors,
)

clip_eps_values = st.sampled_from([0.1, 0.2, 0.3])
AGGREGATORS = [KF.token_mean, KF.sequence_mean, KF.token_sum]


# --------------------------------------------------------------------------- oracles


def loop_surrogate(lp, old, adv, eps, dual=None):
    out = torch.empty_like(lp)
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            a = float(adv[i, j])
            rho = math.exp(float(lp[i, j]) - float(old[i, j]))
            loss = max(-a * rho, -a * min(max(rho, 1.0 - eps), 1.0 + eps))
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            out[i, j] = loss
    return out


def loop_value_loss(v, old, ret, eps):
    out = torch.empty_like(v)
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            plain = (float(v[i, j]) - float(ret[i, j])) ** 2
            if eps is None:
                out[i, j] = 0.5 * plain
                continue
            step = min(max(float(v[i, j]) - float(old[i, j]), -eps), eps)
            clipped = (float(old[i, j]) + step - float(ret[i, j])) ** 2
            out[i, j] = 0.5 * max(plain, clipped)
    return out


def real_items(x, mask):
    return [[float(x[i, j]) for j in range(x.shape[1]) if mask[i, j]] for i in range(x.shape[0])]


def loop_token_mean(loss, mask):
    rows = real_items(loss, mask)
    return sum(map(sum, rows)) / sum(map(len, rows))


def loop_sequence_mean(loss, mask):
    rows = real_items(loss, mask)
    return sum(sum(r) / len(r) for r in rows) / len(rows)


def loop_token_sum(loss, mask):
    rows = real_items(loss, mask)
    return sum(map(sum, rows)) / len(rows)


def loop_approx_kl(lp, old, mask):
    items = [
        math.exp(a - b) - 1.0 - (a - b)
        for ra, rb in zip(real_items(lp, mask), real_items(old, mask), strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    return sum(items) / len(items)


def loop_clip_fraction(lp, old, mask, eps):
    items = [
        abs(math.exp(a - b) - 1.0) > eps
        for ra, rb in zip(real_items(lp, mask), real_items(old, mask), strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    return sum(items) / len(items)


def loop_explained_variance(values, returns, mask):
    v = [x for row in real_items(values, mask) for x in row]
    r = [x for row in real_items(returns, mask) for x in row]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    return 1.0 - var([a - b for a, b in zip(r, v, strict=True)]) / var(r)


def ppo_objective(ro: Rollout, aggregate=KF.token_mean, entropy=None):
    """A full PPO minibatch loss assembled from the core, as the reference loop does."""
    surrogate = KF.clipped_surrogate_loss(ro.logprobs, ro.old_logprobs, ro.advantages, 0.2, 3.0)
    value = KF.clipped_value_loss(ro.values, ro.old_values, ro.returns, clip_eps=0.2)
    kl = KF.kl_k3_st(ro.logprobs, ro.ref_logprobs)
    loss = aggregate(surrogate, ro.mask) + 0.5 * aggregate(value, ro.mask)
    loss = loss + 0.1 * aggregate(kl, ro.mask)
    if entropy is not None:
        loss = loss + 0.01 * aggregate(KF.entropy_bonus(entropy), ro.mask)
    return loss


# --------------------------------------------------------------------------- hand cases


def test_clipped_surrogate_hand_case(dtype, device):
    lp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]], dtype=dtype, device=device))
    old = torch.zeros(2, 3, dtype=dtype, device=device)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=dtype, device=device)
    # ρ = (1, 1.5, 0.5), ε = 0.2, clip(ρ) = (1, 1.2, 0.8).
    # A = +1: max(−ρ, −clip ρ) = (−1, −1.2, −0.5);  A = −1: max(ρ, clip ρ) = (1, 1.5, 0.8)
    expected = torch.tensor([[-1.0, -1.2, -0.5], [1.0, 1.5, 0.8]], dtype=dtype, device=device)
    torch.testing.assert_close(KF.clipped_surrogate_loss(lp, old, adv, clip_eps=0.2), expected)
    # dual clip c = 1.3 caps the A = −1 row at −c·A = 1.3
    dual = torch.tensor([[-1.0, -1.2, -0.5], [1.0, 1.3, 0.8]], dtype=dtype, device=device)
    torch.testing.assert_close(
        KF.clipped_surrogate_loss(lp, old, adv, clip_eps=0.2, dual_clip=1.3), dual
    )


def test_clipped_value_loss_hand_case(dtype):
    v = torch.tensor([[1.0, 0.0, 0.5]], dtype=dtype)
    old = torch.zeros(1, 3, dtype=dtype)
    ret = torch.tensor([[1.0, 1.0, 0.0]], dtype=dtype)
    # clipped V = (0.2, 0, 0.2): ½·max((0)², (−0.8)²), ½·max(1, 1), ½·max(0.25, 0.04)
    expected = torch.tensor([[0.32, 0.5, 0.125]], dtype=dtype)
    torch.testing.assert_close(KF.clipped_value_loss(v, old, ret, clip_eps=0.2), expected)
    plain = torch.tensor([[0.0, 0.5, 0.125]], dtype=dtype)
    torch.testing.assert_close(KF.clipped_value_loss(v, old, ret, clip_eps=None), plain)


def test_value_regression_loss_hand_case(dtype):
    loss = KF.value_regression_loss(
        torch.tensor([0.0, 1.0, 3.0], dtype=dtype), torch.tensor([1.0, 1.0, 1.0], dtype=dtype)
    )
    assert loss.item() == pytest.approx((1.0 + 0.0 + 4.0) / 6.0)


def test_entropy_bonus_hand_case_and_gradient(dtype):
    h = torch.tensor([[0.5, 1.0, 0.0]], dtype=dtype, requires_grad=True)
    torch.testing.assert_close(KF.entropy_bonus(h), torch.tensor([[-0.5, -1.0, 0.0]], dtype=dtype))
    KF.entropy_bonus(h).sum().backward()
    torch.testing.assert_close(h.grad, -torch.ones_like(h))


def test_aggregators_hand_case(dtype, device):
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]], dtype=dtype, device=device)
    mask = torch.tensor([[True, True, True], [True, False, False]], device=device)
    assert KF.token_mean(loss, mask).item() == pytest.approx((1 + 1 + 1 + 4) / 4)
    assert KF.sequence_mean(loss, mask).item() == pytest.approx((1 + 4) / 2)
    assert KF.token_sum(loss, mask).item() == pytest.approx((3 + 4) / 2)


def test_logged_statistics_hand_case(dtype):
    lp = torch.log(torch.tensor([[1.0, 2.0, 0.5]], dtype=dtype))
    old = torch.zeros(1, 3, dtype=dtype)
    two = torch.tensor([[True, True, False]])
    # ρ = (1, 2): k3 = (0, 2 − 1 − ln 2), mean over two tokens
    assert KF.approx_kl(lp, old, two).item() == pytest.approx((1.0 - math.log(2.0)) / 2.0)
    # ρ = (1, 2, 0.5) and ε = 0.2: two of three outside
    all3 = torch.ones(1, 3, dtype=torch.bool)
    assert KF.clip_fraction(lp, old, all3).item() == pytest.approx(2.0 / 3.0)
    assert KF.clip_fraction(lp, old, all3, clip_eps=1.5).item() == 0.0
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=dtype)
    v = torch.tensor([[1.0, 2.0, 4.0]], dtype=dtype)
    # var(R) = 2/3, R − V = (0, 0, −1) has var 2/9: EV = 1 − 1/3
    assert KF.explained_variance(v, r, all3).item() == pytest.approx(2.0 / 3.0)
    assert KF.explained_variance(r.clone(), r, all3).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- oracles vs code


@given(rollouts(), clip_eps_values, st.sampled_from([None, 1.5, 3.0]))
def test_clipped_surrogate_matches_loop_oracle(ro, eps, dual):
    # The vectorised loss agrees with max(−Aρ, −A·clip ρ) (and the dual cap) in a loop.
    got = KF.clipped_surrogate_loss(ro.logprobs, ro.old_logprobs, ro.advantages, eps, dual)
    torch.testing.assert_close(
        got, loop_surrogate(ro.logprobs, ro.old_logprobs, ro.advantages, eps, dual)
    )


@given(rollouts(), st.sampled_from([None, 0.1, 0.2, 1.0]))
def test_clipped_value_loss_matches_loop_oracle(ro, eps):
    # The vectorised value loss agrees with the clipped squared error in a loop.
    got = KF.clipped_value_loss(ro.values, ro.old_values, ro.returns, clip_eps=eps)
    torch.testing.assert_close(got, loop_value_loss(ro.values, ro.old_values, ro.returns, eps))


@given(rollouts())
def test_aggregators_match_loop_oracle(ro):
    # token_mean, sequence_mean and token_sum agree with Python loops over real tokens.
    loss, mask = ro.advantages, ro.mask
    assert KF.token_mean(loss, mask).item() == pytest.approx(loop_token_mean(loss, mask))
    assert KF.sequence_mean(loss, mask).item() == pytest.approx(loop_sequence_mean(loss, mask))
    assert KF.token_sum(loss, mask).item() == pytest.approx(loop_token_sum(loss, mask))


@fewer_examples(2)
@given(rollouts(), clip_eps_values)
def test_logged_statistics_match_loop_oracle(ro, eps):
    # approx_kl, clip_fraction and explained_variance agree with Python loops.
    lp, old, mask = ro.logprobs, ro.old_logprobs, ro.mask
    assert KF.approx_kl(lp, old, mask).item() == pytest.approx(
        loop_approx_kl(lp, old, mask), rel=1e-9, abs=1e-12
    )
    # keep away from the ε boundary, where rounding may decide either way
    assume(bool(((torch.exp(lp - old) - 1).abs() - eps).abs().min() > 1e-9))
    assert KF.clip_fraction(lp, old, mask, eps).item() == pytest.approx(
        loop_clip_fraction(lp, old, mask, eps)
    )
    returns = ro.returns + torch.arange(mask.numel()).reshape(mask.shape)  # a ramp
    if int(mask.sum()) >= 2:  # else the variance of the returns is 0 and EV is 0/0
        assert KF.explained_variance(ro.values, returns, mask).item() == pytest.approx(
            loop_explained_variance(ro.values, returns, mask), rel=1e-9, abs=1e-9
        )


@given(st.data())
def test_value_regression_loss_matches_loop_oracle(data):
    # Half the mean squared error, as a Python loop computes it.
    b = data.draw(st.integers(1, 6))
    pred, target = data.draw(tensors((b,))), data.draw(tensors((b,)))
    expected = 0.5 * sum((float(p) - float(t)) ** 2 for p, t in zip(pred, target, strict=True)) / b
    assert KF.value_regression_loss(pred, target).item() == pytest.approx(expected)


# --------------------------------------------------------------------------- surrogate properties


@given(st.data(), clip_eps_values)
def test_clipped_surrogate_equals_unclipped_inside_the_trust_region(data, eps):
    # With ρ in [1 − ε, 1 + ε] the loss is exactly the unclipped −A·ρ.
    shape = data.draw(shapes())
    old = data.draw(tensors(shape, -20.0, 0.0))
    adv = data.draw(tensors(shape, -5.0, 5.0))
    rho = 1.0 + eps * data.draw(tensors(shape, -0.95, 0.95))
    lp = old + torch.log(rho)
    got = KF.clipped_surrogate_loss(lp, old, adv, clip_eps=eps)
    torch.testing.assert_close(got, -adv * torch.exp(lp - old))


@given(rollouts(), clip_eps_values)
def test_clipped_surrogate_gradient_is_zero_where_the_clipped_term_wins(ro, eps):
    # Where clipping binds (A > 0, ρ > 1 + ε or A < 0, ρ < 1 − ε) no gradient flows;
    # elsewhere the gradient wrt logprobs is the unclipped −A·ρ.
    lp = ro.logprobs.clone().requires_grad_()
    loss = KF.clipped_surrogate_loss(lp, ro.old_logprobs, ro.advantages, clip_eps=eps)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    rho, adv = torch.exp(ro.logprobs - ro.old_logprobs), ro.advantages
    margin = 1e-9
    clipped = ((adv > 0) & (rho > 1 + eps + margin)) | ((adv < 0) & (rho < 1 - eps - margin))
    free = ((adv > 0) & (rho < 1 + eps - margin)) | ((adv < 0) & (rho > 1 - eps + margin))
    assert torch.equal(grad[clipped], torch.zeros_like(grad[clipped]))
    torch.testing.assert_close(grad[free], (-adv * rho)[free])


@given(rollouts())
def test_clipped_surrogate_with_huge_eps_is_the_unclipped_loss(ro):
    # ε → ∞ switches clipping off: the loss is −A·ρ everywhere.
    got = KF.clipped_surrogate_loss(ro.logprobs, ro.old_logprobs, ro.advantages, clip_eps=1e12)
    torch.testing.assert_close(got, -ro.advantages * torch.exp(ro.logprobs - ro.old_logprobs))


@given(rollouts(), clip_eps_values)
def test_clipped_surrogate_is_a_pessimistic_bound(ro, eps):
    # The clipped loss is never below the unclipped one (PPO's lower bound on the objective).
    got = KF.clipped_surrogate_loss(ro.logprobs, ro.old_logprobs, ro.advantages, clip_eps=eps)
    unclipped = -ro.advantages * torch.exp(ro.logprobs - ro.old_logprobs)
    assert bool((got >= unclipped - 1e-12).all())


@given(rollouts(), clip_eps_values, st.sampled_from([1.01, 1.5, 3.0, 10.0]))
def test_dual_clip_bounds_the_loss_of_negative_advantages(ro, eps, c):
    # With dual clip c, a token with A < 0 has loss ≤ −c·A; tokens with A ≥ 0 are untouched.
    args = (ro.logprobs, ro.old_logprobs, ro.advantages)
    standard = KF.clipped_surrogate_loss(*args, clip_eps=eps)
    dual = KF.clipped_surrogate_loss(*args, clip_eps=eps, dual_clip=c)
    neg = ro.advantages < 0
    assert bool((dual[neg] <= -c * ro.advantages[neg]).all())
    torch.testing.assert_close(dual[neg], torch.minimum(standard, -c * ro.advantages)[neg])
    torch.testing.assert_close(dual[~neg], standard[~neg])


# --------------------------------------------------------------------------- value loss properties


@given(rollouts(), st.sampled_from([0.01, 0.1, 0.2, 1.0]))
def test_clipped_value_loss_is_at_least_half_the_squared_error(ro, eps):
    # Clipping only ever raises the loss: ℓ ≥ ½(V − R)², and clip_eps=None gives exactly that.
    plain = 0.5 * (ro.values - ro.returns) ** 2
    got = KF.clipped_value_loss(ro.values, ro.old_values, ro.returns, clip_eps=eps)
    assert bool((got >= plain).all())
    none = KF.clipped_value_loss(ro.values, ro.old_values, ro.returns, clip_eps=None)
    torch.testing.assert_close(none, plain)


@given(rollouts(), st.sampled_from([0.1, 0.2, 1.0]))
def test_clipped_value_loss_is_plain_when_values_stay_within_eps(ro, eps):
    # If |V − V_old| ≤ ε the clipped prediction is V itself: the loss is ½(V − R)².
    old = ro.values + eps * (ro.old_values - ro.values).clamp(-1.0, 1.0)
    got = KF.clipped_value_loss(ro.values, old, ro.returns, clip_eps=eps)
    torch.testing.assert_close(got, 0.5 * (ro.values - ro.returns) ** 2)


# --------------------------------------------------------------------------- aggregation


@fewer_examples(2)
@given(rollouts(), st.data())
def test_aggregators_ignore_padding_values_and_give_them_zero_gradient(ro, data):
    # NaN, inf or anything in the loss under the mask changes no aggregate and gets no gradient.
    loss = ro.advantages
    dirty = fill_padding(loss, ro.mask, data.draw(garbage(tuple(loss.shape)))).requires_grad_()
    for aggregate in AGGREGATORS:
        got = aggregate(dirty, ro.mask)
        torch.testing.assert_close(got, aggregate(loss, ro.mask))
        (grad,) = torch.autograd.grad(got, dirty)
        assert torch.equal(grad[~ro.mask], torch.zeros_like(grad[~ro.mask]))
        assert bool(grad.isfinite().all())


@fewer_examples(2)
@given(rollouts(), st.data(), st.sampled_from(AGGREGATORS))
def test_ppo_objective_ignores_padding_values_and_gives_them_zero_gradient(ro, data, aggregate):
    # The whole PPO loss (surrogate, value, KL, entropy) ignores finite garbage under the mask.
    shape = tuple(ro.mask.shape)
    dirty = ro._replace(
        **{
            name: fill_padding(getattr(ro, name), ro.mask, data.draw(garbage(shape, False)))
            for name in ro._fields
            if name not in ("mask", "scores", "rewards")
        }
    )
    leaves = dirty._replace(
        logprobs=dirty.logprobs.clone().requires_grad_(),
        values=dirty.values.clone().requires_grad_(),
    )
    entropy = data.draw(tensors(shape, 0.0, 3.0)).requires_grad_()
    got = ppo_objective(leaves, aggregate, entropy)
    torch.testing.assert_close(got, ppo_objective(ro, aggregate, entropy))
    for grad in torch.autograd.grad(got, (leaves.logprobs, leaves.values, entropy)):
        assert torch.equal(grad[~ro.mask], torch.zeros_like(grad[~ro.mask]))


@fewer_examples(2)
@given(rollouts(), st.integers(1, 4), st.sampled_from(AGGREGATORS))
def test_ppo_objective_appending_padding_leaves_the_loss_unchanged(ro, extra, aggregate):
    # Extra masked columns (whatever they hold) leave every loss and statistic unchanged.
    padded = Rollout(
        *(
            pad_right(x, extra, False if x.dtype == torch.bool else -1.5) if x.dim() == 2 else x
            for x in ro
        )
    )
    torch.testing.assert_close(ppo_objective(padded, aggregate), ppo_objective(ro, aggregate))
    for stat in (KF.approx_kl, KF.clip_fraction):
        torch.testing.assert_close(
            stat(padded.logprobs, padded.old_logprobs, padded.mask),
            stat(ro.logprobs, ro.old_logprobs, ro.mask),
        )
    if KF.masked_var(ro.returns, ro.mask).item() > 1e-6:  # else 0/0, NaN either way
        torch.testing.assert_close(
            KF.explained_variance(padded.values, padded.returns, padded.mask),
            KF.explained_variance(ro.values, ro.returns, ro.mask),
        )


@fewer_examples(2)
@given(rollouts(), st.randoms(use_true_random=False), st.sampled_from(AGGREGATORS))
def test_batch_permutation_leaves_losses_and_statistics_alone(ro, rnd, aggregate):
    # Shuffling completions changes no mean: losses and logged statistics are order-free.
    perm = list(range(ro.mask.shape[0]))
    rnd.shuffle(perm)
    shuffled = Rollout(*(x[perm] for x in ro))
    torch.testing.assert_close(ppo_objective(shuffled, aggregate), ppo_objective(ro, aggregate))
    for stat in (KF.approx_kl, KF.clip_fraction):
        torch.testing.assert_close(
            stat(shuffled.logprobs, shuffled.old_logprobs, shuffled.mask),
            stat(ro.logprobs, ro.old_logprobs, ro.mask),
        )
    torch.testing.assert_close(
        KF.value_regression_loss(shuffled.scores, shuffled.values[:, 0]),
        KF.value_regression_loss(ro.scores, ro.values[:, 0]),
    )


@fewer_examples(2)
@given(rollouts())
def test_aggregators_relate_as_documented(ro):
    # token_sum = token_mean · (real tokens / B); sequence_mean = token_mean for equal lengths.
    loss, mask = ro.advantages, ro.mask
    b = mask.shape[0]
    torch.testing.assert_close(KF.token_sum(loss, mask), KF.token_mean(loss, mask) * mask.sum() / b)
    equal = torch.ones_like(mask)
    torch.testing.assert_close(KF.sequence_mean(loss, equal), KF.token_mean(loss, equal))


@fewer_examples(2)
@given(rollouts(min_b=2))
def test_token_sum_and_sequence_mean_do_not_depend_on_the_minibatch_split(ro):
    # Averaging the two equal halves' losses gives the whole batch's loss.
    b = ro.mask.shape[0] // 2 * 2
    loss, mask = ro.advantages[:b], ro.mask[:b]
    h = b // 2
    for aggregate in (KF.token_sum, KF.sequence_mean):
        halves = (aggregate(loss[:h], mask[:h]) + aggregate(loss[h:], mask[h:])) / 2
        torch.testing.assert_close(halves, aggregate(loss, mask))


# --------------------------------------------------------------------------- logged statistics


@given(rollouts(), clip_eps_values)
def test_approx_kl_is_nonnegative_and_clip_fraction_a_fraction(ro, eps):
    # approx_kl ≥ 0 and clip_fraction ∈ [0, 1] for any pair of policies.
    assert KF.approx_kl(ro.logprobs, ro.ref_logprobs, ro.mask).item() >= 0.0
    frac = KF.clip_fraction(ro.logprobs, ro.ref_logprobs, ro.mask, clip_eps=eps).item()
    assert 0.0 <= frac <= 1.0
    assert frac * ro.mask.sum().item() == pytest.approx(round(frac * ro.mask.sum().item()))


@fewer_examples(2)
@given(rollouts())
def test_approx_kl_and_clip_fraction_are_zero_when_nothing_moved(ro):
    # With π = π_old the update moved nothing: approx_kl = 0 and nothing is clipped.
    same = ro.logprobs.clone()
    assert KF.approx_kl(ro.logprobs, same, ro.mask).item() == 0.0
    assert KF.clip_fraction(ro.logprobs, same, ro.mask).item() == 0.0


@fewer_examples(2)
@given(rollouts(), st.floats(-3.0, 3.0))
def test_explained_variance_is_one_for_perfect_values(ro, shift):
    # Values equal to the returns, or off by one constant, explain all their variance;
    # a constant explains none of it.
    assume(int(ro.mask.sum()) >= 2)
    ramp = torch.arange(ro.mask.numel()).reshape(ro.mask.shape)
    returns = ro.returns + ramp  # never constant over two or more tokens
    ev = KF.explained_variance(returns.clone(), returns, ro.mask)
    assert ev.item() == pytest.approx(1.0)
    shifted = KF.explained_variance(returns + shift, returns, ro.mask)
    assert shifted.item() == pytest.approx(1.0, abs=1e-9)
    constant = KF.explained_variance(torch.full_like(returns, shift), returns, ro.mask)
    assert constant.item() == pytest.approx(0.0, abs=1e-9)


@fewer_examples(2)
@given(rollouts(), st.data())
def test_logged_statistics_ignore_padding_values_and_are_detached(ro, data):
    # NaN or inf under the mask changes no statistic, and none of them carries a gradient.
    shape = tuple(ro.mask.shape)

    junk = data.draw(garbage((4, *shape)))
    lp, old, v, r = (
        fill_padding(x, ro.mask, j).requires_grad_()
        for x, j in zip((ro.logprobs, ro.old_logprobs, ro.values, ro.returns), junk, strict=True)
    )
    stats = [
        (KF.approx_kl(lp, old, ro.mask), KF.approx_kl(ro.logprobs, ro.old_logprobs, ro.mask)),
        (
            KF.clip_fraction(lp, old, ro.mask),
            KF.clip_fraction(ro.logprobs, ro.old_logprobs, ro.mask),
        ),
        (
            KF.explained_variance(v, r, ro.mask),
            KF.explained_variance(ro.values, ro.returns, ro.mask),
        ),
    ]
    for got, want in stats:
        assert not got.requires_grad
        torch.testing.assert_close(got, want, equal_nan=True)


# --------------------------------------------------------------------------- gradients


def test_clipped_surrogate_gradcheck():
    # Ratios chosen away from the clip kinks 1 ± ε, for both signs of A.
    rho = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.1, 1.5]], dtype=torch.float64)
    old = torch.full_like(rho, -1.0)
    lp = (old + rho.log()).requires_grad_()
    adv = torch.tensor([[1.0] * 5, [-2.0] * 5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: KF.clipped_surrogate_loss(a, old, b, clip_eps=0.2), (lp, adv)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: KF.clipped_surrogate_loss(a, old, b, clip_eps=0.2, dual_clip=1.3), (lp, adv)
    )


def test_clipped_value_loss_gradcheck():
    v = torch.tensor([[0.0, 0.5, 1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.1, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[1.0, 1.0, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: KF.clipped_value_loss(a, old, b, 0.2), (v, ret))
    assert torch.autograd.gradcheck(lambda a, b: KF.clipped_value_loss(a, old, b, None), (v, ret))


def test_aggregators_and_regression_loss_gradcheck():
    gen = torch.Generator().manual_seed(21)
    loss = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    for aggregate in AGGREGATORS:
        assert torch.autograd.gradcheck(lambda x, f=aggregate: f(x, mask), (loss,))
    pred = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(KF.value_regression_loss, (pred, target))
    assert torch.autograd.gradcheck(KF.entropy_bonus, (loss,))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("eps", [0.0, -0.2, float("nan"), float("inf")])
def test_losses_reject_a_bad_clip_eps(eps):
    x, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    message = r"clip_eps must be a finite number > 0, got"
    with pytest.raises(ValueError, match=message):
        KF.clipped_surrogate_loss(x, x, x, clip_eps=eps)
    with pytest.raises(ValueError, match=message):
        KF.clipped_value_loss(x, x, x, clip_eps=eps)
    with pytest.raises(ValueError, match=message):
        KF.clip_fraction(x, x, mask, clip_eps=eps)


@pytest.mark.parametrize("dual", [1.0, 0.5, -2.0])
def test_clipped_surrogate_rejects_a_dual_clip_not_above_one(dual):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=rf"dual_clip must be > 1, got {dual}"):
        KF.clipped_surrogate_loss(x, x, x, dual_clip=dual)


def test_losses_reject_misaligned_inputs():
    x, y = torch.zeros(2, 3), torch.zeros(2, 4)
    assert_bad_input(
        lambda: KF.clipped_surrogate_loss(x, y, x),
        message=r"old_logprobs has shape \(2, 4\) but logprobs has shape \(2, 3\)",
        argument="old_logprobs",
    )
    assert_bad_input(
        lambda: KF.clipped_value_loss(x, x, y),
        message=r"returns has shape \(2, 4\) but values has shape \(2, 3\)",
        argument="returns",
    )
    assert_bad_input(
        lambda: KF.approx_kl(x, y, torch.ones(2, 3, dtype=torch.bool)),
        message=r"old_logprobs has shape \(2, 4\) but logprobs has shape \(2, 3\)",
        argument="old_logprobs",
    )
    assert_bad_input(
        lambda: KF.explained_variance(x, y, torch.ones(2, 3, dtype=torch.bool)),
        message=r"returns has shape \(2, 4\) but values has shape \(2, 3\)",
        argument="returns",
    )
    assert_bad_input(
        lambda: KF.value_regression_loss(torch.zeros(3), torch.zeros(4)),
        message=r"targets has shape \(4,\) but predictions has shape \(3,\)",
        argument="targets",
    )
    assert_bad_input(
        lambda: KF.clipped_surrogate_loss(x, x, torch.zeros(2, 3, dtype=torch.long)),
        message=r"advantages must be a floating tensor, got dtype torch\.int64",
        argument="advantages",
    )


@pytest.mark.parametrize("aggregate", AGGREGATORS)
def test_aggregators_reject_bad_masks(aggregate):
    loss = torch.zeros(2, 3)
    assert_bad_input(
        lambda: aggregate(loss, torch.ones(2, 3)),
        message=r"mask must be a bool tensor .*got dtype torch\.float32",
        argument="mask",
    )
    assert_bad_input(
        lambda: aggregate(loss, torch.ones(2, 2, dtype=torch.bool)),
        message=r"mask has shape \(2, 2\) but (x|loss) has shape \(2, 3\)",
        argument="mask",
    )


def test_aggregators_reject_batches_without_tokens():
    loss = torch.zeros(2, 3)
    holey = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"mask has rows with no real token: rows \[1\]"):
        KF.sequence_mean(loss, holey)
    with pytest.raises(ValueError, match=r"mask selects no element"):
        KF.token_mean(loss, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"loss is an empty batch"):
        KF.token_sum(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"predictions is an empty batch"):
        KF.value_regression_loss(torch.zeros(0), torch.zeros(0))
    assert_bad_input(
        lambda: KF.value_regression_loss(torch.zeros(2, 1), torch.zeros(2, 1)),
        message=r"predictions must have shape \[B\] \(1 dims\), got shape \(2, 1\)",
        argument="predictions",
    )


@fewer_examples(2)
@given(st.data())
def test_sequence_mean_rejects_any_empty_row(data):
    # Whatever the batch, one row without a real token makes sequence_mean raise.
    shape = data.draw(shapes())
    mask = data.draw(right_padded_masks(shape, allow_empty_rows=True))
    assume(not bool(mask.any(1).all()))
    with pytest.raises(ValueError, match=r"mask has rows with no real token"):
        KF.sequence_mean(torch.zeros(shape, dtype=torch.float64), mask)

"""Returns and advantages: reward_to_go, gae, rloo_advantages, grpo_advantages."""

import math
import statistics

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kltune.functional as KF
from strategies import (
    assert_bad_input,
    fewer_examples,
    fill_padding,
    garbage,
    pad_right,
    right_padded_masks,
    shapes,
    tensors,
)

discounts = st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0])


def loop_reward_to_go(rewards, mask, gamma):
    b, t = rewards.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                out[i, j] = sum(
                    gamma ** (k - j) * float(rewards[i, k]) for k in range(j, t) if mask[i, k]
                )
    return out


def loop_gae(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        running = 0.0
        for j in reversed(range(t)):
            if not mask[i, j]:
                running = 0.0
                continue
            nxt = float(values[i, j + 1]) if j + 1 < t and mask[i, j + 1] else 0.0
            delta = float(rewards[i, j]) + gamma * nxt - float(values[i, j])
            running = delta + gamma * lam * running
            adv[i, j] = running
    returns = torch.where(mask, adv + values, torch.zeros((), dtype=torch.float64))
    return adv, returns


def loop_rloo(scores, g):
    out = []
    for start in range(0, len(scores), g):
        group = [float(s) for s in scores[start : start + g]]
        for i, s in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(s - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def loop_grpo(scores, g, scale=True, eps=1e-6):
    out = []
    for start in range(0, len(scores), g):
        group = [float(s) for s in scores[start : start + g]]
        mean = sum(group) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1))
        out += [(x - mean) / (std + eps) if scale else x - mean for x in group]
    return torch.tensor(out, dtype=torch.float64)


@st.composite
def episodes(draw, allow_empty_rows=False):
    shape = draw(shapes())
    mask = draw(right_padded_masks(shape, allow_empty_rows=allow_empty_rows))
    return draw(tensors(shape, -2.0, 2.0)), draw(tensors(shape, -5.0, 5.0)), mask


@st.composite
def grouped_scores(draw, max_groups=4, max_group_size=5):
    g = draw(st.integers(2, max_group_size))
    n = draw(st.integers(1, max_groups))
    return draw(tensors((n * g,), -5.0, 5.0)), g


# --------------------------------------------------------------------------- hand cases


def test_reward_to_go_hand_case(dtype, device):
    r = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 99.0]], dtype=dtype, device=device)
    m = torch.tensor([[True, True, True], [True, True, False]], device=device)
    expected = torch.tensor([[0.25, 0.5, 1.0], [2.0, 2.0, 0.0]], dtype=dtype, device=device)
    torch.testing.assert_close(KF.reward_to_go(r, m, gamma=0.5), expected)
    expected_undiscounted = torch.tensor([[1.0, 1.0, 1.0], [3.0, 2.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(KF.reward_to_go(r, m).cpu(), expected_undiscounted)


def test_gae_hand_case(dtype):
    r = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 99.0]], dtype=dtype)
    v = torch.tensor([[0.5, 0.4, 0.3], [1.0, 1.0, 99.0]], dtype=dtype)
    m = torch.tensor([[True, True, True], [True, True, False]])
    # γ = 0.9, λ = 0.5, γλ = 0.45.  Row 0: δ = (−0.14, −0.13, 0.7),
    # A2 = 0.7, A1 = −0.13 + 0.45·0.7 = 0.185, A0 = −0.14 + 0.45·0.185 = −0.05675.
    # Row 1 (last token at t=1, no bootstrap): δ1 = 2 − 1 = 1, δ0 = 1 + 0.9 − 1 = 0.9,
    # A1 = 1, A0 = 0.9 + 0.45 = 1.35.
    adv, ret = KF.gae(r, v, m, gamma=0.9, lam=0.5)
    expected_adv = torch.tensor([[-0.05675, 0.185, 0.7], [1.35, 1.0, 0.0]], dtype=dtype)
    expected_ret = torch.tensor([[0.44325, 0.585, 1.0], [2.35, 2.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


def test_rloo_hand_case(dtype):
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0], dtype=dtype)
    # group 1: others' means 2.5, 2, 1.5; group 2: 1.5, 1.5, 0
    expected = torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0], dtype=dtype)
    torch.testing.assert_close(KF.rloo_advantages(scores, group_size=3), expected)
    expected_pairs = torch.tensor([-1.0, 1.0, 3.0, -3.0, -3.0, 3.0], dtype=dtype)  # A = s − other
    torch.testing.assert_close(KF.rloo_advantages(scores, group_size=2), expected_pairs)


def test_grpo_hand_case(dtype):
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=dtype)
    # group 1: mean 2, unbiased std 1; group 2: constant, so all zero
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=dtype)
    torch.testing.assert_close(KF.grpo_advantages(scores, group_size=3, eps=0.0)[:3], expected[:3])
    torch.testing.assert_close(
        KF.grpo_advantages(scores, group_size=3), expected, rtol=0, atol=1e-5
    )
    centred = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=dtype)
    torch.testing.assert_close(KF.grpo_advantages(scores, group_size=3, scale=False), centred)
    pair = torch.tensor([0.0, 2.0], dtype=dtype)  # mean 1, std √2
    expected_pair = torch.tensor([-1.0, 1.0], dtype=dtype) / math.sqrt(2.0)
    torch.testing.assert_close(KF.grpo_advantages(pair, group_size=2, eps=0.0), expected_pair)


# --------------------------------------------------------------------------- oracles vs code


@given(episodes(), discounts)
def test_reward_to_go_matches_loop_oracle(episode, gamma):
    # Vectorised reward-to-go agrees with a double loop over the real tokens.
    rewards, _, mask = episode
    torch.testing.assert_close(
        KF.reward_to_go(rewards, mask, gamma=gamma), loop_reward_to_go(rewards, mask, gamma)
    )


@given(episodes(), discounts, discounts)
def test_gae_matches_loop_oracle(episode, gamma, lam):
    # GAE agrees with the backward recursion written as a per-row Python loop.
    rewards, values, mask = episode
    adv, ret = KF.gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected_adv, expected_ret = loop_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


@given(grouped_scores())
def test_rloo_matches_loop_oracle(sg):
    # Each advantage is the score minus the mean of the other scores of its group.
    scores, g = sg
    torch.testing.assert_close(KF.rloo_advantages(scores, g), loop_rloo(scores, g))


@given(grouped_scores(), st.booleans())
def test_grpo_matches_loop_oracle(sg, scale):
    # Group standardisation agrees with a Python loop over the groups.
    scores, g = sg
    torch.testing.assert_close(
        KF.grpo_advantages(scores, g, scale=scale), loop_grpo(scores, g, scale=scale)
    )


# ------------------------------------------------------------------- GAE / returns properties


@given(episodes())
def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_values(episode):
    # γ = λ = 1: the advantage telescopes to Σ_{k≥t} r_k − V_t on real tokens.
    rewards, values, mask = episode
    adv, _ = KF.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = KF.reward_to_go(rewards, mask) - values
    torch.testing.assert_close(adv[mask], expected[mask])


@given(episodes(), discounts)
def test_gae_with_lambda_zero_is_the_td_error(episode, gamma):
    # λ = 0: A_t = r_t + γ·V_{t+1}·m_{t+1} − V_t, the one-step TD error.
    rewards, values, mask = episode
    adv, _ = KF.gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], 1)
    td = rewards + gamma * next_values - values
    torch.testing.assert_close(adv[mask], td[mask])


@given(episodes(), discounts, discounts)
def test_gae_returns_are_advantages_plus_values_and_zero_at_padding(episode, gamma, lam):
    # R = A + V on real tokens; both outputs are 0 under the mask.
    rewards, values, mask = episode
    adv, ret = KF.gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(ret[mask], (adv + values)[mask])
    for out in (adv, ret, KF.reward_to_go(rewards, mask, gamma=gamma)):
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


@given(episodes(), discounts)
def test_gae_with_lambda_one_returns_are_the_discounted_reward_to_go(episode, gamma):
    # λ = 1: the value targets are the Monte-Carlo returns, whatever the values.
    rewards, values, mask = episode
    _, ret = KF.gae(rewards, values, mask, gamma=gamma, lam=1.0)
    torch.testing.assert_close(ret, KF.reward_to_go(rewards, mask, gamma=gamma))


@fewer_examples(2)
@given(episodes(), discounts, discounts, st.data())
def test_advantage_padding_values_never_change_results_and_get_zero_gradient(
    episode, gamma, lam, data
):
    # NaN, inf or anything under the mask in rewards or values changes nothing, gets no gradient.
    rewards, values, mask = episode
    shape = tuple(mask.shape)
    dirty_r = fill_padding(rewards, mask, data.draw(garbage(shape))).requires_grad_()
    dirty_v = fill_padding(values, mask, data.draw(garbage(shape))).requires_grad_()
    adv, ret = KF.gae(dirty_r, dirty_v, mask, gamma=gamma, lam=lam)
    rtg = KF.reward_to_go(dirty_r, mask, gamma=gamma)
    clean_adv, clean_ret = KF.gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, clean_adv)
    torch.testing.assert_close(ret, clean_ret)
    torch.testing.assert_close(rtg, KF.reward_to_go(rewards, mask, gamma=gamma))
    weights = torch.linspace(-1.0, 2.0, adv.numel(), dtype=torch.float64).reshape(shape)
    grads = torch.autograd.grad(((adv + ret + rtg) * weights).sum(), (dirty_r, dirty_v))
    for grad in grads:
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
        assert bool(grad.isfinite().all())


@fewer_examples(2)
@given(episodes(), discounts, discounts, st.integers(1, 4))
def test_advantages_appending_padding_leaves_results_unchanged(episode, gamma, lam, extra):
    # Extra masked columns leave advantages, returns and reward-to-go unchanged; they hold 0.
    rewards, values, mask = episode
    t = mask.shape[1]
    rp, vp, mp = (
        pad_right(rewards, extra, 3.0),
        pad_right(values, extra, -4.0),
        pad_right(mask, extra, False),
    )
    padded = (*KF.gae(rp, vp, mp, gamma=gamma, lam=lam), KF.reward_to_go(rp, mp, gamma=gamma))
    plain = (
        *KF.gae(rewards, values, mask, gamma=gamma, lam=lam),
        KF.reward_to_go(rewards, mask, gamma=gamma),
    )
    for got, want in zip(padded, plain, strict=True):
        torch.testing.assert_close(got[:, :t], want)
        assert torch.equal(got[:, t:], torch.zeros_like(got[:, t:]))


@fewer_examples(2)
@given(episodes(), discounts, discounts, st.randoms(use_true_random=False))
def test_advantages_batch_permutation_permutes_rows(episode, gamma, lam, rnd):
    # Shuffling episodes shuffles their advantages and returns the same way.
    rewards, values, mask = episode
    perm = list(range(mask.shape[0]))
    rnd.shuffle(perm)
    got = KF.gae(rewards[perm], values[perm], mask[perm], gamma=gamma, lam=lam)
    want = KF.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w[perm])
    torch.testing.assert_close(
        KF.reward_to_go(rewards[perm], mask[perm], gamma),
        KF.reward_to_go(rewards, mask, gamma)[perm],
    )


@fewer_examples(2)
@given(episodes(), st.floats(-3.0, 3.0))
def test_gae_constant_reward_bonus_adds_it_once_per_remaining_token(episode, c):
    # γ = λ = 1: adding c to every reward adds c·(real tokens from t to the end) to A_t.
    rewards, values, mask = episode
    adv, _ = KF.gae(rewards + c, values, mask, gamma=1.0, lam=1.0)
    base, _ = KF.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    left = KF.reward_to_go(torch.ones_like(rewards), mask)  # real tokens from t to the end
    torch.testing.assert_close(adv, base + c * left)


# --------------------------------------------------------------------------- group advantages


@given(grouped_scores())
def test_rloo_advantages_sum_to_zero_within_each_group(sg):
    # Leave-one-out advantages of one prompt's completions sum to 0.
    scores, g = sg
    sums = KF.rloo_advantages(scores, g).reshape(-1, g).sum(-1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-12, rtol=0.0)


@given(grouped_scores())
def test_rloo_is_a_rescaled_centring(sg):
    # A_i = G/(G−1)·(s_i − mean of the group).
    scores, g = sg
    groups = scores.reshape(-1, g)
    expected = g / (g - 1) * (groups - groups.mean(-1, keepdim=True))
    torch.testing.assert_close(KF.rloo_advantages(scores, g), expected.reshape(-1))


@given(grouped_scores(), st.booleans())
def test_grpo_advantages_have_zero_mean_per_group(sg, scale):
    # Group-normalised advantages are centred within each prompt's group.
    scores, g = sg
    means = KF.grpo_advantages(scores, g, scale=scale).reshape(-1, g).mean(-1)
    # (equal scores centre to rounding error ~1e-16, which eps = 1e-6 scales to ~1e-10)
    torch.testing.assert_close(means, torch.zeros_like(means), atol=1e-8, rtol=0.0)


@given(grouped_scores())
def test_grpo_advantages_have_unit_std_per_group_when_spread(sg):
    # With eps = 0 each group with spread has unbiased std 1 after scaling.
    scores, g = sg
    groups = scores.reshape(-1, g)
    assume(bool((groups.std(-1) > 1e-3).all()))
    std = KF.grpo_advantages(scores, g, eps=0.0).reshape(-1, g).std(-1)
    torch.testing.assert_close(std, torch.ones_like(std))


@fewer_examples(2)
@given(grouped_scores(), st.data())
def test_group_advantages_ignore_a_per_group_offset(sg, data):
    # Adding a constant to every score of a group (a prompt's difficulty) changes no advantage.
    scores, g = sg
    offsets = data.draw(tensors((scores.shape[0] // g,), -10.0, 10.0))
    shifted = scores + offsets.repeat_interleave(g)
    torch.testing.assert_close(KF.rloo_advantages(shifted, g), KF.rloo_advantages(scores, g))
    torch.testing.assert_close(
        KF.grpo_advantages(shifted, g, scale=False), KF.grpo_advantages(scores, g, scale=False)
    )


@fewer_examples(2)
@given(grouped_scores(), st.randoms(use_true_random=False))
def test_group_advantages_permute_with_groups_and_within_groups(sg, rnd):
    # Reordering prompts, or completions within a prompt, reorders the advantages the same way.
    scores, g = sg
    n = scores.shape[0] // g
    groups = list(range(n))
    rnd.shuffle(groups)
    perm = []
    for k in groups:
        inner = list(range(k * g, (k + 1) * g))
        rnd.shuffle(inner)
        perm += inner
    for fn in (KF.rloo_advantages, KF.grpo_advantages):
        torch.testing.assert_close(fn(scores[perm], g), fn(scores, g)[perm])
    torch.testing.assert_close(KF.within_group_var(scores[perm], g), KF.within_group_var(scores, g))


# --------------------------------------------------------------------------- the variance floor


@given(grouped_scores())
def test_within_group_var_matches_loop_oracle(sg):
    # The mean over prompts of each prompt's unbiased score variance.
    scores, g = sg
    groups = [scores[k : k + g].tolist() for k in range(0, scores.shape[0], g)]
    expected = sum(statistics.variance(group) for group in groups) / len(groups)
    assert float(KF.within_group_var(scores, g)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@fewer_examples(2)
@given(grouped_scores(), st.data())
def test_within_group_var_is_the_floor_of_every_prompt_baseline(sg, data):
    # A per-prompt offset changes nothing; for any baseline b(prompt), the batch's mean
    # squared advantage is at least (G-1)/G times the floor, and leave-one-out's is G/(G-1).
    scores, g = sg
    n = scores.shape[0] // g
    offsets = data.draw(tensors((n,), -10.0, 10.0)).repeat_interleave(g)
    floor = KF.within_group_var(scores, g)
    torch.testing.assert_close(KF.within_group_var(scores + offsets, g), floor)
    baseline = data.draw(tensors((n,), -10.0, 10.0)).repeat_interleave(g)
    assert float(((scores - baseline) ** 2).mean()) >= float(floor) * (g - 1) / g - 1e-9
    rloo = KF.rloo_advantages(scores, g)
    torch.testing.assert_close((rloo**2).mean(), floor * g / (g - 1))


def test_within_group_var_estimates_the_expected_conditional_variance():
    # 8 prompts with means 0..7 and spreads 1..8, G = 4: the estimate averages to
    # E[Var(s | x)] = mean of the squared spreads (= 25.5), whatever the prompt means.
    gen = torch.Generator().manual_seed(3)
    means = torch.arange(8.0, dtype=torch.float64)[:, None]
    spread = torch.arange(1.0, 9.0, dtype=torch.float64)[:, None]

    def estimate() -> float:
        noise = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        return float(KF.within_group_var((means + spread * noise).reshape(-1), 4))

    estimates = [estimate() for _ in range(2000)]
    assert statistics.mean(estimates) == pytest.approx(float((spread**2).mean()), rel=0.03)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.8), (0.5, 0.0)])
def test_gae_and_reward_to_go_gradcheck(gamma, lam):
    gen = torch.Generator().manual_seed(11)
    r = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    m = torch.tensor([[True] * 4, [True, True, True, False], [True, False, False, False]])
    assert torch.autograd.gradcheck(lambda a, b: KF.gae(a, b, m, gamma=gamma, lam=lam), (r, v))
    assert torch.autograd.gradcheck(lambda a: KF.reward_to_go(a, m, gamma=gamma), (r,))


def test_group_advantages_gradcheck():
    gen = torch.Generator().manual_seed(12)
    s = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: KF.rloo_advantages(x, 3), (s,))
    assert torch.autograd.gradcheck(lambda x: KF.grpo_advantages(x, 2), (s,))
    assert torch.autograd.gradcheck(lambda x: KF.grpo_advantages(x, 3, scale=False), (s,))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [KF.rloo_advantages, KF.grpo_advantages, KF.within_group_var])
def test_group_advantages_reject_bad_groups(fn):
    with pytest.raises(ValueError, match=r"group_size must be >= 2 .*got 1"):
        fn(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match=r"group_size must be >= 2 .*got 0"):
        fn(torch.zeros(4), group_size=0)
    with pytest.raises(ValueError, match=r"batch of 5 completions does not split into groups of 2"):
        fn(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match=r"scores is an empty batch \(shape \(0,\)\)"):
        fn(torch.zeros(0), group_size=2)
    assert_bad_input(
        lambda: fn(torch.zeros(2, 2), group_size=2),
        message=r"scores must have shape \[B\] \(1 dims\), got shape \(2, 2\)",
        argument="scores",
    )


def test_returns_reject_bad_discounts():
    r, m = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    for gamma in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"gamma must lie in \[0, 1\], got {gamma}"):
            KF.reward_to_go(r, m, gamma=gamma)
        with pytest.raises(ValueError, match=rf"gamma must lie in \[0, 1\], got {gamma}"):
            KF.gae(r, r, m, gamma=gamma)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\], got 2.0"):
        KF.gae(r, r, m, lam=2.0)


def test_returns_reject_bad_masks_and_shapes():
    r = torch.zeros(2, 3)
    assert_bad_input(
        lambda: KF.reward_to_go(r, torch.ones(2, 3)),
        message=r"mask must be a bool tensor .*got dtype torch\.float32",
        argument="mask",
    )
    assert_bad_input(
        lambda: KF.gae(r, r, torch.ones(2, 3)),
        message=r"mask must be a bool tensor .*got dtype torch\.float32",
        argument="mask",
    )
    assert_bad_input(
        lambda: KF.gae(r, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool)),
        message=r"mask has shape \(2, 3\) but values has shape \(2, 4\)",
        argument="values",
    )
    assert_bad_input(
        lambda: KF.reward_to_go(r, torch.ones(3, 3, dtype=torch.bool)),
        message=r"mask has shape \(3, 3\) but rewards has shape \(2, 3\)",
        argument="mask",
    )

"""KL estimators (k1, k2, k3, k3 straight-through, exact) and KL-shaped rewards."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kltune.functional as KF
from strategies import (
    assert_bad_input,
    fewer_examples,
    fill_padding,
    garbage,
    logits,
    logprob_pairs,
    logprobs,
    pad_right,
    right_padded_masks,
    shapes,
    tensors,
)

ESTIMATORS = [KF.kl_k1, KF.kl_k2, KF.kl_k3, KF.kl_k3_st]
LN2 = math.log(2.0)


def loop_estimator(name, lp, ref):
    out = torch.empty_like(lp)
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            delta = float(ref[i, j]) - float(lp[i, j])
            out[i, j] = {
                "k1": -delta,
                "k2": 0.5 * delta**2,
                "k3": math.exp(delta) - 1.0 - delta,
            }[name]
    return out


def loop_kl_exact(z, z_ref, temperature=1.0):
    b, t, v = z.shape
    out = torch.empty(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            rows = []
            for logits_ in (z, z_ref):
                row = [float(logits_[i, j, k]) / temperature for k in range(v)]
                top = max(row)
                log_norm = top + math.log(sum(math.exp(r - top) for r in row))
                rows.append([r - log_norm for r in row])
            log_p, log_q = rows
            out[i, j] = sum(math.exp(a) * (a - c) for a, c in zip(log_p, log_q, strict=True))
    return out


def loop_shaped_rewards(scores, kl, mask, beta):
    out = torch.zeros_like(kl)
    for i in range(kl.shape[0]):
        last = max(j for j in range(kl.shape[1]) if mask[i, j])
        for j in range(kl.shape[1]):
            if mask[i, j]:
                out[i, j] = -beta * float(kl[i, j]) + (float(scores[i]) if j == last else 0.0)
    return out


@st.composite
def logits_pair(draw, far=True):
    shape = draw(shapes())
    z = draw(logits(shape))
    if far:
        z_ref = draw(tensors(tuple(z.shape), -10.0, 10.0))
    else:
        z_ref = z + draw(tensors(tuple(z.shape), -0.5, 0.5))
    return z, z_ref


@st.composite
def shaped_reward_inputs(draw, allow_empty_rows=False):
    shape = draw(shapes())
    mask = draw(right_padded_masks(shape, allow_empty_rows=allow_empty_rows))
    scores = draw(tensors((shape[0],), -1.0, 1.0))
    kl = draw(tensors(shape, -1.0, 5.0))  # k1 may be negative
    beta = draw(st.floats(0.0, 2.0))
    return scores, kl, mask, beta


# --------------------------------------------------------------------------- hand cases


def test_kl_estimators_hand_case(dtype, device):
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]], dtype=dtype, device=device))
    ref = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.4, 0.2, 0.1]], dtype=dtype, device=device))
    k1 = [[0.0, LN2, -LN2], [-LN2, 0.0, LN2]]
    k2 = [[0.0, LN2**2 / 2, LN2**2 / 2], [LN2**2 / 2, 0.0, LN2**2 / 2]]
    # Δ = −ln 2: 1/2 − 1 + ln 2;   Δ = +ln 2: 2 − 1 − ln 2
    k3 = [[0.0, LN2 - 0.5, 1.0 - LN2], [1.0 - LN2, 0.0, LN2 - 0.5]]
    for fn, expected in [(KF.kl_k1, k1), (KF.kl_k2, k2), (KF.kl_k3, k3), (KF.kl_k3_st, k3)]:
        got = fn(lp, ref)
        assert got.dtype == dtype
        torch.testing.assert_close(got, torch.tensor(expected, dtype=dtype, device=device))


def test_kl_exact_hand_case(dtype, device):
    z = torch.zeros(2, 3, 2, dtype=dtype, device=device)
    z_ref = torch.tensor([[[0.0, 0.0]] * 3, [[0.0, 1.0]] * 3], dtype=dtype, device=device)
    # p = (1/2, 1/2), q = (1, e)/(1 + e): KL = ln((1 + e)/2) − 1/2
    kl = math.log((1.0 + math.e) / 2.0) - 0.5
    expected = torch.tensor([[0.0] * 3, [kl] * 3], dtype=dtype, device=device)
    torch.testing.assert_close(KF.kl_exact(z, z_ref), expected)
    torch.testing.assert_close(KF.kl_exact(2 * z, 2 * z_ref, temperature=2.0), expected)
    torch.testing.assert_close(KF.kl_exact(z, z_ref, chunk_tokens=1), expected)


def test_shaped_rewards_hand_case(dtype):
    scores = torch.tensor([1.0, -1.0], dtype=dtype)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=dtype)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 - 1.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(KF.shaped_rewards(scores, kl, mask, beta=0.5), expected)
    beta = torch.tensor(0.5, dtype=dtype)
    torch.testing.assert_close(KF.shaped_rewards(scores, kl, mask, beta=beta), expected)


# --------------------------------------------------------------------------- oracles vs code


@given(shapes().flatmap(logprob_pairs))
def test_kl_estimators_match_loop_oracle(pair):
    # k1, k2, k3 and k3_st agree with the formulas evaluated in a Python loop.
    lp, ref = pair
    for name, fn in [("k1", KF.kl_k1), ("k2", KF.kl_k2), ("k3", KF.kl_k3), ("k3", KF.kl_k3_st)]:
        torch.testing.assert_close(fn(lp, ref), loop_estimator(name, lp, ref))


@fewer_examples(2)
@given(logits_pair(), st.sampled_from([1.0, 0.7, 2.0]), st.sampled_from([1, 2, 10_000]))
def test_kl_exact_matches_loop_oracle(zz, temperature, chunk):
    # The chunked vectorised exact KL agrees with a Python loop over the vocabulary.
    z, z_ref = zz
    got = KF.kl_exact(z, z_ref, temperature=temperature, chunk_tokens=chunk)
    torch.testing.assert_close(got, loop_kl_exact(z, z_ref, temperature).clamp(min=0.0))


@given(shaped_reward_inputs())
def test_shaped_rewards_match_loop_oracle(inputs):
    # shaped_rewards agrees with a Python loop placing the score on the last real token.
    scores, kl, mask, beta = inputs
    torch.testing.assert_close(
        KF.shaped_rewards(scores, kl, mask, beta), loop_shaped_rewards(scores, kl, mask, beta)
    )


# --------------------------------------------------------------------------- estimator properties


@given(shapes().flatmap(logprobs))
def test_kl_estimators_are_zero_when_the_policies_agree(lp):
    # π = π_ref on the sampled tokens gives k1 = k2 = k3 = 0 exactly.
    for fn in ESTIMATORS:
        assert torch.equal(fn(lp, lp.clone()), torch.zeros_like(lp))


@given(shapes().flatmap(logprob_pairs))
def test_k2_and_k3_are_never_negative(pair):
    # k2 and k3 are ≥ 0 token by token, for near and far policies alike.
    lp, ref = pair
    assert bool((KF.kl_k3(lp, ref) >= 0).all())
    assert bool((KF.kl_k3_st(lp, ref) >= 0).all())
    assert bool((KF.kl_k2(lp, ref) >= 0).all())


@given(shapes().flatmap(lambda s: logprob_pairs(s, kind="near")))
def test_k3_equals_k2_to_second_order_when_near(pair):
    # k3 = Δ²/2 + O(Δ³): for |Δ| ≤ 0.1 it differs from k2 by at most |Δ|³/5.
    lp, ref = pair
    delta = (ref - lp).abs()
    assert bool(((KF.kl_k3(lp, ref) - KF.kl_k2(lp, ref)).abs() <= delta**3 / 5 + 1e-15).all())


@given(shapes().flatmap(logprob_pairs))
def test_k3_st_has_k3_value_and_k2_gradient(pair):
    # The straight-through estimator's value is k3's and its gradient (both inputs) is k2's.
    lp0, ref0 = pair
    lp, ref = lp0.clone().requires_grad_(), ref0.clone().requires_grad_()
    st_value = KF.kl_k3_st(lp, ref)
    torch.testing.assert_close(st_value, KF.kl_k3(lp0, ref0))
    weights = torch.linspace(-1.0, 1.0, lp.numel(), dtype=torch.float64).reshape(lp.shape)
    grads_st = torch.autograd.grad((st_value * weights).sum(), (lp, ref))
    grads_k2 = torch.autograd.grad((KF.kl_k2(lp, ref) * weights).sum(), (lp, ref))
    for got, want in zip(grads_st, grads_k2, strict=True):
        torch.testing.assert_close(got, want)


@fewer_examples(2)
@given(logits_pair(far=False), st.sampled_from([1.0, 0.5]))
def test_k1_and_k3_average_to_the_exact_kl_over_the_vocabulary(zz, temperature):
    # Unbiasedness, exactly: Σ_v π(v)·k(v) = KL(π‖π_ref) for k1 and k3 (not for k2).
    z, z_ref = zz
    b, t, v = z.shape
    expected_k1 = torch.zeros(b, t, dtype=torch.float64)
    expected_k3 = torch.zeros(b, t, dtype=torch.float64)
    for token in range(v):
        tokens = torch.full((b, t), token)
        lp = KF.logprobs_from_logits(z, tokens, temperature=temperature)
        ref = KF.logprobs_from_logits(z_ref, tokens, temperature=temperature)
        expected_k1 += lp.exp() * KF.kl_k1(lp, ref)
        expected_k3 += lp.exp() * KF.kl_k3(lp, ref)
    exact = KF.kl_exact(z, z_ref, temperature=temperature)
    torch.testing.assert_close(expected_k1, exact, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(expected_k3, exact, atol=1e-12, rtol=1e-9)


def test_k1_and_k3_sample_means_approach_the_exact_kl():
    # Monte Carlo: means of k1 and k3 over tokens sampled from π land within 5 standard
    # errors of the exact KL, and the standard error is small enough for that to mean much.
    gen = torch.Generator().manual_seed(20240521)
    v, n = 8, 200_000
    z = torch.randn(v, dtype=torch.float64, generator=gen)
    z_ref = z + 0.7 * torch.randn(v, dtype=torch.float64, generator=gen)
    exact = KF.kl_exact(z[None, None], z_ref[None, None]).item()
    tokens = torch.multinomial(torch.softmax(z, -1), n, replacement=True, generator=gen)
    lp = torch.log_softmax(z, -1)[tokens][None]
    ref = torch.log_softmax(z_ref, -1)[tokens][None]
    for fn in (KF.kl_k1, KF.kl_k3):
        samples = fn(lp, ref)
        mean, stderr = samples.mean().item(), samples.std().item() / math.sqrt(n)
        assert 5 * stderr < 0.05 * exact, "too few samples for the test to have power"
        assert abs(mean - exact) < 5 * stderr, (fn.__name__, mean, exact, stderr)


def test_k3_has_lower_variance_than_k1_when_the_policies_are_close():
    # With π ≈ π_ref, k3 ≈ Δ²/2 varies far less than k1 = −Δ.
    gen = torch.Generator().manual_seed(7)
    v, n = 16, 50_000
    z = torch.randn(v, dtype=torch.float64, generator=gen)
    z_ref = z + 0.05 * torch.randn(v, dtype=torch.float64, generator=gen)
    tokens = torch.multinomial(torch.softmax(z, -1), n, replacement=True, generator=gen)
    lp = torch.log_softmax(z, -1)[tokens][None]
    ref = torch.log_softmax(z_ref, -1)[tokens][None]
    var_k1, var_k3 = KF.kl_k1(lp, ref).var().item(), KF.kl_k3(lp, ref).var().item()
    assert var_k3 < var_k1
    assert var_k3 < 0.1 * var_k1  # a large margin: the reason k3 is the default estimator


# --------------------------------------------------------------------------- exact KL properties


@fewer_examples(2)
@given(logits_pair())
def test_kl_exact_is_never_negative(zz):
    # Exact KL is ≥ 0 for any pair of distributions.
    z, z_ref = zz
    assert bool((KF.kl_exact(z, z_ref) >= 0).all())


@fewer_examples(2)
@given(st.data())
def test_kl_exact_is_zero_when_the_distributions_agree(data):
    # Logits equal up to a per-position constant give the same softmax, hence KL = 0.
    z = data.draw(shapes().flatmap(logits))
    shift = data.draw(tensors((*z.shape[:2], 1), -50.0, 50.0))
    torch.testing.assert_close(KF.kl_exact(z, z + shift), torch.zeros(z.shape[:2]).double())
    assert torch.equal(KF.kl_exact(z, z.clone()), torch.zeros(z.shape[:2], dtype=z.dtype))


@fewer_examples(2)
@given(logits_pair(), st.randoms(use_true_random=False))
def test_kl_exact_batch_permutation_permutes_rows(zz, rnd):
    # Shuffling the batch shuffles per-position KLs the same way.
    z, z_ref = zz
    perm = list(range(z.shape[0]))
    rnd.shuffle(perm)
    torch.testing.assert_close(KF.kl_exact(z[perm], z_ref[perm]), KF.kl_exact(z, z_ref)[perm])


# --------------------------------------------------------------------------- shaped rewards


@given(shaped_reward_inputs())
def test_shaped_rewards_sum_to_score_minus_beta_kl(inputs):
    # Σ_t r_t over real tokens = score − β·Σ_t kl_t, row by row.
    scores, kl, mask, beta = inputs
    rewards = KF.shaped_rewards(scores, kl, mask, beta)
    expected = scores - beta * KF.masked_sum(kl, mask, dim=1)
    torch.testing.assert_close(KF.masked_sum(rewards, mask, dim=1), expected)


@given(shaped_reward_inputs())
def test_shaped_rewards_put_the_score_on_the_last_real_token(inputs):
    # r + β·kl is the score at each row's last real token and 0 everywhere else.
    scores, kl, mask, beta = inputs
    rewards = KF.shaped_rewards(scores, kl, mask, beta)
    lengths = mask.sum(1)
    placed = torch.where(mask, rewards + beta * kl, torch.zeros((), dtype=kl.dtype))
    expected = torch.zeros_like(kl)
    expected[torch.arange(kl.shape[0]), lengths - 1] = scores
    torch.testing.assert_close(placed, expected)
    assert torch.equal(rewards[~mask], torch.zeros_like(rewards[~mask]))


@given(shaped_reward_inputs(), st.data())
def test_shaped_rewards_ignore_kl_at_padding_and_give_it_zero_gradient(inputs, data):
    # NaN, inf or anything else in kl under the mask changes no reward and gets no gradient.
    scores, kl, mask, beta = inputs
    dirty = fill_padding(kl, mask, data.draw(garbage(tuple(kl.shape)))).requires_grad_()
    rewards = KF.shaped_rewards(scores, dirty, mask, beta)
    torch.testing.assert_close(rewards, KF.shaped_rewards(scores, kl, mask, beta))
    (grad,) = torch.autograd.grad(rewards.sum(), dirty)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad[mask], torch.full_like(grad[mask], -beta))


@given(shaped_reward_inputs(), st.integers(1, 4))
def test_shaped_rewards_appending_padding_leaves_rewards_unchanged(inputs, extra):
    # Extra masked columns leave the old rewards as they were and hold zeros.
    scores, kl, mask, beta = inputs
    t = kl.shape[1]
    rewards = KF.shaped_rewards(
        scores, pad_right(kl, extra, 7.0), pad_right(mask, extra, False), beta
    )
    torch.testing.assert_close(rewards[:, :t], KF.shaped_rewards(scores, kl, mask, beta))
    assert torch.equal(rewards[:, t:], torch.zeros_like(rewards[:, t:]))


@fewer_examples(2)
@given(shaped_reward_inputs(), st.randoms(use_true_random=False))
def test_shaped_rewards_batch_permutation_permutes_rows(inputs, rnd):
    # Shuffling completions (scores, kl and mask together) shuffles the rewards' rows.
    scores, kl, mask, beta = inputs
    perm = list(range(kl.shape[0]))
    rnd.shuffle(perm)
    torch.testing.assert_close(
        KF.shaped_rewards(scores[perm], kl[perm], mask[perm], beta),
        KF.shaped_rewards(scores, kl, mask, beta)[perm],
    )


# --------------------------------------------------------------------------- gradients


def test_kl_estimators_gradcheck():
    gen = torch.Generator().manual_seed(3)
    lp = (-3.0 * torch.rand(2, 4, dtype=torch.float64, generator=gen)).requires_grad_()
    ref = (-3.0 * torch.rand(2, 4, dtype=torch.float64, generator=gen)).requires_grad_()
    for fn in (KF.kl_k1, KF.kl_k2, KF.kl_k3):
        assert torch.autograd.gradcheck(fn, (lp, ref))


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_kl_exact_gradcheck(temperature):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    z_ref = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: KF.kl_exact(a, b, temperature=temperature, chunk_tokens=2), (z, z_ref)
    )


def test_shaped_rewards_gradcheck():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    kl = torch.rand(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    assert torch.autograd.gradcheck(lambda s, k: KF.shaped_rewards(s, k, mask, 0.3), (scores, kl))


# --------------------------------------------------------------------------- bad input


def test_kl_estimators_reject_logprobs_of_another_shape():
    for fn in ESTIMATORS:
        assert_bad_input(
            lambda fn=fn: fn(torch.zeros(2, 3), torch.zeros(2, 4)),
            message=r"ref_logprobs has shape \(2, 4\) but logprobs has shape \(2, 3\)",
            argument="ref_logprobs",
        )


def test_kl_estimators_reject_integer_logprobs():
    for fn in ESTIMATORS:
        assert_bad_input(
            lambda fn=fn: fn(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)),
            message=r"ref_logprobs must be a floating tensor, got dtype torch\.int64",
            argument="ref_logprobs",
        )


def test_kl_exact_rejects_bad_input():
    assert_bad_input(
        lambda: KF.kl_exact(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4)),
        message=r"ref_logits has shape \(2, 3, 4\) but logits has shape \(2, 3, 5\)",
        argument="ref_logits",
    )
    assert_bad_input(
        lambda: KF.kl_exact(torch.zeros(2, 3), torch.zeros(2, 3)),
        message=r"logits must have shape \[B T V\] \(3 dims\), got shape \(2, 3\)",
        argument="logits",
    )
    for temperature in (0.0, -0.5):
        with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
            KF.kl_exact(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), temperature=temperature)


def test_shaped_rewards_reject_bad_input():
    scores, kl = torch.zeros(2), torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"beta must be >= 0, got -0\.1"):
        KF.shaped_rewards(scores, kl, mask, beta=-0.1)
    with pytest.raises(ValueError, match=r"beta must be >= 0, got -0\.1"):
        KF.shaped_rewards(scores, kl, mask, beta=torch.tensor(-0.1))
    holey = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"mask has rows with no real token: rows \[1\]"):
        KF.shaped_rewards(scores, kl, holey, beta=0.1)
    assert_bad_input(
        lambda: KF.shaped_rewards(scores, kl, torch.ones(2, 3), beta=0.1),
        message=r"mask must be a bool tensor .*got dtype torch\.float32",
        argument="mask",
    )
    assert_bad_input(
        lambda: KF.shaped_rewards(torch.zeros(3), kl, mask, beta=0.1),
        message=r"scores has 3 entries but kl has 2 rows",
        argument="kl",  # jaxtyping binds B from scores, then blames kl
    )
    assert_bad_input(
        lambda: KF.shaped_rewards(scores, kl, torch.ones(2, 4, dtype=torch.bool), beta=0.1),
        message=r"mask has shape \(2, 4\) but kl has shape \(2, 3\)",
        argument="mask",
    )

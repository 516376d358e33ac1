"""Token logprobs and entropies from logits: logprobs_from_logits, entropy_from_logits."""

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
    right_padded_masks,
    shapes,
)

CHUNKS = [1, 2, 10_000]
temperatures = st.sampled_from([1.0, 0.5, 0.7, 2.0, 3.0])


@st.composite
def logits_and_tokens(draw):
    shape = draw(shapes())
    z = draw(logits(shape))
    n = shape[0] * shape[1]
    tokens = draw(st.lists(st.integers(0, z.shape[-1] - 1), min_size=n, max_size=n))
    return z, torch.tensor(tokens, dtype=torch.long).reshape(shape)


def loop_logprobs(z, tokens, temperature=1.0):
    b, t, v = z.shape
    out = torch.empty(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            row = [float(z[i, j, k]) / temperature for k in range(v)]
            top = max(row)
            log_norm = top + math.log(sum(math.exp(r - top) for r in row))
            out[i, j] = row[int(tokens[i, j])] - log_norm
    return out


def loop_entropy(z, temperature=1.0):
    b, t, v = z.shape
    out = torch.empty(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            row = [float(z[i, j, k]) / temperature for k in range(v)]
            top = max(row)
            weights = [math.exp(r - top) for r in row]
            p = [w / sum(weights) for w in weights]
            out[i, j] = -sum(pk * math.log(pk) for pk in p if pk > 0)
    return out


# --------------------------------------------------------------------------- hand cases


@pytest.mark.parametrize("chunk", CHUNKS)
def test_logprobs_hand_case(dtype, device, chunk):
    z = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [1.0, 1.0]]] * 2, dtype=dtype, device=device)
    tokens = torch.tensor([[0, 1, 1], [1, 0, 0]], device=device)
    log_half = -math.log(2.0)
    likely = 2.0 - math.log(1.0 + math.exp(2.0))  # -0.12693
    unlikely = -math.log(1.0 + math.exp(2.0))  # -2.12693
    expected = torch.tensor([[log_half, likely, log_half], [log_half, unlikely, log_half]])
    got = KF.logprobs_from_logits(z, tokens, chunk_tokens=chunk)
    torch.testing.assert_close(got.cpu().double(), expected.double())


def test_logprobs_hand_case_with_temperature(dtype):
    z = torch.tensor([[[0.0, 2.0]]], dtype=dtype)
    got = KF.logprobs_from_logits(z, torch.tensor([[1]]), temperature=2.0)
    # softmax([0, 2] / 2) = softmax([0, 1]): log p(1) = 1 - log(1 + e)
    assert got.item() == pytest.approx(1.0 - math.log(1.0 + math.e), rel=1e-6)


def test_entropy_hand_case(dtype, device):
    z = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]]], dtype=dtype)
    got = KF.entropy_from_logits(z.to(device)).cpu().double()
    # uniform over 4 gives log 4; p = (1/4, 3/4, 0, 0) gives 1/4·log 4 + 3/4·log(4/3)
    expected = [math.log(4.0), 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)]
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))
    # temperature 2 on doubled logits is the same distribution
    got_t = KF.entropy_from_logits(2.0 * z, temperature=2.0)
    torch.testing.assert_close(got_t.double(), torch.tensor([expected], dtype=torch.float64))


def test_logprobs_and_entropy_compute_in_at_least_float32():
    z = torch.zeros(2, 3, 5)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    for dt, expected in [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        assert KF.logprobs_from_logits(z.to(dt), tokens).dtype == expected
        assert KF.entropy_from_logits(z.to(dt)).dtype == expected
        assert KF.kl_exact(z.to(dt), z.to(dt)).dtype == expected


# --------------------------------------------------------------------------- oracles vs code


@fewer_examples(2)
@given(logits_and_tokens(), temperatures, st.sampled_from(CHUNKS))
def test_logprobs_match_loop_oracle(zt, temperature, chunk):
    # Vectorised chunked logprobs agree with a per-position Python loop (float64 in and out).
    z, tokens = zt
    got = KF.logprobs_from_logits(z, tokens, temperature=temperature, chunk_tokens=chunk)
    torch.testing.assert_close(got, loop_logprobs(z, tokens, temperature))


@fewer_examples(2)
@given(shapes().flatmap(logits), temperatures)
def test_entropy_matches_loop_oracle(z, temperature):
    # Entropy agrees with −Σ p log p computed in a Python loop.
    for chunk in CHUNKS:
        got = KF.entropy_from_logits(z, temperature=temperature, chunk_tokens=chunk)
        torch.testing.assert_close(got, loop_entropy(z, temperature))


@fewer_examples(2)
@given(logits_and_tokens(), temperatures, st.sampled_from(CHUNKS))
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_logprobs_equal_log_softmax_gather_for_any_chunk_size(in_dtype, zt, temperature, chunk):
    # Equals log_softmax(logits / τ).gather(tokens) whatever the chunking, for f32 and bf16 input.
    z, tokens = zt
    z_in = z.to(in_dtype)
    got = KF.logprobs_from_logits(z_in, tokens, temperature=temperature, chunk_tokens=chunk)
    assert got.dtype == torch.float32
    reference = torch.log_softmax(z_in.double() / temperature, dim=-1)
    reference = reference.gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    # Against the unrounded float64 logits: bf16 rounding costs up to ~0.03 per logit.
    exact = torch.log_softmax(z / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    atol = 1e-5 if in_dtype == torch.float32 else 0.15
    torch.testing.assert_close(got.double(), exact, rtol=0.0, atol=atol)


# --------------------------------------------------------------------------- properties


@fewer_examples(2)
@given(shapes().flatmap(logits), temperatures)
def test_logprobs_of_every_token_exponentiate_to_a_distribution(z, temperature):
    # For each position, exp(logprob) over the whole vocabulary sums to 1 and each logprob ≤ 0.
    b, t, v = z.shape
    total = torch.zeros(b, t, dtype=torch.float64)
    for token in range(v):
        tokens = torch.full((b, t), token, dtype=torch.long)
        lp = KF.logprobs_from_logits(z, tokens, temperature=temperature)
        assert bool((lp <= 0).all())
        total += lp.exp()
    torch.testing.assert_close(total, torch.ones(b, t, dtype=torch.float64))


@fewer_examples(2)
@given(shapes().flatmap(logits), temperatures)
def test_entropy_equals_minus_sum_p_log_p_and_lies_in_0_to_log_v(z, temperature):
    # H = −Σ p log p with p from logprobs_from_logits, and 0 ≤ H ≤ log V.
    b, t, v = z.shape
    expected = torch.zeros(b, t, dtype=torch.float64)
    for token in range(v):
        lp = KF.logprobs_from_logits(z, torch.full((b, t), token), temperature=temperature)
        expected -= lp.exp() * lp
    h = KF.entropy_from_logits(z, temperature=temperature)
    torch.testing.assert_close(h, expected)
    assert bool((h >= -1e-12).all())
    assert bool((h <= math.log(v) + 1e-12).all())


@fewer_examples(2)
@given(logits_and_tokens(), temperatures)
def test_temperature_divides_the_logits(zt, temperature):
    # τ is honoured: f(logits, τ) equals f(logits / τ, 1) for logprobs and entropy.
    z, tokens = zt
    torch.testing.assert_close(
        KF.logprobs_from_logits(z, tokens, temperature=temperature),
        KF.logprobs_from_logits(z / temperature, tokens),
    )
    torch.testing.assert_close(
        KF.entropy_from_logits(z, temperature=temperature), KF.entropy_from_logits(z / temperature)
    )


@fewer_examples(2)
@given(logits_and_tokens(), st.floats(-50.0, 50.0))
def test_adding_a_constant_to_the_logits_changes_nothing(zt, shift):
    # softmax is shift-invariant: logits + c give the same logprobs and entropy.
    z, tokens = zt
    torch.testing.assert_close(
        KF.logprobs_from_logits(z + shift, tokens), KF.logprobs_from_logits(z, tokens)
    )
    torch.testing.assert_close(KF.entropy_from_logits(z + shift), KF.entropy_from_logits(z))


@fewer_examples(2)
@given(logits_and_tokens(), st.randoms(use_true_random=False))
def test_logprobs_batch_permutation_permutes_rows(zt, rnd):
    # Shuffling the batch shuffles the per-token outputs the same way.
    z, tokens = zt
    perm = list(range(z.shape[0]))
    rnd.shuffle(perm)
    torch.testing.assert_close(
        KF.logprobs_from_logits(z[perm], tokens[perm]), KF.logprobs_from_logits(z, tokens)[perm]
    )
    torch.testing.assert_close(KF.entropy_from_logits(z[perm]), KF.entropy_from_logits(z)[perm])


@fewer_examples(2)
@given(st.data())
def test_logits_at_padding_never_change_real_tokens_and_get_zero_gradient(data):
    # Garbage logits under the mask change no real token's output and get no gradient.
    z, tokens = data.draw(logits_and_tokens())
    mask = data.draw(right_padded_masks(tuple(tokens.shape)))
    dirty = fill_padding(z, mask, data.draw(garbage(tuple(z.shape), nonfinite=False)))
    dirty.requires_grad_()
    lp = KF.logprobs_from_logits(dirty, tokens, chunk_tokens=2)
    h = KF.entropy_from_logits(dirty, chunk_tokens=2)
    torch.testing.assert_close(lp[mask], KF.logprobs_from_logits(z, tokens)[mask])
    torch.testing.assert_close(h[mask], KF.entropy_from_logits(z)[mask])
    loss = KF.token_mean(lp, mask) - 0.1 * KF.token_mean(h, mask)
    (grad,) = torch.autograd.grad(loss, dirty)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_gradcheck(temperature):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(
        lambda x: KF.logprobs_from_logits(x, tokens, temperature=temperature, chunk_tokens=2),
        (z,),
    )
    assert torch.autograd.gradcheck(
        lambda x: KF.entropy_from_logits(x, temperature=temperature, chunk_tokens=4), (z,)
    )


def test_logprobs_gradient_is_onehot_minus_softmax():
    # d log p(y) / dz = onehot(y) − softmax(z): the textbook identity, checked in bf16 input.
    z = torch.tensor([[[1.0, 2.0, 0.5]]], dtype=torch.bfloat16, requires_grad=True)
    KF.logprobs_from_logits(z, torch.tensor([[1]])).sum().backward()
    p = torch.softmax(z.detach().float(), dim=-1)
    expected = torch.tensor([[[0.0, 1.0, 0.0]]]) - p
    assert z.grad is not None and z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(z.grad.float(), expected, atol=1e-2, rtol=0.0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_logprobs_and_entropy_reject_a_bad_temperature(temperature):
    z, tokens = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
        KF.logprobs_from_logits(z, tokens, temperature=temperature)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
        KF.entropy_from_logits(z, temperature=temperature)


def test_logprobs_reject_tokens_of_another_shape():
    assert_bad_input(
        lambda: KF.logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
        message=r"tokens has shape \(2, 4\) but logits has shape \(2, 3, 5\); "
        r"expected tokens of shape \(2, 3\)",
        argument="tokens",
    )


def test_logprobs_and_entropy_reject_logits_without_a_vocabulary_axis():
    assert_bad_input(
        lambda: KF.logprobs_from_logits(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)),
        message=r"logits must have shape \[B T V\] \(3 dims\), got shape \(2, 3\)",
        argument="logits",
    )
    assert_bad_input(
        lambda: KF.entropy_from_logits(torch.zeros(2, 3)),
        message=r"logits must have shape \[B T V\] \(3 dims\), got shape \(2, 3\)",
        argument="logits",
    )


# ── truncated_logits: the distribution top-k / top-p sampling draws from ─────

top_ks = st.one_of(st.none(), st.integers(1, 12))
top_ps = st.one_of(st.none(), st.floats(0.05, 1.0))


@given(logits_and_tokens(), temperatures, top_ks, top_ps)
def test_truncation_renormalises_the_kept_tokens_and_zeroes_the_rest(zt, temperature, k, p):
    z, _ = zt
    z = z.double()
    full = torch.softmax(z / temperature, dim=-1)
    q = torch.softmax(KF.truncated_logits(z, temperature, k, p), dim=-1)
    kept = q > 0
    assert torch.allclose(q.sum(-1), torch.ones_like(q.sum(-1)))
    # on the kept tokens q is p renormalised: q / p is one constant per row
    ratio = torch.where(kept, q / full, torch.nan)
    spread = ratio.nan_to_num(1.0).amax(-1) - torch.where(kept, ratio, torch.inf).amin(-1)
    assert bool((spread.abs() < 1e-9).all())
    # the kept tokens are the most likely ones
    least_kept = torch.where(kept, full, torch.inf).amin(-1)
    most_dropped = torch.where(kept, -torch.inf, full).amax(-1)
    assert bool((least_kept >= most_dropped).all())
    if k is not None:  # k at most (more only for ties at the k-th); at least k without top-p
        count, distinct = kept.sum(-1), (z.unsqueeze(-1) != z.unsqueeze(-2)).all(-1).all(-1)
        assert bool((count[distinct] <= k).all())
        if p is None:
            assert bool((count >= min(k, z.shape[-1])).all())
    if p is not None:  # the kept mass reaches p; without the least likely kept token it does not
        mass = torch.where(kept, full, 0.0).sum(-1)
        if k is None:
            assert bool((mass >= p - 1e-9).all())
            least = torch.where(kept, full, torch.inf).amin(-1)
            assert bool((mass - least < p + 1e-9).all())
    if k is None and p in (None, 1.0):
        assert torch.equal(KF.truncated_logits(z, temperature, k, p), z / temperature)


@given(logits_and_tokens(), top_ks, top_ps)
def test_a_kept_token_always_has_a_finite_logprob(zt, k, p):
    z, tokens = zt
    logprobs = KF.logprobs_from_logits(KF.truncated_logits(z, 1.0, k, p, keep=tokens), tokens)
    assert bool(torch.isfinite(logprobs).all()) and bool((logprobs > -1e4).all())
    entropy = KF.entropy_from_logits(KF.truncated_logits(z, 1.0, k, p, keep=tokens))
    assert bool(torch.isfinite(entropy).all())  # no 0 · log 0 = NaN


def test_truncation_hand_case_and_gradient_flows_only_through_kept_tokens() -> None:
    z = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).requires_grad_()
    top2 = KF.truncated_logits(z, top_k=2)
    torch.testing.assert_close(torch.softmax(top2, -1), torch.tensor([[[0.625, 0.375, 0, 0]]]))
    nucleus = torch.softmax(KF.truncated_logits(z, top_p=0.7), -1)  # 0.5 + 0.3 reaches 0.7
    torch.testing.assert_close(nucleus, torch.tensor([[[0.625, 0.375, 0, 0]]]))
    KF.logprobs_from_logits(top2, torch.tensor([[0]])).sum().backward()
    assert z.grad is not None and torch.equal(z.grad[..., 2:], torch.zeros(1, 1, 2))


def test_truncation_refuses_bad_settings() -> None:
    z = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"top_k must be >= 1, got 0"):
        KF.truncated_logits(z, top_k=0)
    with pytest.raises(TypeError):  # jaxtyping's check in the tests, ours for users
        KF.truncated_logits(z, top_k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        KF.truncated_logits(z, top_p=0.0)
    assert_bad_input(
        lambda: KF.truncated_logits(z, top_k=2, keep=torch.zeros(2, dtype=torch.long)),
        message=r"keep has shape \(2,\)",
        argument="keep",
    )

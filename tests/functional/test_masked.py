"""Masked reductions: masked_sum, masked_mean, masked_var, masked_whiten."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kltune.functional as KF
from strategies import (
    any_masks,
    assert_bad_input,
    fewer_examples,
    fill_padding,
    garbage,
    pad_right,
    right_padded_masks,
    shapes,
    tensors,
)

# --------------------------------------------------------------------------- oracles


def loop_sum(x, mask, dim=None):
    b, t = x.shape
    if dim is None:
        return sum(float(x[i, j]) for i in range(b) for j in range(t) if mask[i, j])
    if dim == 1:
        return [sum(float(x[i, j]) for j in range(t) if mask[i, j]) for i in range(b)]
    return [sum(float(x[i, j]) for i in range(b) if mask[i, j]) for j in range(t)]


def loop_mean(x, mask, dim=None):
    b, t = x.shape
    if dim is None:
        return loop_sum(x, mask) / int(mask.sum())
    sums = loop_sum(x, mask, dim)
    counts = (
        [int(mask[i].sum()) for i in range(b)]
        if dim == 1
        else [int(mask[:, j].sum()) for j in range(t)]
    )
    return [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)]


def loop_var(x, mask, unbiased=False):
    real = [float(v) for v, m in zip(x.flatten(), mask.flatten(), strict=True) if m]
    mean = sum(real) / len(real)
    return sum((v - mean) ** 2 for v in real) / (len(real) - (1 if unbiased else 0))


def loop_whiten(x, mask, shift_mean=True, eps=1e-8):
    real = [float(v) for v, m in zip(x.flatten(), mask.flatten(), strict=True) if m]
    mean = sum(real) / len(real)
    var = sum((v - mean) ** 2 for v in real) / len(real)
    out = [
        [
            ((float(x[i, j]) - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean))
            if mask[i, j]
            else 0.0
            for j in range(x.shape[1])
        ]
        for i in range(x.shape[0])
    ]
    return torch.tensor(out, dtype=torch.float64)


@st.composite
def values_and_mask(draw, right_padded=False):
    shape = draw(shapes())
    mask = draw(right_padded_masks(shape) if right_padded else any_masks(shape))
    return draw(tensors(shape)), mask


# --------------------------------------------------------------------------- hand cases


def test_masked_sum_hand_case(dtype, device):
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype, device=device)
    m = torch.tensor([[True, True, False], [True, False, False]], device=device)
    assert KF.masked_sum(x, m).item() == 7.0
    assert KF.masked_sum(x, m, dim=1).tolist() == [3.0, 4.0]
    assert KF.masked_sum(x, m, dim=0).tolist() == [5.0, 2.0, 0.0]


def test_masked_mean_hand_case_with_a_fully_masked_row(dtype, device):
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=dtype)
    m = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    x, m = x.to(device), m.to(device)
    # dim=None: (1 + 2 + 7 + 8 + 9) / 5; the empty row contributes nothing.
    assert KF.masked_mean(x, m).item() == pytest.approx(27.0 / 5.0)
    # dim=1: the empty row's mean is 0, not NaN.
    torch.testing.assert_close(
        KF.masked_mean(x, m, dim=1), torch.tensor([1.5, 0.0, 8.0], dtype=dtype, device=device)
    )


def test_masked_var_hand_case(dtype):
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, 100.0]], dtype=dtype)
    m = torch.tensor([[True, True, False], [True, True, False]])
    # real values 1, 3, 5, 7: mean 4, squared deviations 9 + 1 + 1 + 9 = 20.
    assert KF.masked_var(x, m).item() == pytest.approx(20.0 / 4.0)
    assert KF.masked_var(x, m, unbiased=True).item() == pytest.approx(20.0 / 3.0)


def test_masked_whiten_hand_case(dtype):
    x = torch.tensor([[1.0, 3.0, 9.0], [5.0, 7.0, 9.0]], dtype=dtype)
    m = torch.tensor([[True, True, False], [True, True, False]])
    s = math.sqrt(5.0)  # mean 4, population variance 5
    expected = torch.tensor([[-3 / s, -1 / s, 0.0], [1 / s, 3 / s, 0.0]], dtype=dtype)
    torch.testing.assert_close(KF.masked_whiten(x, m, eps=0.0), expected)
    torch.testing.assert_close(
        KF.masked_whiten(x, m, shift_mean=False, eps=0.0),
        torch.where(m, expected + 4.0, torch.zeros((), dtype=dtype)),
    )


def test_masked_whiten_of_a_constant_is_zero():
    x = torch.full((2, 3), 3.0, dtype=torch.float64)
    m = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(KF.masked_whiten(x, m), torch.zeros_like(x))


# --------------------------------------------------------------------------- oracles vs code


@given(values_and_mask(), st.sampled_from([None, 0, 1]))
def test_masked_sum_and_mean_match_loop_oracle(xm, dim):
    # The vectorised sum and mean agree with a Python loop over the real positions.
    x, mask = xm
    s, mean = KF.masked_sum(x, mask, dim=dim), KF.masked_mean(x, mask, dim=dim)
    expected_sum = torch.tensor(loop_sum(x, mask, dim), dtype=torch.float64)
    expected_mean = torch.tensor(loop_mean(x, mask, dim), dtype=torch.float64)
    torch.testing.assert_close(s, expected_sum)
    torch.testing.assert_close(mean, expected_mean)


@given(values_and_mask(), st.booleans())
def test_masked_var_matches_loop_oracle(xm, unbiased):
    # masked_var agrees with a Python loop (population or Bessel-corrected).
    x, mask = xm
    assume(not unbiased or int(mask.sum()) >= 2)
    expected = loop_var(x, mask, unbiased)
    assert KF.masked_var(x, mask, unbiased=unbiased).item() == pytest.approx(
        expected, rel=1e-9, abs=1e-9
    )


@given(values_and_mask(), st.booleans())
def test_masked_whiten_matches_loop_oracle(xm, shift_mean):
    # masked_whiten agrees with a Python loop.
    x, mask = xm
    torch.testing.assert_close(
        KF.masked_whiten(x, mask, shift_mean=shift_mean), loop_whiten(x, mask, shift_mean)
    )


# --------------------------------------------------------------------------- properties


@fewer_examples(2)
@given(st.data())
def test_masked_values_at_padding_never_change_results_and_get_zero_gradient(data):
    # Any value under the mask, NaN and inf included, leaves every result and gradient alone.
    shape = data.draw(shapes())
    mask = data.draw(any_masks(shape))
    x = data.draw(tensors(shape))
    dirty = fill_padding(x, mask, data.draw(garbage(shape))).requires_grad_()
    clean = x.clone().requires_grad_()
    weights = data.draw(tensors(shape, -1.0, 1.0))  # a random upstream gradient

    def outputs(v):
        return [
            KF.masked_sum(v, mask),
            KF.masked_sum(v, mask, dim=1),
            KF.masked_mean(v, mask),
            KF.masked_mean(v, mask, dim=0),
            KF.masked_var(v, mask),
            KF.masked_whiten(v, mask),
            KF.masked_whiten(v, mask, shift_mean=False),
        ]

    for got, want in zip(outputs(dirty), outputs(clean), strict=True):
        torch.testing.assert_close(got, want)
        w = weights if got.shape == weights.shape else 1.0
        (g_dirty,) = torch.autograd.grad((got * w).sum(), dirty)
        (g_clean,) = torch.autograd.grad((want * w).sum(), clean)
        assert torch.equal(g_dirty[~mask], torch.zeros_like(g_dirty[~mask]))
        torch.testing.assert_close(g_dirty[mask], g_clean[mask])


@fewer_examples(2)
@given(values_and_mask(right_padded=True), st.integers(1, 4))
def test_masked_appending_padding_leaves_results_unchanged(xm, extra):
    # Extra masked columns change no reduction, and whitening is unchanged on the old columns.
    x, mask = xm
    xp, mp = pad_right(x, extra, 123.0), pad_right(mask, extra, False)
    torch.testing.assert_close(KF.masked_sum(xp, mp), KF.masked_sum(x, mask))
    torch.testing.assert_close(KF.masked_mean(xp, mp), KF.masked_mean(x, mask))
    torch.testing.assert_close(KF.masked_mean(xp, mp, dim=1), KF.masked_mean(x, mask, dim=1))
    torch.testing.assert_close(KF.masked_var(xp, mp), KF.masked_var(x, mask))
    whitened = KF.masked_whiten(xp, mp)
    torch.testing.assert_close(whitened[:, : x.shape[1]], KF.masked_whiten(x, mask))
    assert torch.equal(whitened[:, x.shape[1] :], torch.zeros_like(whitened[:, x.shape[1] :]))


@fewer_examples(2)
@given(values_and_mask(), st.randoms(use_true_random=False))
def test_masked_batch_permutation_permutes_rows_and_leaves_means_alone(xm, rnd):
    # Shuffling rows shuffles per-row results and leaves batch statistics unchanged.
    x, mask = xm
    perm = list(range(x.shape[0]))
    rnd.shuffle(perm)
    xp, mp = x[perm], mask[perm]
    torch.testing.assert_close(KF.masked_sum(xp, mp, dim=1), KF.masked_sum(x, mask, dim=1)[perm])
    torch.testing.assert_close(KF.masked_mean(xp, mp, dim=1), KF.masked_mean(x, mask, dim=1)[perm])
    torch.testing.assert_close(KF.masked_mean(xp, mp), KF.masked_mean(x, mask))
    torch.testing.assert_close(KF.masked_var(xp, mp), KF.masked_var(x, mask))
    torch.testing.assert_close(KF.masked_whiten(xp, mp), KF.masked_whiten(x, mask)[perm])


@given(values_and_mask())
def test_masked_whiten_gives_zero_mean_and_unit_variance(xm):
    # Over the real positions, whitened values have mean 0 and variance 1 (unless constant).
    x, mask = xm
    w = KF.masked_whiten(x, mask, eps=0.0)
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
    if KF.masked_var(x, mask).item() < 1e-12:  # constant: 0/0 without eps, see the eps case
        torch.testing.assert_close(
            KF.masked_whiten(x, mask), torch.zeros_like(x), atol=1e-6, rtol=0.0
        )
        return
    assert KF.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert KF.masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-9)


@given(values_and_mask())
def test_masked_whiten_without_shift_keeps_the_mean(xm):
    # shift_mean=False rescales around the mean: the mean stays, the variance becomes 1.
    x, mask = xm
    w = KF.masked_whiten(x, mask, shift_mean=False)
    mean = KF.masked_mean(x, mask).item()
    assert KF.masked_mean(w, mask).item() == pytest.approx(mean, abs=1e-9)
    if KF.masked_var(x, mask).item() > 1e-12:
        w = KF.masked_whiten(x, mask, shift_mean=False, eps=0.0)
        assert KF.masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-9)


@given(st.data())
def test_masked_mean_of_a_fully_masked_row_is_zero_and_ignored_by_the_batch_mean(data):
    # A row with no real token has mean 0 along dim=1 and does not enter the global mean.
    b, t = data.draw(shapes(min_b=2))
    mask = data.draw(right_padded_masks((b, t), allow_empty_rows=True))
    empty = data.draw(st.integers(0, b - 1))
    mask[empty] = False
    assume(bool(mask.any()))
    x = data.draw(tensors((b, t)))
    assert KF.masked_mean(x, mask, dim=1)[empty].item() == 0.0
    kept = torch.tensor([i for i in range(b) if i != empty])
    torch.testing.assert_close(KF.masked_mean(x, mask), KF.masked_mean(x[kept], mask[kept]))


@fewer_examples(2)
@given(values_and_mask(), st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_masked_whiten_is_invariant_to_affine_maps(xm, scale, shift):
    # Whitening a·x + b (a > 0) gives the same result as whitening x.
    x, mask = xm
    if KF.masked_var(x, mask).item() < 1e-6:  # 0/0 without eps: nothing to compare
        return
    torch.testing.assert_close(
        KF.masked_whiten(scale * x + shift, mask, eps=0.0), KF.masked_whiten(x, mask, eps=0.0)
    )


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, m: KF.masked_sum(x, m),
        lambda x, m: KF.masked_sum(x, m, dim=0),
        lambda x, m: KF.masked_mean(x, m),
        lambda x, m: KF.masked_mean(x, m, dim=1),
        lambda x, m: KF.masked_var(x, m),
        lambda x, m: KF.masked_var(x, m, unbiased=True),
        lambda x, m: KF.masked_whiten(x, m),
        lambda x, m: KF.masked_whiten(x, m, shift_mean=False),
    ],
    ids=["sum", "sum_dim0", "mean", "mean_dim1", "var", "var_unbiased", "whiten", "whiten_keep"],
)
def test_masked_gradcheck(fn):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    m = torch.tensor(
        [[True, True, True, False, False], [True, False, False, False, False], [True] * 5]
    )
    assert torch.autograd.gradcheck(lambda v: fn(v, m), (x,))


# --------------------------------------------------------------------------- bad input


def test_masked_rejects_a_float_mask():
    x = torch.zeros(2, 3)
    for fn in (KF.masked_sum, KF.masked_mean, KF.masked_var, KF.masked_whiten):
        assert_bad_input(
            lambda fn=fn: fn(x, torch.ones(2, 3)),
            message=r"mask must be a bool tensor .*got dtype torch\.float32",
            argument="mask",
        )


def test_masked_rejects_a_mask_of_another_shape():
    x = torch.zeros(2, 3)
    for fn in (KF.masked_sum, KF.masked_mean, KF.masked_var, KF.masked_whiten):
        assert_bad_input(
            lambda fn=fn: fn(x, torch.ones(2, 4, dtype=torch.bool)),
            message=r"mask has shape \(2, 4\) but x has shape \(2, 3\)",
            argument="mask",
        )


def test_masked_mean_rejects_a_mask_that_selects_nothing():
    x = torch.zeros(2, 3)
    m = torch.zeros(2, 3, dtype=torch.bool)
    for fn in (KF.masked_mean, KF.masked_var, KF.masked_whiten):
        with pytest.raises(ValueError, match=r"mask selects no element .*shape \(2, 3\)"):
            fn(x, m)


def test_masked_var_unbiased_rejects_a_single_position():
    m = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="at least two real positions"):
        KF.masked_var(torch.zeros(2, 2), m, unbiased=True)

"""logprobs_from_hidden: the output layer fused into the logprobs, in chunks, against
the plain path (logits = hidden @ Wᵀ + b, then logprobs_from_logits / entropy_from_logits).

Tolerance: float64 inputs, 1e-10 on values and gradients (the two paths differ
only in the order of float64 sums).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kltune.functional as KF
from strategies import without_runtime_typecheck


@st.composite
def heads(draw):
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    d, v = draw(st.integers(1, 6)), draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    tokens = torch.randint(0, v, (b, t), generator=g)
    upstream = torch.randn(b, t, generator=g, dtype=torch.float64)
    return hidden, weight, bias, tokens, upstream


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


@settings(deadline=None)
@given(heads(), st.sampled_from([1.0, 0.7, 2.0]), st.sampled_from([1, 2, 7, 4096]))
def test_fused_head_equals_logits_then_logprobs(head, temperature, chunk) -> None:
    hidden, weight, bias, tokens, upstream = head
    inputs = [x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    logprobs, entropy = KF.logprobs_from_hidden(
        inputs[0], inputs[1], tokens, temperature, bias=inputs[2], chunk_tokens=chunk
    )
    fused_grads = _grads((logprobs * upstream).sum(), inputs)

    plain_inputs = [
        x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)
    ]
    logits = torch.nn.functional.linear(*[x for x in plain_inputs if x is not None])
    plain = KF.logprobs_from_logits(logits, tokens, temperature)
    plain_entropy = KF.entropy_from_logits(logits.detach(), temperature)
    plain_grads = _grads((plain * upstream).sum(), plain_inputs)

    torch.testing.assert_close(logprobs, plain, atol=1e-10, rtol=0)
    torch.testing.assert_close(entropy, plain_entropy, atol=1e-10, rtol=0)
    assert not entropy.requires_grad
    for fused_grad, plain_grad in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(fused_grad, plain_grad, atol=1e-10, rtol=1e-10)

    # Without the entropy (the reference's variant; its logits buffer is overwritten in
    # place), with gradients too: its kept-softmax branch must not alias that buffer.
    from kltune.functional._head import _apply

    only_inputs = [
        x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)
    ]
    only, _ = _apply(
        only_inputs[0], only_inputs[1], tokens, temperature, only_inputs[2], chunk, False
    )
    torch.testing.assert_close(only, plain, atol=1e-10, rtol=0)
    for grad, plain_grad in zip(
        _grads((only * upstream).sum(), only_inputs), plain_grads, strict=True
    ):
        torch.testing.assert_close(grad, plain_grad, atol=1e-10, rtol=1e-10)


def test_float32_hidden_gives_float32_logprobs_and_gradients() -> None:
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    logprobs, _ = KF.logprobs_from_hidden(hidden, weight, torch.zeros(2, 3, dtype=torch.long))
    logprobs.sum().backward()
    assert logprobs.dtype == torch.float32
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32
    assert weight.grad is not None and weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "hidden, weight, tokens, match",
    [
        (torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long), "hidden"),
        (torch.zeros(2, 3, 4), torch.zeros(5, 3), torch.zeros(2, 3, dtype=torch.long), "width"),
        (torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 2, dtype=torch.long), "tokens"),
        (torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3), "integer"),
        (torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.full((2, 3), 5), r"\[0, 5\)"),
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(5, 4), torch.zeros(2, 3), "floating"),
    ],
)
def test_bad_inputs_are_named(hidden, weight, tokens, match) -> None:
    with without_runtime_typecheck(), pytest.raises(ValueError, match=match):
        KF.logprobs_from_hidden(hidden, weight, tokens)


def test_a_bias_of_the_wrong_length_is_named() -> None:
    with without_runtime_typecheck(), pytest.raises(ValueError, match="bias"):
        KF.logprobs_from_hidden(
            torch.zeros(1, 2, 3),
            torch.zeros(4, 3),
            torch.zeros(1, 2, dtype=torch.long),
            bias=torch.zeros(3),
        )


def test_logprobs_without_entropy_are_the_same_logprobs() -> None:
    from kltune.functional._head import logprobs_only_from_hidden

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=generator)
    weight = torch.randn(11, 8, generator=generator)
    tokens = torch.randint(0, 11, (2, 5), generator=generator)
    full, entropy = KF.logprobs_from_hidden(hidden, weight, tokens, 0.7)
    alone = logprobs_only_from_hidden(hidden, weight, tokens, 0.7, None)
    assert entropy.shape == full.shape
    assert torch.equal(alone, full)
    with pytest.raises(ValueError, match="tokens must be ids"):  # checked like the public one
        logprobs_only_from_hidden(hidden, weight, tokens + 11, 0.7, None)


@pytest.mark.parametrize("chunk", [2, 4096])  # softmax recomputed / kept from forward
def test_a_second_backward_through_the_same_graph_gives_the_same_gradients(chunk: int) -> None:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 9, (2, 3), generator=generator)
    logprobs, _ = KF.logprobs_from_hidden(hidden, weight, tokens, chunk_tokens=chunk)
    first = torch.autograd.grad(logprobs.sum(), [hidden, weight], retain_graph=True)
    second = torch.autograd.grad(logprobs.sum(), [hidden, weight])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

"""The lean RMSNorm and SwiGLU autograd functions against the modules' own forward:
same outputs, same gradients, fewer saved bytes."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kltune
from kltune._forwards import _RMSNorm, _SwiGLU, lean_activations


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**16), st.sampled_from([1e-6, 0.1]))
def test_rms_norm_matches_the_llama_module(rows, width, seed, eps) -> None:
    # LlamaRMSNorm normalises in float32 whatever the input dtype; so does the lean one.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(seed)
    module = LlamaRMSNorm(width, eps=eps).double()
    with torch.no_grad():
        module.weight.copy_(torch.randn(width, generator=g, dtype=torch.float64))
    x = (torch.randn(rows, 3, width, generator=g, dtype=torch.float64) * 3).requires_grad_()
    upstream = torch.randn(rows, 3, width, generator=g, dtype=torch.float64)
    plain = module(x)
    lean = _RMSNorm.apply(x, module.weight, eps)
    torch.testing.assert_close(lean, plain, atol=0, rtol=0)
    expected = torch.autograd.grad((plain * upstream).sum(), [x, module.weight])
    got = torch.autograd.grad((lean * upstream).sum(), [x, module.weight])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # float32 inside


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(0, 2**16))
def test_swiglu_matches_autograd_of_the_plain_formula(rows, width, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(rows, width, generator=g, dtype=torch.float64) * 4).requires_grad_()
    up = torch.randn(rows, width, generator=g, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(rows, width, generator=g, dtype=torch.float64)
    plain = nn.functional.silu(gate) * up
    lean = _SwiGLU.apply(gate, up)
    torch.testing.assert_close(lean, plain, atol=1e-12, rtol=0)
    expected = torch.autograd.grad((plain * upstream).sum(), [gate, up])
    got = torch.autograd.grad((lean * upstream).sum(), [gate, up])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_a_llama_scores_the_same_with_fewer_saved_activations() -> None:
    model, tokenizer = kltune.tiny_random_model("llama", seed=0)
    policy = kltune.Policy(model, tokenizer, value_head=True)
    rollout = policy.rollout(
        ["The film", "A long prompt about a film"],
        max_new_tokens=6,
        generator=torch.Generator().manual_seed(0),
    )
    plain = copy.deepcopy(policy)
    outs, saved = [], []
    for candidate, lean in ((policy, True), (plain, False)):
        if not lean:  # the modules' own forward: lean_activations made a no-op
            candidate.model = _Unlean(candidate.model)
        saved.append(_saved_bytes(lambda c=candidate: outs.append(c.score(rollout))))
        out = outs[-1]
        (out.logprobs.sum() + out.values.sum()).backward()  # type: ignore[union-attr]
    lean_out, plain_out = outs
    torch.testing.assert_close(lean_out.logprobs, plain_out.logprobs, atol=1e-6, rtol=1e-6)
    lean_grads = {n: p.grad for n, p in policy.named_parameters()}
    for name, p in plain.named_parameters():
        key = name.replace("model.inner.", "model.")
        torch.testing.assert_close(lean_grads[key], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert saved[0] < saved[1]


class _Unlean(nn.Module):
    """A model whose modules lean_activations cannot see (the plain path, for comparison)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def modules(self):  # type: ignore[override]
        return iter([self])

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_only_llama_family_modules_are_swapped_and_all_are_restored() -> None:
    llama, _ = kltune.tiny_random_model("llama", seed=0)
    layers = llama.config.num_hidden_layers
    with lean_activations(llama) as swapped:
        assert swapped == 3 * layers + 1  # two norms and an MLP a layer, the final norm
    assert not [m for m in llama.modules() if "forward" in vars(m)]
    gpt2, _ = kltune.tiny_random_model("gpt2", seed=0)
    with lean_activations(gpt2) as swapped:
        assert swapped == 0


def test_swapped_forwards_are_restored_after_an_error() -> None:
    llama, _ = kltune.tiny_random_model("llama", seed=0)
    with pytest.raises(RuntimeError, match="boom"), lean_activations(llama):
        raise RuntimeError("boom")
    assert not [m for m in llama.modules() if "forward" in vars(m)]

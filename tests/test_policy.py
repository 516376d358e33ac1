"""Policy (sampling, scoring, token alignment), FrozenReference and AdapterOffReference.

Every model is a tiny random one built from a config (``tiny_random_model``),
with a 259-token byte vocabulary and 256 positions. Tolerance for "the same
logprobs" in float32: 1e-5 (observed differences are a few 1e-7).
"""

import copy
import math

import pytest
import torch
from torch import nn

import kltune
import kltune.functional as KF
from kltune import AdapterOffReference, FrozenReference, Policy, Rollout
from strategies import without_runtime_typecheck

ARCHS = ["gpt2", "llama"]
ATOL = 1e-5  # float32 logprobs of the same tokens through different code paths
PROMPTS = ["The movie was", "hi", "A much longer prompt, about films and acting,"]
# lm_head scales that give peaked next-token distributions (top-3 mass ~0.5-0.65):
# GPT-2 ties lm_head to the input embeddings, so its scale acts twice.
PEAKED = {"gpt2": 10.0, "llama": 30.0}
EOS_BIAS = 2.5  # p(EOS) ~ 5% a step: some completions end, some are truncated

LORA_WARNING = (
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"  # peft 0.21 / transformers 5
)


def _policy(
    arch: str = "llama",
    *,
    scale: float = 1.0,
    eos_bias: float | None = None,
    value_head: bool = False,
    seed: int = 0,
    lean_decoding: bool = True,
) -> Policy:
    """A tiny random policy; ``scale`` sharpens its logits, ``eos_bias`` makes EOS likelier."""
    model, tokenizer = kltune.tiny_random_model(arch, seed=seed)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(scale)
        if eos_bias is not None:
            bias = torch.zeros(head.out_features)
            bias[tokenizer.eos_token_id] = eos_bias
            head.bias = nn.Parameter(bias)
    return Policy(model, tokenizer, value_head=value_head, lean_decoding=lean_decoding)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs()[mask].max())


def _logits(policy: Policy, rollout: Rollout) -> torch.Tensor:
    """Next-token logits aligned with the response tokens (the policy's current weights)."""
    return FrozenReference(policy).logits(rollout)


def oracle_logprobs(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """log π(response_t | prompt, response_<t), one row at a time, without any padding.

    A plain loop: the real prompt and response tokens of one row through the
    model with default positions and no mask, then one position per token.
    """
    out = torch.zeros(rollout.response_ids.shape, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(rollout)):
            prompt = rollout.prompt_ids[i][rollout.prompt_mask[i]]
            response = rollout.response_ids[i][rollout.response_mask[i]]
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0]
            for t in range(len(response)):
                z = logits[len(prompt) - 1 + t].double() / rollout.temperature
                out[i, t] = z[response[t]] - torch.logsumexp(z, dim=0)
    return out


# --------------------------------------------------------------------------- rollout()


def test_rollout_rows_of_a_prompt_are_contiguous_and_texts_travel() -> None:
    policy = _policy(eos_bias=EOS_BIAS)
    r = policy.rollout(
        PROMPTS, max_new_tokens=6, completions_per_prompt=3, temperature=0.8, generator=_gen()
    )
    tokenizer = policy.tokenizer
    assert len(r) == 9 and r.response_ids.shape[1] <= 6
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.prompts == tuple(p for p in PROMPTS for _ in range(3))
    assert r.temperature == 0.8
    for i in range(len(r)):
        real_prompt = r.prompt_ids[i][r.prompt_mask[i]].tolist()
        assert real_prompt == tokenizer(r.prompts[i]).input_ids
        real = r.response_ids[i][r.response_mask[i]]
        # completions are decoded without special tokens (EOS, or a sampled pad token)
        assert r.completions[i] == tokenizer.decode(real, skip_special_tokens=True)
    # prompts are left padded: real tokens end at the last column
    assert bool(r.prompt_mask[:, -1].all())
    assert torch.equal(r.prompt_mask, r.prompt_mask.cummax(1).values)
    assert bool((r.old_logprobs[r.response_mask] < 0).all())
    assert bool((r.old_logprobs[~r.response_mask] == 0).all())


def test_same_seed_same_completions_and_another_seed_others() -> None:
    policy = _policy()
    first = policy.rollout(PROMPTS, max_new_tokens=8, generator=_gen(7))
    again = policy.rollout(PROMPTS, max_new_tokens=8, generator=_gen(7))
    other = policy.rollout(PROMPTS, max_new_tokens=8, generator=_gen(8))
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.old_logprobs, again.old_logprobs)
    assert first.completions == again.completions
    assert not torch.equal(first.response_ids, other.response_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_response_mask_ends_with_the_first_eos(arch: str) -> None:
    policy = _policy(arch, eos_bias=EOS_BIAS)
    eos, pad = policy.eos_token_id, policy.pad_token_id
    r = policy.rollout(
        ["a", "bb", "ccc", "dddd"], max_new_tokens=10, completions_per_prompt=2, generator=_gen()
    )
    assert r.response_ids.shape[1] == 10
    assert bool(r.ended.any()) and not bool(r.ended.all())  # both kinds are exercised
    for i in range(len(r)):
        mask, ids, n = r.response_mask[i], r.response_ids[i], int(r.lengths[i])
        assert mask.tolist() == [True] * n + [False] * (10 - n)  # right padded
        real_eos = (ids[:n] == eos).nonzero().flatten().tolist()
        if r.ended[i]:
            assert real_eos == [n - 1]  # the EOS is the last real token, and the only one
        else:
            assert real_eos == [] and n == 10  # truncated at max_new_tokens
        assert bool((ids[n:] == pad).all())


def test_certain_eos_stops_every_row_after_one_token() -> None:
    policy = _policy(eos_bias=30.0)
    r = policy.rollout(PROMPTS, max_new_tokens=10, completions_per_prompt=2, generator=_gen())
    assert r.response_ids.shape == (6, 1)  # sampling stopped once every row had ended
    assert bool(r.ended.all()) and bool(r.response_mask.all())
    assert bool((r.response_ids == policy.eos_token_id).all())
    assert r.completions == ("",) * 6
    assert float(r.old_logprobs.min()) > -1e-3  # EOS had probability ~1
    # T = 1: score() forwards the prompt alone and keeps its last logit row
    assert _max_gap(policy.score(r).logprobs, r.old_logprobs, r.response_mask) < ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_without_stop_at_eos_every_completion_has_full_length(arch: str) -> None:
    policy = _policy(arch, eos_bias=EOS_BIAS)
    kwargs = {"max_new_tokens": 10, "completions_per_prompt": 2}
    stopping = policy.rollout(["a", "bb", "ccc"], generator=_gen(), **kwargs)
    assert bool(stopping.ended.any())  # with the default, some rows end early
    r = policy.rollout(["a", "bb", "ccc"], generator=_gen(), stop_at_eos=False, **kwargs)
    assert r.response_ids.shape == (6, 10) and bool(r.response_mask.all())
    assert not bool(r.ended.any())
    assert bool((r.response_ids == policy.eos_token_id).any())  # EOS drawn and kept going
    # the same token stream as the stopping rollout, up to each row's end
    for i in range(len(r)):
        n = int(stopping.lengths[i])
        assert torch.equal(r.response_ids[i, :n], stopping.response_ids[i, :n])
    # EOS is an ordinary token: the recorded logprobs are those score() computes
    assert _max_gap(policy.score(r).logprobs, r.old_logprobs, r.response_mask) < ATOL


def test_stop_at_eos_must_be_a_bool() -> None:
    with without_runtime_typecheck():
        with pytest.raises(TypeError, match="stop_at_eos must be a bool"):
            _policy().rollout(PROMPTS, max_new_tokens=2, stop_at_eos=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="stop_at_eos must be a bool"):
            kltune.Sampling(stop_at_eos="no")  # type: ignore[arg-type]


def test_without_a_pad_token_eos_pads() -> None:
    model, tokenizer = kltune.tiny_random_model("llama")
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    head = model.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[tokenizer.eos_token_id] = EOS_BIAS
    head.bias = nn.Parameter(bias)
    policy = Policy(model, tokenizer)
    assert policy.pad_token_id == tokenizer.eos_token_id
    r = policy.rollout(
        ["a", "bbbbbb"], max_new_tokens=10, completions_per_prompt=4, generator=_gen()
    )
    assert bool((r.prompt_ids[~r.prompt_mask] == tokenizer.eos_token_id).all())
    assert bool((r.response_ids[~r.response_mask] == tokenizer.eos_token_id).all())
    assert bool((~r.response_mask).any())


def test_tokenizer_without_pad_and_eos_is_an_error() -> None:
    model, tokenizer = kltune.tiny_random_model("llama")
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        Policy(model, tokenizer)


def test_empty_prompt_becomes_bos_and_without_bos_eos() -> None:
    # Documented in Policy.encode_prompts: the start of a document.
    policy = _policy()
    tokenizer = policy.tokenizer
    ids, mask = policy.encode_prompts(["", "ab"])
    assert ids[0, -1] == tokenizer.bos_token_id and mask[0].tolist() == [False, True]
    r = policy.rollout([""], max_new_tokens=3, generator=_gen())
    assert r.prompt_ids.tolist() == [[tokenizer.bos_token_id]]
    tokenizer.bos_token = None
    ids, _ = policy.encode_prompts([""])
    assert ids.tolist() == [[tokenizer.eos_token_id]]  # not the pad token


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompts": []}, ValueError, r"prompts is empty"),
        ({"prompts": "hello"}, TypeError, r"got a single str"),
        ({"prompts": ["ok", 3]}, TypeError, r"prompts\[1\] must be a str, got int"),
        ({"prompts": ["ok", b"bytes"]}, TypeError, r"prompts\[1\] must be a str, got bytes"),
        ({"prompts": ["ok", "x" * 300]}, ValueError, r"prompts\[1\] has 300 tokens.*context of 256 tokens"),
        ({"prompts": ["x" * 250], "max_new_tokens": 7}, ValueError, r"prompts\[0\] has 250 tokens; with max_new_tokens=7"),
        ({"max_new_tokens": 0}, ValueError, r"max_new_tokens must be >= 1, got 0"),
        ({"max_new_tokens": -3}, ValueError, r"max_new_tokens must be >= 1, got -3"),
        ({"temperature": 0.0}, ValueError, r"temperature must be > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, r"temperature must be > 0, got -1.0"),
        ({"temperature": math.nan}, ValueError, r"temperature must be > 0, got nan"),
        ({"top_p": 0.0}, ValueError, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, r"top_p must lie in \(0, 1\]"),
        ({"top_k": 0}, ValueError, r"top_k must be >= 1"),
        ({"completions_per_prompt": 0}, ValueError, r"completions_per_prompt must be >= 1"),
    ],
)  # fmt: skip
def test_bad_rollout_arguments_name_the_problem(kwargs, error, match) -> None:
    policy = _policy("gpt2")
    arguments = {"prompts": ["ok"], "max_new_tokens": 4, **kwargs}
    prompts = arguments.pop("prompts")
    # Under the tests' hook, beartype may reject a non-str item first (it checks a
    # random item of a Sequence); without it, as users run, our own check names it.
    hooked = match + ("|Type-check error" if error is TypeError else "")
    with pytest.raises(error, match=hooked):
        policy.rollout(prompts, generator=_gen(), **arguments)
    with without_runtime_typecheck(), pytest.raises(error, match=match):
        policy.rollout(prompts, generator=_gen(), **arguments)


def test_a_prompt_that_just_fits_the_context_samples() -> None:
    # 250 prompt tokens + 6 new ones = 256 positions: the limit, allowed (GPT-2 would
    # fail with an index error past its 256 learned positions).
    policy = _policy("gpt2", eos_bias=-30.0)
    r = policy.rollout(["x" * 250, "y"], max_new_tokens=6, generator=_gen())
    assert r.response_ids.shape == (2, 6)
    out = policy.score(r)
    assert _max_gap(out.logprobs, r.old_logprobs, r.response_mask) < ATOL


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_alone_equal_logprobs_inside_a_left_padded_batch(arch: str) -> None:
    policy = _policy(arch, eos_bias=EOS_BIAS)
    alone = policy.rollout(["hi"], max_new_tokens=10, completions_per_prompt=2, generator=_gen(1))
    others = policy.rollout(
        [PROMPTS[2], PROMPTS[0] * 3], max_new_tokens=10, completions_per_prompt=2, generator=_gen(2)
    )
    batch = Rollout.concat([others, alone, others])
    rows = slice(len(others), len(others) + len(alone))
    assert bool((~batch.prompt_mask[rows]).any())  # "hi" is left padded in the batch
    scored_alone = policy.score(alone).logprobs
    scored_batch = policy.score(batch).logprobs[rows]
    gap = _max_gap(
        scored_batch[:, : alone.response_ids.shape[1]], scored_alone, alone.response_mask
    )
    print(f"{arch}: max |Δ logprob| alone vs in a padded batch = {gap:.2e}")
    assert gap < ATOL
    assert _max_gap(scored_alone, alone.old_logprobs, alone.response_mask) < ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_sampling_alone_equals_sampling_inside_a_batch(arch: str) -> None:
    # top_k=1 makes sampling deterministic: the same prompt must give the same tokens
    # and behaviour logprobs alone and left padded among longer prompts.
    policy = _policy(arch, scale=PEAKED[arch])
    alone = policy.rollout(["hi"], max_new_tokens=12, top_k=1, generator=_gen(0))
    batch = policy.rollout(
        [PROMPTS[2], "hi", PROMPTS[0]], max_new_tokens=12, top_k=1, generator=_gen(5)
    )
    assert torch.equal(batch.response_ids[1], alone.response_ids[0])
    gap = _max_gap(batch.old_logprobs[1:2], alone.old_logprobs, alone.response_mask)
    print(f"{arch}: max |Δ old_logprob| sampled alone vs in a batch = {gap:.2e}")
    assert gap < ATOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_score_logprobs(arch: str, temperature: float) -> None:
    policy = _policy(arch, eos_bias=EOS_BIAS)
    r = policy.rollout(
        [*PROMPTS, ""],
        max_new_tokens=10,
        completions_per_prompt=2,
        temperature=temperature,
        generator=_gen(3),
    )
    assert bool((~r.response_mask).any())  # some rows ended early: padding is exercised
    gap = _max_gap(policy.score(r).logprobs, r.old_logprobs, r.response_mask)
    print(f"{arch} τ={temperature}: max |Δ logprob| sampling vs score = {gap:.2e}")
    assert gap < ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_values_recorded_while_sampling_equal_score_values(arch: str) -> None:
    """The fast path (values from the sampling pass) against the plain one (a second forward)."""
    policy = _policy(arch, eos_bias=EOS_BIAS, value_head=True)
    assert policy.value_head is not None
    with torch.no_grad():
        nn.init.normal_(policy.value_head.weight)  # away from the zero init
        policy.value_head.bias.fill_(0.3)
    r = policy.rollout(
        [*PROMPTS, ""], max_new_tokens=10, completions_per_prompt=2, generator=_gen(4)
    )
    assert bool((~r.response_mask).any())
    assert r.old_values is not None
    scored = policy.score(r).values
    assert scored is not None
    gap = _max_gap(scored, r.old_values, r.response_mask)
    print(f"{arch}: max |Δ value| sampling vs score = {gap:.2e}")
    assert gap < ATOL
    assert bool((r.old_values[~r.response_mask] == 0).all())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_output_layer_scores_like_the_models_own_forward(
    arch: str, temperature: float
) -> None:
    """The fast path (no [B, T, V] logits) against the plain one: values and gradients."""
    fused = _policy(arch, eos_bias=EOS_BIAS, value_head=True)
    assert fused.value_head is not None
    with torch.no_grad():
        nn.init.normal_(fused.value_head.weight)
    plain = copy.deepcopy(fused)
    plain.fused_head = False
    r = fused.rollout(PROMPTS, max_new_tokens=8, temperature=temperature, generator=_gen(5))
    outs = []
    for policy in (fused, plain):
        out = policy.score(r)
        assert out.values is not None
        loss = (out.logprobs * r.response_mask).sum() + out.values.sum()
        loss.backward()
        outs.append((out, {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}))
    (f, f_grads), (p, p_grads) = outs
    assert _max_gap(f.logprobs, p.logprobs, r.response_mask) < ATOL
    assert _max_gap(f.entropy, p.entropy, r.response_mask) < ATOL
    assert _max_gap(f.values, p.values, r.response_mask) < ATOL  # type: ignore[arg-type]
    assert f_grads.keys() == p_grads.keys() and f_grads
    for name, grad in p_grads.items():
        torch.testing.assert_close(f_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        ref_fused = kltune.FrozenReference(fused).logprobs(r)
        assert _max_gap(ref_fused, p.logprobs, r.response_mask) < ATOL


def test_an_entropy_bonus_takes_the_models_own_forward() -> None:
    policy = _policy()
    r = policy.rollout(PROMPTS, max_new_tokens=4, generator=_gen())
    out = policy.score(r, entropy_with_grad=True)
    assert out.entropy.requires_grad


def test_without_a_value_head_a_rollout_has_no_values() -> None:
    r = _policy().rollout(PROMPTS, max_new_tokens=3, generator=_gen())
    assert r.old_values is None


def test_inverse_cdf_draw_follows_the_distribution_and_never_draws_probability_zero() -> None:
    from kltune.sampler import draw

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    log_p = probs.log().expand(20_000, -1)
    tokens = draw(log_p, _gen(0))
    counts = torch.bincount(tokens, minlength=6).double()
    assert bool((counts[probs == 0] == 0).all())
    expected = probs.double() * len(tokens)
    chi2 = float((((counts - expected) ** 2)[probs > 0] / expected[probs > 0]).sum())
    assert chi2 < 13.8  # χ² with 2 degrees of freedom, p = 0.001
    assert torch.equal(tokens, draw(log_p, _gen(0)))  # same generator, same draw


def test_a_row_with_no_mass_is_refused() -> None:
    from kltune.sampler import draw

    log_p = torch.full((2, 4), float("-inf"))
    with pytest.raises(FloatingPointError, match="no mass"):
        draw(log_p, _gen())


@pytest.mark.parametrize("arch", ARCHS)
def test_score_matches_a_per_token_loop_without_padding(arch: str) -> None:
    policy = _policy(arch, eos_bias=EOS_BIAS)
    r = policy.rollout(
        PROMPTS, max_new_tokens=8, completions_per_prompt=2, temperature=0.9, generator=_gen(4)
    )
    expected = oracle_logprobs(policy.model, r)
    gap = _max_gap(policy.score(r).logprobs.double(), expected, r.response_mask)
    print(f"{arch}: max |Δ logprob| score vs per-token oracle = {gap:.2e}")
    assert gap < ATOL


# --------------------------------------------------------------------------- top-k / top-p


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_samples_stay_in_the_top_k(arch: str) -> None:
    policy = _policy(arch, scale=PEAKED[arch])

    def ranks(**kwargs) -> torch.Tensor:
        r = policy.rollout(
            PROMPTS, max_new_tokens=10, completions_per_prompt=4, generator=_gen(9), **kwargs
        )
        log_p = torch.log_softmax(_logits(policy, r) / r.temperature, dim=-1)
        taken = log_p.gather(-1, r.response_ids[..., None])
        return (log_p > taken + 1e-6).sum(-1)[r.response_mask]  # tokens strictly likelier

    assert int(ranks(top_k=3).max()) < 3
    assert int(ranks(top_k=3, temperature=1.5).max()) < 3
    assert int(ranks().max()) >= 3  # without top_k the same draws leave the top 3


@pytest.mark.parametrize("arch", ARCHS)
def test_top_p_samples_stay_in_the_nucleus(arch: str) -> None:
    policy = _policy(arch, scale=PEAKED[arch])
    top_p = 0.5

    def mass_before(**kwargs) -> torch.Tensor:
        r = policy.rollout(
            PROMPTS, max_new_tokens=10, completions_per_prompt=4, generator=_gen(9), **kwargs
        )
        log_p = torch.log_softmax(_logits(policy, r) / r.temperature, dim=-1)
        taken = log_p.gather(-1, r.response_ids[..., None])
        likelier = log_p > taken + 1e-6
        return (log_p.exp() * likelier).sum(-1)[r.response_mask]

    # the nucleus: tokens whose likelier tokens hold less than top_p of the mass
    assert float(mass_before(top_p=top_p).max()) < top_p + 1e-5
    assert float(mass_before(top_p=top_p, temperature=0.8).max()) < top_p + 1e-5
    assert float(mass_before().max()) > top_p  # without top_p some draws fall outside
    assert float(mass_before(top_p=1.0).max()) > top_p  # top_p = 1 keeps everything


# --------------------------------------------------------------------------- score()


def test_score_logprobs_have_grad_and_entropy_is_detached_unless_asked() -> None:
    policy = _policy()
    r = policy.rollout(PROMPTS, max_new_tokens=5, generator=_gen())
    out = policy.score(r)
    assert out.logprobs.requires_grad and not out.entropy.requires_grad
    assert out.values is None
    out.logprobs[r.response_mask].sum().backward()
    grads = [p.grad for p in policy.parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    with_grad = policy.score(r, entropy_with_grad=True)
    assert with_grad.entropy.requires_grad
    assert torch.allclose(with_grad.entropy.detach(), out.entropy)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_entropy_is_that_of_the_tempered_softmax(temperature: float) -> None:
    policy = _policy(scale=PEAKED["llama"])
    r = policy.rollout(PROMPTS, max_new_tokens=5, temperature=temperature, generator=_gen())
    log_p = torch.log_softmax(_logits(policy, r).double() / temperature, dim=-1)
    expected = -(log_p.exp() * log_p).sum(-1)
    entropy = policy.score(r).entropy.double()
    assert torch.allclose(entropy, expected, atol=1e-5)


def test_score_honours_the_rollout_temperature() -> None:
    policy = _policy(scale=PEAKED["llama"])
    r = policy.rollout(PROMPTS, max_new_tokens=6, temperature=2.0, generator=_gen())
    logits = _logits(policy, r)
    expected = torch.log_softmax(logits / 2.0, dim=-1).gather(-1, r.response_ids[..., None])
    scored = policy.score(r).logprobs
    assert _max_gap(scored, expected.squeeze(-1), r.response_mask) < ATOL
    at_one = policy.score(r.replace(temperature=1.0)).logprobs
    assert _max_gap(at_one, scored, r.response_mask) > 0.1  # τ really changes the answer


def test_value_head_starts_at_exactly_zero_and_its_gradient_flows() -> None:
    policy = _policy(value_head=True)
    assert policy.value_head is not None
    r = policy.rollout(PROMPTS, max_new_tokens=5, generator=_gen())
    values = policy.score(r).values
    assert values is not None and values.shape == r.response_ids.shape
    assert values.dtype == torch.float32
    assert bool((values == 0).all())
    optimizer = torch.optim.SGD(policy.value_head.parameters(), lr=0.1)
    loss = ((values - 1.0) ** 2)[r.response_mask].mean()
    loss.backward()
    assert policy.value_head.weight.grad is not None
    assert float(policy.value_head.weight.grad.abs().sum()) > 0
    assert float(policy.value_head.bias.grad.abs().sum()) > 0  # type: ignore[union-attr]
    optimizer.step()
    after = policy.score(r).values
    after = None if after is None else after.detach()
    assert after is not None and float(after[r.response_mask].mean()) > 0.1  # moved toward 1


def test_policy_stays_in_eval_mode_so_scoring_is_deterministic() -> None:
    # GPT-2's config has dropout 0.1: in train mode two scores would differ.
    policy = _policy("gpt2")
    policy.train()
    assert not policy.training and not policy.model.training
    r = policy.rollout(PROMPTS, max_new_tokens=5, generator=_gen())
    assert torch.equal(policy.score(r).logprobs, policy.score(r).logprobs)


def test_bfloat16_autocast_keeps_float32_logprobs_near_the_float32_ones() -> None:
    # One setting for sampling and scoring: the first ratio compares like with like.
    policy = _policy()
    policy.autocast_dtype = torch.bfloat16
    r = policy.rollout(PROMPTS, max_new_tokens=5, generator=_gen())
    assert r.old_logprobs.dtype == torch.float32
    out = policy.score(r)
    assert out.logprobs.dtype == torch.float32
    assert _max_gap(out.logprobs, r.old_logprobs, r.response_mask) < 0.05
    policy.autocast_dtype = None
    assert _max_gap(out.logprobs, policy.score(r).logprobs, r.response_mask) < 0.1
    assert _max_gap(out.logprobs, policy.score(r).logprobs, r.response_mask) > 0  # it did act


def test_autocast_dtype_must_be_a_floating_dtype() -> None:
    model, tokenizer = kltune.tiny_random_model("llama")
    with without_runtime_typecheck(), pytest.raises(TypeError, match=r"must be a floating"):
        Policy(model, tokenizer, autocast_dtype="bf16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"autocast_dtype must be a floating torch.dtype"):
        Policy(model, tokenizer, autocast_dtype=torch.int8)


# --------------------------------------------------------------------------- references


def _train_steps(policy: Policy, r: Rollout, steps: int = 3) -> None:
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -policy.score(r).logprobs[r.response_mask].mean()
        loss.backward()
        optimizer.step()


def test_frozen_reference_never_changes_when_the_policy_trains() -> None:
    policy = _policy("gpt2")
    reference = FrozenReference(policy)
    r = policy.rollout(PROMPTS, max_new_tokens=6, completions_per_prompt=2, generator=_gen())
    before = reference.logprobs(r)
    assert _max_gap(before, r.old_logprobs, r.response_mask) < ATOL  # starts as the policy
    assert not any(p.requires_grad for p in reference.model.parameters())
    _train_steps(policy, r)
    assert torch.equal(reference.logprobs(r), before)
    assert _max_gap(policy.score(r).logprobs, before, r.response_mask) > 1e-2  # policy moved
    logits = reference.logits(r)
    assert logits.shape == (*r.response_ids.shape, len(policy.tokenizer))
    from_logits = torch.log_softmax(logits, -1).gather(-1, r.response_ids[..., None]).squeeze(-1)
    assert _max_gap(from_logits, before, r.response_mask) < ATOL


def test_adapter_off_reference_needs_a_peft_model() -> None:
    with pytest.raises(TypeError, match=r"needs a policy whose model is a peft\.PeftModel"):
        AdapterOffReference(_policy())


def _lora_policy() -> Policy:
    peft = pytest.importorskip("peft")
    model, tokenizer = kltune.tiny_random_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return Policy(peft.get_peft_model(model, config), tokenizer)


@pytest.mark.filterwarnings(LORA_WARNING)
def test_lora_policy_trains_only_the_adapter() -> None:
    policy = _lora_policy()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    frozen = [n for n, p in policy.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    r = policy.rollout(PROMPTS, max_new_tokens=5, generator=_gen())
    _train_steps(policy, r, steps=2)
    for name, param in policy.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name


@pytest.mark.filterwarnings(LORA_WARNING)
def test_adapter_off_reference_is_the_base_model_after_training() -> None:
    policy = _lora_policy()
    frozen = FrozenReference(policy)  # before training: LoRA's B = 0, so the base model
    adapter_off = AdapterOffReference(policy)
    r = policy.rollout(PROMPTS, max_new_tokens=6, completions_per_prompt=2, generator=_gen())
    assert _max_gap(adapter_off.logprobs(r), r.old_logprobs, r.response_mask) < ATOL
    _train_steps(policy, r)
    trained = policy.score(r).logprobs.detach()
    assert _max_gap(trained, frozen.logprobs(r), r.response_mask) > 1e-2  # the adapter matters
    gap = _max_gap(adapter_off.logprobs(r), frozen.logprobs(r), r.response_mask)
    print(f"adapter off vs frozen copy: max |Δ logprob| = {gap:.2e}")
    assert gap < ATOL
    assert torch.allclose(adapter_off.logits(r), frozen.logits(r), atol=ATOL)
    on, off = policy.next_token_head(r), adapter_off.next_token_head(r)
    kl_heads = KF.kl_exact_from_hidden(on.hidden, on.weight, off.hidden, off.weight)
    kl_logits = KF.kl_exact(_logits(policy, r), frozen.logits(r))
    assert torch.allclose(kl_heads, kl_logits, atol=1e-5) and float(kl_heads.max()) > 1e-4
    # the adapter is switched back on afterwards
    assert torch.equal(policy.score(r).logprobs.detach(), trained)
    # and a new rollout samples from the trained policy, whose logprobs score() reproduces
    again = policy.rollout(PROMPTS, max_new_tokens=6, generator=_gen(1))
    assert _max_gap(policy.score(again).logprobs, again.old_logprobs, again.response_mask) < ATOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("entropy_with_grad", [False, True])
def test_next_token_heads_give_the_exact_kl_of_the_logits(arch, entropy_with_grad) -> None:
    # The fused path gives hidden states and the output layer, the model's own forward
    # (entropy with gradient) gives logits: both must give kl_exact of the full logits,
    # and its gradient must reach the policy's weights.
    policy = _policy(arch, eos_bias=EOS_BIAS)
    reference = FrozenReference(policy)
    r = policy.rollout(PROMPTS, max_new_tokens=6, completions_per_prompt=2, generator=_gen())
    _train_steps(policy, r)
    out = policy.score(r, entropy_with_grad=entropy_with_grad, with_head=True)
    assert out.head is not None and (out.head.weight is None) == entropy_with_grad
    ref_head = reference.next_token_head(r)
    kl = KF.kl_exact_from_hidden(
        out.head.hidden,
        out.head.weight,
        ref_head.hidden,
        ref_head.weight,
        bias=out.head.bias,
        ref_bias=ref_head.bias,
    )
    expected = KF.kl_exact(_logits(policy, r), reference.logits(r))
    assert torch.allclose(kl.detach(), expected, atol=1e-5) and float(expected.max()) > 1e-3
    kl.sum().backward()
    head_weight = policy.model.get_output_embeddings().weight
    assert head_weight.grad is not None and float(head_weight.grad.abs().sum()) > 0
    assert policy.score(r).head is None  # only when asked


def test_public_names() -> None:
    assert kltune.Policy is Policy and kltune.PolicyOutput is not None
    assert kltune.FrozenReference is FrozenReference
    assert kltune.AdapterOffReference is AdapterOffReference


def test_scoring_token_ids_outside_the_embedding_is_an_error() -> None:
    policy = _policy()
    r = policy.rollout(PROMPTS, max_new_tokens=3, generator=_gen())
    bad = r.replace(response_ids=r.response_ids.masked_fill(r.response_mask, 10_000))
    with pytest.raises(ValueError, match="embedding has"):
        policy.score(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_major_sampling_layout_samples_what_the_plain_layout_samples(arch: str) -> None:
    """The CPU sampling fast path ((W xᵀ)ᵀ linears) against nn.Linear's own forward
    (for the model's own forward: Llama's lean decoding is tested in test_decoding.py)."""
    policy = _policy(arch, eos_bias=EOS_BIAS, value_head=True, lean_decoding=False)
    assert policy.value_head is not None
    with torch.no_grad():
        nn.init.normal_(policy.value_head.weight)
    kwargs = {"max_new_tokens": 10, "completions_per_prompt": 2}
    fast = policy.rollout([*PROMPTS, ""], generator=_gen(6), **kwargs)
    sampler = policy.sampler
    plain_sample = sampler._sample  # type: ignore[attr-defined]
    sampler._sample = lambda *a: _unpatched(policy, plain_sample, *a)  # type: ignore[attr-defined]
    plain = policy.rollout([*PROMPTS, ""], generator=_gen(6), **kwargs)
    assert torch.equal(fast.response_ids, plain.response_ids)
    # float32 rounding only (values here are ~10, so 1e-5 is a relative 1e-6)
    assert _max_gap(fast.old_logprobs, plain.old_logprobs, plain.response_mask) < ATOL
    assert _max_gap(fast.old_values, plain.old_values, plain.response_mask) < ATOL  # type: ignore[arg-type]


def _unpatched(policy: Policy, sample, *args):
    """Run the sampling loop with every patched layer's own forward back."""
    patched = [m for m in policy.modules() if "forward" in vars(m)]
    assert patched and all(type(m) is nn.Linear for m in patched)  # the fast path is on
    saved = [vars(m).pop("forward") for m in patched]
    try:
        return sample(*args)
    finally:
        for m, forward in zip(patched, saved, strict=True):
            m.forward = forward


def test_weight_major_layout_leaves_replaced_forwards_and_restores_after_errors() -> None:
    from kltune._forwards import weight_major_linears

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    hooked = model[1].forward
    model[1].forward = hooked  # as accelerate's hooks do: an instance attribute
    x = torch.randn(5, 3)
    expected = model(x)
    with pytest.raises(RuntimeError, match="boom"), weight_major_linears(model):
        assert "forward" in vars(model[0]) and model[1].forward is hooked
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
        assert model[0](torch.randn(2, 7, 3)).shape == (2, 7, 4)
        raise RuntimeError("boom")
    assert "forward" not in vars(model[0]) and model[1].forward is hooked


def test_sampling_runs_one_forward_per_drawn_token() -> None:
    # The prompt pass draws the first token; no forward for a token never drawn.
    policy = _policy()
    calls = []
    step = policy.sampler.step  # type: ignore[attr-defined]
    policy.sampler.step = lambda *a, **k: calls.append(1) or step(*a, **k)  # type: ignore[attr-defined]
    r = policy.rollout(PROMPTS, max_new_tokens=5, generator=_gen())
    assert r.response_ids.shape[1] == 5 and len(calls) == 5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 5},
        {"top_p": 0.6},
        {"temperature": 0.7, "top_k": 8, "top_p": 0.8},
        {"temperature": 1.6},
    ],
    ids=["top_k", "top_p", "all_three", "temperature"],
)
def test_first_ratio_is_one_and_logprobs_are_of_the_truncated_distribution(
    arch: str, settings: dict
) -> None:
    # The behaviour logprobs are those of the distribution the tokens were drawn
    # from (renormalised over the kept tokens), and scoring computes the same, so
    # PPO's first ratio is 1 to float rounding; never a token outside the set.
    policy = _policy(arch, scale=PEAKED[arch])
    rollout = policy.rollout(PROMPTS, max_new_tokens=8, generator=_gen(), **settings)
    mask = rollout.response_mask
    temperature = settings.get("temperature", 1.0)
    top_k, top_p = settings.get("top_k"), settings.get("top_p")
    assert (rollout.temperature, rollout.top_k, rollout.top_p) == (temperature, top_k, top_p)
    logits = _logits(policy, rollout)  # the model's own forward, no fast path
    truncated = KF.truncated_logits(logits, temperature, top_k, top_p)
    expected = KF.logprobs_from_logits(truncated, rollout.response_ids)
    assert _max_gap(rollout.old_logprobs, expected, mask) < ATOL
    assert bool((expected[mask] > -1e4).all())  # every drawn token was in the kept set
    scored = policy.score(rollout).logprobs
    ratio = torch.exp(scored - rollout.old_logprobs)
    assert _max_gap(ratio, torch.ones_like(ratio), mask) < 1e-4
    full = KF.logprobs_from_logits(logits, rollout.response_ids, temperature)
    if top_k is not None or top_p is not None:  # renormalising over fewer tokens raises them
        assert bool((expected[mask] >= full[mask] - ATOL).all())
        assert _max_gap(expected, full, mask) > 0.05  # the truncation did bite


def test_the_exact_kl_refuses_a_truncated_rollout() -> None:
    from kltune.loop import estimate_kl, score_reference

    policy = _policy()
    rollout = policy.rollout(PROMPTS, max_new_tokens=4, top_k=5, generator=_gen())
    penalty = kltune.KLPenalty(placement="reward+loss")
    rollout = score_reference(FrozenReference(policy), rollout, penalty)
    with pytest.raises(ValueError, match="does not know the top-k/top-p truncation"):
        estimate_kl(policy, rollout, penalty)

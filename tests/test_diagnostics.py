"""Tests of kltune.diagnostics: hand-computed values, properties, validation."""

import dataclasses
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from kltune.diagnostics import (
    CollapseDetector,
    CollapseReport,
    distinct_n,
    diversity_metrics,
    mean_token_entropy,
    repetition_rate,
    self_bleu,
    unique_fraction,
)

# A tiny vocabulary, so drawn completions share words and n-grams often.
WORDS = ["a", "b", "c", "A", "good!"]
SEPARATORS = [" ", "  ", "\t", "\n"]


@st.composite
def completions(draw: st.DrawFn, min_words: int = 0) -> str:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=min_words, max_size=8))
    separator = draw(st.sampled_from(SEPARATORS))
    padding = draw(st.sampled_from(["", " ", "\n"]))
    return padding + separator.join(words) + padding


def batches(min_size: int = 1, min_words: int = 0) -> st.SearchStrategy[list[str]]:
    return st.lists(completions(min_words=min_words), min_size=min_size, max_size=6)


# ---------------------------------------------------------------- hand-computed values


def test_distinct_n_hand_computed() -> None:
    # "a b a b": bigrams ab, ba, ab -> 2 distinct of 3; unigrams a, b of 4; trigrams aba, bab.
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 3) == 1.0
    # Pooled over the batch: "the cat" appears in both completions.
    assert distinct_n(["the cat sat", "the cat ran"], 2) == 0.75


def test_distinct_n_without_ngrams_is_zero() -> None:
    assert distinct_n(["a b a b", "c"], 5) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0


def test_words_are_lowercased_whitespace_split_with_punctuation_attached() -> None:
    assert distinct_n(["A  b\tA\nB"], 1) == 0.5  # words a, b, a, b
    assert distinct_n(["great great!"], 1) == 1.0  # "great!" is its own word


def test_unique_fraction_hand_computed() -> None:
    # "x" and " x " are one completion after strip; "X" differs (case kept).
    assert unique_fraction(["x", " x ", "X", "y"]) == 0.75
    assert unique_fraction(["same"] * 4) == 0.25


def test_repetition_rate_hand_computed() -> None:
    assert repetition_rate(["a a a a"], n=1) == 0.75  # 3 of 4 words repeat the first
    assert repetition_rate(["a a a a"], n=2) == pytest.approx(2 / 3)
    # "c" has no bigram and is left out of the average: only "a b a b" counts (1 of 3).
    assert repetition_rate(["a b a b", "c"], n=2) == pytest.approx(1 / 3)
    assert repetition_rate(["so good so good", "fine thanks"], n=2) == pytest.approx(1 / 6)
    assert repetition_rate(["a b", "c"], n=4) == 0.0  # no completion has 4 words


def test_self_bleu_hand_computed_bleu4() -> None:
    # Each against the other: p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1).
    expected = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.658037, abs=1e-6)


def test_self_bleu_clips_counts_by_the_best_single_reference() -> None:
    # "a a a" vs {"a b", "a a"}: a clipped to 2 -> 2/3. "a b" vs {"a a a", "a a"}: 1/2.
    # "a a" vs {"a a a", "a b"}: 1. Brevity penalty 1 everywhere (closest length 2).
    assert self_bleu(["a a a", "a b", "a a"], max_n=1) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_self_bleu_brevity_penalty() -> None:
    # "a" vs "a b c": p1 = 1, BP = exp(1 - 3/1); "a b c" vs "a": p1 = 1/3, BP = 1.
    expected = (math.exp(-2.0) + 1 / 3) / 2
    assert self_bleu(["a", "a b c"], max_n=1) == pytest.approx(expected)


def test_self_bleu_is_zero_without_shared_words_or_with_empty_completions() -> None:
    assert self_bleu(["a b", "c d"]) == 0.0
    assert self_bleu(["", "a b"]) == 0.0


def test_mean_token_entropy_hand_computed() -> None:
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    value = mean_token_entropy(entropy, mask)
    assert isinstance(value, float)
    assert value == pytest.approx(7 / 3)


def test_mean_token_entropy_rejects_a_mask_with_no_token() -> None:
    with pytest.raises(ValueError, match="no element"):
        mean_token_entropy(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_diversity_metrics_keys_and_values() -> None:
    texts = ["a good day", "a bad day", "a good day"]
    metrics = diversity_metrics(texts)
    assert metrics == {
        "diversity/distinct_1": distinct_n(texts, 1),
        "diversity/distinct_2": distinct_n(texts, 2),
        "diversity/distinct_3": distinct_n(texts, 3),
        "diversity/unique_fraction": unique_fraction(texts),
        "diversity/self_bleu": self_bleu(texts),
        "diversity/repetition_rate": repetition_rate(texts),
    }
    assert metrics["diversity/distinct_2"] == pytest.approx(4 / 6)
    # Two completions find an identical reference (BLEU 1); "a bad day" scores
    # (2/3 · 1/3 · 1/2 · 1)^(1/4).
    assert metrics["diversity/self_bleu"] == pytest.approx((2 + (1 / 9) ** 0.25) / 3)


def test_diversity_metrics_of_one_completion_has_nan_self_bleu() -> None:
    metrics = diversity_metrics(["just one"])
    assert math.isnan(metrics["diversity/self_bleu"])
    assert metrics["diversity/unique_fraction"] == 1.0


# ---------------------------------------------------------------- properties


@given(texts=batches(), n=st.integers(1, 4))
def test_distinct_n_is_in_unit_interval(texts: list[str], n: int) -> None:
    assert 0.0 <= distinct_n(texts, n) <= 1.0


@given(texts=batches(), n=st.integers(1, 4))
def test_repetition_rate_is_in_unit_interval(texts: list[str], n: int) -> None:
    assert 0.0 <= repetition_rate(texts, n) < 1.0


@given(texts=batches(min_size=2), max_n=st.integers(1, 4))
def test_self_bleu_is_in_unit_interval(texts: list[str], max_n: int) -> None:
    assert 0.0 <= self_bleu(texts, max_n) <= 1.0 + 1e-12


@given(texts=batches())
def test_unique_fraction_is_between_one_over_b_and_one(texts: list[str]) -> None:
    assert 1 / len(texts) <= unique_fraction(texts) <= 1.0


@given(text=completions(min_words=1), copies=st.integers(2, 6), n=st.integers(1, 3))
def test_identical_completions_are_maximally_undiverse(text: str, copies: int, n: int) -> None:
    # B copies of one string: unique fraction 1/B, self-BLEU 1, distinct-n divided by B.
    texts = [text] * copies
    assert unique_fraction(texts) == 1 / copies
    assert self_bleu(texts) == 1.0
    assert distinct_n(texts, n) == pytest.approx(distinct_n([text], n) / copies)


@given(data=st.data(), texts=batches())
def test_metrics_are_invariant_to_batch_permutation(data: st.DataObject, texts: list[str]) -> None:
    # Every metric summarises the batch as a multiset: order never matters.
    shuffled = data.draw(st.permutations(texts))
    expected = diversity_metrics(texts)
    assert diversity_metrics(shuffled) == pytest.approx(expected, nan_ok=True)


@given(texts=batches(), n=st.integers(1, 3))
def test_repetition_rate_matches_counting_repeats_of_earlier_ngrams(
    texts: list[str], n: int
) -> None:
    # Oracle: walk each completion and count n-grams already seen in it.
    rates = []
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        seen: set[tuple[str, ...]] = set()
        repeats = 0
        for gram in grams:
            repeats += gram in seen
            seen.add(gram)
        if grams:
            rates.append(repeats / len(grams))
    expected = sum(rates) / len(rates) if rates else 0.0
    assert repetition_rate(texts, n) == pytest.approx(expected)


@given(texts=batches(min_size=2, min_words=1))
def test_self_bleu_is_zero_for_disjoint_vocabularies(texts: list[str]) -> None:
    # Tag every word with its completion's index: no word is shared, so p1 = 0.
    tagged = [" ".join(f"{w}{i}" for w in t.split()) for i, t in enumerate(texts)]
    assert self_bleu(tagged) == 0.0


# ---------------------------------------------------------------- collapse detector


@st.composite
def diverse_reference(draw: st.DrawFn) -> list[str]:
    """Completions of 2-6 words, no word used twice in the batch (distinct-2 = 1)."""
    lengths = draw(st.lists(st.integers(2, 6), min_size=2, max_size=8))
    counter = iter(range(10_000))
    return [" ".join(f"w{next(counter)}" for _ in range(length)) for length in lengths]


@given(reference=diverse_reference(), text=completions(min_words=2), copies=st.integers(3, 8))
def test_collapse_detector_flags_copies_of_one_string(
    reference: list[str], text: str, copies: int
) -> None:
    # B >= 3 copies have distinct-2 <= 1/3 < 0.5 x the reference's 1.0.
    detector = CollapseDetector.from_reference(reference)
    report = detector.check([text] * copies)
    assert detector.reference_value == 1.0
    assert report.collapsed
    assert report.ratio == pytest.approx(distinct_n([text], 2) / copies)
    assert detector.metrics([text] * copies) == {
        "collapse/ratio": report.ratio,
        "collapse/flag": 1.0,
    }


@given(
    reference=batches(min_words=2),
    threshold=st.floats(0.01, 1.0),
    metric=st.sampled_from(
        [
            "diversity/distinct_1",
            "diversity/distinct_2",
            "diversity/distinct_3",
            "diversity/unique_fraction",
        ]
    ),
)
def test_collapse_detector_does_not_flag_the_reference_itself(
    reference: list[str], threshold: float, metric: str
) -> None:
    # A reference with no trigram has distinct-3 = 0 and is rejected (tested below).
    assume(metric != "diversity/distinct_3" or distinct_n(reference, 3) > 0.0)
    detector = CollapseDetector.from_reference(reference, threshold=threshold, metric=metric)
    report = detector.check(reference)
    assert report == CollapseReport(
        collapsed=False,
        ratio=1.0,
        metric=metric,
        value=detector.reference_value,
        reference_value=detector.reference_value,
        threshold=threshold,
    )
    assert detector.metrics(reference)["collapse/flag"] == 0.0


def test_collapse_detector_accepts_a_metrics_dict() -> None:
    detector = CollapseDetector.from_reference(["one two three", "four five six"], threshold=0.6)
    texts = ["one two one two", "one two"]  # bigrams: 12, 21, 12, 12 -> distinct-2 = 1/2
    from_dict = detector.check(diversity_metrics(texts))
    assert from_dict == detector.check(texts)
    assert from_dict.collapsed  # 0.5 < 0.6
    assert from_dict.ratio == 0.5
    assert detector.metrics({"diversity/distinct_2": 0.7}) == {
        "collapse/ratio": 0.7,
        "collapse/flag": 0.0,
    }


def test_collapse_detector_is_frozen() -> None:
    detector = CollapseDetector(reference_value=0.8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        detector.threshold = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference_value": 0.5, "threshold": 0.0}, "threshold"),
        ({"reference_value": 0.5, "threshold": 1.5}, "threshold"),
        ({"reference_value": 0.0}, "diversity"),
        ({"reference_value": math.nan}, "finite"),
        ({"reference_value": 0.5, "metric": "diversity/self_bleu"}, "one of"),
    ],
)
def test_collapse_detector_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CollapseDetector(**kwargs)


def test_collapse_detector_rejects_a_reference_without_diversity() -> None:
    with pytest.raises(ValueError, match="reference"):
        CollapseDetector.from_reference(["yes", "no", "maybe"])  # no bigram at all


def test_collapse_detector_rejects_metrics_without_its_key() -> None:
    detector = CollapseDetector(reference_value=0.8)
    with pytest.raises(ValueError, match="diversity/distinct_2"):
        detector.check({"diversity/distinct_1": 0.5})


# ---------------------------------------------------------------- validation

TEXT_FUNCTIONS: list[Callable[[Sequence[str]], object]] = [
    lambda t: distinct_n(t, 2),
    unique_fraction,
    self_bleu,
    repetition_rate,
    diversity_metrics,
    CollapseDetector.from_reference,
    CollapseDetector(reference_value=0.5).check,
]
IDS = ["distinct_n", "unique", "self_bleu", "repetition", "all", "from_reference", "check"]


@pytest.mark.parametrize("function", TEXT_FUNCTIONS, ids=IDS)
def test_empty_batch_raises_value_error(function: Callable[[Sequence[str]], object]) -> None:
    with pytest.raises(ValueError, match="empty"):
        function([])


@pytest.mark.parametrize("function", TEXT_FUNCTIONS, ids=IDS)
def test_a_single_string_is_not_a_batch(function: Callable[[Sequence[str]], object]) -> None:
    with pytest.raises(TypeError, match="single str"):
        function("a b c")


@pytest.mark.parametrize("function", TEXT_FUNCTIONS, ids=IDS)
def test_non_string_item_raises_type_error_naming_its_index(
    function: Callable[[Sequence[str]], object],
) -> None:
    # Under the test suite's runtime checking, beartype checks one randomly
    # sampled item of a Sequence[str] first and may raise its own TypeError.
    # Users get ours, which names the index; across 64 calls it must show up.
    messages = []
    for _ in range(64):
        with pytest.raises(TypeError) as info:
            function(["one two", "three four", 7])  # type: ignore[list-item]
        messages.append(str(info.value))
    assert any("texts[2]" in message and "int" in message for message in messages)


def test_bad_orders_raise_value_error() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["a b"], 0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        repetition_rate(["a b"], n=-1)
    with pytest.raises(ValueError, match="max_n must be >= 1"):
        self_bleu(["a b", "c"], max_n=0)


def test_self_bleu_needs_two_completions() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["alone"])

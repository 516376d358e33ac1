"""Tests for kltune.rewards: reward functions, their validation, combinators, normalisation."""

import copy
import math
import pickle
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from kltune.diagnostics import repetition_rate
from kltune.rewards import (
    ClassifierReward,
    LengthReward,
    RepetitionPenalty,
    RunningNormalizer,
    VaderSentiment,
    clipped,
    missing_eos_penalty,
    score_completions,
    weighted_sum,
)

POSITIVE = [
    "I love this movie, it is wonderful and great fun.",
    "What a fantastic, happy ending!",
]
NEGATIVE = [
    "I hate this film, it is awful and boring.",
    "What a terrible, sad and painful mess.",
]


def _blank(n: int) -> list[str]:
    return [""] * n


# --- score_completions: accepted outputs --------------------------------------------------


@pytest.mark.parametrize(
    "convert",
    [
        list,
        tuple,
        np.array,
        lambda xs: np.array(xs, dtype=np.float32),
        lambda xs: torch.tensor(xs, dtype=torch.float64),
        lambda xs: torch.tensor(xs, dtype=torch.bfloat16),
    ],
    ids=["list", "tuple", "numpy64", "numpy32", "tensor64", "tensor_bf16"],
)
def test_score_completions_converts_outputs_to_float32_cpu(convert) -> None:
    def reward(prompts, completions):
        return convert([1.0, -2.5, 0.5])

    scores = score_completions(reward, _blank(3), ["a", "b", "c"])
    assert scores.dtype == torch.float32
    assert scores.device.type == "cpu"
    assert scores.tolist() == [1.0, -2.5, 0.5]


def test_score_completions_accepts_ints_bools_and_0d_tensors() -> None:
    outputs = [[1, 2], [True, False], [torch.tensor(0.5), torch.tensor(2)], np.array([3, 4])]
    expected = [[1.0, 2.0], [1.0, 0.0], [0.5, 2.0], [3.0, 4.0]]
    for output, want in zip(outputs, expected, strict=True):
        assert score_completions(lambda p, c, o=output: o, _blank(2), ["a", "b"]).tolist() == want


def test_score_completions_detaches_and_copies() -> None:
    held = torch.tensor([1.0, 2.0], requires_grad=True)
    scores = score_completions(lambda p, c: held * 1.0, _blank(2), ["a", "b"])
    assert not scores.requires_grad
    plain = torch.tensor([1.0, 2.0])
    scores = score_completions(lambda p, c: plain, _blank(2), ["a", "b"])
    scores[0] = 99.0  # the result is a copy: the reward's tensor is untouched
    assert plain.tolist() == [1.0, 2.0]


def test_reward_fn_gets_copies_of_the_texts() -> None:
    def vandal(prompts, completions):
        completions.clear()
        return [0.0, 0.0]

    completions = ["a", "b"]
    score_completions(vandal, _blank(2), completions)
    assert completions == ["a", "b"]


# --- score_completions: errors name the reward function -----------------------------------


def wrong_length(prompts, completions):
    return [0.0] * (len(completions) + 1)


def test_wrong_length_names_the_function() -> None:
    with pytest.raises(ValueError, match=r"'wrong_length' returned 3 scores for 2 completions"):
        score_completions(wrong_length, _blank(2), ["a", "b"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_names_function_and_completion(bad: float) -> None:
    def flaky(prompts, completions):
        return [0.0, bad, bad]

    long_text = "x" * 55 + "TAIL_NOT_SHOWN" + "y" * 100
    with pytest.raises(ValueError, match="'flaky'") as info:
        score_completions(flaky, _blank(3), ["fine", long_text, "later"])
    message = str(info.value)
    assert "index 1" in message and str(bad) in message
    assert "x" * 55 in message and "TAIL_NOT_SHOWN" not in message  # truncated preview


class BadTypeReward:
    def __init__(self, output: object) -> None:
        self.output = output

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> object:
        return self.output


@pytest.mark.parametrize(
    "output",
    [
        "0.5",
        {"score": 1.0},
        None,
        3.0,
        ["high", "low"],
        torch.zeros(2, 1),
        torch.zeros(2, dtype=torch.complex64),
        np.array(["a", "b"]),
        np.zeros((2, 2)),
    ],
    ids=["str", "dict", "none", "scalar", "list_of_str", "2d", "complex", "np_str", "np_2d"],
)
def test_wrong_type_names_the_class(output: object) -> None:
    with pytest.raises((TypeError, ValueError), match="'BadTypeReward'"):
        score_completions(BadTypeReward(output), _blank(2), ["a", "b"])


def test_exception_in_reward_fn_is_chained_runtime_error() -> None:
    def broken(prompts, completions):
        raise KeyError("missing lexicon")

    with pytest.raises(RuntimeError, match=r"'broken' raised KeyError") as info:
        score_completions(broken, _blank(1), ["a"])
    assert isinstance(info.value.__cause__, KeyError)


def test_text_checks() -> None:
    fn = LengthReward()
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        score_completions(fn, _blank(2), ["a"])
    with pytest.raises(ValueError, match="empty batch"):
        score_completions(fn, [], [])
    with pytest.raises(TypeError, match="single"):
        score_completions(fn, "p", "c")
    with pytest.raises(TypeError):  # "completions[1] must be a str" (or beartype's check)
        score_completions(fn, _blank(2), ["a", 3])  # type: ignore[list-item]


# --- VADER ---------------------------------------------------------------------------------


def test_vader_positive_beats_negative_and_is_bounded() -> None:
    vader = VaderSentiment()
    pos = score_completions(vader, _blank(2), POSITIVE)
    neg = score_completions(vader, _blank(2), NEGATIVE)
    assert bool((pos > 0.5).all()) and bool((neg < -0.5).all())
    assert bool((pos.min() > neg.max()).item())


VADER = VaderSentiment()  # one analyzer for the property test: building it takes ~40 ms


@given(st.lists(st.text(max_size=80), min_size=1, max_size=4))
def test_vader_is_in_range_for_any_text(texts: list[str]) -> None:
    scores = score_completions(VADER, _blank(len(texts)), texts)
    assert bool(((scores >= -1) & (scores <= 1)).all())


def test_vader_include_prompt_changes_the_score() -> None:
    prompts, completions = ["I hated the start but"], [" the ending was great"]
    alone = VaderSentiment()(prompts, completions)
    together = VaderSentiment(include_prompt=True)(prompts, completions)
    assert together.item() != pytest.approx(alone.item(), abs=1e-3)
    # include_prompt scores the plain concatenation
    assert together.item() == VaderSentiment()(_blank(1), [prompts[0] + completions[0]]).item()


def test_vader_is_deterministic_and_survives_pickle_and_deepcopy() -> None:
    vader = VaderSentiment()
    first = vader(_blank(4), POSITIVE + NEGATIVE)
    for clone in (pickle.loads(pickle.dumps(vader)), copy.deepcopy(vader)):
        assert clone == vader
        assert torch.equal(clone(_blank(4), POSITIVE + NEGATIVE), first)
    assert len(pickle.dumps(vader)) < 1000  # the lexicon is rebuilt, not pickled
    assert torch.equal(vader(_blank(4), POSITIVE + NEGATIVE), first)


# --- ClassifierReward on tiny classifiers built here -----------------------------------------

CORPUS = [
    "i love this movie it is great fun",
    "i hate this film it is awful and boring",
    "what a wonderful happy ending",
    "what a terrible sad mess",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _distilbert(vocab_size: int, labels: Sequence[str]) -> DistilBertForSequenceClassification:
    config = DistilBertConfig(
        vocab_size=vocab_size,
        dim=16,
        hidden_dim=32,
        n_layers=1,
        n_heads=2,
        max_position_embeddings=12,
        pad_token_id=0,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(config)
        # larger random head weights, so scores differ clearly between texts
        torch.nn.init.normal_(model.classifier.weight, std=1.0)
    return model.eval()


def _bert(vocab_size: int, num_labels: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=12,
        num_labels=num_labels,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = BertForSequenceClassification(config)
        torch.nn.init.normal_(model.classifier.weight, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


@pytest.fixture(scope="module")
def binary(tokenizer: PreTrainedTokenizerFast) -> DistilBertForSequenceClassification:
    return _distilbert(len(tokenizer), ["NEGATIVE", "POSITIVE"])


TEXTS = [*CORPUS, "great", "a much longer text " * 10, "zebra xylophone 🦓 неизвестно 未知"]


def _logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Unbatched reference: one text at a time, truncated to the position limit."""
    rows = []
    with torch.no_grad():
        for text in texts:
            encoded = tokenizer([text], truncation=True, max_length=12, return_tensors="pt")
            rows.append(model(**encoded).logits[0])
    return torch.stack(rows)


def test_classifier_shapes_and_unbatched_reference(binary, tokenizer) -> None:
    reward = ClassifierReward(binary, tokenizer, positive_label="POSITIVE", batch_size=3)
    scores = score_completions(reward, _blank(len(TEXTS)), TEXTS)
    assert scores.shape == (len(TEXTS),) and scores.dtype == torch.float32
    expected = torch.softmax(_logits(binary, tokenizer, TEXTS), dim=-1)[:, 1]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # the texts really get different scores
    assert reward(_blank(len(TEXTS)), TEXTS).requires_grad is False


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_classifier_batching_equals_one_batch(binary, tokenizer, batch_size: int) -> None:
    one = ClassifierReward(binary, tokenizer, positive_label=1, batch_size=64)
    chunked = ClassifierReward(binary, tokenizer, positive_label=1, batch_size=batch_size)
    prompts = _blank(len(TEXTS))
    torch.testing.assert_close(chunked(prompts, TEXTS), one(prompts, TEXTS), atol=1e-5, rtol=0)


def test_classifier_label_by_name_equals_by_index(binary, tokenizer) -> None:
    prompts = _blank(len(TEXTS))
    by_name = ClassifierReward(binary, tokenizer, positive_label="NEGATIVE")(prompts, TEXTS)
    by_index = ClassifierReward(binary, tokenizer, positive_label=0)(prompts, TEXTS)
    assert torch.equal(by_name, by_index)
    positive = ClassifierReward(binary, tokenizer, positive_label="POSITIVE")(prompts, TEXTS)
    torch.testing.assert_close(by_name + positive, torch.ones(len(TEXTS)))


def test_classifier_output_kinds_relations(binary, tokenizer) -> None:
    prompts = _blank(len(TEXTS))
    kinds = {
        kind: ClassifierReward(binary, tokenizer, positive_label="POSITIVE", output=kind)(
            prompts, TEXTS
        )
        for kind in ("probability", "logit", "signed")
    }
    prob, logit, signed = kinds["probability"], kinds["logit"], kinds["signed"]
    torch.testing.assert_close(signed, 2 * prob - 1)
    negative = ClassifierReward(binary, tokenizer, positive_label="NEGATIVE")(prompts, TEXTS)
    torch.testing.assert_close(signed, prob - negative)  # P(pos) - P(neg)
    torch.testing.assert_close(logit, _logits(binary, tokenizer, TEXTS)[:, 1], atol=1e-5, rtol=0)
    assert bool(((prob > 0) & (prob < 1)).all()) and bool((signed.abs() < 1).all())


def test_classifier_with_three_labels_and_with_one_logit(tokenizer) -> None:
    prompts = _blank(len(TEXTS))
    three = _bert(len(tokenizer), num_labels=3)
    logits = _logits(three, tokenizer, TEXTS)
    prob = ClassifierReward(three, tokenizer, positive_label="LABEL_2")(prompts, TEXTS)
    torch.testing.assert_close(prob, torch.softmax(logits, -1)[:, 2], atol=1e-5, rtol=0)
    signed = ClassifierReward(three, tokenizer, positive_label=2, output="signed")(prompts, TEXTS)
    torch.testing.assert_close(signed, 2 * prob - 1)

    single = _bert(len(tokenizer), num_labels=1)  # a reward-model head: sigmoid(z), tanh(z/2)
    z = _logits(single, tokenizer, TEXTS)[:, 0]
    for kind, expected in [
        ("logit", z),
        ("probability", torch.sigmoid(z)),
        ("signed", torch.tanh(z / 2)),
    ]:
        got = ClassifierReward(single, tokenizer, positive_label=0, output=kind)(prompts, TEXTS)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_classifier_reads_text_from_a_policy_with_another_vocabulary(binary, tokenizer) -> None:
    # A "policy" tokenizer with a vocabulary of its own: its ids mean nothing to the
    # classifier (many are past the classifier's vocabulary), but the decoded text scores fine.
    policy_tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    policy_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    policy_corpus = ["zebras eat grass", "quantum chromodynamics rocks", "i love this movie"]
    vocab = [f"w{i}" for i in range(200)]
    policy_tok.train_from_iterator(
        [*policy_corpus, " ".join(vocab)], trainers.WordLevelTrainer(special_tokens=["<unk>"])
    )
    policy = PreTrainedTokenizerFast(tokenizer_object=policy_tok, unk_token="<unk>")
    ids = policy(policy_corpus)["input_ids"]
    assert max(max(row) for row in ids) >= binary.config.vocab_size
    completions = policy.batch_decode(ids)
    reward = ClassifierReward(binary, tokenizer, positive_label="POSITIVE")
    scores = score_completions(reward, _blank(len(completions)), completions)
    assert bool(torch.isfinite(scores).all())
    # the words the classifier knows still drive its score: "i love this movie" is scored
    # exactly as when it comes from the classifier's own vocabulary
    assert scores[2].item() == reward(_blank(1), ["i love this movie"]).item()


def test_classifier_truncates_to_position_limit_and_include_prompt(binary, tokenizer) -> None:
    reward = ClassifierReward(binary, tokenizer, positive_label=1)
    long = "great fun " * 50  # 100 words > 12 positions
    assert bool(torch.isfinite(reward([""], [long])).all())
    prefix = ClassifierReward(binary, tokenizer, positive_label=1, max_length=3)
    assert (
        prefix([""], ["great fun what a sad mess"]).item()
        == reward([""], ["great fun what"]).item()
    )
    with_prompt = ClassifierReward(binary, tokenizer, positive_label=1, include_prompt=True)
    prompts, completions = ["i hate this film"], [" it is great fun"]
    assert (
        with_prompt(prompts, completions).item()
        == reward([""], [prompts[0] + completions[0]]).item()
    )
    assert with_prompt(prompts, completions).item() != reward(prompts, completions).item()


def test_classifier_argument_errors(binary, tokenizer) -> None:
    with pytest.raises(ValueError, match=r"'MAYBE' is not a label.*NEGATIVE"):
        ClassifierReward(binary, tokenizer, positive_label="MAYBE")
    with pytest.raises(ValueError, match="out of range"):
        ClassifierReward(binary, tokenizer, positive_label=2)
    # jaxtyping's hook rejects the Literal in the tests (TypeError); users get the ValueError
    with pytest.raises((ValueError, TypeError), match=r"output|odds"):
        ClassifierReward(binary, tokenizer, positive_label=1, output="odds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        ClassifierReward(binary, tokenizer, positive_label=1, batch_size=0)
    training = copy.deepcopy(binary).train()
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        ClassifierReward(training, tokenizer, positive_label=1)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        ClassifierReward(binary, no_pad, positive_label=1)


def test_classifier_from_pretrained_local_folder(binary, tokenizer, tmp_path) -> None:
    binary.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = ClassifierReward.from_pretrained(
        tmp_path, positive_label="POSITIVE", output="signed", device="cpu", batch_size=2
    )
    direct = ClassifierReward(binary, tokenizer, positive_label="POSITIVE", output="signed")
    prompts = _blank(len(TEXTS))
    torch.testing.assert_close(loaded(prompts, TEXTS), direct(prompts, TEXTS))
    assert not loaded.model.training


def test_classifier_from_pretrained_failure_is_actionable(tmp_path) -> None:
    missing = tmp_path / "no-such-classifier"
    with pytest.raises(OSError, match="could not load the sequence classifier") as info:
        ClassifierReward.from_pretrained(str(missing), positive_label="POSITIVE")
    assert "HF_HUB_OFFLINE" in str(info.value) and "local folder" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


# --- heuristics ----------------------------------------------------------------------------


def test_length_reward_hand_cases() -> None:
    texts = ["", "one", "one two  three\nfour", "a b c d e f g h"]
    assert LengthReward()(_blank(4), texts).tolist() == [0.0, 1.0, 4.0, 8.0]
    assert LengthReward(target_words=4)(_blank(4), texts).tolist() == [-1.0, -0.75, 0.0, -1.0]
    with pytest.raises(ValueError, match="target_words"):
        LengthReward(target_words=0)


def test_repetition_penalty_hand_cases() -> None:
    texts = ["the cat sat on the mat", "go go go go", "The the THE", "one two", ""]
    assert RepetitionPenalty(n=1)(_blank(5), texts).tolist() == pytest.approx(
        [-1 / 6, -0.75, -2 / 3, 0.0, 0.0]
    )
    assert RepetitionPenalty(n=2)(_blank(5), texts).tolist() == pytest.approx(
        [0.0, -2 / 3, -0.5, 0.0, 0.0]
    )
    assert RepetitionPenalty(n=3)(_blank(5), texts).tolist() == pytest.approx(
        [0.0, -0.5, 0.0, 0.0, 0.0]
    )
    with pytest.raises(ValueError, match="n must be >= 1"):
        RepetitionPenalty(n=0)


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=30), st.integers(1, 4))
def test_repetition_penalty_range(words: list[str], n: int) -> None:
    # -(1 - distinct/total) lies in (-1, 0], and is 0 exactly when no n-gram repeats
    score = RepetitionPenalty(n=n)([""], [" ".join(words)]).item()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    assert -1 < score <= 0
    assert (score == 0) == (len(set(grams)) == len(grams))


# --- combinators ---------------------------------------------------------------------------


def test_weighted_sum_hand_case_and_name() -> None:
    texts = ["a b c d", "a a", "x"]
    reward = weighted_sum((LengthReward(), 0.5), (RepetitionPenalty(n=1), 2.0))
    assert score_completions(reward, _blank(3), texts).tolist() == [2.0, 0.0, 0.5]
    assert reward.__name__ == "weighted_sum(LengthReward*0.5, RepetitionPenalty*2)"  # type: ignore[attr-defined]


def nan_part(prompts, completions):
    return [math.nan] * len(completions)


def raising_part(prompts, completions):
    raise ZeroDivisionError("oops")


def test_combinators_name_the_failing_part() -> None:
    combined = weighted_sum((LengthReward(), 1.0), (nan_part, 1.0))
    with pytest.raises(ValueError, match="'nan_part'"):
        score_completions(combined, [""], ["a"])
    with pytest.raises(RuntimeError, match="'raising_part' raised ZeroDivisionError"):
        score_completions(clipped(raising_part, -1.0, 1.0), [""], ["a"])


def test_clipped_hand_cases() -> None:
    texts = ["", "a b", "a b c d e"]
    assert clipped(LengthReward(), 1.0, 3.0)(_blank(3), texts).tolist() == [1.0, 2.0, 3.0]
    assert clipped(LengthReward(), 1.0, math.inf)(_blank(3), texts).tolist() == [1.0, 2.0, 5.0]
    for low, high in [(1.0, 1.0), (2.0, 1.0), (math.nan, 1.0)]:
        with pytest.raises(ValueError, match="low < high"):
            clipped(LengthReward(), low, high)


def test_weighted_sum_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum()
    with pytest.raises(ValueError, match="'LengthReward' must be finite"):
        weighted_sum((LengthReward(), math.inf))


def _shipped() -> list:
    return [
        VaderSentiment(),
        VaderSentiment(include_prompt=True),
        LengthReward(),
        LengthReward(target_words=3),
        RepetitionPenalty(),
        weighted_sum((VaderSentiment(), 1.0), (RepetitionPenalty(n=1), 0.5)),
        clipped(LengthReward(), 0.0, 2.0),
    ]


@pytest.mark.parametrize("reward", _shipped(), ids=lambda r: getattr(r, "__name__", repr(r)))
def test_shipped_rewards_shape_dtype_determinism_no_mutation(reward) -> None:
    prompts, completions = ["Hi", "Hi", "Yo"], [*POSITIVE, "go go go go"]
    before = (list(prompts), list(completions))
    first = score_completions(reward, prompts, completions)
    assert first.shape == (3,) and first.dtype == torch.float32
    assert torch.equal(first, score_completions(reward, prompts, completions))
    assert (prompts, completions) == before
    assert reward(prompts[:0], completions[:0]).shape == (0,)  # empty batch in, empty out


# --- RunningNormalizer ---------------------------------------------------------------------

batches = st.lists(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=0, max_size=8),
    min_size=1,
    max_size=6,
).filter(lambda bs: sum(map(len, bs)) > 0)


@given(batches)
def test_running_normalizer_matches_numpy_over_all_batches(batch_list: list[list[float]]) -> None:
    norm = RunningNormalizer()
    for batch in batch_list:
        norm = norm.update(torch.tensor(batch, dtype=torch.float64))
    seen = np.concatenate([np.asarray(b, dtype=np.float64) for b in batch_list])
    assert norm.count == seen.size
    assert norm.mean == pytest.approx(seen.mean(), rel=1e-9, abs=1e-9)
    assert norm.std == pytest.approx(seen.std(), rel=1e-6, abs=1e-6)
    if seen.std() > 1e-3:  # else (s - mean) / (std + eps) amplifies rounding by 1 / eps
        expected = (seen - seen.mean()) / (seen.std() + norm.eps)
        np.testing.assert_allclose(norm.normalize(torch.tensor(seen)).numpy(), expected, rtol=1e-6)


def test_running_normalizer_update_returns_new_state() -> None:
    old = RunningNormalizer()
    new = old.update(torch.tensor([1.0, 2.0, 3.0]))
    assert old == RunningNormalizer() and new is not old
    assert (new.count, new.mean, new.var) == (3, 2.0, pytest.approx(2 / 3))
    assert new.update(torch.zeros(0)) == new  # an empty batch changes nothing
    out = new.normalize(torch.tensor([2.0, 5.0], dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, torch.tensor([0.0, 3.0 / math.sqrt(2 / 3)], dtype=torch.float64)
    )


def test_running_normalizer_state_dict_round_trip_and_errors() -> None:
    norm = RunningNormalizer(eps=1e-6).update(torch.tensor([0.5, -1.5, 4.0]))
    state = norm.state_dict()
    assert set(state) == {"count", "mean", "m2", "eps"}
    assert RunningNormalizer.from_state_dict(state) == norm
    with pytest.raises(ValueError, match="keys"):
        RunningNormalizer.from_state_dict({"count": 1, "mean": 0.0})
    with pytest.raises(ValueError, match="whole number"):
        RunningNormalizer.from_state_dict({**state, "count": 1.5})
    with pytest.raises(ValueError, match="update"):
        RunningNormalizer().normalize(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        norm.update(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="m2"):
        RunningNormalizer(count=2, m2=-1.0)
    with pytest.raises(ValueError, match="eps"):
        RunningNormalizer(eps=0.0)


# --- missing_eos_penalty -------------------------------------------------------------------


def test_missing_eos_penalty_replaces_truncated_scores() -> None:
    scores = torch.tensor([0.5, 0.9, -0.2])
    ended = torch.tensor([True, False, False])
    out = missing_eos_penalty(scores, ended, penalty=-1.0)
    assert out.tolist() == [0.5, -1.0, -1.0]
    assert scores.tolist() == pytest.approx([0.5, 0.9, -0.2])  # input untouched
    f64 = missing_eos_penalty(scores.double(), ended, -1.0)
    assert f64.dtype == torch.float64
    assert torch.equal(missing_eos_penalty(scores, torch.ones(3, dtype=torch.bool), -1.0), scores)


def test_missing_eos_penalty_errors() -> None:
    scores = torch.tensor([0.5, 0.9])
    # dtype and shape: jaxtyping's hook raises TypeError in the tests, users get ValueError
    with pytest.raises((ValueError, TypeError)):
        missing_eos_penalty(scores, torch.tensor([1, 0]), -1.0)
    with pytest.raises((ValueError, TypeError)):
        missing_eos_penalty(scores, torch.tensor([True]), -1.0)
    with pytest.raises(ValueError, match="finite"):
        missing_eos_penalty(scores, torch.tensor([True, False]), math.nan)


@given(
    st.lists(st.sampled_from(["good", "Good", "bad", "film", "so"]), max_size=12),
    st.integers(1, 4),
)
def test_the_repetition_penalty_is_minus_the_repetition_diagnostic(
    words: list[str], n: int
) -> None:
    text = " ".join(words)
    penalty = float(RepetitionPenalty(n=n)([""], [text])[0])
    assert penalty == pytest.approx(-repetition_rate([text], n=n))
    assert -1.0 < penalty <= 0.0

r"""Rewards: text in, one score per completion out.

A reward function is anything that fits :class:`RewardFn`: it takes the prompts
and the completions (strings, aligned) and returns one float per completion. A
plain Python function fits; so do the shipped classes:

========================== =================================================================
reward                     score of a completion
========================== =================================================================
:class:`VaderSentiment`    VADER compound sentiment in [−1, 1] (lexicon, offline, the default)
:class:`ClassifierReward`  a Hugging Face sequence classifier, with its own tokenizer
:class:`LengthReward`      word count, or closeness to a target word count
:class:`RepetitionPenalty` minus the fraction of repeated word n-grams
========================== =================================================================

Combinators take reward functions and return one, as optax's ``chain`` does:
:func:`weighted_sum` and :func:`clipped`. The loop calls every reward function
through :func:`score_completions`, which checks its output (length, type,
finite values) and names the culprit when something is wrong.

The shipped text rewards take any Python ``str`` (control characters, NUL,
emoji, even a lone surrogate) and, called directly, check their texts as
:func:`score_completions` does, except that an empty batch gives an empty
tensor. :class:`ClassifierReward` refuses text its tokenizer cannot encode.

Around the scores: :class:`RunningNormalizer` (running mean and standard
deviation as immutable state) and :func:`missing_eos_penalty` (a fixed score
for completions cut off by the length limit).
"""

import dataclasses
import functools
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, final, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from kltune._checks import check_texts
from kltune.diagnostics import _repetition

__all__ = [
    "ClassifierReward",
    "LengthReward",
    "RepetitionPenalty",
    "RewardFn",
    "RunningNormalizer",
    "VaderSentiment",
    "clipped",
    "missing_eos_penalty",
    "score_completions",
    "weighted_sum",
]

_PREVIEW_CHARS = 60


# runtime_checkable only so that beartype (which checks annotations during the tests) can
# use RewardFn in annotations: isinstance then tests that __call__ exists, nothing more.
@runtime_checkable
class RewardFn(Protocol):
    """Scores completions: prompts and completions (texts) in, one float per completion out.

    A plain function ``def my_reward(prompts, completions) -> list[float]`` fits,
    as does any object with such a ``__call__``. ``prompts[i]`` is the prompt
    that ``completions[i]`` continues (prompts repeat when a prompt has several
    completions). Return a 1-D tensor or a sequence of real numbers, one per
    completion; :func:`score_completions` converts and checks it.
    """

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], /
    ) -> Float[Tensor, " B"] | Sequence[float]: ...


def _name_of(reward_fn: object) -> str:
    name = getattr(reward_fn, "__name__", None)
    return name if isinstance(name, str) else type(reward_fn).__name__


def _preview(text: str) -> str:
    return repr(text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "…")


def _check_texts(
    prompts: Sequence[str], completions: Sequence[str], *, allow_empty: bool = False
) -> None:
    check_texts(prompts, name="prompts", allow_empty=True)
    check_texts(completions, name="completions", allow_empty=True)
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; "
            "pass one prompt per completion (repeat a prompt for each of its completions)"
        )
    if len(completions) == 0 and not allow_empty:
        raise ValueError("cannot score an empty batch (no completions)")


def _check_utf8(texts: Sequence[str]) -> None:
    """Raise for a str a tokenizer cannot encode (a lone surrogate, e.g. from a bad decode)."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"text {i} ({_preview(text)}) is not valid Unicode: {error.reason} at "
                f"position {error.start}; a tokenizer cannot encode it"
            ) from None


def _number_to_float(x: object, index: int, name: str) -> float:
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, Tensor) and x.dim() == 0 and not x.is_complex():
        return float(x)
    raise TypeError(
        f"reward function {name!r} returned a {type(x).__name__} at index {index}; "
        "each score must be a real number"
    )


def _as_scores(raw: object, name: str) -> Tensor:
    """Convert a reward function's output to a float64 CPU tensor, or raise."""
    expected = "a 1-D tensor or a sequence of floats, one per completion"
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in "biuf":
            raise TypeError(
                f"reward function {name!r} returned a numpy array of dtype {raw.dtype}; "
                f"expected {expected}"
            )
        values = torch.as_tensor(raw.astype(np.float64))
    elif isinstance(raw, Tensor):
        if raw.is_complex():
            raise TypeError(
                f"reward function {name!r} returned a complex tensor; expected {expected}"
            )
        values = raw.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        values = torch.tensor(
            [_number_to_float(x, i, name) for i, x in enumerate(raw)], dtype=torch.float64
        )
    else:
        raise TypeError(
            f"reward function {name!r} returned a {type(raw).__name__}; expected {expected}"
        )
    if values.dim() != 1:
        raise ValueError(
            f"reward function {name!r} returned scores of shape {tuple(values.shape)}; "
            f"expected {expected} (shape [B])"
        )
    return values


def _call_reward_fn(
    reward_fn: RewardFn, name: str, prompts: list[str], completions: list[str]
) -> object:
    try:
        return reward_fn(prompts, completions)
    except Exception as error:
        raise RuntimeError(
            f"reward function {name!r} raised {type(error).__name__}: {error}"
        ) from error


def score_completions(
    reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str]
) -> Float[Tensor, " B"]:
    """Call a reward function and check what it returns: one finite float per completion.

    The reward function gets lists (copies), so it cannot change the caller's
    texts. Its output (a tensor, numpy array, list or tuple of real numbers) is
    detached and returned as a new float32 CPU tensor.

    Args:
        reward_fn: any :class:`RewardFn`.
        prompts: the prompt of each completion.
        completions: the generated texts to score.

    Returns:
        One score per completion, float32 on the CPU.

    Raises:
        ValueError: ``prompts`` and ``completions`` differ in length, the batch is
            empty, or the reward function returned the wrong number of scores,
            a tensor that is not 1-D, or a NaN / infinite score (the message
            names the function and the first offending completion).
        TypeError: the texts are not strings, or the reward function returned
            something that is not numbers (a str, a dict, ...).
        RuntimeError: the reward function raised; the original exception is
            chained as ``__cause__``.

    Example:
        >>> def exclamations(prompts, completions):
        ...     return [c.count("!") for c in completions]
        >>> score_completions(exclamations, ["Hi", "Hi"], [" there!", " you!!"])
        tensor([1., 2.])
        >>> nan_reward = lambda p, c: [float("nan")] * len(c)
        >>> score_completions(nan_reward, ["Hi"], [" there"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: reward function '<lambda>' returned a non-finite score (nan) at index 0, ...
    """
    name = _name_of(reward_fn)
    _check_texts(prompts, completions)
    raw: object
    if isinstance(reward_fn, (_WeightedSum, _Clipped)):
        # the combinators score their parts with score_completions, which names the culprit
        raw = reward_fn(list(prompts), list(completions))
    else:
        raw = _call_reward_fn(reward_fn, name, list(prompts), list(completions))
    values = _as_scores(raw, name)
    if values.shape[0] != len(completions):
        raise ValueError(
            f"reward function {name!r} returned {values.shape[0]} scores "
            f"for {len(completions)} completions"
        )
    scores = values.to(torch.float32)
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(
            f"reward function {name!r} returned a non-finite score ({float(values[i])}) "
            f"at index {i}, for the completion {_preview(completions[i])}"
        )
    return scores


def _texts(prompts: Sequence[str], completions: Sequence[str], include_prompt: bool) -> list[str]:
    # Called directly, a shipped reward checks its texts as score_completions does,
    # except that an empty batch gives no scores.
    _check_texts(prompts, completions, allow_empty=True)
    # A completion continues its prompt token for token, so the full text is the plain
    # concatenation: no separator is added.
    if include_prompt:
        return [p + c for p, c in zip(prompts, completions, strict=True)]
    return list(completions)


@final
@dataclass(frozen=True)
class VaderSentiment:
    r"""VADER sentiment of the completion: the compound score in [−1, 1].

    VADER sums lexicon valences of the words, adjusted by rules for negation,
    boosters ("very"), contrast ("but"), capitals and punctuation, then squashes
    the sum :math:`s` into [−1, 1]:

    .. math::
        \text{compound} = \frac{s}{\sqrt{s^2 + \alpha}}, \qquad \alpha = 15

    The lexicon ships in the ``vadersentiment`` wheel: offline, CPU-only,
    deterministic and fast. The analyzer is built once per
    instance, on first use, and is left out of pickles and deep copies (it is
    rebuilt on demand), so the reward can be sent to worker processes cheaply.

    Args:
        include_prompt: score ``prompt + completion`` instead of the completion
            alone. The default (False) scores only what the policy wrote:
            including the prompt mixes its sentiment, which the policy cannot
            change, into the score, so different prompts start from different
            baselines (and a long prompt dilutes the completion). Set it when the completion only
            reads right in context, e.g. a prompt ending in "not" followed by a
            completion starting with "good".

    Calling it returns one compound score per completion, float32.

    Example:
        >>> prompts = ["The film was", "The film was"]
        >>> VaderSentiment()(prompts, [" wonderful and moving.", " dull and painful."])
        tensor([ 0.5719, -0.6808])
        >>> prompts = ["I hated the start but"]
        >>> VaderSentiment(include_prompt=True)(prompts, [" the ending was great"])
        tensor([0.6187])

    References:
        C. J. Hutto and E. Gilbert, "VADER: A Parsimonious Rule-based Model for
        Sentiment Analysis of Social Media Text", ICWSM 2014,
        https://ojs.aaai.org/index.php/ICWSM/article/view/14550.
    """

    include_prompt: bool = False

    @functools.cached_property
    def _analyzer(self) -> SentimentIntensityAnalyzer:
        # cached_property writes the instance __dict__ directly, which a frozen dataclass
        # allows: the analyzer is a cache, not part of the value (eq, repr, pickle skip it).
        return SentimentIntensityAnalyzer()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state.pop("_analyzer", None)
        return state

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        texts = _texts(prompts, completions, self.include_prompt)
        compound = [self._analyzer.polarity_scores(text)["compound"] for text in texts]
        return torch.tensor(compound, dtype=torch.float32)


OutputKind = Literal["probability", "logit", "signed"]
_OUTPUT_KINDS = ("probability", "logit", "signed")


def _classifier_scores(logits: Tensor, index: int, output: str) -> Tensor:
    """Scores from classifier logits [B, labels] (float32); see ClassifierReward."""
    if logits.shape[-1] == 1:  # a single-logit head: P(positive) = sigmoid(logit)
        logit = logits[:, 0]
        prob = torch.sigmoid(logit)
    else:
        logit = logits[:, index]
        prob = torch.softmax(logits, dim=-1)[:, index]
    if output == "logit":
        return logit
    if output == "probability":
        return prob
    return 2.0 * prob - 1.0


@final
@dataclass(frozen=True, eq=False)
class ClassifierReward:
    r"""A Hugging Face sequence classifier as a reward, with its own tokenizer.

    The classifier reads the completion *text* and re-tokenizes it with its own
    tokenizer, so the policy may use any vocabulary. With :math:`z` the
    classifier's logits and :math:`k` the positive label:

    .. math::
        \text{probability} = \operatorname{softmax}(z)_k, \qquad
        \text{logit} = z_k, \qquad
        \text{signed} = 2\,\text{probability} - 1

    For a binary classifier ``"signed"`` is :math:`P(\text{pos}) - P(\text{neg})`
    in [−1, 1], on the same scale as :class:`VaderSentiment`; with more labels it
    is :math:`P(\text{pos}) - P(\text{not pos})`. A single-logit head (a reward
    model) is read as a binary classifier with logits :math:`(0, z)`:
    probability :math:`\sigma(z)`, signed :math:`\tanh(z/2)`, logit :math:`z`;
    its positive label is 0.

    Texts are scored in chunks of ``batch_size`` under ``torch.inference_mode``
    on the classifier's own device, padded, and truncated to ``max_length``
    tokens (by default the smaller of the tokenizer's ``model_max_length`` and the
    model's ``max_position_embeddings``; which end is cut follows the tokenizer's
    ``truncation_side``).

    Build it from a (model, tokenizer) pair, or with :meth:`from_pretrained` from
    a hub id or a local folder. Two sentiment classifiers for users with a
    network, both with labels ``"NEGATIVE"`` / ``"POSITIVE"``:

    - ``distilbert-base-uncased-finetuned-sst-2-english`` (SST-2 sentences),
    - ``lvwerra/distilbert-imdb`` (IMDb reviews, the classic RLHF sentiment task).

    Skipped as a doctest: it downloads the classifier, and the test machines
    are offline (tests/test_rewards.py covers the same path on a tiny classifier):

    >>> reward = ClassifierReward.from_pretrained(  # doctest: +SKIP
    ...     "lvwerra/distilbert-imdb", positive_label="POSITIVE", output="logit"
    ... )

    Args:
        model: a sequence classifier in eval mode (``model.eval()``: dropout
            would make scores random).
        tokenizer: the classifier's tokenizer; it needs a pad token.
        positive_label: the label whose score is returned: a name from
            ``model.config.label2id`` (e.g. ``"POSITIVE"``) or an index.
        output: ``"probability"``, ``"logit"`` or ``"signed"`` (formulas above).
        batch_size: texts per forward pass.
        include_prompt: classify ``prompt + completion`` instead of the completion.
        max_length: truncate texts to this many tokens; ``None`` for the default above.

    Calling it returns one score per completion, float32 on the CPU.

    Raises:
        ValueError: the model is in training mode, the label is unknown or out of
            range, ``output`` is not one of the three kinds, ``batch_size`` or
            ``max_length`` is < 1, or the tokenizer has no pad token.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    positive_label: int | str
    output: OutputKind = "probability"
    batch_size: int = 32
    include_prompt: bool = False
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.model.training:
            raise ValueError(
                "the classifier is in training mode (dropout makes scores random); "
                "pass model.eval()"
            )
        if self.output not in _OUTPUT_KINDS:
            raise ValueError(f"output must be one of {_OUTPUT_KINDS}, got {self.output!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {self.max_length}")
        if self.tokenizer.pad_token is None:
            raise ValueError(
                "the classifier's tokenizer has no pad token, so texts cannot be batched; "
                "set one (e.g. tokenizer.pad_token = tokenizer.eos_token, and "
                "model.config.pad_token_id to its id)"
            )
        self._label_index()  # validates positive_label

    def _label_index(self) -> int:
        config = self.model.config
        num_labels = int(config.num_labels or 0)
        label = self.positive_label
        if isinstance(label, str):
            label2id: dict[str, int] = {str(k): int(v) for k, v in (config.label2id or {}).items()}
            if label not in label2id:
                raise ValueError(
                    f"positive_label {label!r} is not a label of this classifier; "
                    f"its labels are {sorted(label2id, key=label2id.__getitem__)} "
                    "(config.label2id); pass one of them or an index"
                )
            index = label2id[label]
        elif isinstance(label, bool):
            raise ValueError(f"positive_label must be a label name or an int index, got {label}")
        else:
            index = label
        if not 0 <= index < num_labels:
            raise ValueError(
                f"positive_label index {index} is out of range for a classifier with "
                f"{num_labels} label(s)"
            )
        return index

    def _max_length(self) -> int:
        if self.max_length is not None:
            return self.max_length
        limits = [int(self.tokenizer.model_max_length)]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int):
            limits.append(positions)
        return min(limits)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        positive_label: int | str,
        output: OutputKind = "probability",
        device: str | torch.device | None = None,
        batch_size: int = 32,
        include_prompt: bool = False,
        max_length: int | None = None,
    ) -> "ClassifierReward":
        """Load a classifier and its tokenizer from a hub id or a local folder.

        Args:
            name_or_path: a hub id (``"lvwerra/distilbert-imdb"``) or a folder
                written by ``save_pretrained`` (model and tokenizer files).
            positive_label, output, batch_size, include_prompt, max_length: as in
                the class.
            device: where to put the classifier (e.g. ``"cuda"``); ``None`` keeps
                the CPU.

        Returns:
            The reward, with the model in eval mode.

        Raises:
            OSError: the classifier could not be loaded (offline and not cached,
                a wrong id, or a folder missing files); the message says what to do.
        """
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        except OSError as error:
            raise OSError(
                f"could not load the sequence classifier {os.fspath(name_or_path)!r}: {error}\n"
                "Without a network, set HF_HUB_OFFLINE=1 and make sure the model is in "
                "the Hugging Face cache, or pass the path of a local folder written by "
                "save_pretrained (config, weights and tokenizer files)."
            ) from error
        if device is not None:
            model = model.to(device)
        return cls(
            model=model.eval(),
            tokenizer=tokenizer,
            positive_label=positive_label,
            output=output,
            batch_size=batch_size,
            include_prompt=include_prompt,
            max_length=max_length,
        )

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        texts = _texts(prompts, completions, self.include_prompt)
        _check_utf8(texts)
        index, max_length = self._label_index(), self._max_length()
        device = self.model.device
        chunks = [torch.zeros(0)]
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                encoded = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                logits = self.model(**encoded).logits.float()  # bf16 classifiers: score in f32
                chunks.append(_classifier_scores(logits, index, self.output).cpu())
        # clone outside inference mode: callers may use the scores in autograd.
        return torch.cat(chunks).clone()


def _words(text: str) -> list[str]:
    return text.split()


@final
@dataclass(frozen=True)
class LengthReward:
    r"""Length of the completion in whitespace-separated words, or closeness to a target.

    .. math::
        s = w \quad\text{(no target)}, \qquad
        s = -\frac{|w - w^\ast|}{w^\ast} \quad\text{(target } w^\ast\text{)}

    where :math:`w` is the number of words of the completion
    (``len(completion.split())``). With a target the score is 0 at the target and
    falls by 1 per target length of distance, so it is scale-free; without one it
    rewards longer completions (scale it down in :func:`weighted_sum`).

    Args:
        target_words: the preferred number of words :math:`w^\ast \ge 1`, or
            ``None`` to score the raw word count.

    Example:
        >>> LengthReward()(["", ""], ["one two three", "four"])
        tensor([3., 1.])
        >>> LengthReward(target_words=4)(["", "", ""], ["one two three", "a b c d", ""])
        tensor([-0.2500,  0.0000, -1.0000])
    """

    target_words: int | None = None

    def __post_init__(self) -> None:
        if self.target_words is not None and self.target_words < 1:
            raise ValueError(f"target_words must be >= 1 or None, got {self.target_words}")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        texts = _texts(prompts, completions, False)
        words = torch.tensor([len(_words(c)) for c in texts], dtype=torch.float32)
        if self.target_words is None:
            return words
        # 0 - x, not -x: a completion at the target scores +0.0, not -0.0
        return 0.0 - (words - self.target_words).abs() / self.target_words


@final
@dataclass(frozen=True)
class RepetitionPenalty:
    r"""Minus the fraction of repeated word n-grams in the completion: 0 for none.

    .. math::
        s = -\left(1 - \frac{\#\text{distinct n-grams}}{\#\text{n-grams}}\right) \in (-1, 0]

    over the word n-grams of the lower-cased completion (``casefold().split()``).
    A completion with fewer than ``n`` words has no n-gram and scores 0. A text
    repeating one n-gram :math:`k` times scores :math:`-(1 - 1/k)`: degenerate
    loops, the classic sign of reward hacking, approach −1.

    Args:
        n: n-gram length, ≥ 1.

    Example:
        >>> penalty = RepetitionPenalty(n=2)
        >>> penalty(["", "", ""], ["a b c d", "a b a b a b", "a"])
        tensor([ 0.0000, -0.6000,  0.0000])
    """

    n: int = 3

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    def _score(self, text: str) -> float:
        rate = _repetition(_words(text.casefold()), self.n)
        return -rate if rate else 0.0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        texts = _texts(prompts, completions, False)
        return torch.tensor([self._score(c) for c in texts], dtype=torch.float32)


@final
@dataclass(frozen=True)
class _WeightedSum:
    pairs: tuple[tuple[RewardFn, float], ...]

    @property
    def __name__(self) -> str:
        terms = ", ".join(f"{_name_of(fn)}*{weight:g}" for fn, weight in self.pairs)
        return f"weighted_sum({terms})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        total = torch.zeros(len(completions), dtype=torch.float32)
        if not completions:  # like the other rewards: an empty batch gives no scores
            return total
        for fn, weight in self.pairs:
            total = total + weight * score_completions(fn, prompts, completions)
        return total


def weighted_sum(*pairs: tuple[RewardFn, float]) -> RewardFn:
    r"""A reward function that adds other reward functions' scores, each times a weight.

    .. math::
        s = \sum_j w_j\, s_j

    Each term is computed through :func:`score_completions`, so an invalid term
    is reported under its own name.

    Args:
        pairs: ``(reward_fn, weight)`` pairs, at least one; weights finite.

    Returns:
        The combined reward function.

    Raises:
        ValueError: no pair, or a non-finite weight.

    Example:
        >>> reward = weighted_sum((LengthReward(), 0.5), (RepetitionPenalty(n=1), 2.0))
        >>> reward(["", ""], ["a b c d", "a a"])
        tensor([2., 0.])
    """
    if not pairs:
        raise ValueError("weighted_sum needs at least one (reward_fn, weight) pair")
    for fn, weight in pairs:
        if not math.isfinite(weight):
            raise ValueError(f"the weight of {_name_of(fn)!r} must be finite, got {weight}")
    return _WeightedSum(tuple((fn, float(weight)) for fn, weight in pairs))


@final
@dataclass(frozen=True)
class _Clipped:
    reward_fn: RewardFn
    low: float
    high: float

    @property
    def __name__(self) -> str:
        return f"clipped({_name_of(self.reward_fn)}, {self.low:g}, {self.high:g})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        if not completions:  # like the other rewards: an empty batch gives no scores
            return torch.zeros(0)
        scores = score_completions(self.reward_fn, prompts, completions)
        return scores.clamp(self.low, self.high)


def clipped(reward_fn: RewardFn, low: float, high: float) -> RewardFn:
    r"""A reward function whose scores are clipped to [low, high].

    .. math::
        s = \min(\max(s_\text{fn}, \text{low}), \text{high})

    Bounds may be infinite for a one-sided clip (``clipped(fn, 0.0, math.inf)``).

    Raises:
        ValueError: ``low`` or ``high`` is NaN, or ``low >= high``.

    Example:
        >>> reward = clipped(LengthReward(), 1.0, 3.0)
        >>> reward(["", "", ""], ["", "a b", "a b c d e"])
        tensor([1., 2., 3.])
    """
    if math.isnan(low) or math.isnan(high) or not low < high:
        raise ValueError(f"clipped needs low < high, got low={low}, high={high}")
    return _Clipped(reward_fn, float(low), float(high))


def _batch_moments(scores: Tensor) -> tuple[int, float, float]:
    """Count, mean and sum of squared deviations (M2) of a batch, in float64."""
    x = scores.detach().to(device="cpu", dtype=torch.float64)
    mean = x.mean()
    return x.numel(), float(mean), float(((x - mean) ** 2).sum())


@final
@dataclass(frozen=True)
class RunningNormalizer:
    r"""Running mean and standard deviation of scores, as immutable state.

    :meth:`update` merges a batch into the statistics with the parallel form of
    Welford's algorithm (exact for whole batches, no loop over samples): with the
    state :math:`(n_a, \mu_a, M_a)` and a batch :math:`(n_b, \mu_b, M_b)`, where
    :math:`M` is the sum of squared deviations from the mean,

    .. math::
        n = n_a + n_b, \quad
        \delta = \mu_b - \mu_a, \quad
        \mu = \mu_a + \delta\,\frac{n_b}{n}, \quad
        M = M_a + M_b + \delta^2\,\frac{n_a n_b}{n}

    and :meth:`normalize` returns :math:`(s - \mu) / (\sigma + \epsilon)` with the
    population standard deviation :math:`\sigma = \sqrt{M / n}` (numpy's
    ``std`` with ``ddof=0``). Statistics are kept in float64 Python floats.

    Args:
        count: number of scores seen.
        mean: their mean.
        m2: their sum of squared deviations from the mean.
        eps: added to σ in :meth:`normalize`, so a constant score does not divide by 0.

    Example:
        >>> norm = RunningNormalizer().update(torch.tensor([1.0, 2.0]))
        >>> norm = norm.update(torch.tensor([3.0, 4.0, 5.0]))
        >>> norm.count, norm.mean, norm.var
        (5, 3.0, 2.0)
        >>> norm.normalize(torch.tensor([3.0, 5.0]))
        tensor([0.0000, 1.4142])

    References:
        T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating Formulae and a
        Pairwise Algorithm for Computing Sample Variances", 1979,
        https://en.wikipedia.org/wiki/Algorithms_for_calculating_variance#Parallel_algorithm.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")
        if not (math.isfinite(self.m2) and self.m2 >= 0):
            raise ValueError(f"m2 must be a finite number >= 0, got {self.m2}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")

    @property
    def var(self) -> float:
        """Population variance M / n of the scores seen (0 before any)."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation of the scores seen (0 before any)."""
        return math.sqrt(self.var)

    def update(self, scores: Float[Tensor, " B"]) -> "RunningNormalizer":
        """Return the statistics with ``scores`` merged in; this state is left unchanged.

        Raises:
            ValueError: ``scores`` is not 1-D or holds a NaN or infinite value.
        """
        if scores.dim() != 1:
            raise ValueError(f"scores must have shape [B], got {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores contain NaN or infinite values; check the reward function")
        if scores.numel() == 0:
            return dataclasses.replace(self)
        n_b, mean_b, m2_b = _batch_moments(scores)
        n = self.count + n_b
        delta = mean_b - self.mean
        return dataclasses.replace(
            self,
            count=n,
            mean=self.mean + delta * n_b / n,
            m2=self.m2 + m2_b + delta**2 * self.count * n_b / n,
        )

    def normalize(self, scores: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """(scores − mean) / (std + eps), in the dtype and on the device of ``scores``.

        Raises:
            ValueError: no score has been seen yet (call :meth:`update` first).
        """
        if self.count == 0:
            raise ValueError("RunningNormalizer has seen no scores; call update(scores) first")
        return (scores - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict[str, int | float]:
        """The state as plain numbers, for checkpoints and logs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, int | float]) -> "RunningNormalizer":
        """Rebuild from :meth:`state_dict`.

        Raises:
            ValueError: keys are missing or unexpected, or a value is invalid.
        """
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(state) != expected:
            raise ValueError(
                f"RunningNormalizer state must have keys {sorted(expected)}, got {sorted(state)}"
            )
        count = state["count"]
        if float(count) != int(count):
            raise ValueError(f"count must be a whole number, got {count}")
        return cls(
            count=int(count),
            mean=float(state["mean"]),
            m2=float(state["m2"]),
            eps=float(state["eps"]),
        )


def missing_eos_penalty(
    scores: Float[Tensor, " B"], ended: Bool[Tensor, " B"], penalty: float
) -> Float[Tensor, " B"]:
    r"""Give completions cut off by the length limit a fixed score.

    .. math::
        s'_i = \begin{cases} s_i & \text{ended}_i \\ \text{penalty} & \text{otherwise} \end{cases}

    The score of a truncated completion is *replaced* by ``penalty`` (e.g. −1),
    not lowered by it: the reward model's opinion of half a sentence is
    unreliable, and a fixed low score teaches the policy to finish within the
    limit. (TRL's ``missing_eos_penalty`` subtracts instead; to get that, use
    ``torch.where(ended, scores, scores - p)``.)

    Args:
        scores: one score per completion.
        ended: True where the completion ended with EOS (or a stop string),
            False where the length limit cut it.
        penalty: the score given to truncated completions.

    Returns:
        The scores with truncated completions set to ``penalty``.

    Raises:
        ValueError: ``ended`` is not bool or not the shape of ``scores``, or
            ``penalty`` is not finite.

    Example:
        >>> missing_eos_penalty(torch.tensor([0.5, 0.9]), torch.tensor([True, False]), -1.0)
        tensor([ 0.5000, -1.0000])

    References:
        Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019,
        https://arxiv.org/abs/1909.08593 (a fixed −1 for samples without a period);
        Huang et al., "The N+ Implementation Details of RLHF with PPO", 2024,
        https://arxiv.org/abs/2403.17031 (detail: penalize completions without EOS).
    """
    if ended.dtype != torch.bool:
        raise ValueError(f"ended must be a bool tensor, got dtype {ended.dtype}")
    if ended.shape != scores.shape:
        raise ValueError(
            f"ended has shape {tuple(ended.shape)} but scores has shape {tuple(scores.shape)}"
        )
    if not math.isfinite(penalty):
        raise ValueError(f"penalty must be finite, got {penalty}")
    fixed = torch.tensor(penalty, dtype=scores.dtype, device=scores.device)
    return torch.where(ended, scores, fixed)

r"""Diversity and collapse diagnostics over a batch of completion texts.

Without a KL penalty, PPO on a reward model drives the policy onto a handful of
high-reward strings: the reward rises while the completions stop differing.
These functions measure that, once per iteration, on the batch of completions
the rollout produced; the training driver logs :func:`diversity_metrics` and a
:class:`CollapseDetector` compares the policy with the reference policy's own
samples.

Word tokens:
    Every text metric here works on *words*: a completion is lowercased and
    split on runs of whitespace (``text.lower().split()``). Punctuation stays
    attached (``"great!"`` and ``"great"`` are different words). No model
    tokenizer is involved, so values compare across models and tokenizers.

The n-grams of a completion :math:`x` with words :math:`w_1 \dots w_L` are the
:math:`\max(0, L - n + 1)` tuples :math:`G_n(x) = [(w_i, \dots, w_{i+n-1})]_i`,
counted with multiplicity.

These are logging functions on Python strings: they return plain floats, never
tensors, and are pure Python (no tokenizer, no model).
"""

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Final, TypeVar, final

from jaxtyping import Bool, Float
from torch import Tensor

from kltune._checks import check_texts
from kltune.functional import masked_mean

__all__ = [
    "CollapseDetector",
    "CollapseReport",
    "distinct_n",
    "diversity_metrics",
    "mean_token_entropy",
    "repetition_rate",
    "self_bleu",
    "unique_fraction",
]

Ngram = tuple[str, ...]


def _words(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(words: Sequence[str], n: int) -> list[Ngram]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _repetition(words: Sequence[str], n: int) -> float | None:
    """The fraction of one text's word n-grams that repeat an earlier one (None: < n words)."""
    grams = _ngrams(words, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def _check_order(n: int, *, name: str) -> None:
    if n < 1:
        raise ValueError(f"{name} must be >= 1 (an n-gram order), got {n}")


def distinct_n(texts: Sequence[str], n: int) -> float:
    r"""Distinct-n: the fraction of the batch's n-grams that are distinct.

    .. math::
        \text{distinct-}n = \frac{\left|\bigcup_i \operatorname{set} G_n(x_i)\right|}
        {\sum_i |G_n(x_i)|}

    Pooled over the whole batch, so the same phrase in two completions counts
    once in the numerator and twice in the denominator. 1 means no n-gram is
    repeated anywhere in the batch; a policy that emits one string ``B`` times
    scores at most ``1 / B``.

    Args:
        texts: the batch of completions (see the module's word tokens).
        n: the n-gram order, >= 1.

    Returns:
        A float in [0, 1]; 0.0 when no completion has ``n`` words.

    Raises:
        ValueError: ``texts`` is empty or ``n < 1``.
        TypeError: an item of ``texts`` is not a ``str`` (the message names its index).

    Example:
        >>> texts = ["The cat sat", "the cat ran"]
        >>> distinct_n(texts, 2)
        0.75
        >>> round(distinct_n(texts, 1), 4)
        0.6667

    References:
        Li et al., "A Diversity-Promoting Objective Function for Neural
        Conversation Models", 2016, https://arxiv.org/abs/1510.03055.
    """
    check_texts(texts, name="texts")
    _check_order(n, name="n")
    grams = [gram for text in texts for gram in _ngrams(_words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unique_fraction(texts: Sequence[str]) -> float:
    r"""Fraction of completions that are distinct strings.

    .. math::
        u = \frac{|\{\operatorname{strip}(x_i)\}_i|}{B}

    Completions are compared as whole strings after stripping leading and
    trailing whitespace only (case and inner spacing count). ``1 / B`` means
    every completion is the same string.

    Args:
        texts: the batch of completions.

    Returns:
        A float in [1/B, 1].

    Raises:
        ValueError: ``texts`` is empty.
        TypeError: an item of ``texts`` is not a ``str``.

    Example:
        >>> unique_fraction(["good", " good ", "Good", "bad"])
        0.75
    """
    check_texts(texts, name="texts")
    return len({text.strip() for text in texts}) / len(texts)


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    r"""Mean fraction of a completion's n-grams that repeat an earlier one of it.

    .. math::
        \text{rep}_n(x) = 1 - \frac{|\operatorname{set} G_n(x)|}{|G_n(x)|},
        \qquad \text{rep}_n = \frac{1}{|I|} \sum_{i \in I} \text{rep}_n(x_i)

    where :math:`I` holds the completions with at least ``n`` words. Counting
    the n-grams that equal an earlier n-gram of the same completion gives the
    same number as total minus distinct. Unlike :func:`distinct_n` this looks
    inside each completion: it catches degenerate loops ("great great great")
    even when every completion of the batch differs.

    Args:
        texts: the batch of completions.
        n: the n-gram order, >= 1 (4 as in Welleck et al.'s seq-rep-4).

    Returns:
        A float in [0, 1); 0.0 when no completion has ``n`` words.

    Raises:
        ValueError: ``texts`` is empty or ``n < 1``.
        TypeError: an item of ``texts`` is not a ``str``.

    Example:
        >>> round(repetition_rate(["so good so good", "fine thanks"], n=2), 4)
        0.1667

    References:
        Welleck et al., "Neural Text Generation with Unlikelihood Training",
        2020, https://arxiv.org/abs/1908.04319.
    """
    check_texts(texts, name="texts")
    _check_order(n, name="n")
    rates = [rate for text in texts if (rate := _repetition(_words(text), n)) is not None]
    return math.fsum(rates) / len(rates) if rates else 0.0


def _sentence_bleu(i: int, words: list[list[str]], counts: list[list[Counter[Ngram]]]) -> float:
    """BLEU of completion ``i`` against every other completion as references."""
    hyp_len = len(words[i])
    if hyp_len == 0:
        return 0.0
    others = [j for j in range(len(words)) if j != i]
    log_precision = 0.0
    for order, hyp in enumerate(counts[i]):
        # Clip each n-gram's count by its largest count in any single reference.
        matched = sum(min(c, max(counts[j][order][g] for j in others)) for g, c in hyp.items())
        smooth = 0 if order == 0 else 1  # Lin & Och add-one, for n >= 2 only
        if matched + smooth == 0:
            return 0.0
        log_precision += math.log((matched + smooth) / (sum(hyp.values()) + smooth))
    # Closest reference length; ties go to the shorter reference.
    ref_len = min((len(words[j]) for j in others), key=lambda r: (abs(r - hyp_len), r))
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision / len(counts[i]))


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    r"""Self-BLEU: mean BLEU of each completion against all the others.

    .. math::
        \text{self-BLEU} = \frac{1}{B} \sum_{i=1}^{B}
            \operatorname{BLEU}\bigl(x_i;\ \{x_j\}_{j \ne i}\bigr)

    with sentence BLEU of order :math:`N` = ``max_n`` and uniform weights,

    .. math::
        \operatorname{BLEU}(h; R) = \mathrm{BP} \cdot
            \exp\Bigl(\frac{1}{N} \sum_{n=1}^{N} \log p_n\Bigr), \quad
        p_n = \frac{\sum_{g \in G_n(h)} \min\bigl(c_h(g), \max_{r \in R} c_r(g)\bigr) + s_n}
                   {|G_n(h)| + s_n},

    :math:`s_1 = 0`, :math:`s_n = 1` for :math:`n \ge 2` (add-one smoothing of
    Lin & Och, NLTK's ``method2``), and brevity penalty
    :math:`\mathrm{BP} = 1` if :math:`|h| > r^*` else :math:`e^{1 - r^* / |h|}`,
    :math:`r^*` the reference length closest to :math:`|h|` (the shorter on a
    tie). An empty completion, or one sharing no word with the others, scores 0.

    Higher means *less* diverse: B copies of one string score exactly 1.
    Cost is :math:`O(B^2 L N)` pure Python for completions of ``L`` words,
    fine for batches up to ~64.

    Args:
        texts: the batch of completions, at least two.
        max_n: the largest n-gram order :math:`N`, >= 1.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: fewer than two completions, or ``max_n < 1``.
        TypeError: an item of ``texts`` is not a ``str``.

    Example:
        >>> round(self_bleu(["a b c d", "a b c e"]), 4)
        0.658
        >>> self_bleu(["the cat sat"] * 3)
        1.0

    References:
        Papineni et al., "BLEU: a Method for Automatic Evaluation of Machine
        Translation", 2002; Lin & Och, "ORANGE: a Method for Evaluating
        Automatic Evaluation Metrics for Machine Translation", 2004; Zhu et al.,
        "Texygen: A Benchmarking Platform for Text Generation Models", 2018,
        https://arxiv.org/abs/1802.01886.
    """
    check_texts(texts, name="texts")
    _check_order(max_n, name="max_n")
    if len(texts) < 2:
        raise ValueError(
            f"self-BLEU compares completions with each other and needs at least 2, got {len(texts)}"
        )
    words = [_words(text) for text in texts]
    counts = [[Counter(_ngrams(w, n)) for n in range(1, max_n + 1)] for w in words]
    return math.fsum(_sentence_bleu(i, words, counts) for i in range(len(words))) / len(words)


def mean_token_entropy(entropy: Float[Tensor, "B T"], mask: Bool[Tensor, "B T"]) -> float:
    r"""Mean per-token policy entropy over the real response tokens, as a float.

    .. math::
        \bar H = \frac{\sum_{b,t} m_{bt} H_{bt}}{\sum_{b,t} m_{bt}}

    Args:
        entropy: per-token entropy of the policy (e.g. from
            :func:`kltune.functional.entropy_from_logits`), in nats.
        mask: True at real response tokens.

    Returns:
        The token-weighted mean entropy (long completions weigh more).

    Raises:
        ValueError: ``mask`` is not bool, shapes differ, or no token is real
            (an empty batch included).

    Example:
        >>> import torch
        >>> entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> round(mean_token_entropy(entropy, mask), 4)
        2.3333
    """
    return float(masked_mean(entropy.detach(), mask))


def diversity_metrics(texts: Sequence[str]) -> dict[str, float]:
    """Every text diversity metric of a batch, under namespaced keys for logging.

    Keys: ``"diversity/distinct_1"``, ``"diversity/distinct_2"``,
    ``"diversity/distinct_3"`` (:func:`distinct_n`),
    ``"diversity/unique_fraction"`` (:func:`unique_fraction`),
    ``"diversity/self_bleu"`` (:func:`self_bleu`, BLEU-4; NaN for a batch of one
    completion, where it is undefined), ``"diversity/repetition_rate"``
    (:func:`repetition_rate` with 4-grams). Higher distinct-n and unique
    fraction, and lower self-BLEU and repetition rate, mean more diverse.

    Args:
        texts: the batch of completions.

    Returns:
        A new dict of plain floats.

    Raises:
        ValueError: ``texts`` is empty.
        TypeError: an item of ``texts`` is not a ``str``.

    Example:
        >>> m = diversity_metrics(["a good day", "a bad day", "a good day"])
        >>> {key: round(value, 3) for key, value in m.items()}
        {'diversity/distinct_1': 0.444, 'diversity/distinct_2': 0.667,
         'diversity/distinct_3': 0.667, 'diversity/unique_fraction': 0.667,
         'diversity/self_bleu': 0.859, 'diversity/repetition_rate': 0.0}
    """
    check_texts(texts, name="texts")
    return {
        "diversity/distinct_1": distinct_n(texts, 1),
        "diversity/distinct_2": distinct_n(texts, 2),
        "diversity/distinct_3": distinct_n(texts, 3),
        "diversity/unique_fraction": unique_fraction(texts),
        "diversity/self_bleu": self_bleu(texts) if len(texts) > 1 else math.nan,
        "diversity/repetition_rate": repetition_rate(texts),
    }


#: The metrics a CollapseDetector can watch: those where higher means more diverse.
_COLLAPSE_METRICS: Final[Mapping[str, Callable[[Sequence[str]], float]]] = MappingProxyType(
    {
        "diversity/distinct_1": partial(distinct_n, n=1),
        "diversity/distinct_2": partial(distinct_n, n=2),
        "diversity/distinct_3": partial(distinct_n, n=3),
        "diversity/unique_fraction": unique_fraction,
    }
)


@final
@dataclass(frozen=True)
class CollapseReport:
    """The outcome of one :meth:`CollapseDetector.check`.

    Attributes:
        collapsed: ``ratio < threshold``: the policy's diversity fell below
            ``threshold`` times the reference's.
        ratio: ``value / reference_value``.
        metric: the metric key compared, e.g. ``"diversity/distinct_2"``.
        value: the policy's value of the metric.
        reference_value: the reference policy's value of the metric.
        threshold: the detector's threshold.
    """

    collapsed: bool
    ratio: float
    metric: str
    value: float
    reference_value: float
    threshold: float


# typing.Self cannot be checked by the jaxtyping import hook, which decorates each
# method on its own; a TypeVar bound to the class (by name) can.
_Detector = TypeVar("_Detector", bound="CollapseDetector")


@final
@dataclass(frozen=True)
class CollapseDetector:
    r"""Flags mode collapse: policy diversity below a fraction of the reference's.

    .. math::
        \text{collapsed} \iff
        \rho = \frac{d(\text{policy samples})}{d(\text{reference samples})} < \tau

    for a diversity metric :math:`d` where higher means more diverse (distinct-1,
    -2, -3 or the unique fraction) and a threshold :math:`\tau \in (0, 1]`.
    Build it once from the frozen reference policy's own samples with
    :meth:`from_reference`, then :meth:`check` each iteration's completions (or
    the dict :func:`diversity_metrics` already computed for them). Compare
    batches of the same size: distinct-n falls as a batch grows.

    Attributes:
        reference_value: the metric on the reference policy's samples, > 0.
        threshold: :math:`\tau`, in (0, 1].
        metric: a key of :func:`diversity_metrics` where higher is more diverse.

    Raises:
        ValueError: unknown ``metric``, ``threshold`` outside (0, 1], or
            ``reference_value`` not a finite number > 0.

    Example:
        >>> detector = CollapseDetector.from_reference(
        ...     ["what a lovely day", "the film was fine", "i did not enjoy it"]
        ... )
        >>> detector.reference_value
        1.0
        >>> report = detector.check(["great great movie"] * 3)
        >>> report.collapsed, round(report.ratio, 4)
        (True, 0.3333)
        >>> detector.metrics({"diversity/distinct_2": 0.8})
        {'collapse/ratio': 0.8, 'collapse/flag': 0.0}
    """

    reference_value: float
    threshold: float = 0.5
    metric: str = "diversity/distinct_2"

    def __post_init__(self) -> None:
        _check_collapse_metric(self.metric)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not (math.isfinite(self.reference_value) and self.reference_value > 0.0):
            raise ValueError(
                f"the reference's {self.metric} must be a finite number > 0, got "
                f"{self.reference_value}; the reference samples need some diversity "
                "(for distinct-n, completions of at least n words)"
            )

    @classmethod
    def from_reference(
        cls: type[_Detector],
        texts: Sequence[str],
        threshold: float = 0.5,
        metric: str = "diversity/distinct_2",
    ) -> _Detector:
        """A detector whose reference value is ``metric`` of the reference's samples.

        Args:
            texts: completions sampled from the reference policy, ideally for
                the same prompts and batch size as the policy's.
            threshold: flag when the policy's value drops below this fraction.
            metric: the diversity metric to watch.

        Returns:
            The detector.

        Raises:
            ValueError: empty ``texts``, unknown ``metric``, bad ``threshold``,
                or reference samples with no diversity (value 0).
            TypeError: an item of ``texts`` is not a ``str``.
        """
        _check_collapse_metric(metric)
        return cls(_COLLAPSE_METRICS[metric](texts), threshold=threshold, metric=metric)

    def check(self, texts_or_metrics: Sequence[str] | Mapping[str, float]) -> CollapseReport:
        """Compare a batch of policy completions with the reference.

        Args:
            texts_or_metrics: the policy's completions, or a metrics dict
                (e.g. from :func:`diversity_metrics`) that holds ``self.metric``.

        Returns:
            A :class:`CollapseReport`.

        Raises:
            ValueError: empty texts, or a metrics dict without ``self.metric``.
            TypeError: an item of the texts is not a ``str``.
        """
        if isinstance(texts_or_metrics, Mapping):
            if self.metric not in texts_or_metrics:
                raise ValueError(
                    f"the metrics have no key {self.metric!r} (keys: {sorted(texts_or_metrics)})"
                )
            value = float(texts_or_metrics[self.metric])
        else:
            value = _COLLAPSE_METRICS[self.metric](texts_or_metrics)
        ratio = value / self.reference_value
        return CollapseReport(
            collapsed=ratio < self.threshold,
            ratio=ratio,
            metric=self.metric,
            value=value,
            reference_value=self.reference_value,
            threshold=self.threshold,
        )

    def metrics(self, texts_or_metrics: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
        """:meth:`check` as loggable floats: ``"collapse/ratio"`` and ``"collapse/flag"``.

        Args:
            texts_or_metrics: as for :meth:`check`.

        Returns:
            ``{"collapse/ratio": ratio, "collapse/flag": 1.0 if collapsed else 0.0}``.
        """
        report = self.check(texts_or_metrics)
        return {"collapse/ratio": report.ratio, "collapse/flag": float(report.collapsed)}


def _check_collapse_metric(metric: str) -> None:
    if metric not in _COLLAPSE_METRICS:
        raise ValueError(
            f"metric must be one of {sorted(_COLLAPSE_METRICS)} (higher = more diverse), "
            f"got {metric!r}"
        )

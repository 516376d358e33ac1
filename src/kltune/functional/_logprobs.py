"""Token logprobs and entropies from logits, in row chunks.

Logits of a causal LM are [B, T, V] with V in the tens of thousands. Casting all
of them to float32 at once and taking a full ``log_softmax`` holds two float32
copies; these functions walk the batch in chunks, so at most one float32 chunk
is alive in the forward pass. Under autograd each chunk keeps what its backward
needs, which adds up to one float32 copy of the logits, never more.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kltune._checks import (
    check_count,
    check_floating,
    check_integer_dtype,
    check_positive,
    check_rank,
)

#: Rows of the flattened [B·T, V] logits processed per chunk: 2048 rows of a
#: 50k vocabulary is ~400 MB of float32, a bound a laptop can afford.
DEFAULT_CHUNK_TOKENS = 2048


def _row_chunks(flat: Tensor, chunk_tokens: int) -> list[tuple[int, int]]:
    # An empty batch is one empty chunk, so the caller's torch.cat has something to join.
    step = chunk_tokens
    return [(i, min(i + step, flat.shape[0])) for i in range(0, flat.shape[0], step)] or [(0, 0)]


def _check_logits(
    logits: Tensor, temperature: float, chunk_tokens: int, name: str = "logits"
) -> None:
    """The checks every function of logits shares: [B, T, V] floats, V >= 1, τ > 0."""
    check_rank(logits, 3, name=name, axes="B T V")
    check_floating(**{name: logits})
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary axis (shape {tuple(logits.shape)})")
    check_positive(temperature, name="temperature")
    check_count(chunk_tokens, name="chunk_tokens")


def _check_tokens(tokens: Tensor, logits: Tensor) -> None:
    check_integer_dtype(tokens, name="tokens")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but logits has shape "
            f"{tuple(logits.shape)}; expected tokens of shape {tuple(logits.shape[:2])}"
        )
    # Only on the CPU, where it costs no host sync; on an accelerator torch's own
    # device-side assert reports an out-of-range index instead.
    vocab = logits.shape[-1]
    if tokens.device.type == "cpu" and tokens.numel() > 0:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"tokens must be ids in [0, {vocab}) (the vocabulary of logits), got ids "
                f"from {low} to {high}"
            )


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    # Where bf16/fp16 logits become float32: here, one chunk at a time. Never
    # downcast: float64 logits stay float64.
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return scaled if temperature == 1.0 else scaled / temperature


def logprobs_from_logits(
    logits: Float[Tensor, "B T V"],
    tokens: Int[Tensor, "B T"],
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Float[Tensor, "B T"]:
    r"""Log-probability of each given token under ``softmax(logits / temperature)``.

    .. math::
        \log \pi(y_t) = z_{t, y_t} / \tau - \log \sum_v \exp(z_{t, v} / \tau)

    The temperature must be the one used when sampling, so that the behaviour
    logprobs and the ones computed in training belong to the same distribution.

    Args:
        logits: next-token logits, aligned so that ``logits[:, t]`` predicts
            ``tokens[:, t]``; any float dtype.
        tokens: the tokens whose logprobs are wanted.
        temperature: τ > 0.
        chunk_tokens: rows of ``B·T`` handled per chunk.

    Returns:
        Float32 logprobs, one per token (the loss is computed in float32 even
        for bf16 models); float64 for float64 logits. An empty batch (B = 0 or
        T = 0) gives an empty result.

    Raises:
        ValueError: ``logits`` is not a floating [B, T, V] tensor with V >= 1,
            ``tokens`` is not an integer tensor of shape [B, T], τ is not a
            finite number > 0, ``chunk_tokens`` < 1, or (for CPU tensors) a
            token lies outside [0, V).
        TypeError: ``chunk_tokens`` is not an int.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [1.0, 1.0]]] * 2)
        >>> tokens = torch.tensor([[0, 1, 1], [1, 0, 0]])
        >>> logprobs_from_logits(logits, tokens)
        tensor([[-0.6931, -0.1269, -0.6931],
                [-0.6931, -2.1269, -0.6931]])
    """
    _check_logits(logits, temperature, chunk_tokens)
    _check_tokens(tokens, logits)
    flat = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1, 1)
    pieces = []
    for start, stop in _row_chunks(flat, chunk_tokens):
        z = _scaled(flat[start:stop], temperature)
        picked = torch.gather(z, -1, flat_tokens[start:stop]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(z, dim=-1))
    return torch.cat(pieces).reshape(tokens.shape)


def entropy_from_logits(
    logits: Float[Tensor, "B T V"],
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Float[Tensor, "B T"]:
    r"""Entropy of each next-token distribution ``softmax(logits / temperature)``.

    .. math::
        H_t = -\sum_v p_{t,v} \log p_{t,v}
            = \log \sum_v e^{z_{t,v}} - \sum_v p_{t,v} z_{t,v},\quad z = \text{logits}/\tau

    Args:
        logits: next-token logits.
        temperature: τ > 0, as in sampling.
        chunk_tokens: rows of ``B·T`` handled per chunk.

    Returns:
        Float32 entropies in nats, one per position (float64 for float64 logits);
        empty for an empty batch.

    Raises:
        ValueError: ``logits`` is not a floating [B, T, V] tensor with V >= 1,
            τ is not a finite number > 0, or ``chunk_tokens`` < 1.
        TypeError: ``chunk_tokens`` is not an int.

    Example:
        >>> logits = torch.zeros(2, 3, 4)
        >>> entropy_from_logits(logits)
        tensor([[1.3863, 1.3863, 1.3863],
                [1.3863, 1.3863, 1.3863]])
    """
    _check_logits(logits, temperature, chunk_tokens)
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for start, stop in _row_chunks(flat, chunk_tokens):
        z = _scaled(flat[start:stop], temperature)
        log_norm = torch.logsumexp(z, dim=-1)
        probs = torch.softmax(z, dim=-1)
        pieces.append(log_norm - (probs * z).sum(-1))
    return torch.cat(pieces).reshape(logits.shape[:2])


def truncated_logits(
    logits: Float[Tensor, "*B V"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    keep: Int[Tensor, "*B"] | None = None,
) -> Float[Tensor, "*B V"]:
    r"""``logits / temperature`` with the tokens top-k / top-p sampling leaves out at
    the dtype's lowest value, so that their softmax is the *renormalised*
    truncated distribution the tokens are actually drawn from:

    .. math::
        q(v) = \frac{p(v)\,[v \in S]}{\sum_{u \in S} p(u)},\quad p = \mathrm{softmax}(z / \tau)

    with :math:`S` the ``top_k`` most likely tokens (ties at the k-th kept), then
    of those the smallest prefix, by decreasing probability, whose mass reaches
    ``top_p`` (the truncation order of Hugging Face's ``generate``: temperature,
    top-k, top-p). With neither, it is just ``logits / temperature``.

    Sampling and scoring must both use it for PPO's first ratio to be exactly 1.
    In scoring, pass the sampled tokens as ``keep``: a token that has left the
    set after an update keeps a finite logprob (the set is :math:`S \cup
    \{\text{keep}\}`), which at the sampling weights is :math:`S` itself.

    The excluded entries are finite (``torch.finfo(dtype).min``), so that
    ``softmax`` gives them exactly 0 and ``p · log p`` stays 0 instead of NaN:
    use the result with ``temperature=1``.

    Args:
        logits: next-token logits, vocabulary last.
        temperature: τ > 0, applied before truncating.
        top_k: keep this many most likely tokens (None: all).
        top_p: nucleus mass in (0, 1] (None or 1: all).
        keep: one token id per distribution that is always kept.

    Returns:
        Float32 (float64 for float64 logits) scaled logits, same shape.

    Raises:
        ValueError: τ is not a finite number > 0, ``top_k`` < 1, ``top_p``
            outside (0, 1], or ``keep`` not of the logits' leading shape.
        TypeError: ``top_k`` is not an int.

    Example:
        >>> z = torch.log(torch.tensor([0.5, 0.3, 0.2]))
        >>> torch.softmax(truncated_logits(z, top_k=2), -1)
        tensor([0.6250, 0.3750, 0.0000])
    """
    check_floating(logits=logits)
    check_positive(temperature, name="temperature")
    if top_k is not None:
        check_count(top_k, name="top_k")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or None, got {top_p}")
    if keep is not None and keep.shape != logits.shape[:-1]:
        raise ValueError(
            f"keep has shape {tuple(keep.shape)}; expected the logits' leading shape "
            f"{tuple(logits.shape[:-1])}"
        )
    z = _scaled(logits, temperature)
    if top_k is None and (top_p is None or top_p == 1.0):
        return z  # nothing is left out (``keep`` changes nothing)
    out = torch.zeros_like(z, dtype=torch.bool)
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        out |= z < kth
    if top_p is not None and top_p < 1.0:
        log_p = torch.log_softmax(z.masked_fill(out, -torch.inf), dim=-1)
        sorted_lp, order = torch.sort(log_p, descending=True, dim=-1)
        probs = sorted_lp.exp()
        before = torch.cumsum(probs, dim=-1) - probs  # the mass strictly more likely
        out |= torch.zeros_like(out).scatter(-1, order, before >= top_p)
    if keep is not None:
        out.scatter_(-1, keep.long().unsqueeze(-1), False)
    return z.masked_fill(out, torch.finfo(z.dtype).min)

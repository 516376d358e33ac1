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

from kltune.functional._checks import check_positive, check_rank

#: Rows of the flattened [B·T, V] logits processed per chunk: 2048 rows of a
#: 50k vocabulary is ~400 MB of float32, a bound a laptop can afford.
DEFAULT_CHUNK_TOKENS = 2048


def _row_chunks(flat: Tensor, chunk_tokens: int) -> list[tuple[int, int]]:
    step = max(1, chunk_tokens)
    return [(i, min(i + step, flat.shape[0])) for i in range(0, flat.shape[0], step)]


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
        for bf16 models); float64 for float64 logits.

    Raises:
        ValueError: shapes disagree or τ <= 0.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [1.0, 1.0]]] * 2)
        >>> tokens = torch.tensor([[0, 1, 1], [1, 0, 0]])
        >>> logprobs_from_logits(logits, tokens)
        tensor([[-0.6931, -0.1269, -0.6931],
                [-0.6931, -2.1269, -0.6931]])
    """
    check_rank(logits, 3, name="logits", axes="B T V")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but logits has shape "
            f"{tuple(logits.shape)}; expected tokens of shape {tuple(logits.shape[:2])}"
        )
    check_positive(temperature, name="temperature")
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
        Float32 entropies in nats, one per position (float64 for float64 logits).

    Example:
        >>> logits = torch.zeros(2, 3, 4)
        >>> entropy_from_logits(logits)
        tensor([[1.3863, 1.3863, 1.3863],
                [1.3863, 1.3863, 1.3863]])
    """
    check_rank(logits, 3, name="logits", axes="B T V")
    check_positive(temperature, name="temperature")
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for start, stop in _row_chunks(flat, chunk_tokens):
        z = _scaled(flat[start:stop], temperature)
        log_norm = torch.logsumexp(z, dim=-1)
        probs = torch.softmax(z, dim=-1)
        pieces.append(log_norm - (probs * z).sum(-1))
    return torch.cat(pieces).reshape(logits.shape[:2])

"""Token logprobs straight from hidden states: the vocabulary projection fused in, in chunks.

``logprobs_from_logits(hidden @ Wᵀ, tokens)`` materialises the [N, V] logits
(V in the tens of thousands) and autograd keeps a float32 copy of their
log-softmax for backward. :func:`logprobs_from_hidden` computes the same
numbers a chunk of rows at a time and keeps only ``hidden`` for backward,
recomputing each chunk's logits there: the memory of the logits drops from
O(N·V) to O(chunk·V), for one extra ``hidden @ Wᵀ`` in backward.

With at most two chunks of rows, the recomputation would hold as much memory
as the softmax itself, so the softmax is kept from forward instead and turned
into the gradient in place: the same peak, and no extra matmul (forward and
backward of 512 rows of SmolLM2's 49k vocabulary on 2 CPU cores: 1.60 → 1.25 s).
"""

from typing import Any

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

#: Rows per chunk: 256 rows of a 50k vocabulary is 50 MB of float32.
DEFAULT_HEAD_CHUNK = 256


def _chunk_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    temperature: float,
    out: Tensor | None = None,
) -> Tensor:
    """``(hidden Wᵀ + b) / τ`` in the loss dtype, written into ``out`` when given
    (a buffer reused across chunks: no fresh memory, no page faults, per chunk)."""
    if out is not None and out.dtype == hidden.dtype == weight.dtype:
        out = out[: hidden.shape[0]]
        if bias is None:
            logits = torch.mm(hidden, weight.t(), out=out)
        else:
            logits = torch.addmm(bias, hidden, weight.t(), out=out)
    else:
        logits = torch.nn.functional.linear(hidden, weight, bias)
        logits = logits.to(_loss_dtype(logits.dtype))
    return logits if temperature == 1.0 else logits.div_(temperature)


def _softmax_parts(z: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(exp(z − max z), max z + log Σ exp(z − max z))`` per row: the unnormalised
    softmax and the log-normaliser, the formulas of ``softmax`` and ``logsumexp``.
    The exponentials are written into ``out`` (which may be ``z`` itself), else
    into fresh memory."""
    top = z.amax(-1, keepdim=True)
    exps = torch.sub(z, top) if out is None else torch.sub(z, top, out=out[: z.shape[0]])
    exps = exps.exp_()
    total = exps.sum(-1, keepdim=True)
    return exps, (top + total.log()).squeeze(-1)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32, float64 stays float64 (as in logprobs_from_logits)."""
    return torch.promote_types(dtype, torch.float32)


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        tokens: Tensor,
        temperature: float,
        chunk: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        rows = hidden.shape[0]
        dtype = _loss_dtype(hidden.dtype)
        logprobs = hidden.new_empty(rows, dtype=dtype)
        entropy = hidden.new_empty(rows if with_entropy else 0, dtype=dtype)
        # Keep each chunk's softmax for backward when all of them take no more memory
        # than backward's recomputation holds at once (two chunks of logits): the
        # same peak, one output-layer matmul fewer.
        keep = rows <= 2 * chunk and any(ctx.needs_input_grad[:3])
        kept: list[Tensor | None] = []
        logits_buffer = hidden.new_empty(min(rows, chunk), weight.shape[0], dtype=dtype)
        probs_buffer = None if keep or not with_entropy else torch.empty_like(logits_buffer)
        for start in range(0, rows, chunk):
            stop = start + chunk
            z = _chunk_logits(hidden[start:stop], weight, bias, temperature, logits_buffer)
            picked = z.gather(-1, tokens[start:stop, None]).squeeze(-1)
            # Kept exponentials need their own memory; otherwise they overwrite the
            # logits (no entropy wanted) or go to a buffer reused across chunks.
            if keep:
                exps, log_norm = _softmax_parts(z)
            elif with_entropy:
                exps, log_norm = _softmax_parts(z, probs_buffer)
            else:
                exps, log_norm = _softmax_parts(z, z)
            logprobs[start:stop] = picked - log_norm
            if with_entropy or keep:
                probs = exps.div_(exps.sum(-1, keepdim=True))
                if with_entropy:
                    entropy[start:stop] = log_norm - torch.linalg.vecdot(probs, z)
                if keep:
                    kept.append(probs)
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.temperature, ctx.chunk, ctx.kept = temperature, chunk, kept
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: Tensor, _grad_entropy: Tensor
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, tokens = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        dtype = _loss_dtype(weight.dtype)
        grad_weight: Tensor | None = None  # the first chunk's product, then accumulated
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias and bias is not None else None
        for index, start in enumerate(range(0, hidden.shape[0], ctx.chunk)):
            stop = start + ctx.chunk
            h = hidden[start:stop]
            probs = _kept_probs(ctx.kept, index)
            if probs is None:  # recompute the chunk's softmax, in place
                z = _chunk_logits(h, weight, bias, ctx.temperature)
                exps, _ = _softmax_parts(z, z)
                probs = exps.div_(exps.sum(-1, keepdim=True))
            g = grad_logprobs[start:stop, None].to(probs.dtype)
            # d logprob / d z = onehot(token) − softmax(z); then the 1/τ of z = logits / τ.
            grad_z = probs.mul_(-g)
            grad_z.scatter_add_(-1, tokens[start:stop, None], g)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_z = grad_z.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_z @ weight
            if need_weight and grad_weight is None:
                grad_weight = grad_z.t().to(dtype) @ h.to(dtype)
            elif grad_weight is not None:
                grad_weight.addmm_(grad_z.t().to(dtype), h.to(dtype))
            if grad_bias is not None:
                grad_bias += grad_z.to(dtype).sum(0)
        if need_weight and grad_weight is None:  # no rows
            grad_weight = torch.zeros_like(weight)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _kept_probs(kept: list[Tensor | None], index: int) -> Tensor | None:
    """Hand a kept softmax chunk to backward once (it becomes the gradient in place);
    a second backward through the same graph recomputes it."""
    if index >= len(kept):
        return None
    probs, kept[index] = kept[index], None
    return probs


def logprobs_from_hidden(
    hidden: Float[Tensor, "B T D"],
    weight: Float[Tensor, "V D"],
    tokens: Int[Tensor, "B T"],
    temperature: float = 1.0,
    bias: Float[Tensor, " V"] | None = None,
    chunk_tokens: int = DEFAULT_HEAD_CHUNK,
) -> tuple[Float[Tensor, "B T"], Float[Tensor, "B T"]]:
    r"""Logprobs of ``tokens`` and entropies under ``softmax((hidden Wᵀ + b) / τ)``, in chunks.

    The same numbers as :func:`logprobs_from_logits` and
    :func:`entropy_from_logits` on ``hidden @ weight.T + bias`` (the output
    layer of a causal LM), without ever holding the [B·T, V] logits: each
    chunk of rows is projected, reduced and dropped, and backward projects it
    again (up to ``2 * chunk_tokens`` rows, the softmax is kept instead: see
    the module's notes). Gradients flow to ``hidden``, ``weight`` and ``bias`` through the
    logprobs; the entropy is detached (for logging).

    Args:
        hidden: the last hidden states, aligned so that ``hidden[:, t]``
            predicts ``tokens[:, t]``.
        weight: the output layer's weight, [V, D].
        tokens: the tokens whose logprobs are wanted.
        temperature: τ > 0.
        bias: the output layer's bias, if any.
        chunk_tokens: rows of ``B·T`` per chunk.

    Returns:
        ``(logprobs, entropy)``, [B, T] each, float32 (float64 for float64 inputs).

    Raises:
        ValueError: shapes that do not fit together, τ <= 0, ``chunk_tokens`` < 1.

    Example:
        >>> hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> logprobs, entropy = logprobs_from_hidden(hidden, weight, torch.tensor([[0, 2]]))
        >>> logprobs
        tensor([[-0.5514, -1.5514]])
    """
    return _apply(hidden, weight, tokens, temperature, bias, chunk_tokens, with_entropy=True)


def logprobs_only_from_hidden(
    hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float, bias: Tensor | None
) -> Float[Tensor, "B T"]:
    """:func:`logprobs_from_hidden` without the entropy (a softmax over every
    chunk), when only the logprobs are wanted (the reference's)."""
    logprobs, _ = _apply(hidden, weight, tokens, temperature, bias, DEFAULT_HEAD_CHUNK, False)
    return logprobs


def _apply(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    temperature: float,
    bias: Tensor | None,
    chunk_tokens: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    """Check the arguments, then run the chunked computation (an empty entropy without it)."""
    check_rank(hidden, 3, name="hidden", axes="B T D")
    check_rank(weight, 2, name="weight", axes="V D")
    check_floating(hidden=hidden, weight=weight)
    check_positive(temperature, name="temperature")
    check_count(chunk_tokens, name="chunk_tokens")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden has width {hidden.shape[-1]}; "
            "expected weight of shape [V, D] with D the hidden width"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},), one per "
            "row of weight"
        )
    check_integer_dtype(tokens, name="tokens")
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but hidden has shape "
            f"{tuple(hidden.shape)}; expected tokens of shape {tuple(hidden.shape[:2])} "
            "(one token per hidden state)"
        )
    vocab = weight.shape[0]
    if tokens.device.type == "cpu" and tokens.numel() > 0:  # no host sync on an accelerator
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"tokens must be ids in [0, {vocab}) (the rows of weight), got ids from "
                f"{low} to {high}"
            )
    flat = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = _HeadLogprobs.apply(
        flat, weight, bias, tokens.reshape(-1), float(temperature), chunk_tokens, with_entropy
    )
    return logprobs.reshape(tokens.shape), entropy.reshape(
        tokens.shape
    ) if with_entropy else entropy


def _head_logits(
    hidden: Tensor, weight: Tensor | None, bias: Tensor | None, temperature: float
) -> Tensor:
    """One chunk's ``(hidden Wᵀ + b) / τ`` in the loss dtype; without a weight,
    ``hidden`` already holds the logits."""
    if weight is None:
        logits = hidden.to(_loss_dtype(hidden.dtype))
        return logits / temperature if temperature != 1.0 else logits
    return _chunk_logits(hidden, weight, bias, temperature)


class _HeadKL(torch.autograd.Function):
    """Exact KL(softmax(z) ‖ softmax(z_ref)) per row, z = (h Wᵀ + b)/τ, in chunks.

    Gradient to the policy side only, recomputing each chunk in backward:
    ∂KL/∂z = p ⊙ (log p − log q − KL).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        ref_hidden: Tensor,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        temperature: float,
        chunk: int,
    ) -> Tensor:
        rows = hidden.shape[0]
        kl = hidden.new_empty(rows, dtype=_loss_dtype(hidden.dtype))
        for start in range(0, rows, chunk):
            stop = start + chunk
            log_p = torch.log_softmax(
                _head_logits(hidden[start:stop], weight, bias, temperature), dim=-1
            )
            log_q = torch.log_softmax(
                _head_logits(ref_hidden[start:stop], ref_weight, ref_bias, temperature), dim=-1
            )
            kl[start:stop] = torch.linalg.vecdot(log_p.exp(), log_p - log_q.to(log_p.dtype))
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl)
        ctx.temperature, ctx.chunk = temperature, chunk
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight and weight is not None else None
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            h = hidden[start:stop]
            log_p = torch.log_softmax(_head_logits(h, weight, bias, ctx.temperature), dim=-1)
            log_q = torch.log_softmax(
                _head_logits(ref_hidden[start:stop], ref_weight, ref_bias, ctx.temperature),
                dim=-1,
            )
            g = grad_kl[start:stop, None].to(log_p.dtype) / ctx.temperature
            grad_z = log_p.exp() * (log_p - log_q.to(log_p.dtype) - kl[start:stop, None]) * g
            if weight is None:
                if grad_hidden is not None:
                    grad_hidden[start:stop] = grad_z.to(hidden.dtype)
                continue
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_z.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += (grad_z.t() @ h.to(grad_z.dtype)).to(weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_z.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def kl_exact_from_hidden(
    hidden: Float[Tensor, "B T D"],
    weight: Float[Tensor, "V D"] | None,
    ref_hidden: Float[Tensor, "B T Dr"],
    ref_weight: Float[Tensor, "V Dr"] | None,
    temperature: float = 1.0,
    bias: Float[Tensor, " V"] | None = None,
    ref_bias: Float[Tensor, " V"] | None = None,
    chunk_tokens: int = DEFAULT_HEAD_CHUNK,
) -> Float[Tensor, "B T"]:
    r"""Exact per-position KL(π ‖ π_ref) over the vocabulary, from both models' last
    hidden states and output layers, a chunk of positions at a time.

    .. math::
        \mathrm{KL}_t = \sum_v \pi_t(v)\bigl(\log\pi_t(v) - \log\pi_{\text{ref},t}(v)\bigr),
        \quad \pi_t = \operatorname{softmax}\bigl((h_t W^\top + b)/\tau\bigr)

    The same numbers as :func:`kl_exact` on the two models' logits, without ever
    holding a [B, T, V] tensor of either model: each chunk of ``chunk_tokens``
    positions is projected through both output layers, reduced and dropped, and
    backward projects it again. The gradient flows to the policy side
    (``hidden``, ``weight``, ``bias``), using
    :math:`\partial\mathrm{KL}_t/\partial z_t = \pi_t \odot (\log\pi_t - \log\pi_{\text{ref},t} - \mathrm{KL}_t)`;
    the reference side is treated as a constant.

    Args:
        hidden: the policy's last hidden states at the positions that predict each
            response token, or its logits when ``weight`` is None.
        weight: the policy's output layer, [V, D] (None: ``hidden`` holds logits).
        ref_hidden: the reference's, likewise (its width may differ).
        ref_weight: the reference's output layer (None: ``ref_hidden`` holds logits).
        temperature: τ > 0, applied to both models' logits.
        bias, ref_bias: the output layers' biases, if any.
        chunk_tokens: positions per chunk.

    Returns:
        KL per position, [B, T], float32 (float64 for float64 inputs), ≥ 0 up to rounding.

    Raises:
        ValueError: shapes that do not fit together (the two models' vocabularies
            or the positions differ), τ not a finite number > 0, ``chunk_tokens`` < 1.

    Example:
        >>> hidden = torch.tensor([[[1.0, 0.0]]])
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> kl_exact_from_hidden(hidden, weight, torch.zeros(1, 1, 2), weight)  # vs uniform
        tensor([[0.1109]])
    """
    check_rank(hidden, 3, name="hidden", axes="B T D")
    check_rank(ref_hidden, 3, name="ref_hidden", axes="B T D")
    check_floating(hidden=hidden, ref_hidden=ref_hidden)
    check_positive(temperature, name="temperature")
    check_count(chunk_tokens, name="chunk_tokens")
    if hidden.shape[:2] != ref_hidden.shape[:2]:
        raise ValueError(
            f"ref_hidden has shape {tuple(ref_hidden.shape)} but hidden has shape "
            f"{tuple(hidden.shape)}: both must hold the same [B, T] positions"
        )
    vocab = []
    for side, h, w, b in (("", hidden, weight, bias), ("ref_", ref_hidden, ref_weight, ref_bias)):
        if w is None:
            vocab.append(h.shape[-1])
            continue
        check_rank(w, 2, name=f"{side}weight", axes="V D")
        if w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{side}weight has shape {tuple(w.shape)} but {side}hidden has width "
                f"{h.shape[-1]}; expected [V, {h.shape[-1]}]"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{side}bias has shape {tuple(b.shape)}; expected ({w.shape[0]},)")
        vocab.append(w.shape[0])
    if vocab[0] != vocab[1]:
        raise ValueError(
            f"the policy has a vocabulary of {vocab[0]} and the reference of {vocab[1]}: the "
            "exact KL needs both distributions over one vocabulary"
        )
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_ref = ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach()
    ref_w = None if ref_weight is None else ref_weight.detach()
    ref_b = None if ref_bias is None else ref_bias.detach()
    kl = _HeadKL.apply(flat, weight, bias, flat_ref, ref_w, ref_b, float(temperature), chunk_tokens)
    return kl.reshape(hidden.shape[:2])

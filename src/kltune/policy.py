"""Policy (the trainable causal LM) and Reference (the frozen π_ref).

Token alignment, in one place: the response token ``t`` is predicted by the
logits at position ``P - 1 + t`` of the concatenated sequence ``prompt ‖
response``. One forward over ``prompt ‖ response[:, :-1]`` with
``logits_to_keep=T`` gives exactly the ``T`` logit rows that predict the
response, and never computes the vocabulary projection for prompt positions.

Position ids are ``cumsum(attention_mask) - 1``, so a left-padded row gets the
same positions as the same text alone, in sampling and in scoring alike.
"""

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, final

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kltune.functional as KF
from kltune._checks import check_count
from kltune._forwards import lean_activations
from kltune.accel import fast_paths
from kltune.encoding import embedding_rows, encode_prompts, pad_token_id
from kltune.rollout import NextTokenHead, Rollout
from kltune.sampler import KVCacheSampler, Sampler, position_ids_from_mask


@final
@dataclass(frozen=True)
class PolicyOutput:
    """What :meth:`Policy.score` returns for the response tokens of a rollout.

    Attributes:
        logprobs: log π of the response tokens (with gradient).
        entropy: entropy of each next-token distribution (detached unless
            asked for with gradient).
        values: value-head predictions V(s_t), or None without a value head.
        head: the next-token distributions at the response positions (with
            gradient), when asked for with ``with_head=True`` (the exact-KL penalty).
    """

    logprobs: Float[Tensor, "B T"]
    entropy: Float[Tensor, "B T"]
    values: Float[Tensor, "B T"] | None
    head: NextTokenHead | None = None


def _check_ids(model: nn.Module, ids: Tensor) -> None:
    """Token ids inside the model's embedding (checked on the CPU only: no host sync)."""
    rows = embedding_rows(model)
    if ids.device.type != "cpu" or not isinstance(rows, int) or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        raise ValueError(
            f"the rollout holds token ids from {low} to {high}, but the model's embedding has "
            f"{rows} rows: the rollout was made with another tokenizer or model"
        )


def _response_forward(
    model: nn.Module, rollout: Rollout, *, output_hidden_states: bool = False
) -> Any:
    """One forward whose ``logits`` (and last hidden states) align with the response tokens."""
    length = rollout.response_ids.shape[1]
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids[:, :-1]], dim=1)
    _check_ids(model, ids)
    # Tokens after EOS get attention 1: they only ever look backwards, so they
    # cannot change a real token's output, and keeping them avoids all-masked rows.
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.response_mask[:, :-1])], dim=1)
    return model(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=position_ids_from_mask(mask),
        logits_to_keep=length,
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )


def _plain_output_layer(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder (to the last, normalised hidden state) and the output layer of
    a causal LM whose logits are exactly ``output_layer(hidden)`` (``fused_head`` in
    :data:`kltune.accel.ARCHITECTURES`; under peft too), or None."""
    if not fast_paths(model).fused_head:
        return None
    get_base = getattr(model, "get_base_model", None)  # a peft model: the LM inside
    lm = get_base() if callable(get_base) else model
    head = lm.get_output_embeddings()  # type: ignore[operator]
    decoder = getattr(lm, "base_model", None)
    if type(head) is not nn.Linear or not isinstance(decoder, nn.Module) or decoder is lm:
        return None  # e.g. a LoRA adapter on the output layer: the model's own forward
    return decoder, head


def _response_hidden(decoder: nn.Module, rollout: Rollout) -> Tensor:
    """The last hidden states that predict the response tokens (see :func:`_response_forward`)."""
    length = rollout.response_ids.shape[1]
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids[:, :-1]], dim=1)
    _check_ids(decoder, ids)
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.response_mask[:, :-1])], dim=1)
    out = decoder(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    )
    hidden: Tensor = out.last_hidden_state[:, -length:]
    return hidden


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    completions_per_prompt: int,
) -> None:
    """Refuse sampling settings :meth:`Policy.rollout` cannot use (also run by
    :class:`kltune.loop.Sampling` when the settings are made).

    Raises:
        TypeError: ``max_new_tokens``, ``top_k`` or ``completions_per_prompt`` is not an int.
        ValueError: ``max_new_tokens`` < 1, a temperature that is not a finite
            number > 0, ``top_k`` < 1, ``top_p`` outside (0, 1], G < 1.
    """
    check_count(max_new_tokens, name="max_new_tokens")
    check_count(1 if top_k is None else top_k, name="top_k", minimum=None)  # None allowed
    check_count(completions_per_prompt, name="completions_per_prompt")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or None, got {top_p}")


@final
class Policy(nn.Module):
    """The trainable causal LM: samples completions and scores given tokens.

    Wraps any ``transformers`` causal LM (GPT-2, Llama-family, a peft LoRA
    model) and its tokenizer. Dropout stays off (the module is kept in eval
    mode): PPO's probability ratio must compare the same function at rollout
    time and at update time.

    Args:
        model: a causal LM; a ``peft.PeftModel`` trains only its adapter.
        tokenizer: its tokenizer; without a pad token the EOS token pads.
        value_head: add a linear value head on the last hidden state, initialised
            to zero (so early values are 0 and cannot mislead the advantages).
        fused_head: score tokens from the last hidden states with the output
            layer fused into the logprob computation, in chunks
            (:func:`kltune.functional.logprobs_from_hidden`), so that no
            [B, T, V] logits tensor is ever held; used for architectures whose
            logits are exactly the output layer of the last hidden state
            (Llama-family, GPT-2, Qwen, Mistral, GPT-NeoX) and not with an
            entropy bonus. False: always the model's own forward.
        lean_decoding: sample Llama-family models (Llama, Mistral, Qwen2) on a
            CPU with kltune's own decoding step (feature-major hidden states,
            preallocated KV buffers; ``kltune._decoding``), which computes the
            model's function within float32 rounding and is 1.2–1.3× faster
            at a few rows. It is used only for plain models (no hooks, adapters
            or quantised layers) and without autocast. False: always the
            model's own forward with its KV cache.
        autocast_dtype: run the model under CPU/GPU autocast in this dtype
            (e.g. ``torch.bfloat16``) when it samples *and* when it scores: one
            setting, so that the behaviour logprobs and the logprobs PPO
            differentiates come from the same function (None: the model's own
            dtype). Logprobs, values and losses are float32 either way.
        sampler: what draws completions (:class:`~kltune.sampler.Sampler`; None:
            kltune's :class:`~kltune.sampler.KVCacheSampler`). Another engine
            must return the logprobs of the distribution it sampled from.
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        value_head: bool = False,
        fused_head: bool = True,
        lean_decoding: bool = True,
        autocast_dtype: torch.dtype | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        super().__init__()
        self.fused_head = fused_head
        self.lean_decoding = lean_decoding
        if autocast_dtype is not None and not (
            isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point
        ):
            raise TypeError(
                f"autocast_dtype must be a floating torch.dtype or None, got {autocast_dtype!r}"
            )
        self.autocast_dtype = autocast_dtype
        self.sampler: Sampler = KVCacheSampler() if sampler is None else sampler
        pad_token_id(tokenizer)  # raises without a pad or EOS token
        self.model = model
        self.tokenizer = tokenizer
        self.model.eval()
        embeddings: Any = model.get_input_embeddings()  # type: ignore[operator]
        hidden = int(embeddings.embedding_dim)
        rows = getattr(embeddings, "num_embeddings", None)
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            token = getattr(tokenizer, name)
            if isinstance(rows, int) and token is not None and not 0 <= int(token) < rows:
                raise ValueError(
                    f"the tokenizer's {name} is {token} but the model's embedding has {rows} "
                    "rows; after adding tokens to the tokenizer, call "
                    "model.resize_token_embeddings(len(tokenizer))"
                )
        self.value_head: nn.Linear | None = None
        if value_head:
            param = next(model.parameters())
            self.value_head = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def train(self, mode: bool = True) -> "Policy":
        """Kept in eval mode on purpose (no dropout); see the class docstring."""
        super().train(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    @property
    def context_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            if config is not None and isinstance(getattr(config, name, None), int):
                return int(getattr(config, name))
        return None

    def encode_prompts(
        self, prompts: Sequence[str], max_new_tokens: int = 0
    ) -> tuple[Int[Tensor, "B P"], Bool[Tensor, "B P"]]:
        """Tokenise and left-pad prompts on the policy's device
        (:func:`kltune.encoding.encode_prompts`, checked against this model's
        context and embedding; its errors)."""
        ids, mask = encode_prompts(
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            context_length=self.context_length,
            vocabulary_size=embedding_rows(self.model),
        )
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        completions_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        stop_at_eos: bool = True,
    ) -> Rollout:
        """Sample completions with the KV cache and record their behaviour logprobs.

        Sampling never records a graph. The behaviour logprobs come from the
        sampling pass itself (no second forward) and are always those of
        ``softmax(logits / temperature)``, the distribution :meth:`score`
        computes. With ``top_k``/``top_p`` they are the logprobs of the truncated,
        renormalised distribution the tokens are drawn from
        (:func:`~kltune.functional.truncated_logits`), and the rollout records the
        truncation so that :meth:`score` computes the same distribution: PPO's first
        ratio is 1 to float rounding either way. With a value head, the values
        V(s_t) come from the same pass (the hidden state that predicts token
        ``t``), equal to :meth:`score`'s within float32 rounding.

        Args:
            prompts: prompt texts.
            max_new_tokens: the length limit of a completion (>= 1).
            temperature: τ > 0.
            top_k: keep the k most likely tokens (None: all).
            top_p: nucleus sampling mass in (0, 1] (None: all).
            completions_per_prompt: G; rows of one prompt are contiguous.
            generator: the source of randomness (same seed, same completions);
                on the CPU or on the model's device.
            stop_at_eos: end a completion at its EOS token (the default). With
                False every completion has exactly ``max_new_tokens`` tokens: an
                EOS is an ordinary token (its logprob recorded, the text after it
                kept) and ``ended`` is all False. Fixed-length continuations are
                the classic sentiment set-up (Ziegler et al. 2019); they take away
                a penalty summed over tokens its cheapest escape, ending early.

        Returns:
            A Rollout with ``old_logprobs`` (and ``old_values`` with a value
            head) filled.

        Raises:
            ValueError: empty prompts, a prompt too long for the context or not
                valid Unicode, ``max_new_tokens`` < 1, a temperature that is not
                a finite number > 0, ``top_k`` < 1, ``top_p`` outside (0, 1], G < 1.
            TypeError: ``max_new_tokens``, ``top_k`` or G is not an int.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p, completions_per_prompt)
        if not isinstance(stop_at_eos, bool):
            raise TypeError(f"stop_at_eos must be a bool, got {type(stop_at_eos).__name__}")
        prompt_ids, prompt_mask = self.encode_prompts(prompts, max_new_tokens)
        group = completions_per_prompt
        prompt_ids = prompt_ids.repeat_interleave(group, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group, dim=0)
        sampled = self.sampler(
            self,
            prompt_ids,
            prompt_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            stop_at_eos=stop_at_eos,
        )
        texts = self.tokenizer.batch_decode(
            sampled.tokens.masked_fill(~sampled.mask, self.pad_token_id), skip_special_tokens=True
        )
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=sampled.tokens,
            response_mask=sampled.mask,
            old_logprobs=sampled.logprobs,
            old_values=sampled.values,
            prompts=tuple(p for p in prompts for _ in range(group)),
            completions=tuple(texts),
            temperature=float(temperature),
            top_k=top_k,
            top_p=top_p,
            prompt_index=torch.arange(len(prompts), device=self.device).repeat_interleave(group),
            ended=sampled.ended,
        )

    def precision(self) -> AbstractContextManager[Any]:
        """The policy's precision as a context: autocast in ``autocast_dtype`` (a
        no-op when it is None). Sampling and scoring both run under it."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def values_from_hidden(self, hidden: Float[Tensor, "*B D"]) -> Float[Tensor, "*B"] | None:
        """V(s) from the last hidden states (None without a value head), float32."""
        if self.value_head is None:
            return None
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def score(
        self,
        rollout: Rollout,
        *,
        entropy_with_grad: bool = False,
        with_head: bool = False,
    ) -> PolicyOutput:
        """Logprobs (with gradient), entropy and values of the rollout's response tokens.

        Uses the rollout's temperature and top-k/top-p truncation, so these
        logprobs and the behaviour logprobs belong to the same distribution (a
        truncated one is renormalised over the tokens it keeps at these weights,
        plus the sampled token; see :func:`~kltune.functional.truncated_logits`).
        Llama-family RMSNorms and
        SwiGLU MLPs keep fewer activations for backward while scoring
        (recomputing two elementwise intermediates; see ``kltune._forwards``).

        Args:
            rollout: prompts and responses to score.
            entropy_with_grad: keep the entropy in the graph (for an entropy
                bonus); otherwise it is computed detached, for logging.
            with_head: also return the next-token distributions as a
                :class:`~kltune.rollout.NextTokenHead` (for the exact KL).
        """
        truncated = rollout.top_k is not None or rollout.top_p is not None
        fuse = self.fused_head and not entropy_with_grad and not truncated
        head = _plain_output_layer(self.model) if fuse else None
        if head is not None:
            decoder, output_layer = head
            with self.precision(), lean_activations(self.model):
                hidden = _response_hidden(decoder, rollout)
            hidden = hidden.to(output_layer.weight.dtype)
            logprobs, entropy = KF.logprobs_from_hidden(
                hidden,
                output_layer.weight,
                rollout.response_ids,
                rollout.temperature,
                bias=output_layer.bias,
            )
            values = self.values_from_hidden(hidden)
            next_token = (
                NextTokenHead(hidden, output_layer.weight, output_layer.bias) if with_head else None
            )
            return PolicyOutput(logprobs=logprobs, entropy=entropy, values=values, head=next_token)
        with self.precision(), lean_activations(self.model):
            out = _response_forward(
                self.model, rollout, output_hidden_states=self.value_head is not None
            )
        logits, temperature = out.logits, rollout.temperature
        next_token = NextTokenHead(logits) if with_head else None
        if truncated:  # the distribution sampling drew from, renormalised; τ applied
            logits = KF.truncated_logits(
                logits, temperature, rollout.top_k, rollout.top_p, keep=rollout.response_ids
            )
            temperature = 1.0
        logprobs = KF.logprobs_from_logits(logits, rollout.response_ids, temperature)
        entropy_logits = logits if entropy_with_grad else logits.detach()
        entropy = KF.entropy_from_logits(entropy_logits, temperature)
        values = None
        if self.value_head is not None:
            length = rollout.response_ids.shape[1]
            values = self.values_from_hidden(out.hidden_states[-1][:, -length:])
        return PolicyOutput(logprobs=logprobs, entropy=entropy, values=values, head=next_token)

    def forward(
        self,
        rollout: Rollout,
        *,
        entropy_with_grad: bool = False,
        with_head: bool = False,
    ) -> PolicyOutput:
        """:meth:`score` as the module's forward, so that a wrapped policy (DDP,
        FSDP, DeepSpeed) scores through the wrapper and its gradients synchronise."""
        return self.score(
            rollout,
            entropy_with_grad=entropy_with_grad,
            with_head=with_head,
        )

    @torch.no_grad()
    def next_token_head(self, rollout: Rollout) -> NextTokenHead:
        """The behaviour policy's next-token distributions at the response positions
        (no gradient): what the exact KL in the reward compares with π_ref's."""
        return next_token_head(self.model, rollout)


def teacher_forced(policy: Policy, prompts: Sequence[str], completions: Sequence[str]) -> Rollout:
    """A :class:`~kltune.rollout.Rollout` whose responses are given texts, for scoring them.

    Each prompt is encoded as :meth:`Policy.encode_prompts` does (left padded);
    each completion is tokenised on its own (no special tokens) and right padded.
    The behaviour logprobs are zeros: score the rollout with
    :meth:`Policy.score` or a :class:`Reference` to get logprobs. DPO and
    :func:`kltune.fluency.reference_perplexity` use it.

    Raises:
        ValueError: the lists differ in length or are empty, a completion encodes
            to no token, or a prompt and completion exceed the model's context.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"got {len(prompts)} prompts and {len(completions)} completions; "
            "pass one prompt per completion (and at least one)"
        )
    token_ids = [list(policy.tokenizer(c, add_special_tokens=False).input_ids) for c in completions]
    for i, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"completions[{i}] ({completions[i]!r}) encodes to no token")
    length = max(len(ids) for ids in token_ids)
    prompt_ids, prompt_mask = policy.encode_prompts(prompts, length)
    response = torch.full((len(token_ids), length), policy.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), length), dtype=torch.bool)
    for i, ids in enumerate(token_ids):
        response[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = True
    device = policy.device
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response.to(device),
        response_mask=mask.to(device),
        old_logprobs=torch.zeros(response.shape, device=device),
        prompts=tuple(prompts),
        completions=tuple(completions),
        temperature=1.0,
        prompt_index=torch.arange(len(token_ids), device=device),
        ended=torch.zeros(len(token_ids), dtype=torch.bool, device=device),
    )


def next_token_head(model: nn.Module, rollout: Rollout) -> NextTokenHead:
    """A causal LM's next-token distributions at the response positions: its last
    hidden states and output layer when the logits are a plain linear map of them
    (no [B, T, V] tensor), else its logits. Gradient flows when it is enabled."""
    head = _plain_output_layer(model)
    if head is not None:
        decoder, output_layer = head
        hidden = _response_hidden(decoder, rollout).to(output_layer.weight.dtype)
        return NextTokenHead(hidden, output_layer.weight, output_layer.bias)
    return NextTokenHead(_response_forward(model, rollout).logits)

"""Prompt text to token ids, left padded: the one place a prompt is tokenised.

:meth:`kltune.Policy.encode_prompts` and :func:`kltune.policy.teacher_forced`
call :func:`encode_prompts`; it needs only the tokenizer, so it is tested and
usable without a model.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kltune._checks import check_count, check_texts


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads: the pad token, else EOS.

    Raises:
        ValueError: the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set one")
    return int(pad)


def start_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an empty text becomes, the start of a document: BOS, else EOS, else pad."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return pad_token_id(tokenizer)


def embedding_rows(model: nn.Module) -> int | None:
    """The number of rows of the model's input embedding (None if it has no such table)."""
    get = getattr(model, "get_input_embeddings", None)
    rows = getattr(get(), "num_embeddings", None) if callable(get) else None
    return rows if isinstance(rows, int) else None


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 0,
    context_length: int | None = None,
    vocabulary_size: int | None = None,
) -> tuple[Int[Tensor, "B P"], Bool[Tensor, "B P"]]:
    """Tokenise and left-pad prompts (on the CPU).

    An empty prompt becomes :func:`start_token_id`, so that the model has
    something to condition on. Any ``str`` that is valid Unicode is accepted
    (control characters, NUL, emoji): it is the tokenizer's to encode.
    Special-token strings in the text (``"<|im_start|>"``, an EOS string) become
    those special tokens, as the tokenizer parses them: chat templates rely on it.

    Args:
        tokenizer: the policy's tokenizer.
        prompts: the texts.
        max_new_tokens: the completion length the prompts must leave room for.
        context_length: the model's context (None: unlimited).
        vocabulary_size: the rows of the model's input embedding (None: unchecked).

    Returns:
        ``(ids, mask)``: ids padded on the left with :func:`pad_token_id`, and
        True at the real tokens.

    Raises:
        ValueError: an empty list, a prompt that is not valid Unicode (a lone
            surrogate), a prompt whose tokens plus ``max_new_tokens`` exceed
            ``context_length``, or a token id outside the embedding, naming the
            prompt; ``max_new_tokens`` < 0.
        TypeError: prompts not a sequence of str, or ``max_new_tokens`` not an int.
    """
    check_count(max_new_tokens, name="max_new_tokens", minimum=0)
    check_texts(prompts, name="prompts", encodable=True)
    start = start_token_id(tokenizer)
    rows = [list(tokenizer(p).input_ids) or [start] for p in prompts]
    for i, row in enumerate(rows):
        if context_length is not None and len(row) + max_new_tokens > context_length:
            raise ValueError(
                f"prompts[{i}] has {len(row)} tokens; with max_new_tokens={max_new_tokens} "
                f"it exceeds the model's context of {context_length} tokens: shorten the prompt"
            )
        if vocabulary_size is not None and max(row) >= vocabulary_size:
            raise ValueError(
                f"prompts[{i}] encodes to token id {max(row)}, outside the model's "
                f"embedding of {vocabulary_size} rows: the tokenizer does not match the model "
                "(call model.resize_token_embeddings(len(tokenizer)) after adding tokens)"
            )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = True
    return ids, mask

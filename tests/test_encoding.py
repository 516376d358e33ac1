"""kltune.encoding: prompt tokenisation without a model."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kltune.encoding import encode_prompts, pad_token_id, start_token_id
from kltune.loading import byte_tokenizer

TOKENIZER = byte_tokenizer()
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)


@given(st.lists(texts, min_size=1, max_size=5))
def test_each_row_is_its_own_encoding_left_padded(prompts: list[str]) -> None:
    ids, mask = encode_prompts(TOKENIZER, prompts)
    assert ids.shape == mask.shape and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, prompt in enumerate(prompts):
        alone, alone_mask = encode_prompts(TOKENIZER, [prompt])
        # The real tokens are right-aligned and equal to the prompt encoded alone:
        # padding never changes a prompt's tokens.
        assert ids[row, mask[row]].tolist() == alone[0].tolist()
        assert alone_mask.all()
        real = int(mask[row].sum())
        assert mask[row, ids.shape[1] - real :].all() and not mask[row, : ids.shape[1] - real].any()
        assert (ids[row, ~mask[row]] == pad_token_id(TOKENIZER)).all()
    assert mask.sum(dim=1).max() == ids.shape[1]  # no column is padding in every row


def test_an_empty_prompt_becomes_the_start_token() -> None:
    ids, mask = encode_prompts(TOKENIZER, ["", "ab"])
    assert ids[0, mask[0]].tolist() == [start_token_id(TOKENIZER)] == [TOKENIZER.bos_token_id]


def test_the_context_and_the_vocabulary_are_checked_with_the_prompt_named() -> None:
    with pytest.raises(ValueError, match=r"prompts\[1\] has 3 tokens; with max_new_tokens=2"):
        encode_prompts(TOKENIZER, ["a", "abc"], max_new_tokens=2, context_length=4)
    ids, _ = encode_prompts(TOKENIZER, ["a", "abc"], max_new_tokens=1, context_length=4)
    assert ids.shape == (2, 3)
    with pytest.raises(ValueError, match=r"prompts\[0\] encodes to token id \d+, outside"):
        encode_prompts(TOKENIZER, ["\u00ff"], vocabulary_size=10)
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(TOKENIZER, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        encode_prompts(TOKENIZER, ["a"], max_new_tokens=-1)


def test_a_tokenizer_without_pad_pads_with_eos_and_without_either_is_refused() -> None:
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        pad_token_id(tokenizer)

"""Rollout (validation, select, concat, to) and RolloutBuffer (minibatches, whitening)."""

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kltune
from helpers import synthetic_rollout
from kltune import Rollout, RolloutBuffer
from strategies import assert_bad_input

PAD = 99  # a pad id no real token uses, so that a leak of padding shows up

# --------------------------------------------------------------------------- builders


def _rollout(
    prompt_lengths: list[int],
    response_lengths: list[int],
    prompt_index: list[int],
    *,
    seed: int = 0,
    temperature: float = 1.0,
    with_scores: bool = False,
    with_advantages: bool = False,
    tag: str = "",
) -> Rollout:
    """A rollout with left-padded prompts and right-padded responses of the given lengths.

    Every real token, logprob and advantage is random; every padding slot holds
    ``PAD`` (ids) or a large value (floats), so that padding leaking into a real
    slot is visible.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(prompt_lengths)
    width, length = max(prompt_lengths), max(response_lengths)
    prompt_mask = torch.arange(width)[None, :] >= width - torch.tensor(prompt_lengths)[:, None]
    mask = torch.arange(length)[None, :] < torch.tensor(response_lengths)[:, None]

    def floats() -> torch.Tensor:
        return torch.where(mask, -3 * torch.rand(batch, length, generator=g), 1e6)

    return Rollout(
        prompt_ids=torch.randint(0, 50, (batch, width), generator=g).masked_fill(~prompt_mask, PAD),
        prompt_mask=prompt_mask,
        response_ids=torch.randint(0, 50, (batch, length), generator=g).masked_fill(~mask, PAD),
        response_mask=mask,
        old_logprobs=floats(),
        prompts=tuple(f"{tag}prompt {i}" for i in prompt_index),
        completions=tuple(f"{tag}completion {i}" for i in range(batch)),
        temperature=temperature,
        prompt_index=torch.tensor(prompt_index),
        ended=torch.tensor(response_lengths) < length,
        scores=torch.randn(batch, generator=g) if with_scores else None,
        advantages=floats() if with_advantages else None,
    )


@st.composite
def rollout_specs(draw: st.DrawFn, min_b: int = 1, max_b: int = 6) -> dict:
    """Arguments of ``_rollout``: B in [min_b, max_b], minimally padded (some row fills each width).

    The Rollout itself is built in the test, not in the strategy: the runtime
    type checker samples tuple items with ``random``, which a strategy must not touch.
    """
    batch = draw(st.integers(min_b, max_b))
    width, length = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    prompt_lengths = draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch))
    response_lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    prompt_lengths[draw(st.integers(0, batch - 1))] = width
    response_lengths[draw(st.integers(0, batch - 1))] = length
    # contiguous groups: each row starts a new prompt or repeats the previous one
    starts = draw(st.lists(st.booleans(), min_size=batch - 1, max_size=batch - 1))
    prompt_index = [0]
    for new in starts:
        prompt_index.append(prompt_index[-1] + int(new))
    return {
        "prompt_lengths": prompt_lengths,
        "response_lengths": response_lengths,
        "prompt_index": prompt_index,
        "seed": draw(st.integers(0, 2**16)),
        "with_scores": draw(st.booleans()),
        "with_advantages": draw(st.booleans()),
    }


def _trimmed(r: Rollout) -> Rollout:
    """``r`` without the prompt columns and response columns that are padding in every row."""
    first = int(r.prompt_mask.any(0).long().argmax())
    last = int(r.response_mask.any(0).nonzero().max()) + 1
    changes = {"prompt_ids": r.prompt_ids[:, first:], "prompt_mask": r.prompt_mask[:, first:]}
    for f in dataclasses.fields(r):
        value = getattr(r, f.name)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and f.name not in changes:
            changes[f.name] = value[:, :last]
    return r.replace(**changes)


def _tensor_fields(r: Rollout) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(r, f.name)
        for f in dataclasses.fields(r)
        if isinstance(getattr(r, f.name), torch.Tensor)
    }


def _assert_same_real_tokens(a: Rollout, b: Rollout) -> None:
    """Equal masks, texts and per-row fields; token tensors equal on real tokens."""
    assert torch.equal(a.prompt_mask, b.prompt_mask)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.prompt_ids[a.prompt_mask], b.prompt_ids[b.prompt_mask])
    for name in ("response_ids", "old_logprobs", "advantages"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x[a.response_mask], y[b.response_mask]), name
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None:
        assert torch.equal(a.scores, b.scores)  # type: ignore[arg-type]
    assert torch.equal(a.ended, b.ended)
    assert a.prompts == b.prompts and a.completions == b.completions
    assert a.temperature == b.temperature


# --------------------------------------------------------------------------- validation


def test_rollout_is_frozen() -> None:
    r = synthetic_rollout()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.temperature = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.scores = None  # type: ignore[misc]


def test_valid_rollout_and_its_lengths() -> None:
    r = _rollout([2, 3], [1, 4], [0, 1])
    assert len(r) == 2
    assert r.lengths.tolist() == [1, 4]


@pytest.mark.parametrize(
    ("field", "bad", "named", "message"),
    [
        ("prompt_mask", lambda r: r.prompt_mask.long(), "prompt_mask", r"Rollout\.prompt_mask must be a bool tensor, got dtype torch\.int64"),
        ("prompt_ids", lambda r: r.prompt_ids.float(), "prompt_ids", r"Rollout\.prompt_ids must be a int tensor, got dtype torch\.float32"),
        ("prompt_ids", lambda r: r.prompt_ids[:, :2], "prompt_mask", r"Rollout\.prompt_mask must have shape \(6, 2\), got \(6, 3\)"),
        ("response_ids", lambda r: r.response_ids[:, :3], "response_mask", r"Rollout\.response_mask must have shape \(6, 3\), got \(6, 5\)"),
        ("response_mask", lambda r: r.response_mask[:4], "response_mask", r"Rollout\.response_mask must have shape \(6, 5\), got \(4, 5\)"),
        ("response_mask", lambda r: r.response_mask.float(), "response_mask", r"Rollout\.response_mask must be a bool tensor, got dtype torch\.float32"),
        ("old_logprobs", lambda r: r.old_logprobs[:, :4], "old_logprobs", r"Rollout\.old_logprobs must have shape \(6, 5\), got \(6, 4\)"),
        ("old_logprobs", lambda r: r.old_logprobs.long(), "old_logprobs", r"Rollout\.old_logprobs must be a float tensor, got dtype torch\.int64"),
        ("ref_logprobs", lambda r: r.old_logprobs[None], "ref_logprobs", r"Rollout\.ref_logprobs must have shape \(6, 5\), got \(1, 6, 5\)"),
        ("rewards", lambda r: r.old_logprobs.bool(), "rewards", r"Rollout\.rewards must be a float tensor, got dtype torch\.bool"),
        ("scores", lambda r: r.scores[:2], "scores", r"Rollout\.scores must have shape \(6,\), got \(2,\)"),
        ("scores", lambda r: r.scores.long(), "scores", r"Rollout\.scores must be a float tensor, got dtype torch\.int64"),
        ("prompt_index", lambda r: r.prompt_index.float(), "prompt_index", r"Rollout\.prompt_index must be a int tensor, got dtype torch\.float32"),
        ("ended", lambda r: r.ended.long(), "ended", r"Rollout\.ended must be a bool tensor, got dtype torch\.int64"),
        ("ended", lambda r: r.ended[:5], "ended", r"Rollout\.ended must have shape \(6,\), got \(5,\)"),
    ],
)  # fmt: skip
def test_bad_field_names_the_field_and_expected_and_actual(field, bad, named, message) -> None:
    r = synthetic_rollout()
    assert_bad_input(lambda: r.replace(**{field: bad(r)}), message=message, argument=named)


def test_text_counts_must_match_the_batch() -> None:
    r = synthetic_rollout()
    with pytest.raises(ValueError, match=r"6 rows but 5 prompts and 6 completions"):
        r.replace(prompts=r.prompts[:5])
    with pytest.raises(ValueError, match=r"6 rows but 6 prompts and 7 completions"):
        r.replace(completions=(*r.completions, "extra"))


def test_empty_batch_and_empty_first_response_token_are_rejected() -> None:
    r = synthetic_rollout()
    with pytest.raises((ValueError, TypeError), match=r"at least one completion|parameter"):
        r.select(slice(0, 0))
    mask = r.response_mask.clone()
    mask[2, 0] = False
    with pytest.raises(ValueError, match=r"every response must start with a real token"):
        r.replace(response_mask=mask)


def test_a_zero_length_response_is_a_value_error() -> None:
    r = synthetic_rollout()
    empty = {
        name: value[:, :0]
        for name, value in _tensor_fields(r).items()
        if value.dim() == 2 and not name.startswith("prompt")
    }
    with pytest.raises(ValueError, match=r"at least one response token"):
        r.replace(**empty)


# --------------------------------------------------------------------------- select and to


def test_select_by_slice_and_by_index_tensor() -> None:
    r = _rollout([1, 2, 3, 2], [3, 1, 2, 3], [0, 0, 1, 1], with_scores=True)
    by_slice = r.select(slice(1, 3))
    assert by_slice.completions == ("completion 1", "completion 2")
    assert by_slice.prompts == ("prompt 0", "prompt 1")
    assert by_slice.prompt_index.tolist() == [0, 1]
    assert torch.equal(by_slice.response_ids, r.response_ids[1:3])
    by_index = r.select(torch.tensor([3, 0]))
    assert by_index.completions == ("completion 3", "completion 0")
    assert torch.equal(by_index.scores, r.scores[[3, 0]])  # type: ignore[index]
    assert torch.equal(by_index.prompt_ids, r.prompt_ids[[3, 0]])
    assert by_index.temperature == r.temperature


def test_select_rejects_a_boolean_mask_instead_of_indices() -> None:
    # A bool mask's .tolist() is [True, False, ...] = rows [1, 0, ...]: silently wrong rows.
    r = synthetic_rollout()
    mask = torch.tensor([True, False, True, False, False, False])
    assert_bad_input(lambda: r.select(mask), message=r"integer index tensor", argument="index")


@given(spec=rollout_specs(), data=st.data())
def test_select_takes_exactly_the_indexed_rows(spec: dict, data: st.DataObject) -> None:
    r = _rollout(**spec)
    # Property: row i of select(index) is row index[i] of the original, in every field.
    index = data.draw(st.lists(st.integers(0, len(r) - 1), min_size=1, max_size=8))
    picked = r.select(torch.tensor(index))
    for name, value in _tensor_fields(r).items():
        assert torch.equal(getattr(picked, name), value[index]), name
    assert picked.prompts == tuple(r.prompts[i] for i in index)
    assert picked.completions == tuple(r.completions[i] for i in index)


@given(spec=rollout_specs(), data=st.data())
def test_select_by_slice_equals_select_by_its_indices(spec: dict, data: st.DataObject) -> None:
    r = _rollout(**spec)
    # Property: a slice (negative bounds and steps included) selects range(len)[slice].
    start = data.draw(st.integers(-len(r), len(r) - 1))
    step = data.draw(st.sampled_from([1, 2, -1]))
    rows = list(range(len(r)))[start::step]
    a, b = r.select(slice(start, None, step)), r.select(torch.tensor(rows))
    for name, value in _tensor_fields(a).items():
        assert torch.equal(value, getattr(b, name)), name
    assert a.completions == b.completions


def test_to_moves_every_tensor_and_keeps_the_texts(device: torch.device) -> None:
    r = synthetic_rollout(with_values=True)
    moved = r.to(device)
    for name, value in _tensor_fields(moved).items():
        assert value.device.type == device.type, name
        assert torch.equal(value.cpu(), getattr(r, name)), name
    assert moved.prompts == r.prompts and moved.completions == r.completions
    assert moved.to("cpu").completions == r.completions


# --------------------------------------------------------------------------- concat


def test_concat_repads_prompts_left_and_responses_right_by_hand() -> None:
    a = _rollout([2, 1], [3, 1], [0, 0], seed=1, tag="a")
    b = _rollout([4], [1], [0], seed=2, tag="b")
    c = Rollout.concat([a, b])
    assert c.prompt_mask.tolist() == [
        [False, False, True, True],
        [False, False, False, True],
        [True, True, True, True],
    ]
    assert c.response_mask.tolist() == [
        [True, True, True],
        [True, False, False],
        [True, False, False],
    ]
    assert c.prompt_ids[0, 2:].tolist() == a.prompt_ids[0].tolist()
    assert c.response_ids[2, :1].tolist() == b.response_ids[0].tolist()
    assert c.prompt_index.tolist() == [0, 0, 1]  # b's group 0 becomes group 1
    assert c.prompts == ("aprompt 0", "aprompt 0", "bprompt 0")
    assert c.completions == ("acompletion 0", "acompletion 1", "bcompletion 0")
    assert c.ended.tolist() == [False, True, False]


def test_concat_errors() -> None:
    a = _rollout([2], [2], [0])
    with pytest.raises(ValueError, match="at least one rollout"):
        Rollout.concat([])
    with pytest.raises(ValueError, match="different temperatures"):
        Rollout.concat([a, _rollout([2], [2], [0], temperature=0.7)])
    with pytest.raises(ValueError, match="scores is set in some rollouts only"):
        Rollout.concat([a, _rollout([2], [2], [0], with_scores=True)])
    with pytest.raises(ValueError, match="advantages is set in some rollouts only"):
        Rollout.concat([_rollout([1], [1], [0], with_advantages=True), a])


@given(spec=rollout_specs(), data=st.data())
def test_concat_of_splits_is_the_original_on_real_tokens(spec: dict, data: st.DataObject) -> None:
    r = _rollout(**spec)
    # Property: concat(trimmed splits of r) == r on real tokens; masks identical; groups kept apart.
    cuts = (
        sorted(set(data.draw(st.lists(st.integers(1, len(r) - 1), max_size=3))))
        if len(r) > 1
        else []
    )
    bounds = [0, *cuts, len(r)]
    parts = [_trimmed(r.select(slice(lo, hi))) for lo, hi in itertools.pairwise(bounds)]
    joined = Rollout.concat(parts)
    _assert_same_real_tokens(joined, r)
    part_of = torch.repeat_interleave(
        torch.arange(len(parts)), torch.tensor([len(p) for p in parts])
    )
    same_group = joined.prompt_index[:, None] == joined.prompt_index[None, :]
    expected = (r.prompt_index[:, None] == r.prompt_index[None, :]) & (
        part_of[:, None] == part_of[None, :]
    )
    assert torch.equal(same_group, expected)


@given(specs=st.lists(rollout_specs(max_b=3), min_size=1, max_size=3))
def test_concat_pads_to_the_widest_and_keeps_each_part(specs: list[dict]) -> None:
    # Property: each part comes back, by select, with its real tokens, masks and texts.
    parts = [_rollout(**{**spec, "with_scores": False, "with_advantages": False}) for spec in specs]
    joined = Rollout.concat(parts)
    assert joined.prompt_ids.shape[1] == max(p.prompt_ids.shape[1] for p in parts)
    assert joined.response_ids.shape[1] == max(p.response_ids.shape[1] for p in parts)
    start = 0
    for p in parts:
        back = _trimmed(joined.select(slice(start, start + len(p))))
        _assert_same_real_tokens(back, p)
        start += len(p)
    # prompts stay left padded and responses right padded after re-padding
    assert torch.equal(joined.prompt_mask, joined.prompt_mask.cummax(1).values)
    assert torch.equal(joined.response_mask, joined.response_mask.flip(1).cummax(1).values.flip(1))


# --------------------------------------------------------------------------- RolloutBuffer


def _ids(r: Rollout) -> list[str]:
    return list(r.completions)  # "completion i": one distinct name per row


def test_minibatches_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    buffer = RolloutBuffer(synthetic_rollout(batch=8, group=2))

    def order(seed: int) -> list[list[str]]:
        g = torch.Generator().manual_seed(seed)
        return [_ids(mb) for mb in buffer.minibatches(2, epochs=3, generator=g)]

    assert order(0) == order(0)
    assert order(0) != order(1)
    epochs = order(0)
    assert epochs[:4] != epochs[4:8]  # a fresh permutation each epoch


@given(
    batch=st.integers(1, 12),
    data=st.data(),
    epochs=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_each_row_once_per_epoch(batch: int, data: st.DataObject, epochs: int, seed: int) -> None:
    # Property: every epoch's minibatches partition the buffer's rows; all have one size.
    size = data.draw(st.sampled_from([d for d in range(1, batch + 1) if batch % d == 0]))
    rollout = _rollout([1] * batch, [1] * batch, list(range(batch)), seed=seed)
    g = torch.Generator().manual_seed(seed)
    minibatches = list(RolloutBuffer(rollout).minibatches(size, epochs=epochs, generator=g))
    per_epoch = batch // size
    assert len(minibatches) == epochs * per_epoch
    assert all(len(mb) == size for mb in minibatches)
    for e in range(epochs):
        rows = [c for mb in minibatches[e * per_epoch : (e + 1) * per_epoch] for c in _ids(mb)]
        assert sorted(rows) == sorted(rollout.completions)


def test_minibatches_carry_aligned_rows() -> None:
    rollout = synthetic_rollout(batch=6, with_values=True)
    g = torch.Generator().manual_seed(3)
    for mb in RolloutBuffer(rollout).minibatches(3, generator=g):
        rows = [rollout.completions.index(c) for c in mb.completions]
        assert torch.equal(mb.old_values, rollout.old_values[rows])  # type: ignore[index]
        assert torch.equal(mb.response_mask, rollout.response_mask[rows])
        assert mb.prompts == tuple(rollout.prompts[i] for i in rows)


@pytest.mark.parametrize(
    ("size", "epochs", "message"),
    [
        (0, 1, r"minibatch_size must be in \[1, 6\] \(the buffer holds 6 rows\), got 0"),
        (7, 1, r"minibatch_size must be in \[1, 6\] \(the buffer holds 6 rows\), got 7"),
        (4, 1, r"minibatch_size 4 does not divide the buffer size 6"),
        (3, 0, r"epochs must be >= 1, got 0"),
    ],
)
def test_minibatch_errors_are_raised_at_the_call(size: int, epochs: int, message: str) -> None:
    # Raised when minibatches() is called, not later at the first next() deep inside a loop.
    buffer = RolloutBuffer(synthetic_rollout())
    with pytest.raises(ValueError, match=message):
        buffer.minibatches(size, epochs=epochs)


def test_whitened_needs_advantages() -> None:
    with pytest.raises(ValueError, match=r"whitened\(\) needs advantages"):
        RolloutBuffer(synthetic_rollout()).whitened()


@given(spec=rollout_specs(min_b=2))
def test_whitened_advantages_have_mean_0_and_variance_1_over_the_buffer(spec: dict) -> None:
    # Property: over all real tokens of the whole buffer, mean 0 and (population) variance 1.
    r = _rollout(**{**spec, "with_advantages": True})
    real = r.advantages[r.response_mask]  # type: ignore[index]
    if real.numel() < 2 or float(real.var()) < 1e-3:
        return  # constant advantages cannot be scaled to variance 1
    white = RolloutBuffer(r).whitened().rollout.advantages
    assert white is not None
    values = white[r.response_mask].double()
    assert abs(float(values.mean())) < 1e-5
    assert abs(float(values.var(unbiased=False)) - 1.0) < 1e-4
    assert torch.all(white[~r.response_mask] == 0)
    # the order of values is kept: whitening is an increasing affine map of the real tokens
    assert torch.equal(values.argsort(stable=True), real.double().argsort(stable=True))


def test_whitened_without_shift_keeps_the_mean_and_leaves_other_fields() -> None:
    r = _rollout([1, 2, 3], [2, 4, 1], [0, 1, 2], with_advantages=True, with_scores=True)
    white = RolloutBuffer(r).whitened(shift_mean=False).rollout
    real = r.advantages[r.response_mask]  # type: ignore[index]
    out = white.advantages[r.response_mask]  # type: ignore[index]
    assert torch.allclose(out.mean(), real.mean(), atol=1e-5)
    assert torch.allclose(out.var(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(white.old_logprobs, r.old_logprobs)
    assert torch.equal(white.scores, r.scores)  # type: ignore[arg-type]
    assert torch.equal(r.advantages, RolloutBuffer(r).rollout.advantages)  # type: ignore[arg-type]


def test_public_names() -> None:
    assert kltune.Rollout is Rollout and kltune.RolloutBuffer is RolloutBuffer

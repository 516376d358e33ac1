"""kltune.accel: the speed and memory settings give the same training as the plain loop."""

import copy
import platform
import subprocess
import sys

import pytest
import torch

import kltune
from helpers import tiny_blocks
from kltune.accel import StepInBackward, allocate_optimizer_state, prepare
from test_loop import _iterate, _scoring_nan


@pytest.mark.parametrize("value_head", [False, True])
def test_stepping_in_backward_equals_stepping_after_backward(value_head: bool) -> None:
    # The memory fast path (no full set of gradients alive) against the plain path:
    # same weights after 2 iterations of 2 minibatches, same metrics.
    baseline = kltune.GAEBaseline() if value_head else None
    updates = kltune.Updates(minibatch_size=3, max_grad_norm=None)
    runs = []
    for in_backward in (False, True):
        blocks, state = tiny_blocks(value_head=value_head, baseline=baseline)
        if in_backward:
            blocks = prepare(blocks, keep_memory=False, step_in_backward=True)
            assert isinstance(blocks.backward, StepInBackward)
        state, _, metrics = _iterate(blocks, state, n=2, updates=updates)
        runs.append((blocks.policy.state_dict(), metrics))
    (plain, plain_metrics), (fast, fast_metrics) = runs
    assert any(not torch.equal(v, tiny_blocks()[0].policy.state_dict()[k]) for k, v in fast.items())
    for key, value in plain.items():
        torch.testing.assert_close(fast[key], value, atol=1e-6, rtol=1e-5, msg=key)
    for a, b in zip(plain_metrics, fast_metrics, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "updates",
    [
        kltune.Updates(),  # clips at 1.0 by default: a global norm needs every gradient first
        kltune.Updates(max_grad_norm=None, grad_accumulation_steps=2, minibatch_size=2),
    ],
)
def test_stepping_in_backward_refuses_accumulation_and_clipping(updates) -> None:
    blocks, state = tiny_blocks()
    blocks = prepare(blocks, keep_memory=False, step_in_backward=True)
    with pytest.raises(ValueError, match="grad_accumulation_steps=1 and max_grad_norm=None"):
        _iterate(blocks, state, n=1, updates=updates)


def test_stepping_in_backward_skips_a_non_finite_loss(monkeypatch) -> None:
    blocks, state, before = _scoring_nan(monkeypatch)
    blocks = prepare(blocks, keep_memory=False, step_in_backward=True)
    state, _, metrics = _iterate(blocks, state, n=1, updates=kltune.Updates(max_grad_norm=None))
    assert metrics[0]["policy/skipped_steps"] == 1
    for key, value in before.items():
        assert torch.equal(value, blocks.policy.model.state_dict()[key])


def test_prepare_allocates_the_optimizer_state_and_keeps_the_plain_backward() -> None:
    blocks, _ = tiny_blocks(value_head=True, baseline=kltune.GAEBaseline())
    assert not blocks.optimizer.state
    prepared = prepare(blocks, keep_memory=False)
    assert prepared.backward is blocks.backward  # no stepping inside backward unless asked
    assert len(blocks.optimizer.state) == sum(p.requires_grad for p in blocks.policy.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    ],
)
def test_optimizer_state_allocated_up_front_gives_the_same_updates(make) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    runs = []
    for up_front in (False, True):
        copy_ = copy.deepcopy(model)
        optimizer = make([*copy_.parameters(), frozen])
        if up_front:
            assert allocate_optimizer_state(optimizer)
            assert frozen not in optimizer.state
            assert not allocate_optimizer_state(optimizer)  # state exists: left alone
        for step in range(3):
            optimizer.zero_grad()
            copy_(torch.randn(5, 4, generator=torch.Generator().manual_seed(step))).sum().backward()
            optimizer.step()
        runs.append((copy_.state_dict(), optimizer.state_dict()))
    (lazy, lazy_opt), (eager, eager_opt) = runs
    for key, value in lazy.items():
        assert torch.equal(eager[key], value), key
    assert str(lazy_opt) == str(eager_opt)  # same keys, dtypes, devices and values


def test_optimizer_state_is_only_allocated_for_adam() -> None:
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    assert not allocate_optimizer_state(sgd)
    assert not sgd.state


# Run in a subprocess: the setting is process-wide and would stay in the test worker.
_REFAULT_SCRIPT = """
import resource, sys, torch
import kltune.accel
if sys.argv[1] == "keep":
    assert kltune.accel.keep_freed_memory()
def iteration():  # what an iteration does to memory: allocate, touch, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(n) for n in [1 << 20, 12 << 20, 12 << 20, 28 << 20, 1 << 20]]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[iteration() for _ in range(4)])
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory sets glibc's malloc; with another C library it changes nothing",
)
def test_kept_freed_memory_is_reused_without_page_faults() -> None:
    # 216 MB a round, in blocks of 4 to 112 MB: by default glibc maps each fresh and
    # its pages fault in again every round (55 000 with 4 kB pages, fewer with huge
    # pages); kept, later rounds reuse them.
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", _REFAULT_SCRIPT, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        faults[mode] = [int(n) for n in out.stdout.split()]
    assert sum(faults["keep"][1:]) * 4 < sum(faults["default"][1:]), faults


# ── the fast-path table ──────────────────────────────────────────────────────


def _fresh_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages kltune logs from now on (the once-only cache emptied)."""
    import kltune.accel as accel

    accel._log_once.cache_clear()
    seen: list[str] = []
    monkeypatch.setattr(accel._log, "info", seen.append)
    return seen


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_registered_architectures_get_their_fast_paths(kind: str) -> None:
    model, _ = kltune.tiny_random_model(kind)
    paths = kltune.accel.fast_paths(model)
    assert paths == kltune.accel.ARCHITECTURES[type(model).__name__]
    assert paths.fused_head and paths.lean_decoding == (kind == "llama")


def test_a_subclass_of_a_registered_class_runs_its_own_forward_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A subclass may override forward (soft-capping, a new RoPE): the name is not enough.
    seen = _fresh_log(monkeypatch)
    model, tokenizer = kltune.tiny_random_model("llama")
    model.__class__ = type("LlamaForCausalLM", (type(model),), {})
    assert kltune.accel.fast_paths(model) == kltune.accel.FastPaths("")
    kltune.accel.fast_paths(model)
    assert len(seen) == 1 and "is not transformers' LlamaForCausalLM" in seen[0]
    policy = kltune.Policy(model, tokenizer)
    rollout = policy.rollout(["ab"], max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape == (1, 3)  # the model's own forward, still sampling


def test_a_config_that_changes_the_logits_turns_the_fast_paths_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _fresh_log(monkeypatch)
    model, _ = kltune.tiny_random_model("llama")
    model.config.final_logit_softcapping = 30.0
    assert not kltune.accel.fast_paths(model).fused_head
    assert "final_logit_softcapping" in seen[0]
    from kltune._decoding import LlamaDecoding
    from kltune.policy import _plain_output_layer

    assert _plain_output_layer(model) is None and not LlamaDecoding.supports(model, 16)


def test_an_untested_transformers_release_turns_the_fast_paths_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kltune.accel as accel

    seen = _fresh_log(monkeypatch)
    model, _ = kltune.tiny_random_model("llama")
    monkeypatch.setattr(accel, "TESTED_TRANSFORMERS", ((4, 0), (5, 0)))
    assert accel.fast_paths(model) == accel.FastPaths("")
    assert "outside the tested range" in seen[0]


def test_a_registered_name_transformers_no_longer_has_is_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kltune.accel as accel

    seen = _fresh_log(monkeypatch)
    accel._transformers_class.cache_clear()
    entry = accel.FastPaths("llama", True, True, "LlamaRMSNormRenamed", "LlamaMLP")
    assert accel.component(entry, entry.norm) is None
    assert "has no LlamaRMSNormRenamed" in seen[0]
    accel._transformers_class.cache_clear()


def test_the_tested_range_is_the_pinned_range() -> None:
    # pyproject pins transformers to the releases the fast paths are tested with.
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("transformers"))
    (a, b), (c, d) = kltune.accel.TESTED_TRANSFORMERS
    assert pin.split(";")[0].replace(" ", "") == f"transformers>={a}.{b},<{c}.{d}"

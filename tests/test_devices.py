"""Device correctness: sampling, scoring, the loop, the reference and resume on every
available device (the CPU, and CUDA when there is one; skipped otherwise).

No test here compares a device's result with itself: the CUDA runs are checked
against the same computation on the CPU, and every run against an independent
path (the KV-cache sampler against the full forward, a split run against a
straight one).
"""

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

import kltune
import kltune.functional as KF
from conftest import NO_CUDA
from helpers import letter_reward, tiny_blocks
from kltune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kltune.loop import optimise, ppo_iteration
from kltune.plots import read_metrics
from kltune.sampler import KVCacheSampler

PROMPTS = ["The movie", "A film about", "I think", ""]
PRECISIONS = {"f32": (None, 1e-4), "bf16": (torch.bfloat16, 0.05)}


def _policy(device: torch.device, *, autocast: torch.dtype | None = None, value_head: bool = False):
    model, tokenizer = kltune.tiny_random_model("llama", seed=0)
    # Peaked logits, so that top-k/top-p truncation bites on a random model.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.to(device)
    return kltune.Policy(model, tokenizer, value_head=value_head, autocast_dtype=autocast)


def _gen(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).detach().abs().masked_fill(~mask, 0).max())


@pytest.mark.parametrize("precision", PRECISIONS, ids=list(PRECISIONS))
@pytest.mark.parametrize("truncation", [{}, {"top_k": 5}, {"top_p": 0.7, "temperature": 0.7}])
def test_the_first_ratio_is_one_on_the_device(
    device: torch.device, precision: str, truncation: dict
) -> None:
    autocast, tolerance = PRECISIONS[precision]
    policy = _policy(device, autocast=autocast, value_head=True)
    rollout = policy.rollout(
        PROMPTS, max_new_tokens=8, completions_per_prompt=2, generator=_gen(device), **truncation
    )
    for tensor in (rollout.response_ids, rollout.old_logprobs, rollout.old_values, rollout.ended):
        assert tensor is not None and tensor.device.type == device.type
    assert rollout.old_logprobs.dtype == torch.float32  # float32 under autocast too
    scored = policy.score(rollout)
    mask = rollout.response_mask
    ratio = torch.exp(scored.logprobs - rollout.old_logprobs)
    assert _gap(ratio, torch.ones_like(ratio), mask) < tolerance
    assert scored.values is not None and rollout.old_values is not None
    assert _gap(scored.values, rollout.old_values, mask) < tolerance


def test_sampling_on_the_device_computes_the_cpu_function(device: torch.device) -> None:
    # The device's behaviour logprobs against the same weights scoring the same
    # tokens on the CPU (the model's own forward there).
    policy = _policy(device)
    rollout = policy.rollout(PROMPTS, max_new_tokens=8, top_k=5, generator=_gen(device))
    on_cpu = kltune.Policy(copy.deepcopy(policy.model).cpu(), policy.tokenizer, fused_head=False)
    expected = on_cpu.score(rollout.to("cpu")).logprobs
    assert _gap(rollout.old_logprobs.cpu(), expected, rollout.response_mask.cpu()) < 1e-4


def test_a_device_generator_makes_sampling_reproducible(device: torch.device) -> None:
    policy = _policy(device)
    first = policy.rollout(PROMPTS, max_new_tokens=8, generator=_gen(device, 1))
    again = policy.rollout(PROMPTS, max_new_tokens=8, generator=_gen(device, 1))
    other = policy.rollout(PROMPTS, max_new_tokens=8, generator=_gen(device, 2))
    assert torch.equal(first.response_ids, again.response_ids)
    assert first.completions == again.completions != other.completions


def test_a_ppo_iteration_on_the_device_trains_the_policy_and_not_the_reference(
    device: torch.device,
) -> None:
    blocks, state = tiny_blocks(
        value_head=True, baseline=kltune.GAEBaseline(lam=0.95), device=device
    )
    before = {k: v.clone() for k, v in blocks.policy.state_dict().items()}
    reference = [p.clone() for p in blocks.reference.model.parameters()]  # type: ignore[attr-defined]
    sampling = kltune.Sampling(max_new_tokens=6, completions_per_prompt=2)
    updates = kltune.Updates(epochs=2, minibatch_size=4)
    state, rollout, metrics = ppo_iteration(PROMPTS, blocks, state, sampling, updates, _gen(device))
    assert rollout.device.type == device.type
    assert all(math.isfinite(v) for v in metrics.values())
    assert abs(metrics["policy/first_ratio_error"]) < 1e-4
    after = blocks.policy.state_dict()
    assert all(after[k].device.type == device.type for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert blocks.policy.value_head is not None
    assert not torch.equal(before["value_head.weight"], after["value_head.weight"])
    params = blocks.reference.model.parameters()  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in zip(reference, params, strict=True))


def test_zero_advantages_move_nothing_on_the_device(device: torch.device) -> None:
    # No KL term in the loss and no advantage: the clipped surrogate's gradient is 0.
    blocks, state = tiny_blocks(device=device)
    policy = blocks.policy
    rollout = policy.rollout(PROMPTS, max_new_tokens=6, generator=_gen(device))
    rollout = rollout.replace(
        advantages=torch.zeros_like(rollout.old_logprobs),
        returns=torch.zeros_like(rollout.old_logprobs),
        ref_logprobs=rollout.old_logprobs.clone(),
    )
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    blocks = kltune.Blocks(
        policy=policy,
        reference=kltune.FrozenReference(policy),
        reward_fn=letter_reward,
        objective=kltune.PPOObjective(value_coef=0.0),
        optimizer=optimizer,
    )
    before = [p.clone() for p in policy.parameters()]
    optimise(blocks, kltune.RolloutBuffer(rollout), 0.0, kltune.Updates(), _gen(device), state)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


DEVICE_PAIRS = [
    pytest.param(p, r, marks=NO_CUDA if "cuda" in (p, r) else [])
    for p, r in itertools.product(["cpu", "cuda"], repeat=2)
]


@pytest.mark.parametrize(("policy_device", "reference_device"), DEVICE_PAIRS)
def test_the_reference_may_live_on_another_device(
    policy_device: str, reference_device: str
) -> None:
    policy = _policy(torch.device(policy_device))
    rollout = policy.rollout(PROMPTS, max_new_tokens=6, generator=_gen(torch.device(policy_device)))
    beside = kltune.FrozenReference(policy, device=reference_device)
    assert beside.device.type == reference_device
    logprobs = beside.logprobs(rollout)
    assert logprobs.device == rollout.device  # the logprobs moved, not the models
    # Against the policy's own scoring of the same tokens (it is π_ref before any update).
    expected = policy.score(rollout).logprobs.detach()
    assert _gap(logprobs, expected, rollout.response_mask) < 1e-4
    head = beside.next_token_head(rollout)
    assert head.hidden.device == rollout.device
    with torch.no_grad():
        own = policy.next_token_head(rollout)
        kl = KF.kl_exact_from_hidden(
            own.hidden,
            own.weight,
            head.hidden,
            head.weight,
            rollout.temperature,
            own.bias,
            head.bias,
        )
    assert float(kl.masked_fill(~rollout.response_mask, 0).abs().max()) < 1e-4  # same function


def _train(device: torch.device, out: Path, iterations: int, **options) -> kltune.Blocks:
    blocks, state = tiny_blocks(
        controller=kltune.AdaptiveKLController(beta=0.1, target=1.0, horizon=10), device=device
    )
    kltune.train(
        PROMPTS[:3],
        blocks,
        state,
        iterations=iterations,
        out_dir=out,
        prompts_per_iteration=2,
        sampling=kltune.Sampling(max_new_tokens=5, completions_per_prompt=2),
        updates=kltune.Updates(epochs=2, minibatch_size=2),
        progress=False,
        seed=3,
        **options,
    )
    return blocks


def test_resume_on_the_device_reproduces_the_uninterrupted_run(
    device: torch.device, tmp_path: Path
) -> None:
    straight = _train(device, tmp_path / "straight", 4)
    _train(device, tmp_path / "split", 2, checkpoint_every=2)
    resumed = _train(device, tmp_path / "split", 4, resume=True)
    for (name, a), b in zip(
        straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True
    ):
        assert a.device.type == device.type and torch.equal(a, b), name
    timeless = [
        [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(p)]
        for p in (tmp_path / "straight" / "metrics.jsonl", tmp_path / "split" / "metrics.jsonl")
    ]
    assert timeless[0] == timeless[1]


@NO_CUDA
def test_a_cpu_generator_state_is_refused_by_a_cuda_run(tmp_path: Path) -> None:
    blocks, state = tiny_blocks()
    path = save_checkpoint(
        tmp_path / "ckpt",
        policy=blocks.policy,
        optimizer=blocks.optimizer,
        generator=torch.Generator().manual_seed(0),
        iteration=1,
        controller=state.controller,
        baseline=state.baseline,
        metrics_lines=1,
    )
    with pytest.raises(CheckpointError, match="generator of another kind"):
        load_checkpoint(
            path,
            policy=blocks.policy,
            optimizer=blocks.optimizer,
            generator=_gen(torch.device("cuda")),
        )


#: The Tensor methods that make the host wait for the device.
HOST_READS = ("__bool__", "__int__", "__float__", "item", "tolist", "cpu", "numpy")


def _host_reads_while_sampling(
    policy: kltune.Policy, monkeypatch: pytest.MonkeyPatch, *, tokens: int, stop_at_eos: bool
) -> tuple[int, int]:
    """(host reads outside the model's forward, tokens drawn) over one sampler call."""
    reads, inside = [0], [False]
    step = KVCacheSampler.step

    def model_step(self, *args, **kwargs):  # the model's own forward is not ours to count
        inside[0] = True
        try:
            return step(self, *args, **kwargs)
        finally:
            inside[0] = False

    ids, mask = policy.encode_prompts(PROMPTS, tokens)
    monkeypatch.setattr(KVCacheSampler, "step", model_step)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[0] += not inside[0]
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    sampled = policy.sampler(
        policy,
        ids,
        mask,
        max_new_tokens=tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        generator=_gen(policy.device),
        stop_at_eos=stop_at_eos,
    )
    monkeypatch.undo()
    return reads[0], sampled.tokens.shape[1]


def test_sampling_reads_the_device_once_per_token_at_most(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The end-of-sequence check is the one per-token wait (the health flags ride on
    # it); without EOS stops the loop never waits until the end.
    policy = _policy(device)
    reads, drawn = _host_reads_while_sampling(policy, monkeypatch, tokens=12, stop_at_eos=True)
    assert 1 <= reads <= drawn + 2, (reads, drawn)
    reads, drawn = _host_reads_while_sampling(policy, monkeypatch, tokens=12, stop_at_eos=False)
    assert drawn == 12 and reads <= 2, reads

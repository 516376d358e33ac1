"""Preference pairs, the Bradley–Terry reward model and DPO on tiny random models.

Behaviour first: fitting must make the reward model rank held-out pairs, DPO
must raise the policy's preferred completions over the dispreferred ones, and
padding, batching and saving must not change a score.
"""

import json
import math
import random

import pytest
import torch

import kltune
import kltune.functional as KF
from helpers import letter_reward
from kltune.policy import teacher_forced
from kltune.preferences import (
    Preference,
    RewardModel,
    dpo_losses,
    dpo_step,
    evaluate_reward_model,
    fit_dpo,
    fit_reward_model,
    judge_pairs,
    load_preferences,
    preference_pairs,
    save_preferences,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"  # peft / transformers 5
)


def _letter_pairs(count: int, seed: int) -> list[Preference]:
    """Pairs a byte-level model can learn: the completion with more 'a's is chosen."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = "".join(rng.choice("xyz ") for _ in range(4))
        rich = "".join(rng.choice("aab") for _ in range(6))
        poor = "".join(rng.choice("bcd") for _ in range(6))
        pairs.append(Preference(prompt, rich, poor))
    return pairs


def _reward_model(architecture: str = "llama", seed: int = 0) -> RewardModel:
    model, tokenizer = kltune.tiny_random_model(architecture, seed=seed)
    torch.manual_seed(seed)
    return RewardModel.from_causal_lm(model, tokenizer, batch_size=4)


# ------------------------------------------------------------------ pairs


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (("p", "", "b"), ValueError, "chosen is empty"),
        (("p", "a", "  \n"), ValueError, "rejected is empty"),
        (("p", "same", "same"), ValueError, "same text"),
        (("p", 3, "b"), TypeError, "chosen"),
        (("p", "a\ud800", "b"), ValueError, "not valid Unicode"),
    ],
)
def test_a_bad_pair_is_refused_with_its_reason(fields, error, message) -> None:
    with pytest.raises(error, match=message):
        Preference(*fields)


def test_pairs_from_lists_name_the_bad_one() -> None:
    with pytest.raises(ValueError, match="aligned"):
        preference_pairs(["p"], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="empty"):
        preference_pairs([], [], [])
    with pytest.raises(ValueError, match="pair 1: chosen and rejected are the same"):
        preference_pairs(["p", "q"], ["a", "b"], ["c", "b"])
    assert preference_pairs(["p"], ["a"], ["c"]) == [Preference("p", "a", "c")]


def test_pairs_survive_a_round_trip_to_disk(tmp_path) -> None:
    pairs = [*_letter_pairs(5, seed=0), Preference("", "émoji 🙂", 'quote " and \n newline')]
    path = tmp_path / "pairs.jsonl"
    save_preferences(pairs, path)
    assert load_preferences(path) == pairs
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]  # no partial file left


def test_a_bad_line_is_named_by_file_and_number(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path.write_text(good + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl, line 2"):
        load_preferences(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no preference pairs"):
        load_preferences(path)


def test_the_judge_prefers_the_higher_score_and_flips_at_the_stated_rate() -> None:
    prompts = ["p"] * 2000
    first = [" ".join("w" * (1 + i % 5)) for i in range(2000)]  # 1..5 words
    second = [" ".join("w" * (1 + (i + 1) % 5)) for i in range(2000)]
    clean, flags = judge_pairs(kltune.LengthReward(), prompts, first, second)
    assert not any(flags) and len(clean) == 2000
    assert all(len(p.chosen) > len(p.rejected) for p in clean)
    assert {(p.chosen, p.rejected) for p in clean} >= {("w w", "w")}
    noisy, flags = judge_pairs(
        kltune.LengthReward(), prompts, first, second, flip_probability=0.2, seed=1
    )
    assert all((len(p.chosen) < len(p.rejected)) == f for p, f in zip(noisy, flags, strict=True))
    assert 0.17 < sum(flags) / len(flags) < 0.23
    # ties and identical texts carry no preference and are dropped
    kept, _ = judge_pairs(kltune.LengthReward(), ["p", "p"], ["a b", "cd"], ["a b", "xy"])
    assert kept == []
    with pytest.raises(ValueError, match="flip_probability"):
        judge_pairs(kltune.LengthReward(), ["p"], ["a"], ["bb"], flip_probability=0.5)


# ------------------------------------------------------------------ reward model


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_an_untrained_model_scores_zero_and_padding_changes_nothing(architecture) -> None:
    model = _reward_model(architecture)
    assert torch.equal(model(["p", "q"], ["a", "b"]), torch.zeros(2))
    torch.nn.init.normal_(model.head.weight)
    alone = model(["a prompt"], [" short"])
    padded = model(["a prompt", "x"], [" short", " a much longer completion than the first"])
    assert torch.allclose(alone, padded[:1], atol=1e-5)
    with_grad = model.scores(["a prompt"], [" short"])
    assert with_grad.requires_grad and torch.allclose(with_grad.detach(), alone, atol=1e-6)
    assert alone.dtype == torch.float32 and not alone.requires_grad
    assert kltune.score_completions(model, ["p"], ["q"]).shape == (1,)


def test_bad_texts_are_refused() -> None:
    model = _reward_model()
    model.max_length = 8
    with pytest.raises(ValueError, match="max_length of 8"):
        model(["a long prompt here"], [" and more"])
    with pytest.raises(ValueError, match="one prompt per completion"):
        model.scores(["p"], ["a", "b"])
    with pytest.raises(ValueError, match="batch_size"):
        RewardModel(model.backbone, model.tokenizer, batch_size=0)


def test_fitting_learns_to_rank_held_out_pairs_and_saves_what_it_learned(tmp_path) -> None:
    model = _reward_model()
    train, held_out = _letter_pairs(96, seed=1), _letter_pairs(48, seed=2)
    before = evaluate_reward_model(model, held_out)
    assert before["eval/accuracy"] == 0.5
    assert math.isclose(before["eval/loss"], math.log(2), rel_tol=1e-6)
    history = fit_reward_model(
        model, train, eval_pairs=held_out, lr=3e-3, epochs=3, batch_size=8,
        out_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert len(history) == 3 * 12 and history[-1]["step"] == 36
    assert history[-1]["eval/accuracy"] >= 0.9, history[-1]
    assert history[-1]["loss"] < history[0]["loss"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 37))
    assert sum("eval/accuracy" in json.loads(line) for line in lines) == 3
    assert not model.training
    # the saved weights give the same scores in a fresh model
    fresh = _reward_model().load(tmp_path / "model")
    texts = [p.chosen for p in held_out[:4]]
    assert torch.allclose(fresh(["x"] * 4, texts), model(["x"] * 4, texts), atol=1e-6)
    with pytest.raises(FileExistsError, match="already holds a fit"):
        fit_reward_model(model, train, epochs=1, out_dir=tmp_path, progress=False)


def test_zero_learning_rate_changes_no_weight() -> None:
    model = _reward_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_reward_model(model, _letter_pairs(8, seed=0), lr=0.0, centring=0.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_lora_reward_model_trains_only_the_adapter_and_the_head() -> None:
    peft = pytest.importorskip("peft")
    causal, tokenizer = kltune.tiny_random_model("llama", seed=0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = RewardModel(peft.get_peft_model(causal.model, config), tokenizer)
    before = {k: v.clone() for k, v in model.named_parameters()}
    fit_reward_model(model, _letter_pairs(16, seed=0), lr=1e-2, epochs=1, progress=False)
    changed = {k for k, v in model.named_parameters() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed), changed
    assert any(k.startswith("head.") for k in changed)


def test_a_nan_loss_stops_the_fit_with_a_clear_error() -> None:
    model = _reward_model()
    with torch.no_grad():
        model.head.bias.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        fit_reward_model(model, _letter_pairs(4, seed=0), progress=False)


def test_the_reward_model_drives_a_ppo_iteration() -> None:
    scorer = _reward_model(seed=1)
    model, tokenizer = kltune.tiny_random_model("llama", seed=0)
    policy = kltune.Policy(model, tokenizer)
    blocks = kltune.Blocks(
        policy=policy,
        reference=kltune.FrozenReference(policy),
        reward_fn=scorer,
        objective=kltune.PPOObjective(),
        optimizer=torch.optim.Adam(policy.parameters(), lr=1e-3),
    )
    state = kltune.LoopState(
        controller=kltune.FixedKLController(0.1), baseline=kltune.MeanBaseline()
    )
    state, _, metrics = kltune.ppo_iteration(
        ["ab", "cd"],
        blocks,
        state,
        kltune.Sampling(max_new_tokens=4),
        kltune.Updates(minibatch_size=2),
        generator=torch.Generator(),
    )
    assert math.isfinite(float(metrics["reward/score_mean"]))


# ------------------------------------------------------------------ DPO


def _dpo_blocks(seed: int = 0):
    model, tokenizer = kltune.tiny_random_model("llama", seed=seed)
    policy = kltune.Policy(model, tokenizer)
    return policy, kltune.FrozenReference(policy)


def test_teacher_forced_scores_match_the_sampled_logprobs() -> None:
    policy, _ = _dpo_blocks()
    prompts, generator = ["abc", "de"], torch.Generator().manual_seed(0)
    sampled = policy.rollout(prompts, max_new_tokens=5, generator=generator)
    rollout = teacher_forced(policy, list(sampled.prompts), list(sampled.completions))
    if torch.equal(rollout.response_ids, sampled.response_ids):  # byte tokenizer round-trips
        with torch.no_grad():
            scored = policy.score(rollout).logprobs
        assert torch.allclose(scored, sampled.old_logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="encodes to no token"):
        teacher_forced(policy, ["p"], [""])


def test_dpo_starts_at_log_two_and_raises_the_chosen_over_the_rejected() -> None:
    policy, reference = _dpo_blocks()
    pairs = _letter_pairs(32, seed=3)
    loss, metrics = dpo_losses(policy, reference, pairs[:8], beta=0.1)
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5)
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    history = fit_dpo(
        policy, reference, pairs, beta=0.1, lr=3e-3, epochs=3, batch_size=8,
        eval_pairs=_letter_pairs(16, seed=4), progress=False,
    )  # fmt: skip
    assert history[-1]["loss"] < math.log(2) - 0.1
    assert history[-1]["eval/accuracy"] >= 0.9 and history[-1]["eval/reward_margin"] > 0
    # the behaviour: the policy now gives a held-out preferred completion more
    # probability relative to the reference than the dispreferred one
    held_out = _letter_pairs(16, seed=5)
    prompts = [p.prompt for p in held_out]
    rollout = teacher_forced(
        policy, prompts * 2, [p.chosen for p in held_out] + [p.rejected for p in held_out]
    )
    with torch.no_grad():
        ratio = KF.masked_sum(
            policy.score(rollout).logprobs - reference.logprobs(rollout), rollout.response_mask, -1
        )
    assert float((ratio[:16] - ratio[16:]).mean()) > 0


def test_a_dpo_step_on_the_reference_with_no_learning_rate_moves_nothing() -> None:
    policy, reference = _dpo_blocks()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    metrics = dpo_step(policy, reference, _letter_pairs(4, seed=0), optimizer, beta=0.5)
    assert metrics["grad_norm"] > 0  # a gradient exists ...
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # ... unused


def test_dpo_refuses_a_bad_beta_before_training() -> None:
    policy, reference = _dpo_blocks()
    with pytest.raises(ValueError, match="beta"):
        fit_dpo(policy, reference, _letter_pairs(2, seed=0), beta=0.0, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit_dpo(policy, reference, _letter_pairs(2, seed=0), epochs=0, progress=False)


def test_letter_reward_and_the_letter_pairs_agree() -> None:
    # the synthetic preference is the same signal the PPO tests reward
    pairs = _letter_pairs(10, seed=0)
    chosen = letter_reward([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = letter_reward([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))

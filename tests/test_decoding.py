"""The lean Llama-family decoding (kltune._decoding) against the model's own forward.

Tiny random models built from configs: Llama (the tiny test model), Mistral
and Qwen2 (biased q/k/v projections), with left-padded prompts. Tolerance:
1e-5 in float32, as for every other fast path (observed: a few 1e-7).
"""

import pytest
import torch
from torch import nn
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import kltune
from kltune._decoding import LlamaDecoding, ModelDecoding, decoding_for
from kltune.sampler import position_ids_from_mask

ATOL = 1e-5
PROMPTS = ["The movie was", "hi", "A much longer prompt, about films and acting,", ""]


def _small(config_class: type, model_class: type, **extra: object) -> PreTrainedModel:
    _, tokenizer = kltune.tiny_random_model("llama")
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    model: PreTrainedModel = model_class(config).eval()
    return model


def _models() -> dict[str, PreTrainedModel]:
    llama, _ = kltune.tiny_random_model("llama", seed=1)
    biased, _ = kltune.tiny_random_model("llama", seed=2)
    with torch.no_grad():  # an output layer with a bias, as some tests give it
        biased.lm_head.bias = nn.Parameter(torch.randn(biased.lm_head.out_features))
    return {
        "llama": llama,
        "llama-head-bias": biased,
        "mistral": _small(MistralConfig, MistralForCausalLM, sliding_window=None),
        "qwen2": _small(Qwen2Config, Qwen2ForCausalLM),  # q/k/v projections with biases
    }


MODELS = _models()
TOKENIZER = kltune.tiny_random_model("llama")[1]


def _policy(model: PreTrainedModel, **kwargs: object) -> kltune.Policy:
    return kltune.Policy(model, TOKENIZER, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_decoding_step_matches_the_models_forward(name: str) -> None:
    """Prefill in two pieces (a cached prefix then the rest), then single tokens:
    hidden states and logits of every new position against a full forward."""
    model = MODELS[name]
    policy = _policy(model)
    ids, mask = policy.encode_prompts(PROMPTS, 8)
    rows, width = ids.shape
    assert LlamaDecoding.supports(model, width + 8)
    decoding = LlamaDecoding(model, rows, width + 8)
    generator = torch.Generator().manual_seed(0)
    split = width // 2
    fed = 0
    with torch.no_grad():
        for ends_at in [split, width, *range(width + 1, width + 9)]:
            if ends_at > width:  # a new token after the prompt
                token = torch.randint(0, len(TOKENIZER), (rows, 1), generator=generator)
                ids = torch.cat([ids, token], dim=1)
                mask = torch.cat([mask, torch.ones_like(token, dtype=torch.bool)], dim=1)
            positions = position_ids_from_mask(mask)
            full = model(
                input_ids=ids,
                attention_mask=mask.long(),
                position_ids=positions,
                output_hidden_states=True,
            )
            new = slice(fed, ends_at)
            if ends_at <= width:  # the prompt, in pieces: every new position's hidden state
                hidden = decoding.forward(ids[:, new], mask[:, new], positions[:, new])
                got = hidden.view(-1, rows, ends_at - fed).permute(1, 2, 0)
                expected = full.hidden_states[-1][:, new]
                real = mask[:, new]  # padded positions' outputs are never used
                assert float((got - expected).abs()[real].max()) < ATOL
            else:  # one token: the sampling loop's call, last logits and hidden state
                logits, last = decoding(ids[:, new], mask.long(), positions[:, new])
                assert last is not None and logits.is_contiguous()
                assert float((last - full.hidden_states[-1][:, -1]).abs().max()) < ATOL
                assert float((logits - full.logits[:, -1]).abs().max()) < ATOL
            fed = ends_at


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lean_decoding_samples_what_the_models_forward_samples(
    name: str, temperature: float
) -> None:
    model = MODELS[name]
    lean = _policy(model, value_head=True)
    plain = _policy(model, value_head=True, lean_decoding=False)
    assert lean.value_head is not None and plain.value_head is not None
    with torch.no_grad():
        nn.init.normal_(lean.value_head.weight)
        plain.value_head.load_state_dict(lean.value_head.state_dict())
    kwargs = {"max_new_tokens": 12, "completions_per_prompt": 2, "temperature": temperature}
    calls: list[str] = []
    step = lean.sampler.step  # type: ignore[attr-defined]
    lean.sampler.step = lambda d, *a: calls.append(type(d).__name__) or step(d, *a)  # type: ignore[attr-defined]
    fast = lean.rollout(PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    slow = plain.rollout(PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    assert set(calls) == {"LlamaDecoding"}
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    mask = slow.response_mask
    assert float((fast.old_logprobs - slow.old_logprobs).abs()[mask].max()) < ATOL
    assert fast.old_values is not None and slow.old_values is not None
    assert float((fast.old_values - slow.old_values).abs()[mask].max()) < ATOL
    # and what was sampled is what score() computes (the PPO ratio starts at 1)
    scored = lean.score(fast).logprobs.detach()
    assert float((scored - fast.old_logprobs).abs()[mask].max()) < ATOL


def _hooked() -> PreTrainedModel:
    model, _ = kltune.tiny_random_model("llama", seed=3)
    model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    return model


def _replaced_forward() -> PreTrainedModel:
    model, _ = kltune.tiny_random_model("llama", seed=3)
    layer = model.model.layers[1].self_attn.q_proj
    layer.forward = layer.forward  # as accelerate's hooks do: an instance attribute
    return model


def _lora() -> nn.Module:
    peft = pytest.importorskip("peft")
    model, _ = kltune.tiny_random_model("llama", seed=3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, config)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "build, why",
    [
        (lambda: kltune.tiny_random_model("gpt2")[0], "another architecture"),
        (lambda: _small(Qwen3Config, Qwen3ForCausalLM), "q/k norms"),
        (lambda: _small(MistralConfig, MistralForCausalLM, sliding_window=8), "a window"),
        (_hooked, "a forward hook"),
        (_replaced_forward, "a replaced forward"),
        (_lora, "a LoRA adapter"),
        (lambda: MODELS["llama"].to(torch.float64).to(torch.float32), "control: plain"),
    ],
)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_the_lean_decoding_is_used_only_where_it_computes_the_models_function(
    build, why: str
) -> None:
    model = build()
    expected = why.startswith("control")
    assert LlamaDecoding.supports(model, capacity=40) is expected, why
    chosen = decoding_for(model, rows=2, capacity=40, hidden=False)
    assert isinstance(chosen, LlamaDecoding if expected else ModelDecoding)


def test_the_models_forward_is_used_when_asked_or_under_autocast() -> None:
    model = MODELS["llama"]
    assert isinstance(decoding_for(model, 2, 40, hidden=True, lean=False), ModelDecoding)
    seen: list[str] = []
    for policy in [
        _policy(model, lean_decoding=False),
        _policy(model, autocast_dtype=torch.bfloat16),
    ]:
        step = policy.sampler.step  # type: ignore[attr-defined]
        policy.sampler.step = lambda d, *a, step=step: seen.append(type(d).__name__) or step(d, *a)  # type: ignore[attr-defined]
        policy.rollout(PROMPTS[:2], max_new_tokens=2)
    assert set(seen) == {"ModelDecoding"}


def test_feeding_past_the_capacity_is_refused() -> None:
    model = MODELS["llama"]
    decoding = LlamaDecoding(model, rows=1, capacity=3)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="holds 3 tokens a row; 4 were fed"):
        decoding.forward(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(4)[None])

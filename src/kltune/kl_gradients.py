r"""What a KL penalty does to the parameters: its expected gradient, by exact enumeration.

A penalty β·KL(π‖π_ref) acts on the policy through the gradient it gives, not
through the value of its estimator. :class:`EnumeratedCompletions` computes a
penalty's expected gradient *without sampling*: every completion of a small
vocabulary and length is enumerated, weighted by its probability π(y), and sent
through the library's own code as the loop uses it on-policy (first epoch,
ratio 1, β = 1, task score 0, no baseline):

- in the reward: ``shaped_rewards`` → ``reward_to_go`` → ``clipped_surrogate_loss``;
- in the loss: :meth:`KLPenalty.loss_kl` or :meth:`KLPenalty.exact_kl`.

Autograd of :meth:`EnumeratedCompletions.penalty_objective` is then the
penalty's expected gradient, to compare with autograd of
:meth:`~EnumeratedCompletions.true_kl`, the exact KL of whole completions,

.. math::
    \mathrm{KL}(\pi\|\pi_\text{ref}) = \sum_y \pi(y) \sum_t
        \bigl[\log\pi(y_t\mid y_{<t}) - \log\pi_\text{ref}(y_t\mid y_{<t})\bigr],

and with its token-local part :meth:`~EnumeratedCompletions.local_kl` (the
states' probabilities held fixed). The tests check every cell of
:data:`kltune.kl_control.GRADIENTS` this way, and ``examples/kl_estimators.py``
plots the cosine and norm ratio of each cell against the distance from π_ref.

Example:
    >>> import torch, kltune
    >>> theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    >>> ref = torch.zeros(3, dtype=torch.float64)
    >>> table = EnumeratedCompletions.categorical(theta, ref)
    >>> got = flat_gradient(table.penalty_objective(kltune.KLPenalty()), [theta])
    >>> truth = flat_gradient(table.true_kl(), [theta])
    >>> torch.allclose(got, truth)
    True
"""

from typing import final

import torch
from jaxtyping import Float, Int
from torch import Tensor

import kltune.functional as KF
from kltune.baselines import MeanBaseline
from kltune.kl_control import FixedKLController, KLPenalty
from kltune.loading import tiny_random_model
from kltune.loop import Blocks, LoopState, Sampling, Updates, ppo_iteration
from kltune.objective import PPOObjective
from kltune.policy import Policy
from kltune.reference import FrozenReference, HeadReference
from kltune.rollout import NextTokenHead, Rollout

__all__ = ["EnumeratedCompletions", "cosine_and_norm_ratio", "flat_gradient"]


@final
class EnumeratedCompletions:
    """Every completion of length T, with π's and π_ref's distributions at each position.

    Args:
        logits: π's logits predicting each token of each completion (with gradient
            to the parameters under study).
        ref_logits: π_ref's logits, likewise (treated as constants).
        tokens: the completions, all of them: for a vocabulary of V and length T,
            the V^T rows of ``torch.cartesian_prod``.

    Raises:
        ValueError: shapes that do not fit, or probabilities that do not sum to 1
            (not every completion is listed).
    """

    def __init__(
        self,
        logits: Float[Tensor, "N T V"],
        ref_logits: Float[Tensor, "N T V"],
        tokens: Int[Tensor, "N T"],
    ) -> None:
        if logits.shape != ref_logits.shape or logits.shape[:2] != tokens.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)}, ref_logits {tuple(ref_logits.shape)} and "
                f"tokens {tuple(tokens.shape)} must be [N, T, V], [N, T, V] and [N, T]"
            )
        self.logits, self.ref_logits, self.tokens = logits, ref_logits.detach(), tokens
        log_p = torch.log_softmax(logits, -1)
        self.logprobs = log_p.gather(-1, tokens[..., None]).squeeze(-1)
        ref = torch.log_softmax(self.ref_logits, -1)
        self.ref_logprobs = ref.gather(-1, tokens[..., None]).squeeze(-1)
        self.weight = self.logprobs.sum(-1).exp()  # π(y), differentiable
        self.mask = torch.ones_like(tokens, dtype=torch.bool)
        total = float(self.weight.detach().sum())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"the completions' probabilities sum to {total}, not 1: enumerate all of them"
            )

    @classmethod
    def categorical(cls, logits: Float[Tensor, " V"], ref_logits: Float[Tensor, " V"]):
        """One-token completions of a single categorical distribution."""
        vocab = logits.shape[-1]
        tokens = torch.arange(vocab, device=logits.device)[:, None]
        return cls(logits.expand(vocab, 1, vocab), ref_logits.expand(vocab, 1, vocab), tokens)

    def true_kl(self) -> Float[Tensor, ""]:
        """KL(π‖π_ref) of whole completions, differentiable through π(y) too."""
        return (self.weight * (self.logprobs - self.ref_logprobs).sum(-1)).sum()

    def local_kl(self) -> Float[Tensor, ""]:
        """Σ_t E[KL_t] with the states' probabilities held fixed: the token-local part."""
        kl = KF.kl_exact(self.logits, self.ref_logits)
        return (self.weight.detach() * kl.sum(-1)).sum()

    def penalty_objective(self, penalty: KLPenalty) -> Float[Tensor, ""]:
        """The expectation over completions of what the loop minimises for ``penalty``
        (β = 1, task score 0, no baseline, on-policy); its gradient is the penalty's
        expected gradient."""
        weight = self.weight.detach()
        total = torch.zeros((), dtype=self.logits.dtype, device=self.logits.device)
        if penalty.exact:
            kl_tokens = KF.kl_exact(self.logits.detach(), self.ref_logits)
        else:
            kl_tokens = penalty.reward_kl(self.logprobs, self.ref_logprobs)
        if penalty.in_reward:
            scores = torch.zeros(len(self.tokens), dtype=self.logits.dtype)
            rewards = KF.shaped_rewards(scores, kl_tokens, self.mask, beta=1.0)
            returns = KF.reward_to_go(rewards, self.mask)
            surrogate = KF.clipped_surrogate_loss(self.logprobs, self.logprobs.detach(), returns)
            total = total + (weight * surrogate.sum(-1)).sum()
        if penalty.in_loss:
            if penalty.exact:
                head, ref_head = NextTokenHead(self.logits), NextTokenHead(self.ref_logits)
                term = penalty.exact_kl(head, ref_head, temperature=1.0)
            else:
                term = penalty.loss_kl(self.logprobs, self.ref_logprobs, self.logprobs.detach())
            total = total + (weight * term.sum(-1)).sum()
        return total


def flat_gradient(loss: Tensor, params: list[Tensor]) -> Float[Tensor, " P"]:
    """The gradient of ``loss`` with respect to ``params``, flattened into one vector
    (zeros for parameters it does not reach); the graph is kept for more calls."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def cosine_and_norm_ratio(got: Tensor, truth: Tensor) -> tuple[float, float]:
    """Cosine between two gradients and the ratio of their norms, ``|got| / |truth|``."""
    cosine = float(torch.nn.functional.cosine_similarity(got, truth, dim=0))
    return cosine, float(got.norm() / truth.norm())


# ── worked set-ups: the ones the tests and examples/kl_estimators.py use ──────


def perturbed_sequences(
    epsilon: float, length: int = 3, vocab: int = 5, noise_seed: int = 1
) -> tuple[EnumeratedCompletions, list[Tensor]]:
    """All ``vocab**length`` completions of a tiny float64 Llama whose weights are a
    reference's plus Gaussian noise of size ``epsilon``: where a token also changes
    the KL of the tokens after it. Returns the table and the policy's parameters.

    Llama's RMSNorm computes in float32 even in a float64 model, so gradients
    through it carry float32 rounding (~1e-7 relative).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def model() -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=length + 1,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaForCausalLM(config).double().eval()

    reference, policy = model(), model()
    noise = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(epsilon * torch.randn(param.shape, generator=noise, dtype=param.dtype))
    tokens = torch.cartesian_prod(*[torch.arange(vocab)] * length).reshape(-1, length)
    ids = torch.cat([torch.zeros(len(tokens), 1, dtype=torch.long), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits
    table = EnumeratedCompletions(policy(input_ids=ids).logits, ref_logits, tokens)
    return table, list(policy.parameters())


def exact_kl_per_completion(policy: Policy, reference: HeadReference, rollout: Rollout) -> float:
    """The exact KL(π‖π_ref) summed over the vocabulary at every response position,
    per completion, on ``rollout``'s completions (no gradient)."""
    with torch.no_grad():
        head, ref = policy.next_token_head(rollout), reference.next_token_head(rollout)
        kl = KF.kl_exact_from_hidden(
            head.hidden,
            head.weight,
            ref.hidden,
            ref.weight,
            rollout.temperature,
            bias=head.bias,
            ref_bias=ref.bias,
        )
        return float(KF.masked_sum(kl, rollout.response_mask) / len(rollout))


def pull_back(
    penalty: KLPenalty, iterations: int = 40, *, lr: float = 3e-3, noise: float = 0.05
) -> list[float]:
    """Does ``penalty`` alone pull a policy back to its reference, through the whole loop?

    A tiny random Llama policy is moved away from its frozen reference by Gaussian
    noise on every weight, the task reward is 0 for every completion (the penalty is
    the only signal), and ``ppo_iteration`` runs with β = 1 (Adam, ``lr``). Returns
    the exact KL per completion on a fixed sample of 32 of the policy's completions,
    before and after each iteration. A sound penalty lowers it; in this set-up each
    placement's default halves it within 40 iterations and k3 in the reward lets it
    grow (``tests/test_kl_pullback.py``).
    """
    prompts = ["The movie", "A film about", "I think", "Acting"]
    model, tokenizer = tiny_random_model("llama", seed=0)
    policy = Policy(model, tokenizer)
    reference = FrozenReference(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(noise * torch.randn(param.shape, generator=generator))
    blocks = Blocks(
        policy=policy,
        reference=reference,
        reward_fn=lambda prompts, completions: [0.0] * len(completions),
        objective=PPOObjective(kl=penalty),
        optimizer=torch.optim.Adam(policy.parameters(), lr=lr),
    )
    state = LoopState(controller=FixedKLController(beta=1.0), baseline=MeanBaseline())
    sampling = Sampling(max_new_tokens=8, completions_per_prompt=4)
    updates = Updates(minibatch_size=8)
    generator = torch.Generator().manual_seed(0)

    def measure() -> float:
        sample = policy.rollout(
            prompts,
            max_new_tokens=8,
            completions_per_prompt=8,
            generator=torch.Generator().manual_seed(123),
        )
        return exact_kl_per_completion(policy, reference, sample)

    kls = [measure()]
    for _ in range(iterations):
        state, _, _ = ppo_iteration(prompts, blocks, state, sampling, updates, generator)
        kls.append(measure())
    return kls

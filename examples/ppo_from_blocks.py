"""PPO with a KL penalty to a frozen reference, every stage in the open, in one file.

Read it top to bottom, as CleanRL's ppo.py: kltune's blocks (a Policy that samples
and scores, a FrozenReference, a reward function, a KL controller) and its
functional core (kltune.functional) are wired by hand, and the clipped PPO loss is
written out. kltune.loop.ppo_iteration is the same algorithm packaged, one named
function per stage, with the extras left out here: skipping non-finite steps,
gradient accumulation, value heads, other baselines and KL placements, data-parallel
runs; kltune.train adds run folders, samples and resuming.

    python examples/ppo_from_blocks.py --iterations 20 --out runs/ppo_from_blocks
    python examples/ppo_from_blocks.py --smoke --out runs/smoke/ppo_from_blocks

Prints one line per iteration and writes the metrics to OUT/metrics.jsonl.
"""

import argparse
import json
import math
from pathlib import Path

import torch

import kltune
import kltune.functional as KF


def lowercase_fraction(prompts: list[str], completions: list[str]) -> list[float]:
    """The smoke run's reward: a random model writes bytes, not words, so VADER would
    score every completion 0 and leave nothing to learn. Any such function is a reward."""
    return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, seconds")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/ppo_from_blocks"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate")
    parser.add_argument("--prompts-per-iteration", type=int, default=8)
    parser.add_argument("--completions-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1, help="PPO passes over each batch")
    parser.add_argument("--minibatch-size", type=int, default=4, help="completions per step")
    parser.add_argument("--clip-eps", type=float, default=0.2, help="PPO's ratio clip ε")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.1, help="initial KL coefficient β")
    parser.add_argument("--target-kl", type=float, default=6.0, help="nats per completion")
    args = parser.parse_args(argv)
    if (args.prompts_per_iteration * args.completions_per_prompt) % args.minibatch_size:
        parser.error("--minibatch-size must divide prompts-per-iteration × completions-per-prompt")
    if args.smoke:  # a tiny random model and short completions: seconds on one CPU thread
        args.iterations, args.max_new_tokens, args.prompts_per_iteration = 3, 6, 4
        args.lr = 1e-2  # a random model moves visibly in three iterations
    return args


def main(argv: list[str] | None = None) -> kltune.Policy:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # a process-wide setting: the script's to make
    generator = torch.Generator().manual_seed(args.seed)  # prompts, sampling, minibatches

    # ── blocks ──────────────────────────────────────────────────────────────
    if args.smoke:
        model, tokenizer = kltune.tiny_random_model("llama", seed=args.seed)
    else:
        model, tokenizer = kltune.load_model("embedded")  # SmolLM2-135M, offline
    policy = kltune.Policy(model, tokenizer)  # the trainable LM: rollout() and score()
    reference = kltune.FrozenReference(policy)  # π_ref: a frozen copy of the start
    reward_fn = lowercase_fraction if args.smoke else kltune.VaderSentiment()  # VADER: [-1, 1]
    controller = kltune.AdaptiveKLController(beta=args.beta, target=args.target_kl)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr, eps=1e-5)
    prompts = kltune.movie_review_prompts()

    args.out.mkdir(parents=True, exist_ok=True)
    metrics_file = args.out / "metrics.jsonl"
    metrics_file.write_text("")  # a fresh run: one line per iteration is appended below
    for iteration in range(1, args.iterations + 1):
        beta = controller.beta  # fixed for the whole iteration; updated at its end

        # 1. Rollout: sample completions; log π_old of each token comes with them.
        pick = torch.randperm(len(prompts), generator=generator)[: args.prompts_per_iteration]
        with torch.no_grad():
            rollout = policy.rollout(
                [prompts[i] for i in pick.tolist()],
                max_new_tokens=args.max_new_tokens,
                completions_per_prompt=args.completions_per_prompt,
                generator=generator,
            )
            # 2. Reference: log π_ref of the same tokens.
            ref_logprobs = reference.logprobs(rollout)
        mask = rollout.response_mask  # True on real response tokens (EOS included)

        # 3. Reward: one score per completion, checked (finite, one per row).
        scores = kltune.score_completions(reward_fn, rollout.prompts, rollout.completions)
        scores = scores.to(mask.device)

        # 4. KL per token (k1 = log π_old − log π_ref) and the shaped rewards:
        #    −β·kl on every token, plus the score on the last real one.
        kl = KF.kl_k1(rollout.old_logprobs, ref_logprobs)
        rewards = KF.shaped_rewards(scores, kl, mask, beta)

        # 5. Advantages: return-to-go minus a baseline, the batch mean of the
        #    completions' returns (kltune.MeanBaseline); then whitened over real tokens.
        returns = KF.reward_to_go(rewards, mask)
        advantages = (returns - returns[:, 0].mean()).masked_fill(~mask, 0.0)
        advantages = KF.masked_whiten(advantages, mask)

        # 6. PPO epochs over shuffled minibatches of the batch.
        losses, clipfracs = [], []
        for _ in range(args.epochs):
            order = torch.randperm(len(rollout), generator=generator)
            for start in range(0, len(rollout), args.minibatch_size):
                rows = order[start : start + args.minibatch_size]
                minibatch = rollout.select(rows)
                mb_mask, mb_advantages = minibatch.response_mask, advantages[rows]
                logprobs = policy.score(minibatch).logprobs  # log π now, with gradient
                ratio = torch.exp(logprobs - minibatch.old_logprobs)
                clipped = torch.clamp(ratio, 1.0 - args.clip_eps, 1.0 + args.clip_eps)
                pg_losses = torch.maximum(-mb_advantages * ratio, -mb_advantages * clipped)
                loss = KF.masked_mean(pg_losses, mb_mask)  # mean over real tokens

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
                outside = KF.clip_fraction(logprobs, minibatch.old_logprobs, mb_mask, args.clip_eps)
                clipfracs.append(float(outside))  # share of tokens whose ratio was clipped

        # 7. β's update from the observed KL per completion (summed over its tokens).
        kl_per_completion = KF.masked_sum(kl, mask, dim=1)
        kl_mean = float(kl_per_completion.mean())
        controller = controller.update(observed_kl=kl_mean, n_samples=len(rollout))

        metrics = {
            "iteration": iteration,
            "reward/score_mean": float(scores.mean()),
            "kl/mean": kl_mean,
            "kl/beta": beta,
            "policy/loss": sum(losses) / len(losses),
            "policy/clipfrac": sum(clipfracs) / len(clipfracs),
            "completion/length_mean": float(rollout.lengths.float().mean()),
        }
        # The loss stays near 0 (whitened advantages have mean 0, the ratio starts at 1):
        # its gradient, not its value, moves the policy.
        with metrics_file.open("a") as log:
            log.write(json.dumps(metrics) + "\n")
        print(
            f"iteration {iteration:3d}  reward {metrics['reward/score_mean']:+.3f}  "
            f"KL {kl_mean:7.3f}  beta {beta:.4f}  loss {metrics['policy/loss']:+.4f}"
        )
        if not all(math.isfinite(v) for v in metrics.values()):
            raise RuntimeError(f"non-finite metrics at iteration {iteration}: {metrics}")
    return policy


if __name__ == "__main__":
    main()

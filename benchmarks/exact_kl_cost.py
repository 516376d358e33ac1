"""What the exact KL penalty costs per PPO iteration on the embedded model, next to k1.

    python benchmarks/exact_kl_cost.py --out results/performance/exact_kl.md

Runs ``ppo_iteration`` on SmolLM2-135M (16 completions × 32 tokens, 2 threads) with
the default penalty (k1 in the reward) and with the exact KL in the reward and the
loss, alternating between them, and reports the median seconds per iteration and the
process's peak RSS. The exact KL adds one policy forward without gradient (the
behaviour policy's next-token distributions, for the reward and the logged KL) and,
in each minibatch, both output layers again over the response positions, in chunks:
no [B, T, V] tensor of either model is kept. Run it on an otherwise idle machine.
"""

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

import kltune
from kltune.loop import ppo_iteration

PENALTIES = {
    "k1 in the reward (default)": lambda: kltune.KLPenalty(),
    "exact KL in reward and loss": lambda: kltune.KLPenalty(placement="reward+loss"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/performance/exact_kl.md"))
    parser.add_argument("--rounds", type=int, default=3, help="timed iterations per penalty")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = (lambda: kltune.tiny_random_model("llama")) if args.smoke else kltune.load_model
    model, tokenizer = load()
    policy = kltune.Policy(model, tokenizer)
    reference = kltune.FrozenReference(policy)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-5, eps=1e-5)
    prompts = kltune.movie_review_prompts()[:8]
    sampling = kltune.Sampling(max_new_tokens=32, completions_per_prompt=2)
    updates = kltune.Updates(minibatch_size=8)
    runs = {}
    for name, make in PENALTIES.items():
        blocks = kltune.Blocks(
            policy=policy,
            reference=reference,
            reward_fn=kltune.VaderSentiment(),
            objective=kltune.PPOObjective(kl=make()),
            optimizer=optimizer,
        )
        state = kltune.LoopState(
            controller=kltune.FixedKLController(beta=0.1), baseline=kltune.MeanBaseline()
        )
        runs[name] = [blocks, state, []]
    generator = torch.Generator().manual_seed(0)
    for round_ in range(args.rounds + 1):  # the first round warms up and is not timed
        for run in runs.values():
            blocks, state, times = run
            start = time.perf_counter()
            run[1], _, _ = ppo_iteration(prompts, blocks, state, sampling, updates, generator)
            if round_ > 0:
                times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = statistics.median(runs["k1 in the reward (default)"][2])
    lines = [
        "# The exact KL penalty's cost per iteration",
        "",
        f"`python benchmarks/exact_kl_cost.py` ({'tiny random model' if args.smoke else 'embedded SmolLM2-135M'}, "
        f"16 completions × 32 tokens, 2 minibatches of 8, {args.threads} threads, "
        f"{args.rounds} timed iterations each after one warm-up, alternating).",
        "",
        "| penalty | median s / iteration | min–max | ratio to k1 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, (_, _, times) in runs.items():
        median = statistics.median(times)
        lines.append(
            f"| {name} | {median:.2f} | {min(times):.2f}–{max(times):.2f} | {median / base:.2f} |"
        )
    lines += ["", f"Peak RSS of the process (both set-ups share the models): {peak_mb:.0f} MB."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

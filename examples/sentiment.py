"""PPO toward positive sentiment under an adaptive KL penalty.

The embedded SmolLM2-135M-Instruct continues openings of movie reviews; VADER
scores each completion in [-1, 1]; the adaptive controller (Ziegler et al.
2019) moves beta to hold the KL to the reference near its target. Writes
metrics, a plot, a summary table and a before/after table of completions.

    python examples/sentiment.py --iterations 20 --out runs/sentiment
    python examples/sentiment.py --smoke --out runs/smoke/sentiment
"""

import torch
from experiment import Arm, parse_args, run_arm

import kltune
from kltune.plots import plot_runs, summary_table

args = parse_args(__doc__, iterations=20, out="runs/sentiment")
TARGET = 6.0  # nats per completion (Ziegler et al.'s sentiment target)
arm = Arm(
    name="adaptive KL",
    controller=lambda: kltune.AdaptiveKLController(beta=0.1, target=TARGET),
)
runs = [run_arm(arm, args, seed) for seed in args.seeds]

# Plot and table of reward, KL, beta, entropy and diversity per iteration.
folders = [folder for folder, _ in runs]
plot = plot_runs({arm.name: [f / "metrics.jsonl" for f in folders]}, args.out / "sentiment.png")
table = summary_table({arm.name: [f / "metrics.jsonl" for f in folders]}, last_k=5)
first = kltune.plots.read_metrics(folders[0] / "metrics.jsonl")
final_kl = first[-1]["kl/mean"]
second_half = first[len(first) // 2 :]
mean_error = sum(r["kl/mean"] - TARGET for r in second_half) / len(second_half)
lines = [
    "# Sentiment with an adaptive KL penalty",
    "",
    f"reward (VADER compound, mean over the batch): iteration 1 = "
    f"{first[0]['reward/score_mean']:.3f}, last = {first[-1]['reward/score_mean']:.3f}; "
    f"KL to reference at the end = {final_kl:.2f} nats per completion against a target of "
    f"{TARGET:g} ({'within' if abs(final_kl - TARGET) <= 0.5 * TARGET else 'outside'} ±50 %); "
    f"mean tracking error (KL − target) over the second half = {mean_error:+.2f} nats.",
    "",
    "Averages over the last 5 iterations:",
    "",
    table,
]

# Before/after: the same prompts, the same sampling seed, reference vs trained policy.
_, blocks = runs[0]
if blocks is not None:
    prompts = kltune.movie_review_prompts()[:6]
    before_policy = kltune.Policy(blocks.reference.model, blocks.policy.tokenizer)
    rows = ["", "| prompt | before (reference) | after (trained) |", "| --- | --- | --- |"]
    samples = {}
    for label, policy in (("before", before_policy), ("after", blocks.policy)):
        generator = torch.Generator().manual_seed(1234)
        rollout = policy.rollout(prompts, max_new_tokens=arm.max_new_tokens, generator=generator)
        samples[label] = rollout.completions
    for prompt, b, a in zip(prompts, samples["before"], samples["after"], strict=True):
        clean = [t.replace("|", "/").replace("\n", " ") for t in (prompt, b, a)]
        rows.append(f"| {clean[0]} | {clean[1]} | {clean[2]} |")
    lines += rows
report = args.out / "summary.md"
report.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {plot} and {report}")

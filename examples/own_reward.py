"""Your own reward in five minutes: a plain function, ten iterations, and how to read them.

The reward is a function of (prompts, completions) returning one number per
completion. This one counts warm words; PPO under a KL penalty to the reference
raises it within about ten CPU iterations on the embedded SmolLM2-135M.

    python examples/own_reward.py --out runs/own_reward
    python examples/own_reward.py --smoke --out runs/smoke/own_reward
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

import kltune
from kltune.plots import plot_runs, read_metrics

WARM = {"good", "great", "love", "loved", "best", "wonderful", "amazing", "beautiful", "fun"}


def warm_words(prompts: list[str], completions: list[str]) -> list[float]:
    """The number of warm words in each completion, capped at 3."""
    return [
        min(3.0, sum(word.strip(".,!?;:'\"").lower() in WARM for word in text.split()))
        for text in completions
    ]


parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--smoke", action="store_true", help="a tiny random model, seconds")
parser.add_argument("--out", type=Path, default=Path("runs/own_reward"))
parser.add_argument("--iterations", type=int, default=10)
args = parser.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)

model, tokenizer = kltune.tiny_random_model() if args.smoke else kltune.load_model("embedded")
policy = kltune.Policy(model, tokenizer)
blocks = kltune.Blocks(
    policy=policy,
    reference=kltune.FrozenReference(policy),
    reward_fn=warm_words,
    objective=kltune.PPOObjective(),  # k1 in the reward: the KL penalty's default
    optimizer=torch.optim.Adam(policy.parameters(), lr=1e-4, eps=1e-5),
)
state = kltune.LoopState(
    controller=kltune.AdaptiveKLController(beta=0.1, target=6.0),
    baseline=kltune.MeanBaseline(),
)
iterations = 2 if args.smoke else args.iterations
run = args.out / "run"
if (run / "metrics.jsonl").is_file() and len(read_metrics(run / "metrics.jsonl")) >= iterations:
    print(f"{run} is complete; redrawing")  # a finished run is not repeated
else:
    shutil.rmtree(run, ignore_errors=True)  # an unfinished one starts over
    kltune.train(
        kltune.movie_review_prompts(),
        kltune.accel.prepare(blocks),
        state,
        iterations=iterations,
        out_dir=run,
        prompts_per_iteration=8,
        sampling=kltune.Sampling(max_new_tokens=6 if args.smoke else 24, completions_per_prompt=2),
        updates=kltune.Updates(minibatch_size=4),
        sample_every=1,
    )
records = read_metrics(args.out / "run" / "metrics.jsonl")
last = records[-3:]
mean = {k: sum(r[k] for r in last) / len(last) for k in ("reward/score_mean", "kl/mean")}
summary = {
    "iterations": len(records),
    "reward_first4": sum(r["reward/score_mean"] for r in records[:4]) / len(records[:4]),
    "reward_last3": mean["reward/score_mean"],
    "kl_last3": mean["kl/mean"],
    "beta_last": records[-1]["kl/beta"],
    "distinct_2_last": records[-1]["diversity/distinct_2"],
    "training_minutes": sum(r.get("time/iteration_seconds", 0.0) for r in records) / 60,
    "seconds_per_iteration": sum(r.get("time/iteration_seconds", 0.0) for r in records)
    / len(records),
}
(args.out / "summary.json").write_text(json.dumps(summary, indent=2))
plot_runs(
    {"warm words": [args.out / "run" / "metrics.jsonl"]},
    args.out / "own_reward.png",
    keys=["reward/score_mean", "kl/mean", "kl/beta", "diversity/distinct_2"],
    title="Your own reward: warm words",
)
print(json.dumps(summary, indent=2))

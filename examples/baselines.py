"""Does a learned V(prompt) speed up learning or reduce variance? Five baselines compared.

A design where the question can have an answer: a pool of 8 prompts, 4 drawn
per iteration with 4 completions each (16 completions of exactly 32 tokens), so
every prompt recurs about every other iteration and has several completions to
compare. All arms share the model, reward (VADER), KL penalty (k1 in the reward,
fixed beta 0.1), optimiser and seeds; only the baseline changes:

- mean: the batch mean of the returns;
- learned V(prompt): a small embedding network fitted online to the returns;
- leave-one-out: the mean return of the prompt's other 3 completions (RLOO);
- GRPO: the prompt's mean and std (scores standardised per prompt);
- value head + GAE: PPO's token-level critic on the policy's last hidden state.

The floor, an oracle V(prompt) = E[return | prompt] of the current policy, is
measured in every run without extra samples: ``advantage/oracle_floor`` is the
pooled within-prompt variance of the returns, an unbiased estimate of what the
oracle's advantages would have (kltune.functional.within_group_var). Reported:
the per-completion advantage variance against that floor, the gradient-norm
variance (between the minibatches of an iteration, and over iterations), the
reward per iteration and per second of wall time, and the iterations and minutes
each baseline takes to reach a reward level.

    python examples/baselines.py --iterations 60 --seeds 0 1 2 --out runs/baselines
    python examples/baselines.py --smoke --out runs/smoke/baselines
"""

import dataclasses
import itertools
import statistics

from experiment import Arm, describe_run, finished, parse_args, run_arm, selected

import kltune
from kltune.plots import plot_runs, read_metrics, summary_table

args = parse_args(__doc__, iterations=60, seeds=[0, 1, 2], out="runs/baselines")
LEVELS = (0.5, 0.7)  # reward levels to reach (5-iteration moving average)

common = Arm(
    name="",
    controller=lambda: kltune.FixedKLController(beta=0.1),
    prompt_pool=8,
    prompts_per_iteration=4,
    completions_per_prompt=4,
    max_new_tokens=32,
    stop_at_eos=False,
)
arms = [
    dataclasses.replace(common, name=name, baseline=kind)
    for name, kind in [
        ("mean", "mean"),
        ("learned V(prompt)", "prompt_value"),
        ("leave-one-out", "rloo"),
        ("GRPO", "grpo"),
        ("value head + GAE", "gae"),
    ]
]
if not args.report:
    for arm in selected(arms, args):
        for seed in args.seeds:
            run_arm(arm, args, seed)
runs = {arm.name: finished(arm, args) for arm in arms}
runs = {name: folders for name, folders in runs.items() if folders}
metrics = {name: [f / "metrics.jsonl" for f in folders] for name, folders in runs.items()}

plot = plot_runs(
    metrics,
    args.out / "baselines.png",
    keys=[
        "reward/score_mean",
        "advantage/sequence_var",
        "advantage/oracle_floor",
        "policy/grad_norm",
        "policy/grad_norm_var",
        "kl/mean",
    ],
    title="Baselines compared (8 prompts, 4 × 4 completions per iteration)",
)


def moving_average(values: list[float], width: int = 5) -> list[float]:
    return [statistics.mean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def reach(records: list[dict], level: float) -> tuple[int, float] | None:
    """The first iteration (and wall minutes by then) whose moving-average reward >= level."""
    rewards = moving_average([r["reward/score_mean"] for r in records])
    seconds = list(itertools.accumulate(r.get("time/iteration_seconds", 0.0) for r in records))
    for i, reward in enumerate(rewards):
        if reward >= level:
            return i + 1, seconds[i] / 60
    return None


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


rows = [
    "| baseline | seeds | advantage var / floor (all iterations) | grad-norm var within "
    "an iteration | grad-norm var over iterations | "
    + " | ".join(f"iterations to {level} | minutes to {level}" for level in LEVELS)
    + " |",
    "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in LEVELS) + " |",
]
for name, files in metrics.items():
    ratio, within, over, reached = [], [], [], {level: ([], []) for level in LEVELS}
    for path in files:
        records = read_metrics(path)
        if name != "GRPO":  # GRPO divides by each prompt's std: other units
            ratio.append(
                statistics.mean(r["advantage/sequence_var"] for r in records)
                / statistics.mean(r["advantage/oracle_floor"] for r in records)
            )
        within.append(statistics.mean(r.get("policy/grad_norm_var", 0.0) for r in records))
        over.append(statistics.variance(r["policy/grad_norm"] for r in records))
        for level in LEVELS:
            hit = reach(records, level)
            if hit is not None:
                reached[level][0].append(hit[0])
                reached[level][1].append(hit[1])
    reach_cells = []
    for level in LEVELS:
        its, minutes = reached[level]
        missed = len(files) - len(its)
        note = f" ({missed} of {len(files)} never)" if missed else ""
        reach_cells += [cell(its) + note, cell(minutes)]
    rows.append(
        f"| {name} | {len(files)} | {cell(ratio)} | {cell(within)} | {cell(over)} | "
        + " | ".join(reach_cells)
        + " |"
    )
lines = [
    "# Baselines compared",
    "",
    f"{args.iterations} iterations, the finished seeds of each arm (the tables' seed "
    "column); 8 prompts, 4 per iteration × 4 "
    "completions of 32 tokens; fixed beta 0.1. Averages of the last 10 iterations, "
    "mean ± std over seeds:",
    "",
    summary_table(
        metrics,
        keys=[
            "reward/score_mean",
            "advantage/sequence_var",
            "advantage/oracle_floor",
            "policy/grad_norm",
            "kl/mean",
            "diversity/distinct_2",
            "time/iteration_seconds",
        ],
        last_k=10,
    ),
    "",
    "Advantage variance is per completion (the first token's advantage, before "
    "whitening); the floor is an oracle V(prompt)'s, estimated from each batch. "
    "Leave-one-out sits at G/(G−1) = 4/3 of the floor by construction; the batch "
    "mean at the floor plus the spread of the prompts' mean returns. GRPO's "
    "advantages are divided by each prompt's std, so its variance is in other units "
    "(no ratio).",
    "",
    *rows,
    "",
    *describe_run(runs),
]
(args.out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {plot}")

"""Baselines compared: batch mean, a learned V(prompt), and leave-one-out (RLOO).

All arms share the model, prompts, reward, KL penalty and seeds; only the
baseline that turns scores into advantages changes. Logged per iteration:
advantage variance, gradient norm, and reward; the summary adds the variance
of the gradient norm over iterations and the reward after N iterations.

    python examples/baselines.py --iterations 8 --seeds 0 1 2 --out runs/baselines
    python examples/baselines.py --smoke --out runs/smoke/baselines
"""

import statistics

from experiment import Arm, parse_args, run_arm, selected

import kltune
from kltune.plots import plot_runs, read_metrics, summary_table

args = parse_args(__doc__, iterations=8, seeds=[0, 1, 2], out="runs/baselines")


def fixed_kl() -> kltune.KLController:
    return kltune.FixedKLController(beta=0.05)


arms = [
    Arm(name="mean", baseline="mean", controller=fixed_kl),
    Arm(name="learned V(prompt)", baseline="prompt_value", controller=fixed_kl),
    Arm(
        name="leave-one-out",
        baseline="rloo",
        controller=fixed_kl,
        completions_per_prompt=4,
        prompts_per_iteration=4,
    ),
]
folders = {
    arm.name: [run_arm(arm, args, seed)[0] for seed in args.seeds] for arm in selected(arms, args)
}
metrics = {name: [f / "metrics.jsonl" for f in runs] for name, runs in folders.items()}
keys = ["reward/score_mean", "advantage/var", "policy/grad_norm", "kl/mean"]
plot = plot_runs(metrics, args.out / "baselines.png", keys=keys, title="Baselines compared")

rows = ["| arm | grad-norm variance over iterations (mean over seeds) |", "| --- | ---: |"]
for name, files in metrics.items():
    variances = []
    for path in files:
        norms = [r["policy/grad_norm"] for r in read_metrics(path) if "policy/grad_norm" in r]
        variances.append(statistics.pvariance(norms) if len(norms) > 1 else 0.0)
    rows.append(f"| {name} | {statistics.mean(variances):.4g} |")
lines = [
    "# Baselines compared",
    "",
    f"{args.iterations} iterations, seeds {args.seeds}. Averages over the last 5 iterations:",
    "",
    summary_table(metrics, keys=keys, last_k=5),
    "",
    "Advantages are computed before whitening; the variance shown is over all real tokens "
    "of the batch (before whitening).",
    "",
    *rows,
]
(args.out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {plot}")

"""Do the KL controllers hold their target? The adaptive and the constraint controller
on the sentiment task at the demo's settings, with the KL penalty's default (k1 in
the reward).

Reports, over the second half of each run, the mean KL, the mean tracking error
(KL − target), the fraction of iterations whose KL is within ±50 % of the target,
and β; plots KL and β against the target per iteration.

    python examples/controllers.py --iterations 48 --out runs/controllers
    python examples/controllers.py --placement reward+loss --out runs/controllers-exact
    python examples/controllers.py --smoke --out runs/smoke/controllers
"""

import statistics

from experiment import Arm, parse_args, run_arm, selected

import kltune
from kltune.plots import plot_runs, read_metrics

TARGET = 6.0  # nats per completion, as Ziegler et al. for sentiment

args = parse_args(__doc__, iterations=48, seeds=[0], out="runs/controllers")
arms = [
    Arm(name="adaptive", controller=lambda: kltune.AdaptiveKLController(beta=0.1, target=TARGET)),
    Arm(
        name="constraint",
        controller=lambda: kltune.ConstraintKLController(beta=0.1, target=TARGET, step_size=0.05),
    ),
]
folders = {
    arm.name: [run_arm(arm, args, seed)[0] for seed in args.seeds] for arm in selected(arms, args)
}
metrics = {name: [f / "metrics.jsonl" for f in runs] for name, runs in folders.items()}
plot = plot_runs(
    metrics,
    args.out / "controllers.png",
    keys=["kl/mean", "kl/beta", "reward/score_mean", "kl/tracking_error"],
    title=f"KL controllers, target {TARGET:g} nats",
)

lines = [
    f"# KL controllers against a target of {TARGET:g} nats per completion",
    "",
    f"{args.iterations} iterations, seeds {args.seeds}; second half = iterations "
    f"{args.iterations // 2 + 1}–{args.iterations}.",
    "",
    "| arm | seed | mean KL (2nd half) | mean KL − target | mean abs error | "
    "iterations within ±50 % | final β | final reward |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for name, runs in folders.items():
    for seed, run in zip(args.seeds, runs, strict=True):
        rows = read_metrics(run / "metrics.jsonl")
        half = rows[len(rows) // 2 :]
        kls = [r["kl/mean"] for r in half]
        inside = sum(abs(k - TARGET) <= 0.5 * TARGET for k in kls)
        lines.append(
            f"| {name} | {seed} | {statistics.mean(kls):.2f} | "
            f"{statistics.mean(kls) - TARGET:+.2f} | "
            f"{statistics.mean(abs(k - TARGET) for k in kls):.2f} | {inside}/{len(kls)} | "
            f"{rows[-1]['kl/beta']:.3f} | {rows[-1]['reward/score_mean']:.3f} |"
        )
report = args.out / "summary.md"
report.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {plot} and {report}")

"""Why the KL penalty matters: beta = 0 against a fixed, an adaptive and a constrained penalty.

Same model, prompts, reward and seeds in every arm. Without the penalty the
policy is free to drift to whatever string VADER likes best and its
completions collapse; with it they stay close to the reference, fluent and
diverse. Reports distinct-2, unique-completion ratio, KL and reward at the
end, with example completions from each arm.

The arms and their settings are in kl_arms.py (shared with frontier.py): 100
iterations of 16 completions of exactly 32 tokens, k1 in the reward, fixed beta
0.2, and both controllers at a 15-nat target.

    python examples/collapse.py --iterations 100 --seeds 0 1 2 --out runs/collapse
    python examples/collapse.py --smoke --out runs/smoke/collapse
"""

import json

from experiment import describe_run, final_samples, finished, load, parse_args, run_arm, selected
from kl_arms import COLLAPSE

import kltune
from kltune.fluency import reference_perplexity
from kltune.plots import plot_runs, summary_table

args = parse_args(__doc__, iterations=100, seeds=[0, 1, 2], out="runs/collapse")
arms = COLLAPSE
if not args.report:
    for arm in selected(arms, args):
        for seed in args.seeds:
            run_arm(arm, args, seed)
# the report covers every finished run of every arm, whichever call trained it
folders = {arm.name: runs for arm in arms if (runs := finished(arm, args))}
metrics = {name: [f / "metrics.jsonl" for f in runs] for name, runs in folders.items()}

plot = plot_runs(
    metrics,
    args.out / "collapse.png",
    keys=[
        "reward/score_mean",
        "kl/mean",
        "kl/beta",
        "policy/entropy",
        "diversity/distinct_2",
        "diversity/self_bleu",
    ],
    title="beta = 0 against a KL penalty",
)
keys = [
    "reward/score_mean",
    "kl/mean",
    "kl/beta",
    "policy/entropy",
    "diversity/distinct_1",
    "diversity/distinct_2",
    "diversity/unique_fraction",
    "diversity/self_bleu",
    "collapse/flag",
]
lines = [
    "# Collapse at beta = 0",
    "",
    f"{args.iterations} iterations of 16 completions of exactly 32 tokens (kl_arms.py); "
    "averages over the last 5 iterations (mean ± std over seeds):",
    "",
    summary_table(metrics, keys=keys, last_k=5),
    "",
    "## Each run at its last iteration",
    "",
    "| arm | seed | reward | KL (nats) | β | distinct-2 | self-BLEU | collapse flagged at |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for name, runs in folders.items():
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        end = rows[-1]
        flagged = next((int(r["iteration"]) for r in rows if r.get("collapse/flag") == 1), None)
        lines.append(
            f"| {name} | {run.name[4:]} | {end['reward/score_mean']:.3f} | {end['kl/mean']:.1f} "
            f"| {end['kl/beta']:.3g} | {end['diversity/distinct_2']:.3f} "
            f"| {end['diversity/self_bleu']:.2f} | {flagged or '–'} |"
        )
lines += ["", *describe_run(folders), "", "## Final completions (first seed of each arm)"]
for name, runs in folders.items():
    lines += ["", f"### {name}", ""]
    lines += [
        f"- {s['prompt']} **→** {s['completion']!r} ({s['score']:+.2f})"
        for s in final_samples(runs[0])
    ]
# Fluency as a number: the reference's per-token perplexity of the logged completions
# (8 per logged iteration), at iteration 1 (π_ref's own samples) and at the last.
model, tokenizer = load(args)
judge = kltune.Policy(model, tokenizer)
reference = kltune.FrozenReference(judge)


def perplexity(samples: list[dict]) -> float:
    prompts = [s["prompt"] for s in samples]
    return reference_perplexity(reference, judge, prompts, [s["completion"] for s in samples])


lines += [
    "",
    "## Fluency: the reference's perplexity of the completions (8 logged per run)",
    "",
    "| arm | seed | first iteration (π_ref's own) | last iteration |",
    "| --- | ---: | ---: | ---: |",
]
for name, runs in folders.items():
    for run in runs:
        first, last = final_samples(run, first=True), final_samples(run)
        lines.append(
            f"| {name} | {run.name[4:]} | {perplexity(first):.1f} | {perplexity(last):.1f} |"
        )
(args.out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {plot}")

"""The reward–KL frontier: what each nat of KL buys, for PPO and for best-of-n.

A sweep of fixed beta (0 to 1) and both KL controllers at three targets, each
run 100 iterations (the arms of kl_arms.py, shared with collapse.py: runs one
script finished are reused by the other). One point per arm: the final reward
against the final KL(π‖π_ref), seeds as error bars. The reference curve is
best-of-n sampling from π_ref: 64 completions of 32 tokens for each of the 50
prompts, scored once (cached in best_of_n.json), its expected reward for each n
computed exactly from them, at its closed-form KL log n − (n−1)/n.

    python examples/frontier.py --iterations 100 --seeds 0 --out runs/collapse
    python examples/frontier.py --arms "fixed beta=0.5" --seeds 0 1 --out runs/collapse
    python examples/frontier.py --report --out runs/collapse   # redraw only
    python examples/frontier.py --smoke --out runs/smoke/collapse
"""

import json
import time

import torch
from experiment import describe_run, finished, load, parse_args, run_arm, selected
from kl_arms import FRONTIER, TOKENS

import kltune
import kltune.functional as KF
from kltune.plots import plot_frontier, summary_table

args = parse_args(__doc__, iterations=100, seeds=[0], out="runs/collapse")
if not args.report:
    for arm in selected(FRONTIER, args):
        for seed in args.seeds:
            run_arm(arm, args, seed)


def best_of_n_scores(samples: int) -> dict:
    """Scores of ``samples`` reference completions per prompt (cached: sampling is slow)."""
    path = args.out / "best_of_n.json"
    tokens = 4 if args.smoke else TOKENS
    settings = {"samples": samples, "tokens": tokens, "model": args.model, "seed": 0}
    if path.is_file() and (cached := json.loads(path.read_text()))["settings"] == settings:
        return cached
    model, tokenizer = load(args)
    policy, reward = kltune.Policy(model, tokenizer), kltune.VaderSentiment()
    prompts = kltune.movie_review_prompts()[: 2 if args.smoke else None]
    generator, start, scores = torch.Generator().manual_seed(0), time.time(), []
    for prompt in prompts:
        rollout = policy.rollout(
            [prompt],
            max_new_tokens=tokens,
            completions_per_prompt=samples,
            generator=generator,
            stop_at_eos=False,
        )
        scores.append(reward(list(rollout.prompts), list(rollout.completions)).tolist())
    result = {
        "settings": settings,
        "prompts": prompts,
        "scores": scores,
        "wall_seconds": time.time() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


samples = 4 if args.smoke else 64
bon = best_of_n_scores(samples)
scores = torch.tensor(bon["scores"], dtype=torch.float64)
ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= samples]
best_of_n = {n: float(KF.expected_best_of_n(scores, n).mean()) for n in ns}

runs = {arm.name: finished(arm, args) for arm in FRONTIER}
metrics = {
    name: [f / "metrics.jsonl" for f in folders] for name, folders in runs.items() if folders
}
if not metrics:
    raise SystemExit(
        f"no finished run under {args.out} yet (best-of-n is cached in best_of_n.json)"
    )
plot = plot_frontier(
    metrics,
    args.out / "frontier.png",
    best_of_n=best_of_n,
    title="Reward against KL after training (VADER, SmolLM2-135M)",
)
lines = [
    "# The reward–KL frontier",
    "",
    f"Each arm: {args.iterations} iterations; averages of the last 5 iterations, mean ± std "
    "over seeds.",
    "",
    summary_table(
        metrics,
        keys=[
            "kl/mean",
            "reward/score_mean",
            "kl/beta",
            "diversity/distinct_2",
            "diversity/self_bleu",
            "collapse/flag",
        ],
        last_k=5,
    ),
    "",
    *describe_run(runs),
    "",
    f"## Best-of-n from π_ref ({samples} completions of {bon['settings']['tokens']} tokens "
    f"for each of {len(bon['prompts'])} prompts, {bon['wall_seconds'] / 60:.1f} min)",
    "",
    "| n | KL = log n − (n−1)/n (nats) | expected reward |",
    "| ---: | ---: | ---: |",
    *(f"| {n} | {KF.best_of_n_kl(n):.3f} | {best_of_n[n]:.3f} |" for n in ns),
]
(args.out / "frontier.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {plot}")

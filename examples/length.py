"""Another reward plugs in with one line: prefer completions of about 12 words.

The same loop as the sentiment example; only ``reward=`` changes.

    python examples/length.py --iterations 20 --out runs/length
    python examples/length.py --smoke --out runs/smoke/length
"""

from experiment import Arm, parse_args, run_arm

import kltune
from kltune.plots import plot_runs, summary_table

args = parse_args(__doc__, iterations=20, out="runs/length")
arm = Arm(name="length", reward=lambda: kltune.LengthReward(target_words=12), max_new_tokens=32)
folders = [run_arm(arm, args, seed)[0] for seed in args.seeds]
metrics = {arm.name: [f / "metrics.jsonl" for f in folders]}
keys = ["reward/score_mean", "completion/length_mean", "kl/mean", "diversity/distinct_2"]
plot = plot_runs(metrics, args.out / "length.png", keys=keys, title="Length reward")
print(summary_table(metrics, keys=keys, last_k=5))
print(f"wrote {plot}")

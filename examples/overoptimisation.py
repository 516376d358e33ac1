"""Reward over-optimisation: PPO, best-of-n and DPO against a learned reward model.

RLHF offline, with a hidden *gold* judge standing in for people:

1. π_ref (the embedded SmolLM2-135M) samples 32-token completions of the 50
   movie-review prompts: 64 each for prompts 0-7 (the prompts PPO and best-of-n
   optimise), 32 each for prompts 8-49 (the reward model's data).
2. The gold judge, VADER sentiment plus a repeated-bigram penalty
   (``weighted_sum(VaderSentiment(), RepetitionPenalty(n=2))``: people like
   warm text, not "great great great"), labels neighbouring samples of a prompt
   as pairs, with 10% of the labels flipped (labeller noise).
3. A Bradley–Terry reward model (the same backbone, a scalar head) is fitted on
   the pairs of prompts 8-39 and tested on prompts 40-49: accuracy against the
   noisy labels (ceiling 90%) and against the gold judge.
4. The proxy reward (the reward model, scaled to unit spread on π_ref's samples)
   is optimised three ways on prompts 0-7, which it never saw:
   best-of-n from the 64 held-back samples (n = 1..64, KL = log n − (n−1)/n);
   PPO at several fixed β (gold logged beside the proxy every iteration); DPO on
   the same training pairs (one point).
5. The report plots gold and proxy reward against √KL with Gao et al.'s curves
   fitted, R_bon(d) = d(α − βd) and R_RL(d) = d(α − β log d), and writes
   overoptimisation.md.

Every stage is cached in --out and skipped when done, so a later session adds
only what is missing.

    python examples/overoptimisation.py --out runs/overoptimisation --seeds 0 1 2
    python examples/overoptimisation.py --arms "reward model" --out runs/overoptimisation
    python examples/overoptimisation.py --arms "beta=0.05" DPO --seeds 0 --out runs/overoptimisation
    python examples/overoptimisation.py --report --out runs/overoptimisation
    python examples/overoptimisation.py --smoke --out runs/smoke/overoptimisation
"""

import argparse
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import peft
import torch
from experiment import Arm, finished, load, parse_args, run_arm

import kltune
import kltune.functional as KF
from kltune.plots import read_metrics
from kltune.preferences import (
    RewardModel,
    fit_dpo,
    fit_reward_model,
    judge_pairs,
    load_preferences,
    save_preferences,
)

# peft on transformers 5 calls a renamed attribute; the warning is not ours to fix
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
args = parse_args(__doc__, iterations=60, seeds=[0], out="runs/overoptimisation")
FLIP = 0.1  # labeller noise
TOKENS = 6 if args.smoke else 32
OPTIMISED = range(0, 1 if args.smoke else 8)  # prompts PPO, best-of-n and DPO are judged on
TRAIN = range(1, 3) if args.smoke else range(8, 40)  # the reward model's training prompts
HELD_OUT = range(3, 4) if args.smoke else range(40, 50)  # its test prompts
POOL, PER_PROMPT = (4, 4) if args.smoke else (64, 32)  # samples per optimised / other prompt
PROMPTS = kltune.movie_review_prompts()


def gold_judge() -> kltune.RewardFn:
    """The hidden judge: sentiment, minus the fraction of repeated word bigrams."""
    judge = kltune.weighted_sum(
        (kltune.VaderSentiment(), 1.0), (kltune.RepetitionPenalty(n=2), 1.0)
    )
    # a tiny random model writes bytes with no words: in smoke mode the judge also
    # counts distinct characters, so that it has preferences to label
    return kltune.weighted_sum((judge, 1.0), (distinct_characters, 0.01)) if args.smoke else judge


def distinct_characters(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(len(set(c))) for c in completions]


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


# --------------------------------------------------------------- 1. reference samples
def reference_samples() -> dict[str, list[str]]:
    """prompt → completions sampled from π_ref (cached in reference_samples.json)."""
    path = args.out / "reference_samples.json"
    if path.is_file():
        return json.loads(path.read_text())["samples"]
    model, tokenizer = load(args)
    policy, generator = kltune.Policy(model, tokenizer), torch.Generator().manual_seed(0)
    samples, start = {}, time.time()
    for index in [*OPTIMISED, *TRAIN, *HELD_OUT]:
        rollout = policy.rollout(
            [PROMPTS[index]],
            max_new_tokens=TOKENS,
            completions_per_prompt=POOL if index in OPTIMISED else PER_PROMPT,
            generator=generator,
            stop_at_eos=False,
        )
        samples[PROMPTS[index]] = list(rollout.completions)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"samples": samples, "tokens": TOKENS, "wall_seconds": time.time() - start})
    return samples


# --------------------------------------------------------------- 2. judged pairs
def judged(samples: dict[str, list[str]], prompts: range, name: str):
    """Neighbouring samples of each prompt (i, i+1 cyclically) labelled by the gold judge."""
    path = args.out / f"pairs_{name}.jsonl"
    flags_path = path.with_suffix(".flipped.json")
    if path.is_file() and flags_path.is_file():
        return load_preferences(path), json.loads(flags_path.read_text())
    texts = [(PROMPTS[i], samples[PROMPTS[i]]) for i in prompts]
    rows = [(p, c[j], c[(j + 1) % len(c)]) for p, c in texts for j in range(len(c))]
    pairs, flipped = judge_pairs(
        gold_judge(), *map(list, zip(*rows, strict=True)), flip_probability=FLIP, seed=len(name)
    )
    save_preferences(pairs, path)
    flags_path.write_text(json.dumps(flipped))
    return pairs, flipped


# --------------------------------------------------------------- 3. reward model
def reward_model(train, held_out) -> tuple[RewardModel, dict]:
    """The fitted reward model (cached in reward_model/) and its fit's summary.

    LoRA on the attention projections (rank 16) and the scalar head: the
    trained weights are a few MB, small enough to commit with the results, so
    that every PPO run of every session optimises the same reward model.
    """
    folder = args.out / "reward_model"
    model, tokenizer = load(args)
    lora = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    torch.manual_seed(0)  # the adapter's initialisation
    rm = RewardModel(peft.get_peft_model(model.base_model, lora), tokenizer, batch_size=16)
    if (folder / "summary.json").is_file():
        return rm.load(folder / "model"), json.loads((folder / "summary.json").read_text())
    if args.report:
        raise SystemExit(f"no fitted reward model in {folder} yet: run without --report")
    if folder.exists():  # an interrupted fit starts over
        for file in sorted(folder.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
    start = time.time()
    fit_reward_model(rm, train, eval_pairs=held_out, lr=2e-4, epochs=2, out_dir=folder)
    summary = {"wall_seconds": time.time() - start, "train_pairs": len(train)}
    write_json(folder / "summary.json", summary)
    return rm, summary


def accuracy_table(rm: RewardModel, sets: dict[str, tuple]) -> list[str]:
    lines = [
        "| pairs | count | accuracy vs the noisy labels | accuracy vs the gold judge |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, (pairs, flipped) in sets.items():
        if not pairs:
            continue
        chosen = rm([p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = rm([p.prompt for p in pairs], [p.rejected for p in pairs])
        right = (chosen > rejected).tolist()
        noisy = sum(right) / len(right)
        gold = sum(r != f for r, f in zip(right, flipped, strict=True)) / len(right)
        lines.append(f"| {name} | {len(pairs)} | {noisy:.3f} | {gold:.3f} |")
    lines.append(f"| ceiling | | {1 - FLIP:.3f} | 1.000 |")
    return lines


# --------------------------------------------------------------- 4a. best-of-n
def best_of_n(rm: RewardModel, samples, scale: float) -> dict[int, dict[str, float]]:
    prompts = [PROMPTS[i] for i in OPTIMISED]
    flat = [(p, c) for p in prompts for c in samples[p]]
    ps, cs = [p for p, _ in flat], [c for _, c in flat]
    proxy = (rm(ps, cs) / scale).double().reshape(len(prompts), POOL)
    gold = torch.as_tensor(gold_judge()(ps, cs)).double().reshape(len(prompts), POOL)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= POOL]
    return {
        n: {
            "kl": KF.best_of_n_kl(n),
            "proxy": float(KF.expected_best_of_n(proxy, n).mean()),
            "gold": float(KF.expected_best_of_n(proxy, n, values=gold).mean()),
        }
        for n in ns
    }


# --------------------------------------------------------------- 4b. PPO against the proxy
class ProxyWithGold:
    """The proxy is the reward; the gold judge's score of the same texts is logged."""

    def __init__(self, proxy: kltune.RewardFn, path: Path) -> None:
        self.proxy, self.gold, self.path = proxy, gold_judge(), path
        self.__name__ = "reward model"

    def __call__(self, prompts, completions):
        proxy = torch.as_tensor(self.proxy(prompts, completions))
        gold = torch.as_tensor(self.gold(prompts, completions))
        with self.path.open("a") as handle:
            handle.write(json.dumps({"proxy": proxy.mean().item(), "gold": gold.mean().item()}))
            handle.write("\n")
        return proxy


def ppo_arm(beta: float) -> Arm:
    return Arm(
        name=f"beta={beta:g}",
        controller=lambda: kltune.FixedKLController(beta=beta),
        prompt_pool=len(OPTIMISED),
        max_new_tokens=TOKENS,
        stop_at_eos=False,
    )


ARMS = [ppo_arm(beta) for beta in (0.0, 0.05, 0.2)]


PPO_ARGS = argparse.Namespace(**vars(args) | {"out": args.out / "ppo"})


STAGES = ["reward model", "DPO"]  # --arms may also name these: "reward model" fits only
if args.arms and set(args.arms) - set(STAGES) - {arm.name for arm in ARMS}:
    raise SystemExit(f"unknown --arms; choose from {STAGES + [arm.name for arm in ARMS]}")


def run_ppo(proxy: kltune.RewardFn) -> None:
    chosen = [arm for arm in ARMS if not args.arms or arm.name in args.arms]
    for arm in chosen:
        done = {folder.name for folder in finished(arm, PPO_ARGS)}
        for seed in args.seeds:
            out = PPO_ARGS.out / arm.name / f"seed{seed}"
            if f"seed{seed}" not in done:  # a new or interrupted run: its gold log restarts
                (out / "gold.jsonl").unlink(missing_ok=True)
                out.mkdir(parents=True, exist_ok=True)
            with_gold = dataclasses.replace(
                arm, reward=lambda out=out: ProxyWithGold(proxy, out / "gold.jsonl")
            )
            run_arm(with_gold, PPO_ARGS, seed)


def ppo_trajectories() -> dict[str, list[dict[str, list[float]]]]:
    """arm → per seed: √KL, proxy and gold of every iteration."""
    runs = {}
    for arm in ARMS:
        seeds = []
        for folder in finished(arm, PPO_ARGS):
            metrics = read_metrics(folder / "metrics.jsonl")
            gold = [json.loads(line) for line in (folder / "gold.jsonl").read_text().splitlines()]
            kl = [max(float(m["kl/mean"]), 0.0) for m in metrics]
            seeds.append(
                {
                    "sqrt_kl": [math.sqrt(k) for k in kl],
                    "proxy": [g["proxy"] for g in gold],
                    "gold": [g["gold"] for g in gold],
                }
            )
        if seeds:
            runs[arm.name] = seeds
    return runs


# --------------------------------------------------------------- 4c. DPO on the same pairs
def run_dpo(train, held_out, rm: RewardModel, scale: float) -> None:
    for seed in args.seeds:
        folder = args.out / "dpo" / f"seed{seed}"
        if (folder / "result.json").is_file():
            continue
        (folder / "metrics.jsonl").unlink(missing_ok=True)
        model, tokenizer = load(args)
        torch.manual_seed(seed)
        policy = kltune.Policy(model, tokenizer)
        reference = kltune.FrozenReference(policy)
        start = time.time()
        fit_dpo(policy, reference, train, beta=0.1, lr=1e-5, eval_pairs=held_out,
                seed=seed, out_dir=folder)  # fmt: skip
        result = evaluate_policy(policy, reference, rm, scale, seed) | {
            "seed": seed,
            "wall_seconds": time.time() - start,
        }
        write_json(folder / "result.json", result)


def evaluate_policy(policy, reference, rm, scale, seed) -> dict[str, float]:
    """KL to π_ref (sequence k1), proxy and gold of 16 samples per optimised prompt."""
    prompts = [PROMPTS[i] for i in OPTIMISED]
    rollout = policy.rollout(
        prompts,
        max_new_tokens=TOKENS,
        completions_per_prompt=4 if args.smoke else 16,
        generator=torch.Generator().manual_seed(seed),
        stop_at_eos=False,
    )
    with torch.no_grad():
        ref = reference.logprobs(rollout)
    kl = KF.masked_sum(rollout.old_logprobs - ref, rollout.response_mask, dim=-1).mean()
    ps, cs = list(rollout.prompts), list(rollout.completions)
    return {
        "kl": float(kl),
        "proxy": float((rm(ps, cs) / scale).mean()),
        "gold": float(torch.as_tensor(gold_judge()(ps, cs)).mean()),
        "samples": cs[:: 4 if args.smoke else 16],
    }


# --------------------------------------------------------------- 5. report
def fitted(points: list[tuple[float, float]], form: str, gold_at_ref: float) -> list[float] | None:
    """Gao et al.'s (α, β) for gold gains over π_ref at these (√KL, gold) points."""
    if len(points) < 2:
        return None
    d = torch.tensor([p[0] for p in points], dtype=torch.float64)
    gains = torch.tensor([p[1] - gold_at_ref for p in points], dtype=torch.float64)
    return KF.overoptimisation_coefficients(d, gains, form).tolist()


def peak(coefficients: list[float] | None, form: str) -> float | None:
    """√KL where the fitted curve peaks (None if it never turns down)."""
    if coefficients is None or coefficients[1] <= 0:
        return None
    alpha, beta = coefficients
    return alpha / (2 * beta) if form == "best_of_n" else math.exp(alpha / beta - 1)


def describe_peak(top: float | None, measured: float) -> str:
    """The fitted peak for the table: a peak far beyond the points is an extrapolation
    of a curve that has not turned down where it was measured, not a finding."""
    if top is None:
        return "never turns down"
    if top > 2 * measured:
        return f"no turn-down within 2× the measured √KL ({measured:.1f})"
    return f"{top:.2f}"


def mean_over_seeds(seeds: list[dict[str, list[float]]], key: str) -> list[float]:
    length = min(len(s[key]) for s in seeds)
    return [sum(s[key][i] for s in seeds) / len(seeds) for i in range(length)]


def report(bon, ppo, dpo, table) -> list[str]:
    gold_at_ref = bon[1]["gold"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    bon_d = [math.sqrt(v["kl"]) for v in bon.values()]
    lines = ["", "## Where the gold reward peaks", "",
             "| optimiser | fitted α | fitted β | √KL at the fitted peak | √KL at the best measured gold | best gold |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    curve_d = torch.linspace(0, max([*bon_d, 1.0]) * 1.05, 200, dtype=torch.float64)
    series = [("best-of-n", bon_d, [v["proxy"] for v in bon.values()],
               [v["gold"] for v in bon.values()], "best_of_n")]  # fmt: skip
    for name, seeds in ppo.items():
        d, proxy, gold = (mean_over_seeds(seeds, k) for k in ("sqrt_kl", "proxy", "gold"))
        series.append(
            (f"PPO {name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})", d, proxy, gold, "rl")
        )
        curve_d = torch.linspace(0, max([*d, float(curve_d[-1])]) * 1.05, 200, dtype=torch.float64)
    for label, d, proxy, gold, form in series:
        style = {"marker": "o"} if form == "best_of_n" else {"alpha": 0.8}
        (line,) = axes[0].plot(d, gold, label=label, **style)
        axes[1].plot(d, proxy, color=line.get_color(), label=label, **style)
        coefficients = fitted(list(zip(d, gold, strict=True)), form, gold_at_ref)
        if coefficients is not None:
            fit = KF.overoptimisation_curve(curve_d, torch.tensor(coefficients), form) + gold_at_ref
            axes[0].plot(curve_d, fit, "--", color=line.get_color(), linewidth=1)
        best = max(range(len(gold)), key=gold.__getitem__)
        lines.append(
            f"| {label} | {coefficients[0]:.3f} | {coefficients[1]:.3f} | "
            f"{describe_peak(peak(coefficients, form), max(d))} | {d[best]:.2f} | {gold[best]:.3f} |"
            if coefficients
            else f"| {label} | | | | {d[best]:.2f} | {gold[best]:.3f} |"
        )
    for result in dpo:
        d = math.sqrt(max(result["kl"], 0.0))
        axes[0].plot(
            [d], [result["gold"]], "k*", markersize=12, label="DPO" if result is dpo[0] else None
        )
        axes[1].plot([d], [result["proxy"]], "k*", markersize=12)
    for ax, what in zip(
        axes, ("gold reward (the judge)", "proxy reward (the reward model)"), strict=True
    ):
        ax.set_xlabel("√KL(π ‖ π_ref)  (√nats)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].axhline(gold_at_ref, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=8)
    figure.suptitle("Optimising a learned reward: the proxy keeps rising, does the gold?")
    figure.tight_layout()
    figure.savefig(args.out / "overoptimisation.png", dpi=110)
    plt.close(figure)
    dpo_lines = ["", "## DPO on the same pairs (β = 0.1)", "",
                 "| seed | KL (nats) | proxy | gold |", "| ---: | ---: | ---: | ---: |",
                 *(f"| {r['seed']} | {r['kl']:.2f} | {r['proxy']:.3f} | {r['gold']:.3f} |" for r in dpo)]  # fmt: skip
    bon_lines = ["", "## Best-of-n from π_ref, chosen by the proxy", "",
                 "| n | KL (nats) | proxy | gold |", "| ---: | ---: | ---: | ---: |",
                 *(f"| {n} | {v['kl']:.3f} | {v['proxy']:.3f} | {v['gold']:.3f} |" for n, v in bon.items())]  # fmt: skip
    return ["# Reward over-optimisation", "", "## The reward model", "", *table, *lines,
            *bon_lines, *dpo_lines]  # fmt: skip


samples = reference_samples()
train, train_flips = judged(samples, TRAIN, "train")
held_out, held_out_flips = judged(samples, HELD_OUT, "held_out")
optimised = judged(samples, OPTIMISED, "optimised")  # never trained on: a transfer test
rm, rm_summary = reward_model(train, held_out)
reference_texts = [(PROMPTS[i], c) for i in OPTIMISED for c in samples[PROMPTS[i]]]
scale = float(rm([p for p, _ in reference_texts], [c for _, c in reference_texts]).std()) or 1.0
proxy = kltune.weighted_sum((rm, 1.0 / scale))  # unit spread on π_ref's samples
if not args.report:
    run_ppo(proxy)
    if not args.arms or "DPO" in args.arms:
        run_dpo(train, held_out, rm, scale)
folders = sorted((args.out / "dpo").glob("seed*/result.json"))
dpo = [json.loads(f.read_text()) for f in folders]
table = accuracy_table(
    rm,
    {
        f"train (prompts {TRAIN.start}-{TRAIN.stop - 1})": (train, train_flips),
        f"held out (prompts {HELD_OUT.start}-{HELD_OUT.stop - 1})": (held_out, held_out_flips),
        f"the optimised prompts {OPTIMISED.start}-{OPTIMISED.stop - 1}": optimised,
    },
)
lines = report(best_of_n(rm, samples, scale), ppo_trajectories(), dpo, table)
lines += ["", f"Reward model fit: {rm_summary['wall_seconds'] / 60:.1f} min on "
          f"{rm_summary['train_pairs']} pairs; the proxy is its score divided by {scale:.3g}."]  # fmt: skip
(args.out / "overoptimisation.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {args.out / 'overoptimisation.png'}")

"""Shared set-up of the example experiments: one Arm = one configuration of the blocks.

Every example builds its runs from an :class:`Arm` (a few named settings) and
:func:`run_arm`, which assembles kltune's public blocks and calls ``kltune.train``.
Read :func:`build_blocks` to see a full PPO+KL set-up in one screen.
"""

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kltune


@dataclass(frozen=True)
class Arm:
    """One experimental configuration."""

    name: str
    controller: Callable[[], kltune.KLController] = lambda: kltune.AdaptiveKLController(
        beta=0.1, target=6.0
    )
    baseline: str = "mean"  # mean | ema | rloo | grpo | prompt_value | gae
    kl: Callable[[], kltune.KLPenalty] = kltune.KLPenalty  # k1 in the reward
    reward: Callable[[], kltune.RewardFn] = kltune.VaderSentiment
    lr: float = 1e-4
    epochs: int = 1
    minibatch_size: int = 4
    prompts_per_iteration: int = 8
    completions_per_prompt: int = 2
    prompt_pool: int = 50  # train on the first N of the 50 shipped prompts
    max_new_tokens: int = 20
    stop_at_eos: bool = True  # False: every completion has max_new_tokens tokens
    temperature: float = 1.0
    entropy_coef: float = 0.0
    extra: dict = field(default_factory=dict)


def parse_args(description: str, **defaults) -> argparse.Namespace:
    """The flags every example shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds")
    parser.add_argument("--model", default="embedded", help="'embedded', a hub id or a path")
    parser.add_argument("--iterations", type=int, default=defaults.get("iterations", 30))
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.get("seeds", [0]))
    parser.add_argument("--out", type=Path, default=Path(defaults.get("out", "runs/example")))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 per process)")
    parser.add_argument("--arms", nargs="+", help="run only these arms (names)")
    parser.add_argument(
        "--report", action="store_true", help="train nothing: redraw from the finished runs"
    )
    parser.add_argument("--lr", type=float, help="Adam's learning rate for every arm")
    parser.add_argument(
        "--placement",
        choices=["reward", "loss", "reward+loss"],
        help="the KL penalty of every arm: KLPenalty(placement=...) with its default estimator",
    )
    parser.add_argument(
        "--estimator",
        choices=["kl_k1", "kl_k2", "kl_k3", "kl_k3_st", "kl_exact"],
        help="with --placement: this estimator instead of the placement's default",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.iterations, args.seeds = 2, args.seeds[:2]
    return args


def smoke_arm(arm: Arm) -> Arm:
    """The same arm, shrunk to run in seconds on a tiny random model."""
    return dataclasses.replace(
        arm, max_new_tokens=6, prompts_per_iteration=2, minibatch_size=2, epochs=1
    )


def make_baseline(
    arm: Arm, policy: kltune.Policy
) -> tuple[kltune.Baseline, kltune.ValueFit | None]:
    kinds = {
        "mean": kltune.MeanBaseline,
        "ema": kltune.EMABaseline,
        "rloo": kltune.LeaveOneOutBaseline,
        "grpo": kltune.GRPOBaseline,
        "gae": kltune.GAEBaseline,
    }
    if arm.baseline == "prompt_value":
        value = kltune.PromptValueBaseline(vocab_size=len(policy.tokenizer), dim=64)
        fit = kltune.ValueFit(value, torch.optim.Adam(value.parameters(), lr=1e-2), steps=4)
        return value, fit
    return kinds[arm.baseline](), None


def build_blocks(arm: Arm, model, tokenizer) -> tuple[kltune.Blocks, kltune.LoopState]:
    """Policy, reference, reward, objective and optimiser for one arm."""
    policy = kltune.Policy(model, tokenizer, value_head=arm.baseline == "gae")
    reference = kltune.FrozenReference(policy)
    baseline, value_fit = make_baseline(arm, policy)
    objective = kltune.PPOObjective(
        clip_eps=0.2,
        entropy_coef=arm.entropy_coef,
        kl=arm.kl(),
    )
    optimizer = torch.optim.Adam(policy.parameters(), lr=arm.lr, eps=1e-5)
    blocks = kltune.Blocks(
        policy=policy,
        reference=reference,
        reward_fn=arm.reward(),
        objective=objective,
        optimizer=optimizer,
        value_fit=value_fit,
    )
    return blocks, kltune.LoopState(controller=arm.controller(), baseline=baseline)


def load(args: argparse.Namespace):
    if args.smoke:
        return kltune.tiny_random_model("llama")
    return kltune.load_model(args.model)


def selected(arms: list[Arm], args: argparse.Namespace) -> list[Arm]:
    """The arms named by ``--arms`` (all of them by default)."""
    if not args.arms:
        return arms
    unknown = set(args.arms) - {arm.name for arm in arms}
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {[a.name for a in arms]}")
    return [arm for arm in arms if arm.name in args.arms]


def describe(kl: kltune.KLPenalty) -> str:
    """A KL penalty in words that are the same in every process (no addresses)."""
    weighted = "" if kl.importance_weighted or not kl.in_loss else ", not importance-weighted"
    return f"{kl.estimator.__name__} in the {kl.placement}{weighted}"


def _configured(arm: Arm, args: argparse.Namespace) -> Arm:
    """The arm as the command line changes it (--smoke, --lr, --placement)."""
    arm = smoke_arm(arm) if args.smoke else arm
    if getattr(args, "lr", None) is not None:
        arm = dataclasses.replace(arm, lr=args.lr)
    if getattr(args, "placement", None) is not None:
        estimator = getattr(kltune.functional, args.estimator) if args.estimator else None
        kl = functools.partial(kltune.KLPenalty, estimator=estimator, placement=args.placement)
        arm = dataclasses.replace(arm, kl=kl)
    return arm


def _settings(arm: Arm) -> dict:
    """What run.json records of an arm, to tell a finished run of it from another's."""
    return {
        k: v for k, v in dataclasses.asdict(arm).items() if isinstance(v, (int, float, str))
    } | {"controller_start": arm.controller().state_dict(), "kl": describe(arm.kl())}


def _complete(out: Path, arm: Arm, args: argparse.Namespace) -> bool:
    """Whether ``out`` holds a finished run of this arm, these settings and iterations."""
    if not (out / "run.json").is_file():
        return False
    done = json.loads((out / "run.json").read_text())
    settings = _settings(arm)
    # a setting added to Arm after the run was recorded ran at its default
    defaults = {f.name: f.default for f in dataclasses.fields(Arm)}
    recorded = {k: done["settings"].get(k, defaults.get(k)) for k in settings}
    return done["iterations"] == args.iterations and recorded == settings


def finished(arm: Arm, args: argparse.Namespace) -> list[Path]:
    """The folders of this arm's finished runs under ``args.out`` (any seed)."""
    arm = _configured(arm, args)
    folder = args.out / arm.name.replace(" ", "_")
    seeds = sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:]))
    return [run for run in seeds if _complete(run, arm, args)]


def describe_run(runs: dict[str, list[Path]]) -> list[str]:
    """A markdown table of the seeds and wall time of each arm's finished runs."""
    lines = [
        "| arm | seeds | wall time per run (min) | s per iteration |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, folders in runs.items():
        if not folders:
            continue
        infos = [json.loads((f / "run.json").read_text()) for f in folders]
        minutes = [i["wall_seconds"] / 60 for i in infos]
        per_iteration = [i["seconds_per_iteration"] for i in infos]
        lines.append(
            f"| {name} | {', '.join(str(i['seed']) for i in infos)} | "
            f"{min(minutes):.0f}–{max(minutes):.0f} | "
            f"{min(per_iteration):.1f}–{max(per_iteration):.1f} |"
        )
    return lines


def run_arm(arm: Arm, args: argparse.Namespace, seed: int) -> tuple[Path, kltune.Blocks | None]:
    """Train one arm for one seed; returns its folder (metrics.jsonl, samples.jsonl,
    run.json) and the trained blocks (None when the run was already complete)."""
    arm = _configured(arm, args)
    out = args.out / arm.name.replace(" ", "_") / f"seed{seed}"
    if _complete(out, arm, args):
        print(f"{out} is complete; skipping")
        return out, None
    if (out / "run.json").is_file():
        print(f"{out} was run with other settings; running it again")
        (out / "run.json").unlink()
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # an interrupted run restarts from scratch
        (out / "samples.jsonl").unlink(missing_ok=True)
    model, tokenizer = load(args)
    torch.manual_seed(seed)  # the example (not the library) seeds the value-head init
    blocks, state = build_blocks(arm, model, tokenizer)
    blocks = kltune.accel.prepare(blocks)  # CPU memory settings (process-wide)
    start = time.time()
    kltune.train(
        kltune.movie_review_prompts()[: arm.prompt_pool],
        blocks,
        state,
        iterations=args.iterations,
        out_dir=out,
        prompts_per_iteration=arm.prompts_per_iteration,
        sampling=kltune.Sampling(
            max_new_tokens=arm.max_new_tokens,
            temperature=arm.temperature,
            stop_at_eos=arm.stop_at_eos,
            completions_per_prompt=arm.completions_per_prompt,
        ),
        updates=kltune.Updates(epochs=arm.epochs, minibatch_size=arm.minibatch_size),
        seed=seed,
        sample_every=5,
    )
    seconds = time.time() - start
    info = {
        "arm": arm.name,
        "seed": seed,
        "iterations": args.iterations,
        "wall_seconds": seconds,
        "seconds_per_iteration": seconds / args.iterations,
        "settings": _settings(arm) | {"controller": state.controller.state_dict()},
        "model": "tiny-random-llama" if args.smoke else args.model,
    }
    (out / "run.json").write_text(json.dumps(info, indent=2))
    return out, blocks


def final_samples(run: Path, first: bool = False) -> list[dict]:
    """The completions logged at the last (or, with ``first``, the first: π_ref's own)
    sampled iteration of a run."""
    lines = (run / "samples.jsonl").read_text().splitlines()
    return json.loads(lines[0 if first else -1])["samples"] if lines else []

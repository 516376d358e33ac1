"""The KL penalty matrix: what each estimator gives the policy in each placement.

A penalty β·KL(π‖π_ref) acts through the gradient it gives the policy, not
through the value of its estimator. For each of the 15 cells of
``kltune.kl_control.GRADIENTS`` (estimators k1, k2, k3, k3-st and the exact KL,
in the reward, in the loss, or in both) this script computes the cell's
*expected* gradient by exact enumeration (``kltune.kl_gradients``: every
completion, weighted by its probability, sent through the library's own reward
shaping, reward-to-go, PPO surrogate and ``KLPenalty``), and compares it with
∇KL(π‖π_ref) of whole completions by cosine and norm ratio (1 and 1: the
penalty is exactly β·KL's gradient):

- ``matrix_categorical.png``: one token from a categorical of 8 outcomes, the
  policy's logits = the reference's + ε·noise, ε from 0.03 to 3 (8 seeds);
- ``matrix_sequences.png``: all 125 three-token completions of a tiny float64
  Llama (vocabulary 5), every parameter moved by ε·noise, ε from 0.03 to 1,
  where a token also changes the KL of the tokens after it (3 seeds);
- ``matrix_embedded.png``: the next token of SmolLM2-135M (the embedded model,
  49152 outcomes) after 4 movie-review prompts, the policy = the model with
  Gaussian noise of ε times each parameter tensor's std (ε from 0.003 to 0.3);
  gradients with respect to the policy's logits, in float64;
- ``pullback.png``: the exact KL over 40 PPO iterations with a zero reward
  (the penalty is the only signal; set-up of tests/test_kl_pullback.py);
- ``matrix.md``: the numbers.

    python examples/kl_estimators.py --out results/kl_estimators
    python examples/kl_estimators.py --smoke --out /tmp/kl_smoke
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter, NullLocator, ScalarFormatter

import kltune
import kltune.functional as KF
from kltune.kl_control import GRADIENTS, SOUND
from kltune.kl_gradients import (
    EnumeratedCompletions,
    cosine_and_norm_ratio,
    flat_gradient,
    perturbed_sequences,
    pull_back,
)
from kltune.rollout import NextTokenHead

ESTIMATORS = ["kl_k1", "kl_k2", "kl_k3", "kl_k3_st", "kl_exact"]
PLACEMENTS = ["reward", "loss", "reward+loss"]
CELLS = [(name, placement) for placement in PLACEMENTS for name in ESTIMATORS]


def penalty(name: str, placement: str) -> kltune.KLPenalty:
    """The cell's KLPenalty; the biased cells are meant here (an ablation)."""
    return kltune.KLPenalty(
        estimator=getattr(KF, name),
        placement=placement,  # type: ignore[arg-type]
        allow_biased=True,
    )


def short(name: str) -> str:
    return name.removeprefix("kl_")


# ── one token: a categorical of 8 outcomes ───────────────────────────────────


def categorical_matrix(epsilons: list[float], seeds: int, vocab: int = 8) -> dict:
    """Cosine and norm ratio of each cell's expected gradient to ∇KL, per ε,
    averaged over seeds, and the exact KL(π‖π_ref) at each ε."""
    cos = {cell: np.zeros((len(epsilons), seeds)) for cell in CELLS}
    ratio = {cell: np.zeros((len(epsilons), seeds)) for cell in CELLS}
    kl = np.zeros((len(epsilons), seeds))
    for j in range(seeds):
        g = torch.Generator().manual_seed(j)
        ref = torch.randn(vocab, generator=g, dtype=torch.float64)
        noise = torch.randn(vocab, generator=g, dtype=torch.float64)
        for i, eps in enumerate(epsilons):
            theta = (ref + eps * noise).requires_grad_()
            table = EnumeratedCompletions.categorical(theta, ref)
            truth = flat_gradient(table.true_kl(), [theta])
            kl[i, j] = float(table.true_kl().detach())
            for cell in CELLS:
                got = flat_gradient(table.penalty_objective(penalty(*cell)), [theta])
                cos[cell][i, j], ratio[cell][i, j] = cosine_and_norm_ratio(got, truth)
    return {
        "eps": np.array(epsilons),
        "kl": kl.mean(1),
        "cos": {c: v.mean(1) for c, v in cos.items()},
        "ratio": {c: v.mean(1) for c, v in ratio.items()},
    }


# ── three tokens: a tiny float64 Llama, where a token changes the KL after it ─


def sequence_matrix(epsilons: list[float], seeds: int, length: int = 3) -> dict:
    """As :func:`categorical_matrix`, on all 5**length completions of the tiny Llama of
    :func:`kltune.kl_gradients.perturbed_sequences`; also the token-local part of ∇KL
    (states held fixed), for reference."""
    keys = [*CELLS, "token-local"]
    cos = {key: np.zeros((len(epsilons), seeds)) for key in keys}
    ratio = {key: np.zeros((len(epsilons), seeds)) for key in keys}
    kl = np.zeros((len(epsilons), seeds))
    for i, eps in enumerate(epsilons):
        for j in range(seeds):
            table, params = perturbed_sequences(eps, length, noise_seed=1 + j)
            truth = flat_gradient(table.true_kl(), params)
            kl[i, j] = float(table.true_kl().detach())
            local = flat_gradient(table.local_kl(), params)
            cos["token-local"][i, j], ratio["token-local"][i, j] = cosine_and_norm_ratio(
                local, truth
            )
            for cell in CELLS:
                got = flat_gradient(table.penalty_objective(penalty(*cell)), params)
                cos[cell][i, j], ratio[cell][i, j] = cosine_and_norm_ratio(got, truth)
    return {
        "eps": np.array(epsilons),
        "kl": kl.mean(1),
        "cos": {k: v.mean(1) for k, v in cos.items()},
        "ratio": {k: v.mean(1) for k, v in ratio.items()},
    }


# ── one token of a real model: 49152 outcomes ────────────────────────────────


def categorical_objective(
    theta: torch.Tensor, ref: torch.Tensor, kl_penalty: kltune.KLPenalty
) -> torch.Tensor:
    """``EnumeratedCompletions.categorical(theta, ref).penalty_objective(kl_penalty)``
    in O(V) memory.

    ``categorical`` gives every one of the V completions its own copy of the V
    logits, and its log-softmax materialises a [V, 1, V] tensor: 19 GB in float64
    for V = 49152. For one categorical all those rows are the same distribution,
    so here the V completions share one log-softmax; the rest is
    ``penalty_objective`` line by line, through the same library functions.
    :func:`check_categorical_objective` asserts that both agree on every cell.
    """
    vocab = theta.shape[-1]
    logprobs = torch.log_softmax(theta, -1)[:, None]  # completion a is the token a: [V, 1]
    ref_logprobs = torch.log_softmax(ref, -1)[:, None]
    weight = logprobs.detach().exp()[:, 0]  # π(a)
    mask = torch.ones(vocab, 1, dtype=torch.bool)
    total = torch.zeros((), dtype=theta.dtype)
    if kl_penalty.exact:  # the same KL whatever token is drawn
        kl_tokens = KF.kl_exact(theta.detach()[None, None], ref[None, None]).expand(vocab, 1)
    else:
        kl_tokens = kl_penalty.reward_kl(logprobs, ref_logprobs)
    if kl_penalty.in_reward:
        scores = torch.zeros(vocab, dtype=theta.dtype)
        rewards = KF.shaped_rewards(scores, kl_tokens, mask, beta=1.0)
        returns = KF.reward_to_go(rewards, mask)
        surrogate = KF.clipped_surrogate_loss(logprobs, logprobs.detach(), returns)
        total = total + (weight * surrogate.sum(-1)).sum()
    if kl_penalty.in_loss:
        if kl_penalty.exact:  # Σ_a π(a)·KL = KL: the weights sum to 1
            head, ref_head = NextTokenHead(theta[None, None]), NextTokenHead(ref[None, None])
            total = total + kl_penalty.exact_kl(head, ref_head, temperature=1.0).sum()
        else:
            term = kl_penalty.loss_kl(logprobs, ref_logprobs, logprobs.detach())
            total = total + (weight * term.sum(-1)).sum()
    return total


def check_categorical_objective() -> None:
    """The O(V) objective has the gradient of the enumerated one, cell by cell."""
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        ref = 2 * torch.randn(16, generator=g, dtype=torch.float64)
        theta = (ref + torch.randn(16, generator=g, dtype=torch.float64)).requires_grad_()
        table = EnumeratedCompletions.categorical(theta, ref)
        for cell in CELLS:
            want = flat_gradient(table.penalty_objective(penalty(*cell)), [theta])
            got = flat_gradient(categorical_objective(theta, ref, penalty(*cell)), [theta])
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def embedded_matrix(epsilons: list[float], n_prompts: int) -> dict:
    """Each cell on the embedded model's next-token distribution after each prompt,
    the policy being the model with parameter noise of relative size ε."""
    model, tokenizer = kltune.load_model("embedded")
    prompts = kltune.movie_review_prompts()[:n_prompts]
    encoded = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]

    def last_logits() -> torch.Tensor:  # [prompts, V] in float64
        with torch.no_grad():
            return torch.stack([model(input_ids=ids).logits[0, -1] for ids in encoded]).double()

    ref_logits = last_logits()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    cos = {cell: np.zeros((len(epsilons), n_prompts)) for cell in CELLS}
    ratio = {cell: np.zeros((len(epsilons), n_prompts)) for cell in CELLS}
    kl = np.zeros((len(epsilons), n_prompts))
    for i, eps in enumerate(epsilons):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # noise of ε times each tensor's own spread
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
                p.copy_(original[name] + eps * original[name].std() * noise)
        policy_logits = last_logits()
        for k in range(n_prompts):
            theta = policy_logits[k].clone().requires_grad_()
            ref = ref_logits[k]
            log_p, log_q = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
            true_kl = (log_p.exp() * (log_p - log_q)).sum()  # = EnumeratedCompletions.true_kl
            truth = flat_gradient(true_kl, [theta])
            kl[i, k] = float(true_kl.detach())
            for cell in CELLS:
                got = flat_gradient(categorical_objective(theta, ref, penalty(*cell)), [theta])
                cos[cell][i, k], ratio[cell][i, k] = cosine_and_norm_ratio(got, truth)
    return {
        "eps": np.array(epsilons),
        "kl": kl.mean(1),
        "kl_each": kl,
        "prompts": prompts,
        "cos": {c: v.mean(1) for c, v in cos.items()},
        "ratio": {c: v.mean(1) for c, v in ratio.items()},
    }


# ── the whole loop: does the penalty alone pull the policy back? ─────────────

PULLBACK_CONFIGS = {
    "k1 reward (default)": ("kl_k1", "reward"),
    "k3 reward (old default)": ("kl_k3", "reward"),
    "k2 loss (the same run as k3_st loss)": ("kl_k2", "loss"),
    "k3_st loss (loss default)": ("kl_k3_st", "loss"),
    "k1 loss": ("kl_k1", "loss"),
    "exact loss": ("kl_exact", "loss"),
    "exact reward+loss (default)": ("kl_exact", "reward+loss"),
    "k3 reward+loss": ("kl_k3", "reward+loss"),
}


# ── figures ──────────────────────────────────────────────────────────────────

# Some cells coincide (k3 and k3_st in the reward; k2, k3_st and the exact KL in
# the loss): sizes and hollow markers keep each visible where it is drawn over another.
STYLE = {
    "kl_k1": {"color": "C0", "marker": "o", "markersize": 6},
    "kl_k2": {"color": "C1", "marker": "s", "markersize": 8},
    "kl_k3": {"color": "C2", "marker": "^", "markersize": 6},
    "kl_k3_st": {"color": "C3", "marker": "v", "markersize": 11, "markerfacecolor": "none"},
    "kl_exact": {"color": "C4", "marker": "D", "markersize": 4},
}
RATIO_FLOOR = 1e-3  # norm ratios below this (zero gradients) are drawn at the floor


def save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def plot_matrix(result: dict, path: Path, title: str, x: str, local: bool = False) -> None:
    """Two rows (cosine, norm ratio to ∇KL) × three placements, one line per
    estimator; solid: a sound cell (KLPenalty accepts it without a warning),
    dashed: a biased or zero one (KLPenaltyWarning)."""
    fig = Figure(figsize=(15, 9), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True)
    xs = result["eps"] if x == "eps" else result["kl"]
    for col, placement in enumerate(PLACEMENTS):
        top, bottom = axes[0, col], axes[1, col]
        for name in ESTIMATORS:
            cell = (name, placement)
            style = {**STYLE[name], "linestyle": "-" if cell in SOUND else "--"}
            top.plot(xs, result["cos"][cell], **style)
            bottom.plot(xs, np.maximum(result["ratio"][cell], RATIO_FLOOR), **style)
        if local:
            style = {"color": "black", "linestyle": ":", "linewidth": 2.2}
            top.plot(xs, result["cos"]["token-local"], **style)
            bottom.plot(xs, result["ratio"]["token-local"], **style)
        top.set_title(f"placement = {placement!r}", fontsize=12)
        top.set_ylim(-1.1, 1.1)
        bottom.set_yscale("log")
        highest = max(float(np.max(result["ratio"][(name, placement)])) for name in ESTIMATORS)
        bottom.set_ylim(RATIO_FLOOR * 0.7, max(30.0, 2 * highest))
        for ax, level in ((top, 0.0), (top, 1.0), (bottom, 1.0)):
            ax.axhline(level, color="grey", linewidth=0.6)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(True, which="major", alpha=0.3)
        if x == "eps":
            bottom.set_xlabel("ε (distance of π from π_ref)")
            add_kl_axis(top, result)
        else:
            bottom.set_xlabel("measured exact KL(π‖π_ref) (nats)")
    axes[0, 0].set_ylabel("cosine to ∇KL(π‖π_ref)")
    axes[1, 0].set_ylabel(
        f"|gradient| / |∇KL(π‖π_ref)|\n(a zero gradient drawn at {RATIO_FLOOR:g})"
    )
    handles = [Line2D([], [], **STYLE[name], label=short(name)) for name in ESTIMATORS]
    handles += [
        Line2D([], [], color="grey", linestyle="-", label="sound (no warning)"),
        Line2D([], [], color="grey", linestyle="--", label="biased or zero (warns)"),
    ]
    if local:
        handles.append(
            Line2D([], [], color="black", linestyle=":", linewidth=2.2, label="token-local ∇KL")
        )
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10)
    fig.suptitle(title, fontsize=13)
    save(fig, path)


def add_kl_axis(ax, result: dict) -> None:
    """A top axis with the exact KL(π‖π_ref) (mean over seeds) at the grid's ε."""
    top = ax.secondary_xaxis("top")
    step = 2 if len(result["eps"]) > 6 else 1  # every other grid point on a long grid
    eps, kl = result["eps"][::step], result["kl"][::step]
    top.set_xticks(eps, labels=[f"{k:.2g}" for k in kl], fontsize=8)
    top.xaxis.set_minor_locator(NullLocator())
    top.set_xlabel("exact KL(π‖π_ref) at that ε (nats)", fontsize=9)


def plot_pullback(curves: dict[str, list[float]], path: Path) -> None:
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    for label, kls in curves.items():
        name, placement = PULLBACK_CONFIGS[label]
        ax.plot(
            kls,
            label=label,
            **STYLE[name],
            markevery=5,
            linestyle={"reward": "-", "loss": "--", "reward+loss": ":"}[placement],
            linewidth=1.8,
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([0.03, 0.05, 0.1, 0.2, 0.4, 1, 2, 4])
    ax.set_xlabel("PPO iteration (zero reward, β = 1)")
    ax.set_ylabel("exact KL(π‖π_ref) per completion (nats)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(
        fontsize=8,
        ncol=2,
        title="estimator and placement (solid: reward, dashed: loss, dotted: both)",
        title_fontsize=8,
    )
    ax.set_title("The penalty alone: does it pull the policy back to π_ref?")
    save(fig, path)


# ── the table ────────────────────────────────────────────────────────────────


def at(result: dict, key, eps: float) -> str:
    """'cosine / ratio' at the grid point ε (or '–' when the grid lacks it)."""
    hits = np.flatnonzero(np.isclose(result["eps"], eps))
    if len(hits) == 0:
        return "–"
    i = hits[0]
    return f"{result['cos'][key][i]:+.3f} / {result['ratio'][key][i]:.3g}"


def write_markdown(path: Path, command: str, seconds: float, results: dict, curves) -> None:
    cat, seq, emb = results["categorical"], results["sequences"], results.get("embedded")
    columns = [("categorical", cat, e) for e in (0.1, 1.0)]
    columns += [("sequences", seq, e) for e in (0.3, 1.0)]
    if emb is not None:
        columns += [("embedded", emb, e) for e in emb["eps"]]

    def header(kind: str, result: dict, eps: float) -> str:
        hits = np.flatnonzero(np.isclose(result["eps"], eps))
        kl = f", KL {result['kl'][hits[0]]:.3g}" if len(hits) else ""
        return f"{kind} ε={eps:g}{kl}"

    lines = [
        "# The KL penalty matrix",
        "",
        f"Command: `{command}` (wall time {seconds:.0f} s).",
        "",
        "Each cell's expected on-policy gradient (β = 1, zero task reward, no baseline, "
        "first PPO epoch) by exact enumeration, against ∇KL(π‖π_ref) of whole completions: "
        "**cosine / norm ratio** (1 / 1 = exactly β·KL's gradient). "
        f"Categorical: 8 outcomes, mean over {results['categorical_seeds']} seeds. "
        f"Sequences: all 125 three-token completions of a tiny float64 Llama, mean over "
        f"{results['sequence_seeds']} noise seeds. "
        + (
            f"Embedded: SmolLM2-135M's next token (49152 outcomes) after "
            f"{len(emb['prompts'])} prompts (mean), parameter noise of ε × each tensor's std, "
            "gradients with respect to the policy's logits. "
            if emb is not None
            else ""
        )
        + "KL in the headers: the exact KL(π‖π_ref) (nats, per completion, mean).",
        "",
        "| estimator | placement | expected gradient (GRADIENTS) | sound | "
        + " | ".join(header(*c) for c in columns)
        + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for cell in CELLS:
        values = " | ".join(at(result, cell, eps) for _, result, eps in columns)
        sound = "yes" if cell in SOUND else "no"
        lines.append(f"| {short(cell[0])} | {cell[1]} | {GRADIENTS[cell]} | {sound} | {values} |")
    values = " | ".join(
        at(result, "token-local", eps) if kind == "sequences" else "–"
        for kind, result, eps in columns
    )
    lines.append(f"| (token-local ∇ of the sequence KL) | – | for reference | – | {values} |")
    if emb is not None:
        lines += [
            "",
            f"Embedded prompts: {emb['prompts']}; exact KL per prompt at each ε: "
            + "; ".join(
                f"ε={e:g}: " + ", ".join(f"{k:.3g}" for k in row)
                for e, row in zip(emb["eps"], emb["kl_each"], strict=True)
            ),
        ]
    n = len(next(iter(curves.values()))) - 1
    mid = n // 2
    lines += [
        "",
        "## Pull-back with a zero reward",
        "",
        f"Exact KL(π‖π_ref) per completion on a fixed sample of 32 completions, {n} PPO "
        "iterations of the tiny random Llama moved away from its reference (set-up of "
        "tests/test_kl_pullback.py: β = 1, Adam lr 3e-3, mean baseline, whitened advantages).",
        "",
        f"| configuration | KL at 0 | KL at {mid} | KL at {n} | final / initial |",
        "|---|---|---|---|---|",
    ]
    for label, kls in curves.items():
        lines.append(
            f"| {label} | {kls[0]:.4f} | {kls[mid]:.4f} | {kls[-1]:.4f} | {kls[-1] / kls[0]:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


# ── main ─────────────────────────────────────────────────────────────────────


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/kl_estimators"))
    parser.add_argument("--smoke", action="store_true", help="fewer ε values and iterations")
    parser.add_argument("--skip-embedded", action="store_true", help="no SmolLM2 matrix")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    smoke = args.smoke

    check_categorical_objective()
    results: dict = {"categorical_seeds": 2 if smoke else 8, "sequence_seeds": 1 if smoke else 3}
    cat_eps = [0.1, 1.0] if smoke else list(np.logspace(-1.5, 0.5, 9))  # 0.03 … 3
    results["categorical"] = categorical_matrix(cat_eps, results["categorical_seeds"])
    plot_matrix(
        results["categorical"],
        args.out / "matrix_categorical.png",
        "One token, a categorical of 8 outcomes: each cell's expected gradient against "
        "∇KL(π‖π_ref)",
        x="eps",
    )
    print(f"categorical done ({time.perf_counter() - start:.0f} s)")

    seq_eps = [0.3, 1.0] if smoke else [0.03, 0.1, 0.3, 1.0]  # at 3 the policy saturates
    results["sequences"] = sequence_matrix(seq_eps, results["sequence_seeds"])
    plot_matrix(
        results["sequences"],
        args.out / "matrix_sequences.png",
        "Three-token completions of a tiny Llama (vocabulary 5): each cell against "
        "∇KL(π‖π_ref) of whole completions",
        x="eps",
        local=True,
    )
    print(f"sequences done ({time.perf_counter() - start:.0f} s)")

    if not (smoke or args.skip_embedded):
        results["embedded"] = embedded_matrix([0.003, 0.01, 0.03, 0.1, 0.3], n_prompts=4)
        plot_matrix(
            results["embedded"],
            args.out / "matrix_embedded.png",
            "SmolLM2-135M's next token (49152 outcomes), policy = model + relative parameter "
            "noise ε: each cell against ∇KL(π‖π_ref) w.r.t. the policy's logits",
            x="kl",
        )
        print(f"embedded done ({time.perf_counter() - start:.0f} s)")

    iterations = 5 if smoke else 40
    curves = {
        label: pull_back(penalty(*cell), iterations) for label, cell in PULLBACK_CONFIGS.items()
    }
    plot_pullback(curves, args.out / "pullback.png")
    print(f"pull-back done ({time.perf_counter() - start:.0f} s)")

    command = "OMP_NUM_THREADS=1 python examples/kl_estimators.py " + " ".join(
        ([f"--out {args.out}"])
        + (["--smoke"] if smoke else [])
        + (["--skip-embedded"] if args.skip_embedded else [])
    )
    seconds = time.perf_counter() - start
    write_markdown(args.out / "matrix.md", command, seconds, results, curves)
    print((args.out / "matrix.md").read_text())
    print(f"wrote {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()

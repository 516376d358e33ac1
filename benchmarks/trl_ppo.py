"""kltune against TRL's PPOTrainer on the same PPO work: seconds per iteration and peak RSS.

Run it with ``nox -s benchmark`` (which pins the TRL release that still ships
``trl.experimental.ppo``), or directly::

    python benchmarks/trl_ppo.py --out results/performance

The work (issue 7): the embedded SmolLM2-135M policy in float32, the VADER
compound score of the completion as the reward, 16 prompts × 1 completion of
32 new tokens (temperature 1, no top-k/top-p, a row stops at EOS), 1 PPO
epoch, 1 minibatch (one optimiser step per iteration), AdamW lr 1e-5 (eps 1e-8,
no weight decay, constant schedule, no gradient clipping: TRL's PPO loop never
clips), KL coefficient 0.05 with the k1 estimator in the reward, GAE(γ=1,
λ=0.95) on a learned value function, clip 0.2, value clip 0.2, value
coefficient 0.1, whitened advantages, 2 CPU threads.

Each measurement is its own process (peak RSS is per process), and the
libraries alternate (kltune, TRL, TRL, kltune for the headline configuration),
so a slow phase of the machine lands on both. A worker writes one JSON file:
seconds of every iteration, peak RSS over the whole process and over the
iterations alone, and for kltune the time per phase.
"""

import argparse
import copy
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Work:
    """One benchmark configuration; identical for both libraries."""

    completions: int = 16
    new_tokens: int = 32
    iterations: int = 7  # including the warm-up
    warmup: int = 1
    lr: float = 1e-5
    kl_coef: float = 0.05
    threads: int = 2
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # or "bf16": autocast for sampling and scoring (both libraries)
    model: str = "embedded"  # or "tiny": a random 2-layer Llama (dry runs)

    @property
    def name(self) -> str:
        return f"{self.completions}x{self.new_tokens}"

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


def load_models(work: Work, copies: int) -> tuple[list[Any], Any]:
    """``copies`` identical causal LMs (policy, reference, ...) and the tokenizer, on the CPU."""
    import kltune

    if work.model == "tiny":
        pairs = [kltune.tiny_random_model("llama", seed=work.seed) for _ in range(copies)]
    else:
        pairs = [kltune.load_model(work.model) for _ in range(copies)]
    return [model for model, _ in pairs], pairs[0][1]


def reset_peak_memory(work: Work) -> None:
    """Start the peak-memory count of the iterations (RSS, and CUDA's allocator on a GPU)."""
    reset_peak_rss()
    if work.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(work: Work) -> dict[str, float]:
    """Peak RSS, and on a GPU the peak of CUDA's allocator since :func:`reset_peak_memory`."""
    out = peak_rss_mb()
    if work.cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ── measuring ───────────────────────────────────────────────────────────────


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> dict[str, float]:
    """Peak RSS in MB: over the whole process, and since the last :func:`reset_peak_rss`."""
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    since_reset = float("nan")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            since_reset = int(line.split()[1]) / 1024
    return {"peak_rss_mb": lifetime, "peak_rss_iterations_mb": since_reset}


def _synchronize() -> None:
    """Wait for queued GPU work, so that a phase's time is its own (no-op on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseClock:
    """Seconds spent in named phases, accumulated per iteration."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.inside = False

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; a phase inside another counts toward the outer one only."""
        if self.inside:
            yield
            return
        self.inside = True
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.inside = False
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapper

    def close_iteration(self) -> None:
        self.history.append(self.current)
        self.current = {}


def matmul_peak_gflops(threads: int, repeats: int = 20) -> float:
    """Best float32 GEMM rate of this machine with ``threads`` threads (GFLOP/s).

    The best of square GEMMs and of the model's own training shapes (656 tokens
    through a 576 → 1536 projection, and the 49k-vocabulary output layer).
    """
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in [(2048, 2048, 2048), (4096, 4096, 4096), (656, 576, 1536), (512, 576, 49152)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        seconds = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
        best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_flops(model: torch.nn.Module, rows: int, prompt: int, new_tokens: int) -> float:
    """FLOPs of one forward + backward over ``rows`` sequences (6 · params · tokens, plus attention).

    Matmul parameters see every position; the vocabulary projection only the
    response positions (kltune keeps only those logits); the input embedding is
    a lookup and costs nothing.
    """
    config: Any = model.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    embedding = vocab * hidden
    body = sum(p.numel() for p in model.parameters()) - embedding
    positions = prompt + new_tokens - 1
    matmul = 2 * body * positions + 2 * embedding * new_tokens
    attention = 2 * 2 * layers * hidden * positions * positions  # QKᵀ and AV, full square
    return 3 * rows * (matmul + attention)


# ── the two workers ─────────────────────────────────────────────────────────


def _prompts(count: int, iteration: int) -> list[str]:
    import kltune

    pool = kltune.movie_review_prompts()
    start = iteration * count
    return [pool[(start + i) % len(pool)] for i in range(count)]


def run_kltune(work: Work) -> dict[str, Any]:
    import kltune
    import kltune.loop as loop

    torch.manual_seed(work.seed)
    (model,), tokenizer = load_models(work, 1)
    model.to(work.device)
    autocast = torch.bfloat16 if work.precision == "bf16" else None
    policy = kltune.Policy(model, tokenizer, value_head=True, autocast_dtype=autocast)
    reference = kltune.FrozenReference(policy)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=work.lr, eps=1e-8, weight_decay=0.0, fused=True
    )
    clock = PhaseClock()
    objective = kltune.PPOObjective(
        clip_eps=0.2,
        value_coef=0.1,
        value_clip_eps=0.2,
        kl=kltune.KLPenalty(estimator=kltune.functional.kl_k1),
    )
    blocks = kltune.Blocks(
        policy=policy,
        reference=reference,
        reward_fn=kltune.VaderSentiment(),
        objective=objective,
        optimizer=optimizer,
    )
    policy.score = clock.timed("policy forward", policy.score)  # type: ignore[method-assign]
    for stage, name in [
        ("collect_rollout", "generation (+ values)"),
        ("score_reference", "reference"),
        ("compute_scores", "reward"),
    ]:
        setattr(loop, stage, clock.timed(name, getattr(loop, stage)))
    state = kltune.LoopState(
        controller=kltune.FixedKLController(work.kl_coef),
        baseline=kltune.GAEBaseline(gamma=1.0, lam=0.95),
    )
    sampling = kltune.Sampling(max_new_tokens=work.new_tokens, temperature=1.0)
    updates = kltune.Updates(epochs=1, minibatch_size=None, max_grad_norm=None)
    # One optimiser step per iteration, applied parameter by parameter inside
    # backward: the same update, without a model's worth of gradients alive.
    blocks = kltune.accel.prepare(blocks, step_in_backward=True)
    blocks = dataclasses.replace(blocks, backward=_TimedStepping(blocks.backward, clock))
    generator = torch.Generator(device=work.device).manual_seed(work.seed)
    reset_peak_memory(work)
    seconds, rewards, kls, tokens = [], [], [], []
    prompt_length = 0
    for iteration in range(work.iterations):
        start = time.perf_counter()
        state, rollout, metrics = kltune.ppo_iteration(
            _prompts(work.completions, iteration), blocks, state, sampling, updates, generator
        )
        seconds.append(time.perf_counter() - start)
        clock.close_iteration()
        rewards.append(metrics["reward/score_mean"])
        kls.append(metrics["kl/mean"])
        tokens.append(int(rollout.response_mask.sum()))
        prompt_length = max(prompt_length, rollout.prompt_ids.shape[1])
        print(f"kltune {work.name} iteration {iteration}: {seconds[-1]:.2f} s", flush=True)
    flops = training_flops(model, work.completions, prompt_length, work.new_tokens)
    return {
        "seconds": seconds,
        "phases": clock.history,
        "reward": rewards,
        "kl": kls,
        "generated_tokens": tokens,
        "train_flops": flops,
    } | peak_memory(work)


def run_trl(work: Work) -> dict[str, Any]:
    from datasets import Dataset
    from torch import nn
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    import kltune
    from kltune.loading import _resolve

    torch.manual_seed(work.seed)
    (model, reference), tokenizer = load_models(work, 2)
    if work.model == "tiny":
        config = copy.deepcopy(model.config)
        config.num_labels = 1
        value_model = AutoModelForSequenceClassification.from_config(config)
    else:
        folder = _resolve(work.model)
        value_model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
    nn.init.zeros_(value_model.score.weight)  # like kltune's zero-initialised value head
    value_model.config.pad_token_id = tokenizer.pad_token_id

    prompts = kltune.movie_review_prompts()
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    reward_model = VaderRewardModel(tokenizer, prompts, prompt_ids)
    # TRL's loader drops an incomplete last batch: repeat the pool past one batch.
    repeats = work.completions // len(prompt_ids) + 1
    dataset = Dataset.from_dict({"input_ids": prompt_ids * repeats})
    seconds: list[float] = []
    clock = PhaseClock()
    _time_trl_phases(ppo_trainer, clock, value_model)

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            reset_peak_memory(work)
            self.last = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if work.cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            seconds.append(now - self.last)
            clock.close_iteration()
            print(f"trl {work.name} iteration {len(seconds) - 1}: {seconds[-1]:.2f} s", flush=True)
            self.last = now

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=work.completions,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            num_ppo_epochs=1,
            local_rollout_forward_batch_size=work.completions,
            total_episodes=work.completions * work.iterations,
            response_length=work.new_tokens,
            temperature=1.0,
            stop_token="eos",
            learning_rate=work.lr,
            lr_scheduler_type="constant",
            kl_coef=work.kl_coef,
            kl_estimator="k1",
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=0.1,
            gamma=1.0,
            lam=0.95,
            num_sample_generations=0,
            save_strategy="no",
            report_to=[],
            use_cpu=not work.cuda,
            bf16=work.precision == "bf16",
            seed=work.seed,
            disable_tqdm=True,
            logging_strategy="no",
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=model,
            ref_model=reference,
            reward_model=reward_model,
            train_dataset=dataset,
            value_model=value_model,
            eval_dataset=dataset,
            callbacks=[Clock()],
        )
        trainer.accelerator.backward = clock.timed("backward", trainer.accelerator.backward)
        trainer.optimizer.step = clock.timed("optimiser", trainer.optimizer.step)
        trainer.train()
    return {
        "seconds": seconds,
        "phases": clock.history,
        "reward": reward_model.means,
    } | peak_memory(work)


def _time_trl_phases(module: Any, clock: PhaseClock, value_model: torch.nn.Module) -> None:
    """Wrap the module-level functions TRL's PPO loop calls, to time its phases."""
    generate, forward, get_reward = module.batch_generation, module.forward, module.get_reward

    def timed_forward(model: Any, *args: Any, **kwargs: Any) -> Any:
        name = "policy + value forward" if torch.is_grad_enabled() else "reference"
        with clock.phase(name):
            return forward(model, *args, **kwargs)

    def timed_reward(model: Any, *args: Any, **kwargs: Any) -> Any:
        with clock.phase("values" if model is value_model else "reward"):
            return get_reward(model, *args, **kwargs)

    module.batch_generation = clock.timed("generation", generate)
    module.forward = timed_forward
    module.get_reward = timed_reward


class _TimedStepping:
    """kltune's step-in-backward under the "backward + optimiser" timer."""

    def __init__(self, stepping: Any, clock: PhaseClock) -> None:
        self.stepping, self.clock = stepping, clock

    def __call__(self, loss: torch.Tensor) -> None:
        with self.clock.phase("backward + optimiser"):
            self.stepping(loss)

    def grad_norm(self) -> torch.Tensor:
        return self.stepping.grad_norm()


class _Hidden:
    def __init__(self, scores: torch.Tensor) -> None:
        self.hidden_states = [scores]


class VaderRewardModel(torch.nn.Module):
    """VADER on the completion, shaped like the sequence-classification model TRL expects.

    TRL's ``get_reward`` calls ``getattr(model, model.base_model_prefix)`` and then
    ``model.score`` on the last hidden state, reading the value at the last real
    token. This module's backbone decodes each row's completion (the tokens after
    its prompt, found by matching the known prompt tokens) and broadcasts the
    VADER compound score along the row, so TRL gets exactly the scores kltune's
    :class:`~kltune.VaderSentiment` gives.
    """

    base_model_prefix = "backbone"

    def __init__(self, tokenizer: Any, prompts: list[str], prompt_ids: list[list[int]]) -> None:
        super().__init__()
        import kltune

        self.tokenizer = tokenizer
        self.vader = kltune.VaderSentiment()
        self.by_tokens = {
            tuple(ids): (text, len(ids)) for text, ids in zip(prompts, prompt_ids, strict=True)
        }
        self.backbone = self._Backbone(self)
        self.score = torch.nn.Identity()
        self.means: list[float] = []

    class _Backbone(torch.nn.Module):
        def __init__(self, parent: "VaderRewardModel") -> None:
            super().__init__()
            self.parent = [parent]  # not a submodule

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
            return _Hidden(self.parent[0].scores(input_ids, attention_mask))

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        prompts, completions = [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            real = [t for t, m in zip(ids, mask, strict=True) if m]
            text, length = self._prompt_of(real)
            prompts.append(text)
            completions.append(self.tokenizer.decode(real[length:], skip_special_tokens=True))
        values = self.vader(prompts, completions).float().to(input_ids.device)
        self.means.append(float(values.mean()))
        return values[:, None, None].expand(-1, input_ids.shape[1], 1)

    def _prompt_of(self, real: list[int]) -> tuple[str, int]:
        for tokens, (text, length) in self.by_tokens.items():
            if tuple(real[:length]) == tokens:
                return text, length
        raise ValueError("a row does not start with any known prompt")


WORKERS = {"kltune": run_kltune, "trl": run_trl}


def worker(library: str, work: Work, out: Path) -> None:
    torch.set_num_threads(work.threads)
    result = WORKERS[library](work)
    result |= {"library": library, "work": asdict(work)}
    result["torch_threads"] = torch.get_num_threads()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


# ── the driver: alternate processes, then a table ───────────────────────────


#: glibc's environment for what :func:`kltune.accel.keep_freed_memory` sets from inside
#: kltune's process: the same allocator behaviour, given to TRL for a side measurement.
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def spawn(
    library: str, work: Work, out: Path, reuse: bool, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one worker process (or, with ``reuse``, read a result it already wrote)."""
    if not (reuse and out.exists()):
        fields = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(work).items()]
        env = os.environ | {"OMP_NUM_THREADS": str(work.threads), "TOKENIZERS_PARALLELISM": "false"}
        env |= extra_env or {}
        subprocess.run(
            [sys.executable, __file__, "worker", library, str(out), *fields], check=True, env=env
        )
    return dict(json.loads(out.read_text()))


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    work = runs[0]["work"]
    measured = [s for run in runs for s in run["seconds"][work["warmup"] :]]
    return {
        "median_s": statistics.median(measured),
        "min_s": min(measured),
        "max_s": max(measured),
        "iterations": len(measured),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "peak_rss_iterations_mb": max(run["peak_rss_iterations_mb"] for run in runs),
    }


def phase_table(runs: list[dict[str, Any]]) -> str:
    """Median seconds per phase over the measured iterations, and the remainder."""
    warmup = runs[0]["work"]["warmup"]
    phases = [p for run in runs for p in run["phases"][warmup:]]
    seconds = [s for run in runs for s in run["seconds"][warmup:]]
    lines = ["| phase | median s | share |", "|---|---:|---:|"]
    total = statistics.median(seconds)
    for name in phases[0]:
        value = statistics.median(p.get(name, 0.0) for p in phases)
        lines.append(f"| {name} | {value:.2f} | {value / total:.0%} |")
    other = statistics.median(s - sum(p.values()) for s, p in zip(seconds, phases, strict=True))
    lines.append(
        f"| other (advantages, metrics, bookkeeping) | {other:.2f} | {other / total:.0%} |"
    )
    lines.append(f"| **iteration** | **{total:.2f}** | |")
    return "\n".join(lines)


def flops_line(runs: list[dict[str, Any]], peak_gflops: float) -> str:
    """Achieved FLOP/s of kltune's training phase against the machine's matmul peak."""
    warmup = runs[0]["work"]["warmup"]
    phases = [p for run in runs for p in run["phases"][warmup:]]
    train = statistics.median(p["policy forward"] + p["backward + optimiser"] for p in phases)
    flops = runs[0]["train_flops"]
    achieved = flops / train / 1e9
    return (
        f"Training phase (policy forward + backward + optimiser): {flops / 1e9:.0f} GFLOP "
        f"in {train:.2f} s = {achieved:.0f} GFLOP/s, {achieved / peak_gflops:.0%} of this "
        f"machine's measured float32 matmul peak ({peak_gflops:.0f} GFLOP/s: the best of "
        "square and model-shaped GEMMs, same threads)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--iterations", type=int, default=7, help="per process, with warm-up")
    parser.add_argument("--scale-iterations", type=int, default=4, help="for 64x32 and 16x64")
    parser.add_argument("--only", choices=["headline", "all"], default="all")
    parser.add_argument(
        "--reuse", action="store_true", help="keep worker results already in --out (resume)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    head = Work(iterations=args.iterations)
    plan: list[tuple[str, Work]] = [
        ("kltune", head),
        ("trl", head),
        ("trl", head),
        ("kltune", head),
    ]
    if args.only == "all":
        for work in [
            Work(completions=64, iterations=args.scale_iterations),
            Work(new_tokens=64, iterations=args.scale_iterations),
        ]:
            plan += [("kltune", work), ("trl", work)]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    counts: dict[tuple[str, str], int] = {}
    for library, work in plan:
        key = (library, work.name)
        counts[key] = counts.get(key, 0) + 1
        path = args.out / f"{library}-{work.name}-{counts[key]}.json"
        results.setdefault(key, []).append(spawn(library, work, path, args.reuse))
    # TRL once more with kltune's allocator setting, to show what of the gap is the
    # allocator (reported apart; the ratios compare both libraries as they come).
    path = args.out / f"trl-{head.name}-keep-freed-memory.json"
    same_allocator = spawn("trl", head, path, args.reuse, KEEP_FREED_MEMORY_ENV)
    peak = matmul_peak_gflops(head.threads)
    report = render(results, peak, same_allocator)
    (args.out / "report.md").write_text(report)
    print(report)


def render(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    peak_gflops: float,
    same_allocator: dict[str, Any] | None = None,
) -> str:
    import transformers
    import trl

    lines = [
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, {os.cpu_count()} CPUs",
        "",
        "| work | library | s/iteration (median) | min | max | n | peak RSS MB | "
        "peak RSS in iterations MB | time ratio | RSS ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    works = sorted({name for _, name in results}, key=lambda n: [int(x) for x in n.split("x")])
    for name in works:
        ours, theirs = summarise(results[("kltune", name)]), summarise(results[("trl", name)])
        for library, s in [("kltune", ours), ("trl", theirs)]:
            ratio_t = ours["median_s"] / theirs["median_s"]
            ratio_m = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
            ratios = f"{ratio_t:.2f} | {ratio_m:.2f}" if library == "kltune" else " | "
            lines.append(
                f"| {name} | {library} | {s['median_s']:.2f} | {s['min_s']:.2f} | "
                f"{s['max_s']:.2f} | {s['iterations']} | {s['peak_rss_mb']:.0f} | "
                f"{s['peak_rss_iterations_mb']:.0f} | {ratios} |"
            )
    ours = results[("kltune", "16x32")]
    if same_allocator is not None:
        s, k = summarise([same_allocator]), summarise(ours)
        lines += [
            "",
            "TRL with kltune's allocator setting (glibc keeps freed memory: "
            + ", ".join(f"{n}={v}" for n, v in KEEP_FREED_MEMORY_ENV.items())
            + f"), 16x32, one process: {s['median_s']:.2f} s/iteration (min {s['min_s']:.2f}, "
            f"max {s['max_s']:.2f}, n {s['iterations']}), peak RSS {s['peak_rss_mb']:.0f} MB; "
            f"kltune/TRL with the same setting: time {k['median_s'] / s['median_s']:.2f}, "
            f"RSS {k['peak_rss_mb'] / s['peak_rss_mb']:.2f}.",
        ]
    lines += ["", "kltune phases, 16x32:", "", phase_table(ours), "", flops_line(ours, peak_gflops)]
    lines += ["", "TRL phases, 16x32:", "", phase_table(results[("trl", "16x32")])]
    return "\n".join(lines) + "\n"


def _worker_main(argv: list[str]) -> None:
    library, out = argv[0], Path(argv[1])
    parser = argparse.ArgumentParser()
    for name, value in asdict(Work()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    worker(library, Work(**vars(parser.parse_args(argv[2:]))), out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        _worker_main(sys.argv[2:])
    else:
        main()

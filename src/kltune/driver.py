"""A thin driver around :func:`kltune.loop.ppo_iteration`: progress, logs, checkpoints.

Files written under ``out_dir``:

- ``metrics.jsonl``: one JSON object per iteration, namespaced keys (one line
  written and flushed at a time, so an interrupted run loses at most the line
  being written, which :func:`kltune.plots.read_metrics` skips);
- ``samples.jsonl``: prompts and completions every ``sample_every`` iterations;
- ``checkpoints/iter_NNNNNN/``: see :mod:`kltune.checkpoint`.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from tqdm.auto import tqdm

from kltune.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kltune.diagnostics import CollapseDetector, diversity_metrics
from kltune.distributed import prepare
from kltune.loop import Blocks, LoopState, Metrics, Optimisation, Sampling, ppo_iteration
from kltune.rollout import Rollout

if TYPE_CHECKING:
    from accelerate import Accelerator

Tracker = Callable[[Metrics, int], None]

# Process r samples with seed + r * stride: distinct random streams per process.
_RANK_SEED_STRIDE = 1_000_003


@dataclasses.dataclass(frozen=True)
class _Ranks:
    """Who this process is in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    main: bool = True
    accelerator: Any = None

    @classmethod
    def of(cls, accelerator: Any, is_main_process: bool) -> "_Ranks":
        if accelerator is None:
            return cls(main=is_main_process)
        return cls(
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            main=accelerator.is_main_process,
            accelerator=accelerator,
        )

    def share(
        self, prompts: Sequence[str], per_process: int, iteration: int, seed: int
    ) -> list[str]:
        """This process's prompts of the iteration: its slice of every process's."""
        every = prompts_for_iteration(prompts, per_process * self.world, iteration, seed)
        return list(every[self.rank * per_process :][:per_process])

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's items, in rank order (a collective: all processes call it)."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return list(gather_object(items))


def prompts_for_iteration(
    prompts: Sequence[str], per_iteration: int, iteration: int, seed: int
) -> list[str]:
    """The prompts of one iteration: a pure function of (iteration, seed), so resuming works.

    The pool is walked in passes, each a permutation seeded by ``(seed, pass)``;
    iteration ``i`` takes positions ``[i·n, (i+1)·n)`` of that stream, so every
    prompt is used once per pass.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    if per_iteration < 1:
        raise ValueError(f"prompts_per_iteration must be >= 1, got {per_iteration}")
    chosen = []
    for position in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        pass_index, offset = divmod(position, len(prompts))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + pass_index)
        chosen.append(prompts[int(torch.randperm(len(prompts), generator=generator)[offset])])
    return chosen


def _write_line(handle: TextIO, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def _samples_record(iteration: int, rollout: Rollout, limit: int) -> dict[str, Any]:
    assert rollout.scores is not None
    rows = [
        {"prompt": p, "completion": c, "score": float(s)}
        for p, c, s in zip(rollout.prompts, rollout.completions, rollout.scores, strict=True)
    ]
    return {"iteration": iteration, "samples": rows[:limit]}


def _restore(
    out_dir: Path,
    blocks: Blocks,
    state: LoopState,
    generator: torch.Generator,
    ranks: "_Ranks",
) -> tuple[LoopState, list[str] | None]:
    """The state of the newest checkpoint, and the collapse detector's reference texts."""
    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    if checkpoint is None:
        return state, None
    restored = load_checkpoint(
        checkpoint,
        policy=blocks.policy,
        optimizer=blocks.optimizer,
        generator=generator,
        baseline=state.baseline,
        value_optimizer=blocks.value_fit.optimizer if blocks.value_fit else None,
        rank=ranks.rank,
    )
    baseline = state.baseline
    if dataclasses.is_dataclass(baseline) and not isinstance(baseline, type):
        fields = {f.name for f in dataclasses.fields(baseline)}
        kept = {k: v for k, v in restored.baseline_state.items() if k in fields}
        baseline = dataclasses.replace(baseline, **kept)
    if ranks.main:
        _truncate_lines(out_dir / "metrics.jsonl", lambda i, _: i < restored.metrics_lines)
        _truncate_lines(
            out_dir / "samples.jsonl",
            lambda _, line: int(json.loads(line)["iteration"]) <= restored.iteration,
        )
    extra = restored.extra
    state = dataclasses.replace(
        state,
        iteration=restored.iteration,
        controller=restored.controller,
        baseline=baseline,
        total_skips=int(extra.get("total_skips", 0)),
        consecutive_skips=int(extra.get("consecutive_skips", 0)),
    )
    return state, extra.get("collapse_reference")


def _truncate_lines(path: Path, keep: Callable[[int, str], bool]) -> None:
    """Drop lines written after the checkpoint (they will be written again), and any
    half-written last line, atomically."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for i, line in enumerate(lines) if line.endswith("\n") and keep(i, line)]
        scratch = path.with_name(f".{path.name}.tmp")
        scratch.write_text("".join(kept), encoding="utf-8")
        os.replace(scratch, path)


def train(
    prompts: Sequence[str],
    blocks: Blocks,
    state: LoopState,
    *,
    iterations: int,
    out_dir: str | Path,
    prompts_per_iteration: int = 8,
    sampling: Sampling = Sampling(),
    optimisation: Optimisation = Optimisation(),
    seed: int = 0,
    sample_every: int = 5,
    checkpoint_every: int = 0,
    resume: bool = False,
    collapse_threshold: float = 0.5,
    tracker: Tracker | None = None,
    progress: bool = True,
    is_main_process: bool = True,
    accelerator: "Accelerator | None" = None,
) -> LoopState:
    """Run ``iterations`` PPO iterations, logging metrics, samples and checkpoints.

    Diversity diagnostics are computed every iteration; the collapse detector
    compares them to iteration 0's completions, which are the reference
    policy's own samples (the policy starts as π_ref).

    With an ``accelerator`` (Hugging Face Accelerate, launched with ``accelerate
    launch``), ``blocks`` are prepared with :func:`kltune.distributed.prepare`
    (pass them unprepared), each process samples ``prompts_per_iteration``
    prompts of its own with its own random stream (``seed`` + a per-process
    offset; process 0 uses ``seed``), metrics are averaged over processes and
    only the main process writes files or shows progress. See
    :mod:`kltune.distributed`.

    Args:
        prompts: the prompt pool; each iteration draws ``prompts_per_iteration``
            (per process).
        blocks: the blocks (policy, reference, reward, objective, optimiser).
        state: controller and baseline at the start.
        iterations: the total number of iterations of the run (a resumed run
            continues up to it).
        out_dir: folder for metrics, samples and checkpoints.
        seed: seeds the run's own generator (sampling, prompts, minibatches).
        sample_every: log completions every this many iterations (0: never).
        checkpoint_every: checkpoint every this many iterations (0: never).
        resume: continue from the newest checkpoint in ``out_dir`` if any.
        tracker: called with ``(metrics, iteration)`` after each iteration
            (e.g. a TensorBoard writer or ``accelerator.log``).
        is_main_process: False on other ranks: nothing is written or shown
            (set from ``accelerator`` when there is one).
        accelerator: an ``accelerate.Accelerator`` for a data-parallel run.

    Returns:
        The final loop state.
    """
    _check_counts(
        iterations=(iterations, 0),
        sample_every=(sample_every, 0),
        checkpoint_every=(checkpoint_every, 0),
        prompts_per_iteration=(prompts_per_iteration, 1),
    )
    out = Path(out_dir)
    ranks = _Ranks.of(accelerator, is_main_process)
    if accelerator is not None:
        blocks = prepare(blocks, accelerator)
    is_main_process = ranks.main
    generator = torch.Generator(device="cpu").manual_seed(seed + _RANK_SEED_STRIDE * ranks.rank)
    reference_texts: list[str] | None = None
    if resume:
        state, reference_texts = _restore(out, blocks, state, generator, ranks)
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    detector = _collapse_detector(reference_texts, collapse_threshold)
    bar = tqdm(
        total=iterations, initial=state.iteration, disable=not (progress and is_main_process)
    )
    with (
        _open(out / "metrics.jsonl", is_main_process) as metrics_file,
        _open(out / "samples.jsonl", is_main_process) as samples_file,
    ):
        while state.iteration < iterations:
            batch = ranks.share(prompts, prompts_per_iteration, state.iteration, seed)
            start = time.perf_counter()
            state, rollout, metrics = ppo_iteration(
                batch, blocks, state, sampling, optimisation, generator
            )
            metrics["time/iteration_seconds"] = time.perf_counter() - start
            texts = ranks.gather(list(rollout.completions))
            if reference_texts is None:  # π_ref's own samples (iteration 0), kept in checkpoints
                reference_texts = texts
                detector = _collapse_detector(texts, collapse_threshold)
            diversity = diversity_metrics(texts)
            metrics |= diversity | (detector.metrics(diversity) if detector else {})
            if metrics_file is not None:
                _write_line(metrics_file, metrics)
            if samples_file is not None and _due(state.iteration, sample_every):
                _write_line(samples_file, _samples_record(state.iteration, rollout, 8))
            if tracker is not None:
                tracker(metrics, state.iteration)
            if checkpoint_every and state.iteration % checkpoint_every == 0:
                generators = ranks.gather([generator.get_state()])
                if is_main_process:
                    _checkpoint(out, blocks, state, generators, reference_texts)
            _show_progress(bar, metrics)
    bar.close()
    return state


def _check_counts(**counts: tuple[int, int]) -> None:
    """Each ``name=(value, least)``: an int no smaller than ``least``, before anything is written."""
    for name, (value, least) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _due(iteration: int, every: int) -> bool:
    """Log samples at the first iteration and every ``every`` iterations (0: never)."""
    return bool(every) and iteration % every in (0, 1)


def _show_progress(bar: Any, metrics: Metrics) -> None:
    bar.set_postfix(
        reward=f"{metrics['reward/score_mean']:.3f}",
        kl=f"{metrics['kl/mean']:.2f}",
        beta=f"{metrics['kl/beta']:.3f}",
    )
    bar.update(1)


def _collapse_detector(texts: list[str] | None, threshold: float) -> CollapseDetector | None:
    """A detector against the first iteration's samples (π_ref's own), or None when
    there are none yet or they have no bigram to compare with (e.g. a random
    model's unspaced output)."""
    if texts is None or diversity_metrics(texts)["diversity/distinct_2"] <= 0:
        return None
    return CollapseDetector.from_reference(texts, threshold=threshold)


def _checkpoint(
    out: Path,
    blocks: Blocks,
    state: LoopState,
    generators: list[torch.Tensor],
    reference_texts: list[str] | None,
) -> None:
    save_checkpoint(
        out / "checkpoints",
        iteration=state.iteration,
        policy=blocks.policy,
        optimizer=blocks.optimizer,
        controller=state.controller,
        baseline=state.baseline,
        generator=generators[0] if len(generators) == 1 else generators,
        metrics_lines=state.iteration,
        value_optimizer=blocks.value_fit.optimizer if blocks.value_fit else None,
        extra={
            "total_skips": state.total_skips,
            "consecutive_skips": state.consecutive_skips,
            "collapse_reference": reference_texts,
        },
    )


class _open:
    """Append to ``path`` on the main process; a no-op context elsewhere."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.handle: TextIO | None = None

    def __enter__(self) -> TextIO | None:
        if self.enabled:
            self.handle = self.path.open("a", encoding="utf-8")
        return self.handle

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()

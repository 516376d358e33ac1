"""A thin driver around :func:`kltune.loop.ppo_iteration`: progress, logs, checkpoints.

Files written under ``out_dir``:

- ``metrics.jsonl``: one JSON object per iteration, namespaced keys (one line
  written and flushed at a time, so an interrupted run loses at most the line
  being written, which :func:`kltune.plots.read_metrics` skips);
- ``samples.jsonl``: prompts and completions every ``sample_every`` iterations;
- ``checkpoints/iter_NNNNNN/``: see :mod:`kltune.checkpoint`;
- ``.lock``: held by the running process (see :func:`train`).

Metrics are strict JSON: a non-finite value (NaN, ±inf) is written as ``null``.
"""

import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from tqdm.auto import tqdm

from kltune import _runconfig as runconfig
from kltune._checks import check_count
from kltune._runfiles import RunFolderLockedError, RunLock, append_line, io_error, strict_json
from kltune.checkpoint import (
    checkpoints,
    estimated_size,
    latest_checkpoint,
    load_latest_checkpoint,
    remove_partial_saves,
    save_checkpoint,
)
from kltune.diagnostics import CollapseDetector, diversity_metrics
from kltune.distributed import prepare
from kltune.loop import Blocks, LoopState, Metrics, Sampling, Updates, ppo_iteration
from kltune.rollout import Rollout

if TYPE_CHECKING:
    from accelerate import Accelerator

Tracker = Callable[[Metrics, int], None]

RunConfigMismatchError = runconfig.RunConfigMismatchError

__all__ = [
    "RunConfigMismatchError",
    "RunFolderLockedError",
    "Tracker",
    "prompts_for_iteration",
    "train",
]

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
    append_line(handle, Path(handle.name), strict_json(record))


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
    """The state of the newest usable checkpoint, and the collapse detector's
    reference texts; the logs are cut back to that checkpoint (to nothing, with a
    warning, when there is none)."""
    restored = load_latest_checkpoint(
        out_dir / "checkpoints",
        policy=blocks.policy,
        optimizer=blocks.optimizer,
        generator=generator,
        baseline=state.baseline,
        value_optimizer=blocks.value_fit.optimizer if blocks.value_fit else None,
        rank=ranks.rank,
    )
    if restored is None:
        logged = _count_lines(out_dir / "metrics.jsonl")
        if logged:
            warnings.warn(
                f"resume=True but {out_dir / 'checkpoints'} holds no usable checkpoint: the "
                f"run starts over from iteration 0, and the {logged} lines already in "
                "metrics.jsonl (and samples.jsonl) are dropped",
                stacklevel=3,
            )
        if ranks.main:
            _truncate_lines(out_dir / "metrics.jsonl", lambda i, _: False)
            _truncate_lines(out_dir / "samples.jsonl", lambda i, _: False)
        return state, None
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


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _prepare_folder(out: Path, resume: bool, checkpoint_every: int, blocks: Blocks) -> None:
    """Before the first iteration (under the lock): the layout is valid, a fresh run
    does not mix into an old one, interrupted saves are removed, and a checkpoint
    fits on the disk."""
    for name, kind in (
        ("checkpoints", "folder"),
        ("metrics.jsonl", "file"),
        ("samples.jsonl", "file"),
    ):
        path = out / name
        if path.exists() and (path.is_dir() != (kind == "folder")):
            raise ValueError(f"{path} exists and is not a {kind}; move it out of out_dir")
    if not resume:
        logged = _count_lines(out / "metrics.jsonl")
        saved = checkpoints(out / "checkpoints")
        if logged or saved:
            raise FileExistsError(
                f"{out} already holds a run ({logged} lines in metrics.jsonl, "
                f"{len(saved)} checkpoints): pass resume=True to continue it, or give "
                "this run another out_dir (or delete that one)"
            )
    remove_partial_saves(out / "checkpoints")  # left by a kill during a save
    if checkpoint_every:
        need = estimated_size(blocks.policy, blocks.optimizer)
        free = shutil.disk_usage(out).free
        if free < 2 * need:
            raise OSError(
                28,  # ENOSPC
                f"{out} has {free / 2**20:.0f} MiB free, and one checkpoint of this "
                f"policy and optimiser takes about {need / 2**20:.0f} MiB (room for two "
                "is needed while the older is replaced): free some space, choose "
                "another out_dir, or checkpoint less (checkpoint_every=0)",
                str(out),
            )


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
    prompts: Iterable[str],
    blocks: Blocks,
    state: LoopState,
    *,
    iterations: int,
    out_dir: str | Path,
    prompts_per_iteration: int = 8,
    sampling: Sampling = Sampling(),
    updates: Updates = Updates(),
    seed: int = 0,
    sample_every: int = 5,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = False,
    allow_config_change: bool = False,
    collapse_threshold: float = 0.5,
    tracker: Tracker | None = None,
    progress: bool = True,
    is_main_process: bool = True,
    accelerator: "Accelerator | None" = None,
    optimisation: Updates | None = None,
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

    The run folder is the run's alone: the main process holds an exclusive OS
    lock on ``out_dir/.lock`` until it returns (a crash releases it), so a second
    run on the same folder fails at once, naming the holder. A fresh run refuses a
    folder that already holds logs or checkpoints; ``resume=True`` continues from
    the newest checkpoint that verifies (an older one, with a warning, when the
    newest is damaged) and cuts ``metrics.jsonl`` and ``samples.jsonl`` back to
    it, so every iteration is logged exactly once; with no usable checkpoint it
    warns and starts over with empty logs. Before the first iteration the layout
    is checked, folders left by an interrupted save are removed, and with
    checkpoints on, the free space for two of them. A failed write names its
    cause (full disk, file-size limit, no permission) and the path.

    Args:
        prompts: the prompt pool: any iterable of non-empty strings (a list, a
            tuple, a generator; not a single string). Each iteration draws
            ``prompts_per_iteration`` of them (per process), walking the pool in
            seeded passes (:func:`prompts_for_iteration`).
        blocks: the blocks (policy, reference, reward, objective, optimiser; the
            learning rate is the optimiser's).
        state: the KL controller (so β) and the baseline at the start.
        iterations: the total number of iterations of the run (a resumed run
            continues up to it).
        out_dir: folder for metrics, samples, checkpoints and the run's
            configuration (created if needed; one run per folder).
        prompts_per_iteration: prompts per iteration (8 by default); the batch is
            this times ``sampling.completions_per_prompt`` completions.
        sampling: how completions are drawn (:class:`~kltune.loop.Sampling`:
            length, temperature, completions per prompt).
        updates: how the batch becomes optimiser steps
            (:class:`~kltune.loop.Updates`: epochs, minibatch size, clipping).
        seed: seeds the run's own generator (sampling, prompts, minibatches).
        sample_every: log 8 completions at iteration 1 (the reference's own) and
            at every multiple of this (0: never).
        checkpoint_every: checkpoint every this many iterations (0, the default:
            never, and a resume starts over).
        keep_checkpoints: how many of the newest checkpoints to keep (>= 1).
        resume: continue from the newest usable checkpoint in ``out_dir``; the
            settings must be those the run started with (recorded in
            ``run_config.json``).
        allow_config_change: with ``resume``, continue even though settings
            differ from the recorded ones: the new settings apply (a new
            controller or learning rate replaces the checkpoint's), a warning
            lists the differences, ``run_config.json`` records them and the first
            resumed iteration logs ``event/config_changed``.
        collapse_threshold: the collapse detector flags an iteration whose
            diversity falls below this fraction of the reference's (0.5).
        tracker: called with ``(metrics, iteration)`` after each iteration
            (e.g. a TensorBoard writer or ``accelerator.log``).
        progress: show a progress bar with reward, KL and β (True).
        is_main_process: False on other ranks: nothing is written or shown
            (set from ``accelerator`` when there is one).
        accelerator: an ``accelerate.Accelerator`` for a data-parallel run.
        optimisation: deprecated name of ``updates`` (removed in the next release).

    On Ctrl-C the iteration in progress is abandoned, and a message says how many
    iterations are logged, which checkpoint is kept and the call that resumes;
    the ``KeyboardInterrupt`` then propagates. A resumed run prints the
    iteration it resumed from.

    Returns:
        The final loop state.

    Raises:
        kltune.driver.RunFolderLockedError: another run holds ``out_dir``.
        kltune.driver.RunConfigMismatchError: ``resume`` with settings that
            differ from the run's, listing each difference.
        FileExistsError: ``out_dir`` holds a run and ``resume`` is False.
        TypeError: ``prompts`` is a single string, or holds a non-string.
        ValueError: a count out of range, settings that cannot work together
            (a group baseline with one completion per prompt, GAE without a value
            head, a minibatch that does not divide the batch), or ``out_dir`` (or
            a file in it) is not of the kind it must be.
        OSError: the folder cannot be written, or a checkpoint would not fit.
    """
    if optimisation is not None:
        warnings.warn(
            "train(optimisation=...) is renamed train(updates=...); the old name goes in "
            "the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        updates = optimisation
    _check_counts(
        iterations=(iterations, 0),
        sample_every=(sample_every, 0),
        checkpoint_every=(checkpoint_every, 0),
        keep_checkpoints=(keep_checkpoints, 1),
        prompts_per_iteration=(prompts_per_iteration, 1),
    )
    pool = runconfig.check_prompts(prompts)
    runconfig.check_settings(blocks, state, sampling, updates, prompts_per_iteration)
    out = Path(out_dir)
    ranks = _Ranks.of(accelerator, is_main_process)
    if accelerator is not None:
        blocks = prepare(blocks, accelerator)
    if ranks.main:
        if out.exists() and not out.is_dir():
            raise ValueError(f"out_dir {out} is a file, not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise io_error(error, out, "create the run folder") from error
    with RunLock(out) if ranks.main else nullcontext():
        changed: list[str] = []
        if ranks.main:
            _prepare_folder(out, resume, checkpoint_every, blocks)
            config = runconfig.describe(
                pool, blocks, state, sampling, updates, seed, prompts_per_iteration
            )
            changed = _reconcile_config(out, config, resume, allow_config_change)
        run = _Run(
            prompts=pool,
            out=out,
            ranks=ranks,
            iterations=iterations,
            prompts_per_iteration=prompts_per_iteration,
            sampling=sampling,
            updates=updates,
            seed=seed,
            sample_every=sample_every,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            collapse_threshold=collapse_threshold,
            tracker=tracker,
            progress=progress,
        )
        return _run(run, blocks, state, resume=resume, changed=changed)


def _reconcile_config(out: Path, config: dict[str, Any], resume: bool, allow: bool) -> list[str]:
    """Record the run's configuration; on resume, compare it with the recorded one and
    refuse a difference unless ``allow`` (then return the differences)."""
    recorded = runconfig.read(out) if resume else None
    if recorded is None or "config" not in recorded:
        runconfig.write(out, {"config": config, "changes": []})
        return []
    changed = runconfig.differences(recorded["config"], config)
    if changed and not allow:
        listed = "\n  ".join(changed)
        raise runconfig.RunConfigMismatchError(
            f"resuming {out} with settings that differ from the run's "
            f"({out / runconfig.FILE}):\n  {listed}\nA run continued with other settings "
            "is no longer one run. Resume with the original settings, start a new run in "
            "another out_dir, or pass allow_config_change=True to continue with the new "
            "settings (the change is recorded, and logged as event/config_changed)."
        )
    if changed:
        warnings.warn(
            f"continuing {out} with changed settings: " + "; ".join(changed), stacklevel=3
        )
        history = [*recorded.get("changes", []), {"differences": changed}]
        runconfig.write(out, {"config": config, "changes": history})
    return changed


@dataclasses.dataclass(frozen=True)
class _Run:
    """The settings of one :func:`train` call, checked, as its stages need them."""

    prompts: list[str]
    out: Path
    ranks: "_Ranks"
    iterations: int
    prompts_per_iteration: int
    sampling: Sampling
    updates: Updates
    seed: int
    sample_every: int
    checkpoint_every: int
    keep_checkpoints: int
    collapse_threshold: float
    tracker: Tracker | None
    progress: bool


def _run(
    run: _Run, blocks: Blocks, state: LoopState, *, resume: bool, changed: list[str]
) -> LoopState:
    """The iterations of :func:`train`, once the folder is locked and checked."""
    out, ranks = run.out, run.ranks
    # On the policy's device: sampling draws there, with no host-to-device copy per token.
    generator = torch.Generator(device=blocks.policy.device)
    generator.manual_seed(run.seed + _RANK_SEED_STRIDE * ranks.rank)
    reference_texts: list[str] | None = None
    requested = state.controller
    hyperparameters = [
        {k: v for k, v in group.items() if k != "params"} for group in blocks.optimizer.param_groups
    ]
    if resume:
        state, reference_texts = _restore(out, blocks, state, generator, ranks)
        if any(line.startswith("controller") for line in changed):
            state = dataclasses.replace(state, controller=requested)  # the new one, allowed
        if any(line.startswith("optimizer") for line in changed):
            for group, wanted in zip(blocks.optimizer.param_groups, hyperparameters, strict=True):
                group.update(wanted)  # the requested learning rate (etc.), allowed
        if ranks.main and state.iteration:
            print(
                f"kltune: resumed {out} at iteration {state.iteration} of {run.iterations} "
                f"(controller {state.controller.state_dict()}, optimiser state of "
                f"{len(blocks.optimizer.state)} parameters restored)",
                file=sys.stderr,
            )
    event = {"event/config_changed": 1.0} if changed else {}
    try:
        return _iterate(run, blocks, state, generator, reference_texts, event)
    except KeyboardInterrupt:
        if ranks.main:
            _explain_interrupt(out, run.checkpoint_every)
        raise


def _explain_interrupt(out: Path, checkpoint_every: int) -> None:
    """After Ctrl-C: what was kept, and the call that continues the run."""
    newest = latest_checkpoint(out / "checkpoints")
    logged = _count_lines(out / "metrics.jsonl")
    if newest is None:
        kept = (
            "no checkpoint was written (checkpoint_every=0)"
            if not checkpoint_every
            else f"no checkpoint yet (the first comes at iteration {checkpoint_every})"
        )
        then = "a resume starts over from iteration 0"
    else:
        kept = f"the last checkpoint is {newest}"
        then = f"a resume continues from iteration {int(newest.name.split('_')[-1])}"
    print(
        f"\nkltune: interrupted; the iteration in progress was abandoned. {logged} "
        f"iterations are logged in {out / 'metrics.jsonl'}; {kept}, so {then}. "
        f"To resume, run the same script with kltune.train(..., out_dir={str(out)!r}, "
        "resume=True).",
        file=sys.stderr,
    )


def _iterate(
    run: _Run,
    blocks: Blocks,
    state: LoopState,
    generator: torch.Generator,
    reference_texts: list[str] | None,
    event: dict[str, float],
) -> LoopState:
    """The loop of :func:`train`: one PPO iteration, its logs and checkpoint, until done."""
    out, ranks, is_main_process = run.out, run.ranks, run.ranks.main
    detector = _collapse_detector(reference_texts, run.collapse_threshold)
    bar = tqdm(
        total=run.iterations,
        initial=state.iteration,
        disable=not (run.progress and is_main_process),
    )
    with (
        _open(out / "metrics.jsonl", is_main_process) as metrics_file,
        _open(out / "samples.jsonl", is_main_process) as samples_file,
    ):
        while state.iteration < run.iterations:
            batch = ranks.share(run.prompts, run.prompts_per_iteration, state.iteration, run.seed)
            start = time.perf_counter()
            state, rollout, metrics = ppo_iteration(
                batch, blocks, state, run.sampling, run.updates, generator
            )
            metrics["time/iteration_seconds"] = time.perf_counter() - start
            texts = ranks.gather(list(rollout.completions))
            if reference_texts is None:  # π_ref's own samples (iteration 0), kept in checkpoints
                reference_texts = texts
                detector = _collapse_detector(texts, run.collapse_threshold)
            diversity = diversity_metrics(texts)
            metrics |= diversity | (detector.metrics(diversity) if detector else {}) | event
            event = {}
            if metrics_file is not None:
                _write_line(metrics_file, metrics)
            if samples_file is not None and _due(state.iteration, run.sample_every):
                _write_line(samples_file, _samples_record(state.iteration, rollout, 8))
            if run.tracker is not None:
                run.tracker(metrics, state.iteration)
            if run.checkpoint_every and state.iteration % run.checkpoint_every == 0:
                generators = ranks.gather([generator.get_state()])
                if is_main_process:
                    _checkpoint(
                        out, blocks, state, generators, reference_texts, run.keep_checkpoints
                    )
            _show_progress(bar, metrics)
    bar.close()
    return state


def _check_counts(**counts: tuple[int, int]) -> None:
    """Each ``name=(value, least)``: an int no smaller than ``least``, before anything is written."""
    for name, (value, least) in counts.items():
        check_count(value, name=name, minimum=least)


def _due(iteration: int, every: int) -> bool:
    """Log samples at iteration 1 (π_ref's own) and at every multiple of ``every`` (0: never)."""
    return bool(every) and (iteration == 1 or iteration % every == 0)


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
    keep: int,
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
        keep=keep,
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
            try:
                self.handle = self.path.open("a", encoding="utf-8")
            except OSError as error:
                raise io_error(error, self.path, "open") from error
        return self.handle

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()

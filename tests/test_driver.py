"""The driver: metrics and samples files, checkpoints, exact resume, and prompt order."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kltune
import kltune.checkpoint
from helpers import tiny_blocks
from kltune.checkpoint import latest_checkpoint
from kltune.driver import prompts_for_iteration
from kltune.plots import read_metrics

PROMPTS = ["The movie", "A film about", "I think", "Overall the", "It was"]
SETTINGS = dict(
    prompts_per_iteration=2,
    sampling=kltune.Sampling(max_new_tokens=5, completions_per_prompt=2),
    updates=kltune.Updates(epochs=2, minibatch_size=2),
    progress=False,
)


def _train(out: Path, iterations: int, resume: bool = False, checkpoint_every: int = 0):
    blocks, state = tiny_blocks(
        baseline=kltune.EMABaseline(decay=0.5),
        controller=kltune.AdaptiveKLController(beta=0.1, target=1.0, horizon=10),
    )
    state = kltune.train(
        PROMPTS,
        blocks,
        state,
        iterations=iterations,
        out_dir=out,
        resume=resume,
        checkpoint_every=checkpoint_every,
        sample_every=1,
        seed=3,
        **SETTINGS,
    )
    return blocks, state


def _timeless(records: list[dict[str, float]]) -> list[dict[str, float]]:
    """Metrics without wall times (the only keys two identical runs may differ in)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_metrics_and_samples_files_have_one_line_per_iteration(tmp_path: Path) -> None:
    _train(tmp_path, iterations=3)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1.0, 2.0, 3.0]
    for key in (
        "reward/score_mean",
        "kl/mean",
        "kl/beta",
        "policy/entropy",
        "diversity/distinct_2",
        "time/iteration_seconds",
    ):
        assert all(key in r for r in records)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and all(len(s["samples"]) > 0 for s in samples)


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path: Path) -> None:
    # N straight == N/2, stop, resume, N/2: same weights, same metrics, same beta.
    straight_blocks, straight_state = _train(tmp_path / "straight", iterations=4)
    _train(tmp_path / "split", iterations=2, checkpoint_every=2)
    resumed_blocks, resumed_state = _train(tmp_path / "split", iterations=4, resume=True)
    assert resumed_state.iteration == 4
    assert resumed_state.controller == straight_state.controller
    assert resumed_state.baseline == straight_state.baseline
    for (name, a), b in zip(
        straight_blocks.policy.state_dict().items(),
        resumed_blocks.policy.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    straight = _timeless(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    resumed = _timeless(read_metrics(tmp_path / "split" / "metrics.jsonl"))
    assert straight == resumed  # includes collapse/* (its reference travels in the checkpoint)
    assert any("collapse/ratio" in r for r in resumed[2:])
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("straight", "split")]
    assert samples[0] == samples[1]


def test_resume_after_a_crash_drops_lines_written_after_the_checkpoint(tmp_path: Path) -> None:
    _train(tmp_path / "straight", iterations=3)
    _train(tmp_path / "split", iterations=3, checkpoint_every=2)  # iteration 3 not checkpointed
    with (tmp_path / "split" / "metrics.jsonl").open("a") as f:
        f.write('{"half-written')  # a crash mid-line
    _train(tmp_path / "split", iterations=3, resume=True)
    texts = [(tmp_path / run / "samples.jsonl").read_text() for run in ("straight", "split")]
    assert texts[0] == texts[1]
    straight, split = (
        _timeless(read_metrics(tmp_path / run / "metrics.jsonl")) for run in ("straight", "split")
    )
    assert straight == split


def test_checkpoints_keep_the_newest_two(tmp_path: Path) -> None:
    _train(tmp_path, iterations=3, checkpoint_every=1)
    folders = sorted((tmp_path / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["iter_000002", "iter_000003"]
    assert latest_checkpoint(tmp_path / "checkpoints") == folders[-1]


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path: Path) -> None:
    # A child process saves checkpoint 1 and then is SIGKILLed in the middle of saving 2.
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import kltune.checkpoint as ck
        from helpers import tiny_blocks
        blocks, state = tiny_blocks()
        args = dict(policy=blocks.policy, optimizer=blocks.optimizer,
                    controller=state.controller, baseline=state.baseline,
                    generator=torch.Generator(), metrics_lines=0)
        ck.save_checkpoint(ck.Path({str(tmp_path)!r}), iteration=1, **args)
        real_save = ck.torch.save
        def dying_save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)   # dies after writing one file of checkpoint 2
        ck.torch.save = dying_save
        ck.save_checkpoint(ck.Path({str(tmp_path)!r}), iteration=2, **args)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "iter_000001"
    blocks, _ = tiny_blocks()
    restored = kltune.checkpoint.load_checkpoint(
        latest, policy=blocks.policy, optimizer=blocks.optimizer, generator=torch.Generator()
    )
    assert restored.iteration == 1
    assert not (tmp_path / "iter_000002").exists()
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".partial-")]
    assert len(leftovers) <= 1  # a hidden scratch folder may remain; it is never loaded


def test_prompts_for_iteration_walks_the_pool_in_passes() -> None:
    # Every prompt once per pass, and a pure function of (iteration, seed).
    per_iteration, passes = 2, 3
    stream = [
        p
        for i in range(len(PROMPTS) * passes // per_iteration)
        for p in prompts_for_iteration(PROMPTS, per_iteration, i, seed=1)
    ]
    for k in range(passes - 1):
        assert sorted(stream[k * 5 : (k + 1) * 5]) == sorted(PROMPTS)
    assert prompts_for_iteration(PROMPTS, 2, 7, 1) == prompts_for_iteration(PROMPTS, 2, 7, 1)
    with pytest.raises(ValueError, match="empty"):
        prompts_for_iteration([], 2, 0, 0)


@pytest.mark.parametrize(
    "bad", [{"checkpoint_every": -1}, {"sample_every": -2}, {"prompts_per_iteration": 0}]
)
def test_bad_driver_settings_are_named(tmp_path: Path, bad: dict) -> None:
    blocks, state = tiny_blocks()
    name = next(iter(bad))
    settings = {"iterations": 1, "out_dir": tmp_path, "progress": False} | bad
    with pytest.raises(ValueError, match=name):
        kltune.train(["The movie"], blocks, state, **settings)
    assert not any(tmp_path.iterdir())  # nothing half-written

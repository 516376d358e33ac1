"""A run folder cannot be mixed, duplicated or silently damaged: the lock, exact
resume in every case, verified checkpoints with fall-back, clear I/O errors,
strict JSON logs, and kills at random moments."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kltune
from helpers import tiny_blocks
from kltune._runfiles import strict_json
from kltune.checkpoint import CheckpointError, load_checkpoint, load_latest_checkpoint
from kltune.driver import RunFolderLockedError
from kltune.plots import read_metrics

PROMPTS = ["The movie", "A film about", "I think", "Overall the", "It was"]
SETTINGS = dict(
    prompts_per_iteration=2,
    sampling=kltune.Sampling(max_new_tokens=5, completions_per_prompt=2),
    updates=kltune.Updates(epochs=2, minibatch_size=2),
    progress=False,
    seed=3,
)
HERE = Path(__file__).parent


def _blocks():
    return tiny_blocks(
        baseline=kltune.EMABaseline(decay=0.5),
        controller=kltune.AdaptiveKLController(beta=0.1, target=1.0, horizon=10),
    )


def _train(out: Path, iterations: int, **kwargs):
    blocks, state = _blocks()
    kwargs = {"sample_every": 1} | kwargs
    state = kltune.train(
        PROMPTS, blocks, state, iterations=iterations, out_dir=out, **SETTINGS, **kwargs
    )
    return blocks, state


def _timeless(path: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(path)]


def _same_run(a: Path, b: Path, blocks_a, blocks_b) -> None:
    """Weights bit for bit, metrics line for line (wall times aside), samples byte for byte."""
    for (name, x), y in zip(
        blocks_a.policy.state_dict().items(), blocks_b.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name
    assert _timeless(a / "metrics.jsonl") == _timeless(b / "metrics.jsonl")
    assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text()


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 4-iteration run, the yardstick of every resume."""
    out = tmp_path_factory.mktemp("straight")
    blocks, _ = _train(out, 4)
    return out, blocks


# --------------------------------------------------------------------------- the lock


def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    errors: list[str] = []

    def intruder(metrics: dict, iteration: int) -> None:
        if iteration == 1:
            with pytest.raises(RunFolderLockedError) as caught:
                _train(tmp_path, 3, resume=True)
            errors.append(str(caught.value))

    _train(tmp_path, 3, tracker=intruder)
    assert len(errors) == 1
    assert f"PID {os.getpid()}" in errors[0] and "another out_dir" in errors[0]
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in lines] == [1.0, 2.0, 3.0]  # each iteration once


def test_a_run_in_another_process_holds_the_folder(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        import kltune
        from helpers import tiny_blocks
        blocks, state = tiny_blocks()
        def wait(metrics, iteration):
            print("running", flush=True)
            time.sleep(120)
        kltune.train(["The movie"], blocks, state, iterations=2, out_dir={str(tmp_path)!r},
                     progress=False, tracker=wait)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"running"
        blocks, state = tiny_blocks()
        with pytest.raises(RunFolderLockedError, match=f"PID {child.pid} "):
            kltune.train(
                ["The movie"],
                blocks,
                state,
                iterations=2,
                out_dir=tmp_path,
                progress=False,
                resume=True,
            )
        assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1  # the holder's line alone
    finally:
        child.kill()
        child.communicate()


def test_a_crashed_run_releases_its_lock(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(HERE)!r})
        import kltune
        from helpers import tiny_blocks
        blocks, state = tiny_blocks()
        def die(metrics, iteration):
            os.kill(os.getpid(), signal.SIGKILL)
        kltune.train(["The movie"], blocks, state, iterations=3, out_dir={str(tmp_path)!r},
                     progress=False, tracker=die)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    blocks, state = tiny_blocks()
    with pytest.warns(UserWarning, match="no usable checkpoint"):
        kltune.train(
            ["The movie"],
            blocks,
            state,
            iterations=1,
            out_dir=tmp_path,
            progress=False,
            resume=True,
        )
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


# --------------------------------------------------------------------------- resume


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path: Path) -> None:
    _train(tmp_path, 1)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a run \(1 lines.*resume=True"):
        _train(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_resume_without_a_checkpoint_starts_over_with_empty_logs(tmp_path: Path, straight) -> None:
    _train(tmp_path, 2)  # logs two iterations, saves no checkpoint
    with pytest.warns(UserWarning, match=r"starts over from iteration 0.*2 lines"):
        blocks, _ = _train(tmp_path, 4, resume=True)
    _same_run(tmp_path, straight[0], blocks, straight[1])


def test_resume_falls_back_past_an_incomplete_checkpoint(tmp_path: Path, straight) -> None:
    _train(tmp_path, 3, checkpoint_every=1)  # keeps iter 2 and 3
    (tmp_path / "checkpoints" / "iter_000003" / "manifest.json").unlink()  # a save cut short
    with pytest.warns(UserWarning, match=r"iter_000003 is incomplete"):
        blocks, state = _train(tmp_path, 4, resume=True, checkpoint_every=1)
    assert state.iteration == 4
    _same_run(tmp_path, straight[0], blocks, straight[1])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_weights(path: Path) -> None:
    """NaN written into the weights, with the manifest rewritten to match (so only the
    finiteness check can catch it)."""
    weights = load_file(str(path))
    name = next(iter(weights))
    weights[name][0] = float("nan")
    save_file(weights, str(path))
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    from kltune._runfiles import file_sha256

    manifest[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest_path.write_text(json.dumps(manifest))


CORRUPTIONS = {
    "flipped byte in the weights": ("policy.safetensors", _flip_a_byte, "checksum"),
    "truncated optimiser": (
        "optimizer.pt",
        lambda p: p.write_bytes(p.read_bytes()[:100]),
        r"has 100 bytes, the manifest says",
    ),
    "empty rng": ("rng.pt", lambda p: p.write_bytes(b""), "has 0 bytes"),
    "missing rng": ("rng.pt", Path.unlink, r"rng.pt is missing"),
    "truncated state.json": (
        "state.json",
        lambda p: p.write_text(p.read_text()[:20]),
        "the manifest says",
    ),
    "NaN in the weights": ("policy.safetensors", _nan_weights, "non-finite values"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_checkpoint_is_named_and_the_run_falls_back(
    case: str, tmp_path: Path, straight
) -> None:
    name, damage, message = CORRUPTIONS[case]
    _train(tmp_path, 3, checkpoint_every=1)
    newest = tmp_path / "checkpoints" / "iter_000003"
    damage(newest / name)
    # loading it directly fails before anything is touched
    blocks, _ = _blocks()
    before = {k: v.clone() for k, v in blocks.policy.state_dict().items()}
    generator_before = torch.Generator().manual_seed(5)
    generator = torch.Generator().manual_seed(5)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(
            newest, policy=blocks.policy, optimizer=blocks.optimizer, generator=generator
        )
    assert str(newest) in str(caught.value)
    for key, value in blocks.policy.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert blocks.optimizer.state_dict()["state"] == {}
    assert torch.equal(generator.get_state(), generator_before.get_state())
    # the driver warns, falls back to iteration 2, and ends where the straight run ends
    with pytest.warns(UserWarning, match=message):
        blocks, _ = _train(tmp_path, 4, resume=True, checkpoint_every=1)
    _same_run(tmp_path, straight[0], blocks, straight[1])


def test_no_checkpoint_that_verifies_gives_none(tmp_path: Path) -> None:
    _train(tmp_path, 1, checkpoint_every=1)
    _flip_a_byte(tmp_path / "checkpoints" / "iter_000001" / "optimizer.pt")
    blocks, _ = _blocks()
    with pytest.warns(UserWarning, match="checksum"):
        restored = load_latest_checkpoint(
            tmp_path / "checkpoints",
            policy=blocks.policy,
            optimizer=blocks.optimizer,
            generator=torch.Generator(),
        )
    assert restored is None


def test_folders_of_an_interrupted_save_are_removed_at_the_next_start(tmp_path: Path) -> None:
    _train(tmp_path, 1, checkpoint_every=1)
    partial = tmp_path / "checkpoints" / ".partial-abc123"
    partial.mkdir()
    (partial / "policy.safetensors").write_bytes(b"x" * 1000)
    _train(tmp_path, 2, checkpoint_every=1, resume=True)
    assert not partial.exists()


# --------------------------------------------------------------------------- I/O errors


def test_a_file_size_limit_is_reported_as_such_with_the_path(tmp_path: Path) -> None:
    # The metrics lines fit under the limit; the first checkpoint's weights do not.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(HERE)!r})
        import kltune
        from helpers import tiny_blocks
        blocks, state = tiny_blocks()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a fatal signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        kltune.train(["The movie"], blocks, state, iterations=2, out_dir={str(tmp_path)!r},
                     progress=False, checkpoint_every=1)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: [Errno 27]") and "file-size limit" in last, last
    assert "policy.safetensors" in last and str(tmp_path) in last
    assert "enforce fail" not in stderr
    folder = tmp_path / "checkpoints"
    assert list(folder.iterdir()) == []  # no partial folder, no incomplete checkpoint
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_too_little_disk_for_a_checkpoint_is_found_before_the_first_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match=r"MiB free.*checkpoint_every=0") as caught:
        _train(tmp_path, 2, checkpoint_every=1)
    assert caught.value.errno == 28
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_folder_that_cannot_be_written_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (As root a read-only folder is writable, so the refusal is simulated.)
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args, **kwargs) -> None:
        if self.name == "run":
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(
        OSError, match=r"Permission denied \(no permission to write there"
    ) as caught:
        _train(tmp_path / "run", 1)
    assert caught.value.errno == 13 and str(tmp_path / "run") in str(caught.value)


def test_the_layout_is_checked_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(ValueError, match=r"checkpoints exists and is not a folder"):
        _train(tmp_path, 1, checkpoint_every=1)
    assert not (tmp_path / "metrics.jsonl").exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        _train(afile, 1)


# --------------------------------------------------------------------------- logs


def test_metrics_are_strict_json() -> None:
    line = strict_json({"a": float("nan"), "b": float("inf"), "c": [1.0, -float("inf")], "d": 2})
    assert json.loads(line) == {"a": None, "b": None, "c": [1.0, None], "d": 2}


def test_metrics_files_parse_as_strict_json(tmp_path: Path) -> None:
    _train(tmp_path, 2)

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize(
    ("every", "logged"), [(1, [1, 2, 3, 4, 5, 6]), (2, [1, 2, 4, 6]), (3, [1, 3, 6]), (0, [])]
)
def test_sample_every_means_iteration_1_and_every_multiple(
    tmp_path: Path, every: int, logged: list[int]
) -> None:
    _train(tmp_path, 6, sample_every=every)
    text = (tmp_path / "samples.jsonl").read_text() if logged else ""
    assert [json.loads(line)["iteration"] for line in text.splitlines()] == logged


# --------------------------------------------------------------------------- kills


KILLED_RUN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    import torch
    import kltune
    from test_run_folder import PROMPTS, SETTINGS, _blocks
    torch.set_num_threads(1)
    blocks, state = _blocks()
    print("start", flush=True)
    kltune.train(PROMPTS, blocks, state, iterations=4, out_dir={out!r}, sample_every=1,
                 checkpoint_every=1, resume=True, **SETTINGS)
    print("end", flush=True)
    """
)


def _start(out: Path) -> tuple[subprocess.Popen, float]:
    """A child run, returned once its imports are done (and the time it started training)."""
    command = [sys.executable, "-c", KILLED_RUN.format(here=str(HERE), out=str(out))]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"start"
    return child, time.perf_counter()


@pytest.mark.slow
def test_kills_at_random_moments_resume_to_the_uninterrupted_run(tmp_path: Path, straight) -> None:
    # SIGKILL at random moments (imports, sampling, the optimiser, a checkpoint or a log
    # write), then resume to the end: same weights, same logs, every time.
    rng = random.Random(0)
    child, start = _start(tmp_path / "timing")
    assert child.stdout is not None and child.stdout.readline().strip() == b"end"
    training = time.perf_counter() - start  # from the first line of train() to its return
    child.communicate(timeout=600)
    outcomes = []
    # two kills early in the first iteration (before any checkpoint), six anywhere
    fractions = [0.0, 0.05, *(rng.uniform(0.0, 1.0) for _ in range(6))]
    for kill, fraction in enumerate(fractions):
        out = tmp_path / f"kill{kill}"
        child, _ = _start(out)
        time.sleep(fraction * training)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=600)
        saved = sorted(p.name for p in (out / "checkpoints").glob("iter_*")) if out.exists() else []
        outcomes.append(saved[-1] if saved else "none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "starts over" when killed before a checkpoint
            blocks, state = _blocks()
            kltune.train(
                PROMPTS,
                blocks,
                state,
                iterations=4,
                out_dir=out,
                sample_every=1,
                checkpoint_every=1,
                resume=True,
                **SETTINGS,
            )
        _same_run(out, straight[0], blocks, straight[1])
    print("newest checkpoint at each kill:", outcomes)

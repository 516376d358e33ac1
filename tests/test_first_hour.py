"""What a newcomer meets first: inputs checked before any work, resume that refuses a
changed run, Ctrl-C that says how to continue, and the renamed settings."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import kltune
from helpers import tiny_blocks
from kltune.driver import RunConfigMismatchError
from kltune.plots import read_metrics
from strategies import without_runtime_typecheck

PROMPTS = ["The movie", "A film about", "I think", "Overall the"]
HERE = Path(__file__).parent


def _train(out: Path, iterations: int = 1, blocks_state=None, **kwargs):
    blocks, state = blocks_state or tiny_blocks()
    settings = {
        "prompts_per_iteration": 2,
        "sampling": kltune.Sampling(max_new_tokens=4, completions_per_prompt=2),
        "progress": False,
    } | kwargs
    prompts = settings.pop("prompts", PROMPTS)
    return kltune.train(prompts, blocks, state, iterations=iterations, out_dir=out, **settings)


# --------------------------------------------------------------------------- inputs


def test_a_single_string_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"prompts is a single string.*prompts=\['The film'\]"):
        _train(tmp_path / "run", prompts="The film")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_any_iterable_of_strings_is_accepted(tmp_path: Path) -> None:
    _train(tmp_path, prompts=(p for p in PROMPTS), sample_every=1)
    samples = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["samples"]
    assert {s["prompt"] for s in samples} <= set(PROMPTS)


@pytest.mark.parametrize(
    ("prompts", "error", "message"),
    [
        ([], ValueError, "prompts is empty"),
        (["ok", 3], TypeError, r"prompts\[1\] is a int"),
        (["ok", ""], ValueError, r"prompts\[1\] is an empty string"),
        (42, TypeError, "prompts must be an iterable of strings"),
    ],
)
def test_bad_prompts_are_named(tmp_path: Path, prompts, error, message) -> None:
    with without_runtime_typecheck(), pytest.raises(error, match=message):
        _train(tmp_path / "run", prompts=prompts)
    assert not (tmp_path / "run").exists()


def test_settings_that_cannot_work_together_are_refused_before_any_work(tmp_path: Path) -> None:
    one = kltune.Sampling(max_new_tokens=4)
    cases = [
        (
            tiny_blocks(baseline=kltune.LeaveOneOutBaseline()),
            {"sampling": one},
            r"LeaveOneOutBaseline compares .*Sampling\(completions_per_prompt=G\)",
        ),
        (
            tiny_blocks(baseline=kltune.GAEBaseline()),
            {},
            r"GAEBaseline needs the policy's value head: .*value_head=True",
        ),
        (
            tiny_blocks(),
            {"updates": kltune.Updates(minibatch_size=3)},
            r"minibatch_size=3\) does not divide the batch of 4 completions",
        ),
        (
            tiny_blocks(),
            {"updates": kltune.Updates(grad_accumulation_steps=3)},
            r"grad_accumulation_steps=3\) does not divide the minibatch of 4",
        ),
    ]
    for blocks_state, settings, message in cases:
        with pytest.raises(ValueError, match=message):
            _train(tmp_path / "run", blocks_state=blocks_state, **settings)
        assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- resume


def _changed_lr():
    blocks, state = tiny_blocks()
    for group in blocks.optimizer.param_groups:
        group["lr"] = 1e-3
    return blocks, state


# each case: the settings of the resume (built when the case runs), the difference named
CHANGES = {
    "max_new_tokens": (
        lambda: {"sampling": kltune.Sampling(max_new_tokens=5, completions_per_prompt=2)},
        "sampling.max_new_tokens: 4 → 5",
    ),
    "seed": (lambda: {"seed": 7}, "seed: 0 → 7"),
    "prompts_per_iteration": (
        lambda: {"prompts_per_iteration": 1},
        "prompts_per_iteration: 2 → 1",
    ),
    "prompts": (lambda: {"prompts": PROMPTS[:3]}, "prompts.count: 4 → 3"),
    "updates": (lambda: {"updates": kltune.Updates(epochs=2)}, "updates.epochs: 1 → 2"),
    "baseline": (
        lambda: {"blocks_state": tiny_blocks(baseline=kltune.EMABaseline())},
        "baseline.kind: 'MeanBaseline' → 'EMABaseline'",
    ),
    "controller": (
        lambda: {
            "blocks_state": tiny_blocks(
                controller=kltune.ConstraintKLController(beta=0.1, target=2.0, step_size=0.05)
            )
        },
        "controller.kind: 'fixed' → 'constraint'",
    ),
    "learning rate": (
        lambda: {"blocks_state": _changed_lr()},
        "optimizer.param_groups[0].lr: 0.01 → 0.001",
    ),
    "model": (lambda: {"blocks_state": tiny_blocks(architecture="gpt2")}, "model.class"),
}


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_resuming_with_a_changed_setting_is_refused_with_the_difference(
    case: str, tmp_path: Path
) -> None:
    _train(tmp_path, 2, checkpoint_every=1)
    before = (tmp_path / "metrics.jsonl").read_text()
    make, difference = CHANGES[case]
    kwargs = make()
    with pytest.raises(RunConfigMismatchError) as caught:
        _train(tmp_path, 3, resume=True, checkpoint_every=1, **kwargs)
    assert difference in str(caught.value), str(caught.value)
    assert "allow_config_change=True" in str(caught.value)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing touched


def test_an_allowed_change_is_applied_recorded_and_logged(tmp_path: Path) -> None:
    _train(tmp_path, 2, checkpoint_every=1)
    blocks, state = tiny_blocks(controller=kltune.FixedKLController(beta=0.3))
    for group in blocks.optimizer.param_groups:
        group["lr"] = 1e-3
    with pytest.warns(UserWarning, match=r"changed settings: .*lr: 0.01 → 0.001"):
        final = _train(
            tmp_path, 3, blocks_state=(blocks, state), resume=True, allow_config_change=True
        )
    assert final.controller == kltune.FixedKLController(beta=0.3)  # the new controller runs
    assert blocks.optimizer.param_groups[0]["lr"] == 1e-3  # and the new learning rate
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert [r.get("event/config_changed") for r in records] == [None, None, 1.0]
    assert records[2]["kl/beta"] == 0.3
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert any("lr" in line for line in config["changes"][0]["differences"])


def test_a_resume_says_where_it_resumed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _train(tmp_path, 2, checkpoint_every=1)
    _train(tmp_path, 3, resume=True, checkpoint_every=1)
    assert f"kltune: resumed {tmp_path} at iteration 2 of 3" in capsys.readouterr().err


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_keeps_the_checkpoint_and_prints_the_resume_call(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        # a pytest-xdist worker ignores SIGINT, and its children inherit that
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(HERE)!r})
        import kltune
        from helpers import tiny_blocks
        blocks, state = tiny_blocks()
        def slow(metrics, iteration):
            if iteration == 2:
                print("checkpointed", flush=True)
                time.sleep(60)
        kltune.train(["The movie", "I think"], blocks, state, iterations=5,
                     out_dir={str(tmp_path)!r}, progress=False, checkpoint_every=1,
                     tracker=slow, prompts_per_iteration=2,
                     sampling=kltune.Sampling(max_new_tokens=4))
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line == b"checkpointed", child.communicate()[1].decode()[-3000:]
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    message = stderr.decode()
    assert child.returncode != 0
    assert "kltune: interrupted" in message
    assert f"the last checkpoint is {tmp_path / 'checkpoints' / 'iter_000001'}" in message
    assert f"out_dir={str(tmp_path)!r}, resume=True" in message
    # the run it left resumes (from the checkpoint of iteration 1; iteration 2 was
    # logged but its checkpoint was being written after the tracker)
    blocks, state = tiny_blocks()
    state = kltune.train(
        ["The movie", "I think"],
        blocks,
        state,
        iterations=3,
        out_dir=tmp_path,
        progress=False,
        checkpoint_every=1,
        resume=True,
        prompts_per_iteration=2,
        sampling=kltune.Sampling(max_new_tokens=4),
    )
    assert state.iteration == 3
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


# --------------------------------------------------------------------------- names


def test_the_old_names_still_work_for_one_release(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="renamed Updates"):
        old = kltune.Optimisation(epochs=2)
    assert old == kltune.Updates(epochs=2)
    with pytest.warns(DeprecationWarning, match=r"train\(updates=...\)"):
        _train(tmp_path, optimisation=kltune.Updates(epochs=2))
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["config"]["updates"]["epochs"] == 2


def test_read_metrics_gives_the_iteration_as_an_int(tmp_path: Path) -> None:
    _train(tmp_path, 2)
    assert [type(r["iteration"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [int, int]


def test_help_documents_every_argument_of_train_and_every_setting() -> None:
    import inspect

    doc = inspect.getdoc(kltune.train) or ""
    for name in inspect.signature(kltune.train).parameters:
        assert f"{name}:" in doc, name
    for cls in (kltune.Sampling, kltune.Updates):
        doc = inspect.getdoc(cls) or ""
        for name in cls.__dataclass_fields__:
            assert f"{name}:" in doc, (cls.__name__, name)

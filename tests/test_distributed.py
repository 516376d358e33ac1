"""Data-parallel runs under ``accelerate launch`` (two CPU processes, gloo), and
:func:`kltune.distributed.prepare` in one process.

Tolerance for "the same weights" between two processes on half the batch each
and one process on the whole batch: 1e-5 absolute after one update of two Adam
steps at lr 1e-2 (the gradients differ only in the order of float32 sums; the
observed difference is a few 1e-7).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kltune
from helpers import tiny_blocks

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def _launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [launcher, "launch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def test_two_processes_on_half_batches_equal_one_process_on_the_whole(
    tmp_path: Path, device: str
) -> None:
    # On CPUs accelerate starts several processes only through its torchrun launcher
    # (--multi_gpu) or MPI: `--cpu --num_processes 2` silently starts one. The
    # script asks for the CPU itself (Accelerator(cpu=True)): gloo.
    _launch(
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29531",
        str(ROOT / "tests" / "distributed_check.py"),
        str(tmp_path),
        device,
    )
    rank0, rank1, single = (
        load_file(str(tmp_path / f"{name}.safetensors")) for name in ("rank0", "rank1", "single")
    )
    before = tiny_blocks(value_head=True, baseline=kltune.GAEBaseline())[0].policy.state_dict()
    moved = 0
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key  # the processes agree exactly
        torch.testing.assert_close(rank0[key], value, atol=ATOL, rtol=0, msg=key)
        moved += int(not torch.equal(value, before[key]))
    assert moved > len(single) // 2  # the update did change the weights


def test_the_example_config_trains_and_only_the_main_process_writes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _launch(
        "--config_file",
        str(ROOT / "examples" / "accelerate" / "multi_cpu.yaml"),
        "--main_process_port",
        "29532",
        str(ROOT / "examples" / "distributed.py"),
        "--smoke",
        "--iterations",
        "3",
        "--prompts",
        "2",
        "--out",
        str(out),
    )
    info = json.loads((out / "run.json").read_text())
    assert info["processes"] == 2 and info["iterations"] == 3
    assert info["weights_agree"], info["weight_digests"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1.0, 2.0, 3.0]  # written once
    assert (out / "curves.png").is_file()


def test_prepare_in_one_process_changes_nothing() -> None:
    from accelerate import Accelerator

    prompts = ["The movie", "A film about", "I think"]
    sampling = kltune.Sampling(max_new_tokens=5, completions_per_prompt=2)
    results = []
    for accelerate in (False, True):
        blocks, state = tiny_blocks(value_head=True, baseline=kltune.GAEBaseline())
        if accelerate:
            blocks = kltune.distributed.prepare(blocks, Accelerator(cpu=True))
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            state, _, metrics = kltune.ppo_iteration(
                prompts, blocks, state, sampling, kltune.Updates(minibatch_size=3), generator
            )
        results.append((blocks.policy.state_dict(), metrics, state.controller))
    (plain, plain_metrics, plain_beta), (fast, fast_metrics, fast_beta) = results
    for key, value in plain.items():
        assert torch.equal(fast[key], value), key
    assert plain_metrics == pytest.approx(fast_metrics) and plain_beta == fast_beta


def test_a_separately_fitted_baseline_is_refused_on_several_processes() -> None:
    class TwoProcesses:
        num_processes = 2

    blocks, _ = tiny_blocks()
    baseline = kltune.PromptValueBaseline(vocab_size=300)
    value_fit = kltune.ValueFit(baseline, torch.optim.Adam(baseline.parameters()))
    import dataclasses

    with pytest.raises(ValueError, match="value head"):
        kltune.distributed.prepare(dataclasses.replace(blocks, value_fit=value_fit), TwoProcesses())

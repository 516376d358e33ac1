"""benchmarks/gpu.py end to end on the CPU, CI-sized (the script a GPU machine runs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_dry_run_measures_every_size_and_precision_and_writes_the_report(
    tmp_path: Path,
) -> None:
    # TRL is not a test dependency: the dry run here measures kltune only (the TRL
    # half runs under `nox -s gpu -- --device cpu --dry-run`). The device tests are
    # the suite's own test_devices.py, already run.
    result = _run(
        "--device", "cpu", "--dry-run", "--no-trl", "--skip-tests", "--threads", "1",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    payload = json.loads((tmp_path / "gpu.json").read_text())
    runs = payload["runs"]
    assert {(r["work"], r["precision"]) for r in runs} == {
        (w, p) for w in ("4x8", "8x8") for p in ("fp32", "bf16")
    }
    for run in runs:
        assert run["library"] == "kltune" and run["iterations"] == 1
        assert run["s_per_iteration"] > 0 and run["peak_rss_mb"] > 0
        assert run["tokens_per_s"] == pytest.approx(
            run["config"]["completions"] * run["config"]["new_tokens"] / run["s_per_iteration"]
        )
    report = (tmp_path / "report.md").read_text()
    assert "dry run" in report and report.count("| kltune |") == 4
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asking_for_cuda_without_one_names_the_way_out(tmp_path: Path) -> None:
    result = _run("--out", str(tmp_path), "--no-trl")
    assert result.returncode == 2
    assert "no CUDA device here: pass --device cpu" in result.stderr
    assert not (tmp_path / "gpu.json").exists()

"""The GPU check: kltune's device tests on CUDA, then kltune and TRL's PPOTrainer on the same
PPO work on one GPU: seconds per iteration, generated tokens per second, peak GPU memory.

Run it on a machine with a GPU (under 8 minutes on one modern GPU)::

    nox -s gpu                      # fresh environment: torch, kltune, trl 1.12
    python benchmarks/gpu.py --out results/gpu

and end to end on a CPU, CI-sized (a tiny random model, a few tokens)::

    python benchmarks/gpu.py --device cpu --dry-run --out /tmp/gpu

The work is ``benchmarks/trl_ppo.py``'s (the embedded SmolLM2-135M, VADER reward,
1 epoch, 1 minibatch, AdamW, GAE on a learned value function, k1 KL in the
reward), at 64 × 64 and 256 × 64 (completions × new tokens), in float32 and
under bf16 autocast (kltune: ``Policy(autocast_dtype=torch.bfloat16)``; TRL:
``PPOConfig(bf16=True)``). Each measurement is its own process, so that peak
memory is its own; the first iteration is a warm-up. Generated tokens per second
is the nominal work (completions × new tokens) over the seconds per iteration,
the same count for both libraries (a row that stops at EOS early generates fewer).

Writes ``gpu.json`` (everything) and ``report.md`` (the table) under ``--out``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from trl_ppo import Work, spawn  # noqa: E402

#: The device tests (parametrised over the CPU and CUDA): sampling/scoring agreement,
#: the loop, the reference on another device, resume, data-parallel, the functional core.
DEVICE_TESTS = [
    "tests/test_devices.py",
    "tests/test_distributed.py",
    "tests/functional/test_logprobs.py",
    "tests/functional/test_kl.py",
]
SIZES = {"full": [(64, 64), (256, 64)], "dry": [(4, 8), (8, 8)]}


def run_device_tests(out: Path, dry_run: bool) -> dict[str, Any]:
    """pytest over the device tests; the counts of passed, skipped and failed tests."""
    report = out / "device-tests.xml"
    tests = DEVICE_TESTS[:1] if dry_run else DEVICE_TESTS
    started = time.perf_counter()
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    result = subprocess.run(
        [*pytest, f"--junitxml={report}", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cuda = [
        case.get("name", "")
        for case in suite.iter("testcase")
        if "cuda" in case.get("name", "") and case.find("skipped") is None
    ]
    return counts | {
        "cuda_tests_run": len(cuda),
        "summary": summary,
        "returncode": result.returncode,
        "seconds": time.perf_counter() - started,
        "failed_output": result.stdout[-4000:] if result.returncode else "",
    }


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (size, precision, library) once, each in its own process."""
    rows = []
    libraries = ["kltune"] + ([] if args.no_trl else ["trl"])
    for completions, tokens in SIZES["dry" if args.dry_run else "full"]:
        for precision in ("fp32", "bf16"):
            work = Work(
                completions=completions,
                new_tokens=tokens,
                iterations=args.iterations,
                device=args.device,
                precision=precision,
                model="tiny" if args.dry_run else "embedded",
                threads=args.threads,
            )
            for library in libraries:
                path = args.out / f"{library}-{work.name}-{precision}.json"
                started = time.perf_counter()
                result = spawn(library, work, path, reuse=args.reuse)
                rows.append(summarise(library, work, result, time.perf_counter() - started))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(library: str, work: Work, result: dict[str, Any], wall: float) -> dict[str, Any]:
    measured = result["seconds"][work.warmup :]
    median = statistics.median(measured)
    return {
        "library": library,
        "work": work.name,
        "precision": work.precision,
        "s_per_iteration": median,
        "min_s": min(measured),
        "max_s": max(measured),
        "iterations": len(measured),
        "tokens_per_s": work.completions * work.new_tokens / median,
        "peak_gpu_mb": result.get("peak_gpu_mb"),
        "peak_rss_mb": result["peak_rss_mb"],
        "process_seconds": wall,
        "config": asdict(work),
    }


def render(meta: dict[str, Any], tests: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"trl {meta['trl']}; {meta['date']}"
        + (" (dry run: tiny random model)" if meta["dry_run"] else ""),
        "",
        f"Device tests: {tests['summary']} ({tests['cuda_tests_run']} run on CUDA).",
        "",
        "| work | precision | library | s/iteration (median) | min–max | tokens/s | "
        "peak GPU MB | peak RSS MB | time ratio | memory ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["work"], r["precision"], r["library"]): r for r in rows}
    for r in rows:
        theirs = by_key.get((r["work"], r["precision"], "trl"))
        ratio_t = ratio_m = ""
        if r["library"] == "kltune" and theirs is not None:
            ratio_t = f"{r['s_per_iteration'] / theirs['s_per_iteration']:.2f}"
            memory = "peak_gpu_mb" if r["peak_gpu_mb"] is not None else "peak_rss_mb"
            ratio_m = f"{r[memory] / theirs[memory]:.2f}"
        gpu = "" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(
            f"| {r['work']} | {r['precision']} | {r['library']} | {r['s_per_iteration']:.3f} | "
            f"{r['min_s']:.3f}–{r['max_s']:.3f} | {r['tokens_per_s']:.0f} | {gpu} | "
            f"{r['peak_rss_mb']:.0f} | {ratio_t} | {ratio_m} |"
        )
    lines += [
        "",
        "Ratios are kltune / TRL on the same work and precision, measured in the same run "
        "(memory: peak GPU memory on a GPU, peak RSS on a CPU). Tokens/s is the nominal "
        "work (completions × new tokens) per second of a whole PPO iteration.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, tiny work (CI)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--iterations", type=int, help="per process, with one warm-up")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-trl", action="store_true", help="kltune only (TRL not installed)")
    parser.add_argument("--skip-tests", action="store_true", help="measure only")
    parser.add_argument("--reuse", action="store_true", help="keep results already in --out")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu (with --dry-run for the CI-sized run)")
    args.iterations = args.iterations or (2 if args.dry_run else 4)
    if not args.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error("TRL is not installed: `pip install trl==1.12.0`, or pass --no-trl")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tests = {"summary": "skipped", "cuda_tests_run": 0, "returncode": 0}
    if not args.skip_tests:
        tests = run_device_tests(args.out, args.dry_run)
        print(f"device tests: {tests['summary']}", flush=True)
    rows = measure(args)
    meta = _meta(args)
    meta["seconds"] = time.perf_counter() - started
    payload = {"meta": meta, "device_tests": tests, "runs": rows}
    _write(args.out / "gpu.json", json.dumps(payload, indent=1))
    report = render(meta, tests, rows)
    _write(args.out / "report.md", report)
    print(report)
    return 1 if tests["returncode"] else 0


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cuda = torch.device(args.device).type == "cuda"
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d"),
    }


def _write(path: Path, text: str) -> None:
    """Write whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())

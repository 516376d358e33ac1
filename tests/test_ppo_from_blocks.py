"""examples/ppo_from_blocks.py, the loop written out by hand: in smoke mode it logs every
iteration, starts at the reference, moves β by the adaptive rule and trains the policy."""

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

import kltune

EXAMPLE = Path(__file__).parents[1] / "examples" / "ppo_from_blocks.py"


def _example() -> ModuleType:
    """The example as a module (its training runs only under ``__main__``)."""
    spec = importlib.util.spec_from_file_location("ppo_from_blocks", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_logs_each_iteration_tracks_beta_and_trains_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _example()
    argv = ["--smoke", "--out", str(tmp_path), "--seed", "3", "--threads", "1"]
    args = example.parse_args(argv)
    policy = example.main(argv)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == list(range(1, args.iterations + 1))
    assert all(math.isfinite(row["reward/score_mean"]) for row in rows)
    assert all(math.isfinite(row["kl/mean"]) for row in rows)
    assert len(capsys.readouterr().out.splitlines()) == args.iterations  # one line each

    # The policy starts as the reference: the KL of its first samples is 0 up to rounding.
    assert abs(rows[0]["kl/mean"]) < 1e-4
    # β moves by the adaptive rule, from the KL each iteration observed.
    controller = kltune.AdaptiveKLController(beta=args.beta, target=args.target_kl)
    completions = args.prompts_per_iteration * args.completions_per_prompt
    for row in rows:
        assert row["kl/beta"] == pytest.approx(controller.beta)
        controller = controller.update(row["kl/mean"], n_samples=completions)

    # Every weight tensor moved from where the same seed's tiny model starts.
    initial, _ = kltune.tiny_random_model("llama", seed=args.seed)
    pairs = list(zip(policy.model.named_parameters(), initial.parameters(), strict=True))
    unchanged = [name for (name, trained), start in pairs if torch.equal(trained, start)]
    assert unchanged == []

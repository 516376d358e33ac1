"""Checkpoints: everything needed to resume a run exactly, written atomically.

A checkpoint is a folder::

    iter_000010/
      policy.safetensors     trainable weights (policy, value head, LoRA adapter)
      optimizer.pt           optimiser state
      state.json             iteration, KL controller, baseline, metrics position
      baseline.safetensors   a learned baseline's weights (when there is one)
      rng.pt                 the run's torch.Generator state
      value_optimizer.pt     a learned baseline's optimiser state (when there is one)

It is written into a hidden temporary folder and renamed into place, so a
process killed during a save leaves the previous checkpoint as it was.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kltune.kl_control import KLController, controller_from_state

_PREFIX = "iter_"


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items() if k in names}


def _baseline_state(baseline: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(baseline) and not isinstance(baseline, type):
        return {"kind": type(baseline).__name__, **dataclasses.asdict(baseline)}
    return {"kind": type(baseline).__name__}


def save_checkpoint(
    folder: Path,
    *,
    iteration: int,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: KLController,
    baseline: object,
    generator: torch.Generator | torch.Tensor | list[torch.Tensor],
    metrics_lines: int,
    keep: int = 1,
    value_optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint for ``iteration`` under ``folder`` atomically; keep the newest ``keep``.

    Args:
        generator: the run's generator, its state, or one state per process
            of a data-parallel run (in rank order).
        extra: JSON-serialisable run state beyond the blocks' (the driver keeps
            the skip counters and the collapse detector's reference here).

    Returns:
        The checkpoint's folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{_PREFIX}{iteration:06d}"
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        save_file(_trainable_state(policy), str(scratch / "policy.safetensors"))
        if isinstance(baseline, nn.Module):
            save_file(_trainable_state(baseline), str(scratch / "baseline.safetensors"))
        torch.save(optimizer.state_dict(), scratch / "optimizer.pt")
        if isinstance(generator, torch.Generator):
            generator = generator.get_state()
        torch.save(generator, scratch / "rng.pt")
        if value_optimizer is not None:
            torch.save(value_optimizer.state_dict(), scratch / "value_optimizer.pt")
        state = {
            "iteration": iteration,
            "controller": controller.state_dict(),
            "baseline": _baseline_state(baseline),
            "metrics_lines": metrics_lines,
            "extra": extra or {},
        }
        (scratch / "state.json").write_text(json.dumps(state, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for old in sorted(folder.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder``, or None."""
    done = [p for p in sorted(folder.glob(f"{_PREFIX}*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`load_checkpoint` gives back beyond the weights it loads in place."""

    iteration: int
    controller: KLController
    baseline_state: dict[str, Any]
    metrics_lines: int
    extra: dict[str, Any]


def load_checkpoint(
    path: Path,
    *,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    baseline: object = None,
    value_optimizer: torch.optim.Optimizer | None = None,
    rank: int = 0,
) -> Restored:
    """Load weights, optimiser and RNG state in place; return iteration, controller, baseline state.

    ``rank`` picks this process's generator state from a checkpoint written by a
    data-parallel run (one state per process).

    Raises:
        ValueError: the checkpoint lacks weights the policy trains, or holds no
            generator state for ``rank``.
    """
    weights = load_file(str(path / "policy.safetensors"))
    missing = set(_trainable_state(policy)) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {sorted(missing)[:5]}")
    policy.load_state_dict(weights, strict=False)
    if isinstance(baseline, nn.Module):
        baseline.load_state_dict(load_file(str(path / "baseline.safetensors")), strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    if isinstance(rng, list):
        if rank >= len(rng):
            raise ValueError(
                f"checkpoint {path} was written by a run of {len(rng)} processes; "
                f"it holds no random state for process {rank}"
            )
        rng = rng[rank]
    generator.set_state(rng)
    if value_optimizer is not None:
        value_state = torch.load(path / "value_optimizer.pt", weights_only=True)
        value_optimizer.load_state_dict(value_state)
    state = json.loads((path / "state.json").read_text())
    return Restored(
        iteration=int(state["iteration"]),
        controller=controller_from_state(state["controller"]),
        baseline_state=state["baseline"],
        metrics_lines=int(state["metrics_lines"]),
        extra=dict(state.get("extra", {})),
    )

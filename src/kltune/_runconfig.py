"""What makes a run one run: its configuration, recorded in ``out_dir/run_config.json``
at the start and compared on resume, and the checks of ``train``'s inputs."""

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kltune._runfiles import io_error
from kltune.baselines import GAEBaseline, GRPOBaseline, LeaveOneOutBaseline
from kltune.loop import Blocks, LoopState, Sampling, Updates

FILE = "run_config.json"

#: optimiser hyperparameters compared on resume (a param group's other keys are state)
_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "amsgrad")


class RunConfigMismatchError(ValueError):
    """A resumed run whose settings differ from the ones the run was started with."""


def check_prompts(prompts: object) -> list[str]:
    """``train``'s prompts as a list: any iterable of non-empty strings, not one string."""
    if isinstance(prompts, str | bytes):
        raise TypeError(
            f"prompts is a single string ({prompts[:40]!r}); a string is a sequence of "
            "one-character prompts. Pass a list: prompts=[" + repr(prompts[:40]) + "]"
        )
    if not isinstance(prompts, Iterable):
        raise TypeError(
            f"prompts must be an iterable of strings (a list, a tuple, a generator), got "
            f"{type(prompts).__name__}"
        )
    pool = list(prompts)
    if not pool:
        raise ValueError("prompts is empty: give at least one prompt")
    for index, prompt in enumerate(pool):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is a {type(prompt).__name__}, not a str")
        if not prompt:
            raise ValueError(f"prompts[{index}] is an empty string")
    return pool


def check_settings(
    blocks: Blocks, state: LoopState, sampling: Sampling, updates: Updates, per_iteration: int
) -> None:
    """The combinations that would otherwise fail in the first iteration, or later."""
    group = sampling.completions_per_prompt
    batch = per_iteration * group
    if isinstance(state.baseline, LeaveOneOutBaseline | GRPOBaseline) and group < 2:
        raise ValueError(
            f"{type(state.baseline).__name__} compares the completions of each prompt, and "
            "sampling draws one per prompt: use Sampling(completions_per_prompt=G) with G >= 2"
        )
    if isinstance(state.baseline, GAEBaseline) and blocks.policy.value_head is None:
        raise ValueError(
            "GAEBaseline needs the policy's value head: build the Policy with value_head=True"
        )
    size = updates.minibatch_size
    if size is not None and batch % size:
        raise ValueError(
            f"Updates(minibatch_size={size}) does not divide the batch of {batch} completions "
            f"(prompts_per_iteration={per_iteration} × completions_per_prompt={group}): "
            f"choose a divisor of {batch}"
        )
    rows = size if size is not None else batch
    if rows % updates.grad_accumulation_steps:
        raise ValueError(
            f"Updates(grad_accumulation_steps={updates.grad_accumulation_steps}) does not "
            f"divide the minibatch of {rows} completions"
        )


def _plain(value: Any) -> Any:
    """A JSON-able, address-free description of a setting."""
    if isinstance(value, torch.dtype):
        return str(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"kind": type(value).__name__, **fields}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return type(value).__qualname__


def _model(module: nn.Module) -> dict[str, Any]:
    config = getattr(getattr(module, "model", module), "config", None)
    text = json.dumps(config.to_dict(), sort_keys=True, default=str) if config is not None else ""
    return {
        "class": type(getattr(module, "model", module)).__name__,
        "config_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def describe(
    prompts: list[str],
    blocks: Blocks,
    state: LoopState,
    sampling: Sampling,
    updates: Updates,
    seed: int,
    per_iteration: int,
) -> dict[str, Any]:
    """The settings that make a run one run (not ``iterations``: a resume may extend it)."""
    groups = blocks.optimizer.param_groups
    return {
        "model": _model(blocks.policy),
        "prompts": {
            "count": len(prompts),
            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        },
        "prompts_per_iteration": per_iteration,
        "seed": seed,
        "sampling": _plain(sampling),
        "updates": _plain(updates),
        "optimizer": {
            "kind": type(blocks.optimizer).__name__,
            "param_groups": [{k: _plain(g[k]) for k in _OPTIMIZER_KEYS if k in g} for g in groups],
        },
        "objective": _plain(blocks.objective),
        "reward_fn": _plain(blocks.reward_fn),
        "baseline": _plain(state.baseline)
        if not isinstance(state.baseline, nn.Module)
        else type(state.baseline).__name__,
        "controller": _plain(state.controller.state_dict()),
    }


def differences(recorded: Any, current: Any, path: str = "") -> list[str]:
    """Each setting that differs, as ``"path: recorded → current"``."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        keys = sorted(set(recorded) | set(current))
        return [
            line
            for k in keys
            for line in differences(
                recorded.get(k, "(absent)"), current.get(k, "(absent)"), f"{path}.{k}".lstrip(".")
            )
        ]
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        return [
            line
            for i, (a, b) in enumerate(zip(recorded, current, strict=True))
            for line in differences(a, b, f"{path}[{i}]")
        ]
    return [] if recorded == current else [f"{path}: {recorded!r} → {current!r}"]


def read(out: Path) -> dict[str, Any] | None:
    path = out / FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a valid run configuration: {error}") from None


def write(out: Path, config: dict[str, Any]) -> None:
    path = out / FILE
    scratch = out / f".{FILE}.tmp"
    try:
        scratch.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(scratch, path)
    except OSError as error:
        raise io_error(error, path, "write") from error

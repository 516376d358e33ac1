"""Checkpoints: everything needed to resume a run exactly, written atomically, verified on load.

A checkpoint is a folder::

    iter_000010/
      policy.safetensors     trainable weights (policy, value head, LoRA adapter)
      optimizer.pt           optimiser state
      state.json             iteration, KL controller, baseline, metrics position
      baseline.safetensors   a learned baseline's weights (when there is one)
      rng.pt                 the run's torch.Generator state
      value_optimizer.pt     a learned baseline's optimiser state (when there is one)
      manifest.json          every other file's size and SHA-256, written last

It is written into a hidden ``.partial-*`` folder, each file flushed to the disk,
and renamed into place, so a process killed during a save leaves the previous
checkpoints as they were (the driver removes the partial folder at its next
start). A failed write (a full disk, a file-size limit, no permission) raises an
``OSError`` that names the cause and the path, and leaves nothing behind.

Loading checks the manifest first (every file present, of its size and checksum),
then reads and validates everything (finite weights, the weights the policy
trains, a random state for this process, a well-formed ``state.json``) into
temporaries; only then are the policy, optimiser and generator changed. A
checkpoint that fails raises :class:`CheckpointError` naming the file and the
problem, and :func:`load_latest_checkpoint` falls back to the newest good one.
"""

import dataclasses
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from kltune._checks import check_count
from kltune._runfiles import file_sha256, io_error, sha256, write_bytes
from kltune.kl_control import KLController, controller_from_state

_PREFIX = "iter_"
_MANIFEST = "manifest.json"
_PARTIAL_PREFIX = ".partial-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a file missing, truncated, corrupted or
    invalid. The message names the checkpoint, the file and the problem."""


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items() if k in names}


def _baseline_state(baseline: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(baseline) and not isinstance(baseline, type):
        return {"kind": type(baseline).__name__, **dataclasses.asdict(baseline)}
    return {"kind": type(baseline).__name__}


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def estimated_size(policy: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes one checkpoint takes, about: the trainable weights, plus two moments of
    each for Adam-like optimisers (a margin for others)."""
    weights = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    return weights * (3 if optimizer is not None else 1) + (1 << 20)


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
    keep: int = 2,
    value_optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint for ``iteration`` under ``folder`` atomically; keep the newest ``keep``.

    Each file is serialised in memory, written, flushed to the disk and listed in
    ``manifest.json`` with its size and SHA-256; the folder is renamed into place
    only when all are written.

    Args:
        generator: the run's generator, its state, or one state per process
            of a data-parallel run (in rank order).
        keep: how many checkpoints to keep (>= 1), so that a damaged newest one
            has an older one to fall back to.
        extra: JSON-serialisable run state beyond the blocks' (the driver keeps
            the skip counters and the collapse detector's reference here).

    Returns:
        The checkpoint's folder.

    Raises:
        OSError: a file could not be written (full disk, file-size limit, no
            permission), naming the cause and the path; nothing is left behind.
        ValueError: ``keep`` < 1.
    """
    check_count(keep, name="keep")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=folder))
    except OSError as error:
        raise io_error(error, folder, "create a checkpoint in") from error
    target = folder / f"{_PREFIX}{iteration:06d}"
    if isinstance(generator, torch.Generator):
        generator = generator.get_state()
    files: dict[str, Callable[[], bytes]] = {
        "policy.safetensors": lambda: save_safetensors(_trainable_state(policy)),
        "optimizer.pt": lambda: _torch_bytes(optimizer.state_dict()),
        "rng.pt": lambda: _torch_bytes(generator),
    }
    if isinstance(baseline, nn.Module):
        files["baseline.safetensors"] = lambda: save_safetensors(_trainable_state(baseline))
    if value_optimizer is not None:
        files["value_optimizer.pt"] = lambda: _torch_bytes(value_optimizer.state_dict())
    state = {
        "iteration": iteration,
        "controller": controller.state_dict(),
        "baseline": _baseline_state(baseline),
        "metrics_lines": metrics_lines,
        "extra": extra or {},
    }
    files["state.json"] = lambda: json.dumps(state, indent=2).encode()
    try:
        manifest = {}
        for name, serialise in files.items():
            data = serialise()  # one file in memory at a time
            write_bytes(scratch / name, data)
            manifest[name] = {"bytes": len(data), "sha256": sha256(data)}
            del data
        write_bytes(scratch / _MANIFEST, json.dumps(manifest, indent=2).encode())
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for old in sorted(folder.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(folder: Path) -> list[Path]:
    """Every checkpoint folder under ``folder`` (complete or not), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{_PREFIX}*") if p.is_dir())


def remove_partial_saves(folder: Path) -> list[Path]:
    """Delete the hidden folders that saves killed half-way left under ``folder``
    (each a partial copy of the model and optimiser); return what was removed.
    Call it only while no save is running (the driver does, under its lock)."""
    partial = sorted(folder.glob(f"{_PARTIAL_PREFIX}*")) if folder.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint under ``folder`` whose manifest is written, or None
    (not verified: :func:`load_latest_checkpoint` verifies and falls back)."""
    done = [p for p in checkpoints(folder) if (p / _MANIFEST).is_file()]
    return done[-1] if done else None


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`load_checkpoint` gives back beyond the weights it loads in place."""

    iteration: int
    controller: KLController
    baseline_state: dict[str, Any]
    metrics_lines: int
    extra: dict[str, Any]
    path: Path | None = None


def verify_checkpoint(path: Path) -> dict[str, dict[str, Any]]:
    """Check a checkpoint's files against its manifest; return the manifest.

    Raises:
        CheckpointError: no manifest, or a file missing, of the wrong size or
            with the wrong checksum.
    """
    manifest_path = path / _MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {_MANIFEST} (the save was "
            "interrupted, or it was written by a kltune without manifests)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in manifest.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{manifest_path} is not a valid manifest: {error}") from None
    for name in ("policy.safetensors", "optimizer.pt", "rng.pt", "state.json"):
        if name not in entries:
            raise CheckpointError(f"{manifest_path} does not list {name}")
    for name, (size, digest) in entries.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {file} has {actual} bytes, the manifest says {size} "
                "(truncated or overwritten)"
            )
        if file_sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint file {file} does not match its checksum (its bytes changed "
                "after it was written)"
            )
    return manifest


def _read(path: Path, reader: Callable[[bytes], Any]) -> Any:
    try:
        return reader(path.read_bytes())
    except OSError as error:
        raise io_error(error, path, "read") from error
    except Exception as error:  # a corrupt file: torch, safetensors and json raise many kinds
        raise CheckpointError(f"checkpoint file {path} cannot be read: {error}") from error


def _torch_load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _check_finite(path: Path, weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint file {path} holds non-finite values in {name}")


def _check_optimizer_state(path: Path, state: Any, optimizer: torch.optim.Optimizer) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, before anything is loaded."""
    try:
        groups = state["param_groups"]
        sizes = [len(group["params"]) for group in groups]
    except (KeyError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint file {path} is not an optimiser state: {error}"
        ) from None
    expected = [len(group["params"]) for group in optimizer.param_groups]
    if sizes != expected:
        raise CheckpointError(
            f"checkpoint file {path} holds an optimiser for parameter groups of sizes "
            f"{sizes}, this one has {expected} (a different model or optimiser)"
        )


def _generator_state(path: Path, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Process ``rank``'s generator state from ``rng.pt``, checked to fit ``generator``."""
    rng = _read(path / "rng.pt", _torch_load)
    if isinstance(rng, list):
        if rank >= len(rng):
            raise CheckpointError(
                f"checkpoint {path} was written by a run of {len(rng)} processes; "
                f"it holds no random state for process {rank}"
            )
        rng = rng[rank]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise CheckpointError(f"checkpoint file {path / 'rng.pt'} holds no generator state")
    if rng.numel() != generator.get_state().numel():
        raise CheckpointError(
            f"checkpoint {path} holds the state of a generator of another kind than this "
            f"run's (on {generator.device}): resume on the device type the run started on"
        )
    return rng


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
    """Verify a checkpoint, then load weights, optimiser and RNG state in place.

    Everything is read and checked before anything is changed: if this raises,
    the policy, optimiser, baseline and generator are as they were.

    ``rank`` picks this process's generator state from a checkpoint written by a
    data-parallel run (one state per process).

    Returns:
        The iteration, controller, baseline state and log position to resume from.

    Raises:
        CheckpointError: a file missing, truncated, corrupted or invalid (its
            checksum, non-finite weights, weights the policy trains missing, no
            generator state for ``rank``, a malformed ``state.json``).
        OSError: a file could not be read.
    """
    verify_checkpoint(path)
    weights = _read(path / "policy.safetensors", load_safetensors)
    _check_finite(path / "policy.safetensors", weights)
    missing = set(_trainable_state(policy)) - set(weights)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks weights for {sorted(missing)[:5]}")
    baseline_weights = None
    if isinstance(baseline, nn.Module):
        baseline_weights = _read(path / "baseline.safetensors", load_safetensors)
        _check_finite(path / "baseline.safetensors", baseline_weights)
    optimizer_state = _read(path / "optimizer.pt", _torch_load)
    rng = _generator_state(path, rank, generator)
    _check_optimizer_state(path / "optimizer.pt", optimizer_state, optimizer)
    value_state = None
    if value_optimizer is not None:
        value_state = _read(path / "value_optimizer.pt", _torch_load)
        _check_optimizer_state(path / "value_optimizer.pt", value_state, value_optimizer)
    state = _read(path / "state.json", json.loads)
    try:
        restored = Restored(
            iteration=int(state["iteration"]),
            controller=controller_from_state(state["controller"]),
            baseline_state=dict(state["baseline"]),
            metrics_lines=int(state["metrics_lines"]),
            extra=dict(state.get("extra", {})),
            path=path,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path / 'state.json'} is not a valid run state: {error}") from None
    # Everything is read and valid: now change the blocks.
    policy.load_state_dict(weights, strict=False)
    if isinstance(baseline, nn.Module) and baseline_weights is not None:
        baseline.load_state_dict(baseline_weights, strict=False)
    optimizer.load_state_dict(optimizer_state)
    generator.set_state(rng)
    if value_optimizer is not None and value_state is not None:
        value_optimizer.load_state_dict(value_state)
    return restored


def load_latest_checkpoint(folder: Path, **blocks: Any) -> Restored | None:
    """Load the newest checkpoint under ``folder`` that verifies, warning about each
    newer one that does not (and why); None when there is none.

    ``blocks`` are :func:`load_checkpoint`'s keyword arguments. A checkpoint that
    fails leaves the blocks untouched, so the next older one loads cleanly.
    """
    for path in reversed(checkpoints(folder)):
        try:
            return load_checkpoint(path, **blocks)
        except CheckpointError as error:
            warnings.warn(f"skipping a checkpoint that cannot be used: {error}", stacklevel=2)
    return None

"""Speed and memory settings, kept out of the algorithm and applied by one visible call.

:func:`kltune.loop.ppo_iteration` is the algorithm and nothing else: it never
touches the host's allocator or the optimiser's internals. What makes an
iteration cheaper on a CPU lives here, and :func:`prepare` applies it::

    blocks = kltune.accel.prepare(blocks)                         # before the first iteration
    blocks = kltune.accel.prepare(blocks, step_in_backward=True)  # also: no set of gradients alive

Each setting with what it measured on SmolLM2-135M, 16 × 32 tokens, 2 CPU
threads (:doc:`/performance` has the tables):

- :func:`keep_freed_memory`: glibc keeps the memory one iteration frees for the
  next; about 230 000 page faults (0.5–1.5 s) an iteration fewer. **Process-wide**,
  and it stays in effect: that is why it is a call you make, not a default.
- :func:`allocate_optimizer_state`: Adam's moments created before any
  activation exists; peak RSS 4074 → 3673 MB, same updates.
- :class:`StepInBackward`: each parameter updated as soon as its gradient is
  complete, then the gradient freed; one set of gradients less alive (538 MB in
  theory), the same update.

The model-level fast paths (a lean decoding loop for sampling, the output layer
fused into the logprobs, RMSNorm and SwiGLU keeping fewer activations while
scoring) touch no process-wide state; :class:`~kltune.Policy` uses them where
:func:`fast_paths` says the model has them: an architecture registered in
:data:`ARCHITECTURES`, under a transformers release in
:data:`TESTED_TRANSFORMERS`, with no config setting that changes the function
(logit soft-capping or scaling). Anything else runs the model's own forward,
and says so once in the ``kltune`` logger. Every fast path has an equivalence
test against the model's own forward.
"""

import ctypes
import dataclasses
import functools
import importlib
import logging
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import transformers
from torch import Tensor, nn

if TYPE_CHECKING:
    from kltune.loop import Blocks

__all__ = [
    "ARCHITECTURES",
    "TESTED_TRANSFORMERS",
    "FastPaths",
    "StepInBackward",
    "allocate_optimizer_state",
    "fast_paths",
    "keep_freed_memory",
    "prepare",
]

_log = logging.getLogger("kltune")


def prepare(
    blocks: "Blocks", *, keep_memory: bool = True, step_in_backward: bool = False
) -> "Blocks":
    """Apply the speed and memory settings to ``blocks``; call it once, before training.

    Args:
        blocks: the blocks :func:`~kltune.loop.ppo_iteration` will run.
        keep_memory: on a CPU policy, have glibc keep freed memory
            (:func:`keep_freed_memory`, process-wide).
        step_in_backward: update each parameter inside backward
            (:class:`StepInBackward`); needs ``Updates(grad_accumulation_steps=1,
            max_grad_norm=None)`` and one process.

    Returns:
        The same blocks, with ``backward`` replaced when ``step_in_backward``.
        The optimisers' state is created now (:func:`allocate_optimizer_state`).
    """
    if keep_memory and blocks.policy.device.type == "cpu":
        keep_freed_memory()
    allocate_optimizer_state(blocks.optimizer)
    if blocks.value_fit is not None:
        allocate_optimizer_state(blocks.value_fit.optimizer)
    if step_in_backward:
        blocks = dataclasses.replace(
            blocks, backward=StepInBackward(blocks.policy.parameters(), blocks.optimizer)
        )
    return blocks


def allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create Adam's or AdamW's moment buffers now, before any activation exists.

    torch creates them at the first step, in the middle of the first backward,
    where they land between activations that are about to be freed. The memory
    allocator keeps those holes, and every later iteration's activations come
    on top: on SmolLM2-135M the peak RSS of each iteration was 400 MB higher
    (4074 MB against 3673 MB). Created up front, the buffers sit below the
    activations, whose memory then goes back to the system after each backward.

    The state is what torch would create (zeros and step 0), so the updates are
    unchanged. Other optimisers, and an optimiser that already has state (a
    resumed run), are left alone.

    Returns:
        True if state was created.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper: the real one
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or inner.state:
        return False
    from torch.optim.optimizer import _get_scalar_dtype

    for group in inner.param_groups:
        for param in group["params"]:
            if not param.requires_grad:
                continue  # never gets a gradient, so torch never gives it state
            on_device = group["capturable"] or group["fused"]
            state = inner.state[param]
            state["step"] = torch.zeros(
                (),
                dtype=_get_scalar_dtype(is_fused=group["fused"]),
                device=param.device if on_device else torch.device("cpu"),
            )
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
    return True


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse: a process-wide setting.

    By default glibc hands every large block (over 128 kB to 32 MB, adapting)
    back to the system as soon as it is freed, and the top of its heap once
    enough of it is free. A PPO iteration frees most of what it allocated
    (activations, gradients, logits chunks) and allocates it again in the next
    iteration, and every page the system hands back is zeroed and mapped again
    on first touch: on SmolLM2-135M at 16 × 32 that is about 230 000 page
    faults an iteration, 0.5–1.5 s on a 2-core VM, more when the machine is
    busy. After this call every allocation is served from malloc's heap
    (``M_MMAP_MAX = 0``) and the heap is not trimmed below 2 GB of free top
    (``M_TRIM_THRESHOLD``), so each iteration reuses the pages of the one
    before: the process does not shrink between iterations, and its peak is
    what it was. PyTorch's caching allocator does the same on a GPU.

    It affects the whole process and stays in effect; :func:`prepare` calls it
    for a CPU policy. The same setting from outside a process:
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.

    Returns:
        True if glibc accepted both settings; False elsewhere (another C library,
        another operating system), where nothing is changed.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class StepInBackward:
    """A backward that applies the optimiser to each parameter as soon as its
    gradient is complete, and frees that gradient at once.

    Use it as ``Blocks.backward`` (:func:`prepare` does). The peak memory no
    longer holds a full set of gradients (a model's worth, 0.5 GB for a 135M
    model in float32); the update is the same as a step after backward, because
    ``optimizer.step()`` only updates parameters that have a gradient, and at a
    hook's call only that hook's parameter has one. The loop's own
    ``optimizer.step()`` afterwards finds no gradient and changes nothing.

    A non-finite loss is not backpropagated (the step is skipped as a whole); a
    non-finite gradient skips that parameter's update, but parameters whose
    gradients came earlier in backward are already updated, and the step counts
    as skipped. Needs ``Updates(grad_accumulation_steps=1, max_grad_norm=None)``
    (a global norm needs every gradient first) and one process.
    """

    def __init__(self, parameters: Iterable[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.parameters = [p for p in parameters if p.requires_grad]
        self._squares: list[Tensor] = []
        self._finite = True

    def __call__(self, loss: Tensor) -> None:
        self._squares, self._finite = [], bool(torch.isfinite(loss))
        if not self._finite:
            return
        handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.parameters]
        try:
            loss.backward()
        finally:
            for handle in handles:
                handle.remove()

    def _step(self, param: Tensor) -> None:
        assert param.grad is not None
        square = param.grad.detach().float().pow(2).sum()
        self._squares.append(square)
        if bool(torch.isfinite(square)):
            self.optimizer.step()
        else:
            self._finite = False
        param.grad = None

    def grad_norm(self) -> Tensor:
        """The global gradient norm of the last backward (NaN if any part was not
        finite, or if nothing was backpropagated)."""
        if not self._finite or not self._squares:
            return torch.tensor(float("nan"))
        return torch.stack(self._squares).sum().sqrt().cpu()


# ── the model-level fast paths: which architectures, under which transformers ──


@dataclass(frozen=True)
class FastPaths:
    """The fast paths of one architecture (each off unless the table turns it on).

    Args:
        module: the transformers modelling module (``"llama"`` for
            ``transformers.models.llama.modeling_llama``).
        lean_decoding: sampling through a lean decoding loop on a CPU
            (``kltune._decoding.LlamaDecoding``; 4.0–4.4 s against 5.0–5.2 s a
            rollout of 16 × 32 on SmolLM2-135M).
        fused_head: the output layer fused into the logprobs while scoring, no
            ``[B, T, V]`` logits (−1.15 GB peak at 64 × 32): the logits must be
            exactly ``output_layer(last hidden state)``.
        norm: the class name of its RMSNorm, run with fewer saved activations
            while scoring (947 → 734 MB saved at 16 × 42); None for none.
        mlp: the class name of its SwiGLU MLP, likewise.
    """

    module: str
    lean_decoding: bool = False
    fused_head: bool = False
    norm: str | None = None
    mlp: str | None = None


#: Causal LM classes (by their transformers name) and their fast paths; a class
#: not listed, or a subclass of one, runs the model's own forward.
ARCHITECTURES: dict[str, FastPaths] = {
    "LlamaForCausalLM": FastPaths("llama", True, True, "LlamaRMSNorm", "LlamaMLP"),
    "MistralForCausalLM": FastPaths("mistral", True, True, "MistralRMSNorm", "MistralMLP"),
    "Qwen2ForCausalLM": FastPaths("qwen2", True, True, "Qwen2RMSNorm", "Qwen2MLP"),
    # q/k norms inside attention: no lean decoding
    "Qwen3ForCausalLM": FastPaths("qwen3", False, True, "Qwen3RMSNorm", "Qwen3MLP"),
    "GPT2LMHeadModel": FastPaths("gpt2", fused_head=True),
    "GPTNeoXForCausalLM": FastPaths("gpt_neox", fused_head=True),
}

#: The transformers releases the fast paths are tested with, ``[first, end)`` as
#: (major, minor); pyproject.toml pins the same range.
TESTED_TRANSFORMERS: tuple[tuple[int, int], tuple[int, int]] = ((5, 24), (5, 25))

#: Config settings that make the logits something other than the plain function
#: the fast paths compute (unset, None or 1 is harmless).
_CONFIG_CHANGES_FUNCTION = (
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "logit_scale",
    "logits_scaling",
)

_NONE = FastPaths("")


def fast_paths(model: nn.Module) -> FastPaths:
    """The fast paths ``model`` gets: its entry in :data:`ARCHITECTURES`, or none.

    A peft model is looked through to its base model. None for an unregistered
    class (or a subclass), a transformers release outside
    :data:`TESTED_TRANSFORMERS`, a registered name transformers no longer has,
    or a config that changes the function; each reason is logged once, at INFO,
    to ``logging.getLogger("kltune")``.
    """
    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) else model
    name = type(lm).__name__
    entry = ARCHITECTURES.get(name)
    if entry is None:
        _log_once(f"{name} is not in kltune.accel.ARCHITECTURES: it runs its own forward")
        return _NONE
    first, end = TESTED_TRANSFORMERS
    if not first <= _version(transformers.__version__) < end:
        _log_once(
            f"transformers {transformers.__version__} is outside the tested range "
            f"[{first[0]}.{first[1]}, {end[0]}.{end[1]}): kltune's fast paths are off"
        )
        return _NONE
    if type(lm) is not component(entry, name):
        _log_once(f"{type(lm).__qualname__} is not transformers' {name}: it runs its own forward")
        return _NONE
    config = getattr(lm, "config", None)
    changed = [k for k in _CONFIG_CHANGES_FUNCTION if getattr(config, k, None) not in (None, 1)]
    if changed:
        _log_once(f"{name} sets {', '.join(changed)} in its config: it runs its own forward")
        return _NONE
    return entry


def component(paths: FastPaths, name: str | None) -> type | None:
    """The class ``name`` of ``paths``' transformers modelling module (None if absent)."""
    if name is None or not paths.module:
        return None
    return _transformers_class(paths.module, name)


@functools.cache
def _transformers_class(module: str, name: str) -> type | None:
    path = f"transformers.models.{module}.modeling_{module}"
    found = getattr(importlib.import_module(path), name, None)
    if not isinstance(found, type):
        _log_once(f"{path} has no {name}: the fast paths that need it are off")
        return None
    return found


def _version(text: str) -> tuple[int, int]:
    major, minor = [*text.split("."), "0"][:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.cache
def _log_once(message: str) -> None:
    _log.info(message)

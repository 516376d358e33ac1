"""Data-parallel PPO with Hugging Face Accelerate: the same loop on several processes.

Each process samples completions for its own share of the prompts (with its own
random stream), scores them with the reward and the reference, and computes
advantages, exactly as one process would. The processes agree where the
algorithm needs the whole batch:

- **gradients** are averaged by the engine (DDP; FSDP and DeepSpeed through
  accelerate's configs): the loss scores minibatches through the prepared,
  wrapped policy;
- **advantage whitening** uses the mean and variance of every process's tokens;
- **β** is updated from the KL averaged over every process's completions, so
  the controller stays identical everywhere;
- **metrics** are averaged over processes; only the main process writes files.

Single-process use needs none of this: :func:`kltune.train` without an
``accelerator`` is unchanged.

Caveats, stated rather than hidden:

- The default loss aggregate, :func:`~kltune.functional.token_mean`, averages
  over each process's tokens and the engine then averages processes: this
  equals one process's token mean over the whole batch when every process
  holds as many response tokens; otherwise each process's tokens weigh
  ``1 / its count``. (:func:`~kltune.functional.sequence_mean` with equal rows
  per process is always exact.)
- Baselines that look at the batch (:class:`~kltune.MeanBaseline`, the group
  baselines) use each process's own rows; keep a prompt's completions on one
  process (they are: the driver splits prompts, not rows).
- A separately trained baseline (:class:`~kltune.ValueFit`) would drift apart
  across processes and is refused; use the policy's value head instead.
- Sampling runs on the unwrapped policy. Under FSDP or DeepSpeed ZeRO-3 the
  parameters are sharded, so generation needs them gathered (FSDP's
  ``summon_full_params``); this path is untested here (no GPUs).
"""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, final, runtime_checkable

import torch
from torch import Tensor

from kltune.objective import Scorer
from kltune.policy import PolicyOutput
from kltune.reference import FrozenReference
from kltune.rollout import Rollout

if TYPE_CHECKING:
    from kltune.loop import Blocks


@runtime_checkable
class AllReduce(Protocol):
    """Sum a tensor over the processes of a data-parallel run (the identity in one process)."""

    def __call__(self, tensor: Tensor) -> Tensor: ...


def one_process(tensor: Tensor) -> Tensor:
    """The :class:`AllReduce` of a single process: the tensor itself."""
    return tensor


@final
@dataclass(frozen=True)
class DataParallel:
    """How the processes of a data-parallel run take part in one PPO iteration.

    The loop's only distributed plumbing, set by :func:`prepare` (the default is
    one process, which needs none of it).

    ``scorer`` is what the loss calls to score a minibatch with gradient: the
    wrapped policy, so that the engine synchronises gradients (None: the policy
    itself). ``all_reduce`` sums a tensor over processes: for the whitening
    statistics, the KL that drives β, and the logged metrics.
    """

    scorer: Scorer | None = None
    all_reduce: AllReduce = one_process


ONE_PROCESS = DataParallel()
"""The default :class:`DataParallel`: one process, the policy scores itself."""


class _ThroughWrapper:
    """A :class:`~kltune.objective.Scorer` that calls the wrapped policy's forward."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        self.wrapped = wrapped

    def score(
        self,
        rollout: Rollout,
        *,
        entropy_with_grad: bool = False,
        with_head: bool = False,
    ) -> PolicyOutput:
        out: PolicyOutput = self.wrapped(
            rollout, entropy_with_grad=entropy_with_grad, with_head=with_head
        )
        return out


def prepare(blocks: "Blocks", accelerator: Any) -> "Blocks":
    """Blocks ready for a run under ``accelerator`` (an ``accelerate.Accelerator``).

    Prepares the policy (wrapped for gradient synchronisation; the same
    parameters as ``blocks.policy``) and the optimiser, moves a frozen
    reference to the accelerator's device, and routes backward and the
    cross-process sums through the accelerator. With one process the result
    computes exactly what ``blocks`` computes.

    Raises:
        ValueError: ``blocks.value_fit`` is set and there are several processes.
    """
    if blocks.value_fit is not None and accelerator.num_processes > 1:
        raise ValueError(
            "a separately fitted baseline (value_fit) is not synchronised across processes "
            "and would drift apart; use the policy's value head (GAEBaseline) instead"
        )
    wrapped, optimizer = accelerator.prepare(blocks.policy, blocks.optimizer)
    if isinstance(blocks.reference, FrozenReference):
        blocks.reference.model.to(accelerator.device)

    def all_reduce(tensor: Tensor) -> Tensor:
        if accelerator.num_processes == 1:
            return tensor
        out: Tensor = accelerator.reduce(tensor.to(accelerator.device), reduction="sum")
        return out.to(tensor.device)

    return dataclasses.replace(
        blocks,
        optimizer=optimizer,
        backward=accelerator.backward,
        data_parallel=DataParallel(scorer=_ThroughWrapper(wrapped), all_reduce=all_reduce),
    )

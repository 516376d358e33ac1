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
from typing import Any

import torch
from torch import Tensor

from kltune.loop import Blocks
from kltune.objective import Scorer
from kltune.policy import PolicyOutput
from kltune.reference import FrozenReference
from kltune.rollout import Rollout


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


def prepare(blocks: Blocks, accelerator: Any) -> Blocks:
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

    scorer: Scorer = _ThroughWrapper(wrapped)
    return dataclasses.replace(
        blocks,
        optimizer=optimizer,
        scorer=scorer,
        backward=accelerator.backward,
        all_reduce=all_reduce,
    )
